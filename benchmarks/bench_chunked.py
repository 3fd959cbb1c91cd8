"""Chunked attention (LongLoRA's S2-Attn) vs full causal attention: the benchmark of issue 20.

Causal attention restricted to chunks of c = 2048 positions, the chunks of half the heads shifted
by c / 2 (chunk_shift="half"), forward+backward (the fine-tuning step), at L = 8K, 16K, 32K, B=1,
H=8, D=64, float32 (the CPU kernels' fastest exact path; the other benches' H and D). Methods:

    chunked      longreach.local_attention(causal=True, chunk=c, chunk_shift=half heads c/2)
    sdpa_causal  F.scaled_dot_product_attention(is_causal=True) on the whole sequence, PyTorch's
                 CPU flash kernel: the full causal attention a model without chunks trains with
    sdpa_rolled  LongLoRA's own S2-Attn: the shifted heads rolled by -c/2 along the sequence,
                 every chunk one row of a (B * L / c, H, c, D) batch of causal SDPA, rolled back
                 (its last chunk of the shifted heads wraps around to the first positions, which
                 longreach's shifted grid does not do, so it computes whole chunks everywhere: a
                 few more pairs, credited to it). Both compute the same rows elsewhere, which the
                 script checks before timing.

Timing as bench_varlen.py / bench_cpu_kernels.py (whose helper this imports): one thread, one
warm-up call each, then the methods in turn for --rounds rounds and each one's best round, by the
thread's own CPU time (time.thread_time) and, in the same calls, by wall time (time.perf_counter),
so a preempted run shows as wall > thread. One run; the ratios come from it. A wall-clock run with
--wall-threads threads follows (--wall-rounds 0 skips it).

Useful FLOPs count the (query, key) pairs each method's mask allows (docs/benchmarking.md:
forward 4 * D * sum over rows and heads of the keys a row sees, forward+backward
longreach.benchmark.FWD_BWD_FLOP_FACTOR = 3.5x that); sdpa_causal is credited with its causal
pairs, the chunked methods with their chunk pairs, so GFLOP/s is per useful FLOP of what each
computes, and "time vs sdpa_causal" is what chunks save on the step.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_chunked.py          # the published sizes (long)
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_chunked.py --quick  # L = 1K, 2K, c = 256: seconds
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_kernels import time_once  # noqa: E402  (the same thread-time clock as bench_cpu_kernels.py)
from bench_varlen import wall_clock  # noqa: E402  (the same all-threads wall-clock run as bench_varlen.py)

import longreach  # noqa: E402
from longreach._checks import chunk_shifts  # noqa: E402  (the one "half" expansion)
from longreach.benchmark import FWD_BWD_FLOP_FACTOR  # noqa: E402

METHODS = ("chunked", "sdpa_causal", "sdpa_rolled")


def chunk_pairs(length: int, chunk: int, shifts) -> int:
    """Visible (row, key) pairs of causal attention in chunks, summed over the heads: row p of a
    head with shift s sees the keys from its chunk's start max(p - (p + s) mod c, 0) to p."""
    pos = torch.arange(length, dtype=torch.int64)
    return sum(int((pos - (pos - (pos + s) % chunk).clamp(min=0) + 1).sum()) for s in shifts)


