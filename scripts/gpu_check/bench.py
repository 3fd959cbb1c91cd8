"""Speed table of the CUDA kernels on one GPU, for scripts/gpu_check.sh: longreach's sliding
window against FlexAttention with a sliding-window block mask and, when installed, flash-attn's
window_size, with SDPA (flash backend, dense causal) for calibration. bfloat16, B=1, H=16, D=128,
causal window (W-1, 0). TFLOP/s count the pairs the window allows (SDPA: the causal triangle),
forward 4 * D per pair, forward+backward 3.5x that (FlashAttention's convention). Times are the
median of `--reps` calls after a warm-up, with CUDA events.

    python scripts/gpu_check/bench.py [--csv PATH] [--reps 10] [--lengths 4096,16384] [--window 1024]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys

import torch
import torch.nn.functional as F

import longreach


def timed_ms(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def methods(q, k, v, W: int):
    L = q.shape[2]
    yield "longreach", lambda: longreach.local_attention(q, k, v, window=(W - 1, 0), causal=True), True

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    yield "sdpa_flash_dense_causal", sdpa, False
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def window_mask(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        block_mask = create_block_mask(window_mask, None, None, L, L, device=q.device)
        flex = torch.compile(flex_attention)
        yield "flex_attention_window", lambda: flex(q, k, v, block_mask=block_mask), True
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"bench: FlexAttention unavailable: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
    try:
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        yield "flash_attn_window", lambda: flash_attn_func(qt, kt, vt, causal=True, window_size=(W - 1, 0)), True
        # (its layout is (B, L, H, D): the caller's gradient is transposed to match)
    except ImportError:
        print("bench: flash-attn not installed", file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--window", type=int, default=1024)
    args = ap.parse_args()
    B, H, D, W = 1, 16, 128, args.window
    rows = []
    print(f"{'method':26} {'L':>6} {'fwd ms':>9} {'TF/s':>7} {'fwd+bwd ms':>11} {'TF/s':>7}")
    for L in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
                   for _ in range(3))
        grad = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g)
        window_pairs = B * H * sum(min(i + 1, W) for i in range(L))
        causal_pairs = B * H * L * (L + 1) // 2
        for name, fwd, windowed in methods(q, k, v, W):
            pairs = window_pairs if windowed else causal_pairs
            flops = 4 * D * pairs
            try:
                t_f = timed_ms(fwd, args.reps)
                def fwd_bwd():
                    out = fwd()
                    out.backward(grad if out.shape == grad.shape else grad.transpose(1, 2))

                t_fb = timed_ms(fwd_bwd, max(1, args.reps // 2))
            except Exception as e:  # noqa: BLE001 - one method failing must not hide the others
                print(f"{name:26} {L:6d} failed: {type(e).__name__}: {str(e)[:160]}")
                rows.append(dict(method=name, L=L, W=W, fwd_ms="", fwd_tflops="", fwdbwd_ms="", fwdbwd_tflops="",
                                 error=type(e).__name__))
                continue
            tf_f, tf_fb = flops / t_f / 1e9, 3.5 * flops / t_fb / 1e9
            print(f"{name:26} {L:6d} {t_f:9.3f} {tf_f:7.1f} {t_fb:11.3f} {tf_fb:7.1f}", flush=True)
            rows.append(dict(method=name, L=L, W=W, fwd_ms=f"{t_f:.4f}", fwd_tflops=f"{tf_f:.2f}",
                             fwdbwd_ms=f"{t_fb:.4f}", fwdbwd_tflops=f"{tf_fb:.2f}", error=""))
            for t in (q, k, v):
                t.grad = None
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"bench: wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
