"""Softmax focal loss: fusedloss.focal_loss vs the straightforward PyTorch formula
(log_softmax, gather, exp, pow) eager and under torch.compile. No peer library has it.

    python bench/bench_focal.py [--device cuda] [--quick]
"""
import harness
import torch
import torch.nn.functional as F

import fusedloss
from bench_cross_entropy import make_target

GAMMA = 2.0


def shapes(device_type, quick):
    if quick:
        return [((256, 1000), torch.float32)]
    if device_type == "cuda":
        return [((4096, 32000), torch.float32), ((16384, 128256), torch.bfloat16)]
    return [((4096, 32000), torch.float32)]


def focal_eager(x, t, gamma=GAMMA, ignore_index=-100):
    """alpha-free softmax focal loss, mean over the rows whose target is not ignored."""
    counted = t != ignore_index
    logp = F.log_softmax(x, dim=1).gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = -(1 - logp.exp()).pow(gamma) * logp
    return torch.where(counted, loss, torch.zeros_like(loss)).sum() / counted.sum()


def setup(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    t = make_target(shape, device)
    traffic = x.numel() * x.element_size()
    return harness.Setup(
        x=x,
        fused=lambda x, backend: fusedloss.focal_loss(x, t, gamma=GAMMA, backend=backend),
        eager=lambda x: focal_eager(x, t),
        bytes_fwd=traffic + t.numel() * t.element_size(),
        bytes_fwdbwd=2 * traffic + t.numel() * t.element_size(),
        peers=[harness.Impl("peers", "peer", skip="Liger-Kernel, flash-attn and Unsloth have no softmax focal loss")],
    )


BENCH = harness.LossBench(
    name="focal",
    setup=setup,
    shapes=shapes,
    check_shape=(37, 1000),
    targets={((4096, 32000), torch.float32): harness.speed_memory_targets(
        vs_eager=4.0, vs_compile=2.0, mem_vs_eager=0.4)},
)

if __name__ == "__main__":
    harness.main([BENCH], __doc__)
