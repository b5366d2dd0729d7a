"""Every layout PyTorch accepts, read through its strides (issue 9): contiguous, channels_last
(2-D and 3-D), a broadcast weight / pos_weight, bool and integer binary targets.

* values and gradients on every backend against PyTorch's own formula in float64 (the
  rounded input, SPEC section 5 tolerances), and the gradient in the input's layout (its
  strides), so AccumulateGrad keeps it as .grad instead of cloning it;
* no copy on the cpu backend: a TorchDispatchMode (`BigWrites`) records every op of the step
  whose result holds as many elements as the input (an N x C allocation: copies, clones,
  conversions, AccumulateGrad's clone, the ops' own outputs); the step may make exactly one,
  the gradient, and x.grad must be that very buffer (or, with inplace_backward, none at all).
  "none" losses may add their N x C loss output, nothing else.
The counter is tested first: it sees AccumulateGrad's clone of a gradient in the wrong layout,
reshape's copy of a layout it cannot view, and a bool -> float target conversion.

Shapes are tiny (the triton backend runs in the interpreter); the counter only needs the input
size to tell N x C tensors from per-row ones.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fusedloss
from conftest import check_against, grad_output_for
from test_sigmoid_focal import torchvision_reference

CL, CL3 = torch.channels_last, torch.channels_last_3d
# N, C, (D,) H, W: every dim distinct; C > 4, so the forward's per-position stats (4 numbers)
# are smaller than the N x C tensors the counter looks for
SHAPE4, SHAPE5 = (3, 7, 4, 6), (2, 6, 3, 4, 5)
LAYOUTS = {
    "contiguous": (SHAPE4, torch.contiguous_format),
    "channels_last": (SHAPE4, CL),
    "channels_last_3d": (SHAPE5, CL3),
}


def _logits(layout, dtype=torch.float32):
    shape, fmt = LAYOUTS[layout]
    return (torch.randn(shape, dtype=torch.float64) * 3).to(dtype).contiguous(memory_format=fmt)


class BigWrites(TorchDispatchMode):
    """Records (op name, data_ptr) of every non-view op result with at least `numel` elements:
    the N x C tensors a step allocates or writes (ops inside a C++ kernel are not dispatched
    here: they are the kernel's own, per-row outputs aside)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.big = numel, []

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                    self.big.append((str(func), t.data_ptr()))
        return out

    def names(self):
        return [name for name, _ in self.big]


def _step(fn, x, grad_output=None):
    """fn(leaf) forward + backward under BigWrites; returns (loss, leaf, recorder)."""
    leaf = x.detach().clone().requires_grad_(True)
    with BigWrites(x.numel()) as rec:
        out = fn(leaf)
        out.backward(grad_output)
    return out, leaf, rec


def _check_no_copy(rec, leaf, what, extra=0, inplace=False):
    """The step's N x C results: the gradient (x.grad itself, in the input's strides), plus
    `extra` ("none": the loss output); inplace_backward: not even the gradient."""
    names = rec.names()
    assert leaf.grad is not None, f"{what}: no gradient"
    assert leaf.grad.stride() == leaf.stride(), (
        f"{what}: gradient strides {leaf.grad.stride()} differ from the input's {leaf.stride()}"
    )
    expected = extra + (0 if inplace else 1)
    assert len(names) == expected, f"{what}: {len(names)} N x C results, expected {expected}: {names}"
    if not inplace:
        assert leaf.grad.data_ptr() in [p for _, p in rec.big], (
            f"{what}: x.grad is not a buffer the step wrote (AccumulateGrad copied it?): {rec.big}"
        )


# ----------------------------------------------------------------------------- the counter
def test_counter_sees_copies():
    """The three copies issue 9 found, made on purpose, are seen: AccumulateGrad's clone of a
    contiguous gradient of a channels_last leaf, reshape(-1, W) of a channels_last tensor, a
    bool target converted to float."""

    class Fn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.shape = x.shape
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            return torch.ones(ctx.shape, dtype=g.dtype) * g  # contiguous: AccumulateGrad clones it

    x = _logits("channels_last")
    out, leaf, rec = _step(Fn.apply, x)
    assert leaf.grad.stride() == leaf.stride(), "AccumulateGrad keeps the parameter's layout"
    # ones, mul, then AccumulateGrad's clone into the leaf's layout (an allocation and a copy)
    assert rec.names()[2:] == ["aten.new_empty_strided.default", "aten.copy_.default"], rec.names()
    with BigWrites(x.numel()) as rec:
        x.reshape(-1, x.shape[-1])  # channels_last cannot be viewed so: a copy
        (x > 0).to(x.dtype)
    names = rec.names()
    assert "aten.clone.default" in names and names[-1] == "aten._to_copy.default", names  # the copy, the conversion


# ----------------------------------------------------------------------------- softmax losses
def _softmax_cases():
    cases = []
    for layout in LAYOUTS:
        cases.append(("cross_entropy", layout, {}))
        cases.append(("focal_loss", layout, {}))
    cases.append(("cross_entropy", "channels_last", {"weight": "C", "label_smoothing": 0.1}))
    cases.append(("cross_entropy", "channels_last", {"reduction": "none"}))
    cases.append(("focal_loss", "channels_last_3d", {"alpha": "C"}))
    return cases


SOFTMAX_CASES = _softmax_cases()


def _softmax_call(name, layout, kw):
    x = _logits(layout)
    c = x.shape[1]
    t = torch.randint(0, c, x.shape[:1] + x.shape[2:])
    t.view(-1)[::5] = 255  # a segmentation map's void label
    kw = dict(kw)
    for key in ("weight", "alpha"):
        if kw.get(key) == "C":
            kw[key] = torch.rand(c, dtype=torch.float64).add(0.5).float()
    return x, t, kw


def _softmax_reference(name, t, kw):
    """PyTorch's cross_entropy in float64; focal: alpha_t (1 - p_t)^gamma (-log p_t) over the
    counted positions, mean by their number."""
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if name == "cross_entropy":
        return lambda v: F.cross_entropy(v, t, ignore_index=255, **kw64)

    def focal(v):
        keep = t != 255
        logp = F.log_softmax(v, 1).gather(1, t.clamp(0, v.shape[1] - 1).unsqueeze(1)).squeeze(1)
        a = kw64["alpha"][t.clamp(0, v.shape[1] - 1)] if "alpha" in kw64 else 1.0
        loss = torch.where(keep, -a * (1 - logp.exp()) ** 2 * logp, torch.zeros_like(logp))
        return loss.sum() / keep.sum()

    return focal


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[f"{n}-{l}-{'-'.join(k)}" for n, l, k in SOFTMAX_CASES])
def test_softmax_layouts(backend, case):
    """Value and gradient against PyTorch in float64; the gradient in the input's strides."""
    name, layout, kw = case
    x, t, kw = _softmax_call(name, layout, kw)
    fn = getattr(fusedloss, name)
    out, grad = check_against(lambda v: fn(v, t, ignore_index=255, backend=backend, **kw),
                              _softmax_reference(name, t, kw), x, f"{name} {layout} {backend}")
    assert grad.stride() == x.stride(), f"{backend}: gradient strides {grad.stride()}, input {x.stride()}"


