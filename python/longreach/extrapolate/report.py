"""Results of the study: checks against the papers, the stdout tables, CSV, Markdown and plots.

A run holds one result per seed: ``runs`` is a list (one entry per seed) of
{scheme: {eval_len: bits per byte}}. Tables give the mean over seeds and the
spread as ± half the range (max - min) over seeds; a paper's claim is judged
"yes" only when it holds for every seed (so at the worst end of the range),
"NO" when it holds for none, and "mixed k/n" when it holds for some seeds only
(the difference is within the spread). Every function also takes a single
{scheme: curve} dict, the one-seed case.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .schemes import SCHEMES

if TYPE_CHECKING:
    from .train import TrainResult

# bits per byte: how far above its training-length value a curve may go and still count as flat.
FLAT_TOLERANCE = 0.05
# bits per byte: how far below another scheme a curve must be to count as better (not noise).
BEAT_MARGIN = 0.01
# bits per byte: how far above another scheme a curve may be and still count as close to it.
NEAR_TOLERANCE = 0.05

CSV_FIELDS = ["scheme", "weights", "seed", "train_len", "eval_len", "factor", "bits_per_byte",
              "second_half_given_first_bpb", "second_half_alone_bpb", "bytes_scored"]

Curves = Dict[str, Dict[int, float]]  # scheme -> eval_len -> bits per byte (one seed)
Runs = Union[Curves, Sequence[Curves]]


def as_runs(runs: Runs) -> List[Curves]:
    """One seed's curves (a dict) or a list of them -> a list of them."""
    return [runs] if isinstance(runs, Mapping) else list(runs)


def mean_curves(runs: Runs) -> Curves:
    runs = as_runs(runs)
    return {name: {L: sum(r[name][L] for r in runs) / len(runs) for L in runs[0][name]} for name in runs[0]}


def half_range(values: Sequence[float]) -> float:
    """The spread the tables print after '±': half of max - min over seeds."""
    return (max(values) - min(values)) / 2


@dataclass
class Verdict:
    observed: str  # what this run shows, in a few words
    agrees: Optional[bool]  # None when the check cannot be made (e.g. a compared scheme was not run)
    # With several seeds: for how many the claim holds, of how many (agrees is True only for
    # all of them, False only for none; None with mixed = within the spread).
    seeds_holding: Optional[Tuple[int, int]] = None

    @property
    def label(self) -> str:
        if self.seeds_holding is not None and self.agrees is None:
            k, n = self.seeds_holding
            return f"mixed {k}/{n}"
        return {True: "yes", False: "NO", None: "n/a"}[self.agrees]


def check(name: str, runs: Runs, train_len: int) -> Verdict:
    """Compare scheme ``name``'s curves with what its paper claims (see schemes.Expectation).

    One seed: that seed's verdict. Several: the claim is checked on every seed (comparisons
    pair schemes trained with the same seed, i.e. the same initial weights and batches); the
    observation is the check on the mean curves, the verdict "yes" if it holds for every seed,
    "NO" if for none, "mixed k/n" otherwise."""
    runs = as_runs(runs)
    if len(runs) == 1:
        return _check_one(name, runs[0], train_len)
    per_seed = [_check_one(name, r, train_len) for r in runs]
    if any(v.agrees is None for v in per_seed):
        return per_seed[0]
    holding = sum(bool(v.agrees) for v in per_seed)
    n = len(per_seed)
    agrees = True if holding == n else False if holding == 0 else None
    observed = _check_one(name, mean_curves(runs), train_len).observed + f" ({holding}/{n} seeds)"
    return Verdict(observed, agrees, (holding, n))


