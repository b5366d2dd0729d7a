"""BCE-with-logits with pos_weight: fusedloss.binary_cross_entropy_with_logits vs
F.binary_cross_entropy_with_logits, eager and under torch.compile. No peer library has it.

    python bench/bench_bce.py [--device cuda] [--quick]
"""
import harness
import torch
import torch.nn.functional as F

import fusedloss


def shapes(device_type, quick):
    if quick:
        return [((512, 256), torch.float32)]
    if device_type == "cuda":  # multi-label maps
        return [((8192, 2048), torch.float32), ((32768, 8192), torch.float32), ((32768, 8192), torch.bfloat16)]
    return [((8192, 2048), torch.float32)]


def setup(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    y = (torch.rand(shape, device=device) < 0.1).to(dtype)  # sparse multi-label targets
    pos_weight = torch.rand(shape[-1], device=device) * 9 + 1  # (L,), float32 like a user's
    elementwise = x.numel() * x.element_size()
    return harness.Setup(
        x=x,
        fused=lambda x, backend: fusedloss.binary_cross_entropy_with_logits(
            x, y, pos_weight=pos_weight, backend=backend),
        eager=lambda x: F.binary_cross_entropy_with_logits(x, y.to(x.dtype), pos_weight=pos_weight.to(x.dtype)),
        bytes_fwd=2 * elementwise,  # input and target read
        bytes_fwdbwd=3 * elementwise,  # ... and the gradient written
        peers=[harness.Impl("peers", "peer", skip="Liger-Kernel, flash-attn and Unsloth have no BCE-with-logits")],
    )


BENCH = harness.LossBench(
    name="bce",
    setup=setup,
    shapes=shapes,
    check_shape=(37, 300),
    targets={((8192, 2048), torch.float32): harness.speed_memory_targets(
        vs_eager=6.0, vs_compile=1.5, mem_vs_eager=0.45)},
)

if __name__ == "__main__":
    harness.main([BENCH], __doc__)
