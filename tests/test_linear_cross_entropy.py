"""fusedloss.linear_cross_entropy (SPEC section 8) against F.linear + F.cross_entropy in float64.

The reference is PyTorch's formula evaluated in float64 with autograd, on the inputs rounded
to the tested dtype; for the rules where PyTorch gives NaN or inf (mask, -inf logits, z-loss,
softcap) it is fusedloss.cross_entropy(backend="torch") -- the contract in code -- on the
float64 logits F.linear makes. Gradients to input, linear_weight and linear_bias, with
grad_output 0.37 (per-row multiples of it for "none"). Chunk sizes that do not divide N put
rows of every kind on both sides of chunk boundaries. The triton backend runs in the
interpreter (slow): it gets the small cases only.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import INF, NAN, REDUCTIONS, TOLERANCES, check_close, check_exact

N, H, V = 13, 8, 11
CHUNKED = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)  # 13 rows: 4 + 4 + 4 + 1
FAST = ["cpu", "torch"]
ALL = ["cpu", "torch", "triton"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest.one_thread)


def _available(backend):
    reason = fusedloss.backends("cpu")[backend]
    if reason is not None:  # CI builds the extension and installs triton: never skip
        pytest.fail(f"backend {backend!r} is unavailable: {reason}")
    return backend


def make_inputs(dtype=torch.float32, n=N, hidden=H, vocab=V, bias=True, lead=None):
    """(x, w, b) drawn in float64 and rounded to dtype; logits of order 3."""
    x = torch.randn(*(lead or (n,)), hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64) * (3 / math.sqrt(hidden))
    b = torch.randn(vocab, dtype=torch.float64) if bias else None
    return tuple(None if t is None else t.to(dtype) for t in (x, w, b))


def make_target(shape, vocab=V, ignore_index=-100):
    t = torch.randint(0, vocab, shape)
    t.view(-1)[::5] = ignore_index  # rows 0, 5, 10: one in most chunks
    return t


def grad_output(out):
    """0.37 for a scalar; 0.37 * (1, 2, ..., 7, 1, ...) per row for "none"."""
    if out.dim() == 0:
        return torch.full_like(out, 0.37)
    return (torch.arange(out.numel(), dtype=torch.float64).remainder(7).add(1) * 0.37).reshape(out.shape).to(out.dtype)


def run(fn, tensors, dtype=None, go=None):
    """fn(*leaves) and the gradients of (out * grad_output).sum() to every leaf; the leaves are
    fresh copies of tensors (upcast to dtype when given); None stays None."""
    leaves = [None if t is None else t.detach().to(dtype or t.dtype).clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    go = grad_output(out) if go is None else go
    out.backward(go.to(out.dtype))
    return out.detach(), [None if t is None else t.grad for t in leaves]


def check_fused(fused, ref, tensors, what, dtype=None):
    """fused(*tensors) against ref(*float64 tensors): the loss within SPEC 5; the gradients
    within SPEC 5 in float64, and in lower precision within twice the error of ref evaluated
    in that dtype (eager PyTorch's own error, as flash-attention's tests bound theirs) plus
    SPEC's absolute tolerance: dX = dlogits @ W and dW = dlogits.T @ X are sums of H and N
    products, whose rounding grows with their magnitude beyond the per-logit 1e-6."""
    dtype = dtype or tensors[0].dtype
    out, grads = run(fused, tensors)
    exp, exp_grads = run(ref, tensors, torch.float64)
    assert out.dtype == dtype, f"{what}: loss dtype {out.dtype}, expected {dtype}"
    check_close(out, exp, dtype, f"{what} loss")
    eager_grads = run(ref, tensors)[1] if dtype != torch.float64 else exp_grads
    for name, g, e, ge in zip(("input", "linear_weight", "linear_bias"), grads, exp_grads, eager_grads):
        if e is None:
            continue
        assert g is not None, f"{what}: no gradient for {name}"
        if dtype == torch.float64:
            check_close(g, e, dtype, f"{what} gradient of {name}", grad=True)
            continue
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(g), finite), f"{what} gradient of {name}: non-finite where the reference is not"
        err = (g.double() - e)[finite].abs().max() if finite.any() else torch.tensor(0.0)
        eager_err = (ge.double() - e)[finite].abs().max() if finite.any() else torch.tensor(0.0)
        bound = 2 * eager_err + TOLERANCES[dtype][2]
        assert err <= bound, (
            f"{what} gradient of {name} ({dtype}): max error {err:.3e} > {bound:.3e} (2 x eager's {eager_err:.3e} + SPEC abs)"
        )
    return out, grads


OPTIONS = {
    "plain": {},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.2},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
}


def _kwargs(opts, vocab=V):
    kw = dict(opts)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(vocab, dtype=torch.float64) + 0.5
    return kw


def _ref_kw(kw, dtype=torch.float64):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


# ----------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("backend", FAST)
def test_matches_pytorch(backend, opts, reduction, dtype):
    _available(backend)
    x, w, b = make_inputs(dtype)
    t = make_target((N,))
    kw = _kwargs(opts)
    check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(
            x, w, t, linear_bias=b, reduction=reduction, options=CHUNKED, backend=backend, **_ref_kw(kw, dtype)),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, **_ref_kw(kw, x.dtype)),
        (x, w, b), f"{backend} {reduction} {opts}",
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_pytorch_triton(reduction):
    """The triton kernels (interpreter) under the chunking: 2 chunks, weight and smoothing."""
    _available("triton")
    x, w, b = make_inputs(torch.float32, n=6)
    t = make_target((6,))
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(
            x, w, t, linear_bias=b, weight=cw.float(), reduction=reduction, label_smoothing=0.2, backend="triton",
            options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4)),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, cw.to(x.dtype), reduction=reduction, label_smoothing=0.2),
        (x, w, b), f"triton {reduction}",
    )


@pytest.mark.parametrize("chunk", [1, 3, 5, 12, 13, 64, None])
def test_chunk_boundaries(chunk):
    """Every chunk size gives PyTorch's result (rows of every kind on both sides of the
    boundaries; None = the default chunk, one chunk here)."""
    x, w, b = make_inputs(torch.float64)
    t = make_target((N,))
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk) if chunk else None
    for reduction in REDUCTIONS:
        check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, options=opts,
                                                           label_smoothing=0.1),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1),
            (x, w, b), f"chunk {chunk} {reduction}",
        )


@pytest.mark.parametrize("backend", FAST)
def test_batched_and_unbatched_input(backend):
    """(B, T, H) input with (B, T) target ("none" gives (B, T)), and an unbatched (H,) input."""
    _available(backend)
    x, w, b = make_inputs(torch.float64, lead=(3, 5))
    t = make_target((3, 5))
    for reduction in REDUCTIONS:
        out, _ = check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                           options=CHUNKED, backend=backend),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b).permute(0, 2, 1), t, reduction=reduction),
            (x, w, b), f"(B, T, H) {reduction}",
        )
        assert out.shape == ((3, 5) if reduction == "none" else ())
    x1 = x[1, 2]
    for reduction in REDUCTIONS:
        out, _ = check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, torch.tensor(4), linear_bias=b, reduction=reduction,
                                                           backend=backend),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), torch.tensor(4), reduction=reduction),
            (x1, w, b), f"(H,) {reduction}",
        )
        assert out.shape == ()


@pytest.mark.parametrize("backend", FAST)
def test_probability_targets(backend):
    """Class probabilities of the logits' shape, as torch's linear_cross_entropy accepts them;
    the soft target and the class weight get PyTorch's gradients (distillation)."""
    _available(backend)
    x, w, b = make_inputs(torch.float64)
    y = torch.softmax(torch.randn(N, V, dtype=torch.float64), 1)
    y[2] = F.one_hot(torch.tensor(3), V)
    cw = torch.rand(V, dtype=torch.float64) + 0.5
    for reduction in REDUCTIONS:
        check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                                           label_smoothing=0.1, options=CHUNKED, backend=backend),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), y.to(x.dtype), cw.to(x.dtype), reduction=reduction,
                                            label_smoothing=0.1),
            (x, w, b), f"probabilities {reduction}",
        )
        fn = lambda y, cw: fusedloss.linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction,
                                                          label_smoothing=0.1, options=CHUNKED, backend=backend)
        out, (gy, gw) = run(fn, (y, cw))
        exp, (ey, ew) = run(lambda y, cw: F.cross_entropy(F.linear(x, w, b), y, cw, reduction=reduction,
                                                          label_smoothing=0.1), (y, cw))
        check_close(gy, ey, torch.float64, f"probabilities {reduction}: target gradient", grad=True)
        check_close(gw, ew, torch.float64, f"probabilities {reduction}: class weight gradient", grad=True)
    y3 = y.reshape(1, N, V).expand(2, N, V).clone()  # (B, T, V) targets of a (B, T, H) input
    x3 = torch.stack([x, x.flip(0)])
    out, (gy,) = run(lambda y: fusedloss.linear_cross_entropy(x3, w, y, reduction="none", options=CHUNKED,
                                                              backend=backend), (y3,))
    exp, (ey,) = run(lambda y: F.cross_entropy(F.linear(x3, w).permute(0, 2, 1), y.permute(0, 2, 1),
                                               reduction="none"), (y3,))
    check_close(out, exp, torch.float64, "(B, T, V) probabilities")
    check_close(gy, ey, torch.float64, "(B, T, V) probabilities: target gradient", grad=True)


