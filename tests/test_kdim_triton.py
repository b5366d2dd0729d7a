"""The Triton K-dim kernels (fusedloss/triton: `_*_kdim_kernel`), run by the interpreter:
(N, C, d1..dK) logits whose positions are contiguous (NCHW) get one program per block of
positions, the classes looped (coalesced on a GPU); contiguous classes (2-D input,
channels_last) keep the row kernels. Which kernel ran is recorded here, so the comparisons
below are known to exercise the K-dim path, against PyTorch's own formulas in float64, with
the shipped tiles and with tiny ones (several class steps and position blocks, partial ones).
"""
import contextlib
import importlib

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    REDUCTIONS, check_against, check_exact, class_masked_ce_reference, make_logits, reduce_rows, value_and_grad,
)
from fusedloss.triton import _launch

# the launcher modules (the package's own names ce_fwd, softmax_bwd, ... are its custom ops)
cross_entropy, focal, softmax_bwd = (
    importlib.import_module(f"fusedloss.triton.{m}") for m in ("cross_entropy", "focal", "softmax_bwd")
)
KDIM = {
    cross_entropy: ("_ce_fwd_kdim_kernel", "_ce_prob_fwd_kdim_kernel", "_ce_fwd_kernel", "_ce_prob_fwd_kernel"),
    focal: ("_focal_fwd_kdim_kernel", "_focal_fwd_kernel"),
    softmax_bwd: ("_softmax_bwd_kdim_kernel", "_softmax_prob_bwd_kdim_kernel", "_softmax_bwd_kernel",
                  "_softmax_prob_bwd_kernel"),
}  # fmt: skip
# (N, C, H, W): D = 35 takes the wide-map tile (D > 32), D = 12 the short-map one; tiny tiles
# (4 classes x 8 positions, 2 class groups) split both into several class steps and position
# blocks, the last ones partial.
SHAPES = {"35pos": (2, 7, 5, 7), "12pos": (3, 7, 3, 4)}
TILES = {"shipped": contextlib.nullcontext, "tiny": _launch.small_blocks}


class _Recorder:
    """Stands in for a @triton.jit kernel in its module: records the launch, then launches."""

    def __init__(self, kernel, name, log):
        self.kernel, self.name, self.log = kernel, name, log

    def __getitem__(self, grid):
        self.log.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launched(monkeypatch):
    """The names of the softmax-loss kernels launched during the test, in order."""
    log = []
    for module, names in KDIM.items():
        for name in names:
            monkeypatch.setattr(module, name, _Recorder(getattr(module, name), name, log))
    return log


