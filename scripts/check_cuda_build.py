"""Checks a CUDA build of longreach on any machine, GPU or not (CI's CUDA step).

1. `import longreach` works and does not initialise CUDA.
2. Every op has a kernel registered for the CUDA dispatch key.
3. The extension holds device code for every architecture of
   LONGREACH_CUDA_ARCHS (`cuobjdump --list-elf`), the float16 / bfloat16
   attention kernels use tensor cores (wmma.mma.sync in their embedded PTX,
   when PTX is embedded), and the kernels' resource usage (registers, spills)
   is printed (`cuobjdump --dump-resource-usage`). Spills count in the stack
   frame (STACK) as well as in local memory (LOCAL); with
   LONGREACH_MAX_SPILL_BYTES set, a kernel spilling more fails the check.

Usage: python scripts/check_cuda_build.py  (LONGREACH_CUOBJDUMP names cuobjdump;
scripts/cuda_toolchain.sh sets it). Exits non-zero on any failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

OPS = ["local_attention_fwd", "local_attention_bwd", "local_attention_kvcache_fwd", "apply_rotary", "apply_rotary_qk"]


def fail(message: str) -> None:
    print(f"check_cuda_build: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    import torch
    import longreach
    from longreach import _C

    if torch.cuda.is_initialized():
        fail("import longreach initialised CUDA")
    # The kernels live in liblongreach.so next to the Python module _C (CMakeLists.txt).
    library = os.path.join(os.path.dirname(_C.__file__), "liblongreach.so")
    print(f"check_cuda_build: torch {torch.__version__} (CUDA {torch.version.cuda}), library {library}")

    missing = [op for op in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"longreach::{op}", "CUDA")]
    if missing:
        fail(f"no CUDA kernel registered for {missing}")
    print(f"check_cuda_build: CUDA kernels registered for {OPS}")

    cuobjdump = os.environ.get("LONGREACH_CUOBJDUMP") or shutil.which("cuobjdump")
    if not cuobjdump:
        fail("cuobjdump not found (run scripts/cuda_toolchain.sh, or set LONGREACH_CUOBJDUMP)")
    elfs = subprocess.run([cuobjdump, "--list-elf", library], capture_output=True, text=True, check=True).stdout
    archs = [a.strip().split("-")[0] for a in os.environ.get("LONGREACH_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    for arch in archs:
        found = [line for line in elfs.splitlines() if f"sm_{arch}" in line]
        if not found:
            fail(f"no sm_{arch} device code in {library}:\n{elfs}")
        print(f"check_cuda_build: sm_{arch}: {len(found)} cubins")

    ptx = subprocess.run([cuobjdump, "--dump-ptx", library], capture_output=True, text=True, check=True).stdout
    if ".version" in ptx:  # archs given as NN-real embed no PTX
        mma_per_file: dict = {}
        current = None
        for line in ptx.splitlines():
            if line.startswith("identifier"):
                current = os.path.basename(line.split("=", 1)[1].strip())
            elif "wmma.mma.sync" in line or "mma.sync.aligned" in line:
                mma_per_file[current] = mma_per_file.get(current, 0) + 1
        for name in ("local_attention_f16.cu", "local_attention_bf16.cu"):
            if not mma_per_file.get(name):
                fail(f"no tensor-core (mma.sync) instructions in the PTX of {name}")
        print("check_cuda_build: tensor-core mma instructions: "
              + ", ".join(f"{k} {v}" for k, v in sorted(mma_per_file.items())))

    usage = subprocess.run([cuobjdump, "--dump-resource-usage", library], capture_output=True, text=True,
                           check=True).stdout
    kernels = resource_usage(usage)
    if not kernels:
        fail(f"no kernels in the resource usage dump:\n{usage[:2000]}")
    spilling = spills(kernels)
    print(f"check_cuda_build: {len(kernels)} kernels, max {max(k[1] for k in kernels)} registers, "
          f"{len(spilling)} with spills (stack frame or local memory)")
    for name, stack, local in spilling:
        print(f"  spills: {demangle(name)} STACK:{stack} LOCAL:{local}")
    limit = os.environ.get("LONGREACH_MAX_SPILL_BYTES")
    if limit is not None:
        over = [k for k in spilling if max(k[1], k[2]) > int(limit)]
        if over:
            fail(f"{len(over)} kernels spill more than LONGREACH_MAX_SPILL_BYTES={limit} bytes: "
                 + ", ".join(demangle(k[0]) for k in over))
    print("check_cuda_build: ok")


def resource_usage(dump: str) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, stack frame bytes, local bytes) per kernel of `cuobjdump --dump-resource-usage`."""
    found = re.findall(r"Function ([^\s:]+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", dump)
    return [(name, int(reg), int(stack), int(local)) for name, reg, stack, shared, local in found]


def spills(kernels: list[tuple[str, int, int, int]]) -> list[tuple[str, int, int]]:
    """(kernel, stack, local) of the kernels that spill. ptxas puts register spills in the stack
    frame (its "N bytes stack frame", cuobjdump's STACK), not only in local memory (LOCAL); the
    kernels hold no local arrays, so any stack frame is spills."""
    return [(name, stack, local) for name, reg, stack, local in kernels if stack > 0 or local > 0]


def demangle(name: str) -> str:
    """The readable kernel name (c++filt when there is one), else the mangled one."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return name
    out = subprocess.run([cxxfilt, name], capture_output=True, text=True).stdout.strip()
    return out.replace("longreach::cuda_kernels::", "") or name


if __name__ == "__main__":
    main()