@pytest.mark.parametrize("backend", FAST)
def test_kdim_weight(backend):
    """linear_weight (C, d, H) and bias (C, d): the K-dimensional loss torch accepts."""
    _available(backend)
    x, _, _ = make_inputs(torch.float64)
    w = torch.randn(5, 3, H, dtype=torch.float64)
    b = torch.randn(5, 3, dtype=torch.float64)
    t = make_target((N, 3), vocab=5)
    for reduction in REDUCTIONS:
        out, _ = check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                           label_smoothing=0.1, options=CHUNKED, backend=backend),
            lambda x, w, b: F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1),
            (x, w, b), f"K-dim {reduction}",
        )
        assert out.shape == ((N, 3) if reduction == "none" else ())


@pytest.mark.parametrize("ignore_index", [-100, -1, 3, None])
def test_ignore_index(ignore_index):
    x, w, b = make_inputs(torch.float64)
    ii = -100 if ignore_index is None else ignore_index
    t = make_target((N,), ignore_index=ii)
    for reduction in REDUCTIONS:
        check_fused(
            lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction,
                                                           ignore_index=ignore_index, options=CHUNKED),
            lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, ignore_index=ii),
            (x, w, b), f"ignore_index={ignore_index} {reduction}",
        )


# ----------------------------------------------------------------------------- the extras, -inf rules
EXTRAS = {
    "z_loss": dict(z_loss=1e-2),
    "z_loss+weight": dict(z_loss=1e-2, weight=True),
    "softcap": dict(softcap=2.5),
    "mask (V,)": dict(mask="V"),
    "mask (N, V)+smoothing": dict(mask="NV", label_smoothing=0.3),
    "mask+weight+smoothing+softcap+z": dict(mask="NV", weight=True, label_smoothing=0.3, softcap=4.0, z_loss=1e-3),
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("case", EXTRAS.values(), ids=EXTRAS.keys())
@pytest.mark.parametrize("backend", FAST)
def test_extras_and_inf_rules(backend, case, reduction):
    """The cross-entropy extras and SPEC rules 1-6 through the head: -inf bias entries mask
    classes, a row whose classes are all masked is empty (not counted), a masked target gives
    +inf with the finite gradient, ignored rows give exactly 0 -- against
    fusedloss.cross_entropy(backend="torch") on the float64 logits."""
    _available(backend)
    kw = _kwargs(case)
    form = kw.pop("mask", None)
    x, w, b = make_inputs(torch.float64)
    b[[2, 9]] = -INF  # classes 2 and 9 are masked on every row
    t = make_target((N,))
    t[(t == 2) | (t == 9)] = 0
    mask = None
    if form == "V":
        mask = torch.ones(V, dtype=torch.bool)
        mask[4] = False  # rows whose target is 4: +inf (rule 4)
    elif form == "NV":
        mask = torch.rand(N, V) > 0.3
        mask[6] = False  # row 6: empty
        mask[7, :] = True
        t[7], mask[7, 5] = 5, False  # row 7: its target is masked -> +inf
        allowed = mask.clone()
        allowed[:, [2, 9]] = False
        for i in range(N):  # the other targets on allowed classes
            if t[i] >= 0 and i != 7 and allowed[i].any():
                t[i] = int(torch.multinomial(allowed[i].double(), 1))
    fused, grads = check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, mask=mask,
                                                       options=CHUNKED, backend=backend, **kw),
        lambda x, w, b: fusedloss.cross_entropy(F.linear(x, w, b), t, reduction=reduction, mask=mask,
                                                backend="torch", **kw),
        (x, w, b), f"{case} {reduction}",
    )
    assert torch.isfinite(grads[0]).all() and torch.isfinite(grads[1]).all(), "non-finite gradient"
    assert torch.equal(grads[2][[2, 9]], torch.zeros(2, dtype=torch.float64)), "masked class has a bias gradient"
    assert torch.equal(grads[0][0], torch.zeros(H, dtype=torch.float64)), "ignored row 0 has an input gradient"


