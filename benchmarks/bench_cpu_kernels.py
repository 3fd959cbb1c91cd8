"""Controlled CPU-kernel measurements that complement `python -m longreach bench`.

On a shared machine the wall-clock benchmark mostly measures who else is
running: a preempted core stalls a two-thread run, and the GEMM roof moves by
2x between runs. This script pins one thread and times with the thread's own
CPU clock (time.thread_time), interleaving the methods round by round and
keeping each one's best round, so that the ratios it prints are those of the
kernels rather than of the neighbours.

    python benchmarks/bench_cpu_kernels.py ratios          # fp32: longreach vs SDPA causal vs GEMM
    python benchmarks/bench_cpu_kernels.py dtypes          # longreach fp32 vs bf16 vs fp16
    python benchmarks/bench_cpu_kernels.py small           # L = 256 and decoding (Lq = 1), in microseconds
    python benchmarks/bench_cpu_kernels.py bf16            # issue #19: bf16 vs fp32, and vs bf16 SDPA causal
    python benchmarks/bench_cpu_kernels.py bf16 --quick    # the same table at L = 1024 (a smoke run)

Useful FLOPs are counted as in docs/benchmarking.md (forward 4 * B * H * L * keys_per_row * D,
forward+backward 3.5x that; SDPA causal credited with its own causal pairs).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import longreach


def time_once(fn) -> float:
    t = time.thread_time()
    fn()
    return time.thread_time() - t


def best_time(fn, rounds: int) -> float:
    fn()  # warm-up
    return min(time_once(fn) for _ in range(rounds))


def best_interleaved(candidates: dict, rounds: int) -> dict:
    """Each candidate's best time over `rounds` rounds that run every candidate
    in turn (after one warm-up each), so that a slow spell of the machine hits
    all of them rather than one."""
    for fn in candidates.values():
        fn()  # warm-up
    best = {key: float("inf") for key in candidates}
    for _ in range(rounds):
        for key, fn in candidates.items():
            best[key] = min(best[key], time_once(fn))
    return best


def keys_per_row(length: int, left: int) -> float:
    """Exact average number of keys a causal (left, 0) window allows per row."""
    return sum(min(i + 1, left + 1) for i in range(length)) / length


def attention_call(q, k, v, backward: bool, method: str, left: int, grad_out):
    def forward():
        if method == "longreach":
            return longreach.local_attention(q, k, v, window=(left, 0), causal=True)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def run():
        if backward:
            torch.autograd.grad(forward(), (q, k, v), grad_out)
        else:
            with torch.no_grad():
                forward()

    return run


def ratios(args) -> None:
    """longreach vs SDPA causal vs a 2048^3 GEMM, interleaved, one thread, fp32."""
    heads, length, dim, left = args.heads, args.length, 64, args.left
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, length, dim, generator=gen).requires_grad_() for _ in range(3))
    grad_out = torch.randn(1, heads, length, dim, generator=gen)
    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    kpr = {"longreach": keys_per_row(length, left), "sdpa_causal": (length + 1) / 2}
    candidates = {"gemm": lambda: a @ b}
    for method in ("longreach", "sdpa_causal"):
        for backward in (False, True):
            candidates[(method, backward)] = attention_call(q, k, v, backward, method, left, grad_out)
    best = best_interleaved(candidates, args.rounds)
    gemm = 2 * 2048**3 / best["gemm"] / 1e9
    print(f"B=1 H={heads} L={length} D={dim} float32 window=({left}, 0), 1 thread, thread CPU time, "
          f"best of {args.rounds} interleaved rounds")
    print(f"GEMM 2048^3: {gemm:.1f} GFLOP/s")
    print(f"{'method':12s} {'pass':17s} {'GFLOP/s':>8s} {'of GEMM':>8s}")
    for method in ("longreach", "sdpa_causal"):
        for backward in (False, True):
            flops = 4 * heads * length * kpr[method] * dim * (3.5 if backward else 1.0)
            gf = flops / best[(method, backward)] / 1e9
            print(f"{method:12s} {'forward+backward' if backward else 'forward':17s} {gf:8.1f} {gf / gemm:8.2f}")


def dtypes(args) -> None:
    """longreach in float32, bfloat16 and float16 on the same values, interleaved."""
    heads, length, dim, left = args.heads, args.length, 64, args.left
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(1, heads, length, dim, generator=gen) for _ in range(4)]
    kinds = (torch.float32, torch.bfloat16, torch.float16)
    candidates = {}
    for dt in kinds:
        q, k, v = (t.to(dt).requires_grad_() for t in base[:3])
        for backward in (False, True):
            candidates[(dt, backward)] = attention_call(q, k, v, backward, "longreach", left, base[3].to(dt))
    best = best_interleaved(candidates, args.rounds)
    kpr = keys_per_row(length, left)
    print(f"B=1 H={heads} L={length} D={dim} window=({left}, 0), 1 thread, thread CPU time, "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'dtype':10s} {'pass':17s} {'GFLOP/s':>8s} {'time / fp32':>12s}")
    for backward in (False, True):
        for dt in kinds:
            flops = 4 * heads * length * kpr * dim * (3.5 if backward else 1.0)
            t = best[(dt, backward)]
            print(f"{str(dt).replace('torch.', ''):10s} {'forward+backward' if backward else 'forward':17s} "
                  f"{flops / t / 1e9:8.1f} {t / best[(torch.float32, backward)]:12.2f}")


def bf16(args) -> None:
    """Issue #19's table: longreach bf16 vs float32 on the same values, forward and
    forward+backward, and bf16 per useful FLOP vs PyTorch's bf16 SDPA causal, per
    (L, D); every candidate of one shape interleaved round by round. Which bf16
    kernels ran is printed (LONGREACH_CPU_BF16=0 gives the float path).
    At the default shapes SDPA causal's O(L^2) backward at L = 32768 dominates the
    run time (minutes per round)."""
    heads, left = args.heads, args.left
    lengths = [1024] if args.quick else args.lengths
    dims = args.dims
    print(f"B=1 H={heads} causal window ({left}, 0), 1 thread, thread CPU time, best of {args.rounds} "
          f"interleaved rounds; CPU kernels: {torch.ops.longreach._debug_cpu_kernels()}")
    print(f"{'L':>6s} {'D':>4s} {'pass':17s} {'fp32 ms':>9s} {'bf16 ms':>9s} {'bf16 x':>7s} "
          f"{'bf16 GF/s':>10s} {'SDPA GF/s':>10s} {'vs SDPA':>8s}")
    for length in lengths:
        for dim in dims:
            gen = torch.Generator().manual_seed(0)
            base = [torch.randn(1, heads, length, dim, generator=gen) for _ in range(4)]
            candidates = {}
            for dt in (torch.float32, torch.bfloat16):
                q, k, v = (t.to(dt).requires_grad_() for t in base[:3])
                for backward in (False, True):
                    candidates[("longreach", dt, backward)] = attention_call(q, k, v, backward, "longreach", left,
                                                                             base[3].to(dt))
                    if dt == torch.bfloat16:
                        candidates[("sdpa", dt, backward)] = attention_call(q, k, v, backward, "sdpa_causal", left,
                                                                            base[3].to(dt))
            best = best_interleaved(candidates, args.rounds)
            for backward in (False, True):
                factor = 3.5 if backward else 1.0
                useful = 4 * heads * length * keys_per_row(length, left) * dim * factor
                sdpa_useful = 4 * heads * length * (length + 1) / 2 * dim * factor  # its own causal pairs
                t32, t16 = best[("longreach", torch.float32, backward)], best[("longreach", torch.bfloat16, backward)]
                ours, sdpa = useful / t16 / 1e9, sdpa_useful / best[("sdpa", torch.bfloat16, backward)] / 1e9
                print(f"{length:6d} {dim:4d} {'forward+backward' if backward else 'forward':17s} {t32 * 1e3:9.1f} "
                      f"{t16 * 1e3:9.1f} {t32 / t16:7.2f} {ours:10.1f} {sdpa:10.1f} {ours / sdpa:8.2f}")


def small(args) -> None:
    """Small sizes, microseconds per call (best of N, one thread)."""
    cases = {
        "decode Lk=8192 window 512": (1, 8, 1, 8192, 511),
        "decode Lk=4096 unbounded": (1, 8, 1, 4096, None),
        "L=256 window 128": (1, 8, 256, 256, 127),
        "L=256 unbounded (B=2)": (2, 8, 256, 256, None),
    }
    print("1 thread, thread CPU time, best of", args.rounds)
    print(f"{'dtype':9s} {'case':27s} {'forward us':>11s} {'fwd+bwd us':>11s}")
    for dt in (torch.float32, torch.bfloat16):
        for name, (batch, heads, q_len, k_len, left) in cases.items():
            q = torch.randn(batch, heads, q_len, 64, dtype=dt, requires_grad=True)
            k, v = (torch.randn(batch, heads, k_len, 64, dtype=dt, requires_grad=True) for _ in range(2))
            grad_out = torch.randn_like(q)

            def forward():
                return longreach.local_attention(q, k, v, window=(left, 0), causal=True)

            def forward_no_grad():
                with torch.no_grad():
                    forward()

            t_fwd = best_time(forward_no_grad, args.rounds) * 1e6
            t_both = best_time(lambda: torch.autograd.grad(forward(), (q, k, v), grad_out), args.rounds) * 1e6
            print(f"{str(dt).replace('torch.', ''):9s} {name:27s} {t_fwd:11.1f} {t_both:11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("ratios", "dtypes", "small", "bf16"))
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--left", type=int, default=511, help="window (left, 0), causal (default 511)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5; 30 for small; 1 for bf16 --quick)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768], help="bf16: sequence lengths")
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128], help="bf16: head dims")
    parser.add_argument("--quick", action="store_true", help="bf16: L = 1024 only, one round (checks that it runs)")
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 30 if args.what == "small" else 1 if args.quick else 5
    torch.set_num_threads(1)
    {"ratios": ratios, "dtypes": dtypes, "small": small, "bf16": bf16}[args.what](args)


if __name__ == "__main__":
    main()
