"""Public losses: argument checks, canonical views, autograd Functions, reductions.

Layers, for cross-entropy: kernel (csrc/, fusedloss/triton) -> op `fusedloss::ce_fwd`
-> backend namespace (fusedloss/_backend.py) -> `_CrossEntropyFn` (here) ->
`cross_entropy` (here) -> `fusedloss.nn.CrossEntropyLoss`.

Every kernel returns per-row results (loss, and the row's share of the "mean"
denominator) and, when the input requires grad, writes d(row loss)/d(input) in the same
pass. The reduction and its denominator are computed here on tensors, so nothing syncs,
and backward is one in-place scaling of that gradient by grad_output (/ denominator).
"""
import warnings
from typing import Optional

import torch
from torch import Tensor

from fusedloss import _backend, _ops
from fusedloss._ops import acc_dtype

__all__ = ["cross_entropy", "binary_cross_entropy_with_logits", "sigmoid_focal_loss", "focal_loss"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------- checks
def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean', 'sum'; got {reduction!r}")


def _check_float(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def _check_device(name, t, ref):
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but input is on {ref.device}")


def _reduction_of(size_average, reduce, reduction):
    """The deprecated size_average / reduce pair, as torch.nn._reduction.legacy_get_string
    maps it (written out: the torch helper is not traceable by torch.compile)."""
    if size_average is not None or reduce is not None:
        if not torch.compiler.is_compiling():
            warnings.warn("size_average and reduce args will be deprecated, please use reduction='sum' instead.")
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        return "none" if not reduce else "mean" if size_average else "sum"
    _check_reduction(reduction)
    return reduction


def _no_grad_needed(name, t):
    """Gradients flow to the input only; a target or weight that requires grad would get
    none silently, so it is refused (PyTorch does differentiate soft targets)."""
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"fusedloss: the gradient with respect to {name} is not implemented (only the input's); "
            f"pass {name}.detach() if no gradient is wanted there"
        )


def _class_weight(name, weight, input, num_classes):
    """(C,) weight in the accumulation dtype, or None."""
    if weight is None:
        return None
    _check_float(name, weight)
    _check_device(name, weight, input)
    _no_grad_needed(name, weight)
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"{name} should be defined either for all {num_classes} classes or no classes, "
            f"expected shape ({num_classes},), got {tuple(weight.shape)}"
        )
    return weight.detach().to(acc_dtype(input.dtype)).contiguous()


def _rows3(t: Tensor) -> Tensor:
    """(C,) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d1..dK) -> (N, C, D). A view where the
    strides allow it (the kernels take any strides), a copy only where d1..dK don't merge."""
    if t.dim() == 1:
        return t.view(1, t.shape[0], 1)
    if t.dim() == 2:
        return t.unsqueeze(-1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _check_class_target(input, target):
    """Validates a class-index target against input; returns the expected target shape."""
    if input.dim() == 1:
        expected = ()
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        if input.dim() >= 2 and target.dim() >= 1 and target.shape[0] != input.shape[0]:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target.shape[0]}); "
                f"input shape {tuple(input.shape)}, target shape {tuple(target.shape)}"
            )
        raise ValueError(f"Expected target of shape {expected} for input of shape {tuple(input.shape)}, got {tuple(target.shape)}")
    return expected


def _class_mask(mask, input):
    if mask is None:
        return None
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool Tensor (True = class allowed), got {getattr(mask, 'dtype', type(mask).__name__)}")
    _check_device("mask", mask, input)
    _check_broadcastable("mask", mask, input)
    return _rows3(mask.expand(input.shape))


def _check_broadcastable(name, t, input):
    try:
        shape = torch.broadcast_shapes(t.shape, input.shape)
    except RuntimeError:
        shape = None
    if shape != input.shape:
        raise ValueError(f"{name} of shape {tuple(t.shape)} is not broadcastable to the input's shape {tuple(input.shape)}")


def _backend_for(backend, input):
    return _backend.resolve(backend, input.device).name


