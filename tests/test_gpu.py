"""GPU checks of the triton and cuda backends on CUDA tensors.

CI has no GPU, so these skip there (the CPU suite runs the same kernels' math: the
triton kernels under TRITON_INTERPRET=1, the CUDA per-row arithmetic through the
shared header in the CPU kernels). On a GPU machine run them, without the interpreter:
    FUSEDLOSS_TEST_GPU=1 python -m pytest -p no:xdist tests/test_gpu.py
References are PyTorch's own functions evaluated in float64.
"""
import pytest
import torch
import torch.nn.functional as F

import fusedloss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = ["triton", "cuda"]
TOL = {torch.float32: (1e-5, 1e-6, 1e-6), torch.bfloat16: (1e-2, 1e-3, 1e-2), torch.float16: (1e-2, 1e-3, 1e-2)}


def _backend_or_fail(backend):
    reason = fusedloss.backends("cuda")[backend]
    assert reason is None, f"backend {backend} unavailable on CUDA: {reason}"


def _assert_close(actual, expected, rtol, atol, what):
    actual, expected = actual.double(), expected.double()
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    bad = ~(err <= bound)
    assert not bad.any(), (
        f"{what}: {int(bad.sum())} elements off; max abs err {err.max().item():.3e}, "
        f"first at {tuple(bad.nonzero()[0].tolist())}"
    )


