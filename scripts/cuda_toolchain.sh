#!/usr/bin/env bash
# Picks the CUDA compiler that matches the CUDA version torch was built with,
# and prints the environment to build longreach with it:
#
#   eval "$(scripts/cuda_toolchain.sh .venv-cuda/bin/python)"
#   LONGREACH_WITH_CUDA=ON .venv-cuda/bin/pip install --no-build-isolation --no-deps -e .
#
# Rule: kernels must be compiled by an nvcc of torch's CUDA major version
# (torch.version.cuda), so the extension and torch share one runtime. The
# machine's nvcc (CUDACXX, PATH, /usr/local/cuda) is used when its major
# matches; otherwise the matching compiler, runtime headers and CCCL come from
# PyPI (nvidia-cuda-nvcc / -runtime / -cccl, and for CUDA 13 nvidia-nvvm /
# nvidia-cuda-crt, all pinned to torch's major.minor)
# into the same venv, and CUDACXX points at that nvcc. Also installs
# cuobjdump of the same major version (for the CI check that kernels are in the .so).
# Set LONGREACH_PIP_NVCC=1 to take the PyPI compiler even when versions match.
set -euo pipefail

PY="${1:?usage: cuda_toolchain.sh PATH/TO/venv/bin/python}"
log() { echo "cuda_toolchain: $*" >&2; }

torch_cuda="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
if [[ -z "$torch_cuda" ]]; then
  log "torch in $PY is a CPU build (torch.version.cuda is None); install a CUDA build, e.g. torch==2.14.1"
  exit 1
fi
torch_major="${torch_cuda%%.*}"

nvcc_version() {  # "13.0" from `nvcc --version`
  "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p' | head -n1
}

machine_nvcc=""
for candidate in "${CUDACXX:-}" "$(command -v nvcc || true)" /usr/local/cuda/bin/nvcc; do
  if [[ -n "$candidate" && -x "$candidate" ]]; then machine_nvcc="$candidate"; break; fi
done
machine_version=""
[[ -n "$machine_nvcc" ]] && machine_version="$(nvcc_version "$machine_nvcc")"
log "torch was built with CUDA $torch_cuda; machine nvcc: ${machine_nvcc:-none} ${machine_version}"

site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ "$torch_major" -ge 13 ]]; then
  pkg_suffix=""             # CUDA 13 wheels: nvidia-cuda-nvcc==13.x, installed under nvidia/cu13/
else
  pkg_suffix="-cu${torch_major}"  # CUDA 12 wheels: nvidia-cuda-nvcc-cu12==12.x
fi
pin="==${torch_cuda}.*"

if [[ -n "$machine_version" && "${machine_version%%.*}" == "$torch_major" && -z "${LONGREACH_PIP_NVCC:-}" ]]; then
  nvcc="$machine_nvcc"
else
  log "installing nvcc, runtime headers and CCCL for CUDA $torch_cuda from PyPI"
  pkgs=("nvidia-cuda-nvcc${pkg_suffix}${pin}" "nvidia-cuda-runtime${pkg_suffix}${pin}" "nvidia-cuda-cccl${pkg_suffix}${pin}")
  # CUDA 13 splits the compiler's front end (nvvm) and crt headers into packages
  # that nvcc requires unpinned: pin them too, or cicc emits PTX newer than ptxas reads.
  [[ "$torch_major" -ge 13 ]] && pkgs+=("nvidia-nvvm${pin}" "nvidia-cuda-crt${pin}")
  "$PY" -m pip install --quiet "${pkgs[@]}" >&2
  nvcc="$(ls "$site"/nvidia/*/bin/nvcc 2>/dev/null | head -n1 || true)"
  if [[ -z "$nvcc" ]]; then
    log "no nvcc found under $site/nvidia after installing the PyPI toolchain"
    exit 1
  fi
  # nvcc.profile looks for libraries in <top>/lib64 and CMake's FindCUDAToolkit
  # for an unversioned libcudart.so; the wheels ship <top>/lib/libcudart.so.N.
  top="$(dirname "$(dirname "$nvcc")")"
  if [[ -d "$top/lib" && ! -e "$top/lib64" ]]; then ln -s lib "$top/lib64"; fi
  for lib in "$site"/nvidia/*/lib/libcudart.so.[0-9]*; do
    [[ -e "$lib" && ! -e "$(dirname "$lib")/libcudart.so" ]] && ln -s "$(basename "$lib")" "$(dirname "$lib")/libcudart.so"
  done
  # Split (CUDA 12) wheel layouts keep the runtime and CCCL headers beside,
  # not under, the compiler: name those include dirs (and no others).
  includes=""
  for dir in "$site"/nvidia/*/include; do
    if [[ -e "$dir/cuda_runtime.h" || -d "$dir/cub" || -d "$dir/cuda/std" ]]; then includes+=" -I$dir"; fi
  done
  echo "export CUDAFLAGS=\"\${CUDAFLAGS:-}${includes}\""
fi
log "using $nvcc ($(nvcc_version "$nvcc"))"
echo "export CUDACXX=\"$nvcc\""

# cuobjdump of torch's CUDA major (it reads cubins of older minors; PyPI has no
# wheel for some minors, e.g. 13.0), for listing the kernels in the library.
if ! "$PY" -m pip show --quiet "nvidia-cuda-cuobjdump${pkg_suffix}" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "nvidia-cuda-cuobjdump${pkg_suffix}==${torch_major}.*" >&2 ||
    log "no cuobjdump wheel for CUDA $torch_major"
fi
cuobjdump="$(ls "$site"/nvidia/*/bin/cuobjdump 2>/dev/null | head -n1 || true)"
[[ -z "$cuobjdump" ]] && cuobjdump="$(command -v cuobjdump || true)"
echo "export LONGREACH_CUOBJDUMP=\"$cuobjdump\""
