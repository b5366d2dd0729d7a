"""Backend discovery and dispatch (SPEC section 4).

A backend is a namespace with the functions of the same signatures as the ops in
csrc/ops.cpp (OPS). `resolve(requested, device)` returns the one
to run; an explicitly requested backend that cannot run raises. "auto" on CUDA tensors
is a chain triton -> cuda -> torch that moves an op to the next backend when its kernel
fails to compile or launch, with one warning naming the cause; with no fast backend at
all, "auto" is the torch reference with one warning that names what was missing.
"""
import os
import types
import warnings

import torch

from fusedloss import _ext, _ops, reference

NAMES = ("triton", "cuda", "cpu", "torch")
ENV = "FUSEDLOSS_BACKEND"

try:
    from fusedloss import triton as _triton_impl

    TRITON_ERROR = None
except Exception as e:  # noqa: BLE001 -- not installed, or broken (a triton that raises at import)
    _triton_impl = None
    TRITON_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


OPS = ("ce_fwd", "focal_fwd", "softmax_bwd", "binary_fwd", "binary_bwd", "scale_grad")


def _namespace(name, get):
    return types.SimpleNamespace(name=name, **{op: get(op) for op in OPS})


def _cpp_op(op):
    """The C++ op's OpOverload, bound once here: calling the overload itself skips the
    packet's overload resolution (a few microseconds of a small step), and a binding made
    at import has no state for torch.compile to trace. Without the extension the backend
    is unavailable and never called."""
    if _ext._C is not None and hasattr(torch.ops.fusedloss, op):
        return getattr(torch.ops.fusedloss, op).default

    def unavailable(*args):
        raise RuntimeError(f"fusedloss: the C++ extension has no op {op!r}: {_ext.ERROR}")

    return unavailable


IMPLS = {
    "torch": _namespace("torch", lambda op: getattr(reference, op)),
    "cpu": _namespace("cpu", _cpp_op),
    "cuda": _namespace("cuda", _cpp_op),
}
if _triton_impl is not None:
    IMPLS["triton"] = _namespace("triton", lambda op: getattr(_triton_impl, op))


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, device_type: str):
    """None when backend `name` can run on tensors of `device_type`, else the reason."""
    if name == "torch":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        if not _ext.has_kernel("ce_fwd", "CPU"):
            return _ext.ERROR or "the extension has no CPU kernels"
        return None
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        if not _ext.has_kernel("ce_fwd", "CUDA"):
            return _ext.ERROR or "the extension was built without CUDA (torch had no CUDA, or no nvcc, at build time)"
        return None
    if name == "triton":
        if _triton_impl is None:
            return TRITON_ERROR
        if device_type == "cuda":
            return None
        if device_type == "cpu" and _interpret():
            return None
        return f"the triton backend runs on CUDA tensors (CPU tensors only with TRITON_INTERPRET=1), got {device_type} tensors"
    raise ValueError(f"backend must be one of 'auto', {', '.join(repr(n) for n in NAMES)}; got {name!r}")


def backends(device_type: str = None) -> dict:
    """{name: None or the reason it cannot run} for each backend, on `device_type`
    ("cuda" when available, else "cpu", by default)."""
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: why_not(name, device_type) for name in NAMES}


_warned = set()


def _warn_once(key, message):
    if key not in _warned and not torch.compiler.is_compiling():
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


# Errors that are the caller's (bad input, an out-of-range target) or the machine's (out of
# memory): another backend would meet them too, so they propagate instead of falling back.
_NOT_A_KERNEL_FAILURE = (ValueError, TypeError, IndexError, torch.OutOfMemoryError)


def _fallback_chain(names):
    """A backend namespace whose ops run on the first of `names` that works: a kernel that
    fails to compile or launch (a Triton compiler error, an unsupported GPU, a missing
    symbol) moves that op to the next backend for the rest of the process, with one
    warning naming the cause (SPEC section 4). The ops of every backend share one contract
    (csrc/ops.cpp), so a forward on one and a backward on another agree."""
    chain_name = ">".join(names)
    failed = set()  # (backend, op) pairs that raised

    def make(op):
        def run(*args):
            for i, name in enumerate(names):
                if (name, op) in failed and i < len(names) - 1:
                    continue
                try:
                    return getattr(IMPLS[name], op)(*args)
                except _NOT_A_KERNEL_FAILURE:
                    raise
                except Exception as e:  # noqa: BLE001 -- any kernel failure falls back
                    if i == len(names) - 1:
                        raise
                    failed.add((name, op))
                    _warn_once(
                        (chain_name, name, op),
                        f"fusedloss: the {name} backend failed in {op} ({type(e).__name__}: {e}); "
                        f"using the {names[i + 1]} backend for it from now on",
                    )

        return run

    ns = types.SimpleNamespace(name=chain_name, failed=failed, **{op: make(op) for op in OPS})
    IMPLS[chain_name] = ns
    return ns


_chains = {}


def resolve(requested: str, device: torch.device):
    """The backend namespace to run for tensors on `device`."""
    if requested == "auto":
        requested = os.environ.get(ENV, "auto") or "auto"
    dev = device.type
    if requested != "auto":
        reason = why_not(requested, dev)
        if reason is not None:
            raise RuntimeError(f"fusedloss: backend={requested!r} cannot run: {reason}")
        return IMPLS[requested]
    preference = ("triton", "cuda") if dev == "cuda" else ("cpu",)
    missing, usable = [], []
    for name in preference:
        reason = why_not(name, dev)
        if reason is None:
            usable.append(name)
        else:
            missing.append(f"{name}: {reason}")
    if not usable:
        _warn_once(
            (dev, tuple(missing)),
            f"fusedloss: no fast backend for {dev} tensors ({'; '.join(missing)}); using the torch reference backend",
        )
        return IMPLS["torch"]
    if dev != "cuda" or torch.compiler.is_compiling():
        # a C++ CPU op has nothing to compile at run time, and a traced graph cannot catch
        # a failure of its own kernels: the first usable backend, without a chain
        return IMPLS[usable[0]]
    names = tuple(usable) + ("torch",)
    if names not in _chains:
        _chains[names] = _fallback_chain(names)
    return _chains[names]
