"""One answer on every backend, and PyTorch's answer wherever PyTorch has one.

Each test runs on every backend (conftest's `backend` fixture: torch, cpu, triton) and
checks that backend against PyTorch's own function evaluated in float64 on the rounded
input (SPEC section 5 tolerances), or against the documented answer where fusedloss
deliberately differs (README "Where fusedloss differs from PyTorch"); so the backends agree
with each other through the reference. Covered: confident rows with offset logits (sums
that cancel unless taken relative to the row max), NaN with a zero class weight / alpha
(rule 8), negative and cancelling class weights (rule 6), dtype promotion, empty shapes,
softcap=inf, bitwise determinism.
"""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    NAN, REDUCTIONS, check_against, check_close, check_deterministic, check_exact, grad_output_for, make_logits,
    make_target, reference, value_and_grad,
)

C_CONFIDENT = 3001  # a vocabulary-sized row with a tail: ~0.2 s a call in the triton interpreter


def _confident_logits(n, c, target, offset, dtype, margin=15.0):
    """Confident rows: the target's logit `margin` above the others (~N(0, 1)), every logit
    shifted by `offset` (the row max is ~offset + margin), drawn in float64, rounded to dtype."""
    x = torch.randn(n, c, dtype=torch.float64)
    x[torch.arange(n), target] = margin
    return (x + offset).to(dtype)


def _soft_confident_target(n, c, target, dtype, p=0.999):
    """Probability p on the target class, 1 - p spread evenly over the others."""
    y = torch.full((n, c), (1 - p) / (c - 1), dtype=torch.float64)
    y[torch.arange(n), target] = p
    return y.to(dtype)


