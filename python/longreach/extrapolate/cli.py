"""`python -m longreach extrapolate`: train short, test long, on an embedded corpus.

Trains small byte-level language models that differ only in their attention
and position scheme, on the same data, batches and initial seed, at a short
training length, then reports held-out bits per byte at 1x..16x that length.
The opt-in schemes rope-pi-ft and rope-pi-longlora fine-tune the rope model
briefly at --finetune-len with Position Interpolation, with full or with
LongLoRA's shifted-chunk attention.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from . import data as data_mod
from . import report
from .finetune import FinetuneSettings, finetune
from .model import ModelDims, build_model, configure_for_length
from .schemes import DEFAULT_SCHEMES, SCHEMES, models_to_train, parse_scheme_list
from .train import evaluate, train

DEFAULT_OUT = "results/extrapolate"
DEFAULT_FACTORS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class Profile:
    """Defaults of one run size; every value can be overridden by its flag."""

    steps: int
    batch_size: int
    d_model: int
    layers: int
    heads: int
    eval_chunks: int
    lr: float
    finetune_steps: int  # of the opt-in fine-tuning schemes


# Budgets: the default run fits 10 minutes on a 2-core CPU (it takes 4-5), --quick a smoke test of
# about 15 s (docs/extrapolation.md has the measured times).
PROFILES = {
    "default": Profile(steps=500, batch_size=16, d_model=128, layers=2, heads=4, eval_chunks=8, lr=3e-3,
                       finetune_steps=100),
    "quick": Profile(steps=40, batch_size=8, d_model=64, layers=2, heads=4, eval_chunks=2, lr=6e-3,
                     finetune_steps=10),
}


class UsageError(ValueError):
    """A command-line value that is out of range or inconsistent with another."""


def _positive_int_list(flag: str, text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return values


def _profile_defaults(field: str) -> str:
    return f"(default: {getattr(PROFILES['default'], field)}, with --quick: {getattr(PROFILES['quick'], field)})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longreach extrapolate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES),
                   help=f"comma-separated schemes to compare (default: all but the fine-tuning schemes: "
                        f"%(default)s; also: {', '.join(n for n in SCHEMES if n not in DEFAULT_SCHEMES)})")
    p.add_argument("--list-schemes", action="store_true", help="describe the schemes and exit")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="a text file or a folder of text files (default: the Python standard "
                        "library's own sources)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help="folder for results.csv, results.md and bpb_vs_length.png (default: %(default)s)")
    p.add_argument("--train-len", type=int, default=256, help="training length in bytes (default: %(default)s)")
    p.add_argument("--eval-lengths", metavar="L1,L2,..", default=None,
                   help="evaluation lengths in bytes, multiples of --train-len including it "
                        "(default: 1x,2x,4x,8x,16x the training length)")
    p.add_argument("--window", type=int, default=None,
                   help="keys a query sees in the sliding-window schemes, itself included "
                        "(default: half the training length)")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast run for smoke tests (about 15 s on 2 cores)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model {_profile_defaults('steps')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"training sequences per step {_profile_defaults('batch_size')}")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (AdamW) {_profile_defaults('lr')}")
    p.add_argument("--d-model", type=int, default=None, help=f"model width {_profile_defaults('d_model')}")
    p.add_argument("--layers", type=int, default=None, help=f"transformer blocks {_profile_defaults('layers')}")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads {_profile_defaults('heads')}")
    p.add_argument("--eval-chunks", type=int, default=None,
                   help=f"held-out chunks of the longest length scored at every length "
                        f"{_profile_defaults('eval_chunks')}")
    g = p.add_argument_group("fine-tuning schemes (rope-pi-ft, rope-pi-longlora)")
    g.add_argument("--finetune-len", type=int, default=None,
                   help="fine-tuning length in bytes, a multiple of --train-len above it; PI's factor is "
                        "finetune-len / train-len (default: the longest evaluation length)")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help=f"fine-tuning steps {_profile_defaults('finetune_steps')}")
    g.add_argument("--finetune-batch-size", type=int, default=None,
                   help="fine-tuning sequences per step (default: as many bytes per step as training, "
                        "batch-size x train-len / finetune-len, at least 1)")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="peak fine-tuning learning rate (default: a tenth of --lr, where training's "
                        "schedule ends)")
    g.add_argument("--finetune-chunk", type=int, default=None,
                   help="chunk of rope-pi-longlora's S2-Attn fine-tune, 2 <= chunk < finetune-len; half "
                        "the heads shift it by chunk // 2 (default: --train-len)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation and batches (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill profile defaults and check every value; raises UsageError naming the flag."""
    prof = PROFILES["quick" if args.quick else "default"]
    for field in ("steps", "batch_size", "d_model", "layers", "heads", "eval_chunks", "lr", "finetune_steps"):
        if getattr(args, field) is None:
            setattr(args, field, getattr(prof, field))

    try:
        args.scheme_names = parse_scheme_list(args.schemes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    for flag, value in [("--steps", args.steps), ("--batch-size", args.batch_size), ("--d-model", args.d_model),
                        ("--layers", args.layers), ("--heads", args.heads), ("--eval-chunks", args.eval_chunks),
                        ("--finetune-steps", args.finetune_steps)]:
        if value < 1:
            raise UsageError(f"{flag}: expected a positive integer, got {value}")
    if not args.lr > 0:
        raise UsageError(f"--lr: expected a positive number, got {args.lr}")
    if args.train_len < 2:
        raise UsageError(f"--train-len: expected at least 2 bytes, got {args.train_len}")

    if args.eval_lengths is None:
        args.lengths = [args.train_len * f for f in DEFAULT_FACTORS]
    else:
        args.lengths = sorted(set(_positive_int_list("--eval-lengths", args.eval_lengths)))
        bad = [L for L in args.lengths if L % args.train_len]
        if bad:
            raise UsageError(f"--eval-lengths: {bad[0]} is not a multiple of --train-len {args.train_len}")
        if args.train_len not in args.lengths:
            raise UsageError(
                f"--eval-lengths: must include the training length {args.train_len}, the baseline "
                f"the longer lengths are compared with; got {args.eval_lengths!r}"
            )
        longest = args.lengths[-1]
        bad = [L for L in args.lengths if longest % L]
        if bad:
            raise UsageError(
                f"--eval-lengths: the longest length {longest} must be a multiple of every length "
                f"(each scores the same bytes), but {bad[0]} does not divide it"
            )

    _resolve_finetune(args)

    if args.window is None:
        args.window = max(1, args.train_len // 2)
    if not 1 <= args.window < args.train_len:
        raise UsageError(
            f"--window: expected 1 <= window < --train-len {args.train_len} (so the sliding-window "
            f"schemes train with the window in force), got {args.window}"
        )

    if args.d_model % args.heads:
        raise UsageError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    head_dim = args.d_model // args.heads
    if head_dim % 2:
        raise UsageError(f"--d-model / --heads = {head_dim}: RoPE needs an even head size")
    if args.heads % 2 and any(SCHEMES[n].alibi == "balanced" for n in args.scheme_names):
        raise UsageError(f"--heads: SWAT's balanced ALiBi splits the heads in two halves, needs an even "
                         f"number, got {args.heads}")

    if args.data is not None:
        if not os.path.exists(args.data):
            raise UsageError(f"--data: {args.data!r} does not exist")
        if not os.access(args.data, os.R_OK):
            raise UsageError(f"--data: {args.data!r} is not readable")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out: {args.out!r} exists and is not a folder")
    if args.device != "cpu":
        try:
            torch.empty(0, device=args.device)
        except (RuntimeError, AssertionError) as exc:
            raise UsageError(f"--device: {args.device!r} is not usable here: {exc}") from None
    return args


def _resolve_finetune(args: argparse.Namespace) -> None:
    """Defaults and checks of the fine-tuning flags (checked also when no fine-tuning scheme runs,
    except that the default length may then be the training length)."""
    if args.finetune_len is None:
        args.finetune_len = args.lengths[-1]
        if args.finetune_len == args.train_len:
            if any(SCHEMES[n].finetune for n in args.scheme_names):
                raise UsageError(f"--finetune-len: the fine-tuning schemes fine-tune beyond the training length, "
                                 f"but the longest --eval-lengths is the training length {args.train_len}; give "
                                 f"longer evaluation lengths or --finetune-len")
            args.finetune_len = 2 * args.train_len  # unused: no scheme fine-tunes
    elif args.finetune_len <= args.train_len or args.finetune_len % args.train_len:
        raise UsageError(f"--finetune-len: expected a multiple of --train-len {args.train_len} above it, "
                         f"got {args.finetune_len}")
    if args.finetune_batch_size is None:
        args.finetune_batch_size = max(1, args.batch_size * args.train_len // args.finetune_len)
    elif args.finetune_batch_size < 1:
        raise UsageError(f"--finetune-batch-size: expected a positive integer, got {args.finetune_batch_size}")
    if args.finetune_lr is None:
        args.finetune_lr = args.lr / 10
    elif not args.finetune_lr > 0:
        raise UsageError(f"--finetune-lr: expected a positive number, got {args.finetune_lr}")
    if args.finetune_chunk is None:
        args.finetune_chunk = args.train_len
    if not 2 <= args.finetune_chunk < args.finetune_len:
        raise UsageError(f"--finetune-chunk: expected 2 <= chunk < --finetune-len {args.finetune_len} (so "
                         f"the chunks restrict the fine-tune's attention), got {args.finetune_chunk}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed and checked arguments; argparse-level errors exit, value errors raise UsageError."""
    return _resolve(build_parser().parse_args(argv))


def run(args: argparse.Namespace, argv_for_record: Sequence[str] = ()) -> Dict[str, Dict[int, float]]:
    """The study; writes the output folder and returns bits per byte per scheme and length."""
    progress = not args.no_progress
    t0 = time.perf_counter()
    corpus = data_mod.load_corpus(args.data)
    chunks = data_mod.evaluation_chunks(corpus, args.lengths[-1], args.eval_chunks)
    stream = data_mod.training_stream(corpus)
    dims = ModelDims(d_model=args.d_model, layers=args.layers, heads=args.heads)
    bytes_scored = chunks.shape[0] * args.lengths[-1]

    print(f"corpus: {corpus.describe()}")
    settings = (f"{dims.layers} layers, width {dims.d_model}, {dims.heads} heads; {args.steps} training steps of "
                f"{args.batch_size} x {args.train_len} bytes, peak lr {args.lr}; window {args.window}; seed {args.seed}")
    ft = FinetuneSettings(length=args.finetune_len, steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                          lr=args.finetune_lr, chunk=args.finetune_chunk)
    finetuned = [n for n in args.scheme_names if SCHEMES[n].finetune]
    if finetuned:
        settings += (f"; fine-tuning ({', '.join(finetuned)}): {ft.steps} steps of {ft.batch_size} x {ft.length} "
                     f"bytes with PI factor {ft.length // args.train_len}, peak lr {ft.lr:g}; "
                     f"S2-Attn chunk {ft.chunk}, half the heads shifted by {ft.chunk // 2}")
    print(f"model: {settings}")
    print(f"eval: {bytes_scored:,} held-out bytes at lengths {', '.join(map(str, args.lengths))}")

    results: Dict[str, Dict[int, float]] = {}
    timings: Dict[str, float] = {}
    train_bpb: Dict[str, float] = {}
    finetunes: Dict[str, object] = {}  # scheme -> TrainResult of its fine-tune
    bases = {SCHEMES[n].base for n in finetuned}
    base_states: Dict[str, Dict[str, torch.Tensor]] = {}  # trained weights the fine-tunes start from
    for weights in models_to_train(args.scheme_names):  # a base comes before its fine-tunes
        w = SCHEMES[weights]
        if w.finetune:
            model, tr = finetune(w, base_states[w.base], dims, args.train_len, ft, stream, args.seed,
                                 args.device, progress)
            timings[f"fine-tune {weights}"] = tr.seconds
            finetunes[weights] = tr
        else:
            model = build_model(w, dims, args.window, args.train_len, args.seed)
            sampler = data_mod.BatchSampler(stream, args.train_len, args.batch_size, args.seed)
            tr = train(model, sampler, args.steps, args.lr, args.device, progress, desc=f"train {weights}")
            timings[f"train {weights}"] = tr.seconds
            if weights in bases:
                base_states[weights] = copy.deepcopy(model.state_dict())
        train_bpb[weights] = tr.final_bpb
        for name in args.scheme_names:
            scheme = SCHEMES[name]
            if scheme.weights != weights:
                continue
            t = time.perf_counter()
            results[name] = evaluate(
                model, chunks, args.lengths,
                configure=lambda L, s=scheme: configure_for_length(model, s, args.train_len, L, args.finetune_len),
                device=args.device, progress=progress, desc=f"eval {name}",
            )
            timings[f"eval {name}"] = time.perf_counter() - t
    results = {n: results[n] for n in args.scheme_names}
    total = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "results.csv", results, args.train_len, bytes_scored)
    title = f"trained at {args.train_len} bytes, {args.steps} steps; held-out {corpus.source.split(' (')[0]}"
    report.plot(out / "bpb_vs_length.png", results, args.train_len, title)
    command = "python -m longreach extrapolate" + "".join(" " + shlex.quote(a) for a in argv_for_record)
    text_table = report.table(results, args.train_len)
    run_notes = report.notes(results, args.train_len)
    if args.quick:
        run_notes.insert(0, "--quick trains for a smoke test only: its models are barely trained and its "
                            "numbers do not test the papers' claims.")
    training = ", ".join(f"{k} {v:.3f}" for k, v in train_bpb.items())
    report.write_markdown(
        out / "results.md", results, args.train_len, command=command, corpus=corpus.describe(),
        settings=f"{settings}; final training bits per byte: {training}",
        bytes_scored=bytes_scored, names=args.scheme_names, run_notes=run_notes,
        timing=f"{total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})",
        finetuning=report.finetune_cost(finetunes),
    )
    print()
    print("held-out bits per byte (lower is better); 'flat' = within "
          f"{report.FLAT_TOLERANCE} of the {args.train_len}-byte value")
    print(text_table)
    for note in run_notes:
        print(f"note: {note}")
    if finetunes:
        print(f"fine-tuning cost: {report.finetune_cost(finetunes)}")
    print()
    print(f"total {total:.0f} s; wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'bpb_vs_length.png'}")
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_schemes:
        for name in SCHEMES:
            print(f"{name:13s} {SCHEMES[name].summary}\n{'':13s} paper: {SCHEMES[name].paper}")
        return 0
    try:
        args = _resolve(args)
        run(args, argv)
    except (UsageError, data_mod.DataError) as exc:
        parser.error(str(exc))
    return 0
