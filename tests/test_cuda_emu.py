"""The CUDA kernels (csrc/cuda/softmax_losses.cu, binary_losses.cu) run on the CPU: each .cu
compiled by the host compiler against tests/cuda_emu/ (one std::thread per CUDA thread, block
barriers, warp shuffles through the block; emu_device.h), its `<<<...>>>` launches rewritten
into calls of the emulator, driven through the launch interfaces of csrc/cuda/softmax_launch.h
and binary_launch.h (ctypes). No GPU and no CUDA toolkit needed; tests/test_nvcc.py compiles
the same files for sm_80 / sm_90.

What it checks, against PyTorch's own formulas in float64: the K-dim layout (a block of 128
consecutive positions, a thread per position looping over its classes: coalesced on a GPU)
for every option and reduction, probability targets, focal, bfloat16; the layout choice
(thread per position for NCHW with short rows or with rows enough to fill the GPU, a warp per
row for contiguous classes and for a few long rows), from the launches the emulator records.
Binary losses (BCE-with-logits, sigmoid focal): bool and uint8 targets read as they are (one
byte per element, no float copy), on the vectorized path (VEC-byte target packs) and the
strided one, for every reduction, forward and backward.
"""
import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import REDUCTIONS, check_close, class_masked_ce_reference, grad_output_for, make_logits, reduce_rows

ROOT = Path(__file__).resolve().parents[1]
EMU = Path(__file__).resolve().parent / "cuda_emu"
CXX = shutil.which("g++") or shutil.which("c++")
pytestmark = pytest.mark.skipif(CXX is None, reason="no host C++ compiler")

DTYPE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KIND = {"ce": 0, "ce_prob": 1, "focal": 2}
REDUCTION = {"none": 0, "mean": 1, "sum": 2}
THREAD_PER_POSITION, WARP_PER_ROW = (1, 128), (32, 4)
_LAUNCH = re.compile(r"^(\s*)(.*?)<<<(.*?)>>>\((.*)\);\s*$")


def _emulated(source: Path) -> str:
    """The source with every `kernel<<<cfg>>>(args);` line as `emu::launch(cfg, [&] { kernel(args); });`."""
    out = []
    for line in source.read_text().split("\n"):
        m = _LAUNCH.match(line)
        out.append(f"{m.group(1)}emu::launch({m.group(3)}, [&] {{ {m.group(2)}({m.group(4)}); }});" if m else line)
    return "\n".join(out)


def _emulator(d, stem):
    """csrc/cuda/{stem}.cu emulated: tests/cuda_emu/{stem.split('_')[0]}_api.cpp and emu_api.cpp
    compiled into one library in d, loaded; the SM count set to 1."""
    (d / "cuda").mkdir()
    (d / "cuda" / "kernel_common.cuh").write_text(_emulated(ROOT / "csrc" / "cuda" / "kernel_common.cuh"))
    (d / f"{stem}_emu.cpp").write_text(_emulated(ROOT / "csrc" / "cuda" / f"{stem}.cu"))
    lib = d / f"{stem}_emu.so"
    api = EMU / f"{stem.split('_')[0]}_api.cpp"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-pthread", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'csrc'}",
           str(api), str(EMU / "emu_api.cpp"), "-o", str(lib)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    emu = ctypes.CDLL(str(lib))
    emu.emu_launches.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
    emu.emu_set_sms(1)  # a one-SM "device": 16 resident blocks, so the grid-stride loops loop
    return emu


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    emu = _emulator(tmp_path_factory.mktemp("cuda_emu"), "softmax_losses")
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    strides = ctypes.POINTER(i64)
    emu.emu_softmax_fwd.argtypes = [ptr] * 7 + [strides, i64, i64, i64, i32, i32, i32, i32, i64, ctypes.POINTER(f64)]
    emu.emu_softmax_bwd.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, strides, i64, i64, i64, i32, i32, i32, f64]
    return emu


def _p(t):
    return ctypes.c_void_p(None if t is None else t.data_ptr())


def _strides(*ts):
    vals = []
    for t, n in ts:
        vals += list(t.stride()) if t is not None else [0] * n
    return (ctypes.c_int64 * len(vals))(*vals)


