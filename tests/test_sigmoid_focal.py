"""fusedloss.sigmoid_focal_loss against torchvision.ops.sigmoid_focal_loss's formula, written
out in float64 (torchvision is not a dependency), rules 12 and 13."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    REDUCTIONS, check_against, check_close, check_deterministic, check_unmodified, gradcheck,
    infinite_logit_cases, make_logits, snapshot, value_and_grad,
)

N, C = 6, 7
GAMMAS = [0.0, 0.5, 2.0]


def torchvision_reference(x, y, alpha=0.25, gamma=2.0, reduction="none", weight=None, pos_weight=None):
    """torchvision.ops.sigmoid_focal_loss, with our weight / pos_weight extras folded into the
    BCE term exactly as PyTorch's binary_cross_entropy_with_logits does."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, weight, reduction="none", pos_weight=pos_weight)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_torchvision(backend, dtype, reduction, gamma, alpha):
    x = make_logits((N, C), dtype)
    y = (torch.rand(N, C) > 0.6).to(dtype)
    check_against(
        lambda x: fusedloss.sigmoid_focal_loss(x, y, alpha, gamma, reduction, backend=backend),
        lambda x: torchvision_reference(x, y.double(), alpha, gamma, reduction),
        x, f"gamma={gamma} alpha={alpha} {reduction}",
    )


EXTRAS = {
    "w(C,)": ((C,), None),
    "w(1,C) pw(C,)": ((1, C), (C,)),
    "w(N,C) pw(1,C)": ((N, C), (1, C)),
    "w()": ((), None),
}


@pytest.mark.parametrize("case", EXTRAS.values(), ids=EXTRAS.keys())
def test_weight_and_pos_weight(backend, case):
    x = make_logits((N, C))
    y = torch.rand(N, C)  # soft targets
    w, pw = (None if s is None else torch.rand(s, dtype=torch.float64).add(0.5).float() for s in case)
    check_against(
        lambda x: fusedloss.sigmoid_focal_loss(x, y, 0.25, 2.0, "mean", weight=w, pos_weight=pw, backend=backend),
        lambda x: torchvision_reference(
            x, y.double(), 0.25, 2.0, "mean", None if w is None else w.double(), None if pw is None else pw.double()
        ),
        x, f"{case}",
    )


def test_bool_target_and_kdim(backend):
    x = make_logits((2, 3, 4, 5))
    y = torch.rand(2, 3, 4, 5) > 0.7
    check_against(
        lambda x: fusedloss.sigmoid_focal_loss(x, y, reduction="sum", backend=backend),
        lambda x: torchvision_reference(x, y.double(), reduction="sum"),
        x, "bool target, 4-D",
    )


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_infinite_logits(backend, gamma):
    """Rule 12 for focal: at infinite x the BCE limits times alpha_t * q^gamma with q = 1 - p_t
    (1 - y at +inf, y at -inf)."""
    x, y, w, pw, bce_loss, bce_grad = infinite_logit_cases()
    alpha = 0.25
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    factor = alpha_t * torch.where(x > 0, 1 - y, y) ** gamma
    leaf = x.clone().requires_grad_()
    out = fusedloss.sigmoid_focal_loss(leaf, y, alpha, gamma, weight=w, pos_weight=pw, backend=backend)
    out.backward(torch.ones_like(out))
    check_close(out, torch.where(bce_loss == 0, 0.0, factor * bce_loss), torch.float64, "loss at infinite logits")
    check_close(leaf.grad, factor * bce_grad, torch.float64, "gradient at infinite logits", grad=True)


@pytest.mark.parametrize("gamma", [0.25, 0.5])
def test_saturated_logits_finite_gradient(backend, gamma):
    """Rule 13: 0 < gamma < 1 at saturated logits, where autograd through torchvision's
    formula gives NaN (q^(gamma-1) * 0)."""
    x = torch.tensor([[800.0, -800.0, 30.0, -30.0, 1.5]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64)
    out, grad = value_and_grad(lambda x: fusedloss.sigmoid_focal_loss(x, y, 0.25, gamma, backend=backend), x)
    _, naive = value_and_grad(lambda x: torchvision_reference(x, y, 0.25, gamma), x)
    assert torch.isnan(naive[0, :2]).all(), "the reference is expected to fail here (else this test proves nothing)"
    assert (grad[0, :2] == 0).all() and (out[0, :2] == 0).all(), (out, grad)
    check_close(grad[0, 2:], naive[0, 2:], torch.float64, "unsaturated gradient", grad=True)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gradcheck(backend, gamma):
    x = make_logits((3, 4), torch.float64).requires_grad_()
    y = torch.rand(3, 4, dtype=torch.float64)
    w, pw = torch.rand(4, dtype=torch.float64) + 0.5, torch.rand(4, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        fn = lambda x: fusedloss.sigmoid_focal_loss(x, y, 0.25, gamma, reduction, weight=w, pos_weight=pw, backend=backend)
        gradcheck(fn, x, backend)


def test_caller_tensors_unmodified_and_deterministic(backend):
    x = make_logits((N, C))
    y, w = torch.rand(N, C), torch.rand(N, C)
    leaf = x.clone().requires_grad_()
    before = snapshot(leaf, y, w)
    fusedloss.sigmoid_focal_loss(leaf, y, reduction="mean", weight=w, backend=backend).backward()
    check_unmodified(before, leaf, y, w)
    check_deterministic(lambda x: fusedloss.sigmoid_focal_loss(x, y, weight=w, backend=backend), x)