CE_CASES = {
    "plain": {},
    "weight+smoothing+ignore255": {"weight": True, "label_smoothing": 0.1},
    "mask+zloss+softcap": {"mask": True, "z_loss": 1e-3, "softcap": 4.0},
    "all": {"weight": True, "mask": True, "label_smoothing": 0.05, "z_loss": 1e-3, "softcap": 6.0},
}


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", CE_CASES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_every_option(launched, tiles, shape, case, reduction):
    opts = CE_CASES[case]
    n, c = SHAPES[shape][:2]
    x = make_logits(SHAPES[shape])
    keep = [k for k in range(c) if not (opts.get("mask") and k == 2)]
    t = torch.tensor(keep)[torch.randint(0, len(keep), (n,) + SHAPES[shape][2:])]
    t.view(-1)[::4] = 255  # segmentation's "void" label
    t[0, 0] = 255  # with the first rows: a whole position block ignored under tiny tiles
    weight = torch.rand(c, dtype=torch.float64).add(0.5).float() if opts.get("weight") else None
    mask = torch.tensor([k in keep for k in range(c)]).view(c, 1, 1) if opts.get("mask") else None
    kw = {k: v for k, v in opts.items() if k in ("label_smoothing", "z_loss", "softcap")}
    with TILES[tiles]():
        check_against(
            lambda v: fusedloss.cross_entropy(v, t, weight, ignore_index=255, reduction=reduction, mask=mask,
                                              backend="triton", **kw),
            class_masked_ce_reference(t, weight, keep, 255, reduction, eps=kw.get("label_smoothing", 0.0),
                                      z_loss=kw.get("z_loss", 0.0), softcap=kw.get("softcap", 0.0)),
            x, f"K-dim CE {case} {reduction}",
        )  # fmt: skip
    assert launched == ["_ce_fwd_kdim_kernel", "_softmax_bwd_kdim_kernel"], launched


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_probability_targets(launched, tiles, dtype):
    """Soft targets (a class weight, label smoothing, z-loss): the probability-target K-dim
    forward (one class per group and step) and backward."""
    x = make_logits(SHAPES["35pos"], dtype)
    y = torch.softmax(torch.randn(SHAPES["35pos"], dtype=torch.float64) * 2, 1).to(dtype)
    y[1, :, 2, 3] = 0.0
    y[1, 4, 2, 3] = 1.0  # a one-hot row: 0 log 0 terms
    w = torch.rand(7, dtype=torch.float64).add(0.5).to(dtype)

    def ref(x64):
        rows = F.cross_entropy(x64, y.double(), w.double(), label_smoothing=0.1, reduction="none")
        return (rows + 1e-3 * torch.logsumexp(x64, 1) ** 2).sum()

    with TILES[tiles]():
        check_against(
            lambda v: fusedloss.cross_entropy(v, y, w, label_smoothing=0.1, z_loss=1e-3, reduction="sum", backend="triton"),
            ref, x, "K-dim soft targets",
        )  # fmt: skip
    assert launched == ["_ce_prob_fwd_kdim_kernel", "_softmax_prob_bwd_kdim_kernel"], launched


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal(launched, tiles, reduction):
    """Softmax focal loss (alpha per class, gamma 2, ignore_index 255) from its formula."""
    x = make_logits(SHAPES["35pos"])
    t = torch.randint(0, 7, (2, 5, 7))
    t.view(-1)[::5] = 255
    alpha = torch.rand(7, dtype=torch.float64).add(0.25).float()
    counted = t != 255

    def ref(x64):
        t_safe = torch.where(counted, t, 0)
        logp_t = F.log_softmax(x64, 1).gather(1, t_safe.unsqueeze(1)).squeeze(1)
        rows = -alpha.double()[t_safe] * (1 - logp_t.exp()) ** 2 * logp_t
        return reduce_rows(torch.where(counted, rows, 0.0), counted.double(), reduction)

    with TILES[tiles]():
        check_against(
            lambda v: fusedloss.focal_loss(v, t, gamma=2.0, alpha=alpha, ignore_index=255, reduction=reduction,
                                           backend="triton"),
            ref, x, f"K-dim focal {reduction}",
        )  # fmt: skip
    assert launched == ["_focal_fwd_kdim_kernel", "_softmax_bwd_kdim_kernel"], launched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_segmentation_map(launched, dtype):
    """A small segmentation map (4 x 19 x 16 x 24, ignore_index 255 on a quarter of the
    pixels and on whole image rows): the shipped wide-map tile with several position blocks."""
    x = make_logits((4, 19, 16, 24), dtype)
    t = torch.randint(0, 19, (4, 16, 24))
    t[torch.rand(4, 16, 24) < 0.25] = 255
    t[1, :6] = 255
    check_against(
        lambda v: fusedloss.cross_entropy(v, t, ignore_index=255, backend="triton"),
        lambda v: F.cross_entropy(v, t, ignore_index=255), x, "segmentation map",
    )  # fmt: skip
    assert launched == ["_ce_fwd_kdim_kernel", "_softmax_bwd_kdim_kernel"], launched


@pytest.mark.parametrize(
    "layout, shape, expected",
    [
        ("nchw", (2, 5, 3, 4), ["_ce_fwd_kdim_kernel", "_softmax_bwd_kdim_kernel"]),
        ("nchw", (4, 5, 3), ["_ce_fwd_kernel", "_softmax_bwd_kernel"]),
        ("channels_last", (2, 5, 3, 4), ["_ce_fwd_kernel", "_softmax_bwd_kernel"]),
        ("2d", (6, 5), ["_ce_fwd_kernel", "_softmax_bwd_kernel"]),
    ],
    ids=["nchw", "nchw-3-positions", "channels_last", "2d"],
)
def test_dispatch_follows_the_class_stride(launched, layout, shape, expected):
    """Positions the unit stride (NCHW, D >= 4): the K-dim kernels; classes the unit stride
    (channels_last, (N, C) rows) or fewer positions (a row's classes 2-3 elements apart share
    their sectors anyway): the row kernels."""
    x = make_logits(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 5, (shape[0],) + shape[2:])
    out, grad = value_and_grad(lambda v: fusedloss.cross_entropy(v, t, backend="triton"), x)
    exp, exp_grad = value_and_grad(lambda v: F.cross_entropy(v, t), x.double())
    assert torch.allclose(out.double(), exp, rtol=1e-5) and torch.allclose(grad.double(), exp_grad, atol=1e-6)
    assert launched == expected, launched


def test_inplace_backward_and_deterministic(launched):
    """inplace_backward writes the gradient over the logits (each tile read before it is
    written), and two runs give the same bits."""
    x = make_logits((2, 7, 5, 7))
    t = torch.randint(0, 7, (2, 5, 7))
    kw = dict(label_smoothing=0.1, backend="triton")
    out, grad = value_and_grad(lambda v: fusedloss.cross_entropy(v, t, **kw), x)
    out2, grad2 = value_and_grad(lambda v: fusedloss.cross_entropy(v, t, **kw), x)
    check_exact(out2, out, "second run's loss")
    check_exact(grad2, grad, "second run's gradient")
    leaf = x.clone().requires_grad_(True)
    y = leaf * 1.0  # a non-leaf the gradient may overwrite
    fusedloss.cross_entropy(y, t, inplace_backward=True, **kw).backward(torch.tensor(0.75))
    check_exact(leaf.grad, grad, "inplace_backward gradient")
    assert launched.count("_softmax_bwd_kdim_kernel") == 3, launched