def _check_one(name: str, bpb: Curves, train_len: int) -> Verdict:
    """The check on one set of curves (one seed, or the mean over seeds)."""
    curve = bpb[name]
    base = curve[train_len]
    longer = [L for L in sorted(curve) if L > train_len]
    if not longer:
        return Verdict("no length beyond training evaluated", None)
    worst = max(longer, key=lambda L: curve[L] - base)
    rise = curve[worst] - base
    longest = longer[-1]
    change = curve[longest] - base
    exp = SCHEMES[name].expectation
    if exp.kind in ("flat", "worse"):
        if rise <= FLAT_TOLERANCE:
            observed = f"flat: {change:+.3f} at {longest // train_len}x"
            if change < -FLAT_TOLERANCE:
                observed = f"improves: {change:+.3f} at {longest // train_len}x"
        else:
            observed = f"worse: {rise:+.3f} at {worst // train_len}x"
        flat = rise <= FLAT_TOLERANCE
        return Verdict(observed, flat if exp.kind == "flat" else not flat)
    if exp.kind == "beats":
        other = exp.other
        if other not in bpb:
            return Verdict(f"{other} not run, cannot compare", None)
        diffs = {L: curve[L] - bpb[other][L] for L in longer}
        lo, hi = min(diffs.values()), max(diffs.values())
        spread = f"{lo:+.3f}" if abs(hi - lo) < 0.0005 else f"{lo:+.3f} to {hi:+.3f}"
        if hi <= -BEAT_MARGIN:
            return Verdict(f"below {other} at every longer length ({spread})", True)
        if lo >= BEAT_MARGIN:
            return Verdict(f"above {other} at every longer length ({spread})", False)
        return Verdict(f"not clearly below {other} ({spread} vs it)", False)
    if exp.kind == "near":
        other = exp.other
        if other not in bpb:
            return Verdict(f"{other} not run, cannot compare", None)
        diffs = [curve[L] - bpb[other][L] for L in longer]
        lo, hi = min(diffs), max(diffs)
        spread = f"{lo:+.3f}" if abs(hi - lo) < 0.0005 else f"{lo:+.3f} to {hi:+.3f}"
        if hi <= NEAR_TOLERANCE:
            return Verdict(f"within {NEAR_TOLERANCE} of {other} or below it ({spread})", True)
        return Verdict(f"more than {NEAR_TOLERANCE} above {other} ({spread})", False)
    raise AssertionError(f"unknown expectation kind {exp.kind!r}")


def rows(runs: Runs, train_len: int, bytes_scored: int, seeds: Optional[Sequence[int]] = None,
         context: Optional[Sequence[Dict[str, Dict[int, Tuple[float, float]]]]] = None) -> List[dict]:
    """One CSV row per scheme, seed and length (``context``: per seed, evaluate's measure)."""
    runs = as_runs(runs)
    seeds = list(seeds) if seeds is not None else list(range(len(runs)))
    out = []
    for name in runs[0]:
        for i, (seed, bpb) in enumerate(zip(seeds, runs)):
            for L in sorted(bpb[name]):
                given, alone = context[i][name][L] if context else ("", "")
                out.append(
                    {
                        "scheme": name,
                        "weights": SCHEMES[name].weights,
                        "seed": seed,
                        "train_len": train_len,
                        "eval_len": L,
                        "factor": L // train_len,
                        "bits_per_byte": f"{bpb[name][L]:.6f}",
                        "second_half_given_first_bpb": f"{given:.6f}" if given != "" else "",
                        "second_half_alone_bpb": f"{alone:.6f}" if alone != "" else "",
                        "bytes_scored": bytes_scored,
                    }
                )
    return out


def write_csv(path: Path, runs: Runs, train_len: int, bytes_scored: int, seeds: Optional[Sequence[int]] = None,
              context: Optional[Sequence[Dict[str, Dict[int, Tuple[float, float]]]]] = None) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows(runs, train_len, bytes_scored, seeds, context))


def _cell(values: Sequence[float]) -> str:
    """Mean, and with several seeds '±' half the range over seeds."""
    mean = sum(values) / len(values)
    return f"{mean:.3f}" if len(values) == 1 else f"{mean:.3f} ±{half_range(values):.3f}"