@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace_backward"])
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[f"{n}-{l}-{'-'.join(k)}" for n, l, k in SOFTMAX_CASES])
def test_softmax_no_copy(case, inplace):
    """cpu backend: the step's only N x C result is the gradient, which becomes x.grad as it
    is (inplace_backward: none; the logits' storage holds the gradient)."""
    name, layout, kw = case
    if inplace and name != "cross_entropy":
        pytest.skip("inplace_backward is a cross_entropy option")
    x, t, kw = _softmax_call(name, layout, kw)
    if inplace:
        kw["inplace_backward"] = True
    fn = getattr(fusedloss, name)
    out = fn(x, t, ignore_index=255, backend="cpu", **kw)  # shapes only: the grad_output
    out, leaf, rec = _step(lambda v: fn(v, t, ignore_index=255, backend="cpu", **kw), x, grad_output_for(out))
    _check_no_copy(rec, leaf, f"{name} {layout} {kw}", inplace=inplace)
    if inplace:
        assert leaf.grad.data_ptr() == leaf.data_ptr(), "inplace_backward: the gradient is in the logits' storage"


# ----------------------------------------------------------------------------- binary losses
def _binary_cases():
    cases = []
    for layout in LAYOUTS:
        for target in ("float", "bool"):
            cases.append((layout, target, None, None))
    c = SHAPE4[1]
    cases += [
        ("contiguous", "bool", (c, 1, 1), None),  # a class weight on NCHW
        ("channels_last", "float", (c, 1, 1), None),
        ("contiguous", "uint8", None, (SHAPE4[-1],)),  # pos_weight along the last dim
        ("channels_last", "int64", (c, 1, 1), (c, 1, 1)),
        ("channels_last_3d", "bool", (SHAPE5[1], 1, 1, 1), None),
    ]
    return cases


