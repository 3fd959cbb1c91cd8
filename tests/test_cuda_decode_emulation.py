"""The CUDA decode kernel of local_attention_with_kvcache (csrc/cuda/decode_blocks.cuh), run on
the host (tests/emulation/decode_emulation.cpp), against the CPU decode op and the dense
reference over the whole history: every cache layout (contiguous, rolling with wrap-around,
paged with shuffled block tables of block size 16 and 256), per-row cache_seqlens, GQA / MQA,
ALiBi per head and per (batch, head), soft-cap, sigmoid, dilation, learnable sinks, sink tokens,
chunks with per-head shifts, split-KV (several splits equal one split; the heuristic), fully
masked rows, head dims 20 / 64 / 128 / 256, and the three CUDA dtypes.

The emulation runs the CUDA entry's host logic (the CPU op's checks and append, the split rule)
and every block with one host "thread"; the real thread layout, coalescing and speed need a GPU
(tests/test_cuda.py). Built on the fly (about a minute), so, like tests/test_cuda_emulation.py,
these run only with LONGREACH_CUDA_EMULATION=1 or LONGREACH_EXTENDED_TESTS=1.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

import longreach
from longreach import reference
from longreach.ops.attention import kernel_options
from testenv import extended_tests_enabled

pytestmark = pytest.mark.skipif(
    not (os.environ.get("LONGREACH_CUDA_EMULATION", "") not in ("", "0") or extended_tests_enabled()),
    reason="set LONGREACH_CUDA_EMULATION=1 to build and run the host emulation of the CUDA kernels",
)

# Emulated CUDA vs the CPU op (same dtype): both accumulate in float32 and round the output once,
# in different orders. Against the float64 reference: test_kvcache.py's tolerances.
TOL_CPU = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}
TOL_REF = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def emulation():
    import cuda_emulation

    return cuda_emulation.load_decode()


def _slot(layout, j, capacity, sink_tokens):  # written independently of csrc/common/kv_cache.h
    if layout == "rolling" and j >= sink_tokens:
        return sink_tokens + (j - sink_tokens) % (capacity - sink_tokens)
    return j


class Problem:
    """A decode call: the full history of every row (the truth), a cache of one layout holding it
    (NaN in every slot no position uses, so a read of one shows), and the op's arguments."""

    def __init__(self, *, layout="contiguous", B=2, Hq=4, Hk=2, Lq=1, D=64, lens=(37, 70), dtype=torch.float32,
                 append=True, capacity=None, block_size=16, sink_tokens=0, seed=0, **opts):
        g = torch.Generator().manual_seed(seed)
        self.layout, self.Lq, self.append, self.sink_tokens, self.opts = layout, Lq, append, sink_tokens, opts
        self.totals = [n + (Lq if append else 0) for n in lens]
        longest = max(self.totals + [1])
        rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
        self.q = rnd(B, Hq, Lq, D)
        self.history_k, self.history_v = rnd(B, Hk, longest, D), rnd(B, Hk, longest, D)
        self.k_new = self.history_k[:, :, -Lq:].clone() if append else None
        self.v_new = self.history_v[:, :, -Lq:].clone() if append else None
        if append:  # row b's new keys are its last Lq positions
            for b, t in enumerate(self.totals):
                self.history_k[b, :, t - Lq:t] = self.k_new[b]
                self.history_v[b, :, t - Lq:t] = self.v_new[b]
        capacity = capacity or longest
        self.block_table = None
        if layout == "paged":
            max_blocks = -(-capacity // block_size)
            pool = B * max_blocks + 3
            self.k_cache = torch.full((pool, block_size, Hk, D), float("nan"), dtype=dtype)
            self.block_table = torch.randperm(pool, generator=g)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
        else:
            self.k_cache = torch.full((B, Hk, capacity, D), float("nan"), dtype=dtype)
        self.v_cache = self.k_cache.clone()
        for b, n in enumerate(lens):  # the cached positions, in order (a ring overwrites its oldest)
            for j in range(n):
                s = _slot(layout, j, capacity, sink_tokens)
                if layout == "paged":
                    blk = int(self.block_table[b, s // block_size])
                    self.k_cache[blk, s % block_size] = self.history_k[b, :, j]
                    self.v_cache[blk, s % block_size] = self.history_v[b, :, j]
                else:
                    self.k_cache[b, :, s] = self.history_k[b, :, j]
                    self.v_cache[b, :, s] = self.history_v[b, :, j]
        self.seqlens = torch.tensor(lens, dtype=torch.int32)

    def to(self, device):
        """A copy with every tensor (options included) on `device` (tests/test_cuda.py's GPU runs)."""
        moved = copy.copy(self)
        for name in ("q", "k_cache", "v_cache", "k_new", "v_new", "seqlens", "block_table"):
            t = getattr(self, name)
            setattr(moved, name, None if t is None else t.to(device))
        moved.opts = {key: val.to(device) if isinstance(val, torch.Tensor) else val for key, val in self.opts.items()}
        return moved

    def args(self, k_cache, v_cache, num_splits=0):
        o = self.opts
        left, right, dilation, score, bias, softcap, scale = kernel_options(
            "test", self.q.shape[-1], window=o.get("window", (None, None)), causal=o.get("causal", False),
            dilation=o.get("dilation", 1), score=o.get("score", "softmax"), sigmoid_bias=o.get("sigmoid_bias"),
            softcap=o.get("softcap"), scale=o.get("scale"), return_lse=False)
        return (self.q, k_cache, v_cache, self.k_new, self.v_new, self.seqlens, self.block_table,
                o.get("alibi_slopes"), o.get("sinks"), left, right, dilation, score, bias, softcap, scale,
                self.sink_tokens, self.layout == "rolling", num_splits, o.get("chunk", 0), o.get("chunk_shift"))

    def emulated(self, emulation, num_splits=0):
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out, lse = emulation.kvcache_fwd(*self.args(k_cache, v_cache, num_splits))
        return out, lse, k_cache, v_cache

    def cpu(self, num_splits=0):
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        out, lse = torch.ops.longreach.local_attention_kvcache_fwd(*self.args(k_cache, v_cache, num_splits))
        return out, lse, k_cache, v_cache

    def reference(self):
        """Each row's Lq queries over its whole history, in float64 (longreach.reference)."""
        o = dict(self.opts)
        slopes = o.pop("alibi_slopes", None)
        outs, lses = [], []
        for b, t in enumerate(self.totals):
            row_slopes = slopes if slopes is None or slopes.dim() == 1 else slopes[b]
            softmax = o.get("score", "softmax") == "softmax"
            result = reference.local_attention(
                self.q[b:b + 1].double(), self.history_k[b:b + 1, :, :t].double(),
                self.history_v[b:b + 1, :, :t].double(), alibi_slopes=row_slopes, sink_tokens=self.sink_tokens,
                return_lse=softmax, **o)
            out, lse = result if softmax else (result, torch.zeros(result.shape[:3], dtype=torch.float64))
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)


def _check(emulation, problem, num_splits=0, against_reference=True):
    dtype = problem.q.dtype
    out, lse, kc, vc = problem.emulated(emulation, num_splits)
    cpu_out, cpu_lse, cpu_kc, cpu_vc = problem.cpu(num_splits)
    rtol, atol = TOL_CPU[dtype]
    torch.testing.assert_close(out, cpu_out, rtol=rtol, atol=atol)
    sigmoid = problem.opts.get("score") == "sigmoid"
    if not sigmoid:
        torch.testing.assert_close(lse, cpu_lse, rtol=2e-5, atol=2e-5)
    # The append is the CPU op's (kvcache_params.cpp): the same slots written, nothing else (NaN == NaN).
    torch.testing.assert_close(kc, cpu_kc, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(vc, cpu_vc, rtol=0, atol=0, equal_nan=True)
    if against_reference:
        ref_out, ref_lse = problem.reference()
        rtol, atol = TOL_REF[dtype]
        torch.testing.assert_close(out.double(), ref_out, rtol=rtol, atol=atol)
        if not sigmoid:
            torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=2e-5, atol=2e-5)
    return out, lse


SLOPES4 = torch.tensor([0.25, -0.1, 0.05, 0.5])
CASES = {
    "contiguous-gqa-window": dict(window=(16, 0)),
    "contiguous-bidirectional-lq2-no-append": dict(Lq=2, append=False, lens=(30, 9), window=(8, 4)),
    "rolling-wraps-sinks": dict(layout="rolling", Lq=2, lens=(97, 130), capacity=2 + 12 + 2, sink_tokens=2,
                                window=(12, 0)),
    "rolling-dilation-lq3": dict(layout="rolling", Lq=3, lens=(61, 88), capacity=24, window=(10, 0), dilation=2),
    "paged16-mqa-two-row-chunks": dict(layout="paged", Hq=6, Hk=1, Lq=3, D=128, lens=(50, 75), window=(40, 0)),
    "paged256-long-history": dict(layout="paged", block_size=256, lens=(300, 10, 520), B=3, causal=True),
    "alibi-per-head-softcap": dict(alibi_slopes=SLOPES4, softcap=3.0, window=(20, 0)),
    "alibi-per-batch-head-dilation": dict(Lq=3, lens=(40, 61), dilation=2, window=(10, 0),
                                          alibi_slopes=torch.tensor([[0.1, 0.2, -0.3, 0.05], [0.3, 0.0, 0.2, -0.1]])),
    "sigmoid-default-bias": dict(score="sigmoid", window=(24, 0)),
    "sigmoid-bias-rolling": dict(layout="rolling", capacity=20, lens=(50, 33), score="sigmoid", sigmoid_bias=-1.5,
                                 window=(16, 0)),
    "sinks-and-sink-tokens": dict(sink_tokens=4, window=(8, 0), sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "chunks-per-head-shift-paged": dict(layout="paged", Lq=2, lens=(70, 45), causal=True, chunk=16,
                                        chunk_shift=torch.tensor([0, 8, 3, 11])),
    "chunks-window-dilation": dict(Lq=3, lens=(55, 80), window=(20, 0), dilation=3, chunk=12,
                                   chunk_shift=torch.tensor([0, 6, 6, 1])),
    "head-dim-20-scale": dict(D=20, scale=0.3, window=(12, 0)),
    "head-dim-256": dict(D=256, Hq=2, Hk=2, lens=(40, 70), window=(50, 0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_emulated_decode_matches_the_cpu_op_and_the_reference(emulation, name):
    _check(emulation, Problem(**CASES[name]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["rolling-wraps-sinks", "paged16-mqa-two-row-chunks", "alibi-per-head-softcap",
                                  "sigmoid-default-bias", "chunks-per-head-shift-paged", "head-dim-256"])
def test_emulated_decode_16_bit(emulation, name, dtype):
    _check(emulation, Problem(dtype=dtype, **CASES[name]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["paged256-long-history", "sinks-and-sink-tokens", "sigmoid-bias-rolling",
                                  "chunks-window-dilation"])
def test_several_splits_equal_one_split(emulation, name, dtype):
    problem = Problem(dtype=dtype, **CASES[name])
    one_out, one_lse = _check(emulation, problem, num_splits=1, against_reference=False)
    rtol, atol = TOL_CPU[dtype]
    for splits in (2, 5, 128):
        out, lse, _, _ = problem.emulated(emulation, splits)
        torch.testing.assert_close(out, one_out, rtol=rtol, atol=atol)
        if problem.opts.get("score") != "sigmoid":
            torch.testing.assert_close(lse, one_lse, rtol=2e-5, atol=2e-5)
    _check(emulation, problem, num_splits=5)


def test_the_split_rule(emulation):
    # num_splits given: as is, capped at 128. 0: fill the SMs when the units cannot, >= 256 keys a split.
    assert emulation.splits(3, 10, 10, 108) == 3
    assert emulation.splits(1000, 10, 10, 108) == 128
    assert emulation.splits(0, 200, 100000, 108) == 1
    assert emulation.splits(0, 4, 100000, 108) == 27
    assert emulation.splits(0, 4, 1000, 108) == 3
    assert emulation.splits(0, 4, 100, 108) == 1
    # The heuristic in use: few units and a long history split; the result is the one-split result.
    problem = Problem(**CASES["paged256-long-history"], Hq=2, Hk=1)
    emulation.set_multiprocessors(64)
    try:
        many, many_lse, _, _ = problem.emulated(emulation, 0)
    finally:
        emulation.set_multiprocessors(108)
    one, one_lse, _, _ = problem.emulated(emulation, 1)
    torch.testing.assert_close(many, one, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(many_lse, one_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sinks", [None, torch.tensor([0.5, -1.0, 2.0, 0.0])])
@pytest.mark.parametrize("splits", [1, 3])
def test_fully_masked_rows(emulation, sinks, splits):
    # Row 0 has no key at all (an empty cache, nothing appended); row 1's window misses its keys
    # (dilation 4 with one key of each class, rows of the other classes see nothing).
    problem = Problem(Lq=3, lens=(0, 2), append=False, window=(2, 0), dilation=4, sinks=sinks)
    out, lse = _check(emulation, problem, num_splits=splits)
    assert (out[0] == 0).all()
    expected = torch.full((4, 3), float("-inf")) if sinks is None else sinks[:, None].expand(4, 3)
    torch.testing.assert_close(lse[0], expected)
    assert torch.isfinite(out).all()


def test_folded_grid_with_surplus_blocks(emulation):
    emulation.set_grid_fold_limit(3)  # units x batch = 2 x 2 x 3 pairs in rows of 3
    try:
        _check(emulation, Problem(**CASES["rolling-dilation-lq3"]))
    finally:
        emulation.set_grid_fold_limit(65535)


def test_rejected_on_cuda_without_writing_the_cache(emulation):
    problem = Problem(dtype=torch.float64)  # the CPU op takes float64, the CUDA kernels do not
    k_cache, v_cache = problem.k_cache.clone(), problem.v_cache.clone()
    with pytest.raises(TypeError, match="local_attention_with_kvcache \\(CUDA\\): q has dtype torch.float64"):
        emulation.kvcache_fwd(*problem.args(k_cache, v_cache))
    torch.testing.assert_close(k_cache, problem.k_cache, rtol=0, atol=0, equal_nan=True)
    problem = Problem(D=264, lens=(3, 4))
    k_cache, v_cache = problem.k_cache.clone(), problem.v_cache.clone()
    with pytest.raises(ValueError, match="head dim 264 is not supported; expected 1 .. 256"):
        emulation.kvcache_fwd(*problem.args(k_cache, v_cache))
    torch.testing.assert_close(v_cache, problem.v_cache, rtol=0, atol=0, equal_nan=True)
    # The shared checks come first, with the CPU op's messages.
    problem = Problem()
    with pytest.raises(ValueError, match="num_splits must be >= 0"):
        emulation.kvcache_fwd(*problem.args(problem.k_cache, problem.v_cache, -1))