def _layout(header: List[str], body: List[List[str]], markdown: bool, left: Sequence[int]) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def table(runs: Runs, train_len: int, markdown: bool = False) -> str:
    """Bits per byte per scheme and length (mean ± half range over seeds), with the paper check,
    as plain text or Markdown."""
    runs = as_runs(runs)
    lengths = sorted(next(iter(runs[0].values())))
    header = ["scheme"] + [f"{L} ({L // train_len}x)" for L in lengths] + ["this run", "as paper says?"]
    body = []
    for name in runs[0]:
        v = check(name, runs, train_len)
        body.append([name] + [_cell([r[name][L] for r in runs]) for L in lengths] + [v.observed, v.label])
    return _layout(header, body, markdown, left=(0, len(header) - 2, len(header) - 1))


def context_gain(context: Sequence[Dict[str, Dict[int, Tuple[float, float]]]], name: str, length: int) -> List[float]:
    """Per seed: bpb of the second halves given the first halves minus given nothing."""
    return [c[name][length][0] - c[name][length][1] for c in context]


def context_table(context: Sequence[Dict[str, Dict[int, Tuple[float, float]]]], train_len: int,
                  markdown: bool = False) -> str:
    """Long-context use per scheme and length: second half given the first minus given nothing
    (mean ± half range over seeds; negative = the model uses the first half)."""
    names = list(context[0])
    lengths = sorted(context[0][names[0]])
    header = ["scheme"] + [f"{L} ({L // train_len}x)" for L in lengths]
    body = [[name] + [_cell(context_gain(context, name, L)) for L in lengths] for name in names]
    return _layout(header, body, markdown, left=(0,))


# bits per byte behind the best scheme at the training length before a note says so.
BEHIND_NOTE = 0.1


def notes(runs: Runs, train_len: int) -> List[str]:
    """Caveats the table alone would hide: schemes already far behind at the training length
    (mean over seeds)."""
    bpb = mean_curves(runs)
    at_1x = {name: curve[train_len] for name, curve in bpb.items()}
    best = min(at_1x, key=at_1x.get)
    out = []
    for name, value in at_1x.items():
        weights = SCHEMES[name].weights
        if weights != name and weights in bpb:
            continue  # same model as its weights' scheme at the training length: noted there
        if SCHEMES[name].finetune:
            continue  # evaluated with PI at every length, 1x included: its 1x value is not its training's
        if value - at_1x[best] > BEHIND_NOTE:
            sharing = [n for n in bpb if n != name and SCHEMES[n].weights == name]
            who = name + (f" (and {', '.join(sharing)}, same weights)" if sharing else "")
            out.append(
                f"{who} is {value - at_1x[best]:.2f} bits per byte behind {best} already at the training "
                f"length: it learned less in this training budget, so compare the shape of its curve, "
                f"not its level."
            )
    return out


def claims(names: Sequence[str]) -> str:
    """One line per scheme: its configuration, what its paper claims and the paper."""
    return "\n".join(f"- {n}: {SCHEMES[n].summary}. Paper: {SCHEMES[n].paper}. ({SCHEMES[n].reference})"
                     for n in names)


def finetune_cost(results: Dict[str, "TrainResult"]) -> str:
    """The fine-tunes' wall time and throughput, e.g. to show that S2-Attn's steps are cheaper."""
    return ", ".join(f"{name} {r.seconds:.1f} s for {len(r.losses)} steps, {r.tokens_per_second:,.0f} bytes/s"
                     for name, r in results.items())


def write_markdown(path: Path, runs: Runs, train_len: int, *, command: str, corpus: str,
                   settings: str, bytes_scored: int, names: Sequence[str], timing: str,
                   run_notes: Sequence[str] = (), finetuning: str = "", environment: str = "",
                   context: Optional[Sequence[Dict[str, Dict[int, Tuple[float, float]]]]] = None) -> None:
    """results.md: the command, data, settings, table, long-context use (``context``), notes (e.g.
    from `notes`), the fine-tunes' cost (``finetuning``, e.g. from `finetune_cost`; omitted when
    empty), the papers' claims, the environment (versions, threads) and run time."""
    runs = as_runs(runs)
    spread = ("" if len(runs) == 1 else
              f" Mean over {len(runs)} seeds, ± half the range (max - min) over seeds; 'yes' means the "
              f"claim holds for every seed, 'NO' for none, 'mixed k/n' for k of n (within the spread).")
    parts = [
        "# Train short, test long",
        f"Command: `{command}`",
        f"Corpus: {corpus}.",
        f"Model and training: {settings}.",
        f"Held-out bits per byte (lower is better), the same {bytes_scored:,} bytes scored at every length; "
        f"'flat' means within {FLAT_TOLERANCE} bits per byte of the value at the training length "
        f"({train_len} bytes); 'below X' needs a margin of {BEAT_MARGIN}.{spread}",
        table(runs, train_len, markdown=True),
    ]
    if context:
        parts += [CONTEXT_TITLE, context_table(context, train_len, markdown=True)]
    parts += [f"Note: {n}" for n in run_notes]
    if finetuning:
        parts.append(f"Fine-tuning cost (same steps, batches and data; wall time on this machine): {finetuning}.")
    parts += ["What the papers say:", claims(names)]
    if environment:
        parts.append(f"Environment: {environment}.")
    parts.append(f"Run time: {timing}.")
    path.write_text("\n\n".join(parts) + "\n")


