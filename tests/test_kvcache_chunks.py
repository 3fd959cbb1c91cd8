"""local_attention_with_kvcache with chunk= / chunk_shift= (docs/semantics.md "Chunks", "KV caches"):
decode steps in every cache layout against reference.local_attention over each row's whole history
(chunks counted from position 0 of the sequence, whatever slot a rolling cache keeps a position in),
decoding a sequence step by step against the training op with the same chunks, keys outside a row's
chunk never read, compile / opcheck, and bad input that leaves the cache unchanged."""

from __future__ import annotations

import pytest
import torch

import longreach
from longreach import reference
from test_kvcache import Cache

B, HQ, HK, D = 3, 4, 2, 8  # GQA: two query heads per kv head
HALF = torch.tensor([0, 0, 2, 2])  # chunk 5 (or 4): LongLoRA's pattern, the second half shifted by c // 2


def shifts(*values):
    return torch.tensor(values, dtype=torch.int64)


# (chunk options, window options, new rows per step); every case runs in every layout
CASES = {
    "chunk1": (dict(chunk=1), dict(window=(6, 0)), 1),
    "chunk3-unshifted": (dict(chunk=3), dict(window=(8, 0)), 1),
    "chunk5-half-shifted": (dict(chunk=5, chunk_shift=HALF), dict(window=(12, 0)), 1),
    "chunk7-any-shifts-dilated": (dict(chunk=7, chunk_shift=shifts(-9, 3, 11, 0)), dict(window=(9, 0), dilation=2), 1),
    "chunk-past-the-history": (dict(chunk=200, chunk_shift=shifts(0, 100, 37, -5)), dict(window=(10, 0)), 1),
    "chunk4-sinks": (dict(chunk=4, chunk_shift=shifts(0, 2, 1, 3)), dict(window=(9, 0), sink_tokens=3), 1),
    "chunk4-three-rows-a-step": (dict(chunk=4, chunk_shift=shifts(0, 2, 3, 1)), dict(window=(7, 0)), 3),
    "chunk5-window-inside-chunk": (dict(chunk=5, chunk_shift=HALF), dict(window=(2, 0), sink_tokens=1), 2),
    "chunk6-sigmoid-alibi": (dict(chunk=6, chunk_shift=shifts(0, 3, 0, 3)),
                             dict(window=(10, 0), score="sigmoid", alibi=True), 1),
}
LAYOUTS = [("contiguous", {}), ("rolling", {}), ("paged", {"block_size": 5})]


def decode_against_the_reference(layout, layout_opts, chunks, window_opts, new_tokens, steps, seed=0,
                                 num_splits=0):
    """Decode `steps` calls of `new_tokens` rows into rows of different lengths, each row of each
    call compared with reference.local_attention over that row's whole history. Returns the cache."""
    gen = torch.Generator().manual_seed(seed)
    opts = dict(window_opts)
    slopes = torch.tensor([0.25, -0.125, 0.5, 0.0625]) if opts.pop("alibi", False) else None
    sink_tokens = opts.pop("sink_tokens", 0)
    softmax = opts.get("score", "softmax") == "softmax"
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64) if softmax and sink_tokens else None
    if layout == "rolling":
        capacity = longreach.ops.rolling_cache_capacity(opts["window"][0], new_tokens, opts.get("dilation", 1),
                                                        sink_tokens)
    else:
        capacity = 24 + steps * new_tokens
    cache = Cache(layout, B, HK, D, capacity, torch.float64, sink_tokens=sink_tokens, seed=seed, **layout_opts)
    for b, n in enumerate((0, 5, 17)):
        cache.prefill(b, torch.randn(HK, n, D, generator=gen).double(), torch.randn(HK, n, D, generator=gen).double())
    for step in range(steps):
        q = torch.randn(B, HQ, new_tokens, D, generator=gen).double()
        k = torch.randn(B, HK, new_tokens, D, generator=gen).double()
        v = torch.randn(B, HK, new_tokens, D, generator=gen).double()
        out, lse = cache.step(q, k, v, alibi_slopes=slopes, sinks=sinks, num_splits=num_splits, **chunks, **opts)
        for b in range(B):
            hist_k, hist_v = cache.history_k[b][None], cache.history_v[b][None]
            ref = reference.local_attention(q[b:b + 1], hist_k, hist_v, alibi_slopes=slopes, sinks=sinks,
                                            sink_tokens=sink_tokens, return_lse=softmax, **chunks, **opts)
            ref, ref_lse = ref if softmax else (ref, None)
            torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-10, atol=1e-10,
                                       msg=lambda m: f"step {step}, row {b}: {m}")
            if softmax:
                torch.testing.assert_close(lse[b:b + 1], ref_lse, rtol=1e-10, atol=1e-10)
    return cache


@pytest.mark.parametrize("layout, layout_opts", LAYOUTS, ids=[name for name, _ in LAYOUTS])
@pytest.mark.parametrize("case", list(CASES))
def test_decode_with_chunks_matches_the_reference(layout, layout_opts, case):
    chunks, window_opts, new_tokens = CASES[case]
    cache = decode_against_the_reference(layout, layout_opts, chunks, window_opts, new_tokens, steps=24)
    if layout == "rolling":  # positions went past the ring several times: slots are not positions
        assert int(cache.seqlens.max()) > 2 * cache.capacity


