"""Cross-entropy: fusedloss.cross_entropy vs F.cross_entropy (eager and torch.compile),
Liger-Kernel, flash-attn, Unsloth (and why Cut Cross-Entropy is not run). Three runners:
  cross_entropy      LLM-style (N, C) logits (a leaf; the `h @ W.T` flow is bench_linear_ce.py)
  ce_host_overhead   tiny shapes, where the host-side cost of a call shows (2 CPU threads)
  ce_segmentation    (N, C, H, W) maps, ignore_index=255, contiguous and channels_last

    python bench/bench_cross_entropy.py [--device cuda] [--quick]
"""
import math

import harness
import torch
import torch.nn.functional as F

import fusedloss

IGNORE_EVERY = 16  # every 16th token is padding (ignore_index), as in LLM batches


def shapes(device_type, quick):
    if quick:
        return [((256, 1000), torch.float32)]
    if device_type == "cuda":
        llm = [((n, c), torch.bfloat16) for n in (4096, 16384) for c in (32000, 128256, 256000)]
        return [((4096, 32000), torch.float32)] + llm
    # 2-core CPU: the target shape and a bf16 row
    return [((4096, 32000), torch.float32), ((1024, 32000), torch.bfloat16)]


def make_target(shape, device, ignore_index=-100):
    """Class indices of the target's shape, every IGNORE_EVERY-th (flattened) one ignored."""
    c = shape[1]
    t = torch.randint(0, c, (shape[0],) + tuple(shape[2:]), device=device)
    t.view(-1)[::IGNORE_EVERY] = ignore_index
    return t


def setup(shape, dtype, device, layout="", ignore_index=-100):
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = make_target(shape, device, ignore_index)
    traffic = x.numel() * x.element_size()
    peers = _peers(t, device) if x.dim() == 2 else [
        harness.Impl(name, "peer", skip="takes 2-D (N, C) logits only") for name in (*PEERS, "cut-cross-entropy")
    ]
    return harness.Setup(
        x=x,
        fused=lambda x, backend, **kw: fusedloss.cross_entropy(x, t, ignore_index=ignore_index, backend=backend, **kw),
        eager=lambda x: F.cross_entropy(x, t, ignore_index=ignore_index),
        bytes_fwd=traffic + t.numel() * t.element_size(),
        bytes_fwdbwd=2 * traffic + t.numel() * t.element_size(),
        peers=peers,
        # the gradient written into the logits' storage: the memory-saving mode Liger always
        # uses and flash-attn offers
        variants={"inplace_backward": {"inplace_backward": True}},
    )


# ----------------------------------------------------------------------------- peers
def _liger(t):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss()  # writes the gradient into its input during forward
    return lambda x: loss(x, t)


def _flash_attn(t):
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    counted = (t != -100).sum()

    def fn(x):
        losses, _ = cross_entropy_loss(x, t)  # per-row losses, 0 for ignored rows
        return losses.sum() / counted

    return fn


def _unsloth(t):
    from unsloth.kernels.cross_entropy_loss import fast_cross_entropy_loss

    return lambda x: fast_cross_entropy_loss(x.unsqueeze(0), t.unsqueeze(0))  # (batch, seq, vocab)


PEERS = {"liger-kernel": _liger, "flash-attn": _flash_attn, "unsloth": _unsloth}
CCE_REASON = "fuses the classifier matmul: takes (embeddings, classifier weight), not logits"


def _peers(t, device):
    rows = [harness.peer(name, device, lambda make=make: make(t)) for name, make in PEERS.items()]
    try:  # Apple's Cut Cross-Entropy: listed, never run on logits
        import cut_cross_entropy  # noqa: F401

        rows.append(harness.Impl("cut-cross-entropy", "peer", skip=CCE_REASON))
    except ImportError as e:
        rows.append(harness.Impl("cut-cross-entropy", "peer", skip=f"not installed ({e}); and it {CCE_REASON}"))
    return rows


