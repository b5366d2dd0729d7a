"""fusedloss.cross_entropy against torch.nn.functional.cross_entropy in float64 (SPEC 1-6)."""
import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import (
    INF, NAN, REDUCTIONS, allowed_rows_reference, check_against, check_close, check_deterministic,
    check_exact, check_out_of_range, check_unmodified, grad_output_for, gradcheck, make_logits,
    make_target, reduce_rows, snapshot, value_and_grad,
)

N, C = 6, 11


def class_weight(dtype):
    return (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype)


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
}


def _kwargs(opts, dtype):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = class_weight(dtype)
    return kw


def _ref_kwargs(kw):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_class_targets(backend, dtype, reduction, opts):
    x, t = make_logits((N, C), dtype), make_target((N,), C)
    kw = _kwargs(opts, dtype)
    check_against(
        lambda x: fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend, **kw),
        lambda x: F.cross_entropy(x, t, reduction=reduction, **_ref_kwargs(kw)),
        x, f"{reduction} {opts}",
    )


@pytest.mark.parametrize("ignore_index", [-100, -1, 3])
def test_ignore_index(backend, ignore_index):
    x, t = make_logits((N, C)), make_target((N,), C, ignore_index, n_ignored=2)
    for reduction in REDUCTIONS:
        check_against(
            lambda x: fusedloss.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction, backend=backend),
            lambda x: F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction),
            x, f"ignore_index={ignore_index} {reduction}",
        )


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_probability_targets(backend, dtype, reduction, opts):
    x = make_logits((N, C), dtype)
    y = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1)
    y[0] = F.one_hot(torch.tensor(3), C)  # zeros in the target (rule 7 on finite logits)
    y = y.to(dtype)
    kw = _kwargs(opts, dtype)
    check_against(
        lambda x: fusedloss.cross_entropy(x, y, reduction=reduction, backend=backend, **kw),
        lambda x: F.cross_entropy(x, y.double(), reduction=reduction, **_ref_kwargs(kw)),
        x, f"probabilities {reduction} {opts}",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", ["class", "probability"])
def test_kdim(backend, reduction, form):
    x = make_logits((2, 5, 3, 4))
    t = make_target((2, 3, 4), 5, n_ignored=2) if form == "class" else torch.softmax(torch.randn(2, 5, 3, 4), 1)
    w = torch.rand(5) + 0.5
    check_against(
        lambda x: fusedloss.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, backend=backend),
        lambda x: F.cross_entropy(x, t if form == "class" else t.double(), w.double(), reduction=reduction, label_smoothing=0.1),
        x, f"K-dim {form} {reduction}",
    )


@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kdim_many_positions(backend, dtype_):
    """D = 37 positions: several vector blocks of rows and a partial one (the CPU's K-dim
    path puts positions in the vector lanes), with ignored rows full of NaN, an all -inf
    row, a masked class, softcap and z_loss."""
    x = make_logits((3, 6, 37), dtype_)
    t = make_target((3, 37), 6, n_ignored=0)
    t[0, 5] = t[2, 36] = -100
    x[0, :, 5] = NAN  # ignored: no trace in loss or gradient
    x[1, :, 17] = -INF  # empty row: not counted
    mask = torch.tensor([True, True, False, True, True, True]).view(6, 1)
    t[t == 2] = 3  # targets stay on allowed classes, so PyTorch on the allowed columns is the reference
    keep = [0, 1, 3, 4, 5]
    counted = (t != -100) & torch.isfinite(x.float()).all(1)
    kw = dict(label_smoothing=0.1, softcap=8.0, z_loss=1e-3)

    def reference(v):
        v = torch.where(torch.isfinite(v), v, 0.0)  # rows left out below; no NaN through tanh's backward
        z = 8.0 * torch.tanh(v[:, keep] / 8.0)
        zr, tr = z.permute(0, 2, 1)[counted], t[counted]
        tr = torch.tensor([keep.index(int(c)) for c in tr])
        return F.cross_entropy(zr, tr, label_smoothing=0.1) + 1e-3 * (torch.logsumexp(zr, 1) ** 2).mean()

    out, grad = check_against(
        lambda v: fusedloss.cross_entropy(v, t, mask=mask, backend=backend, **kw), reference, x, "K-dim, 37 positions"
    )
    assert torch.equal(grad[0, :, 5], torch.zeros(6, dtype=grad.dtype)), "ignored NaN row has a gradient"
    assert torch.equal(grad[1, :, 17], torch.zeros(6, dtype=grad.dtype)), "empty row has a gradient"
    assert torch.equal(grad[:, 2, :], torch.zeros(3, 37, dtype=grad.dtype)), "masked class has a gradient"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", ["class", "probability"])
