"""Sigmoid focal loss (gamma=2, alpha=0.25, mean): fusedloss.sigmoid_focal_loss vs
torchvision.ops.sigmoid_focal_loss's formula written out in PyTorch ops (torchvision is not
a dependency), eager and under torch.compile. No peer library has it.

    python bench/bench_sigmoid_focal.py [--device cuda] [--quick]
"""
import harness
import torch
import torch.nn.functional as F

import fusedloss

ALPHA, GAMMA = 0.25, 2.0


def shapes(device_type, quick):
    if quick:
        return [((4096, 80), torch.float32)]
    if device_type == "cuda":  # dense detection maps: anchors x 80 classes
        return [((160000, 80), torch.float32), ((2000000, 80), torch.float32), ((2000000, 80), torch.bfloat16)]
    return [((160000, 80), torch.float32)]


def sigmoid_focal_eager(x, y, alpha=ALPHA, gamma=GAMMA):
    """torchvision.ops.sigmoid_focal_loss, reduction="mean", op for op."""
    p = torch.sigmoid(x)
    ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss.mean()


def setup(shape, dtype, device, layout=""):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    # few positive anchors; a target in the logits' layout, as zeros_like(logits) gives it
    y = (torch.rand(shape, device=device) < 0.01).to(dtype).contiguous(memory_format=fmt)
    elementwise = x.numel() * x.element_size()
    return harness.Setup(
        x=x,
        fused=lambda x, backend: fusedloss.sigmoid_focal_loss(x, y, ALPHA, GAMMA, "mean", backend=backend),
        eager=lambda x: sigmoid_focal_eager(x, y.to(x.dtype)),
        bytes_fwd=2 * elementwise,
        bytes_fwdbwd=3 * elementwise,
        peers=[harness.Impl("peers", "peer", skip="Liger-Kernel, flash-attn and Unsloth have no sigmoid focal loss")],
    )


BENCH = harness.LossBench(
    name="sigmoid_focal",
    setup=setup,
    shapes=shapes,
    check_shape=(1000, 80),
    targets={((160000, 80), torch.float32): harness.speed_memory_targets(
        vs_eager=10.0, vs_compile=1.5, mem_vs_eager=0.2)},
)

if __name__ == "__main__":
    harness.main([BENCH], __doc__)
