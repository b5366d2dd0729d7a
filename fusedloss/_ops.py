"""Fake (meta) kernels of the fusedloss ops: shapes and dtypes only, never data.

The C++ schemas (and what each output means) are in csrc/ops.cpp; the Triton ops
(fusedloss/triton) reuse these fakes.
"""
import torch

from fusedloss import _ext

# at::Reduction, as the ops take it
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _softmax_fwd_fake(logits, reduction, out_dtype):
    n, _, d = logits.shape
    acc = acc_dtype(logits.dtype)
    out = logits.new_empty((n, d) if reduction == 0 else (), dtype=out_dtype)
    return out, logits.new_empty((), dtype=acc), logits.new_empty((n, d, 4), dtype=acc)


def ce_fwd_fake(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype):
    return _softmax_fwd_fake(logits, reduction, out_dtype)


def focal_fwd_fake(logits, target, alpha, mask, ignore_index, gamma, reduction, out_dtype):
    return _softmax_fwd_fake(logits, reduction, out_dtype)


def softmax_loss_fake(logits, target, weight, mask, kind, ignore_index, label_smoothing, z_loss, softcap, gamma,
                      reduction, out_dtype, inplace_backward):
    # the caller's shapes: reduction 0 gives the target's shape (probabilities: the logits'
    # without dim 1)
    if reduction != 0:
        shape = ()
    elif target.dtype.is_floating_point:
        shape = logits.shape[:1] + logits.shape[2:] if logits.dim() >= 2 else ()
    else:
        shape = target.shape
    return logits.new_empty(shape, dtype=out_dtype)


def softmax_bwd_fake(grad_out, logits, target, weight, mask, stats, denom, softcap, reduction, grad):
    return None


def binary_fwd_fake(input, target, weight, pos_weight, grad, gamma, alpha, reduction, out_dtype):
    return input.new_empty(input.shape if reduction == 0 else (), dtype=out_dtype)


def binary_bwd_fake(grad_out, input, target, weight, pos_weight, gamma, alpha, reduction, grad):
    return None


def scale_grad_fake(grad_out, grad):
    return None


def dense_order(t):
    """t's dims, outermost first (by decreasing stride), when t is non-overlapping and dense
    (contiguous, channels_last, a transposed matrix, ...: a permutation of a contiguous
    tensor); None otherwise (a strided slice, a broadcast view)."""
    perm = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    expected = 1
    for i in reversed(perm):
        if t.shape[i] != 1:
            if t.stride(i) != expected:
                return None
            expected *= t.shape[i]
    return perm


def _empty_in_layout(like):
    """Uninitialized, in like's layout: its strides when like is non-overlapping and dense
    (channels_last stays channels_last), contiguous otherwise (csrc/ops.cpp empty_grad)."""
    if dense_order(like) is not None:
        return torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=like.device)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def empty_grad_fake(like):
    return _empty_in_layout(like)


FAKES = {
    "ce_fwd": ce_fwd_fake,
    "focal_fwd": focal_fwd_fake,
    "softmax_bwd": softmax_bwd_fake,
    "softmax_loss": softmax_loss_fake,
    "binary_fwd": binary_fwd_fake,
    "binary_bwd": binary_bwd_fake,
    "scale_grad": scale_grad_fake,
    "empty_grad": empty_grad_fake,
}


POOLED_BYTES = 1 << 20  # csrc/cpu/grad_pool.cpp kMinPooled: smaller buffers are plain allocations


def empty_grad(like):
    """Uninitialized gradient buffer like `like`, in its layout (its strides when it is
    non-overlapping and dense, else contiguous): from the extension's cache of freed blocks
    for large CPU buffers (csrc/cpu/grad_pool.cpp), torch.empty_strided elsewhere. A
    gradient with its input's strides is kept by AccumulateGrad as .grad without a copy."""
    if (
        like.device.type == "cpu"
        and like.numel() * like.element_size() >= POOLED_BYTES
        and _ext.has_kernel("empty_grad", "CPU")
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.fusedloss.empty_grad.default(like)
    return _empty_in_layout(like)


if _ext._C is not None:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"fusedloss::{_name}")(_fake)