def test_unbatched(backend, reduction, form):
    x = make_logits((C,))
    t = torch.tensor(4) if form == "class" else torch.softmax(torch.randn(C), 0)
    out, _ = check_against(
        lambda x: fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend),
        lambda x: F.cross_entropy(x, t if form == "class" else t.double(), reduction=reduction),
        x, f"unbatched {form} {reduction}",
    )
    assert out.shape == ()


# view(base) is a non-contiguous input; the base is the differentiated leaf.
NONCONTIGUOUS = {
    "transposed": ((C, N), lambda b: b.t(), lambda t: t),
    "sliced": ((N, 2 * C), lambda b: b[:, ::2][:, :C], lambda t: t),
    "channels_last": ((2, 3, 4, C), lambda b: b.permute(0, 3, 1, 2), lambda t: t.reshape(2, 3, 4)),
    "target_sliced": ((N, C), lambda b: b, lambda t: t.repeat_interleave(2)[::2]),
}


@pytest.mark.parametrize("case", NONCONTIGUOUS.values(), ids=NONCONTIGUOUS.keys())
def test_noncontiguous(backend, case):
    base_shape, view, tview = case
    x = make_logits(base_shape)
    n = 24 if len(base_shape) == 4 else N
    t = tview(make_target((n,), C, n_ignored=1))
    assert not view(x).is_contiguous() or not t.is_contiguous()
    for reduction in ("none", "mean"):
        check_against(
            lambda b: fusedloss.cross_entropy(view(b), t, reduction=reduction, label_smoothing=0.1, backend=backend),
            lambda b: F.cross_entropy(view(b), t, reduction=reduction, label_smoothing=0.1),
            x, f"non-contiguous {reduction}",
        )


def test_int32_target(backend):
    x, t = make_logits((N, C)), make_target((N,), C)
    out64, g64 = value_and_grad(lambda x: fusedloss.cross_entropy(x, t, reduction="none", backend=backend), x)
    out32, g32 = value_and_grad(lambda x: fusedloss.cross_entropy(x, t.int(), reduction="none", backend=backend), x)
    check_exact(out32, out64, "int32-target loss")
    check_exact(g32, g64, "int32-target gradient")
    check_close(out32, F.cross_entropy(x.double(), t, reduction="none"), x.dtype, "int32-target loss vs torch")


