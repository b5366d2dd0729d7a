"""The runners run_all.py and test_bench_cpu.py choose from, by name."""
from bench_bce import BENCH as BCE
from bench_cross_entropy import BENCH as CROSS_ENTROPY
from bench_cross_entropy import HOST_OVERHEAD, SEGMENTATION
from bench_focal import BENCH as FOCAL
from bench_linear_ce import BENCH as LINEAR_CE
from bench_sigmoid_focal import BENCH as SIGMOID_FOCAL
from bench_vision import BENCHES as VISION

BENCHES = {b.name: b for b in (CROSS_ENTROPY, LINEAR_CE, HOST_OVERHEAD, SEGMENTATION, FOCAL, BCE, SIGMOID_FOCAL, *VISION)}
ALIASES = {"ce": "cross_entropy", "softmax_focal": "focal", "bce_with_logits": "bce", "linear": "linear_ce",
           "host": "ce_host_overhead", "seg": "ce_segmentation",
           "vision": "vision_ce,vision_sigmoid_focal,vision_bce"}  # an alias may name several runners


def select(names: str) -> list:
    """Runners from a comma-separated list of names or aliases; ValueError names the unknown ones."""
    picked = [p for n in names.split(",") if n.strip() for p in ALIASES.get(n.strip(), n.strip()).split(",")]
    unknown = [n for n in picked if n not in BENCHES]
    if unknown:
        raise ValueError(f"unknown loss {', '.join(unknown)}; choose from {', '.join(BENCHES)}")
    return [BENCHES[n] for n in picked]
