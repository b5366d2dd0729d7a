"""Dense vision maps (issue 9), fusedloss vs eager PyTorch and torch.compile, side by side:
  vision_ce             segmentation cross-entropy, (16, 150, 64, 64) float32 logits (ADE20K's
                        150 classes), ignore_index=255, contiguous and channels_last
  vision_sigmoid_focal  dense detection sigmoid focal loss (gamma=2, alpha=0.25, mean),
                        (8, 80, 64, 64) channels_last logits and targets (COCO's 80 classes)
  vision_bce            BCE-with-logits on (8, 80, 64, 64) NCHW, with a (C, 1, 1) class weight
                        (the base row) and without it (the "no weight" row)

    python bench/bench_vision.py [--quick] [--threads 1]
    python bench/run_all.py --device cpu --losses vision --threads 1 --pytest-args="--benchmark-timer=time.process_time"

The targets (reported, not asserted): CE >= 2.5x torch.compile's fwd+bwd speed with <= 0.4x
eager's peak extra memory, both layouts; sigmoid focal >= 2x torch.compile, <= 0.15x eager's
memory; BCE with the (C, 1, 1) weight no slower than without (ratio <= 1.0; one run's noise is
a few percent). On a shared 2-core machine wall time is noisy: the README's figures use one
thread and process CPU time (pytest-benchmark's --benchmark-timer=time.process_time), medians.
"""
import harness
import torch
import torch.nn.functional as F

import fusedloss
from bench_cross_entropy import setup as ce_setup
from bench_sigmoid_focal import setup as focal_setup

SEG_IGNORE = 255
CE_SHAPE = (16, 150, 64, 64)
DET_SHAPE = (8, 80, 64, 64)
QUICK_CE, QUICK_DET = (2, 21, 32, 32), (2, 8, 32, 32)


def _fmt(layout):
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


# ----------------------------------------------------------------------------- cross-entropy
def ce_shapes(device_type, quick):
    shape = QUICK_CE if quick else CE_SHAPE
    return [(shape, torch.float32), (shape, torch.float32, "channels_last")]


def _ce_setup(shape, dtype, device, layout=""):
    s = ce_setup(shape, dtype, device, layout, ignore_index=SEG_IGNORE)
    s.variants = {}  # the targets are about the plain call (inplace_backward is the LLM flow's option)
    return s


CE = harness.LossBench(
    name="vision_ce",
    setup=_ce_setup,
    shapes=ce_shapes,
    targets={(CE_SHAPE, torch.float32): harness.speed_memory_targets(1.0, 2.5, 0.4)[1:],
             (CE_SHAPE, torch.float32, "channels_last"): harness.speed_memory_targets(1.0, 2.5, 0.4)[1:]},
    title=f"segmentation maps, ignore_index={SEG_IGNORE}",
)


# ----------------------------------------------------------------------------- sigmoid focal
def det_shapes(device_type, quick):
    return [(QUICK_DET if quick else DET_SHAPE, torch.float32, "channels_last")]


FOCAL = harness.LossBench(
    name="vision_sigmoid_focal",
    setup=focal_setup,
    shapes=det_shapes,
    targets={(DET_SHAPE, torch.float32, "channels_last"): harness.speed_memory_targets(1.0, 2.0, 0.15)[1:]},
    title="dense detection maps, channels_last logits and targets",
)


# ----------------------------------------------------------------------------- BCE with a class weight
def bce_shapes(device_type, quick):
    return [(QUICK_DET if quick else DET_SHAPE, torch.float32)]


def _bce_setup(shape, dtype, device, layout=""):
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=_fmt(layout))
    y = (torch.rand(shape, device=device) < 0.1).to(dtype).contiguous(memory_format=_fmt(layout))
    w = torch.rand(shape[1], 1, 1, device=device) + 0.5  # a (C, 1, 1) class weight, float32

    def fused(x, backend, weight=w):
        return fusedloss.binary_cross_entropy_with_logits(x, y, weight, backend=backend)

    elementwise = x.numel() * x.element_size()
    return harness.Setup(
        x=x,
        fused=fused,
        eager=lambda x: F.binary_cross_entropy_with_logits(x, y.to(x.dtype), w.to(x.dtype)),
        bytes_fwd=2 * elementwise,
        bytes_fwdbwd=3 * elementwise,
        variants={"no weight": {"weight": None}},
    )


BCE = harness.LossBench(
    name="vision_bce",
    setup=_bce_setup,
    shapes=bce_shapes,
    targets={(DET_SHAPE, torch.float32): [
        harness.Check("fwd+bwd (C,1,1)-weighted / unweighted", "fusedloss", "fusedloss+no weight", "fwdbwd_ms", 1.0,
                      False),
    ]},
    title="NCHW maps with a (C, 1, 1) class weight; the 'no weight' row is the same call without it",
)

BENCHES = [CE, FOCAL, BCE]

if __name__ == "__main__":
    harness.main(BENCHES, __doc__)
