#!/usr/bin/env bash
# bench/gpu_check.sh [--dry-run] OUTDIR — everything that needs a CUDA GPU, in one run of < 10
# minutes from a cold Triton cache (DESIGN §8). Needs only torch + triton + pytest in the active
# Python (the device machine has no deepspeed, open_clip, DALI, webdataset).
#
#   1. env         nvidia-smi, versions, `python -m msclip_fast.info --json`
#   2. build       bench/gpu_build.py: toolchain checks, setup.py build_ext --inplace (no pip)
#   3. pytest_gpu  bench/gpu_pytest.py: every gpu-marked test, in parallel shares, Triton compile count
#   4. bench_ops   bench/bench_ops.py at CLIP shapes (bf16), JSON
#   5. bench_loss  bench/bench_loss.py (fails when a backend errors or disagrees with float64), JSON
#   6. bench_siglip bench/bench_loss.py --loss siglip: the same for the sigmoid loss, a smaller budget, JSON
#   7. bench_data  bench/bench_data.py: input pipeline images/s, DALI ("mixed", nvJPEG) vs the torch
#                  DataLoader, small size, JSON; only when nvidia.dali imports here, else status.txt
#                  and the summary record that the DALI GPU figure needs a machine with DALI (the
#                  device machine has no DALI: its wheel, ~476 MiB installed, is far over the 64 MiB
#                  carry limit; nor Pillow/webdataset, which bench_data then records as not_run, rc 0)
#   8. bench_accum bench/bench_accum.py: largest msclip-s-b32 contrastive batch in 40 GiB (bf16), plain vs
#                  exact accumulation vs activation checkpointing, and their step times; its own time
#                  limit is what the run has left (at most 100 s, less 30 s for startup), JSON
#   then bench/gpu_summary.py writes OUTDIR/summary.json and OUTDIR/summary.md.
#
# --dry-run runs the same steps on the CPU (interpreter, tiny sizes; a CPU-only build into
# OUTDIR) so that the script itself is tested in CI, and checks the predicted compile count
# against bench/gpu_budget.json, from which the GPU run budgets its pytest step.
# Each step writes OUTDIR/<step>.log; a failing step does not stop the later ones; the script
# exits non-zero when any step failed.
set -euo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 ]]; then
  echo "usage: $0 [--dry-run] OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # run from the tree: nothing is pip-installed
if [[ $DRY == 1 ]]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  DEV=cpu
else
  unset TRITON_INTERPRET                               # real GPU kernels, never the interpreter
  DEV=cuda
