"""Packed (variable-length) attention, longreach.local_attention_varlen (issue 13, section 2).

Every sequence of a pack is its own local_attention problem, so the oracle is the dense
reference applied per sequence (longreach.reference.local_attention_varlen). Compared: the
output, the lse (softmax; -inf rows exactly), dq, dk, dv and the gradient of learnable ALiBi
slopes, for random upstream gradients of the output and the lse.

- test_feature_grid: the feature grid (windows, causal, dilation, global keys, ALiBi (Hq,) and
  (num_seqs, Hq), softcap and scale, sigmoid with the default and an explicit bias, MHA, GQA,
  MQA) crossed with packs of one, two and many sequences (uneven lengths, zero-length sequences
  in the middle and at both ends, sequences with queries but no keys and keys but no queries,
  sequences longer than 64 and 128 rows, no sequence at all, 500 sequences of length 1,
  Lq_i < Lk_i and Lq_i > Lk_i), in float64 (scaled error 1e-10); float32 (1e-4), bfloat16 and
  float16 (at most 2x plain PyTorch's error plus a few ulps, as
  test_differential_reference.py) on the packs that have every kind of sequence.
- test_matches_reference_randomized: a seeded randomized differential test, DEFAULT_CASES
  seeds (another EXTENDED_CASES with LONGREACH_EXTENDED_TESTS=1) drawing everything above plus
  strided and stride-0 q/k/v layouts, int32/int64 cu_seqlens and max_seqlen bounds above the
  longest sequence; ``-k 's<seed>-'`` reruns one case.
- test_equal_lengths_match_the_batched_op: a (B, H, L, D) batch packed into B sequences gives
  the batched op's results.
- gradcheck in float64, torch.library.opcheck of both ops, torch.compile(fullgraph=True) of
  forward and backward without a recompile when the cu_seqlens values change (and one graph with
  symbolic max_seqlen under dynamic=True), torch.func reverse mode, the slope gradient of shared
  (Hq,) slopes, and double backward / forward mode raising.
- Bad input: each a TypeError or ValueError naming the argument, its value and what was
  expected; the value checks only the kernels can make (cu_seqlens not starting at 0,
  decreasing, a last entry other than the total length, max_seqlen below a sequence's length)
  through the public function.
"""

from __future__ import annotations

import functools
import random
import zlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import pytest
import torch
from torch.autograd import forward_ad

import longreach
from longreach import reference
from attention_testing import grads, random_qkv, scaled_error, tight_tolerance
from test_differential_reference import EPS, SLACK_ULPS, TOLERANCE, dense_in_dtype, rms_scaled_error
from testenv import extended_tests_enabled, skip_unsupported_dtype

OP_FWD = "longreach::local_attention_varlen_fwd"
DTYPE_NAMES = {torch.float64: "f64", torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@functools.lru_cache(maxsize=None)
def _has_kernels(device: str) -> bool:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(OP_FWD, torch._C._dispatch_key_for_device(device)):
        return False
    try:  # the CUDA build registers a kernel that raises NotImplementedError until packed batches run there
        x = torch.zeros(1, 1, 1, device=device)
        cu = torch.tensor([0, 1], dtype=torch.int32, device=device)
        longreach.local_attention_varlen(x, x, x, cu, cu, 1, 1)
    except NotImplementedError:
        return False
    return True


def skip_without_kernels(device) -> None:
    if not _has_kernels(str(device)):
        pytest.skip(f"this build has no {device} kernels of local_attention_varlen")


# ----------------------------------------------------------------------------- one problem


@dataclass
class Problem:
    """A pack of sequences and the options of one call."""

    lengths: List[Tuple[int, int]]  # (Lq_i, Lk_i) per sequence
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    options: dict  # window, causal, dilation, score, sigmoid_bias, softcap, scale, return_lse
    global_density: Optional[float] = None  # None: no global_mask; else each key global with this chance
    alibi: str = "none"  # none | heads: (Hq,) | per_seq: (num_seqs, Hq)
    learn_slopes: bool = True
    cu_dtype: torch.dtype = torch.int32
    layouts: Tuple[str, str, str] = ("contiguous", "contiguous", "contiguous")
    max_slack: Tuple[int, int] = (0, 0)  # max_seqlen_* = the longest sequence + this
    seed: int = 0

    def describe(self) -> str:
        lengths = self.lengths if len(self.lengths) <= 12 else f"{self.lengths[:12]} ... ({len(self.lengths)} in all)"
        return (f"lengths (Lq, Lk) {lengths}, Hq {self.q_heads}, Hk {self.kv_heads}, D {self.head_dim}, {self.dtype}, "
                f"{self.options}, global density {self.global_density}, alibi {self.alibi} "
                f"(learnable {self.learn_slopes}), cu_seqlens {self.cu_dtype}, layouts {self.layouts}, "
                f"max_seqlen slack {self.max_slack}, seed {self.seed}")


def _leaf_and_view(gen, total: int, heads: int, dim: int, layout: str):
    """A float64 leaf and the (total, heads, dim) view of it the op gets."""

    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    if layout == "contiguous":
        return draw(total, heads, dim), lambda t: t
    if layout == "fused_qkv":  # one slice of a (total, 3, H, D) projection
        return draw(total, 3, heads, dim), lambda t: t[:, 1]
    if layout == "head_major":  # (H, total, D) storage
        return draw(heads, total, dim), lambda t: t.transpose(0, 1)
    if layout == "sliced_dim":  # stride 2 along D
        return draw(total, heads, 2 * dim + 1), lambda t: t[..., 1::2]
    if layout == "expand_heads":  # stride 0 over heads
        return draw(total, 1, dim), lambda t: t.expand(total, heads, dim)
    raise ValueError(layout)


def cu_seqlens(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(dtype)


def build(p: Problem):
    """(q, k, v leaves in float64, views, cu_q, cu_k, max_q, max_k, kwargs, cotangents)."""
    gen = torch.Generator().manual_seed(p.seed)
    lq, lk = [a for a, _ in p.lengths], [b for _, b in p.lengths]
    total_q, total_k, num_seqs = sum(lq), sum(lk), len(p.lengths)
    shapes = [(total_q, p.q_heads), (total_k, p.kv_heads), (total_k, p.kv_heads)]
    leaves, views = zip(*(_leaf_and_view(gen, n, h, p.head_dim, lay) for (n, h), lay in zip(shapes, p.layouts)))
    kwargs = dict(p.options)
    kwargs["global_mask"] = None if p.global_density is None else torch.rand(total_k, generator=gen) < p.global_density
    kwargs["alibi_slopes"] = None
    if p.alibi != "none":
        rows = 1 if p.alibi == "heads" else num_seqs
        slopes = (torch.rand(rows, p.q_heads, generator=gen, dtype=torch.float64) - 0.5).to(torch.float32)
        kwargs["alibi_slopes"] = slopes[0].contiguous() if p.alibi == "heads" else slopes
    cots = [torch.randn(total_q, p.q_heads, p.head_dim, dtype=torch.float64, generator=gen)]
    if p.options.get("return_lse"):
        cots.append(torch.randn(p.q_heads, total_q, dtype=torch.float64, generator=gen))
    max_q, max_k = max(lq, default=0) + p.max_slack[0], max(lk, default=0) + p.max_slack[1]
    return list(leaves), list(views), cu_seqlens(lq, p.cu_dtype), cu_seqlens(lk, p.cu_dtype), max_q, max_k, kwargs, cots


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def per_sequence_in_dtype(q, k, v, cu_q, cu_k, *, global_mask, alibi_slopes, return_lse, **options):
    """Plain PyTorch in q's dtype (dense_in_dtype of the differential test) on each sequence: the
    baseline of the low-precision tolerances."""
    full = dict(window=(None, None), causal=False, dilation=1, score="softmax", sigmoid_bias=None, softcap=None,
                scale=None)
    full.update(options)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    outs, lses = [q[:0]], [q[:0, :, 0].t().float()]  # empty pieces, connected to q for autograd
    for i in range(len(cq) - 1):
        rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        one = [t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys])]
        res = dense_in_dtype(*one, global_mask=None if global_mask is None else global_mask[None, keys],
                             alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1
                             else alibi_slopes[i], return_lse=return_lse, **full)
        outs.append(res[0][0].transpose(0, 1))
        if return_lse:
            lses.append(res[1][0])
    return (torch.cat(outs), torch.cat(lses, 1)) if return_lse else (torch.cat(outs),)


