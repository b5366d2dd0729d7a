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

from fusedloss import _backend, _ext, _ops, reference
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
    """Where PyTorch refuses a gradient (a class weight with class-index targets, BCE weight
    and pos_weight, focal alpha), a tensor that requires grad is refused here too, rather
    than silently getting none."""
    if isinstance(t, Tensor) and t.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            f"fusedloss: the gradient with respect to {name} is not implemented (PyTorch gives none either); "
            f"pass {name}.detach()"
        )


def _class_weight(name, weight, input, num_classes, differentiable=False):
    """(C,) weight in the accumulation dtype, or None. `differentiable`: PyTorch gives this
    weight a gradient (probability targets), so it stays in the graph."""
    if weight is None:
        return None
    _check_float(name, weight)
    _check_device(name, weight, input)
    if not differentiable:
        _no_grad_needed(name, weight)
        weight = weight.detach()
    if weight.dim() != 1 or weight.shape[0] != num_classes:
        raise ValueError(
            f"{name} should be defined either for all {num_classes} classes or no classes, "
            f"expected shape ({num_classes},), got {tuple(weight.shape)}"
        )
    return weight.to(acc_dtype(input.dtype)).contiguous()


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


def _check_class_mask(mask, input):
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool Tensor (True = class allowed), got {getattr(mask, 'dtype', type(mask).__name__)}")
    _check_device("mask", mask, input)
    _check_broadcastable("mask", mask, input)


def _class_mask(mask, input):
    """The mask, checked, as the (N, C, D) view of the canonical logits."""
    _check_class_mask(mask, input)
    return None if mask is None else _rows3(mask.expand(input.shape))


def _check_ce_args(input, target, label_smoothing, softcap):
    """The target / label_smoothing / softcap checks of cross_entropy and
    linear_cross_entropy; returns the softcap to use (None: no cap; an infinite cap is
    none, the limit of c tanh(x / c))."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    _check_device("target", target, input)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be a positive float or None, got {softcap}")
    return None if softcap is not None and math.isinf(softcap) else softcap


def _index_rows(target, x):
    """Class indices as the (N, D) int64 view of the canonical (N, C, D) logits."""
    if target.dtype != torch.int64:
        target = target.to(torch.int64)
    return target.reshape(x.shape[0], x.shape[2])


def _check_broadcastable(name, t, input):
    """t broadcasts to input's shape (torch.broadcast_shapes(t.shape, input.shape) ==
    input.shape), written out: broadcast_shapes is Python code of ~10 us, a tenth of a small
    step's host time."""
    ok = t.dim() <= input.dim()
    if ok:
        offset = input.dim() - t.dim()
        for j in range(t.dim()):
            size = t.shape[j]
            if size != 1 and size != input.shape[offset + j]:
                ok = False
    if not ok:
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
    def forward(ctx, x, target, weight, mask, bwd_weight, cfg):
        # x (N, C, D); target (N, D) int64 or (N, C, D) probabilities; weight (C,) acc; mask
        # (N, C, D) bool; bwd_weight: the weight backward needs (None when only the stats do);
        # cfg = (op, params, softcap, reduction, inplace, backend, eps), the scalars in one
        # argument (apply's per-argument cost is the step's host overhead at small shapes);
        # op "ce_fwd" / "focal_fwd" is called as op(x, target, weight, mask, *params)
        op, params, softcap, reduction, inplace, backend, eps = cfg
        out, denom, stats = getattr(_backend.IMPLS[backend], op)(x, target, weight, mask, *params)
        ctx.save_for_backward(x, target, bwd_weight, mask, stats, denom)
        ctx.softcap, ctx.reduction, ctx.inplace, ctx.backend, ctx.used = softcap, reduction, inplace, backend, False
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.inplace and ctx.used:  # before unpacking: the logits' version has moved on
            raise RuntimeError(_CONSUMED)
        x, target, weight, mask, stats, denom = ctx.saved_tensors
        want = ctx.needs_input_grad
        # soft targets and their class weight (before the input's gradient, which may
        # overwrite the logits with inplace_backward)
        g_target = g_weight = None
        if want[1] or want[2]:
            g_target, g_weight = _soft_target_grads(
                grad_out, x, target, weight, mask, stats, denom, ctx.eps, ctx.softcap, ctx.reduction, want[1], want[2]
            )
        grad = None
        if want[0]:
            ctx.used = True
            grad = x.detach() if ctx.inplace else _ops.empty_grad(x)
            _backend.IMPLS[ctx.backend].softmax_bwd(
                grad_out, x, target, weight, mask, stats, denom, ctx.softcap, ctx.reduction, grad
            )
            grad = _input_grad(grad)
        return grad, g_target, g_weight, None, None, None


