"""The attention and position schemes the study compares, as configurations of one model.

Every scheme is the same pre-norm byte-level transformer; they differ only in
the attention each layer computes (full causal or a sliding window, softmax or
sigmoid scores), in the position signal (RoPE, ALiBi, or both), and — for the
RoPE-scaling schemes — in how the RoPE tables are rescaled when evaluating at
lengths beyond the training length. Schemes that differ only in that last
point share one set of trained weights (PI and YaRN reuse plain RoPE's model),
which is how those methods are used in practice: on a model trained without
them. The fine-tuning schemes (opt-in, not in DEFAULT_SCHEMES) start from
plain RoPE's trained weights too, and fine-tune them briefly at a longer
length with PI in force, with full causal attention or with LongLoRA's
shifted chunks (finetune.py); they are evaluated with full causal attention.

Each scheme carries what its paper claims and a check that can be computed
from this study's numbers, so the report says plainly where the small-scale
result agrees with the paper and where it does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Expectation:
    """A claim checkable from bits per byte at each evaluation length.

    kind "flat":    bpb at every longer length stays within FLAT_TOLERANCE of bpb
                    at the training length (the model uses, or at least survives,
                    the extra context);
    kind "worse":   bpb at the longest length is more than FLAT_TOLERANCE above
                    bpb at the training length (extrapolation fails);
    kind "beats":   at every longer length bpb is below that of scheme ``other``;
    kind "near":    at every longer length bpb is at most NEAR_TOLERANCE above that of
                    scheme ``other`` (as good as it, or better).
    """

    kind: str
    other: Optional[str] = None


@dataclass(frozen=True)
class Scheme:
    name: str
    summary: str  # one line for tables and --list-schemes
    # Which trained model supplies the weights: the scheme's own name, or another
    # scheme's (PI and YaRN evaluate plain RoPE's weights).
    weights: str
    sliding: bool  # sliding window of --window keys, else full causal attention
    score: str  # "softmax" or "sigmoid"
    rope: bool
    alibi: Optional[str]  # None, "standard" (Press et al.) or "balanced" (SWAT)
    # RoPE rescaling applied at evaluation lengths beyond the training length:
    # None, "linear" (Position Interpolation) or "yarn"; factor = eval_len / train_len.
    eval_rope_scaling: Optional[str]
    paper: str  # what the paper reports, in a sentence
    expectation: Expectation
    # Fine-tuning schemes only: the scheme whose trained weights the fine-tune starts from
    # (trained first, see models_to_train) and the attention used while fine-tuning:
    # "full" (full causal) or "chunked" (LongLoRA's S2-Attn: chunks, half the heads shifted
    # by half a chunk). Evaluation always runs the scheme's own attention (full causal).
    base: Optional[str] = None
    finetune: Optional[str] = None


SCHEMES: Dict[str, Scheme] = {
    s.name: s
    for s in [
        Scheme(
            name="rope",
            summary="full causal softmax attention, RoPE",
            weights="rope",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling=None,
            paper="RoPE does not extrapolate: loss rises quickly past the training length "
            "(Press et al. 2022, ALiBi; Chen et al. 2023, PI)",
            expectation=Expectation("worse"),
        ),
        Scheme(
            name="rope-pi",
            summary="rope's weights, evaluated with Position Interpolation (linear RoPE scaling)",
            weights="rope",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="linear",
            paper="interpolating positions into the trained range degrades far less than "
            "extrapolating them, even before the short fine-tuning the paper adds (Chen et al. 2023)",
            expectation=Expectation("beats", "rope"),
        ),
        Scheme(
            name="rope-yarn",
            summary="rope's weights, evaluated with YaRN RoPE scaling",
            weights="rope",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="yarn",
            paper="interpolating only the low frequencies, with an attention temperature, "
            "extends context better than PI; without fine-tuning too (Peng et al. 2023, YaRN)",
            expectation=Expectation("beats", "rope-pi"),
        ),
        Scheme(
            name="alibi",
            summary="full causal softmax attention, ALiBi (no RoPE)",
            weights="alibi",
            sliding=False,
            score="softmax",
            rope=False,
            alibi="standard",
            eval_rope_scaling=None,
            paper="train short, test long: loss stays flat or improves on inputs several times "
            "longer than in training (Press et al. 2022)",
            expectation=Expectation("flat"),
        ),
        Scheme(
            name="sliding-rope",
            summary="sliding-window causal softmax attention, RoPE",
            weights="sliding-rope",
            sliding=True,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling=None,
            paper="trained with the window in force, every query sees only distances it saw in "
            "training, so loss stays flat at any length (Longformer, Mistral; SWAT's baseline)",
            expectation=Expectation("flat"),
        ),
        Scheme(
            name="swat",
            summary="sliding-window causal sigmoid attention, balanced ALiBi + RoPE (SWAT)",
            weights="swat",
            sliding=True,
            score="sigmoid",
            rope=True,
            alibi="balanced",
            eval_rope_scaling=None,
            paper="sigmoid scores with balanced ALiBi and RoPE in a sliding window keep loss flat "
            "far beyond the training length (Fu et al. 2025, SWAT)",
            expectation=Expectation("flat"),
        ),
        Scheme(
            name="rope-pi-ft",
            summary="rope's weights fine-tuned briefly at --finetune-len with PI, full causal attention",
            weights="rope-pi-ft",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="linear",
            paper="after Position Interpolation, a short fine-tuning at the longer length "
            "(1000 steps) gives low perplexity over the whole extended window (Chen et al. 2023, PI)",
            expectation=Expectation("beats", "rope-pi"),
            base="rope",
            finetune="full",
        ),
        Scheme(
            name="rope-pi-longlora",
            summary="as rope-pi-ft, but fine-tuned with shifted chunks of --finetune-chunk (LongLoRA's "
            "S2-Attn); evaluated with full causal attention",
            weights="rope-pi-longlora",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="linear",
            paper="fine-tuning with shifted sparse attention (chunks, half the heads shifted by half "
            "a chunk) reaches close to full-attention fine-tuning's perplexity at a fraction of "
            "its cost, and the model then runs full attention (Chen et al. 2024, LongLoRA)",
            expectation=Expectation("near", "rope-pi-ft"),
            base="rope",
            finetune="chunked",
        ),
    ]
}

# The fine-tuning schemes are opt-in (--schemes): they add a fine-tune at the longest length
# to the run, and the default run keeps its time budget (`make demo`).
DEFAULT_SCHEMES: List[str] = [n for n, s in SCHEMES.items() if s.finetune is None]


def parse_scheme_list(text: str) -> List[str]:
    """Comma-separated scheme names -> list in the given order; ValueError names the bad one."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--schemes: expected a comma-separated list of {', '.join(SCHEMES)}, got {text!r}")
    for n in names:
        if n not in SCHEMES:
            raise ValueError(f"--schemes: unknown scheme {n!r}; expected some of {', '.join(SCHEMES)}")
    seen = set()
    duplicates = [n for n in names if n in seen or seen.add(n)]
    if duplicates:
        raise ValueError(f"--schemes: {duplicates[0]!r} is listed twice in {text!r}")
    return names


