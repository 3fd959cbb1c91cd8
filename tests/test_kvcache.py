"""local_attention_with_kvcache: every cache layout against recomputing the full attention over
the whole history, token by token (rings wrapping several times, shuffled page tables, rows of
different lengths), split-KV, sinks, dtypes, compile, and bad input that leaves the cache intact."""

from __future__ import annotations

import math

import pytest
import torch

import longreach
from longreach import reference

DEVICE = "cpu"

# Against the float64 oracle: float32 kernels to rounding, 16-bit inputs up to the output's rounding.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def tolerances(dtype):
    return TOLERANCE[dtype], TOLERANCE[dtype]


# --------------------------------------------------------------------------------- oracle --

def dense_attention(q, k, v, *, window=(None, None), causal=False, dilation=1, alibi_slopes=None, score="softmax",
                    sigmoid_bias=None, softcap=None, scale=None, sink_tokens=0, sinks=None):
    """q (Hq, Lq, D) against the whole history k, v (Hk, T, D), rows bottom-right aligned, written
    out densely: the window from reference.allowed_keys, sink tokens, soft-cap, ALiBi, and the sink
    logits as an extra softmax column with a zero value. Returns (out, lse) in float64."""
    q, k, v = (t.double() for t in (q, k, v))
    hq, lq, d = q.shape
    hk, t_len = k.shape[0], k.shape[1]
    k = k.repeat_interleave(hq // hk, 0)
    v = v.repeat_interleave(hq // hk, 0)
    scale = d ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(lq) + t_len - lq
    keys = torch.arange(t_len)
    if alibi_slopes is not None:
        s = s - alibi_slopes.double()[:, None, None] * (pos[:, None] - keys[None, :]).abs().double()
    allowed = reference.allowed_keys(lq, t_len, window, causal, dilation)[0]
    allowed = allowed | ((keys[None, :] < sink_tokens) & (keys[None, :] <= pos[:, None]))
    if score == "sigmoid":
        bias = reference.default_sigmoid_bias(t_len, window, causal) if sigmoid_bias is None else sigmoid_bias
        w = torch.where(allowed, torch.sigmoid(s + bias), torch.zeros(()).double())
        return w @ v, torch.zeros(hq, lq).double()
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.double()[:, None, None].expand(hq, lq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(lse.isinf(), torch.zeros(()).double(), lse)[..., None])
    return p[..., :t_len] @ v, lse


def test_the_oracle_is_the_reference_without_sinks():
    torch.manual_seed(0)
    q, k, v = torch.randn(4, 3, 8).double(), torch.randn(2, 20, 8).double(), torch.randn(2, 20, 8).double()
    slopes = torch.tensor([0.3, -0.2, 0.1, 0.05])
    for opts in ({"window": (5, 0), "dilation": 2, "alibi_slopes": slopes, "softcap": 2.0},
                 {"window": (None, None), "score": "sigmoid"}, {"window": (3, 2)}):
        out, _ = dense_attention(q, k, v, **opts)
        ref = reference.local_attention(q[None], k[None], v[None], **opts)[0]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- cache fixtures --

class Cache:
    """A cache of one layout plus the full history it should hold (the truth the test keeps)."""

    def __init__(self, layout, B, Hk, D, capacity, dtype, *, sink_tokens=0, block_size=16, seed=0):
        self.layout, self.B, self.Hk, self.D = layout, B, Hk, D
        self.sink_tokens, self.block_size, self.capacity = sink_tokens, block_size, capacity
        self.history_k = [torch.zeros(Hk, 0, D, dtype=dtype) for _ in range(B)]
        self.history_v = [torch.zeros(Hk, 0, D, dtype=dtype) for _ in range(B)]
        g = torch.Generator().manual_seed(seed)
        if layout == "paged":
            max_blocks = -(-capacity // block_size)
            num_blocks = B * max_blocks + 3  # some blocks no row uses
            # Garbage in unused slots must never be read.
            self.k = torch.full((num_blocks, block_size, Hk, D), float("nan"), dtype=dtype)
            self.v = torch.full((num_blocks, block_size, Hk, D), float("nan"), dtype=dtype)
            self.block_table = torch.randperm(num_blocks, generator=g)[:B * max_blocks].view(B, max_blocks).to(torch.int32)
        else:
            self.k = torch.full((B, Hk, capacity, D), float("nan"), dtype=dtype)
            self.v = torch.full((B, Hk, capacity, D), float("nan"), dtype=dtype)
            self.block_table = None
        self.seqlens = torch.zeros(B, dtype=torch.int32)

    def slot(self, j):  # written independently of csrc/common/kv_cache.h
        if self.layout == "rolling" and j >= self.sink_tokens:
            return self.sink_tokens + (j - self.sink_tokens) % (self.capacity - self.sink_tokens)
        return j

    def prefill(self, b, k, v):
        """Writes the history of row b by hand (through the test's own slot formula)."""
        n = k.shape[1]
        for j in range(n):
            s = self.slot(j)
            if self.layout == "paged":
                blk = int(self.block_table[b, s // self.block_size])
                self.k[blk, s % self.block_size] = k[:, j]
                self.v[blk, s % self.block_size] = v[:, j]
            else:
                self.k[b, :, s] = k[:, j]
                self.v[b, :, s] = v[:, j]
        self.history_k[b], self.history_v[b] = k, v
        self.seqlens[b] = n

    def step(self, q, k, v, **opts):
        softmax = opts.get("score", "softmax") == "softmax"
        result = longreach.local_attention_with_kvcache(
            q, self.k, self.v, k, v, cache_seqlens=self.seqlens, block_table=self.block_table,
            rolling=self.layout == "rolling", sink_tokens=self.sink_tokens, return_lse=softmax, **opts)
        out, lse = result if softmax else (result, None)
        for b in range(self.B):
            self.history_k[b] = torch.cat([self.history_k[b], k[b]], 1)
            self.history_v[b] = torch.cat([self.history_v[b], v[b]], 1)
        self.seqlens += q.shape[2]
        return out, lse


LAYOUTS = [("contiguous", {}), ("rolling", {}), ("paged", {"block_size": 16}), ("paged", {"block_size": 256})]

CONFIGS = {
    "causal-window-gqa": dict(window=(12, 0)),
    "alibi-softcap": dict(window=(9, 0), softcap=3.0, alibi=True),
    "dilated": dict(window=(5, 0), dilation=3),
    "sigmoid": dict(window=(10, 0), score="sigmoid"),
    "sinks-and-sink-tokens": dict(window=(6, 0), sink_tokens=3, sinks=True),
}


def _run_decode(layout, layout_opts, config, steps, new_tokens=1, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    B, Hq, Hk, D = 3, 4, 2, 16
    opts = dict(config)
    use_alibi = opts.pop("alibi", False)
    use_sinks = opts.pop("sinks", False)
    sink_tokens = opts.pop("sink_tokens", 0)
    left = opts["window"][0]
    dilation = opts.get("dilation", 1)
    if layout == "rolling":
        capacity = longreach.ops.rolling_cache_capacity(left, new_tokens, dilation, sink_tokens)
    else:
        capacity = 40 + steps * new_tokens
    cache = Cache(layout, B, Hk, D, capacity, dtype, sink_tokens=sink_tokens, seed=seed, **layout_opts)
    for b, n in enumerate((0, 5, 17)):  # rows of different lengths
        cache.prefill(b, torch.randn(Hk, n, D, dtype=dtype), torch.randn(Hk, n, D, dtype=dtype))
    slopes = torch.tensor([0.25, -0.125, 0.5, 0.0625]) if use_alibi else None
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0]) if use_sinks else None
    worst = 0.0
    for step in range(steps):
        q = torch.randn(B, Hq, new_tokens, D, dtype=dtype)
        k = torch.randn(B, Hk, new_tokens, D, dtype=dtype)
        v = torch.randn(B, Hk, new_tokens, D, dtype=dtype)
        out, lse = cache.step(q, k, v, alibi_slopes=slopes, sinks=sinks, **opts)
        for b in range(B):
            ref, ref_lse = dense_attention(q[b], cache.history_k[b], cache.history_v[b], alibi_slopes=slopes,
                                           sinks=sinks, sink_tokens=sink_tokens, **opts)
            rtol, atol = tolerances(dtype)
            torch.testing.assert_close(out[b].double(), ref, rtol=rtol, atol=atol,
                                       msg=lambda m: f"step {step}, row {b}: {m}")
            if lse is not None:
                torch.testing.assert_close(lse[b].double(), ref_lse, rtol=rtol, atol=atol)
            worst = max(worst, (out[b].double() - ref).abs().max().item())
    return cache, worst


@pytest.mark.parametrize("layout, layout_opts", LAYOUTS, ids=["contiguous", "rolling", "paged16", "paged256"])
def test_200_decode_steps_match_the_full_recompute(layout, layout_opts):
    cache, _ = _run_decode(layout, layout_opts, CONFIGS["causal-window-gqa"], steps=200)
    if layout == "rolling":  # the ring wrapped several times and stayed O(window)
        assert int(cache.seqlens.max()) > 5 * cache.capacity
        assert cache.k.shape[2] == cache.capacity == 13


@pytest.mark.parametrize("layout, layout_opts", LAYOUTS, ids=["contiguous", "rolling", "paged16", "paged256"])
@pytest.mark.parametrize("config", [c for c in CONFIGS if c != "causal-window-gqa"])
def test_decode_options_match_the_full_recompute(layout, layout_opts, config):
    _run_decode(layout, layout_opts, CONFIGS[config], steps=60)


@pytest.mark.parametrize("layout, layout_opts", LAYOUTS[:3], ids=["contiguous", "rolling", "paged16"])
def test_several_new_tokens_per_step(layout, layout_opts):
    # Speculative decoding / chunked prefill: Lq = 3 new rows a step, with dilation and sinks.
    _run_decode(layout, layout_opts, dict(window=(7, 0), dilation=2, sink_tokens=2, sinks=True), steps=40,
                new_tokens=3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype):
    _run_decode("paged", {"block_size": 16}, dict(window=(9, 0), alibi=True, sinks=True), steps=30, dtype=dtype)


def test_bidirectional_window_sees_every_key_up_to_the_newest():
    # Non-causal windows: a row's right side reaches at most the newest key.
    _run_decode("contiguous", {}, dict(window=(4, 3)), steps=30, new_tokens=2)


def test_sinks_with_no_keys_give_zeros_and_the_sink_lse():
    q = torch.randn(1, 2, 1, 8)
    kc = torch.zeros(1, 1, 4, 8)
    sinks = torch.tensor([0.7, -3.0])
    out, lse = longreach.local_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=0, sinks=sinks,
                                                      return_lse=True)
    assert (out == 0).all()
    torch.testing.assert_close(lse[0, :, 0], sinks)
    out, lse = longreach.local_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=0, return_lse=True)
    assert (out == 0).all() and (lse == float("-inf")).all()


@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64])
def test_split_kv_equals_one_split(splits):
    torch.manual_seed(1)
    q = torch.randn(2, 8, 1, 32)
    kc, vc = torch.randn(2, 2, 3000, 32), torch.randn(2, 2, 3000, 32)
    seqlens = torch.tensor([2999, 1234], dtype=torch.int32)
    sinks = torch.randn(8)
    kw = dict(cache_seqlens=seqlens, window=(2000, 0), sinks=sinks, sink_tokens=4, return_lse=True)
    one, one_lse = longreach.local_attention_with_kvcache(q, kc, vc, num_splits=1, **kw)
    out, lse = longreach.local_attention_with_kvcache(q, kc, vc, num_splits=splits, **kw)
    torch.testing.assert_close(out, one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, one_lse, rtol=1e-6, atol=1e-6)
    for b in range(2):
        n = int(seqlens[b])
        ref, ref_lse = dense_attention(q[b], kc[b, :, :n], vc[b, :, :n], window=(2000, 0), sinks=sinks, sink_tokens=4)
        torch.testing.assert_close(out[b].double(), ref, rtol=1e-5, atol=1e-5)


