"""Argument checks shared by the functional ops (the ops/ package) and the nn modules.

A value of the wrong type raises TypeError, a value out of range ValueError; every message reads
"<owner>: <name> must be <what was expected>, got <the value>", and each check returns the
value in the form the C++ ops take. They look only at Python values and tensor metadata, so
torch.compile traces them away.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

SCORES = ("softmax", "sigmoid")

# The ops take int64; a larger Python int would fail in torch's schema parser with
# "Expected a value of type 'int' ... found type 'int'".
INT64_MAX = 2**63 - 1


def describe(value, typed: bool = False) -> str:
    """A bad value as a message shows it: tensors by dtype and shape, numbers as they are
    (unless `typed`), anything else shortened and with its type, so the string '1' is not
    mistaken for 1."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = " ".join(repr(value).split())
    if len(text) > 60:
        text = text[:50] + " ..."
    if not typed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return text
    return f"{text} ({type(value).__name__})"


def check_bool(owner: str, name: str, value) -> bool:
    # A truthy string such as 'no' would otherwise silently mean True.
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool (True or False), got {describe(value, typed=True)}")
    return value


def check_int(owner: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {name} must be an int >= {minimum}, got {describe(value)}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be an int >= {minimum}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{owner}: {name} must be at most 2**63 - 1 (the ops take int64), got {describe(value)}")
    return value


def check_window_side(owner: str, side: str, value) -> Optional[int]:
    """One side of a (left, right) window: None (unbounded) or an int >= 0."""
    if value is None:
        return None
    expected = f"window {side} must be a non-negative int or None"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: {expected}, got {describe(value)}")
    if value < 0:
        raise ValueError(f"{owner}: {expected}, got {value}")
    if value > INT64_MAX:
        raise ValueError(f"{owner}: window {side} must be at most 2**63 - 1 (None means unbounded), "
                         f"got {describe(value)}")
    return value


def check_choice(owner: str, name: str, value, choices, allow_none: bool = False):
    """`value` is one of the strings `choices` (or None when `allow_none`)."""
    if allow_none and value is None:
        return None
    # Compared by identity or as strings: `in` would call a tensor's or array's __eq__.
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        extra = " or None" if allow_none else ""
        raise ValueError(f"{owner}: {name} must be one of {tuple(choices)}{extra}, got {value!r}")
    return value


def check_score(owner: str, score, allow_none: bool = False) -> str:
    return check_choice(owner, "score", score, SCORES, allow_none)


def _number(owner: str, name: str, value, expected: str) -> Optional[float]:
    """float(value) for an int or float; bools, strings, tensors and numpy arrays are refused
    (softcap=True would otherwise mean 1.0)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be {expected}, got {describe(value)}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf


def check_softcap(owner: str, softcap) -> Optional[float]:
    expected = "a positive number or None"
    value = _number(owner, "softcap", softcap, expected)
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{owner}: softcap must be {expected}, got {describe(softcap)}")
    return value


def check_dropout_p(owner: str, dropout_p, name: str = "dropout_p") -> float:
    """Attention dropout probability: a number in [0, 1] (0 = no dropout). name: the argument's
    name in the caller (the nn modules call it `dropout`, as nn.MultiheadAttention does)."""
    expected = "a number in [0, 1]"
    if dropout_p is None:
        raise TypeError(f"{owner}: {name} must be {expected}, got None")
    value = _number(owner, name, dropout_p, expected)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{owner}: {name} must be {expected}, got {describe(dropout_p)}")
    return value


def check_scale(owner: str, scale) -> Optional[float]:
    expected = "a finite number or None (None means 1 / sqrt(head dim))"
    value = _number(owner, "scale", scale, expected)
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{owner}: scale must be {expected}, got {describe(scale)}")
    return value


def check_sigmoid_bias(owner: str, sigmoid_bias, score: str) -> Optional[float]:
    expected = "a finite number or None"
    value = _number(owner, "sigmoid_bias", sigmoid_bias, expected)
    if value is None:
        return None
    if not math.isfinite(value):
        raise ValueError(f"{owner}: sigmoid_bias must be {expected}, got {describe(sigmoid_bias)}")
    if score != "sigmoid":
        # The softmax kernels ignore it: a caller passing one has a mistake somewhere.
        raise ValueError(f"{owner}: sigmoid_bias is only used with score='sigmoid', got sigmoid_bias={sigmoid_bias!r} "
                         f"with score={score!r}")
    return value


def check_tensor(owner: str, name: str, value, expected: str = "a tensor"):
    """`value` must be a torch.Tensor (dtype and shape are the kernels' to check); `expected`
    says what the message asks for."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{owner}: {name} must be {expected}, got {describe(value, typed=True)}")
    return value


def check_same_device(owner: str, **tensors) -> None:
    """Every tensor given (None skipped) on the first one's device.

    Checked in Python, and in the fake kernels, because a "meta" tensor among CPU ones routes
    the call to the fake kernel, which returns uninitialised memory instead of reaching the
    C++ device checks."""
    ref_name, ref = next(iter(tensors.items()))
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{owner}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                             f"all tensor arguments must be on one device")