def test_ignored_rows_with_nan_and_mean_over_nothing():
    """An ignored row whose logits are NaN leaves no trace in the loss or the input gradient
    (rule 2; its dlogits row is exactly 0; dW = dlogits.T @ X still meets the NaN hidden state,
    0 * NaN, as in PyTorch); "mean" over no counted row is 0 with zero gradients (rule 6)."""
    x, w, b = make_inputs(torch.float64)
    x[5] = NAN
    t = make_target((N,))
    out, grads = run(lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, options=CHUNKED), (x, w, b))
    keep = torch.arange(N) != 5
    exp, exp_grads = run(lambda x, w, b: F.cross_entropy(F.linear(x[keep], w, b), t[keep], reduction="sum") / (t != -100).sum(),
                         (x, w, b))
    check_close(out, exp, torch.float64, "loss with an ignored NaN row")
    check_close(grads[0], exp_grads[0], torch.float64, "input gradient with an ignored NaN row", grad=True)
    check_close(grads[2], exp_grads[2], torch.float64, "bias gradient with an ignored NaN row", grad=True)
    x[5] = 1.0
    t_none = torch.full((N,), -100)
    out, grads = run(lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t_none, linear_bias=b, options=CHUNKED),
                     (x, w, b))
    assert out.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    empty = torch.empty(0, H, dtype=torch.float64)
    out, grads = run(lambda x, w, b: fusedloss.linear_cross_entropy(x, w, torch.empty(0, dtype=torch.long),
                                                                     linear_bias=b), (empty, w, b))
    assert out.item() == 0.0 and torch.equal(grads[1], torch.zeros_like(w))


