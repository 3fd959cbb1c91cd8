"""longreach.local_attention against the dense oracle longreach.reference.local_attention:
output, log-sum-exp and the three gradients, over the parameter grid of issue 2.

The default run takes a pairwise covering array of the grid (every pair of
settings of any two axes appears in some case); LONGREACH_EXTENDED_TESTS=1 adds
a strength-3 covering array of the whole grid and the full product of the
semantic axes (window x dilation x score x ALiBi x softcap x causal x global)
on small shapes. float64 is compared tightly (1e-10), float32 loosely.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import asdict, dataclass
from typing import Optional

import pytest
import torch

import longreach
from longreach import reference
from attention_testing import (
    GLOBAL_PATTERNS,
    WINDOWS,
    alibi_for,
    assert_close,
    global_mask_for,
    grads,
    precise_dtype,
    random_qkv,
    tight_tolerance,
    window_for,
)
from testenv import extended_tests_enabled, skip_unsupported_dtype
from covering import covering_array

# Scaled-error tolerances (max error / max(1, max |expected|)).
TOLERANCE = {
    torch.float64: {"out": 1e-10, "lse": 1e-10, "grad": 1e-10},
    torch.float32: {"out": 2e-5, "lse": 2e-5, "grad": 5e-5},
}

GRID = {
    "dtype": ["float64", "float32"],
    "batch": [1, 2],
    "heads": [(4, 4), (4, 2), (4, 1)],
    "lengths": ["equal", "shorter_q"],
    "length": [1, 17, 200, 1000],
    "head_dim": [16, 64, 80, 128],
    "window": list(WINDOWS),
    "dilation": [1, 2, 3],
    "score": ["softmax", "sigmoid"],
    "alibi": ["none", "standard", "balanced", "per_batch"],
    "softcap": [None, 30.0],
    # Logits scale: x8 passes an explicit scale = 8 / sqrt(D), which also
    # drives the scores far enough for softcap=30 to bend them.
    "logit_scale": [1, 8],
    "causal": [False, True],
    "global_tokens": list(GLOBAL_PATTERNS),
    # out: loss uses the output only; out+lse: also the log-sum-exp (softmax).
    "loss": ["out", "out+lse"],
}
SHAPE_AXES = ("dtype", "batch", "heads", "lengths", "length", "head_dim")


@dataclass(frozen=True)
class Case:
    dtype: str
    batch: int
    heads: tuple
    lengths: str
    length: int
    head_dim: int
    window: str
    dilation: int
    score: str
    alibi: str
    softcap: Optional[float]
    logit_scale: int
    causal: bool
    global_tokens: str
    loss: str

    @property
    def q_len(self) -> int:
        return self.length

    @property
    def k_len(self) -> int:
        # Lq < Lk: a cache longer than the queries (Lq = 1 is the decoding step).
        return self.length if self.lengths == "equal" else self.length + min(self.length // 2, 100) + 7

    def __str__(self) -> str:
        hq, hk = self.heads
        return (
            f"{self.dtype}-B{self.batch}-H{hq}x{hk}-L{self.q_len}x{self.k_len}-D{self.head_dim}-w{self.window}"
            f"-dil{self.dilation}-{self.score}-alibi_{self.alibi}-cap{self.softcap}-x{self.logit_scale}"
            f"-{'causal' if self.causal else 'bidir'}-g_{self.global_tokens}-{self.loss}"
        )


def _cases_from(rows):
    return [Case(**row) for row in rows]


def default_cases():
    return _cases_from(covering_array(GRID, strength=2, seed=2))


def extended_cases():
    cases = _cases_from(covering_array(GRID, strength=3, seed=3, candidates=4))
    # Full product of the semantic axes, each on one of a rotating set of small shapes.
    semantic = [a for a in GRID if a not in SHAPE_AXES]
    small_shapes = [
        dict(dtype=dt, batch=b, heads=h, lengths=ls, length=n, head_dim=d)
        for dt, b, h, ls, n, d in [
            ("float64", 2, (4, 2), "equal", 17, 16),
            ("float64", 1, (4, 1), "shorter_q", 17, 80),
            ("float32", 2, (4, 4), "equal", 200, 64),
            ("float64", 2, (4, 1), "shorter_q", 1, 16),
            ("float32", 1, (4, 2), "shorter_q", 200, 128),
        ]
    ]
    for n, values in enumerate(itertools.product(*(GRID[a] for a in semantic))):
        cases.append(Case(**small_shapes[n % len(small_shapes)], **dict(zip(semantic, values))))
    return cases


CASES = default_cases() + (extended_cases() if extended_tests_enabled() else [])


def test_default_grid_covers_every_pair():
    """The fast grid really is pairwise: every pair of settings of two axes is in some case."""
    rows = [asdict(c) for c in default_cases()]
    for a, b in itertools.combinations(GRID, 2):
        seen = {(repr(r[a]), repr(r[b])) for r in rows}
        for va, vb in itertools.product(GRID[a], GRID[b]):
            # asdict turns the heads tuple into a tuple again; repr keeps None/float distinct
            assert (repr(va), repr(vb)) in seen, f"pair {a}={va!r}, {b}={vb!r} not covered"


def run_case(case: Case, device: str):
    dtype = getattr(torch, case.dtype)
    skip_unsupported_dtype(device, dtype)
    hq, hk = case.heads
    gen = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    q, k, v = random_qkv(case.batch, hq, hk, case.q_len, case.k_len, case.head_dim, dtype, device, gen)
    gmask = global_mask_for(case.global_tokens, case.batch, case.k_len, gen)
    slopes = alibi_for(case.alibi, case.batch, hq)
    kwargs = dict(
        window=window_for(case.window, case.q_len, case.k_len),
        causal=case.causal,
        dilation=case.dilation,
        global_mask=None if gmask is None else gmask.to(device),
        alibi_slopes=None if slopes is None else slopes.to(device),
        score=case.score,
        softcap=case.softcap,
        scale=None if case.logit_scale == 1 else case.logit_scale * case.head_dim**-0.5,
        return_lse=case.score == "softmax",
    )

    inputs = [t.requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    got = longreach.local_attention(*inputs, **kwargs)
    want = reference.local_attention(*ref_inputs, **kwargs)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)

    tol = TOLERANCE[dtype]
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert_close(got[0], want[0], tol["out"], "out")
    if len(got) == 2:
        assert_close(got[1], want[1], tol["lse"], "lse")

    cotangents = [torch.randn(want[0].shape, dtype=torch.float64, generator=gen)]
    if case.loss == "out+lse" and len(got) == 2:
        cotangents.append(torch.randn(want[1].shape, dtype=torch.float64, generator=gen))
    n = len(cotangents)
    got_grads = grads(got[:n], [c.to(device=device, dtype=g.dtype) for c, g in zip(cotangents, got)], inputs)
    want_grads = grads(want[:n], [c.to(device) for c in cotangents], ref_inputs)
    for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        assert g.dtype == dtype
        assert_close(g, w, tol["grad"], name)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, device):
    run_case(case, device)


# Hand-picked cases the grid might only reach by chance.
SPECIAL = [
    # decoding: one query against a long cache, with and without a window
    Case("float64", 2, (4, 1), "shorter_q", 1, 64, "(128,0)", 1, "softmax", "standard", None, 1, True, "none", "out"),
    Case("float64", 1, (4, 2), "shorter_q", 1, 16, "unbounded", 3, "sigmoid", "balanced", 30.0, 8, False, "scattered", "out"),
    # every key global must equal unbounded attention, window or not
    Case("float64", 2, (4, 4), "equal", 200, 16, "(3,0)", 2, "softmax", "none", None, 1, True, "all", "out+lse"),
    # a long sequence with a small window: many key blocks skipped
    Case("float32", 1, (4, 4), "equal", 1000, 64, "(16,16)", 1, "softmax", "balanced", 30.0, 8, False, "prefix", "out+lse"),
    Case("float64", 1, (4, 2), "equal", 1000, 16, "(3,0)", 3, "sigmoid", "per_batch", None, 1, True, "scattered", "out"),
]


@pytest.mark.parametrize("case", SPECIAL, ids=str)
def test_special_cases_match_reference(case, device):
    run_case(case, device)


@pytest.mark.parametrize("bias", [-3.0, 0.0, 1.5])
def test_explicit_sigmoid_bias(bias, device):
    dtype = precise_dtype(device)
    q, k, v = random_qkv(2, 4, 2, 33, 40, 16, dtype, device)
    kwargs = dict(window=(5, 2), dilation=2, score="sigmoid", sigmoid_bias=bias)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    ref_inputs = [t.detach().to(torch.float64).requires_grad_() for t in (q, k, v)]
    got = longreach.local_attention(*inputs, **kwargs)
    want = reference.local_attention(*ref_inputs, **kwargs)
    assert_close(got, want, tight_tolerance(dtype), "out")
    g = torch.randn_like(want)
    for name, a, b in zip("qkv", grads([got], [g.to(dtype)], inputs), grads([want], [g], ref_inputs)):
        assert_close(a, b, tight_tolerance(dtype), f"d{name}")


def test_global_all_equals_unbounded(device):
    """Independent of the reference: all-global attention is plain full attention."""
    dtype = precise_dtype(device)
    q, k, v = random_qkv(2, 4, 2, 50, 50, 16, dtype, device)
    everything = torch.ones(2, 50, dtype=torch.bool, device=device)
    windowed = longreach.local_attention(q, k, v, window=(2, 1), dilation=3, global_mask=everything)
    full = longreach.local_attention(q, k, v)
    assert_close(windowed, full, tight_tolerance(dtype), "out")
