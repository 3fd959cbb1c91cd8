"""Randomized differential test: longreach.local_attention against the dense oracle
longreach.reference.local_attention (issue 12, "Tests that would have found these").

Every case is drawn from its own seed by `draw_case(seed)` (a `random.Random(seed)` for the
configuration, a `torch.Generator` seeded the same for the tensors), so the test id
``s<seed>-...`` reproduces a failure alone:

    pytest "tests/test_differential_reference.py::test_matches_reference[cpu-s123-...]"
    pytest tests/test_differential_reference.py -k "s123-"

The default run checks DEFAULT_CASES = 1000 seeds (about 15 s on one thread); with
LONGREACH_EXTENDED_TESTS=1 another EXTENDED_CASES = 10 000 seeds with a 5x larger work cap
follow (about 4 minutes). The generator draws:

- B 1-3; (Hq, Hk) with Hq % Hk == 0 (MHA, GQA, MQA);
- Lq, Lk from 0 to ~600, biased small, often on the 64/128 block edges, with Lq > Lk
  (rows before the first key) about a third of the time;
- D from 1 to 256 including odd sizes, biased small; the work B*Hq*Lq*Lk*D is capped so
  that the dense oracle stays cheap;
- each window side None, 0, small, up to 64, or wider than the sequence; causal;
  dilation 1-7;
- global masks of every density: none, one key, sparse, dense, all, prefix, given but empty,
  sometimes strided; a global key with Lq > Lk comes up in about 30% of the cases (the CPU
  backward bug of issue 12, item 1, wrong dK/dV there: 34 of the 1000 default cases and the
  minimal case below failed on the library before the fix);
- ALiBi (Hq,) or (B, Hq) with both signs (sometimes a stride-0 expanded (B, Hq));
- softcap, explicit scale, softmax or sigmoid (default or explicit sigmoid_bias), return_lse;
- sink_tokens (StreamingLLM's always-visible first keys: a few, or past a block edge) and
  learnable sinks (Hq,) (gpt-oss) whose gradient is compared too, chunks (sizes 1 to past the
  sequence) with half-shifted or arbitrary per-head shifts; drawn last from a seed's
  stream, so that adding them changed no earlier draw; causal global tokens come from the
  independent causal and global draws;
- attention dropout (docs/semantics.md "Dropout"), drawn after the chunks: 15% of the cases
  with at most MAX_DROPOUT_PAIRS (row, key) pairs, p in (0, 0.9], under a fixed generator seed
  (the op draws its (seed, offset) from it; the oracle applies longreach.dropout.keep_mask of
  the same pair, and the backward must regenerate that mask);
- float64 (most cases, scaled error 1e-10), float32 (1e-4), bfloat16 and float16 (error at
  most 2x a plain PyTorch computation in the same dtype plus a few ulps, both measured against
  the float64 oracle on the same rounded inputs);
- contiguous, transposed, sliced, head-major, dim-major and stride-0 expanded q, k, v
  (gradients are compared with respect to the strided views the op is given).

It compares the output, the lse (softmax; -inf rows must match exactly) and dq, dk, dv for a
random upstream gradient of the output and, with return_lse, of the lse. Values stay finite
and sane (dilation <= 7, moderate scales); extreme values have targeted tests elsewhere.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch

import longreach
from longreach import reference
from longreach.dropout import draw_seed, keep_mask
from attention_testing import grads, scaled_error
from testenv import extended_tests_enabled

DEFAULT_CASES = 1000
EXTENDED_CASES = 10_000
FIRST_EXTENDED_SEED = 100_000  # extended seeds never collide with the default ones
# Cap on the dense work B * Hq * Lq * Lk * D of one case (head dim, heads, batch, then lengths
# shrink until it fits); the extended seeds may draw bigger problems.
MAX_WORK = 8_000_000
MAX_WORK_EXTENDED = 40_000_000
# Dropout is drawn only for cases of at most this many pairs B * Hq * Lq * Lk: the oracle's mask
# (Philox with torch integer ops) costs 1-3 us per pair; ~100 default cases, ~0.5 M pairs in all.
MAX_DROPOUT_PAIRS = 50_000

# Scaled error (max |err| / max(1, max |expected|)) for the precise dtypes.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
# Unit roundoff of the low-precision dtypes: the slack on top of 2x torch's own error.
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
# Where torch's own error is 0 (an output that is one value, an exactly-zero gradient), a
# flash-style kernel still rounds once more (e.g. the backward's rowsum(dO * O) uses the
# rounded output): up to 4 ulps of the max and 0.9 of the rms over 3000 seeds; twice that here.
SLACK_ULPS = {"max": 8.0, "rms": 2.0}

LAYOUTS = ("contiguous", "transposed", "sliced_len", "sliced_dim", "head_major", "dim_major",
           "expand_heads", "expand_batch", "expand_len")


@dataclass
class Case:
    seed: int
    dtype: torch.dtype
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    k_len: int
    head_dim: int
    window: Tuple[Optional[int], Optional[int]]
    causal: bool
    dilation: int
    global_kind: str
    global_density: float
    global_strided: bool
    alibi: str  # none | heads | batch_heads | batch_heads_expanded
    score: str
    sigmoid_bias: Optional[float]
    softcap: Optional[float]
    scale: Optional[float]
    return_lse: bool
    layouts: Tuple[str, str, str]
    extra: dict = field(default_factory=dict)

    def kwargs_text(self) -> str:
        return (f"window={self.window}, causal={self.causal}, dilation={self.dilation}, "
                f"global={self.global_kind}(density {self.global_density:.2f}, strided {self.global_strided}), "
                f"alibi={self.alibi}, score={self.score!r}, sigmoid_bias={self.sigmoid_bias}, "
                f"softcap={self.softcap}, scale={self.scale}, return_lse={self.return_lse}, "
                f"sink_tokens={self.extra.get('sink_tokens', 0)}, sinks={self.extra.get('sinks', False)}, "
                f"chunk={self.extra.get('chunk', 0)}, chunk_shift={self.extra.get('chunk_shift')}, "
                f"dropout_p={self.extra.get('dropout_p', 0.0)} (generator seed {self.extra.get('dropout_seed')})")

    def __str__(self) -> str:
        dt = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[self.dtype]
        return (f"s{self.seed}-{dt}-B{self.batch}-H{self.q_heads}x{self.kv_heads}-L{self.q_len}x{self.k_len}"
                f"-D{self.head_dim}")

    def describe(self) -> str:
        return (f"case {self} (seed {self.seed}): q ({self.batch}, {self.q_heads}, {self.q_len}, {self.head_dim}), "
                f"k/v ({self.batch}, {self.kv_heads}, {self.k_len}, {self.head_dim}), {self.dtype}, "
                f"layouts q/k/v {self.layouts}, {self.kwargs_text()}; rerun alone with "
                f"-k 's{self.seed}-'")


# ----------------------------------------------------------------------------- the generator


def _length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.08:
        return rng.choice([0, 1])
    if r < 0.50:
        return rng.randint(1, 24)
    if r < 0.70:  # on and around the 64/128 block edges
        return rng.choice([63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]) + rng.choice([0, 0, -2, 2])
    if r < 0.88:
        return rng.randint(25, 200)
    return rng.randint(200, 600)


def _head_dim(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.45:
        return rng.randint(1, 9)
    if r < 0.75:
        return rng.randint(10, 40)
    if r < 0.90:
        return rng.choice([31, 32, 33, 63, 64, 65, 80, 96, 127, 128, 129])
    return rng.randint(130, 256)


def _window_side(rng: random.Random, span: int) -> Optional[int]:
    r = rng.random()
    if r < 0.28:
        return None
    if r < 0.43:
        return 0
    if r < 0.73:
        return rng.randint(1, 8)
    if r < 0.88:
        return rng.randint(9, 64)
    return span + rng.randint(1, 50)  # wider than the whole sequence


def draw_case(seed: int) -> Case:
    rng = random.Random(seed)
    max_work = MAX_WORK_EXTENDED if seed >= FIRST_EXTENDED_SEED else MAX_WORK
    dtype = rng.choices([torch.float64, torch.float32, torch.bfloat16, torch.float16], [55, 20, 12.5, 12.5])[0]
    batch = rng.choice([1, 1, 2, 2, 3])
    kv_heads = rng.choice([1, 1, 2, 3])
    group = rng.choice([1, 1, 2, 3, 4])
    q_heads = kv_heads * group

    relation = rng.random()
    if relation < 0.33:  # Lq > Lk: rows before the first key (and maybe with no key at all)
        k_len = _length(rng)
        q_len = k_len + rng.choice([1, 1, 2, 3, rng.randint(4, 40), rng.randint(4, 200)])
    elif relation < 0.55:
        q_len = k_len = _length(rng)
    elif relation < 0.80:  # Lq < Lk: a cache longer than the queries (decoding when Lq = 1)
        q_len = rng.choice([1, 1, _length(rng)])
        k_len = q_len + rng.randint(0, 300)
    else:
        q_len, k_len = _length(rng), _length(rng)
    q_len, k_len = min(q_len, 640), min(k_len, 640)
    head_dim = _head_dim(rng)
    # Cap the dense work: shrink the head dim, then the heads, then the batch, then the lengths.
    while batch * q_heads * q_len * k_len * head_dim > max_work:
        if head_dim > 16:
            head_dim = max(16, head_dim // 2 + 1)
        elif q_heads > kv_heads:
            q_heads = kv_heads * max(1, q_heads // kv_heads // 2)
        elif kv_heads > 1:
            kv_heads = q_heads = kv_heads - 1
        elif batch > 1:
            batch -= 1
        else:
            q_len, k_len = max(1, q_len * 3 // 4), max(1, k_len * 3 // 4)

    span = q_len + k_len
    window = (_window_side(rng, span), _window_side(rng, span))
    causal = rng.random() < 0.3
    dilation = 1 if rng.random() < 0.5 else rng.randint(2, 7)

    r = rng.random()
    if r < 0.25:
        global_kind, density = "none", 0.0
    elif r < 0.40:
        global_kind, density = "single", 0.0
    elif r < 0.60:
        global_kind, density = "sparse", rng.uniform(0.01, 0.1)
    elif r < 0.75:
        global_kind, density = "dense", rng.uniform(0.3, 0.9)
    elif r < 0.85:
        global_kind, density = "all", 1.0
    elif r < 0.93:
        global_kind, density = "prefix", 0.0
    else:
        global_kind, density = "empty", 0.0  # a mask given but with no key set
    global_strided = rng.random() < 0.2

    alibi = rng.choices(["none", "heads", "batch_heads", "batch_heads_expanded"], [45, 25, 20, 10])[0]
    score = "softmax" if rng.random() < 0.65 else "sigmoid"
    sigmoid_bias = None
    if score == "sigmoid" and rng.random() < 0.5:
        sigmoid_bias = round(rng.uniform(-6.0, 2.0), 3)
    softcap = None if rng.random() < 0.7 else rng.choice([0.5, 2.0, 5.0, 20.0, 50.0])
    scale = None
    if rng.random() < 0.35:
        scale = rng.choice([0.0, rng.uniform(0.05, 3.0) * head_dim ** -0.5, rng.uniform(-2.0, -0.05) * head_dim ** -0.5])
    return_lse = score == "softmax" and rng.random() < 0.6

    def layout() -> str:
        return "contiguous" if rng.random() < 0.5 else rng.choice(LAYOUTS[1:])

    layouts = (layout(), layout(), layout())
    extra = {"alibi_magnitude": rng.choice([2.0**-8, 2.0**-4, 2.0**-1, 1.0])}
    # Drawn last, so that adding them left every earlier draw of a seed as it was.
    r = rng.random()
    if r < 0.75:
        extra["sink_tokens"] = 0
    elif r < 0.92:
        extra["sink_tokens"] = rng.randint(1, 4)
    else:
        extra["sink_tokens"] = rng.randint(5, 200)  # often past a block edge or the whole sequence
    extra["sinks"] = score == "softmax" and rng.random() < 0.25  # learnable sink logits, with gradients
    # Chunks (docs/semantics.md "Chunks"), drawn after the sinks for the same reason.
    r = rng.random()
    extra["chunk"] = 0 if r < 0.8 else (rng.randint(1, 40) if r < 0.95 else rng.randint(41, 700))
    extra["chunk_shift"] = None
    if extra["chunk"] and rng.random() < 0.6:  # LongLoRA's half-shifted heads, or any shifts
        c = extra["chunk"]
        if rng.random() < 0.5:
            extra["chunk_shift"] = [c // 2 if h % 2 else 0 for h in range(q_heads)]
        else:
            extra["chunk_shift"] = [rng.randint(-2 * c, 2 * c) for _ in range(q_heads)]
    # Dropout, drawn after the chunks for the same reason; small problems only (MAX_DROPOUT_PAIRS).
    r = rng.random()
    extra["dropout_p"], extra["dropout_seed"] = 0.0, None
    if r < 0.15 and batch * q_heads * q_len * k_len <= MAX_DROPOUT_PAIRS:
        extra["dropout_p"] = rng.choice([round(rng.uniform(0.01, 0.9), 3), 0.5, 0.9])
        extra["dropout_seed"] = rng.randrange(2**63)  # torch.manual_seed's before the op draws
    return Case(seed, dtype, batch, q_heads, kv_heads, q_len, k_len, head_dim, window, causal, dilation,
                global_kind, density, global_strided, alibi, score, sigmoid_bias, softcap, scale, return_lse,
                layouts, extra)


# ----------------------------------------------------------------------------- building the inputs


def _leaf_and_view(gen: torch.Generator, shape, layout: str):
    """A float64 leaf and the view of it that is handed to the op (shape `shape`)."""
    B, H, L, D = shape

    def draw(*s):
        return torch.randn(*s, dtype=torch.float64, generator=gen)

    if layout == "contiguous":
        return draw(B, H, L, D), lambda t: t
    if layout == "transposed":  # (B, L, H, D) storage, as a projection followed by .view(...).transpose(1, 2)
        return draw(B, L, H, D), lambda t: t.transpose(1, 2)
    if layout == "sliced_len":
        return draw(B, H, L + 3, D), lambda t: t[:, :, 1 : L + 1]
    if layout == "sliced_dim":  # every other feature: stride 2 in the last dim
        return draw(B, H, L, 2 * D + 1), lambda t: t[..., 1::2]
    if layout == "head_major":
        return draw(H, B, L, D), lambda t: t.transpose(0, 1)
    if layout == "dim_major":  # stride 1 along L, not along D
        return draw(B, H, D, L), lambda t: t.transpose(2, 3)
    if layout == "expand_heads":  # stride 0 over heads
        return draw(B, 1, L, D), lambda t: t.expand(B, H, L, D)
    if layout == "expand_batch":  # stride 0 over the batch
        return draw(1, H, L, D), lambda t: t.expand(B, H, L, D)
    if layout == "expand_len":  # stride 0 over positions: every row / key the same
        return draw(B, H, 1, D), lambda t: t.expand(B, H, L, D)
    raise ValueError(layout)


def _global_mask(case: Case, gen: torch.Generator) -> Optional[torch.Tensor]:
    B, Lk = case.batch, case.k_len
    kind = case.global_kind
    if kind == "none":
        return None
    if kind == "all":
        mask = torch.ones(B, Lk, dtype=torch.bool)
    elif kind == "empty":
        mask = torch.zeros(B, Lk, dtype=torch.bool)
    elif kind == "single":
        mask = torch.zeros(B, Lk, dtype=torch.bool)
        if Lk:
            idx = torch.randint(0, Lk, (B,), generator=gen)
            mask[torch.arange(B), idx] = True
    elif kind == "prefix":  # a leading block, different length per element (Longformer's question)
        mask = torch.zeros(B, Lk, dtype=torch.bool)
        for b in range(B):
            mask[b, : min(Lk, 1 + 4 * b)] = True
    else:
        mask = torch.rand(B, Lk, generator=gen) < case.global_density
    if case.global_strided:  # a non-contiguous view of a larger mask
        big = torch.zeros(B, 2 * Lk + 1, dtype=torch.bool)
        big[:, 1::2] = mask
        mask = big[:, 1::2]
    return mask


def _alibi(case: Case, gen: torch.Generator) -> Optional[torch.Tensor]:
    if case.alibi == "none":
        return None
    mag = case.extra["alibi_magnitude"]
    B, H = case.batch, case.q_heads
    signs = torch.where(torch.rand(B, H, generator=gen) < 0.5, -1.0, 1.0)
    slopes = (signs * mag * torch.rand(B, H, generator=gen, dtype=torch.float64)).to(torch.float32)
    if case.alibi == "heads":
        return slopes[0].contiguous()
    if case.alibi == "batch_heads_expanded":
        return slopes[:1].expand(B, H)
    return slopes


def build(case: Case):
    """(q, k, v leaves in float64, views, op kwargs, cotangent draws) for a case."""
    gen = torch.Generator().manual_seed(case.seed)
    shapes = [(case.batch, case.q_heads, case.q_len, case.head_dim)] + [
        (case.batch, case.kv_heads, case.k_len, case.head_dim)] * 2
    leaves, views = zip(*(_leaf_and_view(gen, s, lay) for s, lay in zip(shapes, case.layouts)))
    kwargs = dict(window=case.window, causal=case.causal, dilation=case.dilation,
                  global_mask=_global_mask(case, gen), alibi_slopes=_alibi(case, gen), score=case.score,
                  sigmoid_bias=case.sigmoid_bias, softcap=case.softcap, scale=case.scale,
                  return_lse=case.return_lse, sink_tokens=case.extra["sink_tokens"], chunk=case.extra["chunk"],
                  chunk_shift=None if case.extra["chunk_shift"] is None else torch.tensor(case.extra["chunk_shift"]))
    cotangents = [torch.randn(shapes[0], dtype=torch.float64, generator=gen)]
    if case.return_lse:
        cotangents.append(torch.randn(shapes[0][:3], dtype=torch.float64, generator=gen))
    if case.extra["sinks"]:  # a fourth leaf (Hq,), drawn last (the other draws are unchanged)
        leaves = leaves + (2.0 * torch.randn(case.q_heads, dtype=torch.float64, generator=gen),)
        views = views + (lambda t: t,)
    return list(leaves), list(views), kwargs, cotangents


def dropout_kwargs(case: Case):
    """(the op's, the oracle's) dropout kwargs: dropout_p, and for the oracle the keep mask of the
    (seed, offset) that the op draws from the generator seeded with case.extra["dropout_seed"]."""
    p = case.extra["dropout_p"]
    if not p:
        return {}, {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.extra["dropout_seed"])
        seed = draw_seed()
    mask = keep_mask(seed, p, case.batch, case.q_heads, case.q_len, case.k_len)
    return dict(dropout_p=p), dict(dropout_p=p, dropout_mask=mask)


# ----------------------------------------------------------------------------- torch in the low dtype


def dense_in_dtype(q, k, v, sinks=None, *, window, causal, dilation, global_mask, alibi_slopes, score, sigmoid_bias,
                   softcap, scale, return_lse, sink_tokens=0, chunk=0, chunk_shift=None, dropout_p=0.0,
                   dropout_mask=None):
    """What plain PyTorch gives in q's dtype: the two matmuls in that dtype, the elementwise
    score math, the softmax and the dropout mask's scaling in float32 (the baseline the
    low-precision kernels must match)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    k = k.repeat_interleave(q_heads // kv_heads, dim=1)
    v = v.repeat_interleave(q_heads // kv_heads, dim=1)
    scale = head_dim ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)).float() * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(q_len) + (k_len - q_len)
    if alibi_slopes is not None:
        dist = (pos[:, None] - torch.arange(k_len)[None, :]).abs().float()
        slopes = alibi_slopes.float()
        slopes = slopes[None] if slopes.dim() == 1 else slopes
        s = s - slopes[:, :, None, None] * dist
    allowed = reference.allowed_keys(q_len, k_len, window, causal, dilation, global_mask,
                                     sink_tokens=sink_tokens, chunk=chunk, chunk_shift=chunk_shift)
    allowed = allowed if chunk else allowed[:, None]  # (B|1, Hq or 1, Lq, Lk)
    if score == "sigmoid":
        bias = reference.default_sigmoid_bias(k_len, window, causal) if sigmoid_bias is None else sigmoid_bias
        w = torch.sigmoid(s + bias) * allowed
        if dropout_mask is not None:
            w = w * dropout_mask / (1 - dropout_p)
        return (w.to(q.dtype) @ v,)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # one more logit per row, with a zero value (gpt-oss), then dropped
        column = sinks.float()[None, :, None, None].expand(batch, q_heads, q_len, 1)
        allowed = torch.cat([allowed.expand(batch, q_heads, q_len, k_len), torch.ones_like(column, dtype=torch.bool)], -1)
        s = torch.cat([s, column], dim=-1)
        v = torch.cat([v, v.new_zeros(batch, q_heads, 1, head_dim)], dim=-2)
    empty = ~allowed.any(dim=-1, keepdim=True)
    w = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(~allowed, 0.0)
    if dropout_mask is not None:  # the sink column (a zero value) is kept as it is
        z = dropout_mask / (1 - dropout_p)
        w = w * (torch.cat([z, z.new_ones(batch, q_heads, q_len, 1)], -1) if sinks is not None else z)
    out = w.to(q.dtype) @ v
    if not return_lse:
        return (out,)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


