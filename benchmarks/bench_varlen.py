"""Packed (variable-length) batches: local_attention_varlen vs padding vs a per-document loop.

The benchmark of issue 13: 32 documents with lengths drawn (fixed seed) uniformly from
64..4096 (about 64K tokens in all), causal window (511, 0), H=8, D=64, float32, forward and
forward+backward, the same documents computed three ways, and a dense reference:

    varlen   longreach.local_attention_varlen on the packed (total, H, D) tensors
    padded   longreach.local_attention on (B=32, H, L=max, D), each document right-padded to the
             longest (causal and right padding: the real rows see only real keys, so the real rows
             are exact without a mask; the padded rows are computed and thrown away)
    loop     a Python loop of longreach.local_attention on (1, H, L_i, D), one call per document
    dense    longreach.local_attention on one (1, H, total, D) sequence of the same total length
             (a different problem: no document boundaries, so more keys per row; the reference
             for the kernels' rate per useful FLOP)
    dense_varlen  the dense problem through local_attention_varlen (one sequence, cu_seqlens
             [0, total]): separates the cost of the packed layout (rows H * D apart) from that of
             the document boundaries

Each method gets its inputs already in its own layout (building them is not timed). Like
bench_cpu_kernels.py (whose timing helpers this imports): one thread, the thread's own CPU time
(time.thread_time), one warm-up call each, then every method in turn for `--rounds` (forward) and
`--backward-rounds` (forward+backward) rounds and each one's best round, so a busy machine
slows all of them rather than one. The ratios come from that one run. A short wall-clock run
with 2 threads (time.perf_counter) follows.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_varlen.py            # about 2 minutes
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_varlen.py --rounds 2 --wall-rounds 0

tokens/s counts real tokens only (the 32 documents' lengths summed; for dense, its total
length, the same number). Useful FLOPs count the (query, key) pairs the window allows within
each document (within the one sequence for dense): forward 4 * D * H * sum over rows of the
keys each row sees, forward+backward 3.5x that (FlashAttention's convention, as in
docs/benchmarking.md). The padded batch is credited with its real rows only.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_kernels import best_interleaved  # noqa: E402  (the same timing as bench_cpu_kernels.py)

import longreach  # noqa: E402

PASSES = (False, True)  # backward?
METHODS = ("varlen", "padded", "loop", "dense", "dense_varlen")


def pass_name(backward: bool) -> str:
    return "forward+backward" if backward else "forward"


def draw_lengths(count: int, low: int, high: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (count,), generator=gen).tolist()


def keys_seen(length: int, left: int) -> int:
    """Sum over the rows of a causal (left, 0) window of the keys each row sees."""
    full = max(length - left, 0)  # rows i >= left see left + 1 keys
    head = length - full  # rows 0 .. head - 1 see i + 1 keys
    return head * (head + 1) // 2 + full * (left + 1)


def build(lengths: list, heads: int, dim: int, left: int, seed: int) -> dict:
    """Each method's call (forward and forward+backward) on the same documents, its inputs in its own layout."""
    total, longest, batch = sum(lengths), max(lengths), len(lengths)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v, g = (torch.randn(total, heads, dim, generator=gen) for _ in range(4))  # packed (total, H, D)
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    window = (left, 0)

    def batched(t: torch.Tensor) -> torch.Tensor:  # packed (L, H, D) -> (1, H, L, D), contiguous
        return t.transpose(0, 1).unsqueeze(0).contiguous()

    def padded(t: torch.Tensor) -> torch.Tensor:  # packed -> (B, H, longest, D), right padding with zeros
        out = torch.zeros(batch, heads, longest, dim)
        for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
            out[i, :, :n] = t[s:s + n].transpose(0, 1)
        return out

    def leaves(*ts):
        return [t.clone().requires_grad_() for t in ts]

    vq, vk, vv = leaves(q, k, v)
    pq, pk, pv = leaves(padded(q), padded(k), padded(v))
    pg = padded(g)
    docs = [(leaves(*(batched(t[s:s + n]) for t in (q, k, v))), batched(g[s:s + n]))
            for s, n in zip(cu[:-1].tolist(), lengths)]
    dq, dk, dv = leaves(batched(q), batched(k), batched(v))
    dg = batched(g)
    sq, sk, sv = leaves(q, k, v)
    one = torch.tensor([0, total], dtype=torch.int32)

    def dense_varlen():
        return longreach.local_attention_varlen(sq, sk, sv, one, one, total, total, window=window, causal=True)

    def varlen():
        return longreach.local_attention_varlen(vq, vk, vv, cu, cu, longest, longest, window=window, causal=True)

    def batch_call(a, b, c):
        return longreach.local_attention(a, b, c, window=window, causal=True)

    def make(forward, inputs, grad_out):
        def run_forward():
            with torch.no_grad():
                forward()

        def run_both():
            torch.autograd.grad(forward(), inputs, grad_out)

        return {False: run_forward, True: run_both}

    def loop_forward():
        with torch.no_grad():
            for (a, b, c), _ in docs:
                batch_call(a, b, c)

    def loop_both():
        for (a, b, c), grad_out in docs:
            torch.autograd.grad(batch_call(a, b, c), (a, b, c), grad_out)

    def outputs():  # each document-exact method's forward, back in the packed layout
        with torch.no_grad():
            pad = batch_call(pq, pk, pv)
            return {
                "varlen": varlen(),
                "padded": torch.cat([pad[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)]),
                "loop": torch.cat([batch_call(a, b, c)[0].transpose(0, 1) for (a, b, c), _ in docs]),
            }

    calls = {
        "varlen": make(varlen, (vq, vk, vv), g),
        "padded": make(lambda: batch_call(pq, pk, pv), (pq, pk, pv), pg),
        "loop": {False: loop_forward, True: loop_both},
        "dense": make(lambda: batch_call(dq, dk, dv), (dq, dk, dv), dg),
        "dense_varlen": make(dense_varlen, (sq, sk, sv), g),
    }
    return calls, outputs