def _launches(emu):
    buf = (ctypes.c_int64 * 30)()
    n = emu.emu_launches(buf, 10)
    return [tuple(buf[3 * i:3 * i + 3]) for i in range(min(n, 10))]


def emulated_loss(emu, x, target, weight=None, mask=None, kind="ce", reduction="mean", ignore_index=-100, eps=0.0,
                  z_loss=0.0, softcap=0.0, gamma=0.0):  # fmt: skip
    """The CUDA forward and backward on (N, C, D) logits: (loss, gradient for grad_output_for(loss),
    block shapes of the forward's and the backward's row kernels)."""
    n, c, d = x.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    red = REDUCTION[reduction]
    out = torch.empty((n, d) if red == 0 else (), dtype=x.dtype)
    denom, stats = torch.empty((), dtype=acc), torch.empty((n, d, 4), dtype=acc)
    prob = kind == "ce_prob"
    w = None if weight is None else weight.to(acc).contiguous()
    y, t = (target, None) if prob else (None, target)
    scalars = (ctypes.c_double * 4)(eps, z_loss, softcap, gamma)
    emu.emu_clear_launches()
    rc = emu.emu_softmax_fwd(_p(x), _p(target), _p(w), _p(mask), _p(out), _p(denom), _p(stats),
                             _strides((x, 3), (t, 2), (y, 3), (mask, 3)), n, c, d, KIND[kind], DTYPE[x.dtype],
                             DTYPE[x.dtype], red, ctypes.c_int64(ignore_index), scalars)  # fmt: skip
    assert rc == 0
    fwd_block = _launches(emu)[0][1:]
    go = grad_output_for(out)
    grad = torch.empty_like(x)
    emu.emu_clear_launches()
    rc = emu.emu_softmax_bwd(_p(go), _p(x), _p(target), int(prob), _p(w), _p(mask), _p(stats), _p(denom), _p(grad),
                             _strides((go if red == 0 else None, 2), (x, 3), (t, 2), (y, 3), (mask, 3), (grad, 3)),
                             n, c, d, DTYPE[x.dtype], DTYPE[go.dtype], red, ctypes.c_double(softcap))  # fmt: skip
    assert rc == 0
    bwd_block = _launches(emu)[0][1:]
    return out, grad, (fwd_block, bwd_block)


def _check(out, grad, ref, x, what):
    """out / grad against ref(float64 x) with the same grad_output."""
    x64 = x.detach().double().requires_grad_(True)
    exp = ref(x64)
    exp.backward(grad_output_for(exp).double())
    check_close(out, exp.detach(), x.dtype, f"{what} loss")
    check_close(grad, x64.grad, x.dtype, f"{what} gradient", grad=True)


CE_CASES = {
    "plain": {},
    "weight+smoothing": {"weight": True, "eps": 0.1},
    "all": {"weight": True, "mask": True, "eps": 0.05, "z_loss": 1e-3, "softcap": 6.0},
}


@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_kdim_cross_entropy_thread_per_position(emu, case, reduction):
    """NCHW maps (2 x 40 x 5 x 7, ignore_index 255): a block of positions, a thread each."""
    opts = CE_CASES[case]
    x = make_logits((2, 40, 35))
    keep = [k for k in range(40) if not (opts.get("mask") and k in (3, 17))]
    t = torch.tensor(keep)[torch.randint(0, len(keep), (2, 35))]
    t.view(-1)[::6] = 255
    weight = torch.rand(40, dtype=torch.float64).add(0.5).float() if opts.get("weight") else None
    mask = torch.tensor([k in keep for k in range(40)]).view(1, 40, 1).expand(2, 40, 35) if opts.get("mask") else None
    kw = {k: opts[k] for k in ("eps", "z_loss", "softcap") if k in opts}
    out, grad, blocks = emulated_loss(emu, x, t, weight, mask, reduction=reduction, ignore_index=255, **kw)
    _check(out, grad, class_masked_ce_reference(t, weight, keep, 255, reduction, **kw), x, f"emulated CUDA {case}")
    assert blocks == (THREAD_PER_POSITION, THREAD_PER_POSITION), blocks


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_kdim_probability_targets_and_bf16(emu, dtype):
    x = make_logits((3, 9, 50), dtype)
    y = torch.softmax(torch.randn(3, 9, 50, dtype=torch.float64) * 2, 1).to(dtype)
    out, grad, blocks = emulated_loss(emu, x, y, kind="ce_prob", reduction="sum", eps=0.1, z_loss=1e-3)

    def ref(x64):
        rows = F.cross_entropy(x64, y.double(), label_smoothing=0.1, reduction="none")
        return (rows + 1e-3 * torch.logsumexp(x64, 1) ** 2).sum()

    _check(out, grad, ref, x, "emulated CUDA soft targets")
    assert blocks == (THREAD_PER_POSITION, THREAD_PER_POSITION), blocks


