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
    x16 = x.half()
    return {
        "plain": (x, t, None, None, None, -100, 0.0, 0.0, 0.0),
        "all options, grad": (x, t, w, mask, torch.empty_like(x), -100, 0.1, 1e-3, 5.0),
        "probabilities": (x, probs, w, None, torch.empty_like(x), -100, 0.1, 0.0, 0.0),
        "float16, transposed": (x16.transpose(0, 2).contiguous().transpose(0, 2), t, None, mask, torch.empty_like(x16), -100, 0.0, 0.0, 0.0),
    }


def _focal_samples():
    n, c = 5, 6
    x, t = make_logits((n, c, 1)), make_target((n, 1), c)
    alpha = torch.rand(c)
    return {
        "plain": (x, t, None, None, None, -100, 2.0),
        "alpha, mask, grad": (x, t, alpha, torch.rand(n, c, 1) > 0.2, torch.empty_like(x), -100, 0.5),
    }


def _binary_samples():
    m, l = 4, 6
    x, y = make_logits((m, l)), torch.rand(m, l)
    w = torch.rand(l).expand(m, l)
    return {
        "bce": (x, y, None, None, torch.empty_like(x), 0.0, -1.0, False),
        "focal, weights, reduce": (x, y, w, torch.rand(l).expand(m, l), torch.empty_like(x), 2.0, 0.25, True),
        "bfloat16 no grad": (x.bfloat16(), y.bfloat16(), None, None, None, 0.5, 0.25, False),
    }


OPCHECK = [(op, name, args) for op, samples in
           [("ce_fwd", _ce_samples), ("focal_fwd", _focal_samples), ("binary_fwd", _binary_samples)]
           for name, args in samples().items()]


@pytest.mark.parametrize("op, name, args", OPCHECK, ids=[f"{op}-{name}" for op, name, _ in OPCHECK])
def test_opcheck(op, name, args):
    torch.library.opcheck(getattr(torch.ops.fusedloss, op), args)


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
