"""Shared fixtures and helpers of the fusedloss test suite (the only place helpers live).

References are PyTorch's own functions evaluated in float64 on the (rounded) input --
never outputs of fusedloss. Tolerances are SPEC section 5.
"""
import os

# The triton backend runs on CPU tensors only in the interpreter; this must be set before
# anything imports triton (fusedloss imports it). FUSEDLOSS_TEST_GPU=1 leaves it unset, for
# tests/test_gpu.py on a GPU machine (the real compiler, CUDA tensors).
if os.environ.get("FUSEDLOSS_TEST_GPU") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedloss  # noqa: E402

BACKENDS = ["cpu", "torch", "triton"]
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]
INF = float("inf")
NAN = float("nan")

# SPEC section 5: (loss rel, loss abs, gradient abs per element)
TOLERANCES = {
    torch.float64: (1e-10, 1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6, 1e-6),
    torch.bfloat16: (1e-2, 1e-3, 1e-2),
    torch.float16: (1e-2, 1e-3, 1e-2),
}


# One ulp of each dtype, relative: the gradient is a value of the input's dtype, so it can be no
# closer than half an ulp of itself (see check_close).
GRAD_ULP_REL = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Every backend; one that cannot run here fails the test (CI builds the extension and
    installs triton), it never skips."""
    reason = fusedloss.backends("cpu")[request.param]
    if reason is not None:
        pytest.fail(f"backend {request.param!r} is unavailable: {reason}")
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def dtype(request):
    return request.param


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny shapes (pytestmark = pytest.mark.usefixtures("one_thread")): one
    intra-op thread. Two threads gain nothing there and, on a loaded 2-core machine (pytest
    -n 2), each parallel op can wait ~30 ms for a descheduled thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- inputs
def make_logits(shape, dtype=torch.float32, scale=3.0):
    """Random logits, drawn in float64 and rounded to dtype."""
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


def make_target(shape, num_classes, ignore_index=-100, n_ignored=1):
    """Random class indices, the first n_ignored set to ignore_index."""
    t = torch.randint(0, num_classes, shape)
    t.view(-1)[:n_ignored] = ignore_index
    return t


# ----------------------------------------------------------------------------- comparisons
def check_close(actual, expected, dtype, what, grad=False):
    """Assert SPEC section 5 tolerances for `dtype` (loss: rel and abs; gradient: abs per
    element). Infinities must match exactly and NaN where expected is NaN. The message gives
    the max abs/rel error and where it is."""
    rel, abs_, gabs = TOLERANCES[dtype]
    if grad:
        # The gradient is a value of the input's dtype, so it can be no closer than half an
        # ulp of itself: for |g| > 1 in bfloat16 that alone exceeds 1e-2 abs, for |g| > 16 in
        # float32 it exceeds 1e-6 (a soft target's gradient -w log p, a BCE gradient with a
        # large weight). Gradients therefore get, beside SPEC's abs tolerance, one ulp relative
        # (the kernel's rounding plus the rounding of the grad_output scaling in backward).
        rel, abs_ = GRAD_ULP_REL[dtype], gabs
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at {nan_a.nonzero().tolist()}, expected NaN at {nan_e.nonzero().tolist()}"
    inf_e = torch.isinf(expected)
    assert torch.equal(actual[inf_e], expected[inf_e]) and not torch.isinf(actual[~inf_e]).any(), (
        f"{what}: infinities differ:\nactual   {actual}\nexpected {expected}"
    )
    finite = ~(nan_e | inf_e)
    a, e = actual[finite], expected[finite]
    if a.numel() == 0:
        return
    err = (a - e).abs()
    bad = err > abs_ + rel * e.abs()
    if bad.any():
        i = int(err.argmax())
        where = finite.nonzero()[i].tolist()
        rel_err = (err / e.abs().clamp_min(1e-300)).max().item()
        raise AssertionError(
            f"{what} ({dtype}): {int(bad.sum())}/{a.numel()} elements out of tolerance (rel {rel}, abs {abs_}); "
            f"max abs error {err.max().item():.3e} at {where} (actual {a[i].item():.10g}, expected {e[i].item():.10g}), "
            f"max rel error {rel_err:.3e}"
        )


def check_exact(actual, expected, what):
    """Bitwise equality (NaN == NaN), with a message."""
    ok = actual.shape == expected.shape and actual.dtype == expected.dtype
    ok = ok and torch.equal(torch.nan_to_num(actual, nan=1.5), torch.nan_to_num(expected, nan=1.5))
    ok = ok and torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert ok, f"{what} differs:\nactual   {actual}\nexpected {expected}"


def grad_output_for(out):
    """A non-trivial grad_output: 0.75 for a scalar, varied multiples of 1/4 (exact in every
    dtype) for per-element losses."""
    if out.dim() == 0:
        return torch.full_like(out, 0.75)
    g = torch.arange(out.numel(), dtype=torch.float64).remainder(7).add(1).div(4)
    return g.reshape(out.shape).to(out.dtype)


def value_and_grad(fn, x):
    """fn(x) on a fresh leaf copy of x (strides kept when dense), and d(out . grad_output)/dx
    with grad_output from grad_output_for."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad_output_for(out))
    return out.detach(), leaf.grad