CONTEXT_TITLE = ("Long-context use: bits per byte of each evaluation segment's second half given its first half, "
                 "minus the same bytes given nothing (negative: the model uses the first half's context)")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


# the rope family shares weights or starts from them: tell them apart
_STYLES = {"rope-pi": "--", "rope-yarn": ":", "rope-ntk": (0, (3, 1, 1, 1)), "rope-pi-ft": "-.",
           "rope-yarn-ft": "-.", "rope-pi-longlora": "-.", "alibi-pi": "--"}


def plot(path: Path, runs: Runs, train_len: int, title: str) -> None:
    """Bits per byte against evaluation length (log2 axis), one line per scheme (mean over seeds,
    error bars spanning the seeds' range)."""
    plt = _pyplot()
    runs = as_runs(runs)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name in runs[0]:
        lengths = sorted(runs[0][name])
        values = [[r[name][L] for r in runs] for L in lengths]
        mean = [sum(v) / len(v) for v in values]
        err = [[m - min(v) for m, v in zip(mean, values)], [max(v) - m for m, v in zip(mean, values)]]
        ax.errorbar(lengths, mean, yerr=err if len(runs) > 1 else None, linestyle=_STYLES.get(name, "-"),
                    marker="o", markersize=4, capsize=2, label=name)
    ax.axvline(train_len, color="grey", linewidth=0.8, linestyle="--")
    ax.annotate("training length", (train_len, 1.0), xycoords=("data", "axes fraction"),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    lengths = sorted(next(iter(runs[0].values())))
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(L) for L in lengths])
    ax.set_xlabel("evaluation length (bytes)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def smooth(values: Sequence[float], width: int) -> List[float]:
    """Trailing moving average over ``width`` steps (the first steps average what there is)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= width:
            total -= values[i - width]
        out.append(total / min(i + 1, width))
    return out


def write_training_csv(path: Path, curves: Dict[str, Sequence[Sequence[float]]], seeds: Sequence[int]) -> None:
    """training.csv: model (trained or fine-tuned weights), seed, step, training bits per byte."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seed", "step", "bits_per_byte"])
        for name, per_seed in curves.items():
            for seed, losses in zip(seeds, per_seed):
                w.writerows([name, seed, i + 1, f"{v:.6f}"] for i, v in enumerate(losses))


def plot_training(path: Path, curves: Dict[str, Sequence[Sequence[float]]], title: str,
                  offsets: Optional[Dict[str, int]] = None) -> None:
    """Training bits per byte against step, one line per trained model (or fine-tune), the mean
    over seeds smoothed over 2 % of the steps; ``curves``: name -> per seed, per step bpb;
    ``offsets``: steps to shift a curve by (a fine-tune continues its base's training)."""
    offsets = offsets or {}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, per_seed in curves.items():
        steps = min(len(c) for c in per_seed)
        if steps == 0:
            continue
        mean = [sum(c[i] for c in per_seed) / len(per_seed) for i in range(steps)]
        start = offsets.get(name, 0) + 1
        ax.plot(range(start, start + steps), smooth(mean, max(1, steps // 50)), _STYLES.get(name, "-"), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training bits per byte (smoothed)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