@pytest.mark.parametrize("layout, layout_opts", [LAYOUTS[0], LAYOUTS[2]], ids=["contiguous", "paged"])
def test_chunks_without_a_window(layout, layout_opts):
    # An unbounded window: the chunk alone bounds what a row sees (rolling caches need a window).
    decode_against_the_reference(layout, layout_opts, dict(chunk=6, chunk_shift=HALF), dict(), 2, steps=20)


@pytest.mark.parametrize("splits", [1, 3])
def test_split_kv_with_chunks(splits):
    decode_against_the_reference("contiguous", {}, dict(chunk=9, chunk_shift=shifts(0, 4, 7, 1)),
                                 dict(window=(20, 0), sink_tokens=2), 2, steps=12, num_splits=splits)


def test_every_head_its_own_shift_in_one_call():
    # Eight query heads on one kv head (MQA), eight different shifts: one decode call serves all.
    gen = torch.Generator().manual_seed(5)
    hq, c, n = 8, 8, 61
    q = torch.randn(2, hq, 3, D, generator=gen).double()
    kc, vc = torch.randn(2, 1, n, D, generator=gen).double(), torch.randn(2, 1, n, D, generator=gen).double()
    seqlens = torch.tensor([n, 29], dtype=torch.int32)
    shift = torch.arange(hq, dtype=torch.int32) * 3 - 5
    out = longreach.local_attention_with_kvcache(q, kc, vc, cache_seqlens=seqlens, dilation=2, chunk=c,
                                                 chunk_shift=shift)
    for b in range(2):
        m = int(seqlens[b])
        ref = reference.local_attention(q[b:b + 1], kc[b:b + 1, :, :m], vc[b:b + 1, :, :m], dilation=2, chunk=c,
                                        chunk_shift=shift)
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout, new_tokens", [("rolling", 1), ("paged", 1), ("contiguous", 4)])
def test_decoding_step_by_step_equals_the_training_op(layout, new_tokens):
    # The same sequence through the training op at once and through the decode op a few tokens at
    # a time: the decode rows are the training op's rows (float32, one kernel each).
    torch.manual_seed(7)
    L, c, left, sink_tokens = 44, 6, 9, 2
    chunks = dict(chunk=c, chunk_shift=shifts(0, 0, 3, 3))
    opts = dict(window=(left, 0), causal=True)  # the cache passes its sink_tokens itself
    q, k, v = torch.randn(1, HQ, L, D), torch.randn(1, HK, L, D), torch.randn(1, HK, L, D)
    full = longreach.local_attention(q, k, v, sink_tokens=sink_tokens, **chunks, **opts)
    if layout == "rolling":
        capacity = longreach.ops.rolling_cache_capacity(left, new_tokens, 1, sink_tokens)
    else:
        capacity = L
    cache = Cache(layout, 1, HK, D, capacity, torch.float32, sink_tokens=sink_tokens, block_size=4)
    rows = []
    for start in range(0, L, new_tokens):
        sl = slice(start, start + new_tokens)
        out, _ = cache.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], **chunks, **opts)
        rows.append(out)
    torch.testing.assert_close(torch.cat(rows, 2), full, rtol=2e-6, atol=2e-6)


def test_keys_outside_the_row_chunk_are_never_read():
    # NaN in every cached key and value before the row's chunk (an unbounded window): the kernel
    # visits only the chunk's keys, so nothing leaks (a kernel that masked the history would
    # compute 0 * NaN = NaN in the weighted sum of values).
    c, n = 16, 300
    q = torch.randn(1, 2, 1, D)
    kc, vc = torch.randn(1, 1, n + 1, D), torch.randn(1, 1, n + 1, D)
    shift = torch.tensor([0, 5])
    start = min(n - (n + s) % c for s in shift.tolist())  # the earliest chunk start of the two heads
    kc[:, :, :start], vc[:, :, :start] = float("nan"), float("nan")
    clean_k, clean_v = kc.nan_to_num(), vc.nan_to_num()
    out = longreach.local_attention_with_kvcache(q, kc, vc, cache_seqlens=n + 1, chunk=c, chunk_shift=shift)
    assert not out.isnan().any()
    ref = reference.local_attention(q, clean_k, clean_v, chunk=c, chunk_shift=shift)
    torch.testing.assert_close(out, ref)