def reference(fn, x):
    """PyTorch's formula `fn` evaluated in float64 on x rounded to its dtype (x is upcast
    after rounding): returns (value, gradient), with the same grad_output as value_and_grad."""
    return value_and_grad(fn, x.detach().to(torch.float64))


def check_against(fused, ref, x, what=""):
    """fused(x) against ref(float64 x): value and gradient within SPEC section 5."""
    out, grad = value_and_grad(fused, x)
    exp, exp_grad = reference(ref, x)
    assert out.dtype == x.dtype, f"{what}: result dtype {out.dtype}, expected the input's {x.dtype}"
    check_close(out, exp, x.dtype, f"{what} loss")
    check_close(grad, exp_grad, x.dtype, f"{what} gradient", grad=True)
    return out, grad


# ----------------------------------------------------------------------------- -inf rules
def allowed_rows_reference(row_loss, x64, target, allowed, ignore_index=-100):
    """Per-row losses for the -inf rules, derived by hand: row i's loss is PyTorch's own
    `row_loss(sub (1, |A_i|), sub_target (1,), cols)` on the sub-matrix of its allowed classes
    A_i (cols: their indices), with the target renumbered inside A_i. Ignored and empty rows
    are 0 (and give gradient 0). x64 (N, C) float64 leaf; target (N,); allowed (N, C) bool.
    Returns (losses (N,), counted (N,) bool). The target must be allowed on counted rows."""
    losses, counted = [], []
    for i in range(x64.shape[0]):
        t = int(target[i])
        cols = allowed[i].nonzero().flatten()
        if t == ignore_index or cols.numel() == 0:
            keep_graph = torch.zeros_like(x64[i], dtype=torch.bool)  # zero gradient, no 0 * inf
            losses.append(torch.where(keep_graph, x64[i], 0.0).sum())
            counted.append(False)
            continue
        assert bool(allowed[i, t]), "allowed_rows_reference: the target of a counted row must be allowed"
        sub_t = int(allowed[i, :t].sum())
        losses.append(row_loss(x64[i, cols].unsqueeze(0), torch.tensor([sub_t]), cols).reshape(()))
        counted.append(True)
    return torch.stack(losses), torch.tensor(counted)


