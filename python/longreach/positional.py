"""Positional schemes: the RoPE frequency family and ALiBi slopes.

`rope_frequencies` turns a Hugging Face style ``rope_parameters`` / ``rope_scaling``
dict into ``(inv_freq, attention_factor)``; the numbers equal
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` for the same config
(the tests check it), and are computed with the same float32 operations so
tables built from them match Hugging Face's bit for bit where it matters.
`alibi_slopes` gives per-head ALiBi slopes for `longreach.local_attention`.
See docs/positional.md for how to pick a scheme.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ._checks import check_choice

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn", "longrope", "llama3")

# Keys each rope_type reads besides rope_type / type / rope_theta / partial_rotary_factor.
_TYPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "ntk": {"factor"},
    "dynamic": {"factor", "original_max_position_embeddings"},
    "yarn": {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "truncate"},
    "longrope": {"factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"},
    "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
}
_COMMON_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}
_DEFAULT_BASE = 10000.0


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _number(cfg: Mapping, key: str, rope_type: str, *, minimum: Optional[float] = None, strict: bool = False,
            default: Any = None, required: bool = False) -> Any:
    """cfg[key] checked to be a finite number (>= minimum, or > minimum when strict)."""
    value = cfg.get(key, default)
    if value is None:
        if required:
            raise ValueError(f"rope_frequencies: rope_type {rope_type!r} needs scaling[{key!r}], which is missing")
        return None
    if not _is_number(value):
        raise ValueError(f"rope_frequencies: scaling[{key!r}] must be a finite number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"rope_frequencies: scaling[{key!r}] must be {relation} {minimum}, got {value!r}")
    return value


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"rope_frequencies: {what} must be a positive int, got {value!r}")
    return int(value)


def _pretraining_length(cfg: Mapping, rope_type: str, max_position_embeddings: Optional[int], *,
                        prefer_max: bool) -> int:
    """The context length the model was trained with.

    Hugging Face reads scaling['original_max_position_embeddings'] (defaulting
    it to config.max_position_embeddings) for yarn / longrope / llama3, but
    config.max_position_embeddings for dynamic (prefer_max=True).
    """
    first, second = ("max_position_embeddings", "original_max_position_embeddings")
    values = {first: max_position_embeddings, second: cfg.get(second)}
    order = (first, second) if prefer_max else (second, first)
    for key in order:
        if values[key] is not None:
            where = "scaling['original_max_position_embeddings']" if key == second else "max_position_embeddings"
            return _positive_int(values[key], where)
    raise ValueError(
        f"rope_frequencies: rope_type {rope_type!r} needs the pretraining context length: pass "
        "scaling['original_max_position_embeddings'] or max_position_embeddings= (Hugging Face's "
        "config.max_position_embeddings)"
    )


def _exponents(dim: int, device) -> torch.Tensor:
    """2i / dim for i = 0 .. dim/2 - 1, in float32 as Hugging Face computes it."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim


def _plain_inv_freq(dim: int, base: float, device) -> torch.Tensor:
    return 1.0 / (base ** _exponents(dim, device))


