"""Results of the study: checks against the papers, the stdout table, CSV, Markdown and plot."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

from .schemes import SCHEMES

if TYPE_CHECKING:
    from .train import TrainResult

# bits per byte: how far above its training-length value a curve may go and still count as flat.
FLAT_TOLERANCE = 0.05
# bits per byte: how far below another scheme a curve must be to count as better (not noise).
BEAT_MARGIN = 0.01
# bits per byte: how far above another scheme a curve may be and still count as close to it.
NEAR_TOLERANCE = 0.05

CSV_FIELDS = ["scheme", "weights", "train_len", "eval_len", "factor", "bits_per_byte", "bytes_scored"]


@dataclass
class Verdict:
    observed: str  # what this run shows, in a few words
    agrees: Optional[bool]  # None when the check cannot be made (e.g. a compared scheme was not run)


def check(name: str, bpb: Dict[str, Dict[int, float]], train_len: int) -> Verdict:
    """Compare scheme ``name``'s curve with what its paper claims (see schemes.Expectation)."""
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


def rows(bpb: Dict[str, Dict[int, float]], train_len: int, bytes_scored: int) -> List[dict]:
    out = []
    for name, curve in bpb.items():
        for L in sorted(curve):
            out.append(
                {
                    "scheme": name,
                    "weights": SCHEMES[name].weights,
                    "train_len": train_len,
                    "eval_len": L,
                    "factor": L // train_len,
                    "bits_per_byte": f"{curve[L]:.6f}",
                    "bytes_scored": bytes_scored,
                }
            )
    return out


def write_csv(path: Path, bpb: Dict[str, Dict[int, float]], train_len: int, bytes_scored: int) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows(bpb, train_len, bytes_scored))


def table(bpb: Dict[str, Dict[int, float]], train_len: int, markdown: bool = False) -> str:
    """Bits per byte per scheme and length, with the paper check, as plain text or Markdown."""
    lengths = sorted(next(iter(bpb.values())))
    header = ["scheme"] + [f"{L} ({L // train_len}x)" for L in lengths] + ["this run", "as paper says?"]
    body = []
    for name, curve in bpb.items():
        v = check(name, bpb, train_len)
        agrees = {True: "yes", False: "NO", None: "n/a"}[v.agrees]
        body.append([name] + [f"{curve[L]:.3f}" for L in lengths] + [v.observed, agrees])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [header] + body) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in (0, len(r) - 2, len(r) - 1) else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


# bits per byte behind the best scheme at the training length before a note says so.
BEHIND_NOTE = 0.1


def notes(bpb: Dict[str, Dict[int, float]], train_len: int) -> List[str]:
    """Caveats the table alone would hide: schemes already far behind at the training length."""
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
    """One line per scheme: its configuration and what its paper claims."""
    return "\n".join(f"- {n}: {SCHEMES[n].summary}. Paper: {SCHEMES[n].paper}." for n in names)


def finetune_cost(results: Dict[str, "TrainResult"]) -> str:
    """The fine-tunes' wall time and throughput, e.g. to show that S2-Attn's steps are cheaper."""
    return ", ".join(f"{name} {r.seconds:.1f} s for {len(r.losses)} steps, {r.tokens_per_second:,.0f} bytes/s"
                     for name, r in results.items())


def write_markdown(path: Path, bpb: Dict[str, Dict[int, float]], train_len: int, *, command: str, corpus: str,
                   settings: str, bytes_scored: int, names: Sequence[str], timing: str,
                   run_notes: Sequence[str] = (), finetuning: str = "") -> None:
    """results.md: the command, data, settings, table, notes (e.g. from `notes`), the fine-tunes' cost
    (``finetuning``, e.g. from `finetune_cost`; omitted when empty) and the papers' claims."""
    parts = [
        "# Train short, test long",
        f"Command: `{command}`",
        f"Corpus: {corpus}.",
        f"Model and training: {settings}.",
        f"Held-out bits per byte (lower is better), the same {bytes_scored:,} bytes scored at every length; "
        f"'flat' means within {FLAT_TOLERANCE} bits per byte of the value at the training length "
        f"({train_len} bytes); 'below X' needs a margin of {BEAT_MARGIN}.",
        table(bpb, train_len, markdown=True),
    ]
    parts += [f"Note: {n}" for n in run_notes]
    if finetuning:
        parts.append(f"Fine-tuning cost (same steps, batches and data; wall time on this machine): {finetuning}.")
    parts += ["What the papers say:", claims(names), f"Run time: {timing}."]
    path.write_text("\n\n".join(parts) + "\n")


def plot(path: Path, bpb: Dict[str, Dict[int, float]], train_len: int, title: str) -> None:
    """Bits per byte against evaluation length (log2 axis), one line per scheme."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    # the rope family shares weights or starts from them: tell them apart
    styles = {"rope-pi": "--", "rope-yarn": ":", "rope-pi-ft": "-.", "rope-pi-longlora": "-."}
    for name, curve in bpb.items():
        lengths = sorted(curve)
        ax.plot(lengths, [curve[L] for L in lengths], styles.get(name, "-"), marker="o", label=name)
    ax.axvline(train_len, color="grey", linewidth=0.8, linestyle="--")
    ax.annotate("training length", (train_len, 1.0), xycoords=("data", "axes fraction"),
                xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")
    ax.set_xscale("log", base=2)
    lengths = sorted(next(iter(bpb.values())))
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(L) for L in lengths])
    ax.set_xlabel("evaluation length (bytes)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
