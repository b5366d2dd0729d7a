"""torch.library.opcheck on the CPU ops, and torch.compile(fullgraph=True) through every
public loss on the cpu backend (schemas, fake kernels, autograd Functions trace without a
graph break or host sync)."""
import pytest
import torch
import torch._dynamo.testing

import fusedloss
from conftest import check_close, make_logits, make_target


def _ce_samples():
    n, c, d = 4, 7, 3
    x = make_logits((n, c, d))
    t = make_target((n, d), c, n_ignored=2)
    w = torch.rand(c) + 0.5
    mask = (torch.rand(c) > 0.2).view(1, c, 1).expand(n, c, d)  # 0 strides, as functional passes it
    probs = torch.softmax(torch.randn(n, c, d), 1)
    x16 = x.half().transpose(0, 2).contiguous().transpose(0, 2)
    return {
        "plain, mean": (x, t, None, None, -100, 0.0, 0.0, 0.0, 1, x.dtype),
        "all options, none": (x, t, w, mask, -100, 0.1, 1e-3, 5.0, 0, x.dtype),
        "probabilities, sum": (x, probs, w, None, -100, 0.1, 0.0, 0.0, 2, x.dtype),
        "float16, transposed": (x16, t, None, mask, -100, 0.0, 0.0, 0.0, 1, torch.float16),
    }


def _focal_samples():
    n, c = 5, 6
    x, t = make_logits((n, c, 1)), make_target((n, 1), c)
    alpha = torch.rand(c)
    return {
        "plain": (x, t, None, None, -100, 2.0, 1, x.dtype),
        "alpha, mask, none": (x, t, alpha, torch.rand(n, c, 1) > 0.2, -100, 0.5, 0, x.dtype),
    }


def _softmax_bwd_samples():
    """Backward of each ce / focal sample, with its own forward's stats and denominator."""
    out = {}
    for name, args in _ce_samples().items():
        x, t, w, mask, softcap, red = args[0], args[1], args[2], args[3], args[7], args[8]
        _, denom, stats = torch.ops.fusedloss.ce_fwd(*args)
        go = torch.rand(x.shape[0], x.shape[2], dtype=x.dtype) if red == 0 else torch.tensor(0.37, dtype=x.dtype)
        out[f"ce {name}"] = (go, x, t, w, mask, stats, denom, softcap, red, torch.empty_like(x))
    x, t, alpha, mask, _, _, red, _ = _focal_samples()["alpha, mask, none"]
    _, denom, stats = torch.ops.fusedloss.focal_fwd(x, t, alpha, mask, -100, 0.5, red, x.dtype)
    out["focal"] = (torch.rand(x.shape[0], 1), x, t, None, mask, stats, denom, 0.0, red, torch.empty_like(x))
    return out


def _binary_samples():
    m, l = 4, 6
    x, y = make_logits((m, l)), torch.rand(m, l)
    w = torch.rand(l).expand(m, l)
    return {
        "bce none": (x, y, None, None, None, 0.0, -1.0, 0, x.dtype),
        "focal, weights, mean, grad": (x, y, w, torch.rand(l).expand(m, l), torch.empty_like(x), 2.0, 0.25, 1, x.dtype),
        "bfloat16 sum": (x.bfloat16(), y.bfloat16(), None, None, None, 0.5, 0.25, 2, torch.bfloat16),
    }


def _binary_bwd_samples():
    m, l = 4, 6
    x, y = make_logits((m, l)), torch.rand(m, l)
    w = torch.rand(l).expand(m, l)
    return {
        "none": (torch.rand(m, l), x, y, w, None, 2.0, 0.25, 0, torch.empty_like(x)),
        "mean": (torch.tensor(0.37), x, y, None, w, 0.0, -1.0, 1, torch.empty_like(x)),
    }


def _scale_grad_samples():
    return {"0.37": (torch.tensor(0.37), torch.randn(4, 6)), "one": (torch.tensor(1.0), torch.randn(4, 6))}


OPCHECK = [(op, name, args) for op, samples in
           [("ce_fwd", _ce_samples), ("focal_fwd", _focal_samples), ("softmax_bwd", _softmax_bwd_samples),
            ("binary_fwd", _binary_samples), ("binary_bwd", _binary_bwd_samples), ("scale_grad", _scale_grad_samples)]
           for name, args in samples().items()]


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpu", "triton"])
@pytest.mark.parametrize("op, name, args", OPCHECK, ids=[f"{op}-{name}" for op, name, _ in OPCHECK])
def test_opcheck(op, name, args, suffix):
    """The C++ ops and their Triton twins (run by the interpreter on CPU tensors)."""
    torch.library.opcheck(getattr(torch.ops.fusedloss, op + suffix), args)