# ----------------------------------------------------------------------------- confident rows
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("offset", [30.0, 300.0], ids=["offset30", "offset300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_confident_soft_targets(backend, dtype, offset, eps, weighted):
    """Probability target 0.999 on a class the logits favour by 15, the rest spread; logits
    offset by 30 / 300: the loss (~0.02) is a small difference of terms ~offset, exact only
    when the sums are taken relative to the row max (SPEC section 1). Loss ("none", "mean")
    and gradient against PyTorch in float64, on every backend."""
    n = 3
    t = torch.randint(0, C_CONFIDENT, (n,))
    x = _confident_logits(n, C_CONFIDENT, t, offset, dtype)
    y = _soft_confident_target(n, C_CONFIDENT, t, dtype)
    w = (torch.rand(C_CONFIDENT, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    w64 = None if w is None else w.double()
    for reduction in ("none", "mean"):
        check_against(
            lambda v: fusedloss.cross_entropy(v, y, w, reduction=reduction, label_smoothing=eps, backend=backend),
            lambda v: F.cross_entropy(v, y.double(), w64, reduction=reduction, label_smoothing=eps),
            x, f"confident soft targets {reduction}",
        )


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("offset", [30.0, 300.0], ids=["offset30", "offset300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_confident_rows_label_smoothing(backend, dtype, offset, weighted):
    """Class-index targets with label_smoothing=0.1 on confident, offset rows: the smoothing
    term eps/C sum_j (lse - x_j) is a sum of ~C terms of size ~offset, exact only relative
    to the row max. One ignored row. Loss and gradient on every backend."""
    n = 4
    t = torch.randint(0, C_CONFIDENT, (n,))
    x = _confident_logits(n, C_CONFIDENT, t, offset, dtype)
    t[1] = -100
    w = (torch.rand(C_CONFIDENT, dtype=torch.float64) + 0.5).to(dtype) if weighted else None
    w64 = None if w is None else w.double()
    for reduction in REDUCTIONS:
        check_against(
            lambda v: fusedloss.cross_entropy(v, t, w, reduction=reduction, label_smoothing=0.1, backend=backend),
            lambda v: F.cross_entropy(v, t, w64, reduction=reduction, label_smoothing=0.1),
            x, f"confident rows, smoothing {reduction}",
        )


# ----------------------------------------------------------------------------- rule 8
@pytest.mark.parametrize("where", ["at the target", "elsewhere"])
@pytest.mark.parametrize("eps", [0.0, 0.1], ids=["eps0", "eps0.1"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_with_zero_class_weight(backend, reduction, eps, where):
    """Rule 8: a NaN logit in a counted row whose target class has weight 0 gives a NaN loss
    (PyTorch: 0 * NaN = NaN), on every backend; the other rows of "none" are PyTorch's."""
    n, c = 4, 7
    x = make_logits((n, c))
    t = torch.tensor([2, 5, 1, 5])
    w = torch.rand(c, dtype=torch.float64) + 0.5
    w[5] = 0.0
    x[1, 5 if where == "at the target" else 3] = NAN
    out = fusedloss.cross_entropy(x, t, w.float(), reduction=reduction, label_smoothing=eps, backend=backend)
    exp = F.cross_entropy(x.double(), t, w, reduction=reduction, label_smoothing=eps)
    assert torch.isnan(exp[1] if reduction == "none" else exp), "PyTorch's answer is NaN here (rule 8's premise)"
    check_close(out, exp, torch.float32, f"NaN row, weight[target] = 0, {reduction}")


@pytest.mark.parametrize("where", ["at the target", "elsewhere"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_nan_with_zero_alpha(backend, reduction, where):
    """Rule 8 for the softmax focal loss: alpha[t] = 0 and a NaN logit in the row give NaN,
    on every backend (formula alpha_t (1 - p_t)^gamma (-log p_t) in float64: 0 * NaN)."""
    n, c = 4, 7
    x = make_logits((n, c))
    t = torch.tensor([2, 5, 1, 5])
    alpha = torch.rand(c, dtype=torch.float64) + 0.25
    alpha[5] = 0.0
    x[1, 5 if where == "at the target" else 3] = NAN
    out = fusedloss.focal_loss(x, t, gamma=2.0, alpha=alpha.float(), reduction=reduction, backend=backend)
    logp = torch.log_softmax(x.double(), 1).gather(1, t[:, None]).squeeze(1)
    rows = alpha[t] * (1 - logp.exp()) ** 2 * -logp
    exp = {"none": rows, "mean": rows.mean(), "sum": rows.sum()}[reduction]
    assert torch.isnan(exp[1] if reduction == "none" else exp)
    check_close(out, exp, torch.float32, f"focal NaN row, alpha[target] = 0, {reduction}")


# ----------------------------------------------------------------------------- class weights
@pytest.mark.parametrize("form", ["class", "class+smoothing", "probability"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_negative_class_weights(backend, reduction, form):
    """Some negative class weights: PyTorch's answer on every backend; "mean" over class
    indices divides by sum(weight[target]), here negative."""
    n, c = 6, 5
    x = make_logits((n, c))
    w = torch.tensor([1.5, -2.0, 0.75, -0.5, 1.0], dtype=torch.float64)
    eps = 0.2 if "smoothing" in form else 0.0
    if form == "probability":
        y = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1)
        t, t_ref = y.float(), y
    else:
        t = t_ref = torch.tensor([1, 3, 1, 0, 1, 2])
        assert w[t].sum() < 0  # the "mean" denominator
    check_against(
        lambda v: fusedloss.cross_entropy(v, t, w.float(), reduction=reduction, label_smoothing=eps, backend=backend),
        lambda v: F.cross_entropy(v, t_ref, w, reduction=reduction, label_smoothing=eps),
        x, f"negative weights {form} {reduction}",
    )


ZERO_DENOMINATORS = {
    # weights, targets: sum(weight[target]) over the counted rows is exactly 0
    "all counted targets weigh 0": ([0.0, 1.0, 0.0, 2.0], [0, 2, -100, 0]),
    "weights that cancel": ([2.0, -2.0, 0.5, 1.0], [0, 1, -100, 1, 0]),
}


@pytest.mark.parametrize("eps", [0.0, 0.2], ids=["eps0", "eps0.2"])
@pytest.mark.parametrize("case", ZERO_DENOMINATORS.values(), ids=ZERO_DENOMINATORS.keys())
def test_weighted_mean_with_zero_denominator(backend, case, eps):
    """README: a "mean" whose weighted denominator is 0 returns 0 (SPEC rule 6: with zero
    gradient), where PyTorch gives NaN or inf; "none" and "sum" stay PyTorch's."""
    weights, targets = case
    w = torch.tensor(weights, dtype=torch.float64)
    t = torch.tensor(targets)
    x = make_logits((t.numel(), w.numel()))
    counted = t[t != -100]
    assert w[counted].sum() == 0
    exp = F.cross_entropy(x.double(), t, w, label_smoothing=eps)
    assert not torch.isfinite(exp), f"PyTorch gives {exp.item()} here (the difference's premise)"
    out, grad = value_and_grad(lambda v: fusedloss.cross_entropy(v, t, w.float(), label_smoothing=eps, backend=backend), x)
    check_exact(out, torch.zeros((), dtype=x.dtype), "mean over a zero denominator")
    check_exact(grad, torch.zeros_like(x), "gradient of a mean over a zero denominator")
    for reduction in ("none", "sum"):
        check_against(
            lambda v: fusedloss.cross_entropy(v, t, w.float(), reduction=reduction, label_smoothing=eps, backend=backend),
            lambda v: F.cross_entropy(v, t, w, reduction=reduction, label_smoothing=eps),
            x, f"zero denominator, {reduction}",
        )


# ----------------------------------------------------------------------------- dtype promotion
PROMOTIONS = [
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
    (torch.float32, torch.float64),
    (torch.float32, torch.bfloat16),
]


def _torchvision_sigmoid_focal(x, y, alpha=0.25, gamma=2.0, reduction="none"):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency)."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


BINARY_TARGET_LOSSES = {
    "cross_entropy probabilities": (
        lambda x, y, r, b: fusedloss.cross_entropy(x, y, reduction=r, backend=b),
        lambda x, y, r: F.cross_entropy(x, y, reduction=r),
    ),
    "bce": (
        lambda x, y, r, b: fusedloss.binary_cross_entropy_with_logits(x, y, reduction=r, backend=b),
        lambda x, y, r: F.binary_cross_entropy_with_logits(x, y, reduction=r),
    ),
    "sigmoid focal": (
        lambda x, y, r, b: fusedloss.sigmoid_focal_loss(x, y, reduction=r, backend=b),
        lambda x, y, r: _torchvision_sigmoid_focal(x, y, reduction=r),
    ),
}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("loss", BINARY_TARGET_LOSSES.values(), ids=BINARY_TARGET_LOSSES.keys())
@pytest.mark.parametrize("dtypes", PROMOTIONS, ids=lambda d: f"{d[0]}-{d[1]}".replace("torch.", ""))
def test_dtype_promotion(backend, dtypes, loss, reduction):
    """A floating target of another dtype: the loss has the promoted dtype (bf16 input +
    float32 probabilities -> float32 loss, SPEC section 1: "where PyTorch promotes, the
    result dtype is PyTorch's", the input's otherwise), the gradient the input's; values
    against float64 PyTorch with the tolerance of the less precise of the two dtypes.

    One place where PyTorch does not promote: BCE-with-logits of a float32 input and a
    bfloat16 target returns bfloat16 in PyTorch (the target's dtype); SPEC gives the input's
    float32 there. Asserted as such, so that a change on either side shows."""
    xd, yd = dtypes
    ours, theirs = loss
    x = make_logits((4, 6), xd)
    y = torch.softmax(torch.randn(4, 6, dtype=torch.float64), 1).to(yd)
    with torch.no_grad():
        pytorch_dtype = theirs(x, y, reduction).dtype
    expected_dtype = torch.promote_types(xd, yd)
    pytorch_demotes = theirs is BINARY_TARGET_LOSSES["bce"][1] and (xd, yd) == (torch.float32, torch.bfloat16)
    assert (pytorch_dtype == torch.bfloat16) if pytorch_demotes else (pytorch_dtype == expected_dtype), (
        f"PyTorch's loss dtype at ({xd}, {yd}) is {pytorch_dtype}: this test's premise changed"
    )
    out, grad = value_and_grad(lambda v: ours(v, y, reduction, backend), x)
    assert out.dtype == expected_dtype, f"loss dtype {out.dtype}, expected {expected_dtype} ({xd} input, {yd} target)"
    assert grad.dtype == xd, f"gradient dtype {grad.dtype}, expected the input's {xd}"
    exp, exp_grad = reference(lambda v: theirs(v, y.double(), reduction), x)
    tol_dtype = xd if torch.finfo(xd).eps >= torch.finfo(yd).eps else yd
    check_close(out, exp, tol_dtype, f"promoted loss {reduction}")
    check_close(grad, exp_grad, tol_dtype, f"promoted gradient {reduction}", grad=True)


# ----------------------------------------------------------------------------- empty shapes
EMPTY_SOFTMAX = {
    "(0, C)": ((0, 5), (0,)),
    "(0, C, H, W)": ((0, 5, 2, 3), (0, 2, 3)),
    "(N, C, 0)": ((4, 5, 0), (4, 0)),
    "(N, C, 0, W)": ((2, 5, 0, 3), (2, 0, 3)),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", ["class", "probability", "focal"])
@pytest.mark.parametrize("shapes", EMPTY_SOFTMAX.values(), ids=EMPTY_SOFTMAX.keys())
def test_empty_softmax_losses(backend, shapes, form, reduction):
    """No rows: value and shape are PyTorch's, except "mean", which is 0 (SPEC rule 6;
    PyTorch: NaN); backward gives a zero-size gradient of the input's shape."""
    x_shape, t_shape = shapes
    x = make_logits(x_shape)
    if form == "probability":
        t = torch.rand(x_shape)
        ours = lambda v: fusedloss.cross_entropy(v, t, reduction=reduction, backend=backend)  # noqa: E731
        theirs = F.cross_entropy(x.double(), t.double(), reduction=reduction)
    elif form == "class":
        t = torch.zeros(t_shape, dtype=torch.int64)
        ours = lambda v: fusedloss.cross_entropy(v, t, reduction=reduction, backend=backend)  # noqa: E731
        theirs = F.cross_entropy(x.double(), t, reduction=reduction)
    else:
        t = torch.zeros(t_shape, dtype=torch.int64)
        ours = lambda v: fusedloss.focal_loss(v, t, reduction=reduction, backend=backend)  # noqa: E731
        theirs = F.cross_entropy(x.double(), t, reduction=reduction)  # gamma only scales: the same empty answers
    exp = torch.zeros(()) if reduction == "mean" else theirs
    if reduction == "mean":
        assert torch.isnan(theirs), "PyTorch's mean over nothing is NaN (rule 6's premise)"
    out, grad = value_and_grad(ours, x)
    assert out.shape == exp.shape and out.dtype == x.dtype, f"{tuple(out.shape)} {out.dtype}, expected {tuple(exp.shape)} {x.dtype}"
    check_exact(out, exp.to(out.dtype), f"empty {form} {reduction}")
    assert grad is not None and grad.shape == x.shape, f"gradient {None if grad is None else tuple(grad.shape)}, expected {x_shape}"


EMPTY_BINARY = {"(N, 0)": (4, 0), "(0, C)": (0, 5), "(0,)": (0,), "(N, C, 0)": (2, 3, 0)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ["bce", "sigmoid focal"])
@pytest.mark.parametrize("shape", EMPTY_BINARY.values(), ids=EMPTY_BINARY.keys())
def test_empty_binary_losses(backend, shape, loss, reduction):
    """BCE / sigmoid focal over no element: value and shape exactly PyTorch's (torchvision's),
    "mean" NaN as in PyTorch (README); backward gives a zero-size gradient."""
    x, y = make_logits(shape), torch.rand(shape)
    pw = torch.rand(shape[-1]) + 0.5
    if loss == "bce":
        def ours(v):
            return fusedloss.binary_cross_entropy_with_logits(v, y, reduction=reduction, pos_weight=pw, backend=backend)

        exp = F.binary_cross_entropy_with_logits(x, y, reduction=reduction, pos_weight=pw)
    else:
        ours = lambda v: fusedloss.sigmoid_focal_loss(v, y, reduction=reduction, backend=backend)  # noqa: E731
        exp = _torchvision_sigmoid_focal(x, y, reduction=reduction)
    out, grad = value_and_grad(ours, x)
    check_exact(out, exp.detach(), f"empty {loss} {reduction}")
    assert grad is not None and grad.shape == x.shape


# ----------------------------------------------------------------------------- softcap = inf
@pytest.mark.parametrize("form", ["class", "probability", "linear"])
def test_infinite_softcap_is_no_softcap(backend, form):
    """softcap=inf: c tanh(x / c) -> x, so the result is bitwise the one without softcap."""
    if form == "linear":
        x, lin, t = make_logits((5, 4), scale=1.0), make_logits((9, 4), scale=1.0), make_target((5,), 9)

        def fn(v, cap):
            return fusedloss.linear_cross_entropy(v, lin, t, softcap=cap, label_smoothing=0.1, backend=backend)
    else:
        x = make_logits((5, 9))
        t = make_target((5,), 9) if form == "class" else torch.softmax(torch.randn(5, 9), 1)

        def fn(v, cap):
            return fusedloss.cross_entropy(v, t, softcap=cap, label_smoothing=0.1, z_loss=1e-3, backend=backend)

    out_inf, g_inf = value_and_grad(lambda v: fn(v, float("inf")), x)
    out_none, g_none = value_and_grad(lambda v: fn(v, None), x)
    check_exact(out_inf, out_none, "loss with softcap=inf")
    check_exact(g_inf, g_none, "gradient with softcap=inf")


# ----------------------------------------------------------------------------- determinism
def _determinism_case(case, n):
    """(fn(input, reduction, backend), input shape) of a determinism case, n rows of 1000."""
    c = 1000
    t = make_target((n,), c, n_ignored=3)
    w = torch.rand(c) + 0.5
    if case == "ce class+weight+smoothing":
        return (lambda v, r, b: fusedloss.cross_entropy(v, t, w, reduction=r, label_smoothing=0.1, backend=b)), (n, c)
    if case == "ce probabilities+weight":
        y = torch.softmax(torch.randn(n, c), 1)
        return (lambda v, r, b: fusedloss.cross_entropy(v, y, w, reduction=r, backend=b)), (n, c)
    if case == "ce K-dim+z_loss+softcap":
        tk = t.view(n // 4, 4)
        return (lambda v, r, b: fusedloss.cross_entropy(v, tk, reduction=r, z_loss=1e-3, softcap=20.0, backend=b)), (n // 4, c, 4)
    if case == "focal":
        return (lambda v, r, b: fusedloss.focal_loss(v, t, gamma=1.5, alpha=w, reduction=r, backend=b)), (n, c)
    yb = torch.rand(n, c)
    if case == "bce":
        return (lambda v, r, b: fusedloss.binary_cross_entropy_with_logits(v, yb, reduction=r, pos_weight=w, backend=b)), (n, c)
    assert case == "sigmoid focal"
    return (lambda v, r, b: fusedloss.sigmoid_focal_loss(v, yb, reduction=r, backend=b)), (n, c)


DETERMINISM = ["ce class+weight+smoothing", "ce probabilities+weight", "ce K-dim+z_loss+softcap", "focal", "bce", "sigmoid focal"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("case", DETERMINISM)
def test_bitwise_deterministic(backend, case, reduction, dtype):
    """The same input twice gives bitwise the same loss and gradient (SPEC section 4), on
    every backend; rows enough for the cpu backend's threads to split them (fewer under the
    triton interpreter, which runs one program at a time)."""
    n = 16 if backend == "triton" else 512
    fn, shape = _determinism_case(case, n)
    check_deterministic(lambda v: fn(v, reduction, backend), make_logits(shape, dtype))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_bitwise_deterministic_linear_cross_entropy(backend, reduction):
    """linear_cross_entropy: the same input twice gives bitwise the same loss and the same
    gradients to input, weight and bias (the chunks run in a fixed order: SPEC section 8)."""
    n = 16 if backend == "triton" else 512
    h, lin, b = make_logits((n, 64), scale=1.0), make_logits((1000, 64), scale=0.2), make_logits((1000,), scale=0.1)
    t = make_target((n,), 1000, n_ignored=3)

    def run():
        leaves = [v.detach().clone().requires_grad_() for v in (h, lin, b)]
        out = fusedloss.linear_cross_entropy(leaves[0], leaves[1], t, linear_bias=leaves[2], reduction=reduction,
                                             options=None, backend=backend)
        out.backward(grad_output_for(out))
        return [out.detach()] + [v.grad for v in leaves]

    first, second = run(), run()
    for name, a, b_ in zip(["loss", "d/dinput", "d/dweight", "d/dbias"], second, first):
        check_exact(a, b_, f"linear_cross_entropy {name} of two identical calls")