def test_no_new_keys_attends_over_the_cache_only():
    torch.manual_seed(2)
    q = torch.randn(2, 2, 3, 8)
    kc, vc = torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8)
    seqlens = torch.tensor([20, 2], dtype=torch.int32)  # row 1: more query rows than keys
    out = longreach.local_attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, window=(4, 0))
    for b in range(2):
        n = int(seqlens[b])
        ref = reference.local_attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], window=(4, 0))
        torch.testing.assert_close(out[b:b + 1], ref)


def test_the_new_keys_land_in_their_slots_and_nothing_else_changes():
    kc, vc = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)
    before_k, before_v = kc.clone(), vc.clone()
    k, v = torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4)
    longreach.local_attention_with_kvcache(torch.randn(2, 2, 2, 4), kc, vc, k, v,
                                           cache_seqlens=torch.tensor([3, 8], dtype=torch.int32))
    before_k[0, :, 3:5], before_v[0, :, 3:5] = k[0], v[0]
    before_k[1, :, 8:10], before_v[1, :, 8:10] = k[1], v[1]
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


def test_compiled_decode_step_appends_and_matches_eager():
    torch.manual_seed(3)

    def step(q, kc, vc, k, v, seqlens):
        return longreach.local_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, window=(6, 0))

    kc, vc = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    kc2, vc2 = kc.clone(), vc.clone()
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    seqlens = torch.tensor([4, 9], dtype=torch.int32)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(q, kc, vc, k, v, seqlens)
    eager = step(q, kc2, vc2, k, v, seqlens)
    torch.testing.assert_close(out, eager)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_opcheck():
    kc, vc = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    args = (torch.randn(2, 4, 1, 8), kc, vc, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8),
            torch.tensor([4, 9], dtype=torch.int32), None, None, None, 6, 0, 1, "softmax", None, 0.0, 0.35, 0, False, 0)
    torch.library.opcheck(torch.ops.longreach.local_attention_kvcache_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_forward_only():
    q = torch.randn(1, 1, 1, 4, requires_grad=True)
    kc = torch.zeros(1, 1, 4, 4)
    with pytest.raises(NotImplementedError, match="forward only"):
        longreach.local_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=1)
    with torch.no_grad():
        longreach.local_attention_with_kvcache(q, kc, kc.clone(), cache_seqlens=1)