# ----------------------------------------------------------------------------- reductions
def _reduce(loss: Tensor, count: Optional[Tensor], reduction: str):
    """(reduced loss in the accumulation dtype, denominator or None). "mean" over zero
    counted rows is 0 (SPEC rule 6), without a host sync."""
    if reduction == "none":
        return loss, None
    total = loss.sum()
    if reduction == "sum":
        return total, None
    denom = count.sum() if count is not None else None
    return torch.where(denom > 0, total / denom, torch.zeros_like(total)), denom


def _grad_scale(grad_out: Tensor, denom: Optional[Tensor], reduction: str, row_shape):
    """What the kernel's unscaled gradient is multiplied by in backward."""
    if reduction == "none":
        return grad_out.reshape(row_shape)
    if reduction == "sum":
        return grad_out
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, grad_out / safe, torch.zeros_like(safe))


def _forward(ctx, x, run, reduction, inplace, grad_row_shape, numel=None):
    """Shared forward: `run(grad)` launches the kernel, which returns (per-row loss, per-row
    count or None) and, when grad is given, writes d(row loss)/dx into it. No gradient
    pass under torch.no_grad() (needs_input_grad alone is still True there)."""
    grad = None
    if ctx.needs_input_grad[0] and ctx.grad_enabled:
        grad = x if inplace else _ops.empty_grad(x)
    loss, count = run(grad)
    if numel is not None and reduction == "mean":  # elementwise losses: "mean" is sum / numel
        out, denom = loss.sum() / numel, None
    else:
        out, denom = _reduce(loss, count, reduction)
    ctx.reduction, ctx.grad_row_shape, ctx.numel = reduction, grad_row_shape, numel
    ctx.traced = torch.compiler.is_compiling()
    if ctx.traced:
        # A traced graph is functional: the scaling in backward is out of place anyway.
        ctx.save_for_backward(grad, denom)
    else:
        # Eager: the gradient buffer is scaled in place in backward, so forward+backward
        # holds one N x C buffer, which becomes input.grad. It is kept off the saved-tensor
        # list so that a second backward through the same graph (retain_graph=True,
        # gradcheck's reentrancy check) can regenerate the unscaled gradient by running
        # the kernel again; x is saved so that autograd checks it was not modified since.
        ctx.save_for_backward(denom, None if inplace else x)
        ctx.grad, ctx.rerun, ctx.used = grad, (None if inplace else run), False
    return out.to(x.dtype)