def rope_frequencies(
    head_dim: int,
    base: float = _DEFAULT_BASE,
    scaling: Optional[Mapping[str, Any]] = None,
    seq_len: Optional[int] = None,
    *,
    max_position_embeddings: Optional[int] = None,
    device: Optional[torch.device] = None,
) -> Tuple[torch.Tensor, float]:
    """Inverse frequencies (float32, ``rot_dim / 2``) and attention factor of a RoPE scheme.

    ``scaling`` is Hugging Face's ``config.rope_parameters`` (v5) or
    ``config.rope_scaling`` (v4) dict; None means plain RoPE. ``rope_type``:

    - ``default``: ``inv_freq[i] = base^(-2i/rot_dim)``.
    - ``linear`` (Position Interpolation): inv_freq / ``factor``.
    - ``ntk`` (static NTK-aware, not a Hugging Face type): base * factor^(d/(d-2));
      equals HF's ``dynamic`` with factor 1 at seq_len = factor * length.
    - ``dynamic`` (dynamic NTK): base * (factor * s / L - (factor - 1))^(d/(d-2)) with
      s = max(seq_len, L), L = ``max_position_embeddings``.
    - ``yarn``: ``factor``, ``original_max_position_embeddings``, ``beta_fast`` (32),
      ``beta_slow`` (1), ``mscale``, ``mscale_all_dim``, ``attention_factor``, ``truncate`` (True).
    - ``longrope``: ``short_factor`` / ``long_factor`` lists (rot_dim / 2 each), the long list
      when seq_len > ``original_max_position_embeddings``; ``factor`` defaults to
      max_position_embeddings / original; ``attention_factor``.
    - ``llama3``: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
      ``original_max_position_embeddings``.

    ``partial_rotary_factor`` (in ``scaling``) rotates ``int(head_dim * f)`` features.
    ``scaling['rope_theta']``, when present, is the base (a different explicit
    ``base`` is an error). ``max_position_embeddings`` is the model config's field:
    dynamic needs it, and yarn / longrope / llama3 fall back to it for
    ``original_max_position_embeddings``, as Hugging Face does. Multiply cos and sin
    by the returned attention factor (Hugging Face's ``attention_scaling``).
    """
    head_dim = _positive_int(head_dim, "head_dim")
    if scaling is None:
        scaling = {}
    if not isinstance(scaling, Mapping):
        raise TypeError(f"rope_frequencies: scaling must be a dict or None, got {type(scaling).__name__}")
    cfg: Dict[str, Any] = dict(scaling)
    rope_type = cfg.get("rope_type", cfg.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_frequencies: unknown rope_type {rope_type!r}; expected one of {ROPE_TYPES}")
    unknown = set(cfg) - _COMMON_KEYS - _TYPE_KEYS[rope_type]
    if unknown:
        warnings.warn(f"rope_frequencies: rope_type {rope_type!r} ignores scaling keys {sorted(unknown)}",
                      stacklevel=2)

    if not _is_number(base) or base <= 1.0:
        raise ValueError(f"rope_frequencies: base must be a number > 1, got {base!r}")
    if cfg.get("rope_theta") is not None:
        theta = _number(cfg, "rope_theta", rope_type, minimum=1.0, strict=True)
        if base != _DEFAULT_BASE and base != theta:
            raise ValueError(
                f"rope_frequencies: base={base!r} disagrees with scaling['rope_theta']={theta!r}; pass one of them"
            )
        base = float(theta)
    if seq_len is not None:
        seq_len = _positive_int(seq_len, "seq_len")
    if max_position_embeddings is not None:
        max_position_embeddings = _positive_int(max_position_embeddings, "max_position_embeddings")

    fraction = _number(cfg, "partial_rotary_factor", rope_type, minimum=0.0, strict=True, default=1.0)
    if fraction > 1.0:
        raise ValueError(f"rope_frequencies: scaling['partial_rotary_factor'] must be in (0, 1], got {fraction!r}")
    dim = int(head_dim * fraction)
    if dim < 2 or dim % 2:
        raise ValueError(
            f"rope_frequencies: the rotary dimension int(head_dim * partial_rotary_factor) = int({head_dim} * "
            f"{fraction}) = {dim} must be even and >= 2 (RoPE rotates feature pairs)"
        )

    compute = _COMPUTE[rope_type]
    inv_freq, attention_factor = compute(cfg, rope_type, dim, float(base), seq_len, max_position_embeddings,
                                         device)
    return inv_freq, float(attention_factor)


# ------------------------------------------------------------- one per rope_type --


def _default(cfg, rope_type, dim, base, seq_len, max_pos, device):
    return _plain_inv_freq(dim, base, device), 1.0


def _linear(cfg, rope_type, dim, base, seq_len, max_pos, device):
    factor = _number(cfg, "factor", rope_type, minimum=1.0, required=True)
    return _plain_inv_freq(dim, base, device) / factor, 1.0


def _ntk_base(base: float, stretch: float, dim: int) -> float:
    """NTK-aware base change: stretching the longest wavelength by `stretch`
    while leaving the shortest almost untouched."""
    return base * stretch ** (dim / (dim - 2))


def _ntk(cfg, rope_type, dim, base, seq_len, max_pos, device):
    factor = _number(cfg, "factor", rope_type, minimum=1.0, required=True)
    return _plain_inv_freq(dim, _ntk_base(base, factor, dim), device), 1.0


def _dynamic(cfg, rope_type, dim, base, seq_len, max_pos, device):
    factor = _number(cfg, "factor", rope_type, minimum=1.0, required=True)
    length = _pretraining_length(cfg, rope_type, max_pos, prefer_max=True)
    s = length if seq_len is None else max(seq_len, length)
    return _plain_inv_freq(dim, _ntk_base(base, factor * s / length - (factor - 1), dim), device), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(cfg, rope_type, dim, base, seq_len, max_pos, device):
    factor = _number(cfg, "factor", rope_type, minimum=1.0, required=True)
    original = _pretraining_length(cfg, rope_type, max_pos, prefer_max=False)
    attention_factor = _number(cfg, "attention_factor", rope_type, minimum=0.0, strict=True)
    mscale = _number(cfg, "mscale", rope_type)
    mscale_all_dim = _number(cfg, "mscale_all_dim", rope_type)
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    # Hugging Face treats 0 / None as "use the default" (it writes `get(...) or 32`).
    beta_fast = _number(cfg, "beta_fast", rope_type) or 32
    beta_slow = _number(cfg, "beta_slow", rope_type) or 1
    truncate = cfg.get("truncate", True)  # an explicit None reads as False, as in Hugging Face
    if truncate is not None and not isinstance(truncate, bool):
        raise ValueError(f"rope_frequencies: scaling['truncate'] must be a bool, got {truncate!r}")

    def dim_of_rotations(rotations: float) -> float:
        # The feature index whose wavelength fits `rotations` times into the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of_rotations(beta_fast), dim_of_rotations(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp

    pos_freqs = base ** _exponents(dim, device)
    extrapolated = 1.0 / pos_freqs  # unchanged high frequencies
    interpolated = 1.0 / (factor * pos_freqs)  # Position Interpolation for low frequencies
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # 1: extrapolate, 0: interpolate, linear in between
    return interpolated * (1 - keep) + extrapolated * keep, attention_factor


def _factor_list(cfg, key: str, dim: int) -> list:
    values = cfg.get(key)
    if values is None:
        raise ValueError(f"rope_frequencies: rope_type 'longrope' needs scaling[{key!r}], which is missing")
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or not all(_is_number(v) and v > 0 for v in values):
        raise ValueError(f"rope_frequencies: scaling[{key!r}] must be a list of positive numbers, got {values!r}")
    if len(values) != dim // 2:
        raise ValueError(
            f"rope_frequencies: scaling[{key!r}] has {len(values)} entries; expected rot_dim / 2 = {dim // 2} "
            "(one per rotary frequency)"
        )
    return list(values)


def _longrope(cfg, rope_type, dim, base, seq_len, max_pos, device):
    short_factor = _factor_list(cfg, "short_factor", dim)
    long_factor = _factor_list(cfg, "long_factor", dim)
    original = _pretraining_length(cfg, rope_type, max_pos, prefer_max=False)
    factor = _number(cfg, "factor", rope_type, minimum=1.0)
    attention_factor = _number(cfg, "attention_factor", rope_type, minimum=0.0, strict=True)
    if attention_factor is None:
        if factor is None:
            if max_pos is None:
                raise ValueError(
                    "rope_frequencies: rope_type 'longrope' needs scaling['factor'] (or max_position_embeddings=, "
                    "from which factor = max_position_embeddings / original_max_position_embeddings)"
                )
            factor = max_pos / original  # Phi-3 style configs leave factor out
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    chosen = long_factor if seq_len is not None and seq_len > original else short_factor
    ext = torch.tensor(chosen, dtype=torch.float32, device=device)
    return 1.0 / (ext * base ** _exponents(dim, device)), attention_factor


def _llama3(cfg, rope_type, dim, base, seq_len, max_pos, device):
    factor = _number(cfg, "factor", rope_type, minimum=1.0, required=True)
    low_freq_factor = _number(cfg, "low_freq_factor", rope_type, minimum=0.0, strict=True, required=True)
    high_freq_factor = _number(cfg, "high_freq_factor", rope_type, minimum=0.0, strict=True, required=True)
    if high_freq_factor <= low_freq_factor:
        raise ValueError(
            f"rope_frequencies: scaling['high_freq_factor'] ({high_freq_factor!r}) must be greater than "
            f"scaling['low_freq_factor'] ({low_freq_factor!r})"
        )
    original = _pretraining_length(cfg, rope_type, max_pos, prefer_max=False)
    inv_freq = _plain_inv_freq(dim, base, device)
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are interpolated by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(in_band, blended, scaled), 1.0


_COMPUTE = {
    "default": _default,
    "linear": _linear,
    "ntk": _ntk,
    "dynamic": _dynamic,
    "yarn": _yarn,
    "longrope": _longrope,
    "llama3": _llama3,
}


def rope_type_of(scaling: Optional[Mapping[str, Any]]) -> str:
    """The rope_type a scaling dict names (Hugging Face's 'type' alias included)."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


# ------------------------------------------------------------------------- ALiBi --

ALIBI_KINDS = ("standard", "balanced")


def _press_slopes(num_heads: int) -> list:
    """Press et al.: 2^(-8h/H) for h = 1..H when H is a power of two; otherwise the
    slopes of the largest power of two p < H, then every other slope of 2p."""
    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = [2.0 ** (-8.0 * h / p) for h in range(1, p + 1)]
    if p < num_heads:
        slopes += _press_slopes(2 * p)[0::2][: num_heads - p]
    return slopes


def alibi_slopes(
    num_heads: int,
    kind: str = "standard",
    interpolation: float = 1.0,
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """ALiBi slopes (num_heads,) float32 for ``local_attention(alibi_slopes=...)``.

    The op subtracts ``slope * |distance|`` from each score, so a positive slope
    penalises distance. ``kind="standard"``: Press et al. (2^(-8h/H), with their
    rule for head counts that are not a power of two). ``kind="balanced"``
    (SWAT): the first H/2 heads get +2^-k and the last H/2 heads -2^-k,
    k = 1..H/2, so half the heads reward distance (H must be even).
    ``interpolation`` >= 1 divides every slope (ALiBi with position
    interpolation: run at ``interpolation`` times the training length).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be a positive int, got {num_heads!r}")
    check_choice("alibi_slopes", "kind", kind, ALIBI_KINDS)
    if not _is_number(interpolation) or interpolation < 1.0:
        raise ValueError(
            f"alibi_slopes: interpolation must be a number >= 1 (the factor positions are stretched by), "
            f"got {interpolation!r}"
        )
    if kind == "standard":
        slopes = _press_slopes(int(num_heads))
    else:
        if num_heads % 2:
            raise ValueError(f"alibi_slopes: kind='balanced' needs an even num_heads (half +, half -), got {num_heads}")
        half = [2.0 ** -k for k in range(1, num_heads // 2 + 1)]
        slopes = half + [-s for s in half]
    return torch.tensor([s / interpolation for s in slopes], dtype=torch.float32, device=device)