# ------------------------------------------------------------------------------ bad input --

def _bad(case):
    """A valid call of each layout, then one argument made wrong."""
    B, Hq, Hk, D = 2, 4, 2, 8
    q = torch.randn(B, Hq, 1, D)
    kw = dict(k=torch.randn(B, Hk, 1, D), v=torch.randn(B, Hk, 1, D), cache_seqlens=torch.tensor([3, 5], dtype=torch.int32),
              window=(4, 0))
    kc, vc = torch.randn(B, Hk, 8, D), torch.randn(B, Hk, 8, D)
    if case.startswith("paged"):
        kc, vc = torch.randn(6, 4, Hk, D), torch.randn(6, 4, Hk, D)
        kw["block_table"] = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    if case.startswith("rolling"):
        kw["rolling"] = True
    changes = {
        "seqlens-beyond-capacity": dict(cache_seqlens=torch.tensor([3, 8], dtype=torch.int32)),
        "seqlens-negative": dict(cache_seqlens=torch.tensor([3, -1], dtype=torch.int32)),
        "seqlens-int64": dict(cache_seqlens=torch.tensor([3, 5])),
        "seqlens-shape": dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)),
        "new-length-differs": dict(k=torch.randn(B, Hk, 2, D), v=torch.randn(B, Hk, 2, D)),
        "new-k-only": dict(v=None),
        "cache-dtype": "dtype",
        "cache-layout": "layout",
        "sinks-shape": dict(sinks=torch.zeros(3)),
        "sinks-sigmoid": dict(sinks=torch.zeros(Hq), score="sigmoid"),
        "sink-tokens-negative": dict(sink_tokens=-1),
        "paged-out-of-range": dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 6]], dtype=torch.int32),
                                   cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)),
        "paged-repeated": dict(block_table=torch.tensor([[0, 1, 0], [3, 4, 5]], dtype=torch.int32),
                               cache_seqlens=torch.tensor([8, 5], dtype=torch.int32)),
        "paged-beyond-table": dict(cache_seqlens=torch.tensor([3, 12], dtype=torch.int32)),
        "paged-table-dtype": dict(block_table=torch.tensor([[0, 1, 2], [3, 4, 5]])),
        "rolling-too-small": dict(window=(8, 0)),
        "rolling-unbounded": dict(window=(None, 0)),
        "num-splits-negative": dict(num_splits=-2),
    }[case.split(":")[1]]
    if changes == "dtype":
        kc, vc = kc.double(), vc.double()
    elif changes == "layout":
        kc, vc = kc[:, :, :, :4], vc[:, :, :, :4]
    else:
        kw.update(changes)
    return q, kc, vc, {k: v for k, v in kw.items() if not (k in ("k", "v") and v is None and "k" in changes)}


