"""fusedloss.focal_loss (multi-class softmax focal) against its published formula in float64:
row loss = -alpha_t * (1 - p_t)^gamma * log p_t, written with log_softmax / gather."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    INF, NAN, REDUCTIONS, allowed_rows_reference, check_against, check_close, check_deterministic,
    check_out_of_range, check_unmodified, gradcheck, make_logits, make_target, reduce_rows,
    snapshot, value_and_grad,
)

N, C = 6, 9
GAMMAS = [0.0, 0.5, 2.0]


def focal_reference(x64, t, gamma, alpha=None, ignore_index=-100, reduction="mean"):
    """Softmax focal loss in float64 from the formula; class dim 1, any trailing dims."""
    counted = t != ignore_index
    t_safe = torch.where(counted, t, 0)
    logp_t = F.log_softmax(x64, 1).gather(1, t_safe.unsqueeze(1)).squeeze(1)
    if alpha is None:
        alpha_t = torch.ones_like(logp_t)
    elif isinstance(alpha, float):
        alpha_t = torch.full_like(logp_t, alpha)
    else:
        alpha_t = alpha.double()[t_safe]
    rows = -alpha_t * (1 - logp_t.exp()) ** gamma * logp_t
    rows = torch.where(counted, rows, 0.0)
    return reduce_rows(rows, counted.double(), reduction)


def alphas(kind):
    return {"none": None, "float": 0.25, "tensor": torch.rand(C) + 0.25}[kind]


@pytest.mark.parametrize("alpha", ["none", "float", "tensor"])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_matches_formula(backend, dtype, gamma, alpha):
    x, t, a = make_logits((N, C), dtype), make_target((N,), C), alphas(alpha)
    check_against(
        lambda x: fusedloss.focal_loss(x, t, gamma, a, backend=backend),
        lambda x: focal_reference(x, t, gamma, a),
        x, f"gamma={gamma} alpha={alpha}",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(N, C), (2, C, 3, 2), (C,)], ids=["2d", "kdim", "unbatched"])
def test_reductions_and_shapes(backend, reduction, shape):
    x = make_logits(shape)
    t = make_target(shape[:1] + shape[2:], C, ignore_index=-1) if len(shape) > 1 else torch.tensor(3)
    a = alphas("tensor")

    def ref(x64):
        if x64.dim() == 1:
            return focal_reference(x64[None], t[None], 2.0, a, -1, reduction).reshape(() if reduction == "none" else ())
        return focal_reference(x64, t, 2.0, a, -1, reduction)

    check_against(
        lambda x: fusedloss.focal_loss(x, t, 2.0, a, ignore_index=-1, reduction=reduction, backend=backend),
        ref, x, f"{shape} {reduction}",
    )


def test_gamma_zero_is_cross_entropy(backend):
    x, t = make_logits((N, C)), make_target((N,), C)
    for reduction in REDUCTIONS:
        check_against(
            lambda x: fusedloss.focal_loss(x, t, gamma=0.0, reduction=reduction, backend=backend),
            lambda x: F.cross_entropy(x, t, reduction=reduction),
            x, f"gamma=0 {reduction}",
        )


def test_noncontiguous_and_int32(backend):
    base = make_logits((C, N))
    t = make_target((2 * N,), C)[::2]
    check_against(
        lambda b: fusedloss.focal_loss(b.t(), t.int(), 0.5, backend=backend),
        lambda b: focal_reference(b.t(), t, 0.5),
        base, "transposed input, strided int32 target",
    )


@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
def test_saturated_logits_finite_gradient(backend, gamma):
    """p_t -> 1: (1 - p_t)^(gamma - 1) overflows for gamma < 1, the gradient must not."""
    x = torch.tensor([[60.0, 0.0, 0.0], [800.0, -3.0, 1.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    t = torch.tensor([0, 0, 2])
    out, grad = value_and_grad(lambda x: fusedloss.focal_loss(x, t, gamma, reduction="sum", backend=backend), x)
    assert torch.isfinite(grad).all(), grad
    assert grad[:2].abs().max() < 1e-12, f"saturated rows have loss and gradient ~0: {grad}"
    _, exp_grad = value_and_grad(lambda x: focal_reference(x[2:], t[2:], gamma, reduction="sum"), x)
    check_close(grad[2], exp_grad[2], torch.float64, "unsaturated row", grad=True)


# ----------------------------------------------------------------------------- -inf rules
@pytest.mark.parametrize("form", ["(C,)", "(N,C)"])
def test_mask(backend, form):
    x, t = make_logits((N, C)), make_target((N,), C)
    x[2, 4] = -INF
    mask = torch.rand(C) > 0.3 if form == "(C,)" else torch.rand(N, C) > 0.3
    allowed = mask.expand(N, C) & (x != -INF)
    t = torch.where(t == -100, t, torch.multinomial(allowed.double() + 1e-30, 1).squeeze(1))
    a = alphas("tensor")

    def ref(x64):
        row = lambda sub, st, cols: focal_reference(sub, st, 2.0, a[cols], reduction="none")
        losses, counted = allowed_rows_reference(row, x64, t, allowed)
        return reduce_rows(losses, counted.double(), "mean")

    check_against(lambda x: fusedloss.focal_loss(x, t, 2.0, a, mask=mask, backend=backend), ref, x, f"mask {form}")


def test_ignored_empty_nan_rows(backend):
    """Rules 2, 3, 6, 8 for focal loss."""
    x = make_logits((5, C))
    x[1, 0], x[2, 1], x[3] = NAN, INF, -INF
    t = torch.tensor([1, -100, -100, 2, 5])  # row 3 is empty (counted as nothing)
    out, grad = value_and_grad(lambda x: fusedloss.focal_loss(x, t, 0.5, backend=backend), x)
    assert (grad[1:4] == 0).all(), grad
    exp, exp_grad = value_and_grad(lambda x: focal_reference(x[[0, 4]], t[[0, 4]], 0.5), x.double())
    check_close(out, exp, torch.float32, "loss")
    check_close(grad, exp_grad, torch.float32, "gradient", grad=True)

    nothing, g = value_and_grad(lambda x: fusedloss.focal_loss(x[1:4], t[1:4], 0.5, backend=backend), x)
    assert nothing.item() == 0 and (g == 0).all(), (nothing, g)
    x[4, 3] = NAN
    assert torch.isnan(fusedloss.focal_loss(x, t, 0.5, backend=backend))


def test_masked_target(backend):
    """Rule 4: loss +inf, gradient alpha_t * (softmax - onehot)."""
    x = make_logits((2, 5), torch.float64)
    x[0, 1] = -INF
    t = torch.tensor([1, 3])
    a = torch.tensor([0.5, 0.8, 1.0, 1.2, 0.3], dtype=torch.float64)
    out, grad = value_and_grad(lambda x: fusedloss.focal_loss(x, t, 2.0, a, reduction="none", backend=backend), x)
    assert out[0].item() == INF and torch.isfinite(out[1]), out
    expected = 0.8 * (torch.softmax(x[0], 0) - F.one_hot(torch.tensor(1), 5)) * 0.25  # grad_output 0.25 on row 0
    check_close(grad[0], expected, torch.float64, "masked-target gradient", grad=True)


@pytest.mark.parametrize("gamma", GAMMAS)
def test_gradcheck(backend, gamma):
    x = make_logits((3, 5), torch.float64).requires_grad_()
    t = torch.tensor([0, -100, 4])
    a = torch.rand(5, dtype=torch.float64) + 0.5
    mask = torch.tensor([True, True, False, True, True])
    for reduction in ("none", "mean"):
        fn = lambda x: fusedloss.focal_loss(x, t, gamma, a, reduction=reduction, mask=mask, backend=backend)
        gradcheck(fn, x, backend)


def test_out_of_range_target(backend):
    check_out_of_range(lambda x, t: fusedloss.focal_loss(x, t, reduction="none", backend=backend), backend, C)


def test_caller_tensors_unmodified_and_deterministic(backend):
    x, t, a = make_logits((N, C)), make_target((N,), C), alphas("tensor")
    mask = torch.rand(N, C) > 0.2
    leaf = x.clone().requires_grad_()
    before = snapshot(leaf, t, a, mask)
    fusedloss.focal_loss(leaf, t, 2.0, a, mask=mask, backend=backend).backward()
    check_unmodified(before, leaf, t, a, mask)
    check_deterministic(lambda x: fusedloss.focal_loss(x, t, 2.0, a, mask=mask, backend=backend), x)


def test_zero_alpha_at_masked_target(backend):
    """alpha[t] = 0 zeroes the row's term even where -log p_t is +inf (masked target),
    as weight[t] = 0 does for cross-entropy: loss 0, not 0 * inf."""
    x = torch.tensor([[0.5, -INF, 1.0], [0.2, 0.1, -0.3]], dtype=torch.float64)
    t = torch.tensor([1, 2])
    a = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    out = fusedloss.focal_loss(x, t, 2.0, a, reduction="none", backend=backend)
    logp = torch.log_softmax(x[1], 0)[2]
    expected = torch.stack([torch.zeros((), dtype=torch.float64), -(1 - logp.exp()) ** 2 * logp])
    check_close(out, expected, torch.float64, "focal loss with alpha[t] = 0 at a masked target")
