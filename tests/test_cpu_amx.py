"""The AMX-BF16 path of the CPU bf16 products (csrc/cpu/amx_bf16_impl.h).

The AMX kernel runs on its software
tile layer (csrc/cpu/isa/tile_ops_amx_emulated.cpp, LONGREACH_CPU_AMX=emulate):
its packing and tiling are checked against the AVX512_BF16 kernel (the
products' first-use self-check, and forward + every gradient of whole calls)
and against the float64 reference; where the CPU has AMX the mapping of the tile
layer to the AMX intrinsics (isa/tile_ops_amx_bf16.cpp) runs too, against the
AVX512_BF16 kernel and the reference. The dispatch
rule is checked with faked capability flags (AMX present but the OS's tile
permission denied falls back to AVX512_BF16), and the self-check with a
deliberately broken tile op (the warning and the fallback, end to end).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import longreach  # noqa: F401  (registers torch.ops.longreach)


def _has_avx512_bf16() -> bool:
    try:
        return torch.ops.longreach._debug_amx_self_check(False) >= 0
    except RuntimeError:
        return False


needs_avx512_bf16 = pytest.mark.skipif(not _has_avx512_bf16(), reason="the AMX self-check compares with AVX512_BF16")


def test_amx_dispatch_rule_with_faked_capabilities():
    choose = torch.ops.longreach._debug_amx_choice
    assert choose("", "avx512_bf16", True, True) == "amx_bf16"
    assert choose("1", "avx512_bf16", True, True) == "amx_bf16"
    # AMX in cpuid but the OS refused the tile state (arch_prctl): AVX512_BF16.
    assert choose("", "avx512_bf16", True, False) == "off"
    assert choose("", "avx512_bf16", False, True) == "off"
    assert choose("", "off", True, True) == "off"  # LONGREACH_CPU_BF16=0 or no AVX512_BF16: no AMX either
    assert choose("0", "avx512_bf16", True, True) == "off"
    assert choose("emulate", "avx512_bf16", False, False) == "amx_bf16_emulated"
    with pytest.raises(RuntimeError, match="OS tile permission not granted"):
        choose("1", "avx512_bf16", True, False)
    with pytest.raises(RuntimeError, match="cannot run the AMX kernels"):
        choose("1", "off", True, True)
    with pytest.raises(RuntimeError, match="needs the AVX512_BF16 kernels"):
        choose("emulate", "off", False, False)
    with pytest.raises(ValueError, match="LONGREACH_CPU_AMX must be"):
        choose("yes", "avx512_bf16", True, True)


@needs_avx512_bf16
def test_self_check_passes_the_emulated_kernel_and_rejects_a_broken_tile_op():
    check = torch.ops.longreach._debug_amx_self_check
    assert check(False) < 1e-6  # the same bf16 products, float32 sums in another order
    assert check(True) > 1e-2  # TDPBF16PS without the odd half of each pair


SCRIPT = r"""
import json, sys, warnings, torch, longreach
from longreach import reference
sys.path.insert(0, sys.argv[1])
from attention_testing import grads, random_qkv
gen = torch.Generator().manual_seed(0)
CASES = [  # (B, Hq, Hk, Lq, Lk, D), kwargs: K tails (D = 40, 72), a 16-row tail, GQA, globals, two key tiles (last)
    ((1, 2, 1, 300, 300, 64), dict(window=(50, 0), causal=True)),
    ((1, 4, 2, 150, 150, 40), dict(window=(20, 20), dilation=2, globals=True)),
    ((1, 2, 2, 101, 101, 72), dict(window=(30, 5), softcap=5.0)),
    ((1, 2, 1, 1030, 1100, 128), dict(window=(600, 0))),
    # A block's span of 64 + 1200 keys is two key tiles: the fused softmax's online rescale.
    ((1, 2, 1, 520, 1300, 32), dict(window=(1200, 0))),
]
out = {}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for i, ((B, Hq, Hk, Lq, Lk, D), kw) in enumerate(CASES[:int(sys.argv[2])]):
        kw = dict(kw)
        if kw.pop("globals", False):
            kw["global_mask"] = torch.rand(B, Lk, generator=gen) < 0.05
        q, k, v = (t.requires_grad_() for t in random_qkv(B, Hq, Hk, Lq, Lk, D, torch.bfloat16, "cpu", generator=gen))
        o = longreach.local_attention(q, k, v, **kw)
        g = torch.randn(o.shape, generator=gen).bfloat16()
        got = [o] + list(grads([o], [g], [q, k, v]))
        ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
        e = reference.local_attention(*ins, **kw)
        exact = [e] + list(grads([e], [g.double()], ins))
        out[i] = [dict(value=x.detach().double().flatten().tolist()[:4096],
                       err=((x.double() - y).abs().max() / y.abs().max()).item()) for x, y in zip(got, exact)]