try:  # None without the extension, or with one built before the op existed
    _SOFTMAX_LOSS = torch.ops.fusedloss.softmax_loss.default if _ext._C is not None else None
except (AttributeError, RuntimeError):
    _SOFTMAX_LOSS = None


def _use_cpp_loss(backend, target, w):
    """Whether the loss runs as the op fusedloss::softmax_loss (csrc/autograd.cpp): autograd
    node in C++, canonical views taken in C++, no Python between forward and backward (a
    Python autograd.Function costs ~50 us a step, most of a small step). Where it computes
    what _SoftmaxLossFn does: the C++ backends, no gradient wanted for the target or the
    weight (soft targets that require grad keep _SoftmaxLossFn, which computes those).
    torch.compile traces it too (the op's fake kernel, then ce_fwd / softmax_bwd through the
    C++ Function: the same graph as _SoftmaxLossFn's)."""
    return (
        _SOFTMAX_LOSS is not None
        and (backend == "cpu" or backend == "cuda")
        and not target.requires_grad
        and (w is None or not w.requires_grad)
    )


def _soft_target_grads(grad_out, x, y, w, mask, stats, denom, eps, softcap, reduction, want_y, want_w):
    """Gradients to probability targets y (N, C, D) and the class weight w (C,), as PyTorch
    gives them. With y'_c = (1 - eps) y_c + smooth [c in A] and -log p_c = lse - z_c:
        loss_row = sum_c w_c y'_c (lse - z_c) (+ z-loss, free of y and w)
        dloss/dy_c = w_c (1 - eps) (lse - z_c)        dloss/dw_c = sum_rows y'_c (lse - z_c)
    times the row's scale; +inf at a masked class (PyTorch: the same), 0 on empty rows. Torch
    ops on the saved logits and the forward's stats: a soft target that requires grad
    (distillation) costs N x C passes beyond the step's budget, the usual step none."""
    acc = stats.dtype
    z = x.to(acc)
    allowed = z != float("-inf")
    if mask is not None:
        allowed = allowed & mask
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    lse = stats[..., 0].unsqueeze(1)  # (N, 1, D)
    nll = torch.where(allowed, lse - z, torch.full_like(z, float("inf")))
    nll = torch.where(lse != float("-inf"), nll, torch.zeros_like(nll))  # an empty row has loss 0
    scale = reference._scale(grad_out, denom, reduction, acc)
    g_y = g_w = None
    if want_y:
        coef = (1.0 - eps) * (w.detach().view(1, -1, 1) if w is not None else torch.ones_like(lse))
        g_y = (reference._times(coef, nll) * scale).to(y.dtype)
    if want_w:
        y_s = (1.0 - eps) * y.detach().to(acc) + torch.where(allowed, stats[..., 2].unsqueeze(1), torch.zeros_like(z))
        g_w = (reference._times(y_s, nll) * scale).sum((0, 2)).to(w.dtype)
    return g_y, g_w


def _binary_target_grad(grad_out, x, y, w, pw, gamma, alpha, reduction):
    """Gradient to a BCE / sigmoid-focal target, as PyTorch gives it: autograd through
    PyTorch's own formula (torchvision's for focal) in the accumulation dtype. Only when
    the target requires grad (soft labels, distillation)."""
    acc = acc_dtype(x.dtype)
    with torch.enable_grad():
        xa, ya = x.detach().to(acc), y.detach().to(acc).requires_grad_()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xa, ya, pos_weight=pw, reduction="none")
        if not (gamma == 0 and alpha < 0):
            p = torch.sigmoid(xa)
            p_t = p * ya + (1 - p) * (1 - ya)
            loss = loss * (1 - p_t) ** gamma
            if alpha >= 0:
                loss = (alpha * ya + (1 - alpha) * (1 - ya)) * loss
        if w is not None:
            loss = loss * w
        scale = grad_out.to(acc)
        if reduction == 1:
            scale = scale / max(x.numel(), 1)
        (g,) = torch.autograd.grad(loss, ya, scale.expand_as(loss))
    return g.to(y.dtype)