def reduce_rows(losses, counts, reduction):
    """'none' / 'sum' / 'mean' (over `counts`, 0 when nothing counts: SPEC rule 6)."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    total = counts.sum()
    return losses.sum() / total if total > 0 else losses.sum() * 0


def class_masked_ce_reference(t, weight, keep, ignore_index, reduction, eps=0.0, z_loss=0.0, softcap=0.0):
    """Cross-entropy of (N, C, ...) float64 logits over the allowed classes `keep` (a class
    mask no counted target hits, so PyTorch's own function on those columns is the
    reference), with softcap (cap tanh(x / cap)) and z-loss (+ z w_t logsumexp^2), reduced as
    PyTorch reduces: a function of the logits, for check_against."""
    counted = t != ignore_index
    t_kept = torch.full_like(t, ignore_index)
    for i, c in enumerate(keep):
        t_kept[t == c] = i
    w = None if weight is None else weight.double()[keep]

    def ref(x64):
        z = softcap * torch.tanh(x64 / softcap) if softcap else x64
        z = z[:, keep]
        rows = F.cross_entropy(z, t_kept, w, ignore_index=ignore_index, label_smoothing=eps, reduction="none")
        w_t = torch.ones_like(rows) if w is None else w[t_kept.clamp(0, len(keep) - 1)]
        w_t = torch.where(counted, w_t, 0.0)
        rows = rows + z_loss * w_t * torch.logsumexp(z, 1) ** 2
        return reduce_rows(rows, w_t, reduction)

    return ref


def gradcheck(fn, x, backend):
    """torch.autograd.gradcheck in float64. The triton backend runs in the (slow) interpreter
    here, so it gets fast mode: one random projection instead of one column per element."""
    assert x.dtype == torch.float64
    leaf = x.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (leaf,), fast_mode=backend == "triton")


def snapshot(*tensors):
    """Copies of the caller's tensors, to check later that nothing was modified."""
    return [None if t is None else t.detach().clone() for t in tensors]


def check_unmodified(before, *tensors):
    for i, (b, t) in enumerate(zip(before, tensors)):
        if b is not None:
            check_exact(t.detach(), b, f"caller's tensor #{i}")


def check_deterministic(fn, x):
    """Same input twice -> bitwise the same output and gradient (SPEC section 4)."""
    (out1, g1), (out2, g2) = value_and_grad(fn, x), value_and_grad(fn, x)
    check_exact(out2, out1, "loss of two identical calls")
    check_exact(g2, g1, "gradient of two identical calls")


def check_out_of_range(loss_fn, backend, num_classes):
    """SPEC 6 / formulas "out of range": `loss_fn(x, target)` (reduction "none") raises an
    IndexError naming the value and C on CPU tensors; the triton backend (GPU semantics, run
    here by the interpreter) never reads out of bounds and gives that row NaN and gradient 0."""
    for bad in (num_classes, -5):
        x = torch.randn(3, num_classes, requires_grad=True)
        t = torch.tensor([0, bad, 2])
        if backend == "triton":
            out = loss_fn(x, t)
            out.backward(torch.ones(3))
            assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all(), out
            assert (x.grad[1] == 0).all(), x.grad
        else:
            with pytest.raises(IndexError, match=rf"(?s)(?=.*{bad})(?=.*{num_classes})"):
                loss_fn(x, t)


# ----------------------------------------------------------------------------- BCE limits
def infinite_logit_cases(dtype=torch.float64):
    """Rule 12 cases, derived by hand: (x, y, weight, pos_weight, expected BCE loss, expected
    BCE gradient). Where the label agrees with the infinite logit: loss 0, gradient 0; where it
    does not: loss +inf and the finite limit gradient (1 - y) * w at +inf, -pw * y * w at -inf;
    weight 0: loss 0 and gradient 0 whatever the logit."""
    rows = [
        # x,    y,   w,   pw,  loss, grad
        (-INF, 0.0, 1.0, 2.0, 0.0, 0.0),
        (INF, 1.0, 1.0, 2.0, 0.0, 0.0),
        (-INF, 1.0, 1.0, 2.0, INF, -2.0),
        (INF, 0.0, 0.5, 2.0, INF, 0.5),
        (INF, 0.25, 1.0, 3.0, INF, 0.75),
        (-INF, 0.25, 2.0, 3.0, INF, -1.5),
        (INF, 0.0, 0.0, 2.0, 0.0, 0.0),
        (-INF, 1.0, 0.0, 2.0, 0.0, 0.0),
    ]
    cols = [torch.tensor(c, dtype=dtype) for c in zip(*rows)]
    return [c.reshape(2, 4) for c in cols]