def test_counted_nan_row_propagates():
    """Rule 8: NaN in a counted row reaches the loss."""
    x, w, b = make_inputs(torch.float64)
    x[3] = NAN
    t = make_target((N,))
    out = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, options=CHUNKED)
    assert torch.isnan(out)


# ----------------------------------------------------------------------------- precision, determinism
@pytest.mark.parametrize("backend", FAST)
def test_bfloat16_weight_gradient_accumulates_in_float32(backend):
    """64 chunks of one row: a bfloat16 dW accumulated in bfloat16 would be ~64 roundings off;
    accumulated in float32 it is one rounding from the float64 reference (of the bf16 input)."""
    _available(backend)
    x, w, b = make_inputs(torch.bfloat16, n=64, hidden=16, vocab=32)
    t = make_target((64,), vocab=32)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=1)
    out, grads = check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", options=opts,
                                                       backend=backend),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction="sum"),
        (x, w, b), "bf16", dtype=torch.bfloat16,
    )
    _, exp = run(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction="sum"), (x, w, b), torch.float64)
    for name, g, e in zip(("linear_weight", "linear_bias"), grads[1:], exp[1:]):
        # the reference's logits are not rounded to bf16: allow that, a few bf16 ulps of |e|
        err = (g.double() - e).abs()
        assert (err <= 4 * 2.0**-8 * e.abs() + 0.05).all(), f"{name}: max error {err.max():.3g}"
        assert g.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", FAST)