def rolled_pairs(length: int, chunk: int, heads: int) -> int:
    """LongLoRA's roll + reshape: every head sees L / c causal chunks of c positions."""
    return heads * (length // chunk) * chunk * (chunk + 1) // 2


def build(length: int, heads: int, dim: int, chunk: int, shift: torch.Tensor, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    q, k, v, g = (torch.randn(1, heads, length, dim, generator=gen) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    shifted = slice(heads // 2, heads)  # the heads "half" shifts (chunk_shifts)

    def chunked(a, b, c):
        return longreach.local_attention(a, b, c, causal=True, chunk=chunk, chunk_shift=shift)

    def sdpa_causal(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    def sdpa_rolled(a, b, c):
        def roll(t, by):  # the shifted heads moved by `by` positions, the others as they are
            return torch.cat([t[:, :shifted.start], t[:, shifted].roll(by, dims=2)], dim=1)

        def chunks(t):  # (1, H, L, D) -> (L / c, H, c, D)
            return t.view(heads, length // chunk, chunk, dim).transpose(0, 1)

        out = F.scaled_dot_product_attention(*(chunks(roll(t, -(chunk // 2))) for t in (a, b, c)), is_causal=True)
        return roll(out.transpose(0, 1).reshape(1, heads, length, dim), chunk // 2)

    def step(forward):
        def run():
            torch.autograd.grad(forward(*leaves), leaves, g)
        return run

    def difference() -> float:
        """Largest |chunked - sdpa_rolled| over the rows where the two grids agree: every row of the
        unshifted heads, the shifted heads' rows outside the wrapped-around chunk."""
        with torch.no_grad():
            ours, theirs = chunked(q, k, v), sdpa_rolled(q, k, v)
        rows = slice(chunk // 2, length - chunk // 2)
        return max(float((ours[:, :shifted.start] - theirs[:, :shifted.start]).abs().max()),
                   float((ours[:, shifted, rows] - theirs[:, shifted, rows]).abs().max()))

    calls = {"chunked": step(chunked), "sdpa_causal": step(sdpa_causal), "sdpa_rolled": step(sdpa_rolled)}
    return calls, difference


def best_both_clocks(calls: dict, rounds: int) -> dict:
    """Each call's best (thread seconds, wall seconds) over `rounds` interleaved rounds, after one warm-up."""
    for fn in calls.values():
        fn()
    best = {key: (float("inf"), float("inf")) for key in calls}
    for _ in range(rounds):
        for key, fn in calls.items():
            wall = time.perf_counter()
            thread = time_once(fn)
            wall = time.perf_counter() - wall
            best[key] = (min(best[key][0], thread), min(best[key][1], wall))
    return best


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=lambda s: [positive(x) for x in s.split(",")], default=[8192, 16384, 32768])
    parser.add_argument("--chunk", type=positive, default=2048)
    parser.add_argument("--heads", type=positive, default=8)
    parser.add_argument("--dim", type=positive, default=64)
    parser.add_argument("--rounds", type=positive, default=2, help="interleaved rounds, one thread (default 2)")
    parser.add_argument("--wall-rounds", type=int, default=1,
                        help="wall-clock rounds with --wall-threads threads after one warm-up (default 1; 0 skips)")
    parser.add_argument("--wall-threads", type=positive, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke sizes: L = 1024, 2048, chunk 256, one round")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.chunk, args.rounds, args.wall_rounds = [1024, 2048], 256, 1, min(args.wall_rounds, 1)
    for length in args.lengths:
        if length % args.chunk:
            parser.error(f"--lengths: {length} is not a multiple of --chunk {args.chunk} (sdpa_rolled reshapes "
                         "the sequence into chunks)")
    torch.set_num_threads(1)
    heads, dim, chunk = args.heads, args.dim, args.chunk
    shift = chunk_shifts("bench_chunked", chunk, "half", heads)[1]

    print(f"chunked causal attention, chunk {chunk}, shift {chunk // 2} in heads {heads // 2}..{heads - 1}; "
          f"B=1, H={heads}, D={dim}, float32, forward+backward; torch {torch.__version__}")
    print("one thread: best of", args.rounds, "interleaved rounds, thread time (wall time)")
    header = (f"{'L':>6} {'method':<12} {'thread s':>9} {'wall s':>9} {'pairs/row':>10} {'GFLOP/s':>8} "
              f"{'time vs sdpa_causal':>20} {'per FLOP vs sdpa_causal':>24}")
    print(header)
    for length in args.lengths:
        pairs = {"chunked": chunk_pairs(length, chunk, shift.tolist()),
                 "sdpa_causal": heads * length * (length + 1) // 2,
                 "sdpa_rolled": rolled_pairs(length, chunk, heads)}
        calls, difference = build(length, heads, dim, chunk, shift, args.seed)
        diff = difference()  # the two chunked methods compute the same rows (checked, not timed)
        if not diff < 1e-4:
            raise SystemExit(f"L={length}: chunked and sdpa_rolled differ by {diff:.3g} on the rows they share")
        best = best_both_clocks(calls, args.rounds)
        flops = {m: FWD_BWD_FLOP_FACTOR * 4 * dim * pairs[m] for m in METHODS}
        rate = {m: flops[m] / best[m][0] / 1e9 for m in METHODS}
        for m in METHODS:
            thread, wall = best[m]
            print(f"{length:>6} {m:<12} {thread:>9.3f} {wall:>9.3f} {pairs[m] / (heads * length):>10.1f} "
                  f"{rate[m]:>8.1f} {thread / best['sdpa_causal'][0]:>20.3f} "
                  f"{rate['sdpa_causal'] / rate[m]:>24.3f}")
        if args.wall_rounds > 0:
            walls = wall_clock(calls, args.wall_rounds, args.wall_threads)
            print(f"{length:>6} wall, {args.wall_threads} threads: "
                  + ", ".join(f"{m} {walls[m]:.3f} s" for m in METHODS))
        print(f"{length:>6} chunked vs sdpa_rolled on their common rows: max |difference| {diff:.2e}")
        del calls
    print("pairs/row: visible (query, key) pairs per row and head; GFLOP/s per useful FLOP (3.5 x forward); "
          "per FLOP vs sdpa_causal: the time per useful FLOP relative to sdpa_causal's (< 1: cheaper per pair)")


if __name__ == "__main__":
    main()