# ----------------------------------------------------------------------------- -inf rules
MASK_CASES = {
    "(C,)": dict(form="C"),
    "(N,C)": dict(form="NC"),
    "(N,C)+smoothing": dict(form="NC", label_smoothing=0.3),
    "(C,)+weight+smoothing": dict(form="C", weight=True, label_smoothing=0.3),
    "(N,C)+softcap": dict(form="NC", softcap=2.0),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", MASK_CASES.values(), ids=MASK_CASES.keys())
def test_mask(backend, reduction, case):
    """Rules 1 and 5: mask and -inf logits remove classes; the loss is PyTorch's on the
    sub-matrix of allowed classes (smoothing spread over those only), gradient 0 elsewhere."""
    case = dict(case)
    form, eps, c = case.pop("form"), case.get("label_smoothing", 0.0), case.get("softcap")
    x, t = make_logits((N, C)), make_target((N,), C)
    x[1, 7] = -INF  # a -inf logit masks too
    mask = torch.rand(C) > 0.3 if form == "C" else torch.rand(N, C) > 0.3
    allowed = mask.expand(N, C) & (x != -INF)
    t = torch.where(t == -100, t, torch.multinomial(allowed.double() + 1e-30, 1).squeeze(1))  # allowed targets
    w = class_weight(torch.float32) if case.get("weight") else None
    w64 = torch.ones(C, dtype=torch.float64) if w is None else w.double()
    cap = (lambda v: c * torch.tanh(v / c)) if c else (lambda v: v)

    def ref(x64):
        row = lambda sub, st, cols: F.cross_entropy(cap(sub), st, w64[cols], reduction="none", label_smoothing=eps)
        losses, counted = allowed_rows_reference(row, x64, t, allowed)
        counts = torch.where(counted, w64[t.clamp_min(0)], 0.0)
        return reduce_rows(losses, counts, reduction)

    check_against(
        lambda x: fusedloss.cross_entropy(
            x, t, w, reduction=reduction, label_smoothing=eps, mask=mask, softcap=c, backend=backend
        ),
        ref, x, f"mask {form} {reduction}",
    )


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_masked_target(backend, eps, softcap):
    """Rule 4: target class masked, others allowed -> loss +inf, gradient softmax - onehot
    (finite, -(1 - eps) at the target, with no softcap factor there: the class is masked)."""
    x = make_logits((3, 6), torch.float64)
    x[0, 2] = -INF
    t = torch.tensor([2, 0, 5])
    mask = torch.tensor([True, True, True, True, False, True])
    leaf = x.clone().requires_grad_()
    out = fusedloss.cross_entropy(leaf, t, reduction="none", label_smoothing=eps, mask=mask, softcap=softcap, backend=backend)
    out.backward(torch.ones(3, dtype=torch.float64))
    assert out[0].item() == INF, f"loss of the masked-target row: {out[0].item()}"
    allowed = mask & (x[0] != -INF)
    z, dz_dx = x[0, allowed], torch.ones(int(allowed.sum()), dtype=torch.float64)
    if softcap:
        z, dz_dx = softcap * torch.tanh(z / softcap), 1 - torch.tanh(z / softcap) ** 2
    expected = torch.zeros(6, dtype=torch.float64)
    p = torch.softmax(z, 0)
    expected[allowed] = ((1 - eps) * p + eps * (p - 1 / allowed.sum())) * dz_dx
    expected[2] = -(1 - eps)
    check_close(leaf.grad[0], expected, torch.float64, "masked-target gradient", grad=True)
    assert leaf.grad[0, 4].item() == 0.0, "a masked non-target class has gradient exactly 0"
    assert out.sum().item() == INF


def _bad_rows_batch():
    """Rows 1-3 hold NaN / +inf / all -inf and are ignored; row 4 is empty (all -inf, target 0)."""
    x = make_logits((6, C))
    x[1, 3] = NAN
    x[2, 0] = INF
    x[3] = -INF
    x[4] = -INF
    t = torch.tensor([1, -100, -100, -100, 0, 7])
    return x, t, [1, 2, 3, 4], [0, 5]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("form", ["class", "probability"])
def test_ignored_and_empty_rows(backend, reduction, form):
    """Rules 2 and 3: loss 0 and gradient exactly 0 whatever the logits hold; not counted."""
    x, t, bad, good = _bad_rows_batch()
    if form == "probability":  # no ignore_index: only the empty row (4) is dropped
        x[[1, 2, 3]] = make_logits((3, C))
        t = torch.softmax(torch.randn(6, C), 1)
        t[4] = 0
        t[4, 0] = 1
        bad, good = [4], [0, 1, 2, 3, 5]
    out, grad = value_and_grad(lambda x: fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend), x)
    assert (grad[bad] == 0).all(), f"gradient of ignored/empty rows: {grad[bad]}"
    if reduction == "none":
        assert (out[bad] == 0).all(), f"loss of ignored/empty rows: {out[bad]}"

    def ref(x64):
        sub = F.cross_entropy(x64[good], t[good] if form == "class" else t[good].double(), reduction=reduction)
        return x64.new_zeros(6).index_put((torch.tensor(good),), sub) if reduction == "none" else sub

    exp, exp_grad = value_and_grad(ref, x.double())
    check_close(out, exp, x.dtype, "loss")
    check_close(grad, exp_grad, x.dtype, "gradient", grad=True)


@pytest.mark.parametrize("form", ["ignored", "empty", "masked"])
def test_mean_over_nothing(backend, form):
    """Rule 6: "mean" over zero counted rows is 0 with a zero gradient (PyTorch: NaN)."""
    x = make_logits((3, C))
    t = torch.tensor([-100, -100, -100]) if form == "ignored" else torch.tensor([0, 1, 2])
    mask = torch.zeros(C, dtype=torch.bool) if form == "masked" else None
    if form == "empty":
        x[:] = -INF
    out, grad = value_and_grad(lambda x: fusedloss.cross_entropy(x, t, mask=mask, backend=backend), x)
    assert out.item() == 0 and (grad == 0).all(), f"loss {out}, gradient {grad}"


def test_probability_target_zero_times_log_zero(backend):
    """Rule 7: target probability 0 at a -inf logit contributes 0 (0 * log 0 = 0)."""
    x = make_logits((N, C))
    x[:, [2, 9]] = -INF
    cols = torch.tensor([c for c in range(C) if c not in (2, 9)])
    y = torch.zeros(N, C)
    y[:, cols] = torch.softmax(torch.randn(N, len(cols)), 1)
    for eps in (0.0, 0.25):

        def ref(x64):
            out = x64.new_zeros(())
            return out + F.cross_entropy(x64[:, cols], y[:, cols].double(), label_smoothing=eps)

        check_against(
            lambda x: fusedloss.cross_entropy(x, y, label_smoothing=eps, backend=backend), ref, x, f"0*log0 eps={eps}"
        )


