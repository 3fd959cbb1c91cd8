"""The same mistake raises the same exception type from the Python API and from the C++ op
called directly (torch.ops.longreach.*, as C++ callers and torch.compile'd graphs reach it):
ValueError for a bad value, TypeError for a bad type, with dtypes named as PyTorch names them."""

from __future__ import annotations

import re

import pytest
import torch

import longreach

OPS = torch.ops.longreach
B, HQ, HK, L, D = 1, 4, 2, 16, 8


def qkv(dtype=torch.float32, d=D):
    return (torch.randn(B, HQ, L, d, dtype=dtype), torch.randn(B, HK, L, d, dtype=dtype),
            torch.randn(B, HK, L, d, dtype=dtype))


def attention_raw(q, k, v, global_mask=None, slopes=None, dilation=1, score="softmax", softcap=0.0, scale=0.3):
    return OPS.local_attention_fwd(q, k, v, global_mask, slopes, 3, 0, dilation, score, None, softcap, scale)


def attention_api(q, k, v, global_mask=None, slopes=None, dilation=1, score="softmax", softcap=0.0, scale=0.3):
    return longreach.local_attention(q, k, v, window=(3, 0), dilation=dilation, global_mask=global_mask,
                                     alibi_slopes=slopes, score=score, softcap=softcap or None, scale=scale)


q, k, v = qkv()
ATTENTION_CASES = {
    "q float64, k float32": (TypeError, lambda f: f(q.double(), k, v)),
    "v float16": (TypeError, lambda f: f(q, k, v.half())),
    "int64 inputs": (TypeError, lambda f: f(q.long(), k.long(), v.long())),
    "head dims differ": (ValueError, lambda f: f(q, *qkv(d=16)[1:])),
    "batch sizes differ": (ValueError, lambda f: f(q, torch.randn(2, HK, L, D), torch.randn(2, HK, L, D))),
    "Hq not a multiple of Hk": (ValueError, lambda f: f(torch.randn(B, 3, L, D), k, v)),
    "q 3-D": (ValueError, lambda f: f(q[0], k[0], v[0])),
    "k and v lengths differ": (ValueError, lambda f: f(q, k, v[:, :, :-1])),
    "dilation 0": (ValueError, lambda f: f(q, k, v, dilation=0)),
    "float global_mask": (TypeError, lambda f: f(q, k, v, global_mask=torch.zeros(B, L))),
    "global_mask shape": (ValueError, lambda f: f(q, k, v, global_mask=torch.zeros(B, L - 1, dtype=torch.bool))),
    "alibi_slopes shape": (ValueError, lambda f: f(q, k, v, slopes=torch.zeros(3))),
    "float64 alibi_slopes": (TypeError, lambda f: f(q, k, v, slopes=torch.zeros(HQ, dtype=torch.float64))),
    "score": (ValueError, lambda f: f(q, k, v, score="relu")),
    "negative softcap": (ValueError, lambda f: f(q, k, v, softcap=-1.0)),
    "NaN scale": (ValueError, lambda f: f(q, k, v, scale=float("nan"))),
}

x = torch.randn(B, HQ, L, D)
cos, sin = torch.randn(L, D // 2), torch.randn(L, D // 2)
ROTARY_CASES = {
    "int64 x": (TypeError, lambda f: f(x.long(), cos, sin)),
    "int64 tables": (TypeError, lambda f: f(x, cos.long(), sin.long())),
    "tables wider than x": (ValueError, lambda f: f(x, torch.randn(L, D), torch.randn(L, D))),
    "cos and sin shapes differ": (ValueError, lambda f: f(x, cos, sin[:-1])),
    "float position_ids": (TypeError, lambda f: f(x, cos, sin, torch.zeros(1, L))),
    "position_ids past the table": (ValueError, lambda f: f(x, cos, sin, torch.full((1, L), L))),
    "x 3-D": (ValueError, lambda f: f(x[0], cos, sin)),
}


def rotary_raw(x, cos, sin, position_ids=None):
    return OPS.apply_rotary(x, cos, sin, position_ids, False, False)


def rotary_api(x, cos, sin, position_ids=None):
    return longreach.apply_rotary(x, cos, sin, position_ids)


C_SPELLINGS = re.compile(r"c10::|long int|\bFloat\b|\bDouble\b|\bBFloat16\b|\bHalf\b|ScalarType")


def outcome(call, function):
    try:
        call(function)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


@pytest.mark.parametrize("expected, case", list(ATTENTION_CASES.values()), ids=list(ATTENTION_CASES))
def test_local_attention(expected, case):
    raw, api = outcome(case, attention_raw), outcome(case, attention_api)
    assert type(raw) is expected and type(api) is expected, (raw, api)
    assert not C_SPELLINGS.search(str(raw)) and not C_SPELLINGS.search(str(api)), (raw, api)


@pytest.mark.parametrize("expected, case", list(ROTARY_CASES.values()), ids=list(ROTARY_CASES))
def test_apply_rotary(expected, case):
    raw, api = outcome(case, rotary_raw), outcome(case, rotary_api)
    assert type(raw) is expected and type(api) is expected, (raw, api)
    assert not C_SPELLINGS.search(str(raw)) and not C_SPELLINGS.search(str(api)), (raw, api)
