"""Decode-step time of longreach.local_attention_with_kvcache against the alternatives.

One decode step = one new query row per sequence against its cache (Hq = 32, Hk = 8, D = 128,
a causal window of 4096 keys), at cache lengths 1K to 64K:

  sdpa        F.scaled_dot_product_attention over the whole cache (what HF eager/sdpa do)
  sliding     longreach's SlidingKVCache path: the last 4096 keys kept (a slice of the cache
              here), then longreach.local_attention over them
  contiguous  local_attention_with_kvcache on a (B, Hk, capacity, D) cache
  paged       the same keys in a paged cache (block size 256, shuffled block table)
  rolling     a ring buffer of 4096 + 1 slots (the memory a sliding layer needs)

plus split-KV at B = 1 with one kv head (MQA: a single work item without splits): num_splits=1
vs the default. Prints a CSV (median ms per step of `--reps` steps, tokens/s) and ratios. The
implementations of one shape run interleaved, one step each in turn, so that the ratios compare
steps taken under the same conditions.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_decode.py [--lengths 1024,4096,...] [--batches 1,8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import longreach

WINDOW = 4096


def timed_together(fns, reps):
    """Median ms per call of each function, the calls interleaved round-robin so that a change
    in the machine's speed during the run (a shared host's cores, frequency) reaches every
    function alike and the ratios stay comparable."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def bench_shape(B, L, dtype, reps, hq=32, hk=8, D=128):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, hq, 1, D, generator=g).to(dtype)
    kc = torch.randn(B, hk, L, D, generator=g).to(dtype)
    vc = torch.randn(B, hk, L, D, generator=g).to(dtype)
    seqlens = torch.full((B,), L - 1, dtype=torch.int32)  # the new key goes in the last slot
    knew, vnew = kc[:, :, -1:].clone(), vc[:, :, -1:].clone()
    window = dict(window=(WINDOW - 1, 0), causal=True)
    fns = {"sdpa": lambda: F.scaled_dot_product_attention(q, kc, vc, enable_gqa=hq != hk)}
    keep = min(L, WINDOW)
    fns["sliding"] = lambda: longreach.local_attention(q, kc[:, :, L - keep:], vc[:, :, L - keep:], **window)
    fns["contiguous"] = lambda: longreach.local_attention_with_kvcache(
        q, kc, vc, knew, vnew, cache_seqlens=seqlens, **window)
    bs = 256
    nb = -(-L // bs)
    table = torch.randperm(B * nb, generator=g).view(B, nb).to(torch.int32)
    kp = torch.zeros(B * nb, bs, hk, D, dtype=dtype)
    vp = torch.zeros_like(kp)
    for b in range(B):  # the same keys, page by page
        for i in range(nb):
            n = min(bs, L - i * bs)
            kp[table[b, i], :n] = kc[b, :, i * bs:i * bs + n].transpose(0, 1)
            vp[table[b, i], :n] = vc[b, :, i * bs:i * bs + n].transpose(0, 1)
    fns["paged"] = lambda: longreach.local_attention_with_kvcache(
        q, kp, vp, knew, vnew, cache_seqlens=seqlens, block_table=table, **window)
    ring = longreach.ops.rolling_cache_capacity(WINDOW - 1, 1)
    kr = torch.zeros(B, hk, ring, D, dtype=dtype)
    vr = torch.zeros_like(kr)
    kept = torch.arange(max(0, L - ring), L)  # the positions a ring still holds, at slot j % ring
    kr[:, :, kept % ring], vr[:, :, kept % ring] = kc[:, :, kept], vc[:, :, kept]
    fns["rolling"] = lambda: longreach.local_attention_with_kvcache(
        q, kr, vr, knew, vnew, cache_seqlens=seqlens, rolling=True, **window)
    with torch.inference_mode():
        return timed_together(fns, reps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,4096,16384,32768,65536")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, window {WINDOW}, Hq 32, Hk 8, D 128")
    print("dtype,B,cache_len,impl,ms_per_step,tokens_per_s")
    summary = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for B in map(int, args.batches.split(",")):
            for L in map(int, args.lengths.split(",")):
                res = bench_shape(B, L, dtype, args.reps)
                for impl, ms in res.items():
                    print(f"{dtype_name},{B},{L},{impl},{ms:.3f},{B * 1e3 / ms:.0f}", flush=True)
                summary.append((dtype_name, B, L, res["sdpa"] / res["contiguous"], res["sliding"] / res["contiguous"],
                                res["paged"] / res["contiguous"], res["rolling"] / res["contiguous"]))
    print("\n# ratios: sdpa/ours, sliding/ours, paged/contiguous, rolling/contiguous (time ratios; > 1 = ours faster)")
    for dtype_name, B, L, a, b, c, d in summary:
        print(f"# {dtype_name} B={B} L={L}: {a:.2f}x {b:.2f}x {c:.2f} {d:.2f}")
    # Split-KV: one kv head, one work item unless split.
    with torch.inference_mode():
        for L in (32768,):
            q = torch.randn(1, 32, 1, 128)
            kc, vc = torch.randn(1, 1, L, 128), torch.randn(1, 1, L, 128)
            seqlens = torch.tensor([L], dtype=torch.int32)
            kw = dict(cache_seqlens=seqlens, window=(WINDOW - 1, 0), causal=True)
            res = timed_together({"one": lambda: longreach.local_attention_with_kvcache(q, kc, vc, num_splits=1, **kw),
                                  "auto": lambda: longreach.local_attention_with_kvcache(q, kc, vc, **kw)},
                                 10 * args.reps)  # steps of ~2 ms: more of them for a stable median
            one, auto = res["one"], res["auto"]
            print(f"# split-KV (B=1, Hk=1, L={L}, {torch.get_num_threads()} threads): one split {one:.3f} ms, "
                  f"default {auto:.3f} ms, {one / auto:.2f}x")


if __name__ == "__main__":
    main()
