#!/usr/bin/env bash
# The whole GPU check, in one call of at most ~8 minutes on a fresh GPU machine (torch+CUDA
# and triton preinstalled, nothing downloadable):
#
#   bash bench/gpu_check.sh [OUT_DIR]             # OUT_DIR: default $OUT, else bench/results/gpu
#   bash bench/gpu_check.sh --dry-run [OUT_DIR]   # the same stages on a CPU, tiny shapes, no build:
#                                                 # checks the scripts before spending GPU time
#
# Stages, each under its own `timeout` (a hang costs its stage only; the next one runs anyway):
#   env       GPU, driver, versions              wheels    pip install --no-deps .whl/*.whl (Liger)
#   build     the CUDA extension (pip install -e ., FUSEDLOSS_CPU_DEFAULT_ONLY=1)
#   backends  fusedloss.backends("cuda")         tests     tests/test_gpu.py, both GPU backends
#   copy      device-to-device copy: the bandwidth reference (bench/gpu_bench.py copy)
#   llm       cross-entropy at LLM shapes vs eager, torch.compile, Liger (gpu_bench.py bench)
#   seglin    segmentation maps (CE 16x150x128x128 fp32/bf16, NCHW and channels_last) and the
#             non-leaf h @ W.T flow                                  (gpu_bench.py bench)
#   dense     sigmoid focal on 8x80x128x128 detection maps            (gpu_bench.py bench)
#   profile   per-kernel profile of one fwd+bwd step, triton and cuda (bench/profile_step.py)
#   summary   tables, the issue's targets, gpu-summary.json/.png       (gpu_bench.py summary)
# A stage's timeout is its cap, cut so that the later stages keep their minimum; the whole
# run stays within GPU_CHECK_BUDGET_S (default 490 s). Everything lands in OUT_DIR:
# gpu_check.log (all output), stage-<name>.log, test_gpu.xml, gpu-*.json, profile-*.{txt,json},
# gpu-summary.json and gpu-summary.png (if matplotlib is installed; else draw it later with
# `python bench/plot.py OUT_DIR/gpu-summary.json`).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
REPO="$(cd "$(dirname "$0")/.." && pwd)" || exit 2
OUT_DIR="${1:-${OUT:-$REPO/bench/results/gpu}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)" || exit 2  # absolute, before leaving the caller's directory
cd "$REPO" || exit 2
BUDGET="${GPU_CHECK_BUDGET_S:-490}"
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the GPU runs the compiled kernels, never the interpreter
DRYFLAG=()
[ "$DRY" = 1 ] && DRYFLAG=(--dry-run)
START=$SECONDS
SUMMARY=()

# run_stage NAME CAP RESERVE CMD...: CMD (a command or one of the functions below) under
# `timeout min(CAP, time left - RESERVE)`, RESERVE being the sum of the later stages'
# minimums; the limit is in $STAGE_TIMEOUT_S for CMD; its output also goes to stage-NAME.log.
run_stage() {
  local name=$1 cap=$2 reserve=$3
  shift 3
  local left=$((BUDGET - (SECONDS - START) - reserve))
  local limit=$((cap < left ? cap : left))
  local log="$OUT_DIR/stage-$name.log"
  if ((limit < 5)); then
    echo "=== [$name] skipped: $((BUDGET - (SECONDS - START)))s of the ${BUDGET}s budget left"
    SUMMARY+=("$(printf '%-9s %-24s' "$name" "SKIPPED (no time left)")")
    return 0
  fi
  echo
  echo "=== [$name] $(date -u +%H:%M:%S), timeout ${limit}s: $*"
  local t0=$SECONDS
  if declare -F "$1" >/dev/null; then
    set -- bash -c '"$@"' "$1" "$@"  # timeout runs programs: a function runs in a child bash (exported)
  fi
  STAGE_TIMEOUT_S=$limit timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]}
  local status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="TIMEOUT (${limit}s)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  local last
  last=$(grep -v '^[[:space:]]*$' "$log" 2>/dev/null | tail -n 1 | cut -c1-110)
  SUMMARY+=("$(printf '%-9s %-24s %4ss  %s' "$name" "$status" "$((SECONDS - t0))" "$last")")
  return 0
}

