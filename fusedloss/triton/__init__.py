"""Triton backend: one module per loss (kernel -> launcher), registered here as
torch.library custom ops so torch.compile traces them as opaque calls.

    fusedloss::ce_fwd_triton      cross_entropy.ce_fwd   (schema of ce_fwd in csrc/ops.cpp)
    fusedloss::focal_fwd_triton   focal.focal_fwd        (schema of focal_fwd)
    fusedloss::binary_fwd_triton  binary.binary_fwd      (schema of binary_fwd)

`grad` is written in place (mutates_args); it may alias the logits (inplace_backward).
The fake kernels are the ones the C++ ops use (fusedloss._ops.FAKES). Importing this
package needs triton but not the C++ extension; an ImportError here marks the backend
unavailable (fusedloss/_backend.py).
"""
from typing import Optional, Tuple

import torch
import triton  # noqa: F401  (ImportError here marks the backend unavailable)
from torch import Tensor

from fusedloss._ops import FAKES
from fusedloss.triton import binary as _binary
from fusedloss.triton import cross_entropy as _cross_entropy
from fusedloss.triton import focal as _focal

__all__ = ["ce_fwd", "focal_fwd", "binary_fwd"]


@torch.library.custom_op("fusedloss::ce_fwd_triton", mutates_args=("grad",))
def ce_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    mask: Optional[Tensor],
    grad: Optional[Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
) -> Tuple[Tensor, Tensor]:
    return _cross_entropy.ce_fwd(logits, target, weight, mask, grad, ignore_index, label_smoothing, z_loss, softcap)


@torch.library.custom_op("fusedloss::focal_fwd_triton", mutates_args=("grad",))
def focal_fwd(
    logits: Tensor,
    target: Tensor,
    alpha: Optional[Tensor],
    mask: Optional[Tensor],
    grad: Optional[Tensor],
    ignore_index: int,
    gamma: float,
) -> Tuple[Tensor, Tensor]:
    return _focal.focal_fwd(logits, target, alpha, mask, grad, ignore_index, gamma)


@torch.library.custom_op("fusedloss::binary_fwd_triton", mutates_args=("grad",))
def binary_fwd(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    pos_weight: Optional[Tensor],
    grad: Optional[Tensor],
    gamma: float,
    alpha: float,
    reduce: bool,
) -> Tensor:
    return _binary.binary_fwd(input, target, weight, pos_weight, grad, gamma, alpha, reduce)


ce_fwd.register_fake(FAKES["ce_fwd"])
focal_fwd.register_fake(FAKES["focal_fwd"])
binary_fwd.register_fake(FAKES["binary_fwd"])
