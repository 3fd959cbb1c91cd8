"""The attention and position schemes the study compares, as configurations of one model.

Every scheme is the same pre-norm byte-level transformer; they differ only in
the attention each layer computes (full causal or a sliding window, softmax or
sigmoid scores), in the position signal (RoPE, ALiBi, or both), and — for the
RoPE-scaling schemes — in how the RoPE tables are rescaled when evaluating at
lengths beyond the training length (or, for alibi-pi, how the ALiBi slopes are
divided). Schemes that differ only in that last point share one set of trained
weights (PI, YaRN and dynamic NTK reuse plain RoPE's model, ALiBi-PI ALiBi's),
which is how those methods are used in practice: on a model trained without
them. The fine-tuning schemes start from plain RoPE's trained weights too, and
fine-tune them briefly at a longer length with PI or YaRN in force, with full
causal attention or with LongLoRA's shifted chunks (finetune.py); they are
evaluated with full causal attention. rope-pose trains its own RoPE model with
PoSE's skipped position ids (train.py).

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
    # None, "linear" (Position Interpolation), "yarn" or "dynamic" (dynamic NTK);
    # factor = eval_len / train_len (dynamic computes its own from the input length).
    eval_rope_scaling: Optional[str]
    paper: str  # what the paper reports, in a sentence
    expectation: Expectation
    reference: str = ""  # the paper: authors, year, title, arXiv id
    # Fine-tuning schemes only: the scheme whose trained weights the fine-tune starts from
    # (trained first, see models_to_train) and the attention used while fine-tuning:
    # "full" (full causal) or "chunked" (LongLoRA's S2-Attn: chunks, half the heads shifted
    # by half a chunk). Evaluation always runs the scheme's own attention (full causal).
    base: Optional[str] = None
    finetune: Optional[str] = None
    # ALiBi with position interpolation (Al-Khateeb et al. 2023): at eval_len > train_len the
    # slopes are divided by eval_len / train_len, so the largest distance keeps its trained bias.
    eval_alibi_interpolation: bool = False
    # PoSE (Zhu et al. 2024): train at train_len with position ids skipped to cover the longest
    # evaluation length (longreach.position_ids.pose_position_ids, 2 chunks); plain RoPE at eval.
    pose: bool = False


ROPE_PAPER = "Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding, arXiv:2104.09864"
PI_PAPER = ("Chen, Wong, Chen, Tian 2023, Extending Context Window of Large Language Models via Positional "
            "Interpolation, arXiv:2306.15595")
YARN_PAPER = ("Peng, Quesnelle, Fan, Shippole 2023, YaRN: Efficient Context Window Extension of Large Language "
              "Models, arXiv:2309.00071")
ALIBI_PAPER = ("Press, Smith, Lewis 2022, Train Short, Test Long: Attention with Linear Biases Enables Input "
               "Length Extrapolation, ICLR 2022, arXiv:2108.12409")
SWAT_PAPER = ("Fu et al. 2025, Sliding Window Attention Training for Efficient Large Language Models, "
              "arXiv:2502.18845")

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
            reference=ROPE_PAPER,
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
            reference=PI_PAPER,
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
            reference=YARN_PAPER,
        ),
        Scheme(
            name="rope-ntk",
            summary="rope's weights, evaluated with dynamic NTK scaling (RoPE base grown with the input "
            "length, no fine-tuning)",
            weights="rope",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="dynamic",
            paper="scaling RoPE's base as base * (L'/L)^(d/(d-2)) for an input of L' > L tokens, computed "
            "from the input length, extends a model without any fine-tuning: the training-free RoPE "
            "baseline (bloc97 and emozilla 2023; 'Dynamic NTK' in Peng et al. 2023, YaRN, section 3.3)",
            expectation=Expectation("beats", "rope"),
            reference="emozilla 2023, Dynamically Scaled RoPE further increases performance of long context "
            "LLaMA with zero fine-tuning (reddit r/LocalLLaMA); defined as Dynamic NTK in " + YARN_PAPER,
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
            reference=ALIBI_PAPER,
        ),
        Scheme(
            name="alibi-pi",
            summary="alibi's weights, slopes divided by eval_len / train_len beyond the training length",
            weights="alibi",
            sliding=False,
            score="softmax",
            rope=False,
            alibi="standard",
            eval_rope_scaling=None,
            paper="dividing ALiBi's slopes by the length factor at inference (position interpolation "
            "for ALiBi) improves extrapolation beyond plain ALiBi (Al-Khateeb et al. 2023)",
            expectation=Expectation("beats", "alibi"),
            reference="Al-Khateeb, Dey, Soboleva, Hestness 2023, Position Interpolation Improves ALiBi "
            "Extrapolation, arXiv:2310.13017",
            eval_alibi_interpolation=True,
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
            reference="Beltagy, Peters, Cohan 2020, Longformer: The Long-Document Transformer, "
            "arXiv:2004.05150; Jiang et al. 2023, Mistral 7B, arXiv:2310.06825",
        ),
        Scheme(
            name="swat",
            summary="sliding-window causal sigmoid attention, balanced ALiBi + RoPE (SWAT as its paper "
            "describes it; slopes +-S/2^k, S = --swat-slope-scale)",
            weights="swat",
            sliding=True,
            score="sigmoid",
            rope=True,
            alibi="balanced",
            eval_rope_scaling=None,
            paper="sigmoid scores with balanced ALiBi and RoPE in a sliding window keep loss flat "
            "far beyond the training length (Fu et al. 2025, SWAT)",
            expectation=Expectation("flat"),
            reference=SWAT_PAPER,
        ),
        Scheme(
            name="swat-code",
            summary="sliding-window causal softmax attention, standard ALiBi + RoPE (SWAT as its authors' "
            "released code trains it)",
            weights="swat-code",
            sliding=True,
            score="softmax",
            rope=True,
            alibi="standard",
            eval_rope_scaling=None,
            paper="the recipe of SWAT's released training code: softmax with standard ALiBi and RoPE "
            "in a sliding window, flat far beyond the training length (Fu et al. 2025, code)",
            expectation=Expectation("flat"),
            reference=SWAT_PAPER + " (released code)",
        ),
        Scheme(
            name="rope-pose",
            summary="full causal softmax attention, RoPE, trained at --train-len with PoSE's skipped "
            "position ids covering the longest evaluation length",
            weights="rope-pose",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling=None,
            paper="training on short windows whose position ids skip to cover the target length "
            "(chunks shifted by random skips) extends the context to the target length at the cost "
            "of the short window (Zhu et al. 2024, PoSE)",
            expectation=Expectation("beats", "rope"),
            reference="Zhu et al. 2024, PoSE: Efficient Context Window Extension of LLMs via Positional "
            "Skip-wise Training, ICLR 2024, arXiv:2309.10400",
            pose=True,
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
            reference=PI_PAPER,
            base="rope",
            finetune="full",
        ),
        Scheme(
            name="rope-yarn-ft",
            summary="rope's weights fine-tuned briefly at --finetune-len with YaRN, full causal attention",
            weights="rope-yarn-ft",
            sliding=False,
            score="softmax",
            rope=True,
            alibi=None,
            eval_rope_scaling="yarn",
            paper="YaRN with a short fine-tuning at the longer length (400 steps) reaches low "
            "perplexity over the extended window, better than fine-tuned PI (Peng et al. 2023, YaRN)",
            expectation=Expectation("beats", "rope-pi-ft"),
            reference=YARN_PAPER,
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
            reference="Chen et al. 2024, LongLoRA: Efficient Fine-tuning of Long-Context Large Language "
            "Models, ICLR 2024, arXiv:2309.12307",
            base="rope",
            finetune="chunked",
        ),
    ]
}

# The schemes of the default profile (`make demo`): every seed paper's protocol, on four trained
# models per seed (rope, alibi, swat, swat-code) and two short fine-tunes, so that 3 seeds fit the
# time budget; the full profile adds sliding-rope, rope-pose and rope-pi-longlora (cli.PROFILES).
DEFAULT_SCHEMES: List[str] = ["rope", "rope-pi", "rope-yarn", "rope-ntk", "rope-pi-ft", "rope-yarn-ft",
                              "alibi", "alibi-pi", "swat", "swat-code"]


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


def alibi_interpolation(scheme: Scheme, train_len: int, eval_len: int) -> float:
    """The factor alibi-pi divides its slopes by at ``eval_len``: eval_len / train_len beyond the
    training length (Al-Khateeb et al. 2023), else 1 (the trained slopes)."""
    if not scheme.eval_alibi_interpolation or eval_len <= train_len:
        return 1.0
    return eval_len / train_len


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
    if scheme.eval_rope_scaling == "dynamic":
        # factor 1: HF's dynamic NTK at the input's own length s, base * (s / train_len)^(d/(d-2)).
        return {"rope_type": "dynamic", "factor": 1.0, "original_max_position_embeddings": train_len}
    raise AssertionError(f"unhandled eval_rope_scaling {scheme.eval_rope_scaling!r}")
