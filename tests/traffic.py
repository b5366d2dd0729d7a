"""Traffic audit of one training step on the CPU: what the GPU code path would cost.

SPEC section 3 ("the step budget") is a statement about the GPU: how many times a step
reads and writes the N x C tensors (logits, gradient), how many kernels it launches, that
it never syncs with the host and that the autograd graph holds nothing of size N x C. This
module measures those on CPU tensors, with the triton backend run by the Triton
interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is imported):

* `Tracer` (a context manager) patches the interpreter for its duration:
  - `GridExecutor.__call__`: one Triton kernel launch (name, grid, tensor arguments);
  - `InterpreterBuilder.create_masked_load` / `create_masked_store` (every `tl.load` /
    `tl.store`, masked or not, block-pointer and tensor-descriptor accesses included: the
    interpreter routes all of them through these two) and `create_atomic_rmw` /
    `create_atomic_cas` (read + write): the bytes of the lanes whose mask is True, element
    size from the pointer's element type, attributed to the launch's tensor argument whose
    storage holds the address (bytes that hit no argument are kept as "unattributed");
  and it is a TorchDispatchMode that records every aten op (name, shapes, the storages it
  reads and writes). A custom op (`fusedloss::*`, e.g. the `*_triton` wrappers of the
  kernels) is recorded as such and its implementation is run with the mode still active,
  so the aten ops and Triton launches inside it are seen too; the custom op itself is not
  a launch (an opaque custom op with nothing visible inside is counted as one). Aten ops
  issued by the interpreter itself while a kernel runs (copying arguments to its "host")
  are ignored.
* `Tracer.summary(nc, exclude)` classifies, after the step: a storage is "N x C" when it
  holds at least N*C elements of the dtype it was used with; storages of tensors the
  caller excludes (a BCE target, a "none" loss output) are left out. Reads and writes are
  reported in passes (elements / (N*C)), Triton and aten together; an aten op counts each
  tensor argument as read whole and each result as written whole (an upper bound for
  gathers such as nll_loss). Launches = Triton launches + aten ops that are neither
  views, metadata queries nor allocations (empty*, new_empty*), whatever their size: each
  is a kernel on the GPU. Sync ops (`_local_scalar_dense` i.e. `.item()`, `is_nonzero`,
  `nonzero`, `equal`, ...) are listed (`.item()` alone is a copy, not a launch).
* `held_tensors(root)` walks an autograd graph (next_functions, the saved tensors,
  `_saved_*` of built-in nodes, the attributes of custom Function contexts and what they
  reference: containers, closures of functions, bound methods, plain objects; never a
  module or a function's globals) and returns the tensors it reaches.

Storage identity is the StorageImpl (`StorageWeakRef.cdata`), kept weakly for the whole
trace: a freed buffer whose address the allocator hands out again is a different storage,
and nothing here holds a strong reference to a tensor of the step (a strong reference
would change what autograd's AccumulateGrad does with the gradient).

The first `Tracer` of a process takes ~2 s: entering a TorchDispatchMode imports
torch._dynamo.
"""
import contextlib
import dataclasses
import gc
import types
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from triton.runtime import interpreter as _interp

# ----------------------------------------------------------------------------- aten op classes
# Metadata queries and no-op wrappers (not views by schema, but no kernel on the GPU).
METADATA_OPS = {
    "_unsafe_view", "lift_fresh", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "size", "stride", "numel", "dim", "is_contiguous", "is_same_size", "_has_compatible_shallow_copy_type",
    "is_complex", "is_floating_point", "_version", "set_", "record_stream", "_nested_tensor_size",
    # dtype and layout queries made by the op checks: host-side answers from metadata
    "promote_types", "result_type", "_debug_has_internal_overlap",
}
# Allocations (no kernel: the caching allocator hands out memory without touching it).
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "resize_"}
# Ops that make the host wait for the device (a Python value out of tensor data, or an
# output size that depends on data).
SYNC_OPS = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal", "allclose",
    "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim", "bincount", "repeat_interleave",
    "histc", "tolist", "_assert_async_msg_sync", "argwhere",
}
# Syncs that copy a value to the host and launch no kernel.
NOT_KERNELS = {"_local_scalar_dense", "item", "is_nonzero"}
# Ops that do not read the data of (some of) their tensor arguments.
NO_READ_OPS = {"empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like", "randint_like",
               "new_zeros", "new_ones", "new_full", "zero_", "fill_", "normal_", "uniform_", "random_"}