def _ce_ref(x, t, **kw):
    x64 = x.detach().double().requires_grad_()
    loss = F.cross_entropy(x64, t, **kw)
    loss.sum().backward()
    return loss.detach(), x64.grad


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [1000, 50257, 131072])
@pytest.mark.parametrize(
    "kw",
    [{}, {"label_smoothing": 0.1}, {"reduction": "sum", "ignore_index": 3}, {"weight": True, "label_smoothing": 0.05}],
    ids=["plain", "smooth", "sum-ignore", "weight-smooth"],
)
def test_cross_entropy_matches_pytorch(backend, dtype, C, kw):
    _backend_or_fail(backend)
    g = torch.Generator(device="cuda").manual_seed(C)
    N = 64
    x = (torch.randn(N, C, device="cuda", generator=g) * 3).to(dtype).requires_grad_()
    t = torch.randint(0, C, (N,), device="cuda", generator=g)
    t[::7] = kw.get("ignore_index", -100)
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(C, device="cuda", generator=g) + 0.5
    loss = fusedloss.cross_entropy(x, t, backend=backend, **kw)
    loss.backward()
    ref_loss, ref_grad = _ce_ref(x, t, **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})
    rtol, atol, gtol = TOL[dtype]
    _assert_close(loss, ref_loss, rtol, atol, f"{backend} loss")
    _assert_close(x.grad, ref_grad, 0.0, gtol, f"{backend} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_seed_case_and_masked_rows(backend):
    _backend_or_fail(backend)
    x = torch.ones(3, 5, device="cuda")
    x[2] = float("-inf")
    x.requires_grad_()
    t = torch.tensor([1, 2, -1], device="cuda")
    loss = fusedloss.cross_entropy(x, t, ignore_index=-1, backend=backend)
    loss.backward()
    assert abs(loss.item() - 1.6094379) < 1e-5
    assert torch.equal(x.grad[2], torch.zeros(5, device="cuda"))
    # ignored rows full of NaN/inf and an empty row stay exactly zero
    y = torch.randn(4, 7, device="cuda")
    y[0] = float("nan")
    y[1] = float("inf")
    y[2] = float("-inf")
    y.requires_grad_()
    t = torch.tensor([-100, -100, 3, 1], device="cuda")
    loss = fusedloss.cross_entropy(y, t, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _ce_ref(y.detach()[3:], t[3:])
    _assert_close(loss, ref_loss, 1e-5, 1e-6, "loss with ignored/empty rows")
    assert torch.equal(y.grad[:3], torch.zeros(3, 7, device="cuda"))
    _assert_close(y.grad[3:], ref_grad, 0, 1e-6, "grad of the counted row")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_out_of_range_target_gives_nan_not_a_crash(backend):
    _backend_or_fail(backend)
    x = torch.randn(4, 10, device="cuda", requires_grad=True)
    t = torch.tensor([0, 10, -5, 2], device="cuda")
    loss = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    torch.cuda.synchronize()
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 3]]).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_int64_offsets_beyond_2_pow_31(backend):
    """N*C > 2^31: the last rows must be indexed correctly (int32 offsets would wrap)."""
    _backend_or_fail(backend)
    free, _ = torch.cuda.mem_get_info()
    N, C = 16400, 131072  # 2.15e9 elements, 4.3 GB in bf16 (+ the same for the gradient)
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.empty(N, C, device="cuda", dtype=torch.bfloat16).normal_().requires_grad_()
    t = torch.randint(0, C, (N,), device="cuda")
    loss = fusedloss.cross_entropy(x, t, reduction="none", backend=backend)
    loss.sum().backward()
    tail = slice(N - 3, N)
    ref_loss, ref_grad = _ce_ref(x.detach()[tail], t[tail], reduction="none")
    _assert_close(loss[tail], ref_loss, 1e-2, 1e-3, "loss of the last rows")
    _assert_close(x.grad[tail], ref_grad, 0, 1e-2, "grad of the last rows")
    del x, loss


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_deterministic(backend):
    _backend_or_fail(backend)
    x = torch.randn(257, 32000, device="cuda", requires_grad=True)
    t = torch.randint(0, 32000, (257,), device="cuda")
    outs = []
    for _ in range(2):
        x.grad = None
        loss = fusedloss.cross_entropy(x, t, label_smoothing=0.1, backend=backend)
        loss.backward()
        outs.append((loss.detach().clone(), x.grad.clone()))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binary_losses_match_pytorch(backend, dtype):
    _backend_or_fail(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(512, 300, device="cuda", generator=g) * 4).to(dtype).requires_grad_()
    y = torch.rand(512, 300, device="cuda", generator=g).round()
    pw = torch.rand(300, device="cuda", generator=g) + 0.5
    w = torch.rand(300, device="cuda", generator=g)
    loss = fusedloss.binary_cross_entropy_with_logits(x, y.to(dtype), w, pos_weight=pw, backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(x64, y.double(), w.double(), pos_weight=pw.double())
    ref.backward()
    rtol, atol, gtol = TOL[dtype]
    _assert_close(loss, ref, rtol, atol, "bce loss")
    _assert_close(x.grad, x64.grad, 0, gtol, "bce grad")

    x.grad = None
    loss = fusedloss.sigmoid_focal_loss(x, y.to(dtype), reduction="sum", backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    p = torch.sigmoid(x64)
    ce = F.binary_cross_entropy_with_logits(x64, y.double(), reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    ref = ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).sum()
    ref.backward()
    _assert_close(loss, ref, rtol, max(atol, 1e-4), "sigmoid focal loss")
    _assert_close(x.grad, x64.grad, 0, gtol, "sigmoid focal grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_softmax_focal_matches_formula(backend):
    _backend_or_fail(backend)
    x = (torch.randn(96, 32000, device="cuda") * 2).requires_grad_()
    t = torch.randint(0, 32000, (96,), device="cuda")
    t[::5] = -100
    loss = fusedloss.focal_loss(x, t, gamma=2.0, backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    keep = t != -100
    logp = F.log_softmax(x64[keep], 1).gather(1, t[keep, None]).squeeze(1)
    ref = (-(1 - logp.exp()) ** 2 * logp).mean()
    ref.backward()
    _assert_close(loss, ref, 1e-5, 1e-6, "focal loss")
    _assert_close(x.grad, x64.grad, 0, 1e-6, "focal grad")


def test_compile_fullgraph_on_gpu():
    model = torch.nn.Linear(64, 1000, device="cuda")
    x = torch.randn(32, 64, device="cuda")
    t = torch.randint(0, 1000, (32,), device="cuda")

    def step(x, t):
        return fusedloss.cross_entropy(model(x), t, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, t)
    loss.backward()
    ref = F.cross_entropy(model(x).double(), t, label_smoothing=0.1)
    _assert_close(loss, ref, 1e-5, 1e-5, "compiled loss")



@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_softcap_zloss_and_confident_focal_float32(backend):
    """Paths whose accuracy leans on exp/log/tanh rewrites (softcap's tanh from expm1, the
    focal q = -expm1(log p) near p = 1), where GPU fast-math intrinsics would show."""
    _backend_or_fail(backend)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(64, 4096, device="cuda", generator=g) * 4).requires_grad_()
    t = torch.randint(0, 4096, (64,), device="cuda", generator=g)
    cap = 30.0
    loss = fusedloss.cross_entropy(x, t, softcap=cap, z_loss=1e-4, label_smoothing=0.1, backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    z = cap * torch.tanh(x64 / cap)
    ref = F.cross_entropy(z, t, label_smoothing=0.1) + 1e-4 * (torch.logsumexp(z, 1) ** 2).mean()
    ref.backward()
    _assert_close(loss, ref, 1e-5, 1e-6, "softcap + z_loss loss")
    _assert_close(x.grad, x64.grad, 0, 1e-6, "softcap + z_loss grad")

    y = torch.randn(64, 4096, device="cuda", generator=g)
    y[torch.arange(64), t] += 25.0  # p_t -> 1: q = 1 - p_t tiny
    y.requires_grad_()
    loss = fusedloss.focal_loss(y, t, gamma=0.5, reduction="sum", backend=backend)
    loss.backward()
    y64 = y.detach().double().requires_grad_()
    logp = F.log_softmax(y64, 1).gather(1, t[:, None]).squeeze(1)
    ref = (-(-torch.expm1(logp)) ** 0.5 * logp).sum()
    ref.backward()
    _assert_close(loss, ref, 1e-4, 1e-6, "confident focal loss")
    _assert_close(y.grad, y64.grad, 0, 1e-6, "confident focal grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("C", [150, 300])
def test_segmentation_maps(backend, dtype, layout, C):
    """Segmentation cross-entropy (4 x C x 128 x 128, ignore_index=255, label smoothing and a
    class weight): NCHW runs the K-dim kernels (positions across lanes / threads; C = 300 with
    65536 rows takes CUDA's thread per position too), channels_last the row kernels."""
    _backend_or_fail(backend)
    g = torch.Generator(device="cuda").manual_seed(C)
    x = (torch.randn(4, C, 128, 128, device="cuda", generator=g) * 3).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    t = torch.randint(0, C, (4, 128, 128), device="cuda", generator=g)
    t[torch.rand(4, 128, 128, device="cuda", generator=g) < 0.2] = 255
    w = torch.rand(C, device="cuda", generator=g) + 0.5
    loss = fusedloss.cross_entropy(x, t, w, ignore_index=255, label_smoothing=0.1, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _ce_ref(x, t, weight=w.double(), ignore_index=255, label_smoothing=0.1)
    rtol, atol, gtol = TOL[dtype]
    _assert_close(loss, ref_loss, rtol, atol, f"{backend} {layout} loss")
    _assert_close(x.grad, ref_grad, 0.0, gtol, f"{backend} {layout} grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kdim_focal_and_soft_targets(backend):
    """Softmax focal and probability targets on NCHW maps (the K-dim forward kernels)."""
    _backend_or_fail(backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(2, 19, 64, 96, device="cuda", generator=g) * 3).requires_grad_()
    t = torch.randint(0, 19, (2, 64, 96), device="cuda", generator=g)
    loss = fusedloss.focal_loss(x, t, gamma=2.0, backend=backend)
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    logp_t = torch.log_softmax(x64, 1).gather(1, t.unsqueeze(1)).squeeze(1)
    ref = (-(1 - logp_t.exp()) ** 2 * logp_t).mean()
    ref.backward()
    _assert_close(loss, ref.detach(), *TOL[torch.float32][:2], f"{backend} focal loss")
    _assert_close(x.grad, x64.grad, 0.0, TOL[torch.float32][2], f"{backend} focal grad")
    y = torch.softmax(torch.randn(2, 19, 64, 96, device="cuda", generator=g), 1)
    x.grad = None
    loss = fusedloss.cross_entropy(x, y, label_smoothing=0.1, backend=backend)
    loss.backward()
    ref_loss, ref_grad = _ce_ref(x, y.double(), label_smoothing=0.1)
    _assert_close(loss, ref_loss, *TOL[torch.float32][:2], f"{backend} soft-target loss")
    _assert_close(x.grad, ref_grad, 0.0, TOL[torch.float32][2], f"{backend} soft-target grad")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_vocab_parallel_on_the_device_without_host_sync(backend):
    """fusedloss.distributed on CUDA tensors, one process (no group; the merge and backward run
    on the device as with NCCL): equals cross_entropy on the same logits, and neither forward
    nor backward synchronizes with the host (CUDA sync debug mode raises on a sync)."""
    _backend_or_fail(backend)
    from fusedloss.distributed import vocab_parallel_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(256, 5000, device="cuda", generator=g) * 3).requires_grad_()
    t = torch.randint(0, 5000, (256,), device="cuda", generator=g)
    t[::9] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    ref = fusedloss.cross_entropy(x, t, backend=backend, **kw)
    (ref_grad,) = torch.autograd.grad(ref, x)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = vocab_parallel_cross_entropy(x, t, vocab_start_index=0, backend=backend, **kw)
        (grad,) = torch.autograd.grad(loss, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _assert_close(loss, ref, 1e-5, 1e-6, "vocab-parallel loss")
    _assert_close(grad, ref_grad, 0, 1e-6, "vocab-parallel gradient")


@pytest.mark.parametrize("target", [torch.bool, torch.uint8, torch.int32], ids=["bool", "uint8", "int32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binary_label_maps_on_cuda(dtype, target):
    """cuda backend, label-map targets: bool / uint8 read by the kernels as they are (no
    input-sized float copy: the "mean" step's only input-sized result is the gradient), int32
    converted first by the Python layer; BCE and sigmoid focal equal PyTorch's formulas in
    float64, on a contiguous map (vectorized loads) and on one that starts one element into its
    buffer (contiguous, no copy; a bool / uint8 map then at an odd byte: element loads)."""
    _backend_or_fail("cuda")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Big(TorchDispatchMode):  # input-sized results of non-view ops (kernels' own writes aside)
        def __init__(self, numel):
            super().__init__()
            self.numel, self.names = numel, []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if not func.is_view and any(isinstance(t, torch.Tensor) and t.numel() >= self.numel for t in outs):
                self.names.append(str(func))
            return out

    g = torch.Generator(device="cuda").manual_seed(5)
    x0 = (torch.randn(16, 3, 40, 48, device="cuda", generator=g) * 4).to(dtype)
    labels = torch.rand(x0.numel() + 1, device="cuda", generator=g) < 0.3
    for layout, y in (("contiguous", labels[:-1].to(target).view(x0.shape)),
                      ("offset 1", labels.to(target)[1:].view(x0.shape))):  # fmt: skip
        y64 = y.double()
        x = x0.clone().requires_grad_()
        with Big(x.numel()) as rec:
            loss = fusedloss.binary_cross_entropy_with_logits(x, y, backend="cuda")
            loss.backward()
        if target != torch.int32:
            assert len(rec.names) == 1, f"{layout}: input-sized results {rec.names}, expected only the gradient"
        x64 = x0.detach().double().requires_grad_()
        ref = F.binary_cross_entropy_with_logits(x64, y64)
        ref.backward()
        rtol, atol, gtol = TOL[dtype]
        _assert_close(loss, ref, rtol, atol, f"bce loss, {target} {layout}")
        _assert_close(x.grad, x64.grad, 0, gtol, f"bce grad, {target} {layout}")

        x.grad = None
        loss = fusedloss.sigmoid_focal_loss(x, y, alpha=0.25, gamma=2.0, reduction="none", backend="cuda")
        go = torch.rand(loss.shape, device="cuda", generator=g)
        loss.backward(go.to(loss.dtype))
        x64 = x0.detach().double().requires_grad_()
        p = torch.sigmoid(x64)
        p_t = p * y64 + (1 - p) * (1 - y64)
        ref = (0.25 * y64 + 0.75 * (1 - y64)) * F.binary_cross_entropy_with_logits(x64, y64, reduction="none")
        ref = ref * (1 - p_t) ** 2
        ref.backward(go.to(loss.dtype).double())
        _assert_close(loss, ref, rtol, max(atol, 1e-4), f"focal loss, {target} {layout}")
        _assert_close(x.grad, x64.grad, 0, gtol, f"focal grad, {target} {layout}")