BINARY_CASES = _binary_cases()
BINARY_IDS = [f"{l}-{t}-w{w}-pw{p}".replace(" ", "") for l, t, w, p in BINARY_CASES]
BINARY_LOSSES = ("binary_cross_entropy_with_logits", "sigmoid_focal_loss")


def _binary_call(layout, target, w_shape, pw_shape):
    x = _logits(layout)
    fmt = LAYOUTS[layout][1]
    labels = (torch.rand(x.shape) < 0.3).contiguous(memory_format=fmt)  # a target in the input's layout
    y = {"float": labels.to(x.dtype), "bool": labels, "uint8": labels.to(torch.uint8), "int64": labels.long()}[target]
    w = None if w_shape is None else torch.rand(w_shape, dtype=torch.float64).add(0.5).float()
    pw = None if pw_shape is None else torch.rand(pw_shape, dtype=torch.float64).add(0.5).float()
    return x, y, w, pw


def _binary_fns(name, y, w, pw, reduction, backend):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    if name == "sigmoid_focal_loss":
        fused = lambda v: fusedloss.sigmoid_focal_loss(v, y, 0.25, 2.0, reduction, weight=w, pos_weight=pw,  # noqa: E731
                                                       backend=backend)
        ref = lambda v: torchvision_reference(v, y.double(), 0.25, 2.0, reduction, d(w), d(pw))  # noqa: E731
    else:
        fused = lambda v: fusedloss.binary_cross_entropy_with_logits(v, y, w, reduction=reduction,  # noqa: E731
                                                                     pos_weight=pw, backend=backend)
        ref = lambda v: F.binary_cross_entropy_with_logits(v, y.double(), d(w), reduction=reduction,  # noqa: E731
                                                           pos_weight=d(pw))
    return fused, ref


@pytest.mark.parametrize("name", BINARY_LOSSES)
@pytest.mark.parametrize("case", BINARY_CASES, ids=BINARY_IDS)
def test_binary_layouts(backend, case, name):
    """Value and gradient against PyTorch (torchvision's formula for focal) in float64, "mean"
    and "none"; the gradient, and the "none" loss, in the input's strides."""
    x, y, w, pw = _binary_call(*case)
    for reduction in ("mean", "none"):
        fused, ref = _binary_fns(name, y, w, pw, reduction, backend)
        out, grad = check_against(fused, ref, x, f"{name} {case} {reduction} {backend}")
        assert grad.stride() == x.stride(), f"{backend}: gradient strides {grad.stride()}, input {x.stride()}"
        if reduction == "none":
            assert out.stride() == x.stride(), f"{backend}: 'none' loss strides {out.stride()}, input {x.stride()}"