def models_to_train(names: Sequence[str]) -> List[str]:
    """The distinct weight sets the selected schemes need, in first-use order, each after the
    weights it is fine-tuned from (a fine-tuning scheme brings in its base, e.g. rope)."""
    out: List[str] = []

    def need(w: str) -> None:
        base = SCHEMES[w].base
        if base is not None:
            need(SCHEMES[base].weights)
        if w not in out:
            out.append(w)

    for n in names:
        need(SCHEMES[n].weights)
    return out


def rope_scaling(scheme: Scheme, train_len: int, eval_len: int,
                 finetune_len: Optional[int] = None) -> Optional[dict]:
    """The Hugging Face-style rope scaling dict for evaluating ``scheme`` at ``eval_len``.

    None at or below the training length (the trained model is used as is),
    and for schemes without eval-time scaling. The factor is eval_len /
    train_len, chosen per evaluation length, as one would configure PI or YaRN
    for a known target length. A fine-tuned scheme was fine-tuned with the factor
    finetune_len / train_len and keeps it at every length up to finetune_len,
    the training length included (as PI's fine-tuned models are evaluated); only
    beyond it does the factor grow with the length.
    """
    if not scheme.rope or scheme.eval_rope_scaling is None:
        return None
    if scheme.finetune is not None:
        if finetune_len is None:
            raise ValueError(f"rope_scaling: scheme {scheme.name!r} is fine-tuned; pass finetune_len")
        factor = max(finetune_len, eval_len) / train_len
    elif eval_len <= train_len:
        return None
    else:
        factor = eval_len / train_len
    if scheme.eval_rope_scaling == "linear":
        return {"rope_type": "linear", "factor": factor}
    if scheme.eval_rope_scaling == "yarn":
        return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": train_len}
    raise AssertionError(f"unhandled eval_rope_scaling {scheme.eval_rope_scaling!r}")
