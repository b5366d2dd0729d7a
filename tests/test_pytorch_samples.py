"""PyTorch's own sample inputs (the OpInfo database its test suite runs) through fusedloss.

For every OpInfo entry of a function fusedloss replaces -- `nn.functional.cross_entropy`,
`nn.functional.binary_cross_entropy_with_logits` and `nn.functional.linear_cross_entropy`
(its variants "", "chunked", "chunked_none") -- each sample of
`op.sample_inputs("cpu", dtype, requires_grad=True)` is passed, with the same args and kwargs,
to fusedloss's function on every backend, for float64, float32, bfloat16 and float16 (each
where PyTorch's op supports it on the CPU). Compared, against PyTorch's own function
evaluated in float64 on the same (rounded) inputs:
- the value, its dtype and shape (dtype and shape against PyTorch at the sample's dtype);
- every gradient PyTorch gives: the input, a target the sample differentiates (probability
  targets), and each other floating argument PyTorch differentiates (the class weight with
  probability targets; linear_weight and linear_bias), with conftest's grad_output_for;
- every floating argument PyTorch refuses to differentiate (the class weight with class
  indices, BCE weight and pos_weight): fusedloss refuses it too, with NotImplementedError
  naming it (SPEC section 3).
Tolerances are SPEC section 5 (conftest.check_close), except for linear_cross_entropy:
its logits are a matmul rounded to the input dtype (so are PyTorch's own), which SPEC
section 5 -- a tolerance on the loss of given logits -- does not cover, and the OpInfo
inputs are large (|x|, |W| up to 9: logits up to ~650, where one bfloat16 ulp is 4). There
the tolerance is SPEC section 5 plus the effect of that rounding, bounded rigorously
(_lce_reference); it is ~1e-4 relative in float32, and ~O(1) in half precision, where these
inputs are that ill-conditioned (PyTorch's own bfloat16 result is as far off).

The only SPEC difference the samples reach is rule 6: a "mean" with class-index targets
whose (weighted) denominator is 0 -- every target equal to ignore_index, or class weights
of the counted targets that sum to 0. The `ignore_index=1` samples draw their targets from
{0, 1, 2}, so that happens by chance only (not with conftest's seed); each op therefore
also runs its first such sample with every target set to ignore_index ("all ignored"). The
case is detected from the sample's data (_zero_denominator_mean), PyTorch's NaN there is
asserted (the difference is real, not assumed), and fusedloss's documented answer -- 0 with
zero gradients (README: a "mean" whose weighted denominator is 0 returns 0) -- is asserted
exactly. Any other non-finite reference fails the test: it would be a new deliberate
difference to identify.

Runtime: the triton backend runs in the interpreter (~0.3 s a linear_cross_entropy call),
so on triton linear_cross_entropy runs one sample in TRITON_LCE_STRIDE of each variant (the
samples cycle through 7 shapes in groups of 14 per kwargs set; a stride of 11, coprime with
both, reaches every shape and both target kinds); cross_entropy and BCE run every sample on
every backend.
"""
import functools
import re

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from conftest import GRAD_ULP_REL, TOLERANCES, check_close, check_exact, grad_output_for

OPS = {
    # id: (OpInfo name, variant, fusedloss function)
    "cross_entropy": ("nn.functional.cross_entropy", "", fusedloss.cross_entropy),
    "bce_with_logits": ("nn.functional.binary_cross_entropy_with_logits", "", fusedloss.binary_cross_entropy_with_logits),
    "linear_cross_entropy": ("nn.functional.linear_cross_entropy", "", fusedloss.linear_cross_entropy),
    "linear_cross_entropy.chunked": ("nn.functional.linear_cross_entropy", "chunked", fusedloss.linear_cross_entropy),
    "linear_cross_entropy.chunked_none": ("nn.functional.linear_cross_entropy", "chunked_none", fusedloss.linear_cross_entropy),
}
SAMPLE_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TRITON_LCE_STRIDE = 11


@functools.cache
def _opinfo(name, variant):
    """The OpInfo entry (imported lazily: the database takes seconds to import and needs
    `expecttest`, which run.sh installs)."""
    from torch.testing._internal.common_methods_invocations import op_db

    (op,) = [o for o in op_db if o.name == name and o.variant_test_name == variant]
    return op


