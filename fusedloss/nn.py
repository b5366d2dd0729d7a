"""Modules, constructed like PyTorch's (and torchvision's) loss modules."""
import math
from typing import Optional

import torch
from torch import Tensor

from fusedloss import functional as F
from fusedloss import linear as _linear

__all__ = ["CrossEntropyLoss", "BCEWithLogitsLoss", "SigmoidFocalLoss", "FocalLoss", "LinearCrossEntropyLoss"]


def _reduction_arg(size_average, reduce, reduction):
    return F._reduction_of(size_average, reduce, reduction)


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.CrossEntropyLoss; extras: mask (per call), z_loss, softcap,
    inplace_backward, backend."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        inplace_backward: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction_arg(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return F.cross_entropy(
            input, target, self.weight, ignore_index=self.ignore_index, reduction=self.reduction,
            label_smoothing=self.label_smoothing, mask=mask, z_loss=self.z_loss, softcap=self.softcap,
            inplace_backward=self.inplace_backward, backend=self.backend,
        )


class BCEWithLogitsLoss(torch.nn.Module):
    """Drop-in for torch.nn.BCEWithLogitsLoss."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", pos_weight=None, *, backend="auto"):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _reduction_arg(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, reduction=self.reduction, pos_weight=self.pos_weight, backend=self.backend
        )


class SigmoidFocalLoss(torch.nn.Module):
    """Module form of torchvision.ops.sigmoid_focal_loss (same defaults)."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0, reduction: str = "none", *, weight=None, pos_weight=None, backend="auto"):
        super().__init__()
        self.alpha, self.gamma, self.reduction, self.backend = alpha, gamma, reduction, backend
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return F.sigmoid_focal_loss(
            inputs, targets, self.alpha, self.gamma, self.reduction,
            weight=self.weight, pos_weight=self.pos_weight, backend=self.backend,
        )


class FocalLoss(torch.nn.Module):
    """Multi-class softmax focal loss module (see fusedloss.focal_loss)."""

    def __init__(self, gamma: float = 2.0, alpha=None, ignore_index: int = -100, reduction: str = "mean", *, backend="auto"):
        super().__init__()
        self.gamma, self.ignore_index, self.reduction, self.backend = gamma, ignore_index, reduction, backend
        if isinstance(alpha, Tensor):
            self.register_buffer("alpha", alpha)
        else:
            self.alpha = alpha

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return F.focal_loss(
            input, target, self.gamma, self.alpha, self.ignore_index, self.reduction, mask=mask, backend=self.backend
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """Drop-in for torch.nn.LinearCrossEntropyLoss (torch 2.13): owns the head, a
    torch.nn.Linear(in_features, num_classes * prod(out_features)) in `self.linear`, and
    computes fusedloss.linear_cross_entropy(input, linear.weight, target) without the
    logits. Extras: mask (per call), z_loss, softcap, backend."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Optional[Tensor] = None,
        ignore_index: Optional[int] = None,
        label_smoothing: float = 0.0,
        options=None,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        backend: str = "auto",
    ):
        super().__init__()
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise ValueError(f"weight must have shape {(num_classes,)}, got {tuple(weight.shape)}")
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {label_smoothing}")
        F._check_reduction(reduction)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = tuple(out_features)
        self.linear = torch.nn.Linear(
            in_features, math.prod(self.out_features, start=num_classes), bias=bias, device=device, dtype=dtype
        )
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend

    def forward(self, input: Tensor, target: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        shape = (self.num_classes,) + self.out_features
        bias = self.linear.bias
        return _linear.linear_cross_entropy(
            input, self.linear.weight.reshape(shape + (self.linear.in_features,)), target,
            linear_bias=None if bias is None else bias.reshape(shape), weight=self.weight,
            reduction=self.reduction, ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
            options=self.options, mask=mask, z_loss=self.z_loss, softcap=self.softcap, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"out_features={self.out_features}, bias={self.linear.bias is not None}, reduction={self.reduction}"
        )