CU_SEQLENS_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(owner: str, cu_seqlens_q, cu_seqlens_k) -> int:
    """flash-attn's cumulative sequence lengths, by metadata: two 1-D int32 or int64 tensors with
    one entry per sequence plus one. Returns the number of sequences. Their values (0 first,
    non-decreasing, the total length last) are the kernels' to check: reading them here would
    synchronise with the device and break torch.compile graphs."""
    expected = "a 1-D int32 or int64 tensor of shape (num_seqs + 1,)"
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_tensor(owner, name, t, expected)
        if t.dtype not in CU_SEQLENS_DTYPES:
            raise TypeError(f"{owner}: {name} must be {expected}, got {describe(t)}")
        if t.dim() != 1 or t.shape[0] < 1:
            raise ValueError(f"{owner}: {name} must be {expected}, got {describe(t)}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(f"{owner}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{cu_seqlens_q.shape[0] - 1} (shape {tuple(cu_seqlens_q.shape)}) and "
                         f"{cu_seqlens_k.shape[0] - 1} (shape {tuple(cu_seqlens_k.shape)})")
    return cu_seqlens_q.shape[0] - 1


SINK_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_per_head(owner: str, name: str, t, dtypes, q_heads: int, expected: str) -> None:
    """A tensor of one value per query head, (Hq,), of one of `dtypes`."""
    check_tensor(owner, name, t, expected)
    if t.dtype not in dtypes:
        raise TypeError(f"{owner}: {name} must be {expected}, got {describe(t)}")
    if tuple(t.shape) != (q_heads,):
        raise ValueError(f"{owner}: {name} must be {expected}, got {describe(t)}")


def check_sinks(owner: str, sinks, q_heads: int, score: str):
    """Learnable sink logits: None, or a floating tensor of shape (Hq,), softmax scores only."""
    if sinks is None:
        return None
    _check_per_head(owner, "sinks", sinks, SINK_DTYPES, q_heads,
                    f"a floating tensor of shape (Hq,) = ({q_heads},) or None")
    if score != "softmax":
        raise ValueError(f"{owner}: sinks are only defined for score='softmax' (a sink logit enters the softmax "
                         f"denominator), got score={score!r}")
    return sinks


CHUNK_SHIFT_DTYPES = (torch.int32, torch.int64)


def check_chunk(owner: str, chunk, chunk_shift, q_heads: int):
    """Chunked attention: chunk an int >= 0 (0 = off), chunk_shift None or an int32/int64 tensor
    of shape (Hq,), only with chunk > 0. Returns (chunk, chunk_shift) as the ops take them."""
    chunk = check_int(owner, "chunk", chunk, 0)
    if chunk_shift is None:
        return chunk, None
    _check_per_head(owner, "chunk_shift", chunk_shift, CHUNK_SHIFT_DTYPES, q_heads,
                    f"an int32 or int64 tensor of shape (Hq,) = ({q_heads},) or None")
    if chunk == 0:
        raise ValueError(f"{owner}: chunk_shift needs chunk > 0 (chunks of that many positions), got chunk=0")
    return chunk, chunk_shift


def chunk_shifts(owner: str, chunk, chunk_shift, q_heads: int, device=None):
    """The one expansion of a user's `chunk_shift` (nn modules, longreach.hf.patch, the example):
    None (no shift), "half" (LongLoRA's S2-Attn and SCCA's two-group pattern: 0 in heads
    0 .. Hq // 2 - 1, chunk // 2 in heads Hq // 2 .. Hq - 1), a sequence of Hq ints, or an
    int32/int64 tensor (Hq,). Returns (chunk, an int64 tensor (Hq,) on `device` or None),
    checked by check_chunk as the ops check it."""
    expected = f"'half', a sequence of {q_heads} ints, an int tensor of shape (Hq,) = ({q_heads},) or None"
    if isinstance(chunk_shift, str):
        if chunk_shift != "half":
            raise ValueError(f"{owner}: chunk_shift must be {expected}, got {chunk_shift!r}")
        chunk = check_int(owner, "chunk", chunk, 0)
        if chunk == 0:
            raise ValueError(f"{owner}: chunk_shift='half' needs chunk > 0 (chunks of that many positions), "
                             "got chunk=0")
        chunk_shift = torch.zeros(q_heads, dtype=torch.long, device=device)
        chunk_shift[q_heads // 2:] = chunk // 2
    elif isinstance(chunk_shift, (list, tuple)):
        if len(chunk_shift) != q_heads or any(isinstance(s, bool) or not isinstance(s, int) for s in chunk_shift):
            raise (ValueError if all(isinstance(s, int) and not isinstance(s, bool) for s in chunk_shift)
                   else TypeError)(f"{owner}: chunk_shift must be {q_heads} ints (one per query head), "
                                   f"got {describe(chunk_shift)}")
        if any(not -INT64_MAX - 1 <= s <= INT64_MAX for s in chunk_shift):
            raise ValueError(f"{owner}: chunk_shift values must fit in int64, got {describe(chunk_shift)}")
        chunk_shift = torch.tensor(chunk_shift, dtype=torch.long, device=device)
    elif chunk_shift is not None and not isinstance(chunk_shift, torch.Tensor):
        raise TypeError(f"{owner}: chunk_shift must be {expected}, got {describe(chunk_shift, typed=True)}")
    chunk, chunk_shift = check_chunk(owner, chunk, chunk_shift, q_heads)
    if chunk_shift is not None:
        chunk_shift = chunk_shift.to(device=device if device is not None else chunk_shift.device, dtype=torch.long)
    return chunk, chunk_shift
