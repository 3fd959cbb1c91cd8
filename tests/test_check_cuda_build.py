"""scripts/check_cuda_build.py's reading of `cuobjdump --dump-resource-usage` (no CUDA needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "check_cuda_build.py"

# The shape of cuobjdump's dump; ptxas reports the first kernel's 8 bytes as "8 bytes stack
# frame, 16 bytes spill stores, 16 bytes spill loads" with LOCAL 0.
DUMP = """
Resource usage:
 Common:
  GLOBAL:0
 Function _ZN9longreach12cuda_kernels19backward_dkv_kernelIN3c104HalfELi128ELi32ELi32EEEvNS0_13AttentionArgsIT_fEE:
  REG:128 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:1016 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9longreach12cuda_kernels14forward_kernelIfLi64ELi64ELi32EEEvNS0_13AttentionArgsIT_fEE:
  REG:96 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:1016 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN9longreach12cuda_kernels18backward_dq_kernelIfLi64ELi64ELi32EEEvNS0_13AttentionArgsIT_fEE:
  REG:128 STACK:0 SHARED:0 LOCAL:24 CONSTANT[0]:1016 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def _script():
    spec = importlib.util.spec_from_file_location("check_cuda_build", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spills_in_the_stack_frame_count_as_well_as_local_memory():
    check = _script()
    kernels = check.resource_usage(DUMP)
    assert [k[1:] for k in kernels] == [(128, 8, 0), (96, 0, 0), (128, 0, 24)]
    spilling = check.spills(kernels)
    assert [(name.split("12cuda_kernels")[1][:20], stack, local) for name, stack, local in spilling] == [
        ("19backward_dkv_kerne", 8, 0),
        ("18backward_dq_kernel", 0, 24),
    ]