BAD = ["contiguous:seqlens-beyond-capacity", "contiguous:seqlens-negative", "contiguous:seqlens-int64",
       "contiguous:seqlens-shape", "contiguous:new-length-differs", "contiguous:new-k-only", "contiguous:cache-dtype",
       "contiguous:cache-layout", "contiguous:sinks-shape", "contiguous:sinks-sigmoid",
       "contiguous:sink-tokens-negative", "contiguous:num-splits-negative", "paged:paged-out-of-range",
       "paged:paged-repeated", "paged:paged-beyond-table", "paged:paged-table-dtype", "rolling:rolling-too-small",
       "rolling:rolling-unbounded"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_rejected_and_the_cache_is_unchanged(case):
    q, kc, vc, kw = _bad(case)
    k_before, v_before = kc.clone(), vc.clone()
    with pytest.raises((ValueError, TypeError)) as info:
        longreach.local_attention_with_kvcache(q, kc, vc, **kw)
    message = str(info.value)
    assert "local_attention_with_kvcache" in message or "local_attention" in message, message
    assert torch.equal(kc.nan_to_num(), k_before.nan_to_num()) and torch.equal(vc.nan_to_num(), v_before.nan_to_num())


def test_bad_input_messages_name_the_argument():
    for case, name in (("contiguous:seqlens-beyond-capacity", "needs 9 cache positions .* k_cache holds 8"), ("contiguous:seqlens-int64", "int32"),
                       ("paged:paged-repeated", "twice"), ("paged:paged-out-of-range", r"block_table\[1, 2\] = 6 is outside"),
                       ("rolling:rolling-too-small", "rolling cache needs"), ("contiguous:sinks-shape", "sinks"),
                       ("contiguous:new-length-differs", "as many new positions")):
        q, kc, vc, kw = _bad(case)
        with pytest.raises((ValueError, TypeError), match=name):
            longreach.local_attention_with_kvcache(q, kc, vc, **kw)


@pytest.mark.parametrize("opts", [dict(window=(6, 0), sink_tokens=3), dict(window=(5, 2), dilation=2, sink_tokens=4),
                                  dict(window=(9, 0), softcap=2.0, sink_tokens=2)])
def test_decode_equals_the_training_reference_with_sinks(opts):
    # The same semantics as the training ops: reference.local_attention with sink_tokens and sinks
    # over the whole history (a second oracle, beside this file's dense one).
    torch.manual_seed(4)
    q = torch.randn(2, 4, 3, 8, dtype=torch.float64)
    kc, vc = torch.randn(2, 2, 40, 8, dtype=torch.float64), torch.randn(2, 2, 40, 8, dtype=torch.float64)
    seqlens = torch.tensor([37, 11], dtype=torch.int32)
    sinks = torch.tensor([0.3, -0.7, 1.1, 0.0], dtype=torch.float64)
    out, lse = longreach.local_attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, sinks=sinks, return_lse=True,
                                                      **opts)
    for b in range(2):
        n = int(seqlens[b])
        ref, ref_lse = reference.local_attention(q[b:b + 1], kc[b:b + 1, :, :n], vc[b:b + 1, :, :n], sinks=sinks,
                                                 return_lse=True, **opts)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(lse[b:b + 1], ref_lse, rtol=1e-10, atol=1e-10)