@pytest.mark.parametrize("form", ["class", "probability"])
def test_nan_propagates(backend, form):
    """Rule 8: NaN in a counted row reaches the loss."""
    x = make_logits((4, C))
    x[2, 5] = NAN
    x[3] = -INF  # NaN the only non--inf logit: not an empty row (a NaN-dropping max would say so)
    x[3, 1] = NAN
    t = torch.tensor([0, 1, 2, 3]) if form == "class" else torch.softmax(torch.randn(4, C), 1)
    none = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    assert torch.isnan(none[2:]).all() and torch.isfinite(none[:2]).all(), none
    assert torch.isnan(fusedloss.cross_entropy(x, t, backend=backend))


def test_seed_case(backend):
    """The report that started the project: PyTorch gives NaN here."""
    x = torch.ones(3, 5)
    x[2] = -INF
    x.requires_grad_()
    loss = fusedloss.cross_entropy(x, torch.tensor([1, 2, -1]), ignore_index=-1, backend=backend)
    loss.backward()
    assert abs(loss.item() - 1.6094379124341003) < 1e-6, loss  # log 5
    assert (x.grad[2] == 0).all(), x.grad
    check_close(x.grad[0], (torch.full((5,), 0.2) - F.one_hot(torch.tensor(1), 5)) / 2, torch.float32, "row 0", grad=True)


def test_training_with_vocabulary_mask(backend):
    """A few SGD steps of a tiny linear model whose vocabulary is restricted by -inf stay finite."""
    model = torch.nn.Linear(8, 12)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    banned = torch.tensor([0, 5, 11])
    feats, t = torch.randn(8, 8), torch.tensor([1, 2, 3, 4, 6, 7, -100, 10])
    for _ in range(4):
        logits = model(feats).index_fill(1, banned, -INF)
        loss = fusedloss.cross_entropy(logits, t, label_smoothing=0.1, z_loss=1e-3, backend=backend)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss), loss
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- extras
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_z_loss(backend, dtype, reduction, weighted):
    """Rule 9: + z * w_t * logsumexp^2 per counted row, reduced like the main term."""
    z = 1e-2
    x, t = make_logits((N, C), dtype), make_target((N,), C)
    w = class_weight(dtype) if weighted else None
    w64 = torch.ones(C, dtype=torch.float64) if w is None else w.double()

    def ref(x64):
        counted = t != -100
        w_t = torch.where(counted, w64[t.clamp_min(0)], 0.0)
        rows = F.cross_entropy(x64, t, w64, reduction="none") + z * w_t * torch.logsumexp(x64, 1) ** 2
        return reduce_rows(rows, w_t, reduction)

    check_against(lambda x: fusedloss.cross_entropy(x, t, w, reduction=reduction, z_loss=z, backend=backend), ref, x, "z_loss")


@pytest.mark.parametrize("cap", [1.0, 5.0])
def test_softcap(backend, dtype, cap):
    """Rule 10: cross-entropy of cap * tanh(x / cap), gradient through the tanh (autograd)."""
    x, t = make_logits((N, C), dtype, scale=6.0), make_target((N,), C)
    w = class_weight(dtype)
    check_against(
        lambda x: fusedloss.cross_entropy(x, t, w, label_smoothing=0.1, softcap=cap, backend=backend),
        lambda x: F.cross_entropy(cap * torch.tanh(x / cap), t, w.double(), label_smoothing=0.1),
        x, f"softcap={cap}",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_inplace_backward(backend, reduction):
    """Rule 11: the gradient is right and lands in the input's storage."""
    base = make_logits((N, C)).requires_grad_()
    t = make_target((N,), C)
    x = base * 1  # the input, a non-leaf whose storage the kernel may reuse
    out = fusedloss.cross_entropy(x, t, reduction=reduction, inplace_backward=True, backend=backend)
    out.backward(grad_output_for(out))
    _, expected = value_and_grad(lambda v: F.cross_entropy(v, t, reduction=reduction), base.detach().double())
    check_close(base.grad, expected, torch.float32, "inplace_backward gradient", grad=True)
    check_exact(x.detach(), base.grad, "gradient in the input's storage")


def test_large_vocabulary(backend):
    """C larger than one Triton block."""
    x, t = make_logits((2, 5000)), torch.tensor([17, 4999])
    x[:, 100:200] = -INF
    cols = torch.cat([torch.arange(100), torch.arange(200, 5000)])
    check_against(
        lambda x: fusedloss.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-4, backend=backend),
        lambda x: F.cross_entropy(x[:, cols], torch.tensor([17, 4899]), label_smoothing=0.1)
        + 1e-4 * (torch.logsumexp(x[:, cols], 1) ** 2).mean(),
        x, "C=5000",
    )