@pytest.mark.parametrize("no_copy_backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", BINARY_LOSSES)
@pytest.mark.parametrize("case", BINARY_CASES, ids=BINARY_IDS)
def test_binary_no_copy(case, name, no_copy_backend):
    """cpu and triton backends: no copy of the input, the target (bool / integer read as they
    are) or a broadcast weight; the only N x C result of "mean" is the gradient, which is
    x.grad; of "none", the loss output and the gradient (grad_output in the loss's layout is
    read as it is)."""
    x, y, w, pw = _binary_call(*case)
    fused, _ = _binary_fns(name, y, w, pw, "mean", no_copy_backend)
    out, leaf, rec = _step(fused, x)
    _check_no_copy(rec, leaf, f"{name} {case} mean")
    fused, _ = _binary_fns(name, y, w, pw, "none", no_copy_backend)
    g = grad_output_for(fused(x)).contiguous(memory_format=LAYOUTS[case[0]][1])  # made outside the step
    out, leaf, rec = _step(fused, x, g)
    _check_no_copy(rec, leaf, f"{name} {case} none", extra=1)


def test_binary_other_layouts_still_right():
    """Where no 2-D view exists the step copies (a target in another layout than the input's,
    a strided slice), and is still right: values and gradient against PyTorch."""
    x = _logits("channels_last")
    y = (torch.rand(x.shape) < 0.3).float()  # contiguous target, channels_last input
    sliced = _logits("contiguous", torch.float64)[:, :, ::2].float()
    for v, t in ((x, y), (sliced, (torch.rand(sliced.shape) < 0.5).float())):
        check_against(lambda u: fusedloss.binary_cross_entropy_with_logits(u, t, backend="cpu"),
                      lambda u: F.binary_cross_entropy_with_logits(u, t.double()), v, f"strides {v.stride()}")


def test_grad_pool_keeps_layout():
    """The CPU gradient cache (csrc/cpu/grad_pool.cpp, buffers of 1 MB and more) hands out
    buffers in the layout of `like` when it is dense, contiguous otherwise."""
    like = torch.empty(4, 64, 32, 32).contiguous(memory_format=CL)  # 1 MB of float32
    g = torch.ops.fusedloss.empty_grad.default(like)
    assert g.shape == like.shape and g.stride() == like.stride(), g.stride()
    sliced = torch.empty(4, 64, 32, 64)[..., ::2]
    g = torch.ops.fusedloss.empty_grad.default(sliced)
    assert g.is_contiguous(), g.stride()
    small = torch.empty(2, 3, 4, 5).contiguous(memory_format=CL)
    assert torch.ops.fusedloss.empty_grad.default(small).stride() == small.stride()


@pytest.mark.parametrize("offset", [0.0, 300.0], ids=["offset0", "offset300"])
def test_kdim_confident_rows(backend, offset):
    """NCHW maps with confident positions (the target's logit 15 above the others, all offset
    by 300): per-position losses ~1e-5, exact only with sums relative to the max. The CPU takes
    its lane path here (positions across vector lanes, whose sum of exp uses the faster
    exp_u20); "none" and "sum" against PyTorch in float32 tolerances."""
    n, c, h, w = 2, 40, 8, 8
    t = torch.randint(0, c, (n, h, w))
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    x.scatter_(1, t.unsqueeze(1), 15.0)
    x = (x + offset).float()
    t.view(-1)[::7] = 255
    for reduction in ("none", "sum"):
        check_against(lambda v: fusedloss.cross_entropy(v, t, ignore_index=255, reduction=reduction, backend=backend),
                      lambda v: F.cross_entropy(v, t, ignore_index=255, reduction=reduction), x,
                      f"confident NCHW {reduction} {backend}")


def test_native_targets_of_a_fallback_chain():
    """"auto" on CUDA is a chain triton > cuda > torch whose ops may move down it: a bool /
    uint8 label map is passed as it is (every member reads it), an int32 one converted (the
    cuda kernels read only bool / uint8 besides the input's dtype)."""
    from fusedloss.functional import _native_targets

    chain = _native_targets("triton>cuda>torch")
    assert torch.bool in chain and torch.uint8 in chain and torch.int32 not in chain
    assert torch.int32 in _native_targets("triton") and torch.int32 in _native_targets("triton>torch")