WRITE_ONLY_SELF = {"copy_", "zero_", "fill_", "normal_", "uniform_", "random_", "index_put_", "index_fill_",
                   "masked_fill_", "scatter_"}  # self is written; what is kept of it is not re-read


def _base_name(func) -> str:
    """'mul_' for aten.mul_.Tensor."""
    return func._schema.name.split("::")[-1]


def _storage_key(t: torch.Tensor, keep: list):
    """Identity of t's storage (its StorageImpl), valid for the trace: the weak reference
    is kept in `keep` so that the StorageImpl (not its memory) outlives the trace."""
    s = t.untyped_storage()
    ref = StorageWeakRef(s)
    keep.append(ref)
    return ref.cdata


# ----------------------------------------------------------------------------- records
@dataclasses.dataclass
class Access:
    """Bytes one launch or op read / wrote, per storage key."""
    reads: Dict[int, int] = dataclasses.field(default_factory=dict)
    writes: Dict[int, int] = dataclasses.field(default_factory=dict)

    def add(self, table, key, nbytes):
        table[key] = table.get(key, 0) + int(nbytes)


@dataclasses.dataclass
class Event:
    kind: str  # "triton" (a kernel launch), "aten" (an aten op), "op" (a custom op: a wrapper, or opaque)
    name: str
    detail: str
    access: Access = dataclasses.field(default_factory=Access)
    launch: bool = False  # counts as a GPU kernel launch
    sync: bool = False
    unattributed: int = 0  # triton: bytes at addresses of no tensor argument
    depth: int = 0  # nesting inside custom ops
    inner: int = 0  # op: number of events recorded inside it

    def __str__(self):
        return f"{self.kind}:{self.name}{self.detail}"


@dataclasses.dataclass
class StorageInfo:
    nbytes: int
    itemsize: int  # element size of the first tensor seen with this storage
    max_numel: int  # largest tensor (view) seen with this storage


@dataclasses.dataclass
class Summary:
    nc: int
    reads: float  # passes over N x C (elements / nc), Triton and aten together
    writes: float
    triton_reads: float
    triton_writes: float
    aten_reads: float
    aten_writes: float
    launches: List[str]  # one entry per launch, in order
    syncs: List[str]
    unattributed: int
    events: List[Event]

    @property
    def n_launches(self):
        return len(self.launches)

    def describe(self):
        return (
            f"{self.reads:.3f} reads, {self.writes:.3f} writes of N x C "
            f"(triton {self.triton_reads:.3f} r / {self.triton_writes:.3f} w, aten {self.aten_reads:.3f} r / "
            f"{self.aten_writes:.3f} w); launches {self.n_launches}: [{', '.join(self.launches)}]"
            + (f"; host syncs: {self.syncs}" if self.syncs else "")
            + (f"; {self.unattributed} bytes at no tensor argument" if self.unattributed else "")
        )