def _bad_op_calls():
    """Arguments each op must refuse, the same way on both implementations."""
    x, t = make_logits((4, 7, 1)), make_target((4, 1), 7)
    _, denom, stats = torch.ops.fusedloss.ce_fwd(x, t, None, None, -100, 0.0, 0.0, 0.0, 1, x.dtype)
    go = torch.tensor(1.0)
    b, y = make_logits((4, 6)), torch.rand(4, 6)
    buf = make_logits((29,))
    return {
        "ce_fwd weight shape": ("ce_fwd", (x, t, torch.rand(6), None, -100, 0.0, 0.0, 0.0, 1, x.dtype), r"weight must be \(C,\)"),
        "ce_fwd target dtype": ("ce_fwd", (x, t.int(), None, None, -100, 0.0, 0.0, 0.0, 1, x.dtype), r"class target must be"),
        "ce_fwd reduction": ("ce_fwd", (x, t, None, None, -100, 0.0, 0.0, 0.0, 3, x.dtype), r"reduction must be"),
        "focal_fwd probabilities": ("focal_fwd", (x, torch.rand(4, 7, 1), None, None, -100, 2.0, 1, x.dtype), r"int64 class indices"),
        "softmax_bwd expanded grad": ("softmax_bwd", (go, x, t, None, None, stats, denom, 0.0, 1,
                                                      torch.empty(1, 7, 1).expand(4, 7, 1)), r"overlapping elements"),
        "softmax_bwd stats shape": ("softmax_bwd", (go, x, t, None, None, stats[:2], denom, 0.0, 1, torch.empty_like(x)), r"stats must be"),
        "softmax_bwd grad shifted over logits": ("softmax_bwd", (go, buf[:28].view(4, 7, 1), t, None, None, stats, denom, 0.0, 1,
                                                                 buf[1:].view(4, 7, 1)), r"partially overlaps"),
        "binary_fwd grad with none": ("binary_fwd", (b, y, None, None, torch.empty_like(b), 0.0, -1.0, 0, b.dtype), r"only computed for reduction"),
        "binary_bwd grad_out shape": ("binary_bwd", (torch.rand(4, 5), b, y, None, None, 0.0, -1.0, 0, torch.empty_like(b)), r"grad_out must have"),
        "scale_grad grad_out shape": ("scale_grad", (torch.rand(2), torch.empty(4, 6)), r"grad_out must be 0-dim"),
    }


BAD_OP_CALLS = _bad_op_calls()


@pytest.mark.parametrize("suffix", ["", "_triton"], ids=["cpu", "triton"])
@pytest.mark.parametrize("case", list(BAD_OP_CALLS))
def test_ops_refuse_bad_arguments(case, suffix):
    op, args, match = BAD_OP_CALLS[case]
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        getattr(torch.ops.fusedloss, op + suffix)(*args)


class _Heads(torch.nn.Module):
    """A tiny model whose loss calls each public loss."""

    def __init__(self, backend):
        super().__init__()
        self.lin = torch.nn.Linear(8, 10)
        self.backend = backend

    def forward(self, feats, t, y, mask):
        logits, b = self.lin(feats), self.backend
        return (
            fusedloss.cross_entropy(logits, t, mask=mask, label_smoothing=0.1, z_loss=1e-3, softcap=20.0, backend=b)
            + fusedloss.focal_loss(logits, t, 2.0, 0.25, backend=b)
            + fusedloss.binary_cross_entropy_with_logits(logits, y, backend=b)
            + fusedloss.sigmoid_focal_loss(logits, y, reduction="mean", backend=b)
            + fusedloss.cross_entropy(logits.index_fill(1, torch.tensor([3]), float("-inf")), t.clamp_min(4), reduction="none",
                                      backend=b).sum()
            # the deprecated size_average / reduce pair traces too
            + fusedloss.cross_entropy(logits, t, reduce=False, backend=b).sum()
        )


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler, backend):
    """One graph (fullgraph=True fails on a graph break or a host sync such as .item()),
    and the compiled loss and gradients equal eager ones."""
    model = _Heads(backend)
    feats, t = torch.randn(6, 8), make_target((6,), 10)
    y, mask = torch.rand(6, 10), torch.rand(10) > 0.2
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(compiler)
    compiled = torch.compile(model, backend=counter, fullgraph=True)

    eager_loss = model(feats, t, y, mask)
    eager_grads = torch.autograd.grad(eager_loss, list(model.parameters()))
    loss = compiled(feats, t, y, mask)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert counter.frame_count == 1, f"{counter.frame_count} graphs"
    check_close(loss, eager_loss, torch.float32, "compiled loss")
    for g, e in zip(grads, eager_grads):
        check_close(g, e, torch.float32, "compiled gradient", grad=True)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "no-grad"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_compile_binary_without_forward_gradient(reduction, requires_grad, backend):
    """The binary losses' forward op writes no gradient for "none" or without grad (its
    optional mutable argument is None), which Inductor cannot lower (torch 2.13): that call
    goes through a functional op under torch.compile. Values and gradients equal eager."""
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    y = torch.rand(3, 4, 5, dtype=torch.float64)
    pw = torch.rand(5, dtype=torch.float64) + 0.5

    def loss(x):
        return (fusedloss.binary_cross_entropy_with_logits(x, y, pos_weight=pw, reduction=reduction, backend=backend)
                + fusedloss.sigmoid_focal_loss(x, y, reduction=reduction, backend=backend))

    torch._dynamo.reset()
    compiled = torch.compile(loss, backend="inductor", fullgraph=True)
    xe, xc = x.clone().requires_grad_(requires_grad), x.clone().requires_grad_(requires_grad)
    eager, out = loss(xe), compiled(xc)
    check_close(out, eager, torch.float64, "compiled loss")
    if requires_grad:
        go = torch.rand_like(eager)
        eager.backward(go)
        out.backward(go)
        check_close(xc.grad, xe.grad, torch.float64, "compiled gradient", grad=True)
