#!/usr/bin/env bash
# First run of the CUDA kernels on a machine with an NVIDIA GPU: one command, no package
# registry needed (only the machine's own torch >= 2.4 with CUDA, nvcc of its CUDA major, and
# the build tools scikit-build-core, cmake, ninja, pytest). From the repository root:
#
#   scripts/gpu_check.sh            # report in gpu_check_report/ (GPU_CHECK_OUT=DIR to change)
#
# 1. builds longreach against that torch, offline, into .venv-gpu (a venv that sees the
#    machine's packages), for the GPU's own architecture (LONGREACH_CUDA_ARCHS to override);
#    the build is not part of the 10 minutes below;
# then, each step time-boxed (about 10 minutes in all):
# 2. scripts/check_cuda_build.py (kernels registered, device code, tensor-core mma, spills);
# 3. tests/test_cuda.py, then the device="cuda" copies of the rest of the suite;
# 4. compute-sanitizer racecheck, synccheck and memcheck on scripts/gpu_check/small_cases.py
#    (every head-dim bucket and dtype, 16-byte and scalar loads, global tokens with GQA,
#    Lq > Lk, decoding, sigmoid, ALiBi, a packed batch), when compute-sanitizer runs here;
# 5. scripts/gpu_check/bench.py: a speed table (CSV) against SDPA, FlexAttention and flash-attn.
# Every step's output goes to its own log; report.txt lists each step's status and time.
# Exits non-zero when a step failed or timed out.
set -u
cd "$(dirname "$0")/.."
OUT="${GPU_CHECK_OUT:-gpu_check_report}"
mkdir -p "$OUT"
REPORT="$OUT/report.txt"
PY_SYS="${PYTHON:-python3}"
VENV="${GPU_VENV:-.venv-gpu}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # offline: fail at once instead of retrying a registry
failed=0

: >"$REPORT"
note() { echo "$*" | tee -a "$REPORT"; }

# step NAME SECONDS COMMAND...: runs COMMAND with a time limit, its output in $OUT/NAME.log
# (and the last lines on the terminal), and notes ok / FAILED / TIMEOUT with the time taken.
step() {
  local name="$1" limit="$2"
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? took=$((SECONDS - start)) status=ok
  if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=TIMEOUT; failed=1
  elif [[ $rc -ne 0 ]]; then status="FAILED (exit $rc)"; failed=1; fi
  tail -n 15 "$OUT/$name.log"
  note "$(printf '%-22s %-18s %5ss  %s' "$name" "$status" "$took" "$OUT/$name.log")"
  return $rc
}

note "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total --format=csv,noheader 2>&1 | tee -a "$REPORT"
"$PY_SYS" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())" 2>&1 | tee -a "$REPORT"

# 1. The offline build.
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY_SYS" -m venv --system-site-packages "$VENV" || { note "cannot create $VENV"; exit 1; }
fi
PY="$VENV/bin/python"
if [[ -z "${LONGREACH_CUDA_ARCHS:-}" ]]; then
  LONGREACH_CUDA_ARCHS="$("$PY" -c 'import torch; a, b = torch.cuda.get_device_capability(); print(f"{a}{b}")')"
fi
export LONGREACH_CUDA_ARCHS
note "building for sm ${LONGREACH_CUDA_ARCHS}"
if ! toolchain="$(scripts/cuda_toolchain.sh "$PY" 2>"$OUT/toolchain.log")"; then
  cat "$OUT/toolchain.log"
  note "toolchain: no nvcc of torch's CUDA major here (see $OUT/toolchain.log)"
  exit 1
fi
eval "$toolchain"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
step build 1200 env LONGREACH_WITH_CUDA=ON "$PY" -m pip install --no-build-isolation --no-deps --no-index \
  --config-settings=build-dir="build/gpu-{wheel_tag}" -e . || { note "build failed: nothing else can run"; exit 1; }
check_start=$SECONDS

# 2-5. The checks.
step check_build 120 "$PY" scripts/check_cuda_build.py
step test_cuda 240 "$PY" -m pytest -x -q -p no:cacheprovider tests/test_cuda.py
step test_suite_cuda 240 "$PY" -m pytest -q -p no:cacheprovider -k "cuda and not emulation" --ignore=tests/test_cuda.py tests/
if command -v compute-sanitizer >/dev/null && timeout 60 compute-sanitizer --tool memcheck "$PY" -c \
  "import torch; torch.zeros(1, device='cuda').add_(1); torch.cuda.synchronize()" >"$OUT/sanitizer_probe.log" 2>&1; then
  for tool in racecheck synccheck memcheck; do
    # Without the caching allocator memcheck sees each tensor's real bounds.
    step "sanitizer_$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 3 --print-limit 20 "$PY" scripts/gpu_check/small_cases.py --quick
  done
else
  note "compute-sanitizer missing or refused this device (see $OUT/sanitizer_probe.log): small cases without it"
  step small_cases 120 "$PY" scripts/gpu_check/small_cases.py
fi
step bench 180 "$PY" scripts/gpu_check/bench.py --csv "$OUT/bench.csv"
[[ -f "$OUT/bench.csv" ]] && cat "$OUT/bench.csv" >>"$REPORT"

note "gpu_check: checks took $((SECONDS - check_start)) s; $([[ $failed -eq 0 ]] && echo 'all ok' || echo 'FAILURES above')"
exit $failed