CONFIDENT = {
    "probability": dict(probability=True),
    "smoothing": dict(label_smoothing=0.1),
    "weight+smoothing": dict(weight=True, label_smoothing=0.1),
}


@pytest.mark.parametrize("case", CONFIDENT.values(), ids=CONFIDENT.keys())
def test_confident_rows_float32_precision(backend, case):
    """Large vocabulary, large logits, small losses (a confident model, distillation-style
    soft targets): the loss keeps float32's relative accuracy. Sums of y*z or w*z over
    32000 classes, taken raw, lose it to cancellation against lse * sum(y)."""
    c = 32000
    x = make_logits((3, c), scale=3.0)
    t = torch.tensor([5, 123, 31999])
    x[torch.arange(3), t] += 20.0
    kw = {}
    if case.get("weight"):
        kw["weight"] = (torch.rand(c, dtype=torch.float64) + 0.5).float()
    if case.get("label_smoothing"):
        kw["label_smoothing"] = case["label_smoothing"]
    target = t
    if case.get("probability"):
        target = 0.98 * F.one_hot(t, c).float() + 0.02 / c
    check_against(
        lambda x: fusedloss.cross_entropy(x, target, backend=backend, **kw),
        lambda x: F.cross_entropy(x, target.double() if target.is_floating_point() else target, **_ref_kwargs(kw)),
        x, f"confident rows {case}",
    )


def test_softcap_confident_row_is_not_negative(backend):
    """The target's capped logit and the row max must go through the same tanh: a 1-ulp
    difference made the loss of a confident row negative."""
    x = torch.zeros(1, 16)
    x[0, 3] = 40.62295913696289
    loss = fusedloss.cross_entropy(x, torch.tensor([3]), softcap=30.0, reduction="none", backend=backend)
    z = 30.0 * torch.tanh(x.double() / 30.0)
    expected = F.cross_entropy(z, torch.tensor([3]), reduction="none")
    assert loss.item() >= 0, f"negative loss {loss.item()}"
    check_close(loss, expected, torch.float32, "softcap confident row")


# ----------------------------------------------------------------------------- gradients
GRADCHECK_CASES = {
    "plain": {},
    "mask+smoothing+weight": dict(mask=True, label_smoothing=0.2, weight=True),
    "z_loss+softcap": dict(z_loss=0.05, softcap=2.0),
    "all": dict(mask=True, label_smoothing=0.2, weight=True, z_loss=0.05, softcap=2.0),
    "probability+smoothing+weight": dict(probability=True, label_smoothing=0.2, weight=True, z_loss=0.05),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES.values(), ids=GRADCHECK_CASES.keys())
def test_gradcheck(backend, case):
    kw = dict(case)
    x = make_logits((3, 5), torch.float64).requires_grad_()
    t = torch.softmax(torch.randn(3, 5, dtype=torch.float64), 1) if kw.pop("probability", False) else torch.tensor([0, -100, 4])
    if kw.pop("mask", False):
        kw["mask"] = torch.tensor([True, False, True, True, True])
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(5, dtype=torch.float64) + 0.5
    for reduction in ("none", "mean"):
        fn = lambda x: fusedloss.cross_entropy(x, t, reduction=reduction, backend=backend, **kw)
        gradcheck(fn, x, backend)


# ----------------------------------------------------------------------------- bad input, contract
def test_out_of_range_target(backend):
    check_out_of_range(lambda x, t: fusedloss.cross_entropy(x, t, reduction="none", backend=backend), backend, C)


def test_caller_tensors_unmodified(backend):
    x, t = make_logits((N, C)), make_target((N,), C)
    x[0, 1] = -INF
    w, mask = class_weight(torch.float32), torch.rand(N, C) > 0.2
    leaf = x.clone().requires_grad_()
    before = snapshot(leaf, t, w, mask)
    fusedloss.cross_entropy(leaf, t, w, mask=mask, label_smoothing=0.1, z_loss=1e-3, backend=backend).backward()
    check_unmodified(before, leaf, t, w, mask)


def test_deterministic(backend):
    x, t = make_logits((N, C)), make_target((N,), C)
    check_deterministic(lambda x: fusedloss.cross_entropy(x, t, label_smoothing=0.1, backend=backend), x)