fi
# a fresh cache outside OUTDIR: the run is cold by construction and its compiles can be counted
if [[ -n "${GPU_CHECK_TRITON_CACHE:-}" ]]; then export TRITON_CACHE_DIR=$GPU_CHECK_TRITON_CACHE; OWN_CACHE=0
else export TRITON_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/msclip_triton_cache.XXXXXX"); OWN_CACHE=1; fi
START=$(date +%s)
LIMIT_TOTAL=${GPU_CHECK_LIMIT_S:-$([[ $DRY == 1 ]] && echo 2400 || echo 570)}  # dry run: 2 CPU cores, interpreter
: >"$OUT/status.txt"
eval "$("$PY" -c "
import json
b = json.load(open('bench/gpu_budget.json'))
print(f\"BUDGET_COMPILES={b['compiles']} BUDGET_SPC={b['seconds_per_compile']} BUDGET_TESTS={b['test_seconds']} JOBS={b['jobs']}\")
")"
PYTEST_LIMIT=$("$PY" -c "import math; print(math.ceil(1.5 * ($BUDGET_TESTS + $BUDGET_COMPILES * $BUDGET_SPC / $JOBS)))")
echo "GPU budget: 1.5 x (${BUDGET_TESTS}s tests + ${BUDGET_COMPILES} Triton compiles x ${BUDGET_SPC}s / ${JOBS} jobs) -> pytest_gpu limit ${PYTEST_LIMIT}s of 570s" | tee "$OUT/budget.txt"
if [[ $DRY == 1 ]]; then   # 2 CPU cores, the interpreter: no budget to keep, only the count to check
  # two shares: the interpreter runs one Python thread, so each share keeps one core busy
  JOBS=2; PYTEST_LIMIT=900
  echo "dry run: pytest_gpu limit ${PYTEST_LIMIT}s, ${JOBS} jobs; total ${LIMIT_TOTAL}s" | tee -a "$OUT/budget.txt"
fi

# run_step NAME TIMEOUT_S CMD...: log to OUT/NAME.log, record "NAME rc=.. ..s limit=..s", never abort
run_step() {
  local name=$1 limit=$2; shift 2
  local left=$(( LIMIT_TOTAL - ($(date +%s) - START) ))
  if (( limit > left )); then limit=$left; fi
  if (( limit < 20 )); then
    echo "$name rc=124 0s limit=${limit}s (skipped: ${left}s left of ${LIMIT_TOTAL}s)" | tee -a "$OUT/status.txt"
    return 0
  fi
  local t0 rc=0
  t0=$(date +%s)
  echo "== $name: $* (limit ${limit}s)" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  echo "$name rc=$rc $(( $(date +%s) - t0 ))s limit=${limit}s" | tee -a "$OUT/status.txt"
  tail -n 4 "$OUT/$name.log" || true
  return 0
}

env_info() {
  nvidia-smi || echo "nvidia-smi not found"
  "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
EOF
  git -C "$ROOT" rev-parse HEAD 2>/dev/null || true
  "$PY" -m msclip_fast.info --json >"$OUT/info.json"
}
export -f env_info
export PY OUT ROOT

# bench_data_step LIMIT ARGS...: bench/bench_data.py ARGS when nvidia.dali imports, else a status line
# saying why not (the DALI figure is this step's point; without DALI it would only time Pillow)
bench_data_step() {
  local limit=$1; shift
  if "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
    run_step bench_data "$limit" "$PY" bench/bench_data.py "$@" --json "$OUT/bench_data.json"
  else
    echo "bench_data rc=0 0s limit=${limit}s (not run: nvidia.dali is not importable here; the DALI GPU figure needs a machine with DALI)" \
      | tee -a "$OUT/status.txt"
  fi
}

run_step env 40 bash -c 'set -euo pipefail; env_info'
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
  echo "build rc=0 0s limit=0s (skipped: GPU_CHECK_SKIP_BUILD=1)" | tee -a "$OUT/status.txt"
elif [[ $DRY == 1 ]]; then
  run_step build 600 "$PY" bench/gpu_build.py --dry-run --out "$ROOT/build/gpu_check_dry_run"
else
  run_step build 180 "$PY" bench/gpu_build.py
fi
run_step pytest_gpu "$PYTEST_LIMIT" "$PY" bench/gpu_pytest.py --json "$OUT/pytest_gpu.json" --jobs "$JOBS" \
  $([[ $DRY == 1 ]] && echo --dry-run)
if [[ $DRY == 1 ]]; then
  run_step bench_ops 120 "$PY" bench/bench_ops.py --device cpu --smoke --json "$OUT/bench_ops.json"
  run_step bench_loss 120 "$PY" bench/bench_loss.py --device cpu --sizes 256,512 --timeout 60 --json "$OUT/bench_loss.json"
  run_step bench_siglip 120 "$PY" bench/bench_loss.py --loss siglip --device cpu --sizes 256,512 --timeout 60 \
    --json "$OUT/bench_siglip.json"
  bench_data_step 90 --make-shards 80 --source digits --batch-size 8 --warmup 1 --batches 2 --repeats 1
  run_step bench_accum 90 "$PY" bench/bench_accum.py --device cpu --smoke --json "$OUT/bench_accum.json"
else
  run_step bench_ops 150 "$PY" bench/bench_ops.py --device cuda --json "$OUT/bench_ops.json"
  run_step bench_loss 150 "$PY" bench/bench_loss.py --device cuda --dtype bf16 --sizes 8192,32768 --timeout 60 \
    --json "$OUT/bench_loss.json"
  # before bench_accum, which sizes its search to the time left: ~9 short processes (fused,
  # triton, reference: check + 2 sizes), so a tighter limit than bench_loss's
  run_step bench_siglip 100 "$PY" bench/bench_loss.py --loss siglip --device cuda --dtype bf16 --sizes 8192,32768 \
    --timeout 60 --json "$OUT/bench_siglip.json"
  # small: ~1000 samples, 3 rounds of 10 batches per (backend, mode); openclipart when installed
  bench_data_step 90 --make-shards 1000 --source "$([[ -d /usr/share/openclipart/png ]] && echo openclipart || echo digits)" \
    --warmup 2 --batches 10 --repeats 3
  ACCUM_LIMIT=$(( LIMIT_TOTAL - ($(date +%s) - START) ))
  if (( ACCUM_LIMIT > 100 )); then ACCUM_LIMIT=100; fi
  run_step bench_accum "$ACCUM_LIMIT" "$PY" bench/bench_accum.py --device cuda \
    --time-limit $(( ACCUM_LIMIT > 45 ? ACCUM_LIMIT - 30 : 15 )) --json "$OUT/bench_accum.json"
fi
if [[ $OWN_CACHE == 1 ]]; then rm -rf "${TRITON_CACHE_DIR:?}" 2>/dev/null || true; fi

FAILED=0
"$PY" bench/gpu_summary.py "$OUT" --total-s $(( $(date +%s) - START )) $([[ $DRY == 1 ]] && echo --dry-run) || FAILED=1
echo "total $(( $(date +%s) - START ))s; failed=$FAILED" | tee -a "$OUT/status.txt"
exit "$FAILED"
