"""`python -m longreach extrapolate`: train short, test long, on an embedded corpus.

Trains small byte-level language models that differ only in their attention
and position scheme, on the same data, batches and initial seed, at a short
training length, then reports held-out bits per byte at 1x..16x that length,
mean and spread over several seeds, and how much each model uses long inputs.
The fine-tuning schemes (rope-pi-ft, rope-yarn-ft, rope-pi-longlora) fine-tune
the rope model briefly at --finetune-len with PI or YaRN, with full or with
LongLoRA's shifted-chunk attention. --list-schemes describes every scheme and
its paper.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from longreach import __version__ as LONGREACH_VERSION
from longreach.position_ids import pose_position_ids

from . import data as data_mod
from . import report
from .finetune import FinetuneSettings, finetune
from .model import ModelDims, build_model, configure_for_length
from .schemes import DEFAULT_SCHEMES, SCHEMES, models_to_train, parse_scheme_list
from .train import TrainResult, evaluate, train
from .workers import run_jobs

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
    muon_lr: float  # Muon's peak on the weight matrices (--optimizer muon, the default)
    finetune_steps: int  # of the fine-tuning schemes: a few percent of the training steps
    seeds: int
    schemes: Tuple[str, ...]


FULL_SCHEMES = tuple(DEFAULT_SCHEMES) + ("sliding-rope", "rope-pose", "rope-pi-longlora")

# Budgets (docs/extrapolation.md, "Run time and the profiles"): default is sized for about 10 minutes
# on 2 CPU cores with AMX (`make demo`: 4 trained models and 2 fine-tunes per seed, 3 seeds, bfloat16,
# 2 one-thread workers), full for about an hour (6 trained models, 3 fine-tunes per seed), quick is
# a smoke test of 15-40 s. The fine-tunes get 4 % of the training steps (PI's paper fine-tunes 1000
# steps, YaRN's 400).
PROFILES = {
    # Muon at peak 0.02 on the weight matrices and AdamW at 6e-3 on the rest (train.py's beta1 and
    # warm-up, model.py's init): rope, one seed, 1000 steps of 8 x 256 bytes, held-out 1.80 bits
    # per byte against 2.02 with AdamW alone at its best peak, 3e-3 (docs/extrapolation.md, "How
    # the default was set"). Muon's step costs about 11 % more; 800 steps keep the run near 10 min.
    "default": Profile(steps=800, batch_size=8, d_model=128, layers=2, heads=4, eval_chunks=4, lr=6e-3,
                       muon_lr=0.02, finetune_steps=32, seeds=3, schemes=tuple(DEFAULT_SCHEMES)),
    "full": Profile(steps=2000, batch_size=16, d_model=128, layers=2, heads=4, eval_chunks=8, lr=6e-3,
                    muon_lr=0.02, finetune_steps=80, seeds=3, schemes=FULL_SCHEMES),
    "quick": Profile(steps=40, batch_size=8, d_model=64, layers=2, heads=4, eval_chunks=2, lr=6e-3,
                     muon_lr=0.02, finetune_steps=2, seeds=1, schemes=tuple(DEFAULT_SCHEMES)),
}
PROFILE_FIELDS = ("steps", "batch_size", "d_model", "layers", "heads", "eval_chunks", "lr", "muon_lr",
                  "finetune_steps", "seeds")


PRECISIONS = ("auto", "float32", "bfloat16")
OPTIMIZERS = ("muon", "adamw")


def cpu_has_amx() -> bool:
    """Whether this CPU advertises AMX bf16 tiles (Linux's /proc/cpuinfo; False elsewhere), where
    PyTorch's bfloat16 matmuls run on AMX and beat float32 (elsewhere, e.g. AVX512_BF16 without
    AMX, oneDNN's bf16 GEMM measured slower than float32: issue 19)."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``--precision auto`` made concrete for ``device``: "bfloat16" or "float32"."""
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cpu":
        return "bfloat16" if cpu_has_amx() else "float32"
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def autocast_dtype(args: argparse.Namespace) -> Optional[torch.dtype]:
    return torch.bfloat16 if args.precision == "bfloat16" else None


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
    return "(" + ", ".join(f"{name}: {getattr(prof, field)}" for name, prof in PROFILES.items()) + ")"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="longreach extrapolate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--schemes", default=None,
                   help=f"comma-separated schemes to compare (default profile and --quick: "
                        f"{','.join(DEFAULT_SCHEMES)}; full profile adds "
                        f"{', '.join(n for n in FULL_SCHEMES if n not in DEFAULT_SCHEMES)})")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="run size: default (about 10 minutes on 2 cores, 3 seeds), full (about an hour) "
                        "or quick (= --quick)")
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
                   help="a small, fast run for smoke tests (about 15 s on 2 cores; one seed)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per model {_profile_defaults('steps')}")
    p.add_argument("--batch-size", type=int, default=None, help=f"training sequences per step {_profile_defaults('batch_size')}")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate of AdamW (with --optimizer muon: of the embedding, norms and "
                        f"biases) {_profile_defaults('lr')}")
    p.add_argument("--optimizer", default="muon", choices=OPTIMIZERS,
                   help="muon: Muon on the weight matrices, AdamW on the rest; adamw: AdamW on every "
                        "parameter (default: %(default)s)")
    p.add_argument("--muon-lr", type=float, default=None,
                   help=f"peak learning rate of Muon (--optimizer muon) {_profile_defaults('muon_lr')}")
    p.add_argument("--d-model", type=int, default=None, help=f"model width {_profile_defaults('d_model')}")
    p.add_argument("--layers", type=int, default=None, help=f"transformer blocks {_profile_defaults('layers')}")
    p.add_argument("--heads", type=int, default=None, help=f"attention heads {_profile_defaults('heads')}")
    p.add_argument("--eval-chunks", type=int, default=None,
                   help=f"held-out chunks of the longest length scored at every length "
                        f"{_profile_defaults('eval_chunks')}")
    p.add_argument("--swat-slope-scale", type=float, default=1.0,
                   help="magnitude S of swat's balanced ALiBi slopes +-S/2^k, k = 1..heads/2 (default: "
                        "%(default)s, longreach.alibi_slopes('balanced'))")
    g = p.add_argument_group("fine-tuning schemes (rope-pi-ft, rope-yarn-ft, rope-pi-longlora)")
    g.add_argument("--finetune-len", type=int, default=None,
                   help="fine-tuning length in bytes, a multiple of --train-len above it; PI's factor is "
                        "finetune-len / train-len (default: the longest evaluation length)")
    g.add_argument("--finetune-steps", type=int, default=None,
                   help=f"fine-tuning steps, 0 or more {_profile_defaults('finetune_steps')}")
    g.add_argument("--finetune-batch-size", type=int, default=None,
                   help="fine-tuning sequences per step (default: as many bytes per step as training, "
                        "batch-size x train-len / finetune-len, at least 1)")
    g.add_argument("--finetune-lr", type=float, default=None,
                   help="peak fine-tuning learning rate of AdamW (default: a tenth of --lr, where "
                        "training's schedule ends); Muon's is --muon-lr times the same ratio")
    g.add_argument("--finetune-chunk", type=int, default=None,
                   help="chunk of rope-pi-longlora's S2-Attn fine-tune, 2 <= chunk < finetune-len; half "
                        "the heads shift it by chunk // 2 (default: --train-len)")
    p.add_argument("--seed", type=int, default=0,
                   help="first seed for initialisation and batches; seed i of --seeds is --seed + i "
                        "(default: %(default)s)")
    p.add_argument("--seeds", type=int, default=None,
                   help=f"seeds to run, each trains every model afresh {_profile_defaults('seeds')}")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="training arithmetic: float32, or bfloat16 autocast (mixed precision, float32 "
                        "weights); auto: bfloat16 on CPUs with AMX and on CUDA devices that support it, "
                        "where it is faster, else float32. Evaluation is float32 always (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes training the (seed, model) jobs side by side, each on torch threads / "
                        "workers threads (default on CPU: one per torch thread, at most one per job; "
                        "other devices: 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill profile defaults and check every value; raises UsageError naming the flag."""
    if args.profile is None:
        args.profile = "quick" if args.quick else "default"
    elif args.profile not in PROFILES:
        raise UsageError(f"--profile: unknown profile {args.profile!r}; expected one of {', '.join(PROFILES)}")
    elif args.quick and args.profile != "quick":
        raise UsageError(f"--quick is the quick profile; it contradicts --profile {args.profile}")
    prof = PROFILES[args.profile]
    for field in PROFILE_FIELDS:
        if getattr(args, field) is None:
            setattr(args, field, getattr(prof, field))

    try:
        args.scheme_names = parse_scheme_list(",".join(prof.schemes) if args.schemes is None else args.schemes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    for flag, value in [("--steps", args.steps), ("--batch-size", args.batch_size), ("--d-model", args.d_model),
                        ("--layers", args.layers), ("--heads", args.heads), ("--eval-chunks", args.eval_chunks),
                        ("--seeds", args.seeds)]:
        if value < 1:
            raise UsageError(f"{flag}: expected a positive integer, got {value}")
    if args.finetune_steps < 0:
        raise UsageError(f"--finetune-steps: expected an integer >= 0, got {args.finetune_steps}")
    if not args.lr > 0:
        raise UsageError(f"--lr: expected a positive number, got {args.lr}")
    if not args.muon_lr > 0:
        raise UsageError(f"--muon-lr: expected a positive number, got {args.muon_lr}")
    if not args.swat_slope_scale > 0:
        raise UsageError(f"--swat-slope-scale: expected a positive number, got {args.swat_slope_scale}")
    if args.train_len < 2:
        raise UsageError(f"--train-len: expected at least 2 bytes, got {args.train_len}")

    if args.eval_lengths is None:
        args.lengths = [args.train_len * f for f in DEFAULT_FACTORS]
    else:
        args.lengths = sorted(set(_positive_int_list("--eval-lengths", args.eval_lengths)))
        if args.train_len > args.lengths[-1]:
            raise UsageError(f"--train-len {args.train_len} is longer than the longest --eval-lengths "
                             f"{args.lengths[-1]}: the study evaluates at the training length and beyond")
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
    args.precision = resolve_precision(args.precision, args.device)
    jobs = len(plan_jobs(args.scheme_names, [args.seed + i for i in range(args.seeds)]))
    if args.workers is None:
        args.workers = min(torch.get_num_threads(), jobs) if torch.device(args.device).type == "cpu" else 1
    elif args.workers < 1:
        raise UsageError(f"--workers: expected a positive integer, got {args.workers}")
    args.workers = min(args.workers, jobs)
    args.threads_per_worker = max(1, torch.get_num_threads() // args.workers)
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


def environment(args: argparse.Namespace) -> str:
    """Versions, precision and threads, for results.md: the same seed gives the same numbers only on
    the same versions, precision and threads per job."""
    layout = (f"{args.workers} worker processes x {args.threads_per_worker} torch thread(s)" if args.workers > 1
              else f"{torch.get_num_threads()} torch threads")
    return (f"longreach {LONGREACH_VERSION}, torch {torch.__version__}, Python {platform.python_version()}, "
            f"{args.precision} training, {layout} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}), {os.cpu_count()} CPUs, "
            f"{platform.machine()}")


def training_muon_lr(args: argparse.Namespace) -> Optional[float]:
    """Muon's peak learning rate for train(), None when training uses AdamW alone."""
    return args.muon_lr if args.optimizer == "muon" else None


def pose_ids(train_len: int, target_len: int, seed: int):
    """Each step's PoSE position ids (2 chunks, covering [0, target_len)), from a generator of
    their own so the batches stay those of every other scheme."""
    generator = torch.Generator().manual_seed(seed + 1_000_003)
    return lambda batch: pose_position_ids(train_len, target_len, num_chunks=2, batch_size=batch,
                                           generator=generator)


@dataclass(frozen=True)
class Job:
    """One unit of the study's work: with ``seed``, train ``weights[0]``, fine-tune the others from
    it, and evaluate every selected scheme that uses one of them. Jobs share nothing, so they can
    run in separate processes (workers.py)."""

    seed: int
    weights: Tuple[str, ...]


def plan_jobs(scheme_names: Sequence[str], seeds: Sequence[int]) -> List[Job]:
    """The jobs of a run, longest first (those with fine-tunes), then by seed and first use."""
    groups: Dict[str, List[str]] = {}
    for weights in models_to_train(scheme_names):  # a base comes before its fine-tunes
        root = weights
        while SCHEMES[root].finetune:
            root = SCHEMES[SCHEMES[root].base].weights
        groups.setdefault(root, []).append(weights)
    jobs = [Job(seed, tuple(group)) for seed in seeds for group in groups.values()]
    return sorted(jobs, key=lambda job: -len(job.weights))  # stable: seed, then first-use order


@dataclass
class JobRun:
    """What one job produced, by scheme (bpb, context) and by weights name (training)."""

    bpb: Dict[str, Dict[int, float]]
    context: Dict[str, Dict[int, Tuple[float, float]]]
    training: Dict[str, TrainResult]
    timings: Dict[str, float]


@dataclass(frozen=True)
class StudyData:
    """What every job reads: the checked arguments, the data and the fixed settings (sent once to
    each worker process)."""

    args: argparse.Namespace
    stream: torch.Tensor
    chunks: torch.Tensor
    dims: ModelDims
    ft: FinetuneSettings


def run_job(job: Job, study: StudyData, progress) -> JobRun:
    """Train, fine-tune and evaluate ``job``; ``progress`` as train() takes it."""
    args, dims, ft = study.args, study.dims, study.ft
    autocast = autocast_dtype(args)
    results: Dict[str, Dict[int, float]] = {}
    context: Dict[str, Dict[int, Tuple[float, float]]] = {}
    training: Dict[str, TrainResult] = {}
    timings: Dict[str, float] = {}
    base_states: Dict[str, Dict[str, torch.Tensor]] = {}  # trained weights the fine-tunes start from
    seed = job.seed
    tag = f" seed {seed}" if args.seeds > 1 else ""
    for weights in job.weights:
        w = SCHEMES[weights]
        if w.finetune:
            model, tr = finetune(w, base_states[w.base], dims, args.train_len, ft, study.stream, seed,
                                 args.device, progress, desc_suffix=tag, autocast=autocast)
            timings[f"fine-tune {weights}"] = tr.seconds
        else:
            model = build_model(w, dims, args.window, args.train_len, seed)
            sampler = data_mod.BatchSampler(study.stream, args.train_len, args.batch_size, seed)
            ids = pose_ids(args.train_len, args.lengths[-1], seed) if w.pose else None
            tr = train(model, sampler, args.steps, args.lr, args.device, progress, desc=f"train {weights}{tag}",
                       position_ids=ids, autocast=autocast, muon_lr=training_muon_lr(args))
            timings[f"train {weights}"] = tr.seconds
            if len(job.weights) > 1:
                base_states[weights] = copy.deepcopy(model.state_dict())
        training[weights] = tr
        for name in args.scheme_names:
            scheme = SCHEMES[name]
            if scheme.weights != weights:
                continue
            t = time.perf_counter()
            context[name] = {}
            results[name] = evaluate(
                model, study.chunks, args.lengths,
                configure=lambda L, s=scheme: configure_for_length(model, s, args.train_len, L, args.finetune_len,
                                                                   dims),
                device=args.device, progress=progress, desc=f"eval {name}{tag}", context=context[name],
            )
            timings[f"eval {name}"] = time.perf_counter() - t
    return JobRun(results, context, training, timings)


@dataclass
class SeedRun:
    """What one seed's jobs produced, the schemes in the run's order."""

    bpb: Dict[str, Dict[int, float]]
    context: Dict[str, Dict[int, Tuple[float, float]]]
    training: Dict[str, TrainResult]  # trained models and fine-tunes, by weights name, in training order
    timings: Dict[str, float]


def seed_runs(args: argparse.Namespace, jobs: Sequence[Job], done: Sequence[JobRun]) -> List[SeedRun]:
    """The jobs' results gathered per seed, in --seed order."""
    order = models_to_train(args.scheme_names)
    out = []
    for seed in [args.seed + i for i in range(args.seeds)]:
        mine = [r for j, r in zip(jobs, done) if j.seed == seed]
        merged = JobRun({}, {}, {}, {})
        for r in mine:
            merged.bpb.update(r.bpb)
            merged.context.update(r.context)
            merged.training.update(r.training)
            merged.timings.update(r.timings)
        out.append(SeedRun({n: merged.bpb[n] for n in args.scheme_names},
                           {n: merged.context[n] for n in args.scheme_names},
                           {w: merged.training[w] for w in order}, merged.timings))
    return out


def run(args: argparse.Namespace, argv_for_record: Sequence[str] = ()) -> List[Dict[str, Dict[int, float]]]:
    """The study; writes the output folder and returns, per seed, bits per byte per scheme and length."""
    progress = not args.no_progress
    t0 = time.perf_counter()
    corpus = data_mod.load_corpus(args.data)
    chunks = data_mod.evaluation_chunks(corpus, args.lengths[-1], args.eval_chunks)
    stream = data_mod.training_stream(corpus)
    dims = ModelDims(d_model=args.d_model, layers=args.layers, heads=args.heads,
                     balanced_slope_scale=args.swat_slope_scale)
    bytes_scored = chunks.shape[0] * args.lengths[-1]
    seeds = [args.seed + i for i in range(args.seeds)]

    print(f"corpus: {corpus.describe()}")
    muon_lr = training_muon_lr(args)
    optimizer = (f"Muon peak lr {args.muon_lr:g} on the weight matrices, AdamW peak lr {args.lr:g} on the rest"
                 if muon_lr is not None else f"AdamW peak lr {args.lr:g}")
    settings = (f"profile {args.profile}; {dims.layers} layers, width {dims.d_model}, {dims.heads} heads; "
                f"{args.steps} training steps of {args.batch_size} x {args.train_len} bytes, {optimizer}; "
                f"window {args.window}; swat slopes +-{args.swat_slope_scale:g}/2^k; {args.precision} training; "
                f"seeds {', '.join(map(str, seeds))}")
    ft = FinetuneSettings(length=args.finetune_len, steps=args.finetune_steps, batch_size=args.finetune_batch_size,
                          lr=args.finetune_lr, chunk=args.finetune_chunk,
                          muon_lr=None if muon_lr is None else muon_lr * args.finetune_lr / args.lr)
    finetuned = [n for n in args.scheme_names if SCHEMES[n].finetune]
    if finetuned:
        settings += (f"; fine-tuning ({', '.join(finetuned)}): {ft.steps} steps of {ft.batch_size} x {ft.length} "
                     f"bytes with factor {ft.length // args.train_len}, peak lr {ft.lr:g}"
                     + ("" if ft.muon_lr is None else f" (Muon {ft.muon_lr:g})"))
        if any(SCHEMES[n].finetune == "chunked" for n in finetuned):
            settings += f"; S2-Attn chunk {ft.chunk}, half the heads shifted by {ft.chunk // 2}"
    if any(SCHEMES[n].pose for n in args.scheme_names):
        settings += f"; PoSE ids: 2 chunks covering {args.lengths[-1]} positions"
    print(f"model: {settings}")
    print(f"eval: {bytes_scored:,} held-out bytes at lengths {', '.join(map(str, args.lengths))}")

    jobs = plan_jobs(args.scheme_names, seeds)
    done = run_jobs(run_job, jobs, StudyData(args, stream, chunks, dims, ft), args.workers, args.threads_per_worker,
                    progress)
    by_seed = seed_runs(args, jobs, done)
    runs = [r.bpb for r in by_seed]
    contexts = [r.context for r in by_seed]
    total = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report.write_csv(out / "results.csv", runs, args.train_len, bytes_scored, seeds, contexts)
    held = corpus.source.split(" (")[0]
    seeds_text = f"{len(seeds)} seeds" if len(seeds) > 1 else f"seed {seeds[0]}"
    report.plot(out / "bpb_vs_length.png", runs, args.train_len,
                f"trained at {args.train_len} bytes, {args.steps} steps, {seeds_text}; held-out {held}")
    curves = {w: [r.training[w].losses for r in by_seed] for w in by_seed[0].training}
    report.write_training_csv(out / "training.csv", curves, seeds)
    report.plot_training(out / "training_curves.png", curves,
                         f"training bits per byte, {args.train_len}-byte batches (fine-tunes at {ft.length}), "
                         f"{seeds_text}",
                         offsets={w: args.steps for w in curves if SCHEMES[w].finetune})
    command = "python -m longreach extrapolate" + "".join(" " + shlex.quote(a) for a in argv_for_record)
    text_table = report.table(runs, args.train_len)
    run_notes = report.notes(runs, args.train_len)
    if args.profile == "quick":
        run_notes.insert(0, "--quick trains for a smoke test only: its models are barely trained and its "
                            "numbers do not test the papers' claims.")
    training = ", ".join(
        f"{w} {report._cell([r.training[w].final_bpb for r in by_seed])}" for w in by_seed[0].training)
    finetunes = {w: by_seed[0].training[w] for w in by_seed[0].training if SCHEMES[w].finetune}
    timings: Dict[str, float] = {}
    for r in by_seed:
        for k, v in r.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    env = environment(args)
    report.write_markdown(
        out / "results.md", runs, args.train_len, command=command, corpus=corpus.describe(),
        settings=f"{settings}; final training bits per byte: {training}",
        bytes_scored=bytes_scored, names=args.scheme_names, run_notes=run_notes,
        timing=f"{total:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}, all seeds)",
        finetuning=report.finetune_cost(finetunes), environment=env, context=contexts,
    )
    spread = "" if len(seeds) == 1 else (f"; mean of {len(seeds)} seeds ± half their range; 'yes' = holds for "
                                         f"every seed")
    print()
    print(f"held-out bits per byte (lower is better); 'flat' = within {report.FLAT_TOLERANCE} of the "
          f"{args.train_len}-byte value{spread}")
    print(text_table)
    print()
    print(report.CONTEXT_TITLE)
    print(report.context_table(contexts, args.train_len))
    for note in run_notes:
        print(f"note: {note}")
    if finetunes:
        print(f"fine-tuning cost (seed {seeds[0]}): {report.finetune_cost(finetunes)}")
    print()
    print(f"{env}")
    print(f"total {total:.0f} s; wrote {out / 'results.csv'}, {out / 'results.md'}, {out / 'training.csv'}, "
          f"{out / 'bpb_vs_length.png'}, {out / 'training_curves.png'}")
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_schemes:
        for name in SCHEMES:
            s = SCHEMES[name]
            print(f"{name:16s} {s.summary}\n{'':16s} claim: {s.paper}\n{'':16s} paper: {s.reference}")
        return 0
    try:
        args = _resolve(args)
        run(args, argv)
    except (UsageError, data_mod.DataError) as exc:
        parser.error(str(exc))
    return 0