def test_deterministic(backend):
    _available(backend)
    x, w, b = make_inputs(torch.float32, n=200, hidden=32, vocab=300)
    t = make_target((200,), vocab=300)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=37)
    fn = lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, label_smoothing=0.1, options=opts,
                                                        backend=backend)
    (o1, g1), (o2, g2) = run(fn, (x, w, b)), run(fn, (x, w, b))
    check_exact(o2, o1, "loss of two identical calls")
    for name, a, c in zip(("dX", "dW", "db"), g2, g1):
        check_exact(a, c, f"{name} of two identical calls")


@pytest.mark.parametrize("backend", ALL)
def test_gradcheck(backend):
    _available(backend)
    n = 5 if backend == "triton" else 7
    x, w, b = (t.requires_grad_() for t in make_inputs(torch.float64, n=n, hidden=3, vocab=4))
    t = make_target((n,), vocab=4)
    cw = torch.rand(4, dtype=torch.float64) + 0.5
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=3)
    for reduction in (REDUCTIONS if backend != "triton" else ["mean"]):
        fn = lambda x, w, b: fusedloss.linear_cross_entropy(
            x, w, t, linear_bias=b, weight=cw, reduction=reduction, label_smoothing=0.2, softcap=3.0, options=opts,
            backend=backend)
        assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=backend == "triton")


def test_second_backward_and_double_backward():
    """retain_graph: a second backward (recomputed) equals the first; differentiating a
    gradient raises."""
    x, w, b = (t.requires_grad_() for t in make_inputs(torch.float64))
    t = make_target((N,))
    for reduction in REDUCTIONS:
        out = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, options=CHUNKED)
        go = grad_output(out)
        g1 = torch.autograd.grad(out, (x, w, b), go, retain_graph=True)
        g2 = torch.autograd.grad(out, (x, w, b), go)
        for name, a, c in zip(("dX", "dW", "db"), g2, g1):
            check_close(a, c, torch.float64, f"second backward {name} {reduction}", grad=True)
    out = fusedloss.linear_cross_entropy(x, w, t, linear_bias=b)
    (gx,) = torch.autograd.grad(out, (x,), create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_partial_gradients_and_no_grad():
    """Only what requires grad gets a gradient; under no_grad nothing is computed beyond the loss."""
    x, w, b = make_inputs(torch.float64)
    t = make_target((N,))
    exp = F.cross_entropy(F.linear(x, w, b), t)
    wl = w.clone().requires_grad_()
    out = fusedloss.linear_cross_entropy(x, wl, t, linear_bias=b, options=CHUNKED)
    out.backward()
    ref_w = w.clone().requires_grad_()
    F.cross_entropy(F.linear(x, ref_w, b), t).backward()
    check_close(wl.grad, ref_w.grad, torch.float64, "dW alone", grad=True)
    with torch.no_grad():
        out = fusedloss.linear_cross_entropy(x.requires_grad_(), w, t, linear_bias=b, options=CHUNKED)
    assert not out.requires_grad
    check_close(out, exp, torch.float64, "loss under no_grad")


def test_chunking_and_memory():
    """options.batch_chunk_size sets the rows per ce_fwd call, and a step never holds the N x V
    logits: its peak extra memory (profiler allocation events, as bench/ measures it) stays
    below one N x V float32 buffer (the gradients dX, dW, db and one chunk are far less)."""
    from fusedloss import _backend

    n, hidden, vocab = 2048, 16, 2000
    x, w, _ = make_inputs(torch.float32, n=n, hidden=hidden, vocab=vocab, bias=False)
    t = make_target((n,), vocab=vocab)
    impl = _backend.resolve("auto", x.device)
    rows = []
    original = impl.ce_fwd

    def counting(logits, *args):
        rows.append(logits.shape[0])
        return original(logits, *args)

    impl.ce_fwd = counting
    try:
        fusedloss.linear_cross_entropy(x, w, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=300))
    finally:
        impl.ce_fwd = original
    assert rows == [300] * 6 + [248], rows

    from torch.profiler import ProfilerActivity, profile

    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fusedloss.linear_cross_entropy(xl, wl, t, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=128)).backward()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    logits_bytes = n * vocab * 4
    floor = (n * hidden + vocab * hidden + 128 * vocab) * 4
    assert peak < floor + logits_bytes // 4, f"peak {peak} B, N x V logits {logits_bytes} B, floor {floor} B"


