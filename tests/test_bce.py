"""fusedloss.binary_cross_entropy_with_logits against PyTorch's in float64 (SPEC 1, 2, rule 12)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    REDUCTIONS, check_against, check_close, check_deterministic, check_unmodified, gradcheck,
    infinite_logit_cases, make_logits, snapshot,
)

N, C = 6, 7


def make_binary(shape, dtype=torch.float32):
    return make_logits(shape, dtype), torch.rand(shape, dtype=torch.float64).to(dtype)


def positive(shape, dtype=torch.float32):
    return (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype)


OPTIONS = {
    "plain": (None, None),
    "weight": ((C,), None),
    "pos_weight": (None, (C,)),
    "both": ((N, C), (C,)),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_torch(backend, dtype, reduction, opts):
    x, y = make_binary((N, C), dtype)
    w, pw = (None if s is None else positive(s, dtype) for s in opts)
    check_against(
        lambda x: fusedloss.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw, backend=backend),
        lambda x: F.binary_cross_entropy_with_logits(
            x, y.double(), None if w is None else w.double(), reduction=reduction,
            pos_weight=None if pw is None else pw.double(),
        ),
        x, f"{reduction} {opts}",
    )


BROADCASTS = {
    "w(C,)": ((N, C), (C,), None),
    "w(1,C)": ((N, C), (1, C), None),
    "w(N,C)": ((N, C), (N, C), None),
    "w()": ((N, C), (), None),
    "pw(1,C)": ((N, C), None, (1, C)),
    "pw()": ((N, C), None, ()),
    "4d w(3,1,1) pw(5,)": ((2, 3, 4, 5), (3, 1, 1), (5,)),
    "unbatched": ((C,), (C,), (C,)),
}


@pytest.mark.parametrize("case", BROADCASTS.values(), ids=BROADCASTS.keys())
def test_broadcast_weights(backend, case):
    shape, wshape, pwshape = case
    x, y = make_binary(shape)
    w = None if wshape is None else positive(wshape)
    pw = None if pwshape is None else positive(pwshape)
    for reduction in ("none", "mean"):
        check_against(
            lambda x: fusedloss.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw, backend=backend),
            lambda x: F.binary_cross_entropy_with_logits(
                x, y.double(), None if w is None else w.double(), reduction=reduction,
                pos_weight=None if pw is None else pw.double(),
            ),
            x, f"{case} {reduction}",
        )


@pytest.mark.parametrize("kind", [torch.bool, torch.int64, torch.int32, torch.float16])
def test_target_dtypes(backend, kind):
    """bool and integer targets are read as 0/1; a float target of another dtype is accepted."""
    x = make_logits((N, C))
    y = torch.rand(N, C) > 0.5
    target = y.to(kind)
    check_against(
        lambda x: fusedloss.binary_cross_entropy_with_logits(x, target, reduction="sum", backend=backend),
        lambda x: F.binary_cross_entropy_with_logits(x, y.double(), reduction="sum"),
        x, f"{kind} target",
    )


def test_noncontiguous(backend):
    base, ybase = make_binary((C, 2 * N))
    y = ybase.t()[::2]
    pw = positive((2 * C,))[::2]
    check_against(
        lambda b: fusedloss.binary_cross_entropy_with_logits(b.t()[::2], y, reduction="none", pos_weight=pw, backend=backend),
        lambda b: F.binary_cross_entropy_with_logits(b.t()[::2], y.double(), reduction="none", pos_weight=pw.double()),
        base, "strided input, target, pos_weight",
    )


def test_infinite_logits(backend):
    """Rule 12: limits at +-inf (PyTorch: NaN), weight 0 at infinite logits."""
    x, y, w, pw, loss, grad = infinite_logit_cases()
    leaf = x.clone().requires_grad_()
    out = fusedloss.binary_cross_entropy_with_logits(leaf, y, w, reduction="none", pos_weight=pw, backend=backend)
    out.backward(torch.ones_like(out))
    check_close(out, loss, torch.float64, "loss at infinite logits")
    check_close(leaf.grad, grad, torch.float64, "gradient at infinite logits", grad=True)
    total = fusedloss.binary_cross_entropy_with_logits(x, y, w, reduction="sum", pos_weight=pw, backend=backend)
    assert total.item() == float("inf"), total


def test_gradcheck(backend):
    x, y = make_binary((3, 4), torch.float64)
    x.requires_grad_()
    w, pw = positive((3, 1), torch.float64), positive((4,), torch.float64)
    for reduction in ("none", "mean"):
        fn = lambda x: fusedloss.binary_cross_entropy_with_logits(x, y, w, reduction=reduction, pos_weight=pw, backend=backend)
        gradcheck(fn, x, backend)


def test_caller_tensors_unmodified_and_deterministic(backend):
    x, y = make_binary((N, C))
    w, pw = positive((C,)), positive((C,))
    leaf = x.clone().requires_grad_()
    before = snapshot(leaf, y, w, pw)
    fusedloss.binary_cross_entropy_with_logits(leaf, y, w, pos_weight=pw, backend=backend).backward()
    check_unmodified(before, leaf, y, w, pw)
    check_deterministic(lambda x: fusedloss.binary_cross_entropy_with_logits(x, y, w, pos_weight=pw, backend=backend), x)
