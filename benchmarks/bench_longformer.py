"""Hugging Face Longformer, unpatched vs `longreach.hf.patch`-ed: forward+backward time and peak memory on CPU.

    .venv/bin/python benchmarks/bench_longformer.py                       # lengths 4096 16384
    .venv/bin/python benchmarks/bench_longformer.py --lengths 4096 --repeats 5 --global-tokens 0

The model is a LongformerModel built from a config with random weights
(default: hidden 256, 4 heads, 2 layers, attention_window 512, dropout 0).
One step is forward + backward of `(last_hidden_state * readout).mean()` on one
sequence (fixed random readout) with `--global-tokens` global tokens at the
start (like <s> for classification).

Each (variant, length) runs in its own subprocess so the memory numbers do
not see each other's allocations:
- time: median of `--repeats` steps after one warm-up step;
- peak memory: growth of the process's resident set during one step. glibc is
  told to serve allocations >= 128 KiB with mmap (so freed memory really leaves
  the process), the kernel's peak-RSS mark is reset through
  /proc/self/clear_refs, and the peak is read back from VmHWM. Linux only.
The loss of each variant is printed too: both must compute the same model.
Compare ratios within one run, not absolute times across runs or machines.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import time

MARK = "@@bench_longformer@@ "


def _glibc_return_freed_memory():
    """mmap every allocation >= 128 KiB, so freeing it returns it to the OS and RSS tracks live memory."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    return libc


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_child(args) -> dict:
    libc = _glibc_return_freed_memory()
    import torch
    from transformers import LongformerConfig, LongformerModel
    from transformers.utils import logging as hf_logging

    import longreach.hf

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    length = args.length
    config = LongformerConfig(
        vocab_size=1000, hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.hidden, attention_window=args.window, max_position_embeddings=length + 2,
        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, pad_token_id=1,
    )
    model = LongformerModel(config, add_pooling_layer=False).train()
    if args.variant == "longreach":
        longreach.hf.patch(model)
    ids = torch.randint(3, 1000, (1, length), generator=torch.Generator().manual_seed(1))
    global_mask = torch.zeros(1, length, dtype=torch.long)
    global_mask[:, : args.global_tokens] = 1
    # A fixed random readout: the loss then depends on every hidden value (a mean square after
    # LayerNorm would be ~1 whatever the model computes).
    readout = torch.randn(1, length, args.hidden, generator=torch.Generator().manual_seed(2))

    def step():
        model.zero_grad(set_to_none=True)
        loss = (model(ids, global_attention_mask=global_mask).last_hidden_state * readout).mean()
        loss.backward()
        return loss.item()

    loss = step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)

    model.zero_grad(set_to_none=True)
    if libc is not None:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"variant": args.variant, "length": length, "median_s": statistics.median(times),
            "min_s": min(times), "peak_mib": (peak - base) / 1024, "loss": loss}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--window", type=int, default=512, help="Longformer attention_window (even)")
    parser.add_argument("--global-tokens", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=["hf", "longreach"], choices=["hf", "longreach"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(MARK + json.dumps(run_child(args)), flush=True)
        return

    common = ["--hidden", args.hidden, "--heads", args.heads, "--layers", args.layers, "--window", args.window,
              "--global-tokens", args.global_tokens, "--repeats", args.repeats, "--threads", args.threads]
    print(f"LongformerModel hidden={args.hidden} heads={args.heads} layers={args.layers} "
          f"attention_window={args.window} global_tokens={args.global_tokens} batch=1 float32, "
          f"forward+backward, {args.threads} threads, median of {args.repeats}")
    print(f"{'length':>7} {'variant':>10} {'median s':>9} {'min s':>8} {'peak MiB':>9} {'loss':>14}")
    for length in args.lengths:
        rows = {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", "--variant", variant, "--length", str(length)]
            cmd += [str(c) for c in common]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith(MARK)]
            if proc.returncode != 0 or not lines:
                print(f"{length:>7} {variant:>10} failed:\n{proc.stderr[-2000:]}")
                continue
            r = rows[variant] = json.loads(lines[-1][len(MARK):])
            print(f"{length:>7} {variant:>10} {r['median_s']:>9.3f} {r['min_s']:>8.3f} {r['peak_mib']:>9.1f} "
                  f"{r['loss']:>14.8f}", flush=True)
        if "hf" in rows and "longreach" in rows:
            hf, lr = rows["hf"], rows["longreach"]
            print(f"{length:>7} {'hf/ours':>10} {hf['median_s'] / lr['median_s']:>8.2f}x {'':>8} "
                  f"{hf['peak_mib'] / max(lr['peak_mib'], 1e-9):>8.2f}x", flush=True)


if __name__ == "__main__":
    main()
