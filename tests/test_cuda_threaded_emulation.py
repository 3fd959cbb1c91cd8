"""The CUDA kernel bodies on real threads (tests/emulation/threaded/), under
ThreadSanitizer and AddressSanitizer + UBSan.

The single-thread emulation (test_cuda_emulation.py) checks what the kernels
compute; this checks what one thread per block cannot show: shared-memory
races between the 128 threads of a block (a missing or misplaced
block_sync()), warp shuffles, the 16-byte load path (memcpy with an alignment
check on the host), the WMMA preconditions of the tile products
(block_ops.cuh: check_wmma_operands) and accesses outside the carved shared
memory or the tensors. Each run compares the threaded results with the
single-thread ones (cases: csrc's block plans with GQA, decoding, Lq > Lk,
dilation, global tokens, ALiBi, softcap, sigmoid, scalar loads, every head-dim
bucket, a packed batch, key padding, chunks with dropout), and two self-tests show that the harness does see a
deleted barrier and a shared-memory overflow.

Runs with LONGREACH_CUDA_EMULATION=1 (the CUDA step of .ci/run) or
LONGREACH_EXTENDED_TESTS=1; about 3 minutes on two cores, builds included.
"""

from __future__ import annotations

import os
import re

import pytest

import threaded_emulation
from testenv import extended_tests_enabled

pytestmark = pytest.mark.skipif(
    not (os.environ.get("LONGREACH_CUDA_EMULATION", "") not in ("", "0") or extended_tests_enabled()),
    reason="set LONGREACH_CUDA_EMULATION=1 to build and run the threaded host emulation of the CUDA kernels",
)


def _needs(sanitizer: str) -> None:
    why = threaded_emulation.sanitizer_unavailable(sanitizer)
    if why is not None:
        pytest.skip(f"-fsanitize={sanitizer} unavailable: {why}")


def _summary(output: str) -> re.Match:
    m = re.search(r"threaded emulation: (\d+) runs, (\d+) failed, (\d+) with 16-byte loads", output)
    assert m, f"no summary line in the harness output:\n{output[-3000:]}"
    return m


def test_threaded_kernels_are_race_free_under_thread_sanitizer():
    _needs("thread")
    r = threaded_emulation.run("thread", "--cases", "quick")
    assert "ThreadSanitizer" not in r.stdout, r.stdout[-6000:]
    runs, failed, vector = (int(x) for x in _summary(r.stdout).groups())
    assert r.returncode == 0 and failed == 0, r.stdout[-6000:]
    assert runs == 27 and vector > 0


@pytest.mark.parametrize("sanitizer,case", [("thread", "global_gqa_dil_d32"), ("address", "decode_mqa_d128")])
def test_threaded_gqa_dkv_split_by_query_head_is_clean(sanitizer, case):
    """The dK/dV pass with one block per query head (attention_entry.h dkv_split_by_query_head),
    on the real block shape: race-free, in bounds, and bitwise equal to one thread."""
    _needs(sanitizer)
    r = threaded_emulation.run(sanitizer, "--only", case, "--dkv-split")
    assert "Sanitizer" not in r.stdout and "runtime error" not in r.stdout, r.stdout[-6000:]
    runs, failed, _ = (int(x) for x in _summary(r.stdout).groups())
    assert r.returncode == 0 and failed == 0 and runs == 3, r.stdout[-6000:]
    assert r.stdout.count("dK/dV per query head") == 3, r.stdout[-3000:]


# Barriers 2 and 3 of every block: after the key/value loads (every product reads them) and
# after the first product (races only where the products follow WMMA's tile ownership:
# float16 / bfloat16; float32's loops give each thread the elements it reads next).
@pytest.mark.parametrize("skipped_sync", [2, 3])
def test_thread_sanitizer_reports_races_when_a_barrier_is_deleted(skipped_sync):
    """The harness self-test: without one block_sync() the kernels race, and TSan must say so."""
    _needs("thread")
    r = threaded_emulation.run("thread", "--only", "causal_gqa_d64", "--skip-sync", str(skipped_sync))
    assert "WARNING: ThreadSanitizer: data race" in r.stdout, r.stdout[-3000:]
    m = re.search(r"ThreadSanitizer: reported (\d+) warnings", r.stdout)
    assert m and int(m.group(1)) > 0 and r.returncode != 0


def test_threaded_kernels_are_clean_under_address_and_undefined_sanitizers():
    _needs("address")
    r = threaded_emulation.run("address", "--cases", "all")
    assert "AddressSanitizer" not in r.stdout and "runtime error" not in r.stdout, r.stdout[-6000:]
    runs, failed, vector = (int(x) for x in _summary(r.stdout).groups())
    assert r.returncode == 0 and failed == 0, r.stdout[-6000:]
    # Half precision with D = 20 or 100 (not whole 16-byte chunks) takes the scalar loads.
    assert runs == 36 and 0 < vector < runs


def test_address_sanitizer_reports_a_shared_memory_overflow():
    """The harness self-test: a block given 128 bytes too little shared memory is caught."""
    _needs("address")
    r = threaded_emulation.run("address", "--only", "causal_gqa_d64", "--short-smem")
    assert "AddressSanitizer: heap-buffer-overflow" in r.stdout and r.returncode != 0, r.stdout[-3000:]


def test_wmma_precondition_checks_stop_a_misaligned_product():
    """block_ops.cuh's check_wmma_operands: shared memory 16 bytes off a 32-byte boundary puts
    the half-precision product tiles where WMMA cannot load them, and the emulation must stop."""
    _needs("address")
    r = threaded_emulation.run("address", "--only", "causal_gqa_d64", "--misalign-smem")
    assert "CUDA kernel precondition violated: WMMA" in r.stdout and r.returncode != 0, r.stdout[-3000:]