def test_kdim_focal(emu):
    x = make_logits((2, 11, 40))
    t = torch.randint(0, 11, (2, 40))
    t.view(-1)[::7] = 255
    alpha = torch.rand(11, dtype=torch.float64).add(0.25).float()
    counted = t != 255
    out, grad, blocks = emulated_loss(emu, x, t, alpha, kind="focal", reduction="mean", ignore_index=255, gamma=2.0)

    def ref(x64):
        t_safe = torch.where(counted, t, 0)
        logp_t = F.log_softmax(x64, 1).gather(1, t_safe.unsqueeze(1)).squeeze(1)
        rows = -alpha.double()[t_safe] * (1 - logp_t.exp()) ** 2 * logp_t
        return reduce_rows(torch.where(counted, rows, 0.0), counted.double(), "mean")

    _check(out, grad, ref, x, "emulated CUDA focal")
    assert blocks == (THREAD_PER_POSITION, THREAD_PER_POSITION), blocks


@pytest.mark.parametrize(
    "name, shape, layout, expected",
    [
        ("channels_last", (2, 40, 35), "classes_contiguous", WARP_PER_ROW),
        ("long rows, few", (2, 300, 35), "nchw", WARP_PER_ROW),
        ("long rows, many", (1, 257, 65536), "nchw", THREAD_PER_POSITION),
        ("3 positions", (40, 40, 3), "nchw", WARP_PER_ROW),
    ],
)
def test_layout_choice(emu, name, shape, layout, expected):
    """A thread per position for NCHW when the rows are short (above) or many enough to fill
    the GPU (65536: a 256 x 256 map); a warp per row for contiguous classes (channels_last
    viewed as (N, C, H*W)), for a few long rows, and for fewer than 4 positions."""
    x = make_logits(shape)
    if layout == "classes_contiguous":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # strides (D * C, 1, C)
    t = torch.randint(0, shape[1], (shape[0], shape[2]))
    t.view(-1)[::5] = -100
    out, grad, blocks = emulated_loss(emu, x, t, reduction="mean")
    _check(out, grad, lambda v: F.cross_entropy(v, t), x, f"emulated CUDA, {name}")
    assert blocks == (expected, expected), blocks


def test_deterministic(emu):
    """Same input, same bits: the emulated threads run concurrently, the sums in a fixed order."""
    x = make_logits((2, 40, 300))
    t = torch.randint(0, 40, (2, 300))
    first = emulated_loss(emu, x, t, reduction="mean", eps=0.1)
    second = emulated_loss(emu, x, t, reduction="mean", eps=0.1)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


# ----------------------------------------------------------------------------- binary losses
@pytest.fixture(scope="module")
def emu_binary(tmp_path_factory):
    emu = _emulator(tmp_path_factory.mktemp("cuda_emu_binary"), "binary_losses")
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    strides, f64s, out_int = ctypes.POINTER(i64), ctypes.POINTER(ctypes.c_double), ctypes.POINTER(i32)
    emu.emu_binary_fwd.argtypes = [ptr, ptr, i32, ptr, ptr, ptr, ptr, strides, i64, i64, i32, i32, i32, f64s, out_int]
    emu.emu_binary_bwd.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, ptr, strides, i64, i64, i32, i32, i32, f64s, out_int]
    return emu