# ----------------------------------------------------------------------------- one sample
def _named(sample):
    """[(name, value)] for the input, the positional args and the kwargs of a sample."""
    return [("input", sample.input)] + [(f"args[{i}]", a) for i, a in enumerate(sample.args)] + list(sample.kwargs.items())


def _public(k, is_lce):
    """The argument's name in fusedloss's signature (and its messages)."""
    positional = ("linear_weight", "target") if is_lce else ("target",)
    return positional[int(k[5:-1])] if k.startswith("args[") else k


def _describe(named):
    def d(v):
        if isinstance(v, torch.Tensor):
            return f"{str(v.dtype).replace('torch.', '')}{tuple(v.shape)}{'*' if v.requires_grad else ''}"
        return repr(v)

    return "(" + ", ".join(f"{k}={d(v)}" for k, v in named) + ")"


def _call(fn, named, cast=None, grad=(), **extra):
    """fn on fresh copies of the sample's tensors (floating ones cast to `cast`), the names in
    `grad` as leaves that require grad. Returns (out, {name: leaf})."""
    leaves = {}
    vals = []
    for k, v in named:
        if k == "options" and cast == torch.float64:
            v = None  # chunking only; its acc_dtype (float32 for a half-precision sample) refuses float64
        if isinstance(v, torch.Tensor):
            v = v.detach().clone()
            if cast is not None and v.is_floating_point():
                v = v.to(cast)
            if k in grad:
                v.requires_grad_(True)
                leaves[k] = v
        vals.append((k, v))
    args = [v for k, v in vals if k.startswith("args[")]
    kwargs = {k: v for k, v in vals if k != "input" and not k.startswith("args[")}
    return fn(vals[0][1], *args, **kwargs, **extra), leaves


def _pytorch_differentiates(op, named, name):
    """Whether PyTorch's op (float64) differentiates `name` (with the input)."""
    try:
        out, leaves = _call(op.op, named, torch.float64, grad={"input", name})
        torch.autograd.grad(out.sum(), list(leaves.values()))
    except RuntimeError as e:
        if "not differentiable" in str(e) or "cannot have requires_grad" in str(e):
            return False
        raise
    return True


def _zero_denominator_mean(named, reduction, is_lce):
    """SPEC rule 6 on this sample: reduction "mean" over class-index targets whose counted
    rows' weights sum to exactly 0 (all rows ignored, or weights that cancel)."""
    d = dict(named)
    target = d["args[1]" if is_lce else "args[0]"]
    if reduction != "mean" or target.is_floating_point():
        return False
    ignore = d.get("ignore_index", -100)
    ignore = -100 if ignore is None else ignore
    counted = target[target != ignore]
    w = d.get("weight")
    total = counted.numel() if w is None else w.detach().double()[counted].sum().item()
    return total == 0


def _grad(out, leaves, grad_output):
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_output, allow_unused=True)
    return dict(zip(names, grads))