def test_randomized_decode_calls_equal_the_reference():
    # Randomized differential cases (seeded): layout, lengths, heads, window, dilation, sinks, ALiBi,
    # softcap, score, chunks drawn per case; each row of each call against reference.local_attention
    # over that row's whole history. Chunks come from a generator of their own, so adding them left
    # every earlier draw of every case as it was.
    gen = torch.Generator().manual_seed(1234)
    chunk_gen = torch.Generator().manual_seed(4321)

    def draw_chunks(hq):
        def pick(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=chunk_gen))
        kind = pick(0, 9)
        if kind < 6:  # 60% without chunks; the others of 1-12 positions, or past every row's history
            return {}
        c = pick(1, 12) if kind < 9 else pick(40, 100)
        pattern = pick(0, 2)
        if pattern == 0:
            return dict(chunk=c)
        if pattern == 1:  # LongLoRA's half-shifted heads
            return dict(chunk=c, chunk_shift=torch.tensor([c // 2 if h >= hq // 2 else 0 for h in range(hq)]))
        return dict(chunk=c, chunk_shift=torch.randint(-2 * c, 2 * c + 1, (hq,), generator=chunk_gen))

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    chunked = 0
    for case in range(150):
        layout = ("contiguous", "rolling", "paged")[draw(0, 2)]
        B, hk, D, lq = draw(1, 3), draw(1, 2), draw(1, 3) * 4, draw(1, 4)
        hq = hk * draw(1, 3)
        left, dilation, sink_tokens = draw(0, 9), draw(1, 3), draw(0, 3)
        right = 0 if layout == "rolling" or draw(0, 1) else draw(0, 3)
        score = "sigmoid" if draw(0, 4) == 0 else "softmax"
        opts = dict(window=(left, right), dilation=dilation, sink_tokens=sink_tokens, score=score,
                    softcap=2.5 if draw(0, 1) else None,
                    alibi_slopes=torch.randn(hq, generator=gen) * 0.3 if draw(0, 1) else None,
                    sinks=torch.randn(hq, generator=gen).double() if score == "softmax" and draw(0, 1) else None,
                    **draw_chunks(hq))
        chunked += "chunk" in opts
        lens = [draw(0, 30) for _ in range(B)]
        if layout == "rolling":
            capacity = sink_tokens + left * dilation + lq + draw(0, 3)
        else:
            capacity = max(lens) + lq + draw(0, 5)
        cache = Cache(layout, B, hk, D, capacity, torch.float64, sink_tokens=sink_tokens if layout == "rolling" else 0,
                      block_size=draw(1, 8), seed=case)
        for b, n in enumerate(lens):
            cache.prefill(b, torch.randn(hk, n, D, generator=gen).double(), torch.randn(hk, n, D, generator=gen).double())
        q = torch.randn(B, hq, lq, D, generator=gen).double()
        k, v = torch.randn(B, hk, lq, D, generator=gen).double(), torch.randn(B, hk, lq, D, generator=gen).double()
        out = longreach.local_attention_with_kvcache(
            q, cache.k, cache.v, k, v, cache_seqlens=cache.seqlens, block_table=cache.block_table,
            rolling=layout == "rolling", num_splits=draw(0, 3), **opts)
        for b in range(B):
            hist_k = torch.cat([cache.history_k[b], k[b]], 1)[None]
            hist_v = torch.cat([cache.history_v[b], v[b]], 1)[None]
            ref = reference.local_attention(q[b:b + 1], hist_k, hist_v, **opts)
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-10, atol=1e-10, msg=lambda m: f"case {case}: {m}")
    assert chunked >= 40, chunked  # the draw keeps reaching chunks
