"""Op-level checks of the Triton ops: the same rules, in the same words, as the C++ ops'
TORCH_CHECKs (csrc/common/op_checks.h, csrc/common/binary_checks.h), so that a Triton op
called directly (torch.ops.fusedloss.*_triton, opcheck) never reads out of bounds,
misreads a dtype or races on its output. The user-facing checks, with PyTorch's messages,
are in fusedloss/functional.py. Bad arguments raise ValueError / TypeError (never a
"kernel failure" that the auto backend chain would fall back from)."""
import torch

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _require(ok, op, *msg):
    if not ok:
        raise ValueError(f"{op}: " + "".join(str(m) for m in msg))


def _dtype(t, expected, op, name):
    if t.dtype not in (expected if isinstance(expected, tuple) else (expected,)):
        raise TypeError(f"{op}: {name} must be {expected}, got {t.dtype}")


def _device(t, ref, op, name):
    _require(t.device == ref.device, op, f"{name} is on {t.device} but the input is on {ref.device}")


def _byte_range(t):
    if t.numel() == 0:
        return (0, 0)
    start = t.data_ptr()
    span = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) + 1
    return (start, start + span * t.element_size())


def _shares_memory(a, b):
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _byte_range(a), _byte_range(b)
    return a0 < b1 and b0 < a1


def writable(op, name, out):
    """Every element written exactly once: no two elements of `out` may share memory."""
    _require(torch._debug_has_internal_overlap(out) != 1, op,
             f"{name} must not have overlapping elements (expanded or self-overlapping view), got sizes "
             f"{tuple(out.shape)} strides {out.stride()}")  # fmt: skip


def same_or_disjoint(op, out_name, out, in_name, inp):
    """`out` is `inp` itself (each element read before it is written) or shares no memory."""
    same = out.data_ptr() == inp.data_ptr() and out.stride() == inp.stride() and out.shape == inp.shape
    _require(same or not _shares_memory(out, inp), op,
             f"{out_name} partially overlaps {in_name}; it must be {in_name} itself (same storage offset and "
             f"strides) or not share its memory")  # fmt: skip


def disjoint(op, out_name, out, *named):
    for in_name, inp in named:
        if inp is not None:
            _require(not _shares_memory(out, inp), op, f"{out_name} must not share memory with {in_name}")


def reduction(op, r):
    _require(r in (0, 1, 2), op, f"reduction must be 0 (none), 1 (mean) or 2 (sum), got {r}")


def out_dtype(op, dt):
    if dt not in FLOATS:
        raise TypeError(f"{op}: out_dtype must be float16, bfloat16, float32 or float64, got {dt}")


