"""The CUDA softmax kernels (csrc/cuda/softmax_losses.cu) run on the CPU: the .cu compiled by
the host compiler against tests/cuda_emu/ (one std::thread per CUDA thread, block barriers,
warp shuffles through the block; emu_device.h), its `<<<...>>>` launches rewritten into calls
of the emulator, driven through the launch interface of csrc/cuda/softmax_launch.h (ctypes).
No GPU and no CUDA toolkit needed; tests/test_nvcc.py compiles the same file for sm_80 / sm_90.

What it checks, against PyTorch's own formulas in float64: the K-dim layout (a block of 128
consecutive positions, a thread per position looping over its classes: coalesced on a GPU)
for every option and reduction, probability targets, focal, bfloat16; the layout choice
(thread per position for NCHW with short rows or with rows enough to fill the GPU, a warp per
row for contiguous classes and for a few long rows), from the launches the emulator records.
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


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda_emu")
    (d / "cuda").mkdir()
    (d / "cuda" / "kernel_common.cuh").write_text(_emulated(ROOT / "csrc" / "cuda" / "kernel_common.cuh"))
    (d / "softmax_losses_emu.cpp").write_text(_emulated(ROOT / "csrc" / "cuda" / "softmax_losses.cu"))
    lib = d / "softmax_emu.so"
    cmd = [CXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-w", "-pthread", f"-I{d}", f"-I{EMU}", f"-I{ROOT / 'csrc'}",
           str(EMU / "softmax_api.cpp"), "-o", str(lib)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr[-4000:]}"
    emu = ctypes.CDLL(str(lib))
    ptr, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    strides = ctypes.POINTER(i64)
    emu.emu_softmax_fwd.argtypes = [ptr] * 7 + [strides, i64, i64, i64, i32, i32, i32, i32, i64, ctypes.POINTER(f64)]
    emu.emu_softmax_bwd.argtypes = [ptr, ptr, ptr, i32, ptr, ptr, ptr, ptr, ptr, strides, i64, i64, i64, i32, i32, i32, f64]
    emu.emu_launches.argtypes = [strides, i32]
    emu.emu_set_sms(1)  # a one-SM "device": 16 resident blocks, so the grid-stride loops loop
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