# ----------------------------------------------------------------------------- module, options
def test_module_matches_torch_module():
    for out_features, bias in (((), True), ((3,), True), ((), False)):
        torch.manual_seed(1)
        ref = torch.nn.LinearCrossEntropyLoss(H, 5, out_features=out_features, bias=bias, dtype=torch.float64,
                                              label_smoothing=0.1)
        mod = fusedloss.nn.LinearCrossEntropyLoss(H, 5, out_features=out_features, bias=bias, dtype=torch.float64,
                                                  label_smoothing=0.1, options=CHUNKED)
        mod.load_state_dict(ref.state_dict())
        x = torch.randn(N, H, dtype=torch.float64)
        t = make_target((N,) + out_features, vocab=5)
        exp = ref(x, t)
        exp.backward()
        out = mod(x, t)
        out.backward()
        check_close(out, exp, torch.float64, f"module loss {out_features} bias={bias}")
        for (name, p), q in zip(mod.named_parameters(), ref.parameters()):
            check_close(p.grad, q.grad, torch.float64, f"module {name} gradient", grad=True)
        mask = torch.ones((5,) + out_features, dtype=torch.bool)
        mask[1] = False
        t2 = torch.where(t == 1, 0, t)
        check_close(mod(x, t2, mask), fusedloss.cross_entropy(
            F.linear(x, mod.linear.weight, mod.linear.bias).reshape((N, 5) + out_features), t2,
            label_smoothing=0.1, mask=mask.reshape((5,) + out_features)), torch.float64, "module with a mask")


def test_options_chunking_method():
    """An aspect-ratio chunking_method is honoured like batch_chunk_size (torch's rule)."""
    x, w, b = make_inputs(torch.float64, n=40, hidden=8, vocab=16)
    t = make_target((40,), vocab=16)
    opts = torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio:2")
    check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, options=opts),
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t), (x, w, b), "aspect_ratio:2",
    )


def test_mask_broadcast_over_sequences():
    """A (B, 1, V) mask on (B, T, H) input: the lead dims do not merge in a view, so the
    chunk's rows are gathered."""
    x, w, b = make_inputs(torch.float64, lead=(3, 5))
    mask = torch.rand(3, 1, V) > 0.2
    mask[..., 0] = True
    t = torch.where(mask.expand(3, 5, V).gather(2, make_target((3, 5)).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                    make_target((3, 5)).clamp_min(0), 0)
    check_fused(
        lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, mask=mask, options=CHUNKED),
        lambda x, w, b: fusedloss.cross_entropy(F.linear(x, w, b).permute(0, 2, 1), t, mask=mask.permute(0, 2, 1),
                                                backend="torch"),
        (x, w, b), "(B, 1, V) mask",
    )


