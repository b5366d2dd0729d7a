"""Public API: drop-in signatures, modules, backend selection, legacy arguments, bad input (SPEC 1, 4, 6)."""
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import fusedloss
from fusedloss import _backend
from conftest import BACKENDS, check_against, make_logits, make_target

TORCHVISION_SIGMOID_FOCAL = inspect.Signature(
    [
        inspect.Parameter("inputs", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("targets", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("alpha", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=0.25),
        inspect.Parameter("gamma", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=2),
        inspect.Parameter("reduction", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="none"),
    ]
)


def _positional(sig):
    return [(p.name, p.default) for p in sig.parameters.values() if p.kind != inspect.Parameter.KEYWORD_ONLY]


@pytest.mark.parametrize(
    "ours, theirs, extras",
    [
        (fusedloss.cross_entropy, inspect.signature(F.cross_entropy), {"mask", "z_loss", "softcap", "inplace_backward", "backend"}),
        (fusedloss.binary_cross_entropy_with_logits, inspect.signature(F.binary_cross_entropy_with_logits), {"backend"}),
        (fusedloss.sigmoid_focal_loss, TORCHVISION_SIGMOID_FOCAL, {"weight", "pos_weight", "backend"}),
    ],
    ids=["cross_entropy", "bce_with_logits", "sigmoid_focal_loss"],
)
def test_drop_in_signature(ours, theirs, extras):
    """Same positional parameters, order and defaults as the counterpart; extras keyword-only."""
    sig = inspect.signature(ours)
    assert _positional(sig) == _positional(theirs), f"{ours.__name__}{sig} vs {theirs}"
    keyword_only = {p.name for p in sig.parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == extras


def test_focal_loss_signature():
    sig = inspect.signature(fusedloss.focal_loss)
    assert _positional(sig) == [("input", inspect.Parameter.empty), ("target", inspect.Parameter.empty),
                                ("gamma", 2.0), ("alpha", None), ("ignore_index", -100), ("reduction", "mean")]


def test_modules_match_pytorch(backend):
    x, t = make_logits((4, 6)), make_target((4,), 6)
    y = torch.rand(4, 6)
    w, pw = torch.rand(6) + 0.5, torch.rand(6) + 0.5
    pairs = [
        (fusedloss.nn.CrossEntropyLoss(w, ignore_index=-100, label_smoothing=0.1, backend=backend),
         torch.nn.CrossEntropyLoss(w.double(), ignore_index=-100, label_smoothing=0.1), t),
        (fusedloss.nn.BCEWithLogitsLoss(w, reduction="sum", pos_weight=pw, backend=backend),
         torch.nn.BCEWithLogitsLoss(w.double(), reduction="sum", pos_weight=pw.double()), y),
    ]
    for ours, theirs, target in pairs:
        check_against(lambda x: ours(x, target), lambda x: theirs(x, target.double() if target.is_floating_point() else target), x,
                      type(ours).__name__)
    focal = fusedloss.nn.FocalLoss(gamma=0.0, backend=backend)
    check_against(lambda x: focal(x, t), lambda x: F.cross_entropy(x, t), x, "FocalLoss(gamma=0)")
    sfl = fusedloss.nn.SigmoidFocalLoss(alpha=-1.0, gamma=0.0, reduction="mean", backend=backend)
    check_against(lambda x: sfl(x, y), lambda x: F.binary_cross_entropy_with_logits(x, y.double()), x, "SigmoidFocalLoss(gamma=0)")
    mask = torch.ones(6, dtype=torch.bool)
    ce = fusedloss.nn.CrossEntropyLoss(backend=backend)
    assert torch.equal(ce(x, t, mask), ce(x, t)), "an all-True mask changes nothing"
    assert isinstance(ce, torch.nn.Module) and "weight" in dict(fusedloss.nn.CrossEntropyLoss(w).named_buffers())


@pytest.mark.parametrize("size_average, reduce", [(None, False), (False, None), (True, True), (False, True)])
def test_legacy_size_average_reduce(backend, size_average, reduce):
    x, t = make_logits((4, 6)), make_target((4,), 6)
    y = torch.rand(4, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation warning, as PyTorch's
        check_against(
            lambda x: fusedloss.cross_entropy(x, t, size_average=size_average, reduce=reduce, backend=backend),
            lambda x: F.cross_entropy(x, t, size_average=size_average, reduce=reduce),
            x, "cross_entropy legacy",
        )
        check_against(
            lambda x: fusedloss.binary_cross_entropy_with_logits(x, y, size_average=size_average, reduce=reduce, backend=backend),
            lambda x: F.binary_cross_entropy_with_logits(x, y.double(), size_average=size_average, reduce=reduce),
            x, "bce legacy",
        )
        module = fusedloss.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce, backend=backend)
        reference = torch.nn.CrossEntropyLoss(size_average=size_average, reduce=reduce)
        check_against(lambda x: module(x, t), lambda x: reference(x, t), x, "CrossEntropyLoss legacy")


def test_double_backward_raises(backend):
    x = make_logits((3, 4)).requires_grad_()
    loss = fusedloss.cross_entropy(x, torch.tensor([0, 1, 2]), backend=backend)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


# ----------------------------------------------------------------------------- backends
def test_backends_report():
    report = fusedloss.backends("cpu")
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"] is None
    assert "CUDA" in report["cuda"] or "cuda" in report["cuda"]
    for name in BACKENDS:  # CI builds the extension and installs triton
        assert report[name] is None, f"{name}: {report[name]}"


def test_explicit_unavailable_backend_raises():
    x, t = make_logits((3, 4)), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run: .*CUDA tensors"):
        fusedloss.cross_entropy(x, t, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedloss.cross_entropy(x, t, backend="nope")


def test_env_override(monkeypatch):
    x, t = make_logits((3, 4)), torch.tensor([0, 1, 2])
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "torch")
    assert _backend.resolve("auto", x.device).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an explicit choice never warns
        fusedloss.cross_entropy(x, t)
    monkeypatch.setenv("FUSEDLOSS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda"):
        fusedloss.cross_entropy(x, t)


def test_auto_prefers_cpu_and_falls_back_with_one_warning(monkeypatch):
    x, t = make_logits((3, 4)), torch.tensor([0, 1, 2])
    monkeypatch.delenv("FUSEDLOSS_BACKEND", raising=False)
    assert _backend.resolve("auto", x.device).name == "cpu", fusedloss.backends("cpu")["cpu"]

    real = _backend.why_not
    monkeypatch.setattr(_backend, "why_not", lambda name, dev: "simulated: no extension" if name == "cpu" else real(name, dev))
    monkeypatch.setattr(_backend, "_warned", set())
    with pytest.warns(UserWarning, match=r"(?s)cpu: simulated: no extension.*torch reference"):
        first = fusedloss.cross_entropy(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = fusedloss.cross_entropy(x, t)
    assert torch.equal(first, second)
    check_against(lambda x: fusedloss.cross_entropy(x, t), lambda x: F.cross_entropy(x, t), x, "fallback")


def test_kernel_failure_falls_back_along_the_chain(monkeypatch):
    """A kernel that fails to compile or launch moves that op to the next backend of the
    "auto" chain (triton -> cuda -> torch on CUDA tensors), with one warning naming the
    cause; input errors are not kernel failures and propagate. The chain is built here
    from triton and torch, since this machine has no CUDA tensors."""
    chain = _backend._fallback_chain(("triton", "torch"))
    calls = []

    def broken(*args):
        calls.append("triton")
        raise RuntimeError("simulated: PTX .version 8.7 does not support .target sm_120")

    monkeypatch.setattr(_backend.IMPLS["triton"], "ce_fwd", broken)
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setitem(_backend.IMPLS, "chain-under-test", chain)
    x, t = make_logits((5, 7)), make_target((5,), 7)
    run = lambda x: fusedloss.functional._SoftmaxLossFn.apply(  # the (N, C, D) view functional passes
        x.unsqueeze(-1), t.unsqueeze(-1), None, None, None,
        ("ce_fwd", (-100, 0.0, 0.0, 0.0, 1, x.dtype), 0.0, 1, False, "chain-under-test", 0.0),
    )
    with pytest.warns(UserWarning, match=r"triton backend failed in ce_fwd \(RuntimeError: simulated.*using the torch backend"):
        first = run(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per op
        second = run(x)
    assert calls == ["triton"], "a failed op is not retried on the failed backend"
    assert torch.equal(first, second)
    check_against(run, lambda x: F.cross_entropy(x, t), x, "fallback chain")  # backward: triton's softmax_bwd

    def bad_input(*args):
        raise ValueError("simulated bad input")

    monkeypatch.setattr(_backend.IMPLS["triton"], "focal_fwd", bad_input)
    with pytest.raises(ValueError, match="simulated bad input"):
        chain.focal_fwd(x.unsqueeze(-1), t.unsqueeze(-1), None, None, -100, 2.0, 1, x.dtype)


def test_broken_triton_does_not_break_import(tmp_path):
    """A triton that raises something other than ImportError at import leaves fusedloss
    importable, with the triton backend reported unavailable and why."""
    import subprocess
    import sys

    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise RuntimeError('simulated: libcuda.so version mismatch')\n")
    code = "import fusedloss; print(fusedloss.backends('cpu')['triton'])"
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RuntimeError: simulated: libcuda.so version mismatch" in done.stdout, done.stdout


# ----------------------------------------------------------------------------- bad input (SPEC 6)
X, T = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
Y = torch.rand(4, 5)
BAD_INPUT = {
    "ce target batch": (lambda: fusedloss.cross_entropy(X, torch.tensor([0, 1])), ValueError, r"batch_size.*4.*2"),
    "ce target shape": (lambda: fusedloss.cross_entropy(torch.randn(2, 5, 3), torch.zeros(2, 4, dtype=torch.long)), ValueError, r"target.*\(2, 3\).*\(2, 4\)"),
    "ce probability shape": (lambda: fusedloss.cross_entropy(X, torch.rand(4, 6)), ValueError, r"target.*\(4, 5\).*\(4, 6\)"),
    "ce input dtype": (lambda: fusedloss.cross_entropy(X.long(), T), TypeError, r"input.*int64"),
    "ce target dtype": (lambda: fusedloss.cross_entropy(X, T.to(torch.int16)), TypeError, r"target.*int16"),
    "ce reduction": (lambda: fusedloss.cross_entropy(X, T, reduction="avg"), ValueError, r"reduction.*'avg'"),
    "ce smoothing": (lambda: fusedloss.cross_entropy(X, T, label_smoothing=1.5), ValueError, r"label_smoothing.*1\.5"),
    "ce smoothing<0": (lambda: fusedloss.cross_entropy(X, T, label_smoothing=-0.1), ValueError, r"label_smoothing.*-0\.1"),
    "ce weight shape": (lambda: fusedloss.cross_entropy(X, T, torch.ones(4)), ValueError, r"weight.*\(5,\).*\(4,\)"),
    "ce weight dtype": (lambda: fusedloss.cross_entropy(X, T, torch.ones(5, dtype=torch.long)), TypeError, r"weight.*int64"),
    "ce mask shape": (lambda: fusedloss.cross_entropy(X, T, mask=torch.ones(3, dtype=torch.bool)), ValueError, r"mask.*\(3,\).*\(4, 5\)"),
    "ce mask more dims": (lambda: fusedloss.cross_entropy(X, T, mask=torch.ones(1, 4, 5, dtype=torch.bool)), ValueError, r"mask.*\(1, 4, 5\).*\(4, 5\)"),
    "ce mask dtype": (lambda: fusedloss.cross_entropy(X, T, mask=torch.ones(5)), TypeError, r"mask.*bool.*float32"),
    "ce softcap": (lambda: fusedloss.cross_entropy(X, T, softcap=-1.0), ValueError, r"softcap.*-1\.0"),
    "focal gamma": (lambda: fusedloss.focal_loss(X, T, gamma=-1.0), ValueError, r"gamma.*-1\.0"),
    "focal alpha shape": (lambda: fusedloss.focal_loss(X, T, alpha=torch.ones(3)), ValueError, r"alpha.*\(5,\).*\(3,\)"),
    "focal reduction": (lambda: fusedloss.focal_loss(X, T, reduction="max"), ValueError, r"reduction.*'max'"),
    "focal target dtype": (lambda: fusedloss.focal_loss(X, Y), TypeError, r"target.*float32"),
    "bce shape": (lambda: fusedloss.binary_cross_entropy_with_logits(X, torch.rand(4, 6)), ValueError, r"[Tt]arget.*\(4, 6\).*\(4, 5\)"),
    "bce input dtype": (lambda: fusedloss.binary_cross_entropy_with_logits(X.long(), Y), TypeError, r"input.*int64"),
    "bce weight shape": (lambda: fusedloss.binary_cross_entropy_with_logits(X, Y, torch.ones(3)), ValueError, r"weight.*\(3,\).*\(4, 5\)"),
    "bce weight empty dim": (lambda: fusedloss.binary_cross_entropy_with_logits(X, Y, torch.ones(0, 5)), ValueError, r"weight.*\(0, 5\).*\(4, 5\)"),
    "bce pos_weight shape": (lambda: fusedloss.binary_cross_entropy_with_logits(X, Y, pos_weight=torch.ones(3)), ValueError, r"pos_weight.*\(3,\)"),
    "bce pos_weight (C,1)": (lambda: fusedloss.binary_cross_entropy_with_logits(X, Y, pos_weight=torch.ones(5, 1)), ValueError, r"pos_weight.*\(5, 1\)"),
    "bce reduction": (lambda: fusedloss.binary_cross_entropy_with_logits(X, Y, reduction="avg"), ValueError, r"reduction.*'avg'"),
    "sigmoid focal gamma": (lambda: fusedloss.sigmoid_focal_loss(X, Y, gamma=-0.5), ValueError, r"gamma.*-0\.5"),
    "sigmoid focal reduction": (lambda: fusedloss.sigmoid_focal_loss(X, Y, reduction="avg"), ValueError, r"reduction.*'avg'"),
    "sigmoid focal weight": (lambda: fusedloss.sigmoid_focal_loss(X, Y, weight=torch.ones(2, 5)), ValueError, r"weight.*\(2, 5\)"),
}


@pytest.mark.parametrize("case", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input(case):
    """The error type PyTorch raises, and a message naming the argument, expected and received."""
    call, error, pattern = case
    with pytest.raises(error, match=pattern):
        call()


def test_cpu_gradient_buffers_are_reused_only_after_release():
    """csrc/cpu/grad_pool.cpp: a live gradient is never handed out again; a released one is,
    and the reused buffer is fully rewritten (checked against float64 PyTorch)."""
    x, t = make_logits((64, 5000)), make_target((64,), 5000)  # 1.28 MB: pooled

    def grad_of(**kw):
        leaf = x.clone().requires_grad_()
        fusedloss.cross_entropy(leaf, t, backend="cpu", **kw).backward()
        return leaf.grad

    g1 = grad_of()
    g2 = grad_of(label_smoothing=0.5)
    assert g1.data_ptr() != g2.data_ptr(), "a live gradient buffer was handed out twice"
    x64 = x.double().requires_grad_()
    F.cross_entropy(x64, t).backward()
    assert (g1.double() - x64.grad).abs().max() < 1e-6, "the first gradient changed after the second call"
    ptr = g1.data_ptr()
    del g1
    g3 = grad_of(label_smoothing=0.5)
    assert g3.data_ptr() == ptr, "the released buffer was not reused"
    x64.grad = None
    F.cross_entropy(x64, t, label_smoothing=0.5).backward()
    assert (g3.double() - x64.grad).abs().max() < 1e-6


def test_no_grad_computes_no_gradient_and_keeps_the_input(backend):
    """Under torch.no_grad() nothing is written into the input, even with
    inplace_backward=True, and the value is the same as with autograd on."""
    x, t = make_logits((4, 9)).requires_grad_(), make_target((4,), 9)
    keep = x.detach().clone()
    with torch.no_grad():
        out = fusedloss.cross_entropy(x, t, inplace_backward=True, backend=backend)
    assert torch.equal(x.detach(), keep), "the input changed under no_grad"
    assert out.grad_fn is None
    check_against(lambda v: fusedloss.cross_entropy(v, t, backend=backend), lambda v: F.cross_entropy(v, t), keep, "no_grad")


@pytest.mark.parametrize("which", ["class weight", "bce weight", "pos_weight", "focal alpha"])
def test_gradients_refused_where_pytorch_refuses(backend, which):
    """A weight that PyTorch gives no gradient (class weight with class-index targets, BCE
    weight and pos_weight) raises rather than silently getting none; so does focal alpha."""
    x = make_logits((3, 5)).requires_grad_()
    y = torch.rand(3, 5)
    w = (torch.rand(5) + 0.5).requires_grad_()
    t = torch.tensor([0, 1, 2])
    calls = {
        "class weight": lambda: fusedloss.cross_entropy(x, t, w, backend=backend),
        "bce weight": lambda: fusedloss.binary_cross_entropy_with_logits(x, y, w, backend=backend),
        "pos_weight": lambda: fusedloss.binary_cross_entropy_with_logits(x, y, pos_weight=w, backend=backend),
        "focal alpha": lambda: fusedloss.focal_loss(x, t, alpha=w, backend=backend),
    }
    with pytest.raises(NotImplementedError, match=which.split()[-1].replace("class ", "")):
        calls[which]()


def _torchvision_sigmoid_focal(x, y, alpha, gamma, reduction):
    """torchvision.ops.sigmoid_focal_loss, written out (torchvision is not a dependency)."""
    p = torch.sigmoid(x)
    loss = F.binary_cross_entropy_with_logits(x, y, reduction="none") * (1 - (p * y + (1 - p) * (1 - y))) ** gamma
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["ce probabilities + weight", "ce smoothing + weight", "bce", "sigmoid focal"])
def test_soft_targets_get_pytorchs_gradients(backend, case, reduction):
    """Soft targets that require grad (distillation, mixup) get PyTorch's gradient, and so
    does the class weight with probability targets; float64, against PyTorch's own
    autograd, with a grad_output that is not 1."""
    x = make_logits((4, 6, 3) if case.startswith("ce") else (5, 7), torch.float64).requires_grad_()
    if case.startswith("ce"):
        y = torch.softmax(torch.randn(4, 6, 3, dtype=torch.float64) * 3, 1).requires_grad_()
        w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
        eps = 0.2 if "smoothing" in case else 0.0
        ours = lambda x, y, w: fusedloss.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps, backend=backend)
        theirs = lambda x, y, w: F.cross_entropy(x, y, w, reduction=reduction, label_smoothing=eps)
        args = (x, y, w)
    else:
        y = torch.rand(5, 7, dtype=torch.float64).requires_grad_()
        if case == "bce":
            pw = torch.rand(7, dtype=torch.float64) + 0.5
            ours = lambda x, y: fusedloss.binary_cross_entropy_with_logits(x, y, reduction=reduction, pos_weight=pw, backend=backend)
            theirs = lambda x, y: F.binary_cross_entropy_with_logits(x, y, reduction=reduction, pos_weight=pw)
        else:
            ours = lambda x, y: fusedloss.sigmoid_focal_loss(x, y, 0.3, 1.5, reduction=reduction, backend=backend)
            theirs = lambda x, y: _torchvision_sigmoid_focal(x, y, 0.3, 1.5, reduction)
        args = (x, y)
    out, ref = ours(*args), theirs(*args)
    g = torch.rand_like(ref) + 0.5
    got, want = torch.autograd.grad(out, args, g), torch.autograd.grad(ref, args, g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(("input", "target", "weight"), got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=lambda m: f"{case} {reduction}: d/d{name}: {m}")
