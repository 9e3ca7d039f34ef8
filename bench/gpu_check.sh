#!/usr/bin/env bash
# bench/gpu_check.sh OUTDIR — everything that needs a CUDA GPU, in one run of < 10 minutes
# (DESIGN §8). Needs only torch + triton (pytest for step 3) in the active Python.
#
#   1. environment: nvidia-smi, versions, `python -m msclip_fast.info --json`
#   2. build the extension when csrc/ holds sources: pip install --no-build-isolation -e .
#   3. pytest -m gpu: the op tests (Triton kernels vs float64 references) on CUDA tensors
#   4. bench/bench_ops.py at CLIP shapes (bf16), JSON + table
#   5. bench/bench_loss.py on CUDA, when present (short sizes)
#
# Each step writes OUTDIR/<step>.log as it runs and its exit status to OUTDIR/status.txt; a
# failing step does not stop the later ones (their logs are kept either way); the script
# exits non-zero when any step failed. Per-step time limits keep the total under 10 minutes.
set -euo pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY=$ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works even if the install step fails
unset TRITON_INTERPRET                                 # real GPU kernels, never the interpreter
START=$(date +%s)
FAILED=0
: >"$OUT/status.txt"

# run_step NAME TIMEOUT_S CMD...: log to OUT/NAME.log, record status, never abort the script.
# CMD may be a function of this script (run in a child bash, since timeout needs a program).
run_step() {
  local name=$1 limit=$2; shift 2
  local t0 rc=0
  t0=$(date +%s)
  echo "== $name: $* (limit ${limit}s)" | tee "$OUT/$name.log"
  if declare -F "$1" >/dev/null; then
    timeout --kill-after=10 "$limit" bash -c 'set -euo pipefail; "$@"' _ "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  else
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/$name.log" 2>&1 || rc=$?
  fi
  local dt=$(( $(date +%s) - t0 ))
  echo "$name rc=$rc ${dt}s" | tee -a "$OUT/status.txt"
  tail -n 5 "$OUT/$name.log" || true
  if [[ $rc -ne 0 ]]; then FAILED=1; fi
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
  "$PY" -m msclip_fast.info --json >"$OUT/info.json" 2>"$OUT/info.stderr" || echo "msclip_fast.info failed"
}

build_ext() {
  if ! compgen -G "csrc/*/*.cpp" >/dev/null && ! compgen -G "csrc/*.cpp" >/dev/null; then
    echo "csrc/ holds no sources: nothing to build"; return 0
  fi
  # CUDA_HOME auto-detection can pick /usr/local; torch's nvidia wheels carry cuBLAS/cuSPARSE
  # headers (ENVIRONMENT.md); one arch keeps the build short
  if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then export CUDA_HOME=/usr/local/cuda; fi
  local inc
  inc=$("$PY" -c "import os, nvidia; p=os.path.join(list(nvidia.__path__)[0], 'cu13', 'include'); print(p if os.path.isdir(p) else '')" 2>/dev/null || true)
  if [[ -n "$inc" ]]; then export CPATH="$inc${CPATH:+:$CPATH}"; fi
  local arch
  arch=$("$PY" -c "import torch; p=torch.cuda.get_device_capability(); print(f'{p[0]}.{p[1]}')" 2>/dev/null || echo 9.0)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$arch}
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  "$PY" -m pip install --no-build-isolation --no-deps -e . \
    && "$PY" -c "import msclip_fast._C as C; print('extension', C.__file__)"
}

run_pytest() {
  if ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed in $PY"; return 3
  fi
  # other test folders may import packages this machine lacks: keep collecting past them
  "$PY" -m pytest -m gpu tests -q -rs -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest_gpu.xml"
}

export -f env_info build_ext run_pytest
export PY OUT ROOT

run_step env 40 env_info
if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
  echo "build skipped (GPU_CHECK_SKIP_BUILD=1)" | tee -a "$OUT/status.txt"
else
  run_step build 150 build_ext
fi
run_step pytest_gpu 150 run_pytest
run_step bench_ops 180 "$PY" bench/bench_ops.py --device cuda --json "$OUT/bench_ops.json"
if [[ -f bench/bench_loss.py ]]; then
  left=$(( 570 - ($(date +%s) - START) ))
  if (( left > 30 )); then
    (( left > 120 )) && left=120
    run_step bench_loss "$left" "$PY" bench/bench_loss.py --device cuda --sizes 8192,32768 --timeout 60
  else
    echo "bench_loss skipped: ${left}s left" | tee -a "$OUT/status.txt"
  fi
fi

echo "total $(( $(date +%s) - START ))s; failed=$FAILED" | tee -a "$OUT/status.txt"
exit "$FAILED"