# The slope gradient is float32 per sequence, and (Hq,) slopes sum it over the sequences: with
# all keys visible its terms cancel, so float64 inputs get float32 rounding of the partial
# sums (5.7e-6 seen). In bfloat16/float16 it is the batched op's (test_matches_the_batched_op_
# per_sequence), whose backward forms rowsum(dO * O) from the rounded output: weighted by the
# distance, that error goes far past plain PyTorch's (0.16 vs 0.002 seen in bfloat16;
# test_alibi.py allows 5% + 5%), so only an O(1) error fails here.
SLOPES_TOLERANCE = 2e-5
SLOPES_LOW_PRECISION = 0.25


def compare(results: dict, dtype, baseline: Optional[dict], what: str) -> None:
    """results: name -> (ours, exact). float64/float32: scaled error within TOLERANCE (slopes
    within SLOPES_TOLERANCE at best); bfloat16/float16: max and rms error at most 2x
    plain PyTorch's (baseline) plus SLACK_ULPS ulps, slopes within SLOPES_LOW_PRECISION."""
    failures = []
    for name, (a, e) in results.items():
        for kind, measure in (("max", scaled_error), ("rms", rms_scaled_error)):
            try:
                err = measure(a, e)
            except AssertionError as exc:  # NaN or mismatched infinities
                failures.append(f"{name}: {exc}")
                break
            if baseline is None or name == "dslopes":
                if baseline is not None:
                    tol = SLOPES_LOW_PRECISION
                else:
                    tol = max(TOLERANCE[dtype], SLOPES_TOLERANCE) if name == "dslopes" else TOLERANCE[dtype]
                if kind == "max" and not err <= tol:
                    failures.append(f"{name}: scaled error {err:.3g} > {tol:.3g}")
                continue
            err_torch = measure(baseline[name], e)
            slack = SLACK_ULPS[kind] * EPS[dtype]
            if not err <= 2 * err_torch + slack:
                failures.append(f"{name}, {kind} error: longreach {err:.3g} > 2 x torch's {err_torch:.3g} "
                                f"+ {slack:.3g}")
    assert not failures, f"{'; '.join(failures)}\n{what}"


