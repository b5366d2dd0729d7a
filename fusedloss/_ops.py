"""Fake (meta) kernels of the fusedloss ops: shapes and dtypes only, never data.

The C++ schemas are in csrc/ops.cpp; the Triton ops (fusedloss/triton) reuse these fakes.
"""
import torch

from fusedloss import _ext


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def ce_fwd_fake(logits, target, weight, mask, grad, ignore_index, label_smoothing, z_loss, softcap):
    n, _, d = logits.shape
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((n, d), dtype=acc), logits.new_empty((n, d), dtype=acc)


def focal_fwd_fake(logits, target, alpha, mask, grad, ignore_index, gamma):
    n, _, d = logits.shape
    acc = acc_dtype(logits.dtype)
    return logits.new_empty((n, d), dtype=acc), logits.new_empty((n, d), dtype=acc)


def binary_fwd_fake(input, target, weight, pos_weight, grad, gamma, alpha, reduce):
    m, l = input.shape
    return input.new_empty((m,) if reduce else (m, l), dtype=acc_dtype(input.dtype))


def empty_grad_fake(like):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


FAKES = {"ce_fwd": ce_fwd_fake, "focal_fwd": focal_fwd_fake, "binary_fwd": binary_fwd_fake, "empty_grad": empty_grad_fake}

def empty_grad(like):
    """Uninitialized gradient buffer like `like` (contiguous): from the extension's cache
    of freed blocks on the CPU (csrc/cpu/grad_pool.cpp), torch.empty_like elsewhere."""
    if like.device.type == "cpu" and _ext.has_kernel("empty_grad", "CPU") and not torch.compiler.is_compiling():
        return torch.ops.fusedloss.empty_grad(like)
    return torch.empty_like(like)


if _ext._C is not None:
    for _name, _fake in FAKES.items():
        torch.library.register_fake(f"fusedloss::{_name}")(_fake)