@torch.library.custom_op("fusedloss::binary_value", mutates_args=())
def _binary_value(input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], gamma: float,
                  alpha: float, reduction: int, out_dtype: torch.dtype, backend: str) -> Tensor:
    """binary_fwd without a gradient to write, as a functional op, for torch.compile: Inductor
    cannot lower an op whose optional mutable argument (binary_fwd's grad) is None ("getitem is
    not an OpOverload", torch 2.13); eager calls binary_fwd directly."""
    return _backend.IMPLS[backend].binary_fwd(input, target, weight, pos_weight, None, gamma, alpha, reduction, out_dtype)


@_binary_value.register_fake
def _binary_value_fake(input, target, weight, pos_weight, gamma, alpha, reduction, out_dtype, backend):
    return _ops.binary_fwd_fake(input, target, weight, pos_weight, None, gamma, alpha, reduction, out_dtype)


class _BinaryFn(torch.autograd.Function):
    """BCE-with-logits and sigmoid focal loss. "mean" / "sum": the forward op also writes the
    gradient for grad_output == 1 (1 read + 1 write: the whole step in the usual case), and
    backward scales it in place by grad_output, which the kernel reads on the device and skips
    when it is 1. "none" (per-element grad_output) and a second backward through the same
    graph recompute the gradient from the saved input and target instead.

    The ops' (M, L) views (_binary_plan) are taken here, below autograd: no view node in the
    graph, and the gradient is allocated in the input's layout and returned at the input's
    shape, so AccumulateGrad keeps it as .grad without a copy."""

    @staticmethod
    def forward(ctx, input, target, weight, pos_weight, cfg):
        # input, target (the caller's shape; target in input's dtype, or bool / integer where
        # the backend reads those); weight, pos_weight acc, broadcastable to input, or None;
        # cfg = (gamma, alpha, reduction, out_dtype, backend, grad_enabled, plan)
        gamma, alpha, reduction, out_dtype, backend, grad_enabled, plan = cfg
        perm, sizes = plan[0], plan[1]
        x = _plan_view(input, plan, plan[3])
        y = _plan_view(target, plan, plan[4])
        w = _plan_operand(weight, plan, plan[5], input.shape)
        pw = _plan_operand(pos_weight, plan, plan[6], input.shape)
        g2 = None
        if reduction != 0 and grad_enabled and ctx.needs_input_grad[0]:
            g2 = _plan_empty_grad(x)
        if g2 is None and torch.compiler.is_compiling():
            out = _binary_value(x, y, w, pw, gamma, alpha, reduction, out_dtype, backend)
        else:
            out = _backend.IMPLS[backend].binary_fwd(x, y, w, pw, g2, gamma, alpha, reduction, out_dtype)
        ctx.save_for_backward(x, y, w, pw, g2)
        ctx.gamma, ctx.alpha, ctx.reduction, ctx.backend, ctx.used = gamma, alpha, reduction, backend, False
        ctx.perm, ctx.sizes = perm, sizes
        return _plan_back(out, perm, sizes) if reduction == 0 else out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, pos_weight, grad = ctx.saved_tensors  # grad: (M, L), the forward's
        perm, sizes, ml = ctx.perm, ctx.sizes, x.shape
        # "none": grad_out of the loss's shape, a view when it has the loss's layout
        go = _plan_of(grad_out, perm, ml) if ctx.reduction == 0 else grad_out
        g_target = None
        if ctx.needs_input_grad[1]:
            g = _binary_target_grad(go, x, target, weight, pos_weight, ctx.gamma, ctx.alpha, ctx.reduction)
            g_target = _plan_back(g.contiguous(), perm, sizes)
        if not ctx.needs_input_grad[0]:
            return None, g_target, None, None, None
        impl = _backend.IMPLS[ctx.backend]
        if grad is not None and not ctx.used:
            # Handed out under a version counter of its own (`.data`): the caller may modify
            # it (AccumulateGrad adds into .grad), which must not trip autograd's check of
            # the saved copy in a second backward -- that one recomputes and never reads it.
            grad = grad if torch.compiler.is_compiling() else grad.data
            impl.scale_grad(grad_out, grad)
        else:  # "none", or the forward's gradient was handed out by a first backward
            grad = _plan_empty_grad(x)
            impl.binary_bwd(go, x, target, weight, pos_weight, ctx.gamma, ctx.alpha, ctx.reduction, grad)
        ctx.used = True
        return _input_grad(_plan_back(grad, perm, sizes)), g_target, None, None, None


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
    softcap = _check_ce_args(input, target, label_smoothing, softcap)
    num_classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    prob = target.dtype.is_floating_point
    w = _class_weight("weight", weight, input, num_classes, differentiable=prob)
    _check_class_mask(mask, input)
    if prob:  # class probabilities; they and the weight get gradients, as in PyTorch
        if target.shape != input.shape:
            raise ValueError(
                f"probability target must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
    elif target.dtype in INDEX_DTYPES:
        target_shape = _check_class_target(input, target)
    else:
        raise TypeError(f"target must be int64/int32 class indices or floating class probabilities; got {target.dtype}")
    backend = _backend_for(backend, input)
    inplace = bool(inplace_backward) and input.requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()
    red = REDUCTION_CODES[reduction]
    eps, zl, cap = float(label_smoothing), float(z_loss), float(softcap or 0.0)
    if _use_cpp_loss(backend, target, w):  # the caller's shapes; the loss in the target's shape
        return _SOFTMAX_LOSS(input, target, w, mask, 0, int(ignore_index), eps, zl, cap, 0.0, red,
                             out_dtype_of(input, target), inplace)
    m = _class_mask(mask, input)
    x = _rows3(input)
    if prob:
        t = _rows3(target.to(input.dtype))
        target_shape = tuple(input.shape[:1] + input.shape[2:]) if input.dim() >= 2 else ()
    else:
        t = _index_rows(target, x)
    params = (int(ignore_index), eps, zl, cap, red, out_dtype_of(input, target))
    # backward reads the class weight only for the smoothing term (index targets) or the
    # target term (probability targets); otherwise it is already in the row's stats
    bwd_w = w if (eps > 0 or prob) else None
    out = _SoftmaxLossFn.apply(x, t, w, m, bwd_w, ("ce_fwd", params, cap, red, inplace, backend, eps))
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
    _check_class_mask(mask, input)
    target_shape = _check_class_target(input, target)
    backend = _backend_for(backend, input)
    red = REDUCTION_CODES[reduction]
    if _use_cpp_loss(backend, target, a):
        return _SOFTMAX_LOSS(input, target, a, mask, 1, int(ignore_index), 0.0, 0.0, 0.0, float(gamma), red,
                             out_dtype_of(input), False)
    m = _class_mask(mask, input)
    x = _rows3(input)
    t = _index_rows(target, x)
    params = (int(ignore_index), float(gamma), red, out_dtype_of(input))
    out = _SoftmaxLossFn.apply(x, t, a, m, None, ("focal_fwd", params, 0.0, red, False, backend, 0.0))
    return out.reshape(target_shape) if reduction == "none" else out


# ----------------------------------------------------------------------------- elementwise
def _elementwise_operand(name, t, input):
    """weight / pos_weight, checked, in the accumulation dtype at its own shape (a (C, 1, 1)
    weight stays C elements: _binary_plan broadcasts it through 0 strides)."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=acc_dtype(input.dtype), device=input.device)
    _check_float(name, t)
    _check_device(name, t, input)
    _no_grad_needed(name, t)
    _check_broadcastable(name, t, input)
    return t.detach().to(acc_dtype(input.dtype))


def _merge_groups(sizes, strides):
    """Dims 0..len(sizes)-1 in runs that merge into one dim for every operand (dim j joins the
    run of the previous dim i of size > 1 when each operand has stride[i] == stride[j] *
    sizes[j]); size-1 dims join any run. (Loops, not comprehensions: this runs under
    torch.compile, inside an autograd.Function's trace.)"""
    groups = []
    last = -1
    for j in range(len(sizes)):
        n = sizes[j]
        if n != 1:
            new_run = last < 0
            for s in strides:
                if s[last] != s[j] * n:
                    new_run = True
            if new_run:
                groups.append([])
            last = j
        if len(groups) == 0:
            groups.append([])
        groups[-1].append(j)
    return groups


def _binary_plan(input, target, weight, pos_weight):
    """How to take the binary ops' (M, L) views of input, target, weight and pos_weight (of the
    input's shape, or broadcastable to it), with no copy of an input-sized tensor for: any
    dense input layout (contiguous, channels_last, channels_last_3d, a transposed matrix), a
    target in the input's layout (any dtype), a weight / pos_weight broadcast through 0
    strides. The loss is elementwise, so any order of the elements does: dims are taken in the
    memory order of the gradient buffer (_ops.empty_grad: the input's own when it is dense,
    e.g. (N, H, W, C) for channels_last), in which every dense operand of that layout is one
    run of memory, and split into M = the outer dims, L = the last run that weight and
    pos_weight also merge over. Copies only where no 2-D view exists: an input or target not
    dense in that order (a strided slice, a target in another layout: one copy of it), and a
    weight broadcast along L but not mergeable over the outer dims (a (C, 1, 1) weight on
    NCHW: its N*C values along the rows, a copy of M elements).

    Returns plain values (the views themselves are taken by _plan_view inside the Function):
    (perm, sizes in perm order, (M, L), copy flags of input and target, and for weight and
    pos_weight None, "view", "rows" (its M row values) or "copy")."""
    shape = list(input.shape)
    nd = len(shape)
    if weight is None and pos_weight is None and input.is_contiguous() and target.is_contiguous():
        # the usual call: one run, no permutation (plain host code: small steps are host-bound)
        return (list(range(nd)), shape, (1, input.numel()), False, False, None, None, list(range(nd)))
    perm = _ops.dense_order(input)
    if perm is None:
        perm = list(range(nd))
    sizes = []
    for p in perm:
        sizes.append(shape[p])

    def strides_of(t):  # t's strides broadcast to the input's shape (0 where broadcast), in perm order
        if t is None:
            return None
        st = [0] * nd
        for j in range(t.dim()):
            i = nd - t.dim() + j
            st[i] = 0 if t.shape[j] == 1 else t.stride(j)
        out = []
        for p in perm:
            out.append(st[p])
        return out

    copies = []
    for t in (input, target):
        copies.append(len(_merge_groups(sizes, [strides_of(t)])) > 1)
    operands = []
    for t in (weight, pos_weight):
        if t is not None:
            operands.append(strides_of(t))
    groups = _merge_groups(sizes, operands)
    inner = groups[-1] if len(groups) > 0 else []
    outer = []
    for j in range(nd):
        if j not in inner:
            outer.append(j)
    M, L = 1, 1
    for j in outer:
        M = M * sizes[j]
    for j in inner:
        L = L * sizes[j]
    outer_sizes = []
    for j in outer:
        outer_sizes.append(sizes[j])
    modes = []
    for t in (weight, pos_weight):
        st = strides_of(t)
        mode = None
        if st is not None:
            mode = "view"
            outer_st = []
            for j in outer:
                outer_st.append(st[j])
            if len(_merge_groups(outer_sizes, [outer_st])) > 1:
                mode = "rows"
                for j in inner:
                    if st[j] != 0 and sizes[j] != 1:
                        mode = "copy"
        modes.append(mode)
    return (perm, sizes, (M, L), copies[0], copies[1], modes[0], modes[1], inner)


_PLANS = {}  # (shapes and strides of the operands) -> _binary_plan's result
_PLANS_MAX = 256


def _plan_for(input, target, weight, pos_weight):
    """_binary_plan, memoized on the operands' shapes and strides (all it reads): a training
    loop calls with the same layouts every step, and planning a broadcast weight is tens of
    microseconds of Python, a few percent of a dense-detection step. Not while tracing: the
    compiled graph runs the plan once."""
    if torch.compiler.is_compiling():
        return _binary_plan(input, target, weight, pos_weight)
    key = (input.shape, input.stride(), target.shape, target.stride(),
           None if weight is None else (weight.shape, weight.stride()),
           None if pos_weight is None else (pos_weight.shape, pos_weight.stride()))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        plan = _PLANS[key] = _binary_plan(input, target, weight, pos_weight)
    return plan


def _identity(perm):
    for i in range(len(perm)):
        if perm[i] != i:
            return False
    return True


def _plan_view(t, plan, copy):
    """input / target (the input's shape) as (M, L); a contiguous copy in the plan's order
    where `copy`."""
    if not _identity(plan[0]):
        t = t.permute(plan[0])
    if copy:
        t = t.contiguous()
    return t.reshape(plan[2])


def _plan_operand(t, plan, mode, shape):
    """weight / pos_weight (broadcastable to `shape`) as (M, L), per the plan's mode."""
    if t is None:
        return None
    perm, sizes, ml, inner = plan[0], plan[1], plan[2], plan[7]
    t = t.expand(shape).permute(perm)
    if mode == "rows":  # its M values along the rows, contiguous, then 0 strides along L
        for j in inner:
            t = t.narrow(j, 0, 1)
        t = t.contiguous().expand(sizes)
    elif mode == "copy":
        t = t.contiguous()
    return t.reshape(ml)


def _plan_of(t, perm, ml):
    """A tensor of the input's shape, in the gradient's layout, as the (M, L) view."""
    if not _identity(perm):
        t = t.permute(perm)
    return t.reshape(ml)


def _plan_back(t2, perm, sizes):
    """(M, L) contiguous -> a view of the input's shape, in the gradient's layout."""
    t = t2.view(sizes)
    if _identity(perm):
        return t
    inv = [0] * len(perm)
    for i in range(len(perm)):
        inv[perm[i]] = i
    return t.permute(inv)


def _plan_empty_grad(x2):
    """An uninitialized (M, L) gradient, contiguous: x2, the input's (M, L) view in the plan's
    order, is contiguous when the input is dense (else empty_grad makes it so), so
    _plan_back of it has the input's layout, which AccumulateGrad keeps as .grad."""
    return _ops.empty_grad(x2)


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
    backend = _backend_for(backend, input)
    y = target
    if target.dtype != input.dtype and (
        target.dtype.is_floating_point or target.dtype not in _native_targets(backend)
    ):
        # a floating target is read in the input's dtype (a soft target that requires grad
        # gets one through this conversion, as in PyTorch); bool / integer targets only where
        # the kernels cannot read them as they are
        y = target.to(input.dtype)
    cfg = (float(gamma), float(alpha), REDUCTION_CODES[reduction], out_dtype_of(input, target), backend,
           torch.is_grad_enabled(), _plan_for(input, y, w, pw))
    return _BinaryFn.apply(input, y, w, pw, cfg)


# The bool / integer target dtypes each backend's binary ops read as they are, with no
# input-sized float copy of a label map (csrc/cpu: converted in L1; triton: each loaded value
# converted; torch: the reference's own conversion; cuda: bool and uint8 only, one byte
# converted on load, csrc/cuda/binary_losses.cu); other targets are converted to the input's
# dtype first.
_INTEGER_TARGETS = frozenset((torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))
_NATIVE_TARGETS = {
    "cpu": _INTEGER_TARGETS,
    "triton": _INTEGER_TARGETS,
    "torch": _INTEGER_TARGETS,
    "cuda": frozenset((torch.bool, torch.uint8)),
}


def _native_targets(backend):
    """The target dtypes `backend` reads as they are; for a fallback chain ("triton>cuda>torch",
    _backend._fallback_chain) those every member reads, since an op may move down the chain."""
    native = None
    for name in backend.split(">"):
        dtypes = _NATIVE_TARGETS.get(name, frozenset())
        native = dtypes if native is None else native & dtypes
    return native


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