# ----------------------------------------------------------------------------- the tracer
class Tracer(TorchDispatchMode):
    """`with Tracer() as tr: <step>`; then `tr.summary(nc, exclude=[...])`.

    Not reentrant across threads: the interpreter patches are process-wide, the dispatch
    mode is thread-local (CPU autograd runs backward on the calling thread)."""

    def __init__(self):
        super().__init__()
        self.events: List[Event] = []
        self.storages: Dict[int, StorageInfo] = {}
        self._keep: list = []  # StorageWeakRefs: keys stay unique for the whole trace
        self._launch: Optional[Event] = None
        self._ranges = []  # current launch: (lo, hi, key) of each tensor argument's storage
        self._depth = 0
        self._saved = []
        self._entered = 0

    # ------------------------------------------------------------------ storages
    def _note(self, t: torch.Tensor):
        key = _storage_key(t, self._keep)
        info = self.storages.get(key)
        nbytes = t.untyped_storage().nbytes()
        if info is None:
            self.storages[key] = StorageInfo(nbytes, t.element_size(), t.numel())
        else:
            info.max_numel = max(info.max_numel, t.numel())
            info.nbytes = max(info.nbytes, nbytes)
        return key

    def key_of(self, t: torch.Tensor):
        return StorageWeakRef(t.untyped_storage()).cdata

    # ------------------------------------------------------------------ interpreter hooks
    def _tensor_args(self, dev, hst, out):
        """Pairs (device tensor, the interpreter's host tensor) among kernel arguments."""
        if isinstance(dev, (tuple, list)):
            for d, h in zip(dev, hst):
                self._tensor_args(d, h, out)
        elif hasattr(dev, "base") and hasattr(dev, "block_shape"):  # TensorDescriptor
            self._tensor_args(dev.base, hst.base, out)
        elif hasattr(dev, "data_ptr"):
            out.append((_interp._unwrap_tensor(dev), _interp._unwrap_tensor(hst)))

    def _patched_init_args_hst(self, orig):
        tracer = self

        def _init_args_hst(executor, args_dev, kwargs):
            args_hst, kwargs_hst = orig(executor, args_dev, kwargs)
            if tracer._launch is not None:
                pairs = []
                tracer._tensor_args(list(args_dev), list(args_hst), pairs)
                for k in kwargs:
                    tracer._tensor_args(kwargs[k], kwargs_hst[k], pairs)
                seen = set()
                shapes = []
                for d, h in pairs:
                    key = tracer._note(d)
                    shapes.append(tuple(d.shape))
                    if key in seen:
                        continue
                    seen.add(key)
                    lo = h.untyped_storage().data_ptr()
                    tracer._ranges.append((lo, lo + h.untyped_storage().nbytes(), key))
                tracer._launch.detail += f" args={shapes}"
            return args_hst, kwargs_hst

        return _init_args_hst

    def _patched_call(self, orig):
        tracer = self

        def __call__(executor, *args_dev, **kwargs):
            if tracer._launch is not None:  # a launch from inside a kernel: not expected
                return orig(executor, *args_dev, **kwargs)
            name = getattr(executor.fn, "__name__", str(executor.fn))
            ev = Event("triton", name, "", launch=True, depth=tracer._depth)
            grid = executor.grid
            ev.detail = f"[grid={'fn' if callable(grid) else tuple(grid)}]"
            tracer.events.append(ev)
            tracer._launch, tracer._ranges = ev, []
            try:
                return orig(executor, *args_dev, **kwargs)
            finally:
                tracer._launch, tracer._ranges = None, []

        return __call__

    def _account(self, table, ptrs, mask):
        ev = self._launch
        if ev is None:
            return
        p = np.asarray(ptrs.data)
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), p.shape) if mask is not None else np.ones(p.shape, bool)
        active = p[m].astype(np.uint64)
        if active.size == 0:
            return
        elty = ptrs.get_element_ty()
        size = max(1, elty.primitive_bitwidth // 8)  # int1 (bool) is one byte in memory
        hit = 0
        for lo, hi, key in self._ranges:
            n = int(np.count_nonzero((active >= lo) & (active < hi)))
            if n:
                ev.access.add(table(ev), key, n * size)
                hit += n
        ev.unattributed += (active.size - hit) * size

    def _patched_load(self, orig):
        tracer = self

        def create_masked_load(builder, ptrs, mask, other, cache_policy, is_volatile):
            tracer._account(lambda ev: ev.access.reads, ptrs, mask)
            return orig(builder, ptrs, mask, other, cache_policy, is_volatile)

        return create_masked_load

    def _patched_store(self, orig):
        tracer = self

        def create_masked_store(builder, ptrs, value, mask, cache_policy):
            tracer._account(lambda ev: ev.access.writes, ptrs, mask)
            return orig(builder, ptrs, value, mask, cache_policy)

        return create_masked_store

    def _patched_rmw(self, orig):
        tracer = self

        def create_atomic_rmw(builder, rmwOp, ptr, val, mask, sem, scope):
            tracer._account(lambda ev: ev.access.reads, ptr, mask)
            tracer._account(lambda ev: ev.access.writes, ptr, mask)
            return orig(builder, rmwOp, ptr, val, mask, sem, scope)

        return create_atomic_rmw

    def _patched_cas(self, orig):
        tracer = self

        def create_atomic_cas(builder, ptr, cmp, val, sem, scope):
            tracer._account(lambda ev: ev.access.reads, ptr, None)
            tracer._account(lambda ev: ev.access.writes, ptr, None)
            return orig(builder, ptr, cmp, val, sem, scope)

        return create_atomic_cas

    def _patch(self):
        B, G = _interp.InterpreterBuilder, _interp.GridExecutor
        table = [
            (B, "create_masked_load", self._patched_load),
            (B, "create_masked_store", self._patched_store),
            (B, "create_atomic_rmw", self._patched_rmw),
            (B, "create_atomic_cas", self._patched_cas),
            (G, "__call__", self._patched_call),
            (G, "_init_args_hst", self._patched_init_args_hst),
        ]
        for cls, name, make in table:
            orig = cls.__dict__[name]
            self._saved.append((cls, name, orig))
            setattr(cls, name, make(orig))

    def _unpatch(self):
        while self._saved:
            cls, name, orig = self._saved.pop()
            setattr(cls, name, orig)

    def __enter__(self):
        # re-entered (without patching again) while a custom op's kernel runs
        if self._entered == 0:
            self._patch()
        self._entered += 1
        try:
            return super().__enter__()
        except BaseException:
            self._exit_patch()
            raise

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._exit_patch()

    def _exit_patch(self):
        self._entered -= 1
        if self._entered == 0:
            self._unpatch()

    # ------------------------------------------------------------------ dispatch mode
    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._launch is not None:  # the interpreter's own argument copies
            return func(*args, **kwargs)
        name = _base_name(func)
        flat_args, _ = tree_flatten((args, kwargs))
        shapes = [tuple(a.shape) for a in flat_args if isinstance(a, torch.Tensor)]
        if func.namespace not in ("aten", "prim", "prims"):
            return self._custom_op(func, name, args, kwargs, shapes)
        ev = Event("aten", str(func).replace("aten.", "").replace(".default", ""), f"{shapes}", depth=self._depth)
        is_meta = func.is_view or name in METADATA_OPS
        # .item() is a device-to-host copy (and a sync), not a kernel
        ev.launch = not is_meta and name not in ALLOC_OPS and name not in NOT_KERNELS
        ev.sync = name in SYNC_OPS
        self.events.append(ev)
        out = func(*args, **kwargs)
        if ev.launch:
            self._aten_access(ev, func, name, args, kwargs, out)
        return out

    def _aten_access(self, ev, func, name, args, kwargs, out):
        schema = func._schema
        write_only = set()
        for i, a in enumerate(schema.arguments):
            written = a.alias_info is not None and a.alias_info.is_write
            val = kwargs.get(a.name, args[i] if i < len(args) and not a.kwarg_only else None)
            if written and (a.kwarg_only or name in WRITE_ONLY_SELF):  # out= (and self of copy_/fill_)
                for t in tree_flatten(val)[0]:
                    if isinstance(t, torch.Tensor):
                        write_only.add(id(t))
        if name not in NO_READ_OPS:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) not in write_only:
                    ev.access.add(ev.access.reads, self._note(t), t.numel() * t.element_size())
        seen = set()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                ev.access.add(ev.access.writes, self._note(t), t.numel() * t.element_size())

    def _custom_op(self, func, name, args, kwargs, shapes):
        """A custom op: recorded, and its kernel run with this mode re-entered (redispatch
        below the Python key), so that what it does inside is recorded as well."""
        ev = Event("op", str(func), f"{shapes}", depth=self._depth)
        self.events.append(ev)
        before = len(self.events)
        device = next((a.device for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)), None)
        key = "CUDA" if device is not None and device.type == "cuda" else "CPU"
        self._depth += 1
        try:
            if torch._C._dispatch_has_computed_kernel_for_dispatch_key(func.name(), key):
                with self:
                    out = func.redispatch(torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key)), *args, **kwargs)
            else:  # no kernel to redispatch to: run it opaque (Triton launches inside are still seen)
                out = func(*args, **kwargs)
        finally:
            self._depth -= 1
        ev.inner = len(self.events) - before
        if ev.inner == 0 and "empty" not in name:  # opaque: its kernel is one launch
            ev.launch = True
            self._aten_access(ev, func, name, args, kwargs, out)
        return out

    # ------------------------------------------------------------------ results
    def summary(self, nc: int, exclude=()) -> Summary:
        """Passes over N x C storages (nc elements), excluding the storages of `exclude`
        (tensors whose traffic does not count, e.g. a BCE target)."""
        skip = {self.key_of(t) for t in exclude if t is not None}

        def big(key):
            info = self.storages.get(key)
            return info is not None and key not in skip and info.nbytes // info.itemsize >= nc

        tot = {"triton": [0.0, 0.0], "aten": [0.0, 0.0]}
        launches, syncs, unattributed = [], [], 0
        for ev in self.events:
            if ev.launch:
                launches.append(ev.name)
            if ev.sync:
                syncs.append(str(ev))
            unattributed += ev.unattributed
            if not ev.launch:
                continue
            kind = "triton" if ev.kind == "triton" else "aten"
            for i, table in enumerate((ev.access.reads, ev.access.writes)):
                for key, nbytes in table.items():
                    if big(key):
                        tot[kind][i] += nbytes / self.storages[key].itemsize / nc
        return Summary(
            nc=nc,
            reads=tot["triton"][0] + tot["aten"][0],
            writes=tot["triton"][1] + tot["aten"][1],
            triton_reads=tot["triton"][0],
            triton_writes=tot["triton"][1],
            aten_reads=tot["aten"][0],
            aten_writes=tot["aten"][1],
            launches=launches,
            syncs=syncs,
            unattributed=unattributed,
            events=list(self.events),
        )