def wall_clock(calls: dict, rounds: int, threads: int) -> dict:
    """Best wall-clock time of each call over `rounds` interleaved rounds (after one warm-up each)."""
    torch.set_num_threads(threads)
    try:
        for fn in calls.values():
            fn()
        best = {key: float("inf") for key in calls}
        for _ in range(rounds):
            for key, fn in calls.items():
                t = time.perf_counter()
                fn()
                best[key] = min(best[key], time.perf_counter() - t)
        return best
    finally:
        torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=32)
    parser.add_argument("--min-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--left", type=int, default=511, help="window (left, 0), causal (default 511)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds, forward (default 5)")
    parser.add_argument("--backward-rounds", type=int, default=3,
                        help="interleaved rounds, forward+backward (default 3)")
    parser.add_argument("--wall-rounds", type=int, default=1,
                        help="wall-clock rounds with --wall-threads threads after one warm-up (default 1; 0 skips)")
    parser.add_argument("--wall-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)

    lengths = draw_lengths(args.docs, args.min_length, args.max_length, args.seed)
    total, longest = sum(lengths), max(lengths)
    heads, dim, left = args.heads, args.dim, args.left
    calls, outputs = build(lengths, heads, dim, left, args.seed)
    out = outputs()  # the three document-exact methods compute the same rows
    diffs = {m: (out[m] - out["varlen"]).abs().max().item() for m in ("padded", "loop")}
    del out

    useful_rows = {m: sum(keys_seen(n, left) for n in lengths) for m in ("varlen", "padded", "loop")}
    useful_rows["dense"] = useful_rows["dense_varlen"] = keys_seen(total, left)
    computed_rows = dict(useful_rows, padded=len(lengths) * keys_seen(longest, left))

    start = time.perf_counter()
    best = {}
    for backward, rounds in ((False, args.rounds), (True, args.backward_rounds)):
        got = best_interleaved({m: calls[m][backward] for m in METHODS}, rounds)
        best.update({(m, backward): t for m, t in got.items()})
    cpu_seconds = time.perf_counter() - start

    print(f"{args.docs} documents, lengths drawn from {args.min_length}..{args.max_length} (seed {args.seed}): "
          f"total {total} tokens, longest {longest}, mean {total / len(lengths):.0f}")
    print(f"H={heads} D={dim} float32, causal window ({left}, 0); padded batch B={len(lengths)} L={longest} "
          f"({len(lengths) * longest} rows, {len(lengths) * longest / total:.2f}x the real ones; "
          f"{computed_rows['padded'] / useful_rows['padded']:.2f}x the useful (query, key) pairs)")
    print(f"useful (query, key) pairs per head: documents {useful_rows['varlen']} "
          f"({useful_rows['varlen'] / total:.1f} keys/row), dense sequence {useful_rows['dense']} "
          f"({useful_rows['dense'] / total:.1f} keys/row)")
    print(f"1 thread, thread CPU time, best of {args.rounds} (forward) / {args.backward_rounds} (forward+backward) "
          f"interleaved rounds after one warm-up each ({cpu_seconds:.0f} s)")
    print(f"forward outputs, max |difference| from varlen: padded {diffs['padded']:.1e}, loop {diffs['loop']:.1e}")
    print("useful FLOPs: forward 4 * D * H * sum over rows of keys seen; forward+backward 3.5x that")
    print()
    header = (f"{'pass':17s} {'method':12s} {'ms':>9s} {'Ktokens/s':>10s} {'GFLOP/s':>8s} "
              f"{'tok/s vs padded':>16s} {'per FLOP vs dense':>18s}")
    print(header)
    for backward in PASSES:
        factor = 3.5 if backward else 1.0
        rate = {m: 4 * dim * heads * useful_rows[m] * factor / best[(m, backward)] for m in METHODS}
        toks = {m: total / best[(m, backward)] for m in METHODS}
        for m in METHODS:
            print(f"{pass_name(backward):17s} {m:12s} {best[(m, backward)] * 1e3:9.1f} {toks[m] / 1e3:10.1f} "
                  f"{rate[m] / 1e9:8.1f} {toks[m] / toks['padded']:16.2f} {rate[m] / rate['dense']:18.2f}")
    print()
    print("targets (issue 13), from this run (the padded batch computes "
          f"{computed_rows['padded'] / useful_rows['padded']:.2f}x the useful pairs: varlen at the padded "
          "batch's rate per computed pair would be that much faster):")
    for backward in PASSES:
        tok_ratio = best[("padded", backward)] / best[("varlen", backward)]
        flop_ratio = ((useful_rows["varlen"] / best[("varlen", backward)])
                      / (useful_rows["dense"] / best[("dense", backward)]))
        print(f"  {pass_name(backward):17s} varlen tokens/s = {tok_ratio:.2f}x padded (target >= 2): "
              f"{'met' if tok_ratio >= 2 else 'not met'}; varlen per useful FLOP = {flop_ratio:.2f}x dense "
              f"(target >= 0.90): {'met' if flop_ratio >= 0.9 else 'not met'}")

    if args.wall_rounds > 0:
        print()
        start = time.perf_counter()
        wall = wall_clock({(m, b): calls[m][b] for b in PASSES for m in METHODS}, args.wall_rounds, args.wall_threads)
        print(f"{args.wall_threads} threads, wall clock (time.perf_counter), best of {args.wall_rounds} after one "
              f"warm-up ({time.perf_counter() - start:.0f} s; a shared machine's wall clock is noisy):")
        print(f"{'pass':17s} {'method':12s} {'ms':>9s} {'Ktokens/s':>10s} {'tok/s vs padded':>16s}")
        for backward in PASSES:
            for m in METHODS:
                t = wall[(m, backward)]
                print(f"{pass_name(backward):17s} {m:12s} {t * 1e3:9.1f} {total / t / 1e3:10.1f} "
                      f"{wall[('padded', backward)] / t:16.2f}")


if __name__ == "__main__":
    main()