env_info() {
  date -u
  git log -1 --format='repo: %h %s' 2>/dev/null
  git status --short | head -20
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  else
    echo "nvidia-smi: not found"
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
  "$PY" - <<'EOF'
import importlib, platform, torch
for m in ("triton", "liger_kernel", "cut_cross_entropy", "flash_attn", "matplotlib", "pytest"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m}: {getattr(mod, '__version__', 'installed')}")
    except Exception as e:
        print(f"  {m}: not importable ({type(e).__name__})")
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF
}

install_wheels() {
  shopt -s nullglob
  local wheels=(.whl/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .whl/: peers not installed here are rows marked 'not installed'"
    return 0
  fi
  "$PY" -m pip install --no-index --no-deps "${wheels[@]}" && return 0
  echo "pip could not install into the environment; into .whl/site instead (on PYTHONPATH for the later stages)"
  "$PY" -m pip install --no-index --no-deps --target .whl/site "${wheels[@]}"
}

build() {
  if [ "$DRY" = 1 ]; then
    echo "dry run: build skipped (would run: FUSEDLOSS_CPU_DEFAULT_ONLY=1 $PY -m pip install --no-index" \
      "--no-build-isolation --no-deps -e .)"
    return 0
  fi
  FUSEDLOSS_CPU_DEFAULT_ONLY=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . && return 0
  echo "pip install -e . failed; the same build in place instead (setup.py build_ext --inplace)"
  FUSEDLOSS_CPU_DEFAULT_ONLY=1 "$PY" setup.py build_ext --inplace
}

export PY DRY
export -f env_info install_wheels build

main() {
  echo "gpu_check: out $OUT_DIR, budget ${BUDGET}s, python $PY$([ "$DRY" = 1 ] && echo ', DRY RUN on the CPU')"
  # name cap reserve; reserve = the sum of the later stages' minimums:
  #   backends 10, tests 60, copy 15, llm 90, seglin 45, dense 30, profile 30, summary 15
  run_stage env 30 295 env_info
  run_stage wheels 30 295 install_wheels
  [ -d .whl/site ] && export PYTHONPATH="$REPO/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
  run_stage build 200 295 build
  run_stage backends 30 285 "$PY" -c "import fusedloss; print('fusedloss.backends(cuda):', fusedloss.backends('cuda'))"
  run_stage tests 120 225 env FUSEDLOSS_TEST_GPU=1 "$PY" -m pytest -p no:xdist -p no:cacheprovider -q -rfE \
    --junitxml="$OUT_DIR/test_gpu.xml" tests/test_gpu.py
  run_stage copy 30 210 "$PY" bench/gpu_bench.py copy --out "$OUT_DIR" "${DRYFLAG[@]}"
  run_stage llm 150 120 "$PY" bench/gpu_bench.py bench --sections llm --out "$OUT_DIR" "${DRYFLAG[@]}"
  run_stage seglin 130 75 "$PY" bench/gpu_bench.py bench --sections seg,linear --out "$OUT_DIR" "${DRYFLAG[@]}"
  run_stage dense 60 45 "$PY" bench/gpu_bench.py bench --sections dense --out "$OUT_DIR" "${DRYFLAG[@]}"
  run_stage profile 60 15 "$PY" bench/profile_step.py --backend triton,cuda --out "$OUT_DIR" "${DRYFLAG[@]}"
  run_stage summary 30 0 "$PY" bench/gpu_bench.py summary --out "$OUT_DIR" "${DRYFLAG[@]}"
  echo
  echo "=== gpu_check summary ($((SECONDS - START))s of ${BUDGET}s; out: $OUT_DIR)"
  printf '%s\n' "${SUMMARY[@]}"
  [ -f "$OUT_DIR/stage-tests.log" ] && grep -E '(passed|failed|error|skipped)' "$OUT_DIR/stage-tests.log" | tail -n 1
  [ -f "$OUT_DIR/stage-summary.log" ] && grep -E '^targets:' "$OUT_DIR/stage-summary.log"
  ls "$OUT_DIR"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # not when sourced (to test run_stage)
  main 2>&1 | tee "$OUT_DIR/gpu_check.log"
fi
