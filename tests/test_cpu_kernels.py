"""The structure of the CPU kernels (csrc/cpu/): the cases their tiling,
chunking and vector code treat specially, checked against the dense reference.

- every instruction-set copy of the tile kernels (ATen's DEFAULT, AVX2 and
  AVX512 capabilities, forced with ATEN_CPU_CAPABILITY in a subprocess);
- spans of more than one key tile (1024 keys) and more than 1024 global
  extras, so the online softmax crosses tiles;
- head dims that are not a multiple of the vector width (padded columns);
- many chunks per head (the key-gradient reduction sums their buffers);
- forwards of at most 4 query rows (decoding), which read keys as rows
  instead of packing them (rows_dot / rows_axpy).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import longreach
from longreach import reference
from attention_testing import assert_close, grads, random_qkv, standard_alibi_slopes, tight_tolerance

F64 = torch.float64


def check_against_reference(q_len, k_len, head_dim, dtype=F64, q_heads=2, kv_heads=1, batch=1, **kwargs):
    """Largest scaled error of out and the three gradients vs the reference."""
    q, k, v = (t.requires_grad_() for t in random_qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype, "cpu"))
    out = longreach.local_attention(q, k, v, **kwargs)
    with torch.no_grad():
        qd, kd, vd = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    with torch.enable_grad():
        expected = reference.local_attention(qd, kd, vd, **kwargs)
    cot = torch.randn_like(expected)
    got_grads = grads([out], [cot.to(dtype)], [q, k, v])
    want_grads = grads([expected], [cot], [qd, kd, vd])
    assert_close(out, expected, tight_tolerance(dtype), "out")
    for name, a, b in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert_close(a, b, tight_tolerance(dtype) * 4, name)


@pytest.mark.parametrize(
    "q_len,k_len,window,global_pattern",
    [
        (1100, 1100, (None, None), None),   # two key tiles per block
        (1300, 1300, (1100, 0), None),      # a windowed span longer than a tile
        (40, 1200, (None, 0), None),        # few rows, long key span (decoding-like)
        (1200, 1200, (3, 3), "many"),       # > 1024 global keys outside the band: two extras tiles
    ],
)
def test_spans_longer_than_one_key_tile(q_len, k_len, window, global_pattern):
    kwargs = dict(window=window)
    if global_pattern == "many":
        gmask = torch.zeros(1, k_len, dtype=torch.bool)
        gmask[0, ::1] = torch.rand(k_len) < 0.9
        kwargs["global_mask"] = gmask
    check_against_reference(q_len, k_len, 16, **kwargs)


FEW_ROW_CASES = {
    "window": dict(window=(30, 0), causal=True),
    "unbounded": dict(window=(None, 0), causal=True),
    "two-sided": dict(window=(7, 7)),
    "dilated": dict(window=(40, 0), causal=True, dilation=3),
    "alibi softcap": dict(window=(25, 0), causal=True, softcap=2.0, alibi="balanced"),
    "sigmoid": dict(window=(25, 0), causal=True, score="sigmoid", alibi="standard"),
    "globals": dict(window=(5, 0), causal=True, global_mask="sparse"),
    "globals two-sided": dict(window=(3, 3), global_mask="sparse"),
}


@pytest.mark.parametrize("q_len", [1, 2, 4, 5])  # 5: the packed path, same cases
@pytest.mark.parametrize("case", sorted(FEW_ROW_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_few_query_rows(q_len, case, dtype):
    """Forwards with at most 4 query rows per head read K and V as rows
    (TileOps::rows_dot / rows_axpy); decoding against a 1100-key cache (two
    key tiles for the unbounded window), GQA, head dims that leave a partial
    vector (18) and one that does not (64)."""
    kwargs = dict(FEW_ROW_CASES[case])
    alibi = kwargs.pop("alibi", None)
    if alibi == "balanced":
        kwargs["alibi_slopes"] = torch.tensor([0.5, 0.25, -0.5, -0.25])
    elif alibi == "standard":
        kwargs["alibi_slopes"] = standard_alibi_slopes(4)
    if kwargs.get("global_mask") == "sparse":
        gmask = torch.zeros(2, 1100, dtype=torch.bool)
        gmask[:, [0, 3, 517, 1090]] = True
        gmask[1, 1099] = True  # a global query row in batch 1
        kwargs["global_mask"] = gmask
    for head_dim in (18, 64):
        check_against_reference(q_len, 1100, head_dim, dtype=dtype, q_heads=4, kv_heads=2, batch=2, **kwargs)


@pytest.mark.parametrize("head_dim", [1, 7, 40, 72, 100, 128])
def test_head_dims_that_are_not_a_vector_multiple(head_dim):
    check_against_reference(150, 170, head_dim, window=(20, 5), dilation=2, alibi_slopes=standard_alibi_slopes(2))


def test_many_chunks_share_keys():
    """4096 rows of one head: 64 chunks, whose key spans overlap by the window."""
    check_against_reference(4096, 4096, 8, q_heads=1, kv_heads=1, window=(300, 20))


def test_random_global_patterns():
    """Global rows taken out of a block leave irregular row sets (which must not
    be read as equally spaced) and global keys inside a span widen the rows'
    runs; random masks of every density, small windows, several dilations."""
    gen = torch.Generator().manual_seed(1234)
    for _ in range(150):
        length = int(torch.randint(20, 160, (1,), generator=gen))
        side = int(torch.randint(0, 6, (1,), generator=gen))
        dilation = 1 + int(torch.randint(0, 6, (1,), generator=gen)) // 3  # 1 twice as often as 2
        density = float(torch.rand(1, generator=gen))
        gmask = torch.rand(1, length, generator=gen) < density
        check_against_reference(length, length, 4, window=(side, side), dilation=dilation, global_mask=gmask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_globals", [False, True])
def test_threads_share_chunks_without_races(dtype, with_globals):
    """Chunks go to threads dynamically and write dK/dV partly in place: many
    chunks, GQA, dilation, owned and shared key rows (float32 writes owned rows
    in place, bfloat16 never; global rows switch it off), compared bit for bit
    between 1 and 4 threads, three times."""
    q, k, v = random_qkv(2, 4, 2, 2048, 2048, 32, dtype, "cpu")
    kwargs = dict(window=(100, 10), dilation=2)
    if with_globals:
        kwargs["global_mask"] = torch.rand(2, 2048) < 0.01
    cot = torch.randn(2, 4, 2048, 32).to(dtype)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 4, 4, 4):
            torch.set_num_threads(threads)
            inputs = [t.clone().requires_grad_() for t in (q, k, v)]
            out = longreach.local_attention(*inputs, **kwargs)
            results.append((out, *grads([out], [cot], inputs)))
    finally:
        torch.set_num_threads(saved)
    for run in results[1:]:
        for name, a, b in zip(("out", "dq", "dk", "dv"), results[0], run):
            assert torch.equal(a, b), f"{name} differs between 1 and 4 threads"


ISA_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import test_cpu_kernels as t
from attention_testing import standard_alibi_slopes
cases = [
    dict(q_len=300, k_len=300, head_dim=40, window=(50, 0), causal=True),
    dict(q_len=200, k_len=260, head_dim=24, window=(30, 7), dilation=3, alibi_slopes=standard_alibi_slopes(2)),
    dict(q_len=150, k_len=150, head_dim=16, window=(9, 9), score="sigmoid", softcap=3.0),
    dict(q_len=1100, k_len=1100, head_dim=8, window=(None, None)),
    dict(q_len=1, k_len=700, head_dim=40, window=(300, 0), causal=True, alibi_slopes=standard_alibi_slopes(2)),
    dict(q_len=3, k_len=90, head_dim=8, window=(20, 2), dilation=2, score="sigmoid"),
]
gmask = torch.rand(1, 180) < 0.1
cases.append(dict(q_len=180, k_len=180, head_dim=32, window=(12, 3), global_mask=gmask))
for case in cases:
    for dtype in (torch.float64, torch.float32):
        t.check_against_reference(dtype=dtype, **case)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability()}))
"""


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_every_instruction_set_copy_matches_the_reference(capability):
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" and capability != "default":
        pytest.skip("this CPU (or build) only has ATen's DEFAULT capability")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "-c", ISA_SCRIPT, tests_dir], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    ran = json.loads(run.stdout.strip().splitlines()[-1])["capability"]
    if ran.lower() != capability:  # ATen never goes above what the CPU has
        pytest.skip(f"asked for {capability}, this CPU ran {ran}")