BYTE_TARGETS = {"bool": torch.bool, "uint8": torch.uint8}


def emulated_binary(emu, x, y, weight=None, pos_weight=None, reduction="mean", gamma=0.0, alpha=-1.0):
    """binary_fwd, then binary_bwd, of the CUDA kernels on (M, L) x and target y (the input's
    dtype, or bool / uint8 read as it is; weight, pos_weight (M, L) in the accumulation dtype):
    (loss, the forward's gradient for grad_output 1 (mean / sum; None for none), binary_bwd's
    gradient for grad_output_for(loss), (the forward's, the backward's) vector width)."""
    M, L = x.shape
    red = REDUCTION[reduction]
    byte = y.dtype in (torch.bool, torch.uint8)
    assert byte or y.dtype == x.dtype
    out = torch.empty((M, L) if red == 0 else (), dtype=x.dtype)
    fwd_grad = None if red == 0 else torch.empty_like(x)
    scalars = (ctypes.c_double * 2)(gamma, alpha)
    fwd_vec, bwd_vec = ctypes.c_int(0), ctypes.c_int(0)
    ops = ((x, 2), (y, 2), (weight, 2), (pos_weight, 2))
    rc = emu.emu_binary_fwd(_p(x), _p(y), int(byte), _p(weight), _p(pos_weight), _p(fwd_grad), _p(out),
                            _strides(*ops, (fwd_grad, 2), (None, 2)), M, L, DTYPE[x.dtype], DTYPE[x.dtype], red,
                            scalars, ctypes.byref(fwd_vec))  # fmt: skip
    assert rc == 0
    go = grad_output_for(out)
    grad = torch.full_like(x, float("nan"))
    rc = emu.emu_binary_bwd(_p(go), _p(x), _p(y), int(byte), _p(weight), _p(pos_weight), _p(grad),
                            _strides(*ops, (grad, 2), (go if red == 0 else None, 2)), M, L, DTYPE[x.dtype],
                            DTYPE[go.dtype], red, scalars, ctypes.byref(bwd_vec))  # fmt: skip
    assert rc == 0
    return out, fwd_grad, grad, (fwd_vec.value, bwd_vec.value)


def binary_reference(y, weight=None, pos_weight=None, reduction="mean", gamma=0.0, alpha=-1.0):
    """x64 -> loss in float64: PyTorch's BCE-with-logits (gamma 0, no alpha), else torchvision's
    sigmoid focal loss formula."""
    y64 = y.double()
    w64 = None if weight is None else weight.double()
    pw64 = None if pos_weight is None else pos_weight.double()

    def ref(x64):
        if gamma == 0.0 and alpha < 0:
            return F.binary_cross_entropy_with_logits(x64, y64, w64, reduction=reduction, pos_weight=pw64)
        p = torch.sigmoid(x64)
        p_t = p * y64 + (1 - p) * (1 - y64)
        loss = F.binary_cross_entropy_with_logits(x64, y64, reduction="none") * (1 - p_t) ** gamma
        if alpha >= 0:
            loss = (alpha * y64 + (1 - alpha) * (1 - y64)) * loss
        return loss if reduction == "none" else loss.mean() if reduction == "mean" else loss.sum()

    return ref


def _check_binary(emu, x, y, what, weight=None, pos_weight=None, reduction="mean", gamma=0.0, alpha=-1.0):
    """The byte target y on x: loss and both gradients against the float64 reference, and bit
    for bit those of the same target converted to the input's dtype (contiguous, so possibly
    another vector width). Returns the byte target's vector widths (forward, backward)."""
    kw = {"weight": weight, "pos_weight": pos_weight, "reduction": reduction, "gamma": gamma, "alpha": alpha}
    out, fwd_grad, grad, vecs = emulated_binary(emu, x, y, **kw)
    ref = binary_reference(y, **kw)
    _check(out, grad, ref, x, what)
    if fwd_grad is not None:
        x64 = x.detach().double().requires_grad_(True)
        ref(x64).backward()
        check_close(fwd_grad, x64.grad, x.dtype, f"{what} forward's gradient", grad=True)
    # the same arithmetic as a float target: identical bits (0 / 1 are exact in every dtype)
    as_float = emulated_binary(emu, x, y.to(x.dtype), **kw)
    for name, a, b in (("loss", out, as_float[0]), ("forward's gradient", fwd_grad, as_float[1]),
                       ("gradient", grad, as_float[2])):  # fmt: skip
        assert a is None or torch.equal(a, b), f"{what}: {name} differs from the float target's"
    return vecs


