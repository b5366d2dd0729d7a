"""Public losses: argument checks, canonical views, autograd Functions, reductions.

Layers, for cross-entropy: kernels (csrc/, fusedloss/triton) -> ops `fusedloss::ce_fwd`,
`fusedloss::softmax_bwd` -> backend namespace (fusedloss/_backend.py) -> `_SoftmaxLossFn` (here) ->
`cross_entropy` (here) -> `fusedloss.nn.CrossEntropyLoss`.

The ops (csrc/ops.cpp) reduce inside: a forward op returns the "none" / "mean" / "sum"
loss and what its backward op needs, and the backward op reads grad_output from device
memory, so nothing syncs and a step is one forward and one backward op (SPEC section 3).
"""
import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from fusedloss import _backend, _ops
from fusedloss._ops import REDUCTION_CODES, acc_dtype

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
    return t.reshape(t.shape[0], t.shape[1], math.prod(t.shape[2:]))  # not -1: N or C may be 0


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


# ----------------------------------------------------------------------------- autograd
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


def _input_grad(grad):
    """The input's gradient as backward returns it: marked so that differentiating it again
    (create_graph=True) fails clearly."""
    if torch.is_grad_enabled():
        return _NoDoubleBackward.apply(grad.detach().requires_grad_())
    return grad


_CONSUMED = (
    "fusedloss: with inplace_backward=True the gradient can be computed once per forward (it "
    "overwrote the logits); run the loss again for a second backward"
)


class _SoftmaxLossFn(torch.autograd.Function):
    """Cross-entropy and softmax focal loss (SPEC section 3). The forward op reads the logits
    once and returns the reduced loss, the "mean" denominator and four numbers per row; the
    backward op reads the logits once more and writes the gradient once, scaled by
    grad_output read from device memory: 2 reads + 1 write of N x C for any grad_output,
    no host sync. Everything backward needs is in save_for_backward (saved-tensor hooks
    see it); ctx holds only scalars, so nothing of size N x C outlives backward. With
    inplace_backward the gradient is written into the logits' storage (no N x C buffer)."""

    @staticmethod
    def forward(ctx, x, target, weight, mask, bwd_weight, op, params, softcap, reduction, inplace, backend):
        # x (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight (C,) acc; mask
        # (N, C, D) bool; bwd_weight: the weight backward needs (None when only the stats do);
        # op "ce_fwd" / "focal_fwd", called as op(x, target, weight, mask, *params)
        impl = _backend.IMPLS[backend]
        out, denom, stats = getattr(impl, op)(x, target, weight, mask, *params)
        ctx.save_for_backward(x, target, bwd_weight, mask, stats, denom)
        ctx.softcap, ctx.reduction, ctx.inplace, ctx.backend, ctx.used = softcap, reduction, inplace, backend, False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.inplace and ctx.used:  # before unpacking: the logits' version has moved on
            raise RuntimeError(_CONSUMED)
        x, target, weight, mask, stats, denom = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        ctx.used = True
        grad = x.detach() if ctx.inplace else _ops.empty_grad(x)
        _backend.IMPLS[ctx.backend].softmax_bwd(
            grad_out, x, target, weight, mask, stats, denom, ctx.softcap, ctx.reduction, grad
        )
        return (_input_grad(grad),) + (None,) * 10


class _BinaryFn(torch.autograd.Function):
    """BCE-with-logits and sigmoid focal loss. "mean" / "sum": the forward op also writes the
    gradient for grad_output == 1 (1 read + 1 write: the whole step in the usual case), and
    backward scales it in place by grad_output, which the kernel reads on the device and skips
    when it is 1. "none" (per-element grad_output) and a second backward through the same
    graph recompute the gradient from the saved input and target instead."""

    @staticmethod
    def forward(ctx, x, target, weight, pos_weight, gamma, alpha, reduction, out_dtype, backend, grad_enabled):
        # x, target (M, L); weight, pos_weight (M, L) broadcast views
        impl = _backend.IMPLS[backend]
        grad = None
        if reduction != 0 and grad_enabled and ctx.needs_input_grad[0]:
            grad = _ops.empty_grad(x)
        out = impl.binary_fwd(x, target, weight, pos_weight, grad, gamma, alpha, reduction, out_dtype)
        ctx.save_for_backward(x, target, weight, pos_weight, grad)
        ctx.gamma, ctx.alpha, ctx.reduction, ctx.backend, ctx.used = gamma, alpha, reduction, backend, False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, pos_weight, grad = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 10
        impl = _backend.IMPLS[ctx.backend]
        if grad is not None and not ctx.used:
            # Handed out under a version counter of its own (`.data`): the caller may modify
            # it (AccumulateGrad adds into .grad), which must not trip autograd's check of
            # the saved copy in a second backward -- that one recomputes and never reads it.
            grad = grad if torch.compiler.is_compiling() else grad.data
            impl.scale_grad(grad_out, grad)
        else:  # "none", or the forward's gradient was handed out by a first backward
            grad = _ops.empty_grad(x)
            impl.binary_bwd(grad_out, x, target, weight, pos_weight, ctx.gamma, ctx.alpha, ctx.reduction, grad)
        ctx.used = True
        return (_input_grad(grad),) + (None,) * 9


def out_dtype_of(input, target=None):
    """The loss dtype, PyTorch's: the input's, promoted with a floating target's (a bfloat16
    input with float32 probabilities or BCE targets gives a float32 loss). The kernels read
    the target in the input's dtype and accumulate in float32 at least either way."""
    if target is not None and target.dtype.is_floating_point:
        return torch.promote_types(input.dtype, target.dtype)
    return input.dtype


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
    if softcap is not None and math.isinf(softcap):  # c tanh(x / c) -> x: no cap
        softcap = None
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
    inplace = bool(inplace_backward) and input.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    red = REDUCTION_CODES[reduction]
    eps, zl, cap = float(label_smoothing), float(z_loss), float(softcap or 0.0)
    params = (int(ignore_index), eps, zl, cap, red, out_dtype_of(input, target))
    # backward reads the class weight only for the smoothing term (index targets) or the
    # target term (probability targets); otherwise it is already in the row's stats
    bwd_w = w if (eps > 0 or t.dtype.is_floating_point) else None
    out = _SoftmaxLossFn.apply(x, t, w, m, bwd_w, "ce_fwd", params, cap, red, inplace, backend)
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
    red = REDUCTION_CODES[reduction]
    params = (int(ignore_index), float(gamma), red, out_dtype_of(input))
    out = _SoftmaxLossFn.apply(x, t, a, m, None, "focal_fwd", params, 0.0, red, False, backend)
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
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])  # not -1: the last dim may be 0


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
    red = REDUCTION_CODES[reduction]
    out = _BinaryFn.apply(x, y, w, pw, float(gamma), float(alpha), red, out_dtype_of(input, target), backend, torch.is_grad_enabled())
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