class _RowLossFn(torch.autograd.Function):
    """Shared backward: the forward kernel already wrote the gradient of each row's loss;
    backward scales it by grad_output (/ denominator) -- one pass, in place (eager).

    With inplace_backward the gradient lives in the input's storage (no N x C allocation
    at all); a second backward through the same graph then raises, since the logits it
    would need were overwritten."""

    @staticmethod
    def backward(ctx, grad_out):
        create_graph = torch.is_grad_enabled()
        if ctx.traced:
            grad, denom = ctx.saved_tensors
        else:
            denom, _ = ctx.saved_tensors  # also checks the saved input is unmodified
            grad = ctx.grad
        if grad is None:
            return (None,) * 12
        with torch.no_grad():
            if ctx.numel is not None and ctx.reduction == "mean":
                scale = grad_out / ctx.numel
            else:
                scale = _grad_scale(grad_out, denom, ctx.reduction, ctx.grad_row_shape)
            if ctx.traced:
                scaled = torch.mul(grad, scale).to(grad.dtype)
            else:
                if ctx.used:  # second backward through this graph: the buffer was scaled
                    if ctx.rerun is None:
                        raise RuntimeError(
                            "fusedloss: with inplace_backward=True the gradient can be computed once per "
                            "forward (it overwrote the logits); run the loss again for a second backward"
                        )
                    grad = _ops.empty_grad(grad)
                    ctx.rerun(grad)
                ctx.used = True
                scaled = grad.mul_(scale)
        if create_graph:  # mark the gradient so that differentiating it again fails clearly
            scaled = _NoDoubleBackward.apply(scaled.detach().requires_grad_())
        return (scaled,) + (None,) * 11


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradient returned under create_graph=True, whose backward raises:
    the fused kernels give no second derivative (SPEC section 3). Unlike
    @once_differentiable this also fires when grad_output itself does not require grad
    (e.g. a gradient penalty), instead of silently returning a gradient with no graph."""

    @staticmethod
    def forward(ctx, g):
        return g.view_as(g)

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("fusedloss: double backward (differentiating a gradient) is not implemented for fusedloss losses")


class _CrossEntropyFn(_RowLossFn):
    @staticmethod
    def forward(ctx, x, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction, inplace, backend,
                grad_enabled):
        # x (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight (C,); mask (N, C, D) bool
        ctx.grad_enabled = grad_enabled
        impl = _backend.IMPLS[backend]
        run = lambda grad: impl.ce_fwd(x, target, weight, mask, grad, ignore_index, label_smoothing, z_loss, softcap)
        return _forward(ctx, x, run, reduction, inplace, (x.shape[0], 1, x.shape[2]))


class _FocalFn(_RowLossFn):
    @staticmethod
    def forward(ctx, x, target, alpha, mask, ignore_index, gamma, reduction, backend, grad_enabled):
        # x (N, C, D); target (N, D) int64; alpha (C,); mask (N, C, D) bool
        ctx.grad_enabled = grad_enabled
        impl = _backend.IMPLS[backend]
        run = lambda grad: impl.focal_fwd(x, target, alpha, mask, grad, ignore_index, gamma)
        return _forward(ctx, x, run, reduction, False, (x.shape[0], 1, x.shape[2]))


class _BinaryFn(_RowLossFn):
    @staticmethod
    def forward(ctx, x, target, weight, pos_weight, gamma, alpha, reduction, backend, grad_enabled):
        # x, target (M, L); weight, pos_weight (M, L) broadcast views
        ctx.grad_enabled = grad_enabled
        impl = _backend.IMPLS[backend]
        reduce = reduction != "none"
        run = lambda grad: (impl.binary_fwd(x, target, weight, pos_weight, grad, gamma, alpha, reduce), None)
        # "mean" of an empty input is NaN, as in PyTorch (0 / 0)
        return _forward(ctx, x, run, reduction, False, x.shape, x.numel())


# ----------------------------------------------------------------------------- cross-entropy
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average=None,
    ignore_index: int = -100,
    reduce=None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    mask: Optional[Tensor] = None,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    inplace_backward: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Drop-in for torch.nn.functional.cross_entropy, -inf safe (see the README).

    input (C,), (N, C) or (N, C, d1..dK); target class indices (), (N,) or (N, d1..dK)
    (int64/int32), or class probabilities of input's shape. Extras: mask (bool,
    broadcastable to input, True = allowed), z_loss, softcap, inplace_backward (the
    gradient is written into input's storage: input must not be used afterwards).
    """
    reduction = _reduction_of(size_average, reduce, reduction)
    _check_float("input", input)
    if input.dim() < 1:
        raise ValueError(f"input must have at least 1 dimension (C,), got shape {tuple(input.shape)}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    _check_device("target", target, input)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap}")
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    w = _class_weight("weight", weight, input, num_classes)
    m = _class_mask(mask, input)
    x = _rows3(input)
    if target.dtype.is_floating_point:  # class probabilities
        _no_grad_needed("target", target)
        if target.shape != input.shape:
            raise ValueError(
                f"probability target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        t = _rows3(target.detach().to(input.dtype))
        target_shape = tuple(input.shape[:1] + input.shape[2:]) if input.dim() >= 2 else ()
    elif target.dtype in INDEX_DTYPES:
        target_shape = _check_class_target(input, target)
        t = target.detach().to(torch.int64).reshape(x.shape[0], x.shape[2])
    else:
        raise TypeError(f"target must be int64/int32 class indices or floating class probabilities; got {target.dtype}")
    backend = _backend_for(backend, input)
    grad_enabled = torch.is_grad_enabled()
    inplace = bool(inplace_backward) and input.requires_grad and grad_enabled and not torch.compiler.is_compiling()
    out = _CrossEntropyFn.apply(
        x, t, w, m, int(ignore_index), float(label_smoothing), float(z_loss), float(softcap or 0.0),
        reduction, inplace, backend, grad_enabled,
    )
    return out.reshape(target_shape) if reduction == "none" else out


# ----------------------------------------------------------------------------- softmax focal
def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    mask: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Multi-class softmax focal loss: alpha_t * (1 - p_t)^gamma * -log(p_t) per row.

    Shapes as cross_entropy with class-index targets. alpha: None, a float, or a (C,)
    tensor indexed by the target. "mean" divides by the number of counted rows.
    """
    _check_reduction(reduction)
    _check_float("input", input)
    if input.dim() < 1:
        raise ValueError(f"input must have at least 1 dimension (C,), got shape {tuple(input.shape)}")
    if not isinstance(target, Tensor) or target.dtype not in INDEX_DTYPES:
        raise TypeError(f"target must be int64/int32 class indices; got {getattr(target, 'dtype', type(target).__name__)}")
    _check_device("target", target, input)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if alpha is None or isinstance(alpha, Tensor):
        a = _class_weight("alpha", alpha, input, num_classes)
    else:
        a = torch.full((num_classes,), float(alpha), dtype=acc_dtype(input.dtype), device=input.device)
    m = _class_mask(mask, input)
    target_shape = _check_class_target(input, target)
    x = _rows3(input)
    t = target.detach().to(torch.int64).reshape(x.shape[0], x.shape[2])
    backend = _backend_for(backend, input)
    out = _FocalFn.apply(x, t, a, m, int(ignore_index), float(gamma), reduction, backend, torch.is_grad_enabled())
    return out.reshape(target_shape) if reduction == "none" else out


# ----------------------------------------------------------------------------- elementwise
def _elementwise_operand(name, t, input):
    """weight / pos_weight broadcast to input, as an (M, L) view (0 strides where broadcast)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=acc_dtype(input.dtype), device=input.device)
    _check_float(name, t)
    _check_device(name, t, input)
    _no_grad_needed(name, t)
    _check_broadcastable(name, t, input)
    return _rows2(t.detach().to(acc_dtype(input.dtype)).expand(input.shape))