print(json.dumps({"kernels": torch.ops.longreach._debug_cpu_kernels(), "results": out,
                  "warnings": [str(w.message) for w in caught]}))
"""


def _run(amx: str, cases: int = 5) -> dict:
    env = dict(os.environ, LONGREACH_CPU_BF16="1", LONGREACH_CPU_AMX=amx, OMP_NUM_THREADS="2")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", SCRIPT, tests_dir, str(cases)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def _assert_matches(amx: dict, avx512_bf16_run: dict) -> None:
    """An AMX run against the AVX512_BF16 run of the same cases (and both against float64)."""
    for case, quantities in amx["results"].items():
        for what, got, ref in zip(["out", "dq", "dk", "dv"], quantities, avx512_bf16_run["results"][case]):
            # The same bf16 operands, float32 sums in another order: results differ by bf16 rounding flips.
            assert got["err"] < 2 * ref["err"] + 2.0**-9, (case, what, got["err"], ref["err"])
            a, b = torch.tensor(got["value"]), torch.tensor(ref["value"])
            assert (a - b).abs().max() <= 2.0**-7 * b.abs().max(), (case, what)


@pytest.fixture(scope="module")
def avx512_bf16_run():
    if not _has_avx512_bf16():
        pytest.skip("no AVX512_BF16 here")
    return _run("0")


@needs_avx512_bf16
def test_emulated_amx_matches_avx512_bf16_and_the_reference(avx512_bf16_run):
    amx = _run("emulate")
    assert amx["kernels"].endswith("+amx_bf16_emulated"), amx["kernels"]
    assert avx512_bf16_run["kernels"].endswith("+avx512_bf16"), avx512_bf16_run["kernels"]
    assert not amx["warnings"], amx["warnings"]
    _assert_matches(amx, avx512_bf16_run)


def _runs_amx() -> bool:
    run = subprocess.run([sys.executable, "-c", "import torch, longreach; print(torch.ops.longreach._debug_cpu_kernels())"],
                         env=dict(os.environ, LONGREACH_CPU_BF16="1", LONGREACH_CPU_AMX=""), capture_output=True,
                         text=True, timeout=300)
    return run.returncode == 0 and run.stdout.strip().endswith("+amx_bf16")


@needs_avx512_bf16
def test_real_amx_matches_avx512_bf16_and_the_reference(avx512_bf16_run):
    """Where the CPU has AMX: the intrinsic mapping itself, as the emulated test checks the model."""
    if not _runs_amx():
        pytest.skip("this CPU (or OS) does not run AMX")
    amx = _run("1")
    assert amx["kernels"].endswith("+amx_bf16"), amx["kernels"]
    assert not amx["warnings"], amx["warnings"]
    _assert_matches(amx, avx512_bf16_run)


@needs_avx512_bf16
def test_broken_tile_op_falls_back_to_avx512_bf16_with_a_warning(avx512_bf16_run):
    res = _run("emulate_broken", cases=2)
    assert res["kernels"].endswith("+avx512_bf16"), res["kernels"]
    assert any("first-use self-check" in w for w in res["warnings"]), res["warnings"]
    # The fallback is the AVX512_BF16 kernel itself: its results bit for bit.
    assert res["results"] == {c: avx512_bf16_run["results"][c] for c in res["results"]}


def test_amx_required_without_amx_raises():
    if "amx_bf16" in torch.ops.longreach._debug_cpu_kernels():
        pytest.skip("this CPU runs AMX")
    script = "import torch, longreach; longreach.local_attention(*(torch.randn(1, 1, 64, 64).bfloat16() for _ in range(3)))"
    env = dict(os.environ, LONGREACH_CPU_AMX="1")
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "LONGREACH_CPU_AMX=1" in run.stderr, run.stderr[-2000:]