# ----------------------------------------------------------------------------- one case


def rms_scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """rms |actual - expected| / max(1, rms expected) over the finite entries (float64): more
    sensitive than the max error to low-precision accumulation, and, like scaled_error,
    absolute for small values (an exactly-zero expected gradient must not divide by zero)."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    return float((a - e).pow(2).mean().sqrt() / max(1.0, float(e.pow(2).mean().sqrt())))


def _sinks(views):
    return views[3] if len(views) > 3 else None


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def run_case(case: Case, device: str = "cpu") -> None:
    dtype = case.dtype
    if str(device).startswith("cuda") and dtype == torch.float64:
        dtype = torch.float32  # no float64 kernels on CUDA: the same case in float32
    leaves, views, kwargs, cotangents = build(case)
    op_dropout, oracle_dropout = dropout_kwargs(case)
    dev_kwargs = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    ours_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    # The oracle sees exactly the rounded values the op sees, in float64.
    exact_in = [t.detach().cpu().to(torch.float64).requires_grad_() for t in ours_in]
    # Cotangents rounded to the op's dtype (out) / lse dtype, then used in float64 by the oracle.
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cot = [cotangents[0].to(dtype)] + [c.to(lse_dtype) for c in cotangents[1:]]

    what = case.describe()
    # Gradients are taken with respect to the views the op is given (for an expanded input, the
    # op's own gradient before autograd sums it over the stride-0 dims).
    ours_views = [f(t) for f, t in zip(views, ours_in)]
    exact_views = [f(t) for f, t in zip(views, exact_in)]
    with torch.random.fork_rng(devices=[]):  # the op draws its dropout (seed, offset) from this state
        if op_dropout:
            torch.manual_seed(case.extra["dropout_seed"])
        ours = _as_tuple(longreach.local_attention(*ours_views[:3], sinks=_sinks(ours_views), **dev_kwargs,
                                                   **op_dropout))
    exact = _as_tuple(reference.local_attention(*exact_views[:3], sinks=_sinks(exact_views), **kwargs,
                                                **oracle_dropout))
    assert len(ours) == len(exact), what
    assert ours[0].dtype == dtype and ours[0].shape == exact[0].shape, what
    if case.return_lse:
        assert ours[1].dtype == lse_dtype and ours[1].shape == exact[1].shape, what

    results = {"out": (ours[0], exact[0])}
    if case.return_lse:
        results["lse"] = (ours[1], exact[1])
    got_grads = grads(ours, [c.to(device) for c in cot], ours_views)
    want_grads = grads(exact, [c.to(torch.float64) for c in cot], exact_views)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got_grads, want_grads):
        assert g.dtype == dtype and g.shape == w.shape, f"{name}: {what}"
        results[name] = (g, w)

    if dtype in TOLERANCE:
        tol = TOLERANCE[dtype]
        failures = []
        for name, (a, e) in results.items():
            try:
                err = scaled_error(a, e)
            except AssertionError as exc:  # NaN or mismatched infinities
                failures.append(f"{name}: {exc}")
                continue
            if not err <= tol:
                failures.append(f"{name}: scaled error {err:.3g} > {tol:.3g}")
        assert not failures, f"{'; '.join(failures)}\n{what}"
        return

    # bfloat16 / float16: at most 2x the error of plain PyTorch in the same dtype (+ a few ulps).
    torch_in = [t.detach().cpu().to(dtype).requires_grad_() for t in ours_in]
    torch_views = [f(t) for f, t in zip(views, torch_in)]
    theirs = dense_in_dtype(*torch_views, **kwargs, **oracle_dropout)
    their_grads = grads(theirs, cot, torch_views)
    baseline = {"out": theirs[0], "lse": theirs[1] if case.return_lse else None}
    baseline.update(zip(("dq", "dk", "dv", "dsinks"), their_grads))
    eps = EPS[dtype]
    failures = []
    for name, (a, e) in results.items():
        for kind, measure in (("max", scaled_error), ("rms", rms_scaled_error)):
            try:
                err_ours = measure(a, e)
            except AssertionError as exc:
                failures.append(f"{name}: {exc}")
                break
            err_torch = measure(baseline[name], e)
            slack = SLACK_ULPS[kind] * eps
            if not err_ours <= 2 * err_torch + slack:
                failures.append(f"{name}, {kind} error: longreach {err_ours:.3g} > 2 x torch's "
                                f"{err_torch:.3g} + {slack:.3g}")
    assert not failures, f"{'; '.join(failures)}\n{what}"


# ----------------------------------------------------------------------------- the tests


SEEDS = list(range(DEFAULT_CASES))
if extended_tests_enabled():
    SEEDS += list(range(FIRST_EXTENDED_SEED, FIRST_EXTENDED_SEED + EXTENDED_CASES))
CASES = [draw_case(seed) for seed in SEEDS]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, device):
    run_case(case, device)


def test_generator_covers_the_risky_corners():
    """The default budget really draws the combinations the issue names, each in a good share of
    the cases (about half of what the generator gives today), so a change to the generator
    cannot quietly stop testing one of them."""
    cases = [draw_case(seed) for seed in range(DEFAULT_CASES)]
    n = len(cases)

    def share(pred) -> float:
        return sum(1 for c in cases if pred(c)) / n

    has_global_key = lambda c: c.global_kind in ("single", "sparse", "dense", "all", "prefix") and c.k_len > 0
    # Issue 12, item 1 (CPU backward, Lq > Lk with global keys): about 30% of the cases.
    assert share(lambda c: c.q_len > c.k_len and has_global_key(c)) >= 0.15
    assert share(lambda c: c.q_len > c.k_len and has_global_key(c) and c.dtype == torch.float64) >= 0.08
    for kind in ("none", "single", "sparse", "dense", "all", "prefix", "empty"):
        assert share(lambda c: c.global_kind == kind) >= 0.03, kind
    assert share(lambda c: c.dtype == torch.float64) >= 0.45
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert share(lambda c: c.dtype == dtype) >= 0.05, dtype
    for lay in LAYOUTS[1:]:
        assert share(lambda c: lay in c.layouts) >= 0.08, lay
    for alibi in ("heads", "batch_heads", "batch_heads_expanded"):
        assert share(lambda c: c.alibi == alibi) >= 0.04, alibi
    assert share(lambda c: c.kv_heads == 1 and c.q_heads > 1) >= 0.12  # MQA
    assert share(lambda c: 1 < c.kv_heads < c.q_heads) >= 0.12  # GQA
    assert share(lambda c: max(c.q_len, c.k_len) > 128) >= 0.25  # past one or more block edges
    assert share(lambda c: max(c.q_len, c.k_len) >= 400) >= 0.03
    assert share(lambda c: c.head_dim % 2 == 1) >= 0.25
    assert share(lambda c: c.head_dim > 128) >= 0.03
    assert share(lambda c: c.q_len == 0 or c.k_len == 0) >= 0.02
    assert share(lambda c: c.dilation > 1) >= 0.25
    assert share(lambda c: c.causal) >= 0.15
    assert share(lambda c: None in c.window) >= 0.25
    assert share(lambda c: 0 in c.window) >= 0.15
    assert share(lambda c: any(s is not None and s > c.q_len + c.k_len for s in c.window)) >= 0.1
    assert share(lambda c: c.score == "sigmoid" and c.sigmoid_bias is None) >= 0.08
    assert share(lambda c: c.score == "sigmoid" and c.sigmoid_bias is not None) >= 0.08
    assert share(lambda c: c.softcap is not None) >= 0.15
    assert share(lambda c: c.scale is not None) >= 0.15
    assert share(lambda c: c.return_lse) >= 0.2
    assert share(lambda c: c.batch > 1) >= 0.3
    assert share(lambda c: c.extra["sink_tokens"] > 0) >= 0.12
    assert share(lambda c: c.extra["sink_tokens"] > 4) >= 0.03
    assert share(lambda c: c.extra["sinks"]) >= 0.08
    assert share(lambda c: c.extra["sinks"] and c.dtype == torch.float64) >= 0.04
    assert share(lambda c: c.extra["chunk"] > 0) >= 0.1
    assert share(lambda c: c.extra["chunk_shift"] is not None) >= 0.05
    dropout = lambda c: c.extra["dropout_p"] > 0  # noqa: E731
    assert share(dropout) >= 0.05
    assert share(lambda c: dropout(c) and c.dtype == torch.float64) >= 0.025
    assert share(lambda c: dropout(c) and c.dtype in (torch.bfloat16, torch.float16)) >= 0.01
    assert share(lambda c: dropout(c) and c.score == "sigmoid") >= 0.015
    assert share(lambda c: dropout(c) and (c.extra["sinks"] or c.extra["chunk"] or c.global_kind != "none")) >= 0.03
    assert share(lambda c: dropout(c) and c.extra["dropout_p"] >= 0.5) >= 0.02
    assert all(c.batch * c.q_heads * c.q_len * c.k_len <= MAX_DROPOUT_PAIRS for c in cases if dropout(c))
    # causal global tokens (the rule of docs/semantics.md "Global tokens under causal")
    assert share(lambda c: c.causal and has_global_key(c)) >= 0.1
    assert all(c.batch * c.q_heads * c.q_len * c.k_len * c.head_dim <= MAX_WORK for c in cases)
    assert max(max(c.q_len, c.k_len) for c in cases) <= 640


def test_draw_case_is_reproducible():
    for seed in (0, 7, 12345):
        a, b = draw_case(seed), draw_case(seed)
        assert str(a) == str(b) and a.describe() == b.describe()
        (la, _, ka, ca), (lb, _, kb, cb) = build(a), build(b)
        assert all(torch.equal(x, y) for x, y in zip(la + ca, lb + cb))


def test_lq_greater_than_lk_single_global_key_dk_dv(device):
    """Issue 12, item 1, the minimal case: float64, B=H=D=1, Lq=9, Lk=8, window=(0, 0), key 6
    global. The CPU backward gave dV of keys 0-5 as 0.09/0.08/0.15/0.06/0.33/0.05 where the
    dense computation gives 0.63/0.91/0.66/0.81/0.53/0.44."""
    dtype = torch.float32 if str(device).startswith("cuda") else torch.float64
    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(1, 1, n, 1, dtype=torch.float64, generator=gen) for n in (9, 8, 8))
    gm = torch.zeros(1, 8, dtype=torch.bool)
    gm[0, 6] = True
    ours_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    exact_in = [t.clone().requires_grad_() for t in (q, k, v)]
    out = longreach.local_attention(*ours_in, window=(0, 0), global_mask=gm.to(device))
    want = reference.local_attention(*exact_in, window=(0, 0), global_mask=gm)
    got_grads = torch.autograd.grad(out.sum(), ours_in)
    want_grads = torch.autograd.grad(want.sum(), exact_in)
    tol = TOLERANCE[dtype]
    assert scaled_error(out, want) <= tol
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got_grads, want_grads):
        assert scaled_error(g, w) <= tol, f"{name}: got {g.flatten().tolist()}, expected {w.flatten().tolist()}"