def _check_within(actual, expected, tol, what):
    """|actual - expected| <= tol elementwise (tol: a tensor of expected's shape); NaN/inf must
    match as in check_close. The message gives the max error and where."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    err = (a - e).abs()
    bad = ~(err <= tol)  # NaN in actual counts as bad (the reference is finite here)
    if bad.any():
        i = int(torch.where(bad, err.nan_to_num(float("inf")), -1.0).argmax())
        where = list(torch.unravel_index(torch.tensor(i), e.shape)) if e.dim() else []
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{e.numel()} elements out of tolerance; worst at {[int(w) for w in where]}: "
            f"actual {a.flatten()[i].item():.10g}, expected {e.flatten()[i].item():.10g}, "
            f"error {err.flatten()[i].item():.3e} > tolerance {tol.flatten()[i].item():.3e}"
        )


UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _lce_reference(named, dtype, grad, g_out):
    """linear_cross_entropy's float64 reference and its tolerances.

    The reference is PyTorch's F.cross_entropy of the exact logits Z = input . W^T + b of the
    rounded inputs (float64), checked against PyTorch's own linear_cross_entropy. SPEC section
    5 bounds the loss of given logits; an implementation computes Z in the input dtype (so
    does PyTorch), with an error per logit of at most
        dZ = u |Z| + (H + 1) u_acc (|x| . |W|^T + |b|)        (u, u_acc: unit roundoffs)
    whose effect is added, bounded rigorously: per row (C logits, d = max dZ over the row),
    a_c = w_c y'_c (y' the smoothed one-hot or probability target), g the row's grad_output
    (over the denominator for "mean"):
      loss:           |d loss| <= 2 sum|a| d            (the gradient's l1 norm is <= 2 sum|a|)
      dloss/dZ:       g (sum(a) p - a): |d| <= |g| |sum a| p (e^{2d} - 1) + SPEC
      input, W, b:    dloss/dZ contracted with |W|, |x|, 1, plus the accumulation's
                      K u_acc (|dloss/dZ| contracted) and one ulp of the result
      target y_c:     -g w_c (1 - eps) log p_c: |d| <= |g w_c (1 - eps)| 2 d + SPEC
      class weight:   sum over rows of g y'_c (lse - z_c): |d| <= sum |g y'_c| 2 d + K u_acc sum|...|
    Returns (loss, {name: gradient}, {"loss" or name: tolerance tensor})."""
    d = dict(named)
    f64 = {k: v.detach().double().requires_grad_(k in grad) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in named}
    f64.pop("options", None)  # chunking only: no part of the value
    x, w_lin, target = f64["input"], f64["args[0]"], f64["args[1]"]
    bias, cw = f64.get("linear_bias"), f64.get("weight")
    reduction, eps = d.get("reduction", "mean"), d.get("label_smoothing", 0.0)
    ignore = -100 if d.get("ignore_index", -100) is None else d.get("ignore_index", -100)
    lead, n_cls, hidden = x.shape[:-1], w_lin.shape[0], x.shape[-1]

    def logits(x, w, b):
        z = torch.tensordot(x, w, dims=([-1], [-1]))
        return z if b is None else z + b

    z = logits(x, w_lin, bias)
    loss = F.cross_entropy(z, target, cw, ignore_index=ignore, reduction=reduction, label_smoothing=eps)
    detached = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in f64.items()}
    pt = F.linear_cross_entropy(detached.pop("input"), detached.pop("args[0]"), detached.pop("args[1]"), **detached)
    torch.testing.assert_close(loss.detach(), pt, rtol=1e-12, atol=1e-12, equal_nan=True,
                               msg="the reference's decomposition differs from PyTorch's linear_cross_entropy")
    names = [k for k in grad]
    outs = torch.autograd.grad(loss, [z] + [f64[k] for k in names], g_out, allow_unused=True)
    dz, grads = outs[0], dict(zip(names, outs[1:]))

    u, ua = UNIT_ROUNDOFF[dtype], UNIT_ROUNDOFF[torch.float64 if dtype == torch.float64 else torch.float32]
    rel, abs_, gabs = TOLERANCES[dtype]
    ulp = GRAD_ULP_REL[dtype]
    with torch.no_grad():
        xa, wa = x.detach().abs(), w_lin.detach().abs()
        ba = None if bias is None else bias.detach().abs()
        dzb = u * z.abs() + (hidden + 1) * ua * logits(xa, wa, ba)
        cdim = len(lead)  # the class dim of Z
        rows = lambda t: t.movedim(cdim, -1).reshape(-1, n_cls)  # noqa: E731  (R, C)
        zr, dzr, deltar = rows(z.detach()), rows(dz), rows(dzb).amax(1, keepdim=True)
        p = zr.softmax(1)
        wv = torch.ones(n_cls, dtype=torch.float64) if cw is None else cw.detach()
        if target.is_floating_point():
            yr = rows(target.detach())
            counted = torch.ones(yr.shape[0], dtype=torch.bool)
        else:
            t = target.reshape(-1)
            counted = t != ignore
            yr = F.one_hot(t.clamp(0, n_cls - 1), n_cls).double() * counted[:, None]
        ys = (1 - eps) * yr + eps / n_cls * counted[:, None]
        a = wv * ys
        if reduction == "none":
            g = g_out.reshape(-1, 1)
        elif reduction == "sum":
            g = g_out.reshape(1, 1).expand(zr.shape[0], 1)
        else:
            den = zr.shape[0] if target.is_floating_point() else (wv[t.clamp(0, n_cls - 1)] * counted).sum()
            g = (g_out / den).reshape(1, 1).expand(zr.shape[0], 1)
        shift = 2 * a.abs().sum(1, keepdim=True) * deltar  # per row
        if reduction == "none":
            loss_tol = shift.reshape(loss.shape)
        else:
            loss_tol = shift.sum() / (1 if reduction == "sum" else abs(float(den)))
        tols = {"loss": abs_ + rel * loss.detach().abs() + loss_tol}
        eps_dz = gabs + ulp * dzr.abs() + g.abs() * a.sum(1, keepdim=True).abs() * p * torch.expm1(2 * deltar)
        unrows = lambda t: t.reshape(z.movedim(cdim, -1).shape).movedim(-1, cdim)  # noqa: E731
    # contractions of a (logits-shaped) bound with |x|, |W|, 1: the vjp of Z(|x|, |W|, |b|)
    leaves = [xa.requires_grad_(), wa.requires_grad_()] + ([] if ba is None else [ba.requires_grad_()])
    za = logits(leaves[0], leaves[1], None if ba is None else leaves[2])
    via_eps = torch.autograd.grad(za, leaves, unrows(eps_dz), retain_graph=True)
    via_dz = torch.autograd.grad(za, leaves, dz.abs())
    k_terms = zr.numel() + 1  # at least the terms of each contraction
    for name, i in (("input", 0), ("args[0]", 1), ("linear_bias", 2)):
        if name in grads:
            tols[name] = via_eps[i] + k_terms * ua * via_dz[i] + ulp * grads[name].abs() + gabs
    with torch.no_grad():
        lse = zr.logsumexp(1, keepdim=True)
        if "args[1]" in grads:  # probability target
            tols["args[1]"] = unrows(gabs + ulp * rows(grads["args[1]"]).abs() + (g * wv * (1 - eps)).abs() * 2 * deltar)
        if "weight" in grads:
            term = (g * ys).abs()
            tols["weight"] = (gabs + ulp * grads["weight"].abs() + (term * 2 * deltar).sum(0)
                              + zr.shape[0] * ua * (term * (lse - zr).abs()).sum(0))
    return loss.detach(), grads, tols


def check_sample(key, sample, dtype, backend):
    """Compare one sample; returns "documented" for a rule-6 sample, "compared" otherwise, and
    raises an AssertionError listing every check of the sample that failed."""
    name, variant, fused = OPS[key]
    op = _opinfo(name, variant)
    named = _named(sample)
    floats = [k for k, v in named if isinstance(v, torch.Tensor) and v.is_floating_point()]
    grad = [k for k in floats if dict(named)[k].requires_grad or _pytorch_differentiates(op, named, k)]
    refused = [k for k in floats if k not in grad]
    reduction = sample.kwargs.get("reduction", "mean")
    is_lce = name.endswith("linear_cross_entropy")
    problems = []

    def attempt(check, *args):
        try:
            check(*args)
        except Exception as e:  # noqa: BLE001  (each failing check of the sample is reported)
            problems.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")

    # PyTorch: the float64 reference (with SPEC tolerances, or the bounds of _lce_reference),
    # and PyTorch at the sample's dtype for the result's dtype and shape.
    g_out = grad_output_for(_call(op.op, named, torch.float64)[0].detach())
    if is_lce:
        ref, ref_grads, tols = _lce_reference(named, dtype, grad, g_out)
    else:
        ref, ref_leaves = _call(op.op, named, torch.float64, grad=grad)
        ref_grads = _grad(ref, ref_leaves, g_out)
    with torch.no_grad():
        native, _ = _call(op.op, named)

    # fusedloss; a gradient it refuses (that PyTorch gives) is a failure, and the rest of the
    # sample is still compared without it.
    fused_grad = list(grad)
    while True:
        try:
            out, leaves = _call(fused, named, grad=fused_grad, backend=backend)
            break
        except NotImplementedError as e:
            k = next((k for k in fused_grad if re.search(rf"\b{_public(k, is_lce)}\b", str(e))), None)
            if k is None:
                raise
            problems.append(f"refuses the gradient to {_public(k, is_lce)}, which PyTorch gives: {e}")
            fused_grad.remove(k)
    if out.dtype != native.dtype or out.shape != native.shape:
        problems.append(f"result {out.dtype}{tuple(out.shape)}, PyTorch's {native.dtype}{tuple(native.shape)}")
    grads = _grad(out, leaves, g_out.to(out.dtype))

    if _zero_denominator_mean(named, reduction, is_lce):
        # SPEC rule 6 / README: "mean" over a zero denominator is 0 with zero gradient, where
        # PyTorch gives NaN (asserted: the difference is real, not assumed).
        assert torch.isnan(ref).all(), f"rule-6 sample: PyTorch gives {ref.item()}, expected NaN"
        attempt(check_exact, out, torch.zeros_like(out), "rule-6 loss (SPEC rule 6: 0)")
        for k, g in grads.items():
            attempt(check_exact, g, torch.zeros_like(g), f"rule-6 d/d{_public(k, is_lce)} (SPEC rule 6: 0)")
        kind = "documented"
    else:
        assert torch.isfinite(ref).all() and all(torch.isfinite(g).all() for g in ref_grads.values()), (
            "PyTorch's float64 reference is not finite: a deliberate difference this test does not identify yet"
        )
        for k, actual, expected in [("loss", out, ref)] + [(k, grads[k], ref_grads[k]) for k in fused_grad]:
            what = "loss" if k == "loss" else f"d/d{_public(k, is_lce)}"
            if is_lce:
                attempt(_check_within, actual, expected, tols[k], what)
            else:
                attempt(check_close, actual, expected, dtype, what, k != "loss")
        kind = "compared"

    # Where PyTorch refuses a gradient, fusedloss refuses it too, naming the argument.
    for k in refused:
        def refuses(k=k):
            with pytest.raises(NotImplementedError, match=rf"\b{_public(k, is_lce)}\b"):
                _call(fused, named, grad=fused_grad + [k], backend=backend)
        attempt(refuses)
    if problems:
        raise AssertionError(" | ".join(problems))
    return kind


# ----------------------------------------------------------------------------- the test
def _all_ignored(samples, is_lce):
    """SPEC rule 6 made certain: the first "mean" sample with class indices and an
    ignore_index, its targets all set to ignore_index (the draw from {0, 1, 2} may not give
    it). [] where the op has no such sample."""
    from torch.testing._internal.opinfo.core import SampleInput

    pos = 1 if is_lce else 0
    for s in samples:
        target = s.args[pos]
        if "ignore_index" in s.kwargs and not target.is_floating_point() and s.kwargs.get("reduction", "mean") == "mean":
            args = list(s.args)
            args[pos] = torch.full_like(target, s.kwargs["ignore_index"])
            return [SampleInput(s.input, args=tuple(args), kwargs=dict(s.kwargs))]
    return []


@pytest.mark.parametrize("dtype", SAMPLE_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("key", OPS)
def test_opinfo_samples(backend, key, dtype):
    name, variant, _ = OPS[key]
    op = _opinfo(name, variant)
    if dtype not in op.supported_dtypes("cpu"):
        pytest.skip(f"PyTorch's {name} does not support {dtype} on the CPU")
    is_lce = name.endswith("linear_cross_entropy")
    samples = list(op.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples, f"no OpInfo samples for {name}"
    run = list(enumerate(samples))
    if backend == "triton" and is_lce:
        run = run[::TRITON_LCE_STRIDE]
    if name != "nn.functional.binary_cross_entropy_with_logits":
        run += [("all ignored", s) for s in _all_ignored(samples, is_lce)]
    counts = {"compared": 0, "documented": 0}
    failures = []
    for i, sample in run:
        try:
            counts[check_sample(key, sample, dtype, backend)] += 1
        except Exception as e:  # noqa: BLE001  (every failing sample is reported, not only the first)
            failures.append(f"sample {i} {_describe(_named(sample))}: {type(e).__name__}: {str(e).strip()}")
    assert not failures, (
        f"{len(failures)}/{len(run)} samples of {key} ({dtype}, {backend}) fail "
        f"({counts['compared']} compared, {counts['documented']} with rule 6's documented answer pass):\n" + "\n".join(failures)
    )