def softmax_fwd(op, logits, target, weight, weight_name, mask, allow_prob):
    """logits (N, C, D); target (N, D) int64 or (N, C, D) logits' dtype; weight (C,) acc
    contiguous; mask (N, C, D) bool. Returns True for probability targets."""
    _require(logits.dim() == 3, op, f"logits must be (N, C, D), got shape {tuple(logits.shape)}")
    _dtype(logits, FLOATS, op, "logits")
    n, c, d = logits.shape
    _require(c > 0, op, f"logits must have at least one class, got shape {tuple(logits.shape)}")
    _device(target, logits, op, "target")
    prob = target.dtype.is_floating_point
    if prob:
        _require(allow_prob, op, f"target must be int64 class indices, got {target.dtype}")
        _require(target.shape == logits.shape, op,
                 f"probability target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        _dtype(target, logits.dtype, op, "probability target")
    else:
        _dtype(target, torch.int64, op, "class target")
        _require(tuple(target.shape) == (n, d), op, f"class target must be (N, D) = ({n}, {d}), got {tuple(target.shape)}")
    if weight is not None:
        _device(weight, logits, op, weight_name)
        _require(tuple(weight.shape) == (c,), op, f"{weight_name} must be (C,) = ({c},), got {tuple(weight.shape)}")
        _dtype(weight, acc_of(logits.dtype), op, weight_name)
        _require(weight.is_contiguous(), op, f"{weight_name} must be contiguous")
    if mask is not None:
        _device(mask, logits, op, "mask")
        _dtype(mask, torch.bool, op, "mask")
        _require(mask.shape == logits.shape, op,
                 f"mask must be (N, C, D) = {tuple(logits.shape)} (expanded, 0 strides allowed), got {tuple(mask.shape)}")
    return prob


def softmax_bwd(grad_out, logits, target, weight, mask, stats, denom, grad, red):
    op = "softmax_bwd"
    reduction(op, red)
    softmax_fwd(op, logits, target, weight, "weight", mask, allow_prob=True)
    n, _, d = logits.shape
    acc = acc_of(logits.dtype)
    _device(grad_out, logits, op, "grad_out")
    _dtype(grad_out, FLOATS, op, "grad_out")
    if red == 0:
        _require(tuple(grad_out.shape) == (n, d), op, f"grad_out must be (N, D) = ({n}, {d}) for reduction none, got {tuple(grad_out.shape)}")
    else:
        _require(grad_out.dim() == 0, op, f"grad_out must be 0-dim for reduction mean / sum, got {tuple(grad_out.shape)}")
    _device(stats, logits, op, "stats")
    _require(tuple(stats.shape) == (n, d, 4), op, f"stats must be (N, D, 4) = ({n}, {d}, 4), got {tuple(stats.shape)}")
    _dtype(stats, acc, op, "stats")
    _require(stats.is_contiguous(), op, "stats must be contiguous")
    _device(denom, logits, op, "denom")
    _require(denom.dim() == 0, op, f"denom must be 0-dim, got {tuple(denom.shape)}")
    _dtype(denom, acc, op, "denom")
    _device(grad, logits, op, "grad")
    _require(grad.shape == logits.shape, op, f"grad must have the logits' shape {tuple(logits.shape)}, got {tuple(grad.shape)}")
    _dtype(grad, logits.dtype, op, "grad")
    writable(op, "grad", grad)
    same_or_disjoint(op, "grad", grad, "logits", logits)
    disjoint(op, "grad", grad, ("target", target), ("weight", weight), ("mask", mask), ("stats", stats),
             ("denom", denom), ("grad_out", grad_out))  # fmt: skip


NATIVE_TARGETS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _binary_operand(op, name, t, inp, dtype):
    _require(t.dim() == 2 and t.shape == inp.shape, op, f"{name} must have the input's shape {tuple(inp.shape)}, got {tuple(t.shape)}")
    _dtype(t, dtype, op, name)
    _device(t, inp, op, name)


def binary_inputs(op, inp, target, weight, pos_weight, gamma, red):
    reduction(op, red)
    _require(inp.dim() == 2, op, f"input must be 2-D (M, L), got shape {tuple(inp.shape)}")
    _dtype(inp, FLOATS, op, "input")
    # bool / integer targets are read as they are (the kernels convert each loaded value):
    # no input-sized float copy of a label map (csrc/common/binary_checks.h is_native_target)
    _binary_operand(op, "target", target, inp, inp.dtype if target.dtype not in NATIVE_TARGETS else target.dtype)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            _binary_operand(op, name, t, inp, acc_of(inp.dtype))
    _require(gamma >= 0, op, f"gamma must be >= 0, got {gamma}")


def binary_grad(op, grad, inp, target, weight, pos_weight):
    _binary_operand(op, "grad", grad, inp, inp.dtype)
    writable(op, "grad", grad)
    same_or_disjoint(op, "grad", grad, "input", inp)
    disjoint(op, "grad", grad, ("target", target), ("weight", weight), ("pos_weight", pos_weight))


def grad_out_of(op, grad_out, ref, red):
    _device(grad_out, ref, op, "grad_out")
    _dtype(grad_out, FLOATS, op, "grad_out")
    if red == 0:
        _require(grad_out.shape == ref.shape, op, f"grad_out must have the input's shape {tuple(ref.shape)} for reduction none, got {tuple(grad_out.shape)}")
    else:
        _require(grad_out.dim() == 0, op, f"grad_out must be 0-dim for reduction mean / sum, got {tuple(grad_out.shape)}")


def binary_fwd(inp, target, weight, pos_weight, grad, gamma, red):
    op = "binary_fwd"
    binary_inputs(op, inp, target, weight, pos_weight, gamma, red)
    if grad is not None:
        _require(red != 0, op, "grad is only computed for reduction mean or sum (use binary_bwd for none)")
        binary_grad(op, grad, inp, target, weight, pos_weight)


def binary_bwd(grad_out, inp, target, weight, pos_weight, grad, gamma, red):
    op = "binary_bwd"
    binary_inputs(op, inp, target, weight, pos_weight, gamma, red)
    grad_out_of(op, grad_out, inp, red)
    binary_grad(op, grad, inp, target, weight, pos_weight)
    disjoint(op, "grad", grad, ("grad_out", grad_out))


def scale_grad(grad_out, grad):
    op = "scale_grad"
    _dtype(grad, FLOATS, op, "grad")
    grad_out_of(op, grad_out, grad, 1)
    # the Triton kernel walks grad as one flat array (the backward's own buffer always is)
    _require(grad.is_contiguous(), op, "grad must be contiguous")
    disjoint(op, "grad", grad, ("grad_out", grad_out))