@contextlib.contextmanager
def trace():
    """`with trace() as tr: ...` -- a Tracer."""
    tr = Tracer()
    with tr:
        yield tr


# ----------------------------------------------------------------------------- graph walks
def _is_node(o):
    return hasattr(o, "next_functions") and hasattr(o, "register_hook")


def held_tensors(root, include_saved=True, limit=200_000):
    """Tensors reachable from autograd node `root`: through next_functions, AccumulateGrad's
    variable, built-in nodes' `_saved_*`, custom nodes' `saved_tensors` (when
    include_saved; after a backward without retain_graph they are freed) and every
    attribute of a custom node (its ctx) with what those reference: containers, closures
    and defaults of functions, bound methods, objects' __dict__ and gc referents. Modules,
    classes and functions' globals are not followed. Returns [(path, tensor)]."""
    found = []
    seen = set()
    stack = [(root, "grad_fn")]
    while stack and len(seen) < limit:
        o, path = stack.pop()
        if id(o) in seen or o is None:
            continue
        seen.add(id(o))
        if isinstance(o, torch.Tensor):
            found.append((path, o))
            if o._base is not None:
                stack.append((o._base, path + "._base"))
            continue
        if isinstance(o, (types.ModuleType, type, str, bytes, int, float, bool, complex, torch.dtype,
                          torch.device, torch.Size)):
            continue
        if _is_node(o):
            for i, (f, _) in enumerate(o.next_functions):
                stack.append((f, f"{path}.next_functions[{i}]"))
            for attr in dir(o):
                if attr.startswith("_saved_") or attr == "variable" or (include_saved and attr == "saved_tensors"):
                    try:
                        stack.append((getattr(o, attr), f"{path}.{attr}"))
                    except RuntimeError:  # freed by backward
                        pass
            for k, v in getattr(o, "__dict__", {}).items():
                stack.append((v, f"{path}.{k}"))
            continue
        if isinstance(o, dict):
            if "__builtins__" in o and "__name__" in o:  # a module's globals
                continue
            for k, v in o.items():
                stack.append((k, f"{path}[key]"))
                stack.append((v, f"{path}[{k!r}]"))
            continue
        if isinstance(o, (list, tuple, set, frozenset)):
            for i, v in enumerate(o):
                stack.append((v, f"{path}[{i}]"))
            continue
        if isinstance(o, types.FunctionType):
            for i, c in enumerate(o.__closure__ or ()):
                try:
                    stack.append((c.cell_contents, f"{path}<closure {o.__code__.co_freevars[i]}>"))
                except ValueError:  # empty cell
                    pass
            for i, v in enumerate(o.__defaults__ or ()):
                stack.append((v, f"{path}<default {i}>"))
            for k, v in (o.__kwdefaults__ or {}).items():
                stack.append((v, f"{path}<default {k}>"))
            continue
        if isinstance(o, types.MethodType):
            stack.append((o.__self__, f"{path}.__self__"))
            stack.append((o.__func__, f"{path}.__func__"))
            continue
        if isinstance(o, (types.BuiltinFunctionType, types.CodeType, types.FrameType)):
            continue
        if hasattr(o, "__dict__"):
            for k, v in vars(o).items():
                stack.append((v, f"{path}.{k}"))
        else:
            for i, v in enumerate(gc.get_referents(o)):
                if not isinstance(v, (types.ModuleType, type)):
                    stack.append((v, f"{path}<ref {i}>"))
    return found


def ctx_tensors(root, limit=200_000):
    """Tensors that custom autograd Function contexts reachable from `root` hold OUTSIDE
    save_for_backward (their attributes and what those reference; not next_functions'
    built-in nodes' saved tensors, not saved_tensors). Returns [(path, tensor)]."""
    found = []
    seen = set()
    stack = [(root, "grad_fn")]
    while stack:
        node, path = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for i, (f, _) in enumerate(node.next_functions):
            stack.append((f, f"{path}.next_functions[{i}]"))
        attrs = getattr(node, "__dict__", None)
        if attrs:
            for k, v in attrs.items():
                found += [(p.replace("grad_fn", f"{path}.{k}", 1), t) for p, t in held_tensors(v, limit=limit)]
    return found