def test_compiled_chunked_decode_step_matches_eager():
    def step(q, kc, vc, k, v, seqlens, shift):
        return longreach.local_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, window=(6, 0), chunk=4,
                                                      chunk_shift=shift)

    torch.manual_seed(3)
    kc, vc = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    kc2, vc2 = kc.clone(), vc.clone()
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    seqlens, shift = torch.tensor([4, 9], dtype=torch.int32), torch.tensor([0, 0, 2, 2], dtype=torch.int32)
    out = torch.compile(step, fullgraph=True)(q, kc, vc, k, v, seqlens, shift)
    torch.testing.assert_close(out, step(q, kc2, vc2, k, v, seqlens, shift))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def test_opcheck_with_chunks():
    kc, vc = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    args = (torch.randn(2, 4, 1, 8), kc, vc, torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8),
            torch.tensor([4, 9], dtype=torch.int32), None, None, None, 6, 0, 1, "softmax", None, 0.0, 0.35, 0, False, 0,
            3, torch.tensor([0, 1, 2, 0]))
    torch.library.opcheck(torch.ops.longreach.local_attention_kvcache_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------ bad input --

BAD = {
    "chunk negative": (ValueError, "chunk", dict(chunk=-1)),
    "chunk a float": (TypeError, "chunk", dict(chunk=2.5)),
    "shift without chunk": (ValueError, "chunk_shift needs chunk > 0", dict(chunk_shift=torch.zeros(HQ, dtype=torch.long))),
    "shift shape": (ValueError, "chunk_shift", dict(chunk=4, chunk_shift=torch.zeros(HQ + 1, dtype=torch.long))),
    "shift per kv head": (ValueError, "chunk_shift", dict(chunk=4, chunk_shift=torch.zeros(HK, dtype=torch.long))),
    "shift float": (TypeError, "chunk_shift", dict(chunk=4, chunk_shift=torch.zeros(HQ))),
    "shift a list": (TypeError, "chunk_shift", dict(chunk=4, chunk_shift=[0, 0, 2, 2])),
}


def _call(api, kc, vc, chunk=0, chunk_shift=None):
    q, k, v = torch.randn(2, HQ, 1, D), torch.randn(2, HK, 1, D), torch.randn(2, HK, 1, D)
    seqlens = torch.tensor([3, 5], dtype=torch.int32)
    if api:
        return longreach.local_attention_with_kvcache(q, kc, vc, k, v, cache_seqlens=seqlens, window=(4, 0),
                                                      chunk=chunk, chunk_shift=chunk_shift)
    # the C++ op called directly: its own checks, before the append
    return torch.ops.longreach.local_attention_kvcache_fwd(q, kc, vc, k, v, seqlens, None, None, None, 4, 0, 1,
                                                           "softmax", None, 0.0, 0.35, 0, False, 0, chunk, chunk_shift)


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("api", [True, False], ids=["python", "op"])
def test_bad_chunk_arguments_are_rejected_and_the_cache_is_unchanged(case, api):
    error, message, kw = BAD[case]
    if not api and case in ("chunk a float", "shift a list"):
        pytest.skip("the dispatcher rejects a wrong Python type before any longreach code runs")
    kc, vc = torch.randn(2, HK, 8, D), torch.randn(2, HK, 8, D)
    before_k, before_v = kc.clone(), vc.clone()
    with pytest.raises(error, match=message) as info:
        _call(api, kc, vc, **kw)
    assert "local_attention_with_kvcache" in str(info.value)
    assert torch.equal(kc, before_k) and torch.equal(vc, before_v)


# -------------------------------------------------------------------- transformers cache --

@pytest.mark.parametrize("window_left", [6, None], ids=["rolling", "contiguous"])
def test_the_hf_cache_layer_takes_chunks_in_prefill_and_decode(window_left):
    # LongreachLayer.attend hands chunk / chunk_shift to the training op (prompt) and to the decode
    # op (later calls) alike: the outputs are the training op's over the whole sequence.
    pytest.importorskip("transformers")
    from longreach.hf.cache import LongreachLayer

    torch.manual_seed(11)
    L, prompt = 31, 11  # a prompt, then ten calls of two new tokens
    chunks = dict(chunk=5, chunk_shift=HALF)
    q, k, v = torch.randn(1, HQ, L, D), torch.randn(1, HK, L, D), torch.randn(1, HK, L, D)
    layer = LongreachLayer(chunk=2)
    rows, start = [], 0
    for stop in [prompt] + list(range(prompt + 2, L + 1, 2)):
        sl = slice(start, stop)
        rows.append(layer.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], None, window_left=window_left, sink_tokens=0,
                                 **chunks))
        start = stop
    full = longreach.local_attention(q, k, v, causal=True, window=(window_left, 0), **chunks)
    torch.testing.assert_close(torch.cat(rows, 2), full, rtol=2e-6, atol=2e-6)
    assert layer.rolling == (window_left is not None)


def test_the_hf_cache_layer_rejects_chunks_with_a_padded_prompt():
    # The prompt's chunk grid would count the padding, the cache's only the real tokens.
    pytest.importorskip("transformers")
    from longreach.hf.cache import LongreachLayer

    q, k = torch.randn(1, HQ, 4, D), torch.randn(1, HK, 4, D)
    valid = torch.tensor([[False, True, True, True]])
    with pytest.raises(NotImplementedError, match="chunk with a padded prompt"):
        LongreachLayer().attend(q, k, k.clone(), valid, window_left=3, sink_tokens=0, chunk=2)