# ---------------------------------------------------------------------------
# The bf16 products on AVX512_BF16 (csrc/cpu/bf16_ops.h): the dispatch rule on
# any machine, and the forward forced on and off in a subprocess.

def test_bf16_dispatch_rule():
    choose = torch.ops.longreach._debug_bf16_choice
    assert choose("", "AVX512", True) == "avx512_bf16"
    assert choose("1", "AVX512", True) == "avx512_bf16"
    assert choose("0", "AVX512", True) == "off"
    assert choose("", "AVX512", False) == "off"
    assert choose("", "AVX2", True) == "off"
    with pytest.raises(RuntimeError, match="cannot run"):
        choose("1", "AVX2", True)
    with pytest.raises(ValueError, match="LONGREACH_CPU_BF16"):
        choose("yes", "AVX512", True)


BF16_SCRIPT = r"""
import json, torch, longreach
from longreach import reference
torch.manual_seed(0)
worst = 0.0
for L, D, win, kw in [(300, 64, (50, 0), dict(causal=True)), (1100, 128, (None, None), {}),
                      (257, 40, (30, 7), dict(dilation=2)), (200, 64, (20, 0), dict(causal=True, softcap=5.0))]:
    q, k, v = (torch.randn(1, 2, L, D) for _ in range(3))
    e = reference.local_attention(q.double(), k.double(), v.double(), window=win, **kw)
    o = longreach.local_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), window=win, **kw)
    worst = max(worst, ((o.double() - e).abs().max() / e.abs().max()).item())
print(json.dumps({"kernels": torch.ops.longreach._debug_cpu_kernels(), "worst": worst}))
"""


@pytest.mark.parametrize("switch", ["0", "1"])
def test_bf16_kernels_forced_on_and_off(switch):
    if "avx512" not in torch.ops.longreach._debug_cpu_kernels():
        pytest.skip("no AVX512 capability here")
    # AMX off: this is the AVX512_BF16 switch (tests/test_cpu_amx.py covers AMX).
    env = dict(os.environ, LONGREACH_CPU_BF16=switch, LONGREACH_CPU_AMX="0")
    run = subprocess.run([sys.executable, "-c", BF16_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    if switch == "1" and run.returncode != 0 and "cannot run" in run.stderr:
        pytest.skip("this CPU has no AVX512_BF16")
    assert run.returncode == 0, run.stdout + run.stderr
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["kernels"].endswith("+avx512_bf16") == (switch == "1"), res
    assert res["worst"] < 2e-2, res  # bf16 rounding of out and P: ~4e-3 relative here