# ----------------------------------------------------------------------------- SPEC seed case
def seed_check(device, backend):
    """SPEC's seed case: logits ones(3, 5) with the last row -inf, target [1, 2, -1],
    ignore_index=-1 -> loss log(5) = 1.6094 and a zero gradient on the (ignored) last row,
    where PyTorch returns NaN."""
    x = torch.ones(3, 5, device=device)
    x[2] = -math.inf
    t = torch.tensor([1, 2, -1], device=device)
    xg = x.clone().requires_grad_(True)
    loss = fusedloss.cross_entropy(xg, t, ignore_index=-1, backend=backend)
    loss.backward()
    value, expected = loss.item(), math.log(5.0)
    xp = x.clone().requires_grad_(True)
    torch_loss = F.cross_entropy(xp, t, ignore_index=-1)
    torch_loss.backward()
    zero_row = bool((xg.grad[2] == 0).all())
    ok = abs(value - expected) <= 1e-6 + 1e-5 * expected and zero_row and bool(torch.isfinite(xg.grad).all())
    return {
        "check": "CE seed case (ignored -inf row)",
        "value": value, "expected": expected, "torch": torch_loss.item(),
        "detail": f"loss {value:.4f} (expected {expected:.4f}), last grad row zero: {zero_row}; "
                  f"PyTorch: loss {torch_loss.item():.4f}, last grad row {_row_state(xp.grad[2])}",
        "ok": ok,
    }


def _row_state(row):
    if torch.isnan(row).any():
        return "NaN"
    return "zero" if bool((row == 0).all()) else "nonzero"


BENCH = harness.LossBench(
    name="cross_entropy",
    setup=setup,
    shapes=shapes,
    check_shape=(37, 1000),
    targets={((4096, 32000), torch.float32): harness.speed_memory_targets(vs_eager=4.0, vs_compile=2.0,
                                                                          mem_vs_eager=0.4)},
    extra_checks=[seed_check],
    title="logits a leaf",
)


# ----------------------------------------------------------------------------- host overhead
def host_shapes(device_type, quick):
    return [((8, 10), torch.float32), ((256, 1000), torch.float32)]


HOST_OVERHEAD = harness.LossBench(
    name="ce_host_overhead",
    setup=setup,
    shapes=host_shapes,
    # issue: fusedloss's fwd+bwd at most 2.0x eager's time at 8x10, at most 1.0x at 256x1000
    targets={
        ((8, 10), torch.float32): [harness.Check("fwd+bwd time fusedloss/eager", "fusedloss", "eager", "fwdbwd_ms",
                                                 2.0, False)],
        ((256, 1000), torch.float32): [harness.Check("fwd+bwd time fusedloss/eager", "fusedloss", "eager",
                                                     "fwdbwd_ms", 1.0, False)],
    },
    threads=2,
    title="tiny shapes: the host-side cost of a call; 2 CPU threads",
)


# ----------------------------------------------------------------------------- segmentation
SEG_IGNORE = 255  # the "void" label of VOC / Cityscapes-style maps


def seg_shapes(device_type, quick):
    if quick:
        shape = (2, 21, 32, 32)
    elif device_type == "cuda":
        shape = (16, 150, 128, 128)  # ADE20K's 150 classes
    else:
        shape = (8, 21, 128, 128)  # VOC's 21 classes
    return [(shape, torch.float32), (shape, torch.float32, "channels_last")]


SEGMENTATION = harness.LossBench(
    name="ce_segmentation",
    setup=lambda shape, dtype, device, layout="": setup(shape, dtype, device, layout, ignore_index=SEG_IGNORE),
    shapes=seg_shapes,
    title=f"(N, C, H, W) maps, ignore_index={SEG_IGNORE}",
)

if __name__ == "__main__":
    harness.main([BENCH, HOST_OVERHEAD, SEGMENTATION], __doc__)
