"""Loads the C++/CUDA extension once. The package works without it (torch backend)."""
import torch

try:
    from fusedloss import _C  # noqa: F401  (registers the fusedloss:: ops)

    ERROR = None
except ImportError as e:  # not built, or built against another torch
    _C = None
    ERROR = f"the C++ extension fusedloss._C did not load ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"

OPS = ("ce_fwd", "focal_fwd", "softmax_bwd", "binary_fwd", "binary_bwd", "scale_grad", "empty_grad")

# Looked up once: the registrations are static, and a plain dict lookup is traceable by
# torch.compile where the dispatcher query is not.
_KERNELS = {
    (op, key): _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedloss::{op}", key)
    for op in OPS
    for key in ("CPU", "CUDA")
}


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when fusedloss::op has a kernel registered for dispatch_key ("CPU", "CUDA")."""
    return _KERNELS[(op, dispatch_key)]