def _rows2(t: Tensor) -> Tensor:
    """() -> (1, 1); (L,) -> (1, L); (..., L) -> (M, L), a view where strides allow."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(-1, t.shape[-1])


def _binary(input, target, weight, pos_weight, reduction, gamma, alpha, backend, pos_weight_name="pos_weight"):
    _check_float("input", input)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    _check_device("target", target, input)
    if target.shape != input.shape:
        raise ValueError(
            f"Target size ({tuple(target.shape)}) must be the same as input size ({tuple(input.shape)})"
        )
    if pos_weight is not None and isinstance(pos_weight, Tensor) and pos_weight.dim() >= 1 and input.dim() >= 1:
        if pos_weight.shape[-1] not in (1, input.shape[-1]):
            raise ValueError(
                f"{pos_weight_name} must be broadcastable to the input along its last dimension "
                f"(size {input.shape[-1]}), got shape {tuple(pos_weight.shape)}"
            )
    w = _elementwise_operand("weight", weight, input)
    pw = _elementwise_operand(pos_weight_name, pos_weight, input)
    _no_grad_needed("target", target)
    y = _rows2(target.detach().to(input.dtype))
    x = _rows2(input)
    backend = _backend_for(backend, input)
    out = _BinaryFn.apply(x, y, w, pw, float(gamma), float(alpha), reduction, backend, torch.is_grad_enabled())
    return out.reshape(input.shape) if reduction == "none" else out


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    size_average=None,
    reduce=None,
    reduction: str = "mean",
    pos_weight: Optional[Tensor] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits, exact at +-inf logits.

    target: input's shape (bool/integer targets are converted to input's dtype);
    weight broadcastable to input; pos_weight broadcastable to input along its last dim.
    """
    reduction = _reduction_of(size_average, reduce, reduction)
    return _binary(input, target, weight, pos_weight, reduction, 0.0, -1.0, backend)


def sigmoid_focal_loss(
    inputs: Tensor,
    targets: Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    weight: Optional[Tensor] = None,
    pos_weight: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """Drop-in for torchvision.ops.sigmoid_focal_loss (alpha < 0 disables the alpha term),
    with a finite gradient for every gamma >= 0. Extras: weight, pos_weight as in BCE."""
    _check_reduction(reduction)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    return _binary(inputs, targets, weight, pos_weight, reduction, gamma, alpha, backend)