def run_problem(p: Problem, device: str = "cpu") -> None:
    dtype = p.dtype
    if str(device).startswith("cuda") and dtype == torch.float64:
        dtype = torch.float32  # no float64 kernels on CUDA: the same problem in float32
    leaves, views, cu_q, cu_k, max_q, max_k, kwargs, cotangents = build(p)
    slopes = kwargs.pop("alibi_slopes")
    learn = slopes is not None and p.learn_slopes
    dev_kwargs = {key: (val.to(device) if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    ours_in = [t.to(device=device, dtype=dtype).requires_grad_() for t in leaves]
    exact_in = [t.detach().cpu().to(torch.float64).requires_grad_() for t in ours_in]
    ours_slopes = None if slopes is None else slopes.to(device).requires_grad_(learn)
    exact_slopes = None if slopes is None else slopes.clone().requires_grad_(learn)
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    cot = [cotangents[0].to(dtype)] + [c.to(lse_dtype) for c in cotangents[1:]]
    what = p.describe()

    ours_views = [f(t) for f, t in zip(views, ours_in)]
    exact_views = [f(t) for f, t in zip(views, exact_in)]
    ours = _as_tuple(longreach.local_attention_varlen(*ours_views, cu_q.to(device), cu_k.to(device), max_q, max_k,
                                                       alibi_slopes=ours_slopes, **dev_kwargs))
    exact = _as_tuple(reference.local_attention_varlen(*exact_views, cu_q, cu_k, max_q, max_k,
                                                       alibi_slopes=exact_slopes, **kwargs))
    assert len(ours) == len(exact), what
    assert ours[0].dtype == dtype and ours[0].shape == exact[0].shape, what
    if len(ours) == 2:
        assert ours[1].dtype == lse_dtype and ours[1].shape == (p.q_heads, ours[0].shape[0]), what

    results = {"out": (ours[0], exact[0])}
    if len(ours) == 2:
        results["lse"] = (ours[1], exact[1])
    names = ["dq", "dk", "dv"] + (["dslopes"] if learn else [])
    got_grads = grads(ours, [c.to(device) for c in cot], ours_views + ([ours_slopes] if learn else []))
    want_grads = grads(exact, [c.to(torch.float64) for c in cot], exact_views + ([exact_slopes] if learn else []))
    for name, g, w in zip(names, got_grads, want_grads):
        assert g.shape == w.shape and g.dtype == (torch.float32 if name == "dslopes" else dtype), f"{name}: {what}"
        results[name] = (g, w)
    if dtype in TOLERANCE:
        compare(results, dtype, None, what)
        return

    torch_in = [t.detach().cpu().to(dtype).requires_grad_() for t in ours_in]
    torch_slopes = None if slopes is None else slopes.clone().requires_grad_(learn)
    torch_views = [f(t) for f, t in zip(views, torch_in)]
    theirs = per_sequence_in_dtype(*torch_views, cu_q, cu_k, alibi_slopes=torch_slopes, **kwargs)
    their_grads = grads(theirs, cot, torch_views + ([torch_slopes] if learn else []))
    baseline = dict(zip(["out", "lse"][: len(theirs)], theirs))
    baseline.update(zip(names, their_grads))
    compare(results, dtype, baseline, what)


# ----------------------------------------------------------------------------- the feature grid

# name -> (Lq_i, Lk_i) per sequence
PACKS = {
    "one": [(37, 37)],
    "one_long": [(150, 150)],  # one sequence past two 64-row blocks
    "two": [(9, 14), (21, 6)],  # Lq < Lk (a prefix), then Lq > Lk (rows before the first key)
    "uneven": [(0, 0), (3, 3), (0, 0), (17, 20), (1, 1), (70, 65), (0, 5), (8, 0), (0, 0)],
    "zeros_at_ends": [(0, 0), (0, 3), (12, 12), (0, 0)],
    "decode": [(1, 30), (1, 1), (1, 0), (2, 90)],
    "q_longer": [(20, 5), (9, 3), (66, 64)],
    "long_mixed": [(5, 5), (130, 140), (65, 64), (20, 20)],
    "none": [],  # no sequence at all: cu_seqlens = [0]
    "no_keys": [(3, 0), (2, 0)],  # every row without a key: zeros, lse -inf, zero gradient
    "ones_500": [(1, 1)] * 500,
}

# name -> (Hq, Hk, D, options, global density, alibi)
FEATURES = {
    "plain": (2, 2, 8, dict(), None, "none"),
    "window": (2, 2, 8, dict(window=(4, 2)), None, "none"),
    "causal_window_mqa": (3, 1, 8, dict(window=(6, 0), causal=True), None, "none"),
    "causal_gqa": (4, 2, 16, dict(causal=True), None, "none"),
    "dilation2": (2, 2, 8, dict(window=(3, 1), dilation=2), None, "none"),
    "dilation3_unbounded": (2, 2, 5, dict(dilation=3), None, "none"),
    "globals_causal": (2, 2, 8, dict(window=(2, 0), causal=True), 0.1, "none"),
    "globals_dilated_mqa": (3, 1, 8, dict(window=(1, 1), dilation=2), 0.1, "none"),
    "alibi_heads_gqa": (4, 2, 8, dict(window=(5, 3)), None, "heads"),
    "alibi_per_seq": (2, 2, 8, dict(causal=True), None, "per_seq"),
    "softcap_scale": (2, 2, 33, dict(window=(8, 8), softcap=2.0, scale=0.7), None, "none"),
    # unbounded: the default bias -ln(Lk_i) differs per sequence
    "sigmoid_default": (2, 2, 8, dict(score="sigmoid"), None, "none"),
    "sigmoid_window_default": (2, 1, 8, dict(score="sigmoid", window=(3, 3)), None, "none"),
    "sigmoid_bias_alibi": (2, 2, 8, dict(score="sigmoid", sigmoid_bias=-1.5, window=(4, 0), causal=True), None,
                           "per_seq"),
    "everything_mqa": (3, 1, 8, dict(window=(2, 2), dilation=2, softcap=5.0), 0.1, "heads"),
}

GRID = [(f, pk, torch.float64) for f in FEATURES for pk in PACKS if pk != "ones_500"]
GRID += [(f, "ones_500", torch.float64) for f in ("plain", "causal_window_mqa", "globals_causal", "alibi_per_seq",
                                                   "sigmoid_default")]
GRID += [(f, pk, torch.float32) for f in FEATURES for pk in ("uneven", "long_mixed")]
GRID += [(f, "uneven", dt) for f in FEATURES for dt in (torch.bfloat16, torch.float16)]


def feature_problem(feature: str, pack: str, dtype: torch.dtype) -> Problem:
    hq, hk, d, options, density, alibi = FEATURES[feature]
    options = dict(options)
    options["return_lse"] = options.get("score", "softmax") == "softmax"
    return Problem(PACKS[pack], hq, hk, d, dtype, options, density, alibi,
                   seed=zlib.crc32(f"{feature}-{pack}-{dtype}".encode()))


@pytest.mark.parametrize("feature,pack,dtype", GRID, ids=[f"{f}-{pk}-{DTYPE_NAMES[dt]}" for f, pk, dt in GRID])
def test_feature_grid(feature, pack, dtype, device):
    skip_without_kernels(device)
    run_problem(feature_problem(feature, pack, dtype), device)


def test_sequences_are_independent():
    """Changing one sequence's keys changes only that sequence's rows (and a pack of one
    sequence is the dense op on it)."""
    lengths = [(6, 9), (5, 5), (7, 4)]
    p = Problem(lengths, 2, 2, 4, torch.float64, dict(window=(3, 1)))
    leaves, _, cu_q, cu_k, max_q, max_k, kwargs, _ = build(p)
    q, k, v = leaves
    out = longreach.local_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)
    k2 = k.clone()
    k2[9:14] = torch.randn(5, 2, 4, dtype=torch.float64)  # the second sequence's keys
    out2 = longreach.local_attention_varlen(q, k2, v, cu_q, cu_k, max_q, max_k, **kwargs)
    changed = (out2 - out).abs().amax(dim=(1, 2)) > 0
    assert changed.tolist() == [False] * 6 + [True] * 5 + [False] * 7
    dense = longreach.local_attention(q[6:11].transpose(0, 1)[None], k[9:14].transpose(0, 1)[None],
                                      v[9:14].transpose(0, 1)[None], window=(3, 1))
    torch.testing.assert_close(out[6:11], dense[0].transpose(0, 1), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- randomized differential

DEFAULT_CASES = 200
EXTENDED_CASES = 2000
FIRST_EXTENDED_SEED = 100_000
BATCHED_CASES = 60  # of the default seeds, also compared with the batched op per sequence
MAX_WORK = 1_500_000  # sum over sequences of Hq * Lq_i * Lk_i * D: the dense oracle stays cheap
MAX_WORK_EXTENDED = 8_000_000
LAYOUTS = ("fused_qkv", "head_major", "sliced_dim", "expand_heads")


def _length(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.12:
        return 0
    if r < 0.55:
        return rng.randint(1, 16)
    if r < 0.75:  # on and around the 64/128 block edges
        return rng.choice([63, 64, 65, 127, 128, 129]) + rng.choice([0, 0, -1, 1])
    return rng.randint(17, 200)


def _window_side(rng: random.Random, span: int) -> Optional[int]:
    r = rng.random()
    if r < 0.3:
        return None
    if r < 0.45:
        return 0
    if r < 0.75:
        return rng.randint(1, 8)
    if r < 0.9:
        return rng.randint(9, 64)
    return span + rng.randint(1, 20)


def draw_problem(seed: int) -> Problem:
    rng = random.Random(seed)
    max_work = MAX_WORK_EXTENDED if seed >= FIRST_EXTENDED_SEED else MAX_WORK
    dtype = rng.choices([torch.float64, torch.float32, torch.bfloat16, torch.float16], [55, 20, 12.5, 12.5])[0]
    num_seqs = rng.choice([1, 1, 2, 2, 3, 4, rng.randint(5, 12), rng.randint(13, 60)])
    lengths = []
    for _ in range(num_seqs):
        r = rng.random()
        if r < 0.3:  # Lq > Lk
            lk = _length(rng)
            lq = lk + rng.choice([1, 2, rng.randint(3, 40)])
        elif r < 0.55:
            lq = lk = _length(rng)
        elif r < 0.85:  # Lq < Lk: a prefix / cache
            lq = rng.choice([1, _length(rng)])
            lk = lq + rng.randint(0, 150)
        else:
            lq, lk = _length(rng), _length(rng)
        lengths.append((lq, lk))
    kv_heads = rng.choice([1, 1, 2, 3])
    q_heads = kv_heads * rng.choice([1, 1, 2, 3, 4])
    head_dim = rng.choice([rng.randint(1, 9), rng.randint(1, 9), rng.randint(10, 40),
                           rng.choice([32, 63, 64, 65, 128])])

    def work():
        return q_heads * head_dim * sum(a * b for a, b in lengths)

    while work() > max_work and head_dim > 4:
        head_dim = max(4, head_dim // 2)
    while work() > max_work:
        lengths = [(a * 3 // 4, b * 3 // 4) for a, b in lengths]
    span = max((a + b for a, b in lengths), default=1)
    causal = rng.random() < 0.25
    window = (_window_side(rng, span), _window_side(rng, span))
    dilation = 1 if rng.random() < 0.55 else rng.randint(2, 7)
    density = rng.choice([None, None, None, 0.0, rng.uniform(0.01, 0.1), rng.uniform(0.3, 0.9), 1.0])
    alibi = rng.choices(["none", "heads", "per_seq"], [50, 25, 25])[0]
    score = "softmax" if rng.random() < 0.65 else "sigmoid"
    sigmoid_bias = round(rng.uniform(-6.0, 2.0), 3) if score == "sigmoid" and rng.random() < 0.5 else None
    softcap = None if rng.random() < 0.7 else rng.choice([0.5, 2.0, 5.0, 20.0])
    scale = None if rng.random() < 0.7 else rng.uniform(-2.0, 3.0) * head_dim ** -0.5
    options = dict(window=window, causal=causal, dilation=dilation, score=score, sigmoid_bias=sigmoid_bias,
                   softcap=softcap, scale=scale, return_lse=score == "softmax" and rng.random() < 0.7)
    layouts = tuple("contiguous" if rng.random() < 0.6 else rng.choice(LAYOUTS) for _ in range(3))
    return Problem(lengths, q_heads, kv_heads, head_dim, dtype, options, density, alibi,
                   learn_slopes=rng.random() < 0.7, cu_dtype=rng.choice([torch.int32, torch.int64]),
                   layouts=layouts, max_slack=(rng.choice([0, 0, 0, 5]), rng.choice([0, 0, 0, 7])), seed=seed)


def problem_id(p: Problem) -> str:
    lq, lk = sum(a for a, _ in p.lengths), sum(b for _, b in p.lengths)
    return (f"s{p.seed}-{DTYPE_NAMES[p.dtype]}-N{len(p.lengths)}-T{lq}x{lk}-H{p.q_heads}x{p.kv_heads}"
            f"-D{p.head_dim}")


SEEDS = list(range(DEFAULT_CASES))
if extended_tests_enabled():
    SEEDS += list(range(FIRST_EXTENDED_SEED, FIRST_EXTENDED_SEED + EXTENDED_CASES))
PROBLEMS = [draw_problem(seed) for seed in SEEDS]


@pytest.mark.parametrize("problem", PROBLEMS, ids=problem_id)
def test_matches_reference_randomized(problem, device):
    skip_without_kernels(device)
    run_problem(problem, device)


def test_generator_covers_the_corners():
    problems = [draw_problem(seed) for seed in range(DEFAULT_CASES)]
    n = len(problems)

    def share(pred) -> float:
        return sum(1 for p in problems if pred(p)) / n

    seqs = lambda pred: lambda p: any(pred(a, b) for a, b in p.lengths)  # noqa: E731
    assert share(lambda p: len(p.lengths) == 1) >= 0.1
    assert share(lambda p: len(p.lengths) >= 5) >= 0.15
    assert share(seqs(lambda a, b: a > b)) >= 0.3
    assert share(seqs(lambda a, b: a < b)) >= 0.3
    assert share(seqs(lambda a, b: a == 0 or b == 0)) >= 0.2
    assert share(seqs(lambda a, b: max(a, b) > 128)) >= 0.15
    assert share(lambda p: p.dtype == torch.float64) >= 0.45
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert share(lambda p: p.dtype == dtype) >= 0.05, dtype
    for alibi in ("heads", "per_seq"):
        assert share(lambda p: p.alibi == alibi and p.learn_slopes) >= 0.1, alibi
    assert share(lambda p: p.global_density) >= 0.2
    assert share(lambda p: p.options["score"] == "sigmoid") >= 0.2
    assert share(lambda p: p.options["dilation"] > 1) >= 0.25
    assert share(lambda p: p.options["causal"]) >= 0.15
    assert share(lambda p: p.options["return_lse"]) >= 0.3
    assert share(lambda p: p.cu_dtype == torch.int64) >= 0.3
    assert share(lambda p: p.max_slack != (0, 0)) >= 0.2
    assert share(lambda p: p.layouts != ("contiguous",) * 3) >= 0.4
    assert share(lambda p: p.kv_heads == 1 and p.q_heads > 1) >= 0.1
    assert share(lambda p: 1 < p.kv_heads < p.q_heads) >= 0.1


# ----------------------------------------------------------------------------- the batched op


def pack(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, D) -> (B * L, H, D)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


EQUAL_LENGTHS = [
    # (id, (B, Hq, Hk, Lq, Lk, D), options, global mask, alibi: none | heads | batch)
    ("plain", (3, 2, 2, 20, 20, 8), dict(), False, "none"),
    ("causal_gqa_prefix", (2, 4, 2, 7, 30, 16), dict(window=(5, 0), causal=True), False, "batch"),
    ("q_longer_globals", (3, 2, 1, 40, 9, 8), dict(window=(2, 3), dilation=2), True, "heads"),
    ("long", (2, 2, 2, 130, 130, 32), dict(window=(40, 10), softcap=3.0), True, "batch"),
    ("sigmoid", (4, 3, 3, 17, 17, 5), dict(score="sigmoid", window=(4, 4)), False, "heads"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,shapes,options,globals_,alibi", EQUAL_LENGTHS, ids=[c[0] for c in EQUAL_LENGTHS])
def test_equal_lengths_match_the_batched_op(name, shapes, options, globals_, alibi, dtype, device):
    skip_without_kernels(device)
    skip_unsupported_dtype(device, dtype)
    batch, hq, _, lq, lk, _ = shapes
    q, k, v = (t.requires_grad_() for t in random_qkv(*shapes, dtype, device))
    gm = (torch.rand(batch, lk, device=device) < 0.1) if globals_ else None
    slopes = None
    if alibi != "none":
        slopes = (torch.rand(batch if alibi == "batch" else 1, hq, device=device) - 0.5)
        slopes = (slopes if alibi == "batch" else slopes[0]).requires_grad_()
    lse_out = options.get("score", "softmax") == "softmax"
    want = longreach.local_attention(q, k, v, **options, global_mask=gm, alibi_slopes=slopes, return_lse=lse_out)
    want = _as_tuple(want)
    inputs = [q, k, v] + ([slopes] if slopes is not None else [])
    cots = [torch.randn_like(t) for t in want]
    want_grads = grads(want, cots, inputs)
    cu_q = torch.arange(0, batch * lq + 1, lq, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, batch * lk + 1, lk, dtype=torch.int32, device=device)
    got = _as_tuple(longreach.local_attention_varlen(
        pack(q), pack(k), pack(v), cu_q, cu_k, lq, lk, **options, global_mask=None if gm is None else gm.flatten(),
        alibi_slopes=slopes, return_lse=lse_out))
    got_cots = [pack(cots[0])] + ([cots[1].transpose(0, 1).reshape(hq, -1)] if lse_out else [])
    got_grads = grads(got, got_cots, inputs)
    tol = tight_tolerance(dtype)
    pairs = [("out", got[0], pack(want[0]))]
    if lse_out:
        pairs.append(("lse", got[1], want[1].transpose(0, 1).reshape(hq, -1)))
    pairs += list(zip(("dq", "dk", "dv", "dslopes"), got_grads, want_grads))
    for what, a, b in pairs:
        err = scaled_error(a, b)
        assert err <= (max(tol, SLOPES_TOLERANCE) if what == "dslopes" else tol), f"{what}: scaled error {err:.3g}"


def batched_per_sequence(q, k, v, cu_q, cu_k, max_q=None, max_k=None, *, global_mask=None, alibi_slopes=None,
                         return_lse=False, **options):
    """longreach.local_attention (the batched op) on each sequence alone."""
    cq, ck = cu_q.tolist(), cu_k.tolist()
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [q[:0]], [q[:0, :, 0].t().to(lse_dtype)]
    for i in range(len(cq) - 1):
        rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        res = _as_tuple(longreach.local_attention(
            *(t.transpose(0, 1)[None] for t in (q[rows], k[keys], v[keys])), **options, return_lse=return_lse,
            global_mask=None if global_mask is None else global_mask[None, keys],
            alibi_slopes=alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]))
        outs.append(res[0][0].transpose(0, 1))
        if return_lse:
            lses.append(res[1][0])
    return (torch.cat(outs), torch.cat(lses, 1)) if return_lse else torch.cat(outs)


@pytest.mark.parametrize("problem", PROBLEMS[:BATCHED_CASES], ids=problem_id)
def test_matches_the_batched_op_per_sequence(problem):
    """Every dtype, slopes included: the packed call is the batched op on each sequence, to
    rounding (in practice bit for bit, but for the order in which shared slopes' gradients are
    summed over sequences)."""
    leaves, views, cu_q, cu_k, max_q, max_k, kwargs, cotangents = build(problem)
    slopes = kwargs.pop("alibi_slopes")
    learn = slopes is not None and problem.learn_slopes
    results = []
    for fn in (longreach.local_attention_varlen, batched_per_sequence):
        inputs = [t.to(problem.dtype).requires_grad_() for t in leaves]
        s = None if slopes is None else slopes.clone().requires_grad_(learn)
        out = _as_tuple(fn(*(f(t) for f, t in zip(views, inputs)), cu_q, cu_k, max_q, max_k, alibi_slopes=s, **kwargs))
        cot = [cotangents[0].to(problem.dtype)] + [c.to(out[1].dtype) for c in cotangents[1:]]
        results.append(list(out) + list(grads(out, cot, inputs + ([s] if learn else []))))
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(problem.dtype, 2 * EPS.get(problem.dtype, 0))
    names = ["out", "lse"][: len(results[0]) - 3 - learn] + ["dq", "dk", "dv", "dslopes"][: 3 + learn]
    for name, a, b in zip(names, *results):
        err = scaled_error(a, b)
        assert err <= (max(tol, SLOPES_TOLERANCE) if name == "dslopes" else tol), \
            f"{name}: scaled error {err:.3g}\n{problem.describe()}"


# ----------------------------------------------------------------------------- gradcheck, opcheck

GRADCHECK = [
    # (id, lengths, (Hq, Hk, D), options, global density, alibi)
    ("plain", [(4, 4), (3, 5)], (2, 2, 3), dict(), None, "none"),
    ("zero_lengths_causal", [(0, 0), (5, 3), (0, 2), (2, 6), (3, 0)], (2, 1, 3), dict(window=(2, 0), causal=True),
     None, "none"),
    ("dilation_lse_alibi", [(6, 8), (4, 4)], (2, 2, 2), dict(window=(2, 1), dilation=2, return_lse=True), None,
     "per_seq"),
    ("globals_softcap", [(5, 5), (1, 6), (2, 4)], (2, 2, 3), dict(window=(1, 0), softcap=2.0, return_lse=True), 0.2,
     "heads"),
    ("sigmoid", [(3, 7), (6, 4)], (2, 1, 3), dict(score="sigmoid", window=(2, 2)), None, "none"),
]


def _gradcheck_problem(lengths, heads, options, density, alibi):
    return Problem(lengths, heads[0], heads[1], heads[2], torch.float64, options, density, alibi, learn_slopes=False)


@pytest.mark.parametrize("name,lengths,heads,options,density,alibi", GRADCHECK, ids=[c[0] for c in GRADCHECK])
def test_gradcheck(name, lengths, heads, options, density, alibi):
    leaves, _, cu_q, cu_k, max_q, max_k, kwargs, _ = build(_gradcheck_problem(lengths, heads, options, density, alibi))
    inputs = [t.requires_grad_() for t in leaves]
    fn = lambda q, k, v: longreach.local_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


def fwd_args(name, dtype=torch.float64, requires_grad=False, cu_dtype=torch.int32):
    """Positional arguments of torch.ops.longreach.local_attention_varlen_fwd for a GRADCHECK entry."""
    _, lengths, heads, options, density, alibi = next(c for c in GRADCHECK if c[0] == name)
    p = _gradcheck_problem(lengths, heads, options, density, alibi)
    p.cu_dtype = cu_dtype
    leaves, _, cu_q, cu_k, max_q, max_k, kw, _ = build(p)
    q, k, v = (t.to(dtype).requires_grad_(requires_grad) for t in leaves)
    left, right = longreach.ops.normalize_window(kw.get("window"), kw.get("causal", False))
    return (q, k, v, cu_q, cu_k, max_q, max_k, kw["global_mask"], kw["alibi_slopes"], left, right,
            kw.get("dilation", 1), kw.get("score", "softmax"), kw.get("sigmoid_bias"), float(kw.get("softcap") or 0.0),
            float(kw.get("scale") or p.head_dim ** -0.5))


OPCHECK = [("plain", torch.int32), ("zero_lengths_causal", torch.int64), ("dilation_lse_alibi", torch.int32),
           ("globals_softcap", torch.int64), ("sigmoid", torch.int32)]


@pytest.mark.parametrize("name,cu_dtype", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck_forward(name, cu_dtype):
    for dtype, requires_grad in ((torch.float32, False), (torch.float64, True)):
        torch.library.opcheck(torch.ops.longreach.local_attention_varlen_fwd.default,
                              fwd_args(name, dtype, requires_grad, cu_dtype))


@pytest.mark.parametrize("with_grad_lse", [False, True])
@pytest.mark.parametrize("name,cu_dtype", OPCHECK, ids=[c[0] for c in OPCHECK])
def test_opcheck_backward(name, cu_dtype, with_grad_lse):
    args = fwd_args(name, torch.float32, False, cu_dtype)
    out, lse = torch.ops.longreach.local_attention_varlen_fwd(*args)
    grad_lse = torch.randn_like(lse) if with_grad_lse and args[12] == "softmax" else None
    alibi_grad = args[8] is not None
    bwd_args = (torch.randn_like(out), grad_lse, *args[:3], out, lse, *args[3:], alibi_grad)
    torch.library.opcheck(torch.ops.longreach.local_attention_varlen_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    grad_out = bwd_args[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.longreach.local_attention_varlen_bwd.default, (grad_out, *bwd_args[1:]),
                          test_utils="test_autograd_registration")
    if alibi_grad:  # (num_seqs, Hq) float32, whatever the slopes' shape
        assert torch.ops.longreach.local_attention_varlen_bwd(*bwd_args)[3].shape == (args[3].shape[0] - 1,
                                                                                       args[0].shape[1])


# ----------------------------------------------------------------------------- torch.compile

COMPILE_PACKS = [[10, 20, 0, 10], [40, 0, 0, 0], [1, 1, 37, 1], [0, 0, 0, 40]]  # total 40, 4 sequences


def _varlen_loss_fn(slopes, gmask, max_q=None, max_k=None):
    def fn(q, k, v, cu_q, cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k):
        out, lse = longreach.local_attention_varlen(
            q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, window=(3, 0), causal=True, dilation=2,
            alibi_slopes=slopes, global_mask=gmask, softcap=20.0, return_lse=True)
        return out * 2.0, lse.exp()

    return fn


def _compile_inputs(lengths, device):
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in random_qkv(1, 4, 2, 40, 40, 8, torch.float32, device))
    cu = cu_seqlens(lengths).to(device)
    return [q, k, v], cu


def _check_compiled(compiled, fn, lengths, device, *extra):
    tensors, cu = _compile_inputs(lengths, device)
    a_in = [t.clone().requires_grad_() for t in tensors]
    b_in = [t.clone().requires_grad_() for t in tensors]
    got, want = compiled(*a_in, cu, cu, *extra), fn(*b_in, cu, cu, *extra)
    cot = [torch.randn_like(t) for t in want]
    for a, b, what in zip(got, want, ("out", "exp(lse)")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what} {lengths}: {m}")
    for name, ga, gb in zip(("dq", "dk", "dv"), grads(got, cot, a_in), grads(want, cot, b_in)):
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {lengths}: {m}")


def test_compile_fullgraph_no_recompile_when_cu_seqlens_change(device):
    """New cu_seqlens values at the same total length and number of sequences reuse the graph
    (fixed max_seqlen bounds, as a collator with a fixed token budget passes)."""
    skip_without_kernels(device)
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    slopes = (torch.rand(4, device=device) - 0.5)
    gmask = torch.zeros(40, dtype=torch.bool, device=device)
    gmask[[0, 25]] = True
    fn = _varlen_loss_fn(slopes, gmask, 40, 40)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for lengths in COMPILE_PACKS:
            _check_compiled(compiled, fn, lengths, device)
    assert counter.frame_count == 1


def test_compile_dynamic_max_seqlen(device):
    """With dynamic=True and max_seqlen changing with the pack, the call still compiles as one
    graph. The schema's `int max_seqlen_*` (not SymInt) specialises the graph on their values,
    so each new value compiles once more, and no more than that."""
    skip_without_kernels(device)
    import torch._dynamo
    from torch._dynamo.testing import CompileCounterWithBackend

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fn = _varlen_loss_fn(None, None)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True, dynamic=True)
    for lengths in COMPILE_PACKS[:3] + COMPILE_PACKS[:1]:
        _check_compiled(compiled, fn, lengths, device, max(lengths), max(lengths))
    # Graphs, not backend calls: with dynamic=True the first trace restarts once to
    # specialise a Python float (torch's _tensorify_python_scalars), which calls the
    # backend a second time for the same graph.
    assert counters["stats"]["unique_graphs"] <= 3


def test_compile_traces_the_registered_ops():
    import torch._dynamo
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    recorder = EagerAndRecordGraphs()
    tensors, cu = _compile_inputs(COMPILE_PACKS[0], "cpu")
    torch.compile(_varlen_loss_fn(None, None, 40, 40), backend=recorder, fullgraph=True)(*tensors, cu, cu)
    code = recorder.graphs[0].code
    assert "longreach.local_attention_varlen_fwd" in code, code


def test_compile_inductor_matches_eager():
    import torch._dynamo

    torch._dynamo.reset()
    fn = _varlen_loss_fn(torch.rand(4) - 0.5, None, 40, 40)
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    _check_compiled(compiled, fn, COMPILE_PACKS[0], "cpu")


# ----------------------------------------------------------------------------- torch.func, higher derivatives


def _small(requires_grad=False):
    p = Problem([(3, 4), (0, 2), (4, 3)], 2, 1, 3, torch.float64, dict(window=(2, 1), softcap=3.0))
    leaves, _, cu_q, cu_k, max_q, max_k, kwargs, _ = build(p)
    fn = lambda q, k, v: longreach.local_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)  # noqa: E731
    ref = lambda q, k, v: reference.local_attention_varlen(q, k, v, cu_q, cu_k, **kwargs)  # noqa: E731
    return [t.requires_grad_(requires_grad) for t in leaves], fn, ref


def test_double_backward_raises():
    (q, k, v), fn, _ = _small(requires_grad=True)
    (grad_q,) = torch.autograd.grad(fn(q, k, v).pow(2).sum(), q, create_graph=True)
    with pytest.raises(NotImplementedError, match=r"local_attention_varlen: double backward .* not supported"):
        torch.autograd.grad(grad_q.sum(), (q, k, v))


@pytest.mark.parametrize("how", ["jvp", "forward_ad"])
def test_forward_mode_raises(how):
    (q, k, v), fn, _ = _small()
    with pytest.raises(NotImplementedError, match=r"local_attention_varlen: forward-mode AD .* not supported"):
        if how == "jvp":
            torch.func.jvp(lambda q: fn(q, k, v), (q,), (torch.ones_like(q),))
        else:
            with forward_ad.dual_level():
                fn(forward_ad.make_dual(q, torch.ones_like(q)), k, v)


def test_torch_func_reverse_mode_matches_reference():
    (q, k, v), fn, ref = _small()
    loss = lambda f: lambda q, k, v: f(q, k, v).pow(2).sum()  # noqa: E731
    for a, b in zip(torch.func.grad(loss(fn), argnums=(0, 1, 2))(q, k, v),
                    torch.func.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_slope_gradient_of_shared_slopes_is_the_sum_over_sequences():
    """(Hq,) slopes get the sum of the (num_seqs, Hq) gradient that per-sequence slopes get."""
    p = Problem([(5, 7), (0, 3), (6, 6), (4, 1)], 2, 2, 4, torch.float64, dict(window=(3, 1), return_lse=True))
    leaves, _, cu_q, cu_k, max_q, max_k, kwargs, _ = build(p)
    del kwargs["alibi_slopes"]
    shared = (torch.rand(2) - 0.5).requires_grad_()
    per_seq = shared.detach().expand(4, 2).clone().requires_grad_()
    for slopes in (shared, per_seq):
        out, lse = longreach.local_attention_varlen(*leaves, cu_q, cu_k, max_q, max_k, alibi_slopes=slopes, **kwargs)
        (out.sum() + lse.sum()).backward()
    assert per_seq.grad[1].abs().max() == 0  # the sequence without rows
    torch.testing.assert_close(shared.grad, per_seq.grad.sum(0), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- bad input

TQ, TK = 10, 12
Qb, Kb, Vb = torch.randn(TQ, 4, 8), torch.randn(TK, 2, 8), torch.randn(TK, 2, 8)
CUQ, CUK = torch.tensor([0, 3, 10], dtype=torch.int32), torch.tensor([0, 6, 12], dtype=torch.int32)


def call(q=Qb, k=Kb, v=Vb, cu_q=CUQ, cu_k=CUK, max_q=7, max_k=6, **kwargs):
    return longreach.local_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)


CU = r"a 1-D int32 or int64 tensor of shape \(num_seqs \+ 1,\)"
GM = r"a bool tensor of shape \(total_k,\) = \(12,\) or None"
AL = r"a float32 tensor of shape \(Hq,\) = \(4,\) or \(num_seqs, Hq\) = \(2, 4\), or None"

# (id, call arguments, exception type, message regex after "local_attention_varlen: ")
BAD_METADATA = [
    ("q_rank_4", dict(q=Qb[None]), ValueError, r"q must be a 3-D tensor \(total_q, Hq, D\), got shape \(1, 10, 4, 8\)"),
    ("k_rank_2", dict(k=Kb[:, 0]), ValueError, r"k must be a 3-D tensor \(total_k, Hk, D\), got shape \(12, 8\)"),
    ("v_rank_4", dict(v=Vb[None]), ValueError, r"v must be a 3-D tensor \(total_k, Hk, D\), got shape \(1, 12, 2, 8\)"),
    ("q_numpy", dict(q=Qb.numpy()), TypeError, r"q must be a tensor, got .*\(ndarray\)"),
    ("head_dim_0", dict(q=Qb[..., :0], k=Kb[..., :0], v=Vb[..., :0]), ValueError,
     r"q and k must have one head dim D >= 1, got q \(10, 4, 0\) and k \(12, 2, 0\)"),
    ("head_dim", dict(k=Kb[..., :4], v=Vb[..., :4]), ValueError,
     r"q and k must have one head dim D >= 1, got q \(10, 4, 8\) and k \(12, 2, 4\)"),
    ("mixed_dtype", dict(k=Kb.double()), TypeError,
     r"q, k and v must share one dtype, got q torch.float32, k torch.float64, v torch.float32"),
    ("int_dtype", dict(q=Qb.int(), k=Kb.int(), v=Vb.int()), TypeError,
     r"q has dtype torch.int32; expected float32, float64, bfloat16 or float16"),
    ("kv_shape", dict(v=Vb[:, :1]), ValueError,
     r"k and v must have the same shape, got k \(12, 2, 8\) and v \(12, 1, 8\)"),
    ("heads_not_multiple", dict(k=torch.randn(TK, 3, 8), v=torch.randn(TK, 3, 8)), ValueError,
     r"the number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("no_kv_heads", dict(k=Kb[:, :0], v=Vb[:, :0]), ValueError, r"the number of query heads \(4\) must be a multiple"),
    ("k_meta", dict(k=Kb.to("meta")), ValueError, r"k is on meta but q is on cpu"),
    ("cu_q_list", dict(cu_q=[0, 3, 10]), TypeError, r"cu_seqlens_q must be " + CU + r", got \[0, 3, 10\] \(list\)"),
    ("cu_q_2d", dict(cu_q=CUQ[None]), ValueError,
     r"cu_seqlens_q must be " + CU + r", got a torch.int32 tensor of shape \(1, 3\)"),
    ("cu_q_0d", dict(cu_q=CUQ[0]), ValueError,
     r"cu_seqlens_q must be " + CU + r", got a torch.int32 tensor of shape \(\)"),
    ("cu_k_empty", dict(cu_k=CUK[:0]), ValueError, r"cu_seqlens_k must be " + CU + r", got a torch.int32 tensor of "
     r"shape \(0,\)"),
    ("cu_k_float", dict(cu_k=CUK.float()), TypeError, r"cu_seqlens_k must be " + CU + r", got a torch.float32 tensor"),
    ("cu_q_int16", dict(cu_q=CUQ.short()), TypeError, r"cu_seqlens_q must be " + CU + r", got a torch.int16 tensor"),
    ("cu_q_bool", dict(cu_q=CUQ > 0), TypeError, r"cu_seqlens_q must be " + CU + r", got a torch.bool tensor"),
    ("cu_k_meta", dict(cu_k=CUK.to("meta")), ValueError,
     r"cu_seqlens_k is on meta but q is on cpu; all tensor arguments must be on one device"),
    ("cu_q_meta", dict(cu_q=CUQ.to("meta")), ValueError, r"cu_seqlens_q is on meta but q is on cpu"),
    ("num_seqs_differ", dict(cu_k=torch.tensor([0, 6, 6, 12], dtype=torch.int32)), ValueError,
     r"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got 2 \(shape \(3,\)\) and 3 "
     r"\(shape \(4,\)\)"),
    ("max_q_negative", dict(max_q=-1), ValueError, r"max_seqlen_q must be an int >= 0, got -1"),
    ("max_k_float", dict(max_k=6.0), TypeError, r"max_seqlen_k must be an int >= 0, got 6.0"),
    ("max_k_tensor", dict(max_k=torch.tensor(6)), TypeError, r"max_seqlen_k must be an int >= 0, got a torch.int64"),
    ("max_q_huge", dict(max_q=2**63), ValueError, r"max_seqlen_q must be at most 2\*\*63 - 1"),
    ("global_mask_short", dict(global_mask=torch.zeros(11, dtype=torch.bool)), ValueError,
     r"global_mask must be " + GM + r", got a torch.bool tensor of shape \(11,\)"),
    ("global_mask_2d", dict(global_mask=torch.zeros(1, 12, dtype=torch.bool)), ValueError,
     r"global_mask must be " + GM + r", got a torch.bool tensor of shape \(1, 12\)"),
    ("global_mask_per_query", dict(global_mask=torch.zeros(10, dtype=torch.bool)), ValueError,
     r"global_mask must be " + GM + r", got a torch.bool tensor of shape \(10,\)"),
    ("global_mask_float", dict(global_mask=torch.zeros(12)), TypeError,
     r"global_mask must be " + GM + r", got a torch.float32 tensor of shape \(12,\)"),
    ("global_mask_list", dict(global_mask=[True] * 12), TypeError, r"global_mask must be " + GM + r", got .*\(list\)"),
    ("global_mask_meta", dict(global_mask=torch.zeros(12, dtype=torch.bool, device="meta")), ValueError,
     r"global_mask is on meta but q is on cpu"),
    ("alibi_heads", dict(alibi_slopes=torch.zeros(5)), ValueError, r"alibi_slopes must be " + AL +
     r", got a torch.float32 tensor of shape \(5,\)"),
    ("alibi_kv_heads", dict(alibi_slopes=torch.zeros(2)), ValueError, r"alibi_slopes must be " + AL),
    ("alibi_seqs", dict(alibi_slopes=torch.zeros(3, 4)), ValueError, r"alibi_slopes must be " + AL +
     r", got a torch.float32 tensor of shape \(3, 4\)"),
    ("alibi_3d", dict(alibi_slopes=torch.zeros(2, 4, 1)), ValueError, r"alibi_slopes must be " + AL),
    ("alibi_float64", dict(alibi_slopes=torch.zeros(4, dtype=torch.float64)), TypeError,
     r"alibi_slopes must be " + AL + r", got a torch.float64 tensor of shape \(4,\)"),
    ("alibi_meta", dict(alibi_slopes=torch.zeros(4, device="meta")), ValueError, r"alibi_slopes is on meta"),
    ("alibi_float", dict(alibi_slopes=0.5), TypeError, r"alibi_slopes must be " + AL + r", got 0.5 \(float\)"),
    # the options shared with local_attention name this function
    ("window", dict(window=(-1, 0)), ValueError, r"window left must be a non-negative int or None, got -1"),
    ("causal_str", dict(causal="yes"), TypeError, r"causal must be a bool"),
    ("lse_sigmoid", dict(score="sigmoid", return_lse=True), ValueError, r"return_lse=True is only defined for"),
    ("dilation_0", dict(dilation=0), ValueError, r"dilation must be an int >= 1, got 0"),
    ("sigmoid_bias_softmax", dict(sigmoid_bias=1.0), ValueError, r"sigmoid_bias is only used with score='sigmoid'"),
]


@pytest.mark.parametrize("name,args,error,match", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_bad_metadata_raises_naming_it(name, args, error, match):
    with pytest.raises(error, match=r"^local_attention_varlen: " + match):
        call(**args)


def _cu(*values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


# Values only the kernels read: (id, call arguments, the argument the message must name)
BAD_VALUES = [
    ("cu_q_not_from_0", dict(cu_q=_cu(1, 3, 10)), "cu_seqlens_q"),
    ("cu_k_not_from_0", dict(cu_k=_cu(2, 6, 12, dtype=torch.int64)), "cu_seqlens_k"),
    ("cu_q_decreasing", dict(cu_q=_cu(0, 8, 5, 10), cu_k=_cu(0, 6, 6, 12), max_q=10), "cu_seqlens_q"),
    ("cu_k_decreasing", dict(cu_k=_cu(0, 7, 5, dtype=torch.int64), max_k=12), "cu_seqlens_k"),
    ("cu_q_negative", dict(cu_q=_cu(0, -3, 10), max_q=20), "cu_seqlens_q"),
    ("cu_q_short_total", dict(cu_q=_cu(0, 3, 9)), "cu_seqlens_q"),
    ("cu_q_past_total", dict(cu_q=_cu(0, 3, 11), max_q=8), "cu_seqlens_q"),
    ("cu_k_past_total", dict(cu_k=_cu(0, 6, 13), max_k=7), "cu_seqlens_k"),
    ("cu_k_huge", dict(cu_k=_cu(0, 2**40, 12, dtype=torch.int64), max_k=2**41), "cu_seqlens_k"),
    ("cu_k_int32_max", dict(cu_k=_cu(0, 2**31 - 1, 12), max_k=2**31), "cu_seqlens_k"),
    ("max_q_too_small", dict(max_q=6), "max_seqlen_q"),
    ("max_k_too_small", dict(max_k=5), "max_seqlen_k"),
    ("max_q_zero", dict(max_q=0), "max_seqlen_q"),
]


@pytest.mark.parametrize("name,args,names", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_bad_values_raise_naming_them(name, args, names):
    with pytest.raises(ValueError, match=names):
        call(**args)
    with pytest.raises(ValueError, match=names):  # and with the gradient path
        call(q=Qb.clone().requires_grad_(), **args)


def test_valid_edge_values_are_accepted():
    """cu_seqlens int64 and int32 mixed, max_seqlen above the longest sequence, no sequence."""
    out = call(cu_k=CUK.long(), max_q=100, max_k=2**40)
    torch.testing.assert_close(out, call())
    empty = call(q=Qb[:0], k=Kb[:0], v=Vb[:0], cu_q=CUQ[:1], cu_k=CUK[:1], max_q=0, max_k=0)
    assert empty.shape == (0, 4, 8)


def test_public_name():
    assert longreach.local_attention_varlen is longreach.ops.local_attention_varlen
    assert "local_attention_varlen" in longreach.__all__
