"""fusedloss: fused, -inf-safe classification losses for PyTorch.

    import fusedloss
    loss = fusedloss.cross_entropy(logits, target)   # was F.cross_entropy

See README.md for the semantics that differ from PyTorch and docs/formulas.md for the math.
"""
from fusedloss import _ops  # noqa: F401  (fake kernels for torch.compile)
from fusedloss import distributed, nn
from fusedloss._backend import backends
from fusedloss.functional import binary_cross_entropy_with_logits, cross_entropy, focal_loss, sigmoid_focal_loss
from fusedloss.linear import linear_cross_entropy

__all__ = [
    "cross_entropy",
    "binary_cross_entropy_with_logits",
    "sigmoid_focal_loss",
    "focal_loss",
    "linear_cross_entropy",
    "backends",
    "distributed",
    "nn",
]
__version__ = "0.1.0"