def test_autocast():
    """Under autocast, as eager there: the head's matmul in bfloat16 (float32 operands cast),
    the loss in float32, float32 gradients for the float32 leaves."""
    x, w, b = make_inputs(torch.float32)
    t = make_target((N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = run(lambda x, w, b: fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, options=CHUNKED),
                         (x, w, b))
        exp, exp_grads = run(lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t), (x, w, b))
    assert out.dtype == exp.dtype == torch.float32
    check_close(out, exp, torch.bfloat16, "loss under autocast")
    for name, g, e in zip(("input", "linear_weight", "linear_bias"), grads, exp_grads):
        assert g.dtype == torch.float32
        check_close(g, e, torch.bfloat16, f"{name} gradient under autocast", grad=True)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(reduction):
    """torch.compile(fullgraph=True) traces the chunk loop and the ops (torch's chunked loss
    falls back to eager there): the compiled loss and gradients equal PyTorch's formula."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    x, w, b = make_inputs(torch.float32)
    t = make_target((N,))
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter, fullgraph=True)
    def loss_fn(x, w, b):
        return fusedloss.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1,
                                              options=CHUNKED, backend="cpu")

    check_fused(loss_fn,
                lambda x, w, b: F.cross_entropy(F.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1),
                (x, w, b), f"compiled {reduction}")
    assert counter.frame_count == 1


def test_caller_tensors_unmodified():
    x, w, b = make_inputs(torch.float32)
    t = make_target((N,))
    before = [v.clone() for v in (x, w, b, t)]
    xl, wl, bl = (v.clone().requires_grad_() for v in (x, w, b))
    fusedloss.linear_cross_entropy(xl, wl, t, linear_bias=bl, options=CHUNKED).backward()
    for a, c in zip((xl, wl, bl, t), before):
        check_exact(a.detach(), c, "caller's tensor")


# ----------------------------------------------------------------------------- bad input
def test_bad_input():
    x, w, b = make_inputs(torch.float32)
    t = make_target((N,))
    lce = fusedloss.linear_cross_entropy
    with pytest.raises(ValueError, match=r"(?s)linear_weight.*in_features.*input.*8.*7"):
        lce(x, w[:, :7], t)
    with pytest.raises(TypeError, match=r"linear_weight.*float32.*float64"):
        lce(x, w.double(), t)
    with pytest.raises(ValueError, match=r"linear_bias.*\(11,\).*\(10,\)"):
        lce(x, w, t, linear_bias=b[:10])
    with pytest.raises(TypeError, match=r"linear_bias.*float32.*bfloat16"):
        lce(x, w, t, linear_bias=b.bfloat16())
    with pytest.raises(ValueError, match=r"target.*\(13,\).*\(12,\)"):
        lce(x, w, t[:12])
    with pytest.raises(ValueError, match=r"weight.*\(11,\).*\(3,\)"):
        lce(x, w, t, weight=torch.ones(3))
    with pytest.raises(NotImplementedError, match="weight"):
        lce(x, w, t, weight=torch.ones(V, requires_grad=True))
    with pytest.raises(ValueError, match="mask"):
        lce(x, w, t, mask=torch.ones(4, V, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        lce(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        lce(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="batched input"):
        lce(x.unsqueeze(0), w.reshape(V, 1, H), t.unsqueeze(0))
    with pytest.raises(TypeError, match="target"):
        lce(x, w, t.to(torch.uint8))
    for backend in FAST:
        for bad in (V, -5):
            tb = t.clone()
            tb[6] = bad
            with pytest.raises(IndexError, match=rf"(?s)(?=.*{bad})(?=.*{V})"):
                lce(x, w, tb, options=CHUNKED, backend=_available(backend))
