"""Triton backend: one module per loss (kernels -> launchers), registered here as
torch.library custom ops so torch.compile traces them as opaque calls. Each op has the
schema (and meaning) of the C++ op of the same name in csrc/ops.cpp:

    fusedloss::ce_fwd_triton        cross_entropy.ce_fwd
    fusedloss::focal_fwd_triton     focal.focal_fwd
    fusedloss::softmax_bwd_triton   softmax_bwd.softmax_bwd
    fusedloss::binary_fwd_triton    binary.binary_fwd
    fusedloss::binary_bwd_triton    binary.binary_bwd
    fusedloss::scale_grad_triton    binary.scale_grad

`grad` is written in place (mutates_args); it may alias the logits (inplace_backward).
Each op first makes the C++ op's checks (_checks.py).
The fake kernels are the ones the C++ ops use (fusedloss._ops.FAKES). Importing this
package needs triton but not the C++ extension; an ImportError here marks the backend
unavailable (fusedloss/_backend.py).
"""
from typing import Optional, Tuple

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from fusedloss._ops import FAKES
from fusedloss.triton import _checks
from fusedloss.triton import binary as _binary
from fusedloss.triton import cross_entropy as _cross_entropy
from fusedloss.triton import focal as _focal
from fusedloss.triton import softmax_bwd as _softmax_bwd

__all__ = ["ce_fwd", "focal_fwd", "softmax_bwd", "binary_fwd", "binary_bwd", "scale_grad"]


@torch.library.custom_op("fusedloss::ce_fwd_triton", mutates_args=())
def ce_fwd(
    logits: Tensor, target: Tensor, weight: Optional[Tensor], mask: Optional[Tensor], ignore_index: int,
    label_smoothing: float, z_loss: float, softcap: float, reduction: int, out_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.softmax_fwd("ce_fwd", logits, target, weight, "weight", mask, allow_prob=True)
    _checks.reduction("ce_fwd", reduction)
    _checks.out_dtype("ce_fwd", out_dtype)
    if not (0.0 <= label_smoothing <= 1.0 and softcap >= 0.0):
        raise ValueError(f"ce_fwd: label_smoothing must be in [0, 1] and softcap >= 0, got {label_smoothing}, {softcap}")
    return _cross_entropy.ce_fwd(logits, target, weight, mask, ignore_index, label_smoothing, z_loss, softcap, reduction, out_dtype)


@torch.library.custom_op("fusedloss::focal_fwd_triton", mutates_args=())
def focal_fwd(
    logits: Tensor, target: Tensor, alpha: Optional[Tensor], mask: Optional[Tensor], ignore_index: int,
    gamma: float, reduction: int, out_dtype: torch.dtype,
) -> Tuple[Tensor, Tensor, Tensor]:
    _checks.softmax_fwd("focal_fwd", logits, target, alpha, "alpha", mask, allow_prob=False)
    _checks.reduction("focal_fwd", reduction)
    _checks.out_dtype("focal_fwd", out_dtype)
    if not gamma >= 0:
        raise ValueError(f"focal_fwd: gamma must be >= 0, got {gamma}")
    return _focal.focal_fwd(logits, target, alpha, mask, ignore_index, gamma, reduction, out_dtype)


@torch.library.custom_op("fusedloss::softmax_bwd_triton", mutates_args=("grad",))
def softmax_bwd(
    grad_out: Tensor, logits: Tensor, target: Tensor, weight: Optional[Tensor], mask: Optional[Tensor],
    stats: Tensor, denom: Tensor, softcap: float, reduction: int, grad: Tensor,
) -> None:
    _checks.softmax_bwd(grad_out, logits, target, weight, mask, stats, denom, grad, reduction)
    _softmax_bwd.softmax_bwd(grad_out, logits, target, weight, mask, stats, denom, softcap, reduction, grad)


@torch.library.custom_op("fusedloss::binary_fwd_triton", mutates_args=("grad",))
def binary_fwd(
    input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor], grad: Optional[Tensor],
    gamma: float, alpha: float, reduction: int, out_dtype: torch.dtype,
) -> Tensor:
    _checks.binary_fwd(input, target, weight, pos_weight, grad, gamma, reduction)
    _checks.out_dtype("binary_fwd", out_dtype)
    return _binary.binary_fwd(input, target, weight, pos_weight, grad, gamma, alpha, reduction, out_dtype)


@torch.library.custom_op("fusedloss::binary_bwd_triton", mutates_args=("grad",))
def binary_bwd(
    grad_out: Tensor, input: Tensor, target: Tensor, weight: Optional[Tensor], pos_weight: Optional[Tensor],
    gamma: float, alpha: float, reduction: int, grad: Tensor,
) -> None:
    _checks.binary_bwd(grad_out, input, target, weight, pos_weight, grad, gamma, reduction)
    _binary.binary_bwd(grad_out, input, target, weight, pos_weight, gamma, alpha, reduction, grad)


@torch.library.custom_op("fusedloss::scale_grad_triton", mutates_args=("grad",))
def scale_grad(grad_out: Tensor, grad: Tensor) -> None:
    _checks.scale_grad(grad_out, grad)
    _binary.scale_grad(grad_out, grad)


for _name in __all__:
    globals()[_name].register_fake(FAKES[_name])