BINARY_LOSS_CASES = {
    "bce weight pos_weight": {"weight": True, "pos_weight": True},
    "focal gamma 2 alpha": {"gamma": 2.0, "alpha": 0.25},
    "focal gamma 1.5": {"gamma": 1.5},
}


@pytest.mark.parametrize("case", BINARY_LOSS_CASES)
@pytest.mark.parametrize("target", BYTE_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_binary_byte_targets(emu_binary, dtype, target, case):
    """bool / uint8 label maps read as they are, every reduction: contiguous, so the whole
    (6, 40) view is one row, loaded 16 bytes of x and VEC bytes of target at a time."""
    opts = BINARY_LOSS_CASES[case]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_logits((6, 40), dtype)
    y = (torch.rand(6, 40) < 0.3).to(BYTE_TARGETS[target])
    w = torch.rand(1, 40, dtype=torch.float64).add(0.25).to(acc).expand(6, 40) if opts.get("weight") else None
    pw = torch.rand(1, 40, dtype=torch.float64).add(0.5).to(acc).expand(6, 40) if opts.get("pos_weight") else None
    kw = {k: opts[k] for k in ("gamma", "alpha") if k in opts}
    for reduction in REDUCTIONS:
        vecs = _check_binary(emu_binary, x, y, f"emulated CUDA {case} {target} {reduction}", w, pw, reduction, **kw)
        assert vecs == (16 // x.element_size(),) * 2, vecs


@pytest.mark.parametrize(
    "layout, vectorized",
    [
        ("rows", True),  # a column slice: rows apart by a multiple of VEC bytes, base aligned
        ("offset by VEC", True),  # base VEC bytes into the allocation: still VEC-byte aligned
        ("offset by 1", False),  # base at an odd byte: no VEC-byte pack is aligned
        ("row stride off", False),  # rows L + 3 bytes apart
        ("transposed", False),  # column stride != 1
    ],
)
@pytest.mark.parametrize("target", BYTE_TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_binary_byte_target_layouts(emu_binary, dtype, target, layout, vectorized):
    """A strided label map: vectorized only when every VEC-byte pack of the target is aligned
    (the vector width is the input's 16 / sizeof(dtype) elements; a 1-byte target's packs are
    VEC bytes, not 16), else one element at a time; the same values either way."""
    M, L = 5, 48
    vec = 16 // torch.empty((), dtype=dtype).element_size()
    x = make_logits((M, L), dtype)
    labels = torch.rand(M, L + 16) < 0.4
    if layout == "rows":
        y = labels.to(BYTE_TARGETS[target])[:, :L]
    elif layout == "offset by VEC":
        y = labels.to(BYTE_TARGETS[target])[:, vec : vec + L]
    elif layout == "offset by 1":
        y = labels.to(BYTE_TARGETS[target])[:, 1 : 1 + L]
    elif layout == "row stride off":
        y = labels[:, : L + 3].contiguous().to(BYTE_TARGETS[target])[:, :L]
    else:
        y = labels[:, :L].to(BYTE_TARGETS[target]).t().contiguous().t()
    assert (y.data_ptr() % vec != 0) == (layout == "offset by 1"), (layout, y.data_ptr())
    for reduction in ("none", "mean"):
        vecs = _check_binary(emu_binary, x, y, f"emulated CUDA {layout} {target} {reduction}", reduction=reduction,
                             gamma=2.0, alpha=0.25)  # fmt: skip
        assert vecs == ((vec, vec) if vectorized else (1, 1)), f"{layout}: vector widths {vecs}"
