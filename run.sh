#!/usr/bin/env bash
# One entry point, setup included, for a fresh machine:
#   bash run.sh test     # builds, then runs the test suite (what .ci/run calls)
#   bash run.sh bench    # builds, then the benchmark table + correctness summary (CPU timings by
#                        # pytest-benchmark, CUDA by triton's do_bench; JSON + PNG in bench/results/)
# Extra arguments go to pytest / bench/run_all.py. FUSEDLOSS_VENV picks the venv (default .venv).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${FUSEDLOSS_VENV:-.venv}"

setup() {
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # torch==2.13.0: the CPU wheel on this machine's disk (a bare `torch` pulls GBs of CUDA).
  python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
  pip install -q "setuptools>=64" wheel triton numpy pytest pytest-xdist pytest-benchmark matplotlib expecttest transformers
  pip install -q --no-build-isolation -e .
  python -c "import fusedloss, sys; print('fusedloss backends (None = available):', fusedloss.backends())"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  test)
    setup
    python -m pytest -n 2 -q tests "$@"
    ;;
  bench)
    setup
    python bench/run_all.py "$@"
    # the vocab-parallel loss runs on several processes: its own runner (bench/bench_vocab_parallel.py)
    vp=(--json bench/results/vocab_parallel.json)
    for a in "$@"; do [ "$a" = --quick ] && vp+=(--quick); done
    python bench/bench_vocab_parallel.py "${vp[@]}"
    ;;
  setup)
    setup
    ;;
  *)
    echo "usage: bash run.sh {test|bench|setup} [args]" >&2
    exit 2
    ;;
esac
