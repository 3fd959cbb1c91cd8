#!/usr/bin/env bash
# Builds longreach with its CUDA kernels, from a fresh clone, on any machine
# with nvcc or PyPI access (no GPU needed), and checks the result:
#   1. a venv of its own ($CUDA_VENV, default .venv-cuda) with the CUDA build of
#      torch ($CUDA_TORCH_SPEC, default torch==2.14.1) and requirements-dev.txt;
#   2. the nvcc of torch's CUDA version (scripts/cuda_toolchain.sh);
#   3. `pip install -e .` with LONGREACH_WITH_CUDA=ON for LONGREACH_CUDA_ARCHS
#      (default 80;90), in build/cuda-<wheel tag> so it never shares a CMake
#      cache with the CPU build in build/<wheel tag>; prints the build time;
#   4. scripts/check_cuda_build.py (import without CUDA init, kernels registered,
#      device code for every architecture in the library).
# A compile error in any .cu file fails the script (set -e).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${CUDA_VENV:-.venv-cuda}"
TORCH_SPEC="${CUDA_TORCH_SPEC:-torch==2.14.1}"
export LONGREACH_CUDA_ARCHS="${LONGREACH_CUDA_ARCHS:-80;90}"

if [[ ! -f "$VENV/.deps" || requirements-dev.txt -nt "$VENV/.deps" ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "$TORCH_SPEC" -r requirements-dev.txt
  touch "$VENV/.deps"
fi

eval "$(scripts/cuda_toolchain.sh "$VENV/bin/python")"

start=$(date +%s)
LONGREACH_WITH_CUDA=ON "$VENV/bin/pip" install --quiet --no-build-isolation --no-deps \
  --config-settings=build-dir="build/cuda-{wheel_tag}" -e .
echo "build_cuda: built with CUDA kernels for ${LONGREACH_CUDA_ARCHS} in $(( $(date +%s) - start )) s"

"$VENV/bin/python" scripts/check_cuda_build.py
