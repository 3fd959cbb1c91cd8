"""Bad input to longreach.local_attention raises a clear error that names the
argument, the value it got and what was expected (DESIGN.md section 3): TypeError
for a value of the wrong type, ValueError for a value out of range. More cases
(issue 12) are in test_argument_checks.py."""

from __future__ import annotations

import re

import pytest
import torch

import longreach


def qkv(batch=1, q_heads=4, kv_heads=2, q_len=8, k_len=8, head_dim=16, dtype=torch.float32):
    return (
        torch.randn(batch, q_heads, q_len, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, k_len, head_dim, dtype=dtype),
        torch.randn(batch, kv_heads, k_len, head_dim, dtype=dtype),
    )


Q, K, V = qkv()


def with_(**replace):
    """(q, k, v) with some of them replaced."""
    return replace.get("q", Q), replace.get("k", K), replace.get("v", V)


# (id, (q, k, v), keyword arguments, exception type(s), message regex)
BAD_TENSORS = [
    ("q_rank", with_(q=Q[0]), {}, r"q must be a 4-D tensor \(B, H, L, D\), got shape \(4, 8, 16\)"),
    ("k_rank", with_(k=K[0]), {}, r"k must be a 4-D tensor .*got shape \[2, 8, 16\]"),
    ("v_rank", with_(v=V.unsqueeze(0)), {}, r"v must be a 4-D tensor .*got shape \[1, 1, 2, 8, 16\]"),
    ("batch", qkv(batch=1)[:1] + qkv(batch=2)[1:], {}, r"batch size of k \(2\) does not match q \(1\)"),
    ("head_dim", with_(k=K[..., :8], v=V[..., :8]), {}, r"head dim of k \(8\) does not match q \(16\)"),
    ("kv_length", with_(v=torch.randn(1, 2, 9, 16)), {},
     r"k and v must have the same shape, got k \[1, 2, 8, 16\] and v \[1, 2, 9, 16\]"),
    ("kv_head_dim", with_(v=V[..., :8]), {}, r"k and v must have the same shape, got k \[1, 2, 8, 16\] and v \[1, 2, 8, 8\]"),
    ("kv_heads", with_(v=V[:, :1]), {}, r"k and v must have the same shape"),
    ("heads_not_multiple", with_(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), {},
     r"number of query heads \(4\) must be a multiple of the number of key/value heads \(3\)"),
    ("no_kv_heads", with_(k=K[:, :0], v=V[:, :0]), {}, r"k must have at least one head, got 0"),
    ("mixed_dtype", with_(k=K.double()), {},
     r"q, k and v must share one dtype, got q torch.float32, k torch.float64, v torch.float32"),
    ("mixed_dtype_half", with_(v=V.half()), {},
     r"must share one dtype, got q torch.float32, k torch.float32, v torch.float16"),
    ("int_dtype", tuple(t.to(torch.int32) for t in (Q, K, V)), {},
     r"q has dtype torch.int32; expected float32, float64, bfloat16 or float16"),
    ("bool_dtype", tuple(t > 0 for t in (Q, K, V)), {}, r"q has dtype torch.bool; expected float32"),
    ("mixed_device_k", with_(k=K.to("meta")), {},
     r"k is on meta but q is on cpu; all tensor arguments must be on one device"),
    ("mixed_device_q", with_(q=Q.to("meta")), {}, r"k is on cpu but q is on meta"),
]


@pytest.mark.parametrize("name,tensors,kwargs,match", BAD_TENSORS, ids=[c[0] for c in BAD_TENSORS])
def test_bad_tensors(name, tensors, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        longreach.local_attention(*tensors, **kwargs)


BAD_OPTIONS = [
    ("window_negative_left", dict(window=(-1, 0)), r"window left must be a non-negative int or None, got -1"),
    ("window_negative_right", dict(window=(4, -2)), r"window right must be a non-negative int or None, got -2"),
    ("window_float", dict(window=(2.5, 0)), r"window left must be a non-negative int or None, got 2\.5"),
    ("window_bool", dict(window=(True, 0)), r"window left must be a non-negative int or None, got True"),
    ("window_not_pair", dict(window=3), r"window must be a pair \(left, right\), got 3"),
    ("window_triple", dict(window=(1, 2, 3)), r"window must be a pair \(left, right\), got \(1, 2, 3\)"),
    ("window_string", dict(window="ab"), r"window must be a pair \(left, right\), got 'ab'"),
    ("dilation_zero", dict(dilation=0), r"dilation must be an int >= 1, got 0"),
    ("dilation_negative", dict(dilation=-2), r"dilation must be an int >= 1, got -2"),
    ("dilation_float", dict(dilation=1.5), r"dilation must be an int >= 1, got 1\.5"),
    ("slopes_wrong_length", dict(alibi_slopes=torch.ones(3)),
     r"alibi_slopes must have shape \(Hq,\) = \(4,\) or \(B, Hq\) = \(1, 4\), got \[3\]"),
    ("slopes_wrong_batch", dict(alibi_slopes=torch.ones(2, 4)), r"alibi_slopes must have shape .*got \[2, 4\]"),
    ("slopes_kv_heads", dict(alibi_slopes=torch.ones(2)), r"alibi_slopes must have shape \(Hq,\) = \(4,\).*got \[2\]"),
    ("slopes_rank3", dict(alibi_slopes=torch.ones(1, 4, 1)), r"alibi_slopes must have shape .*got \[1, 4, 1\]"),
    ("slopes_float64", dict(alibi_slopes=torch.ones(4, dtype=torch.float64)),
     r"alibi_slopes must be float32, got torch.float64"),
    ("slopes_half", dict(alibi_slopes=torch.ones(4, dtype=torch.float16)),
     r"alibi_slopes must be float32, got torch.float16"),
    ("slopes_device", dict(alibi_slopes=torch.ones(4, device="meta")), r"alibi_slopes is on meta but q is on cpu"),
    ("global_mask_length", dict(global_mask=torch.ones(1, 7, dtype=torch.bool)),
     r"global_mask must have shape \(B, Lk\) = \(1, 8\), got \[1, 7\]"),
    ("global_mask_rank", dict(global_mask=torch.ones(8, dtype=torch.bool)), r"global_mask must have shape \(B, Lk\).*got \[8\]"),
    ("global_mask_float", dict(global_mask=torch.ones(1, 8)), r"global_mask must be a bool tensor, got torch.float32"),
    ("global_mask_int", dict(global_mask=torch.ones(1, 8, dtype=torch.long)),
     r"global_mask must be a bool tensor, got torch.int64"),
    ("global_mask_device", dict(global_mask=torch.ones(1, 8, dtype=torch.bool, device="meta")),
     r"global_mask is on meta but q is on cpu"),
    ("score_unknown", dict(score="relu"), r"score must be one of \('softmax', 'sigmoid'\), got 'relu'"),
    ("score_case", dict(score="Softmax"), r"score must be one of .*got 'Softmax'"),
    ("softcap_zero", dict(softcap=0.0), r"softcap must be a positive number or None, got 0\.0"),
    ("softcap_negative", dict(softcap=-30.0), r"softcap must be a positive number or None, got -30\.0"),
    ("softcap_nan", dict(softcap=float("nan")), r"softcap must be a positive number or None, got nan"),
    ("softcap_inf", dict(softcap=float("inf")), r"softcap must be a positive number or None, got inf"),
    ("return_lse_sigmoid", dict(score="sigmoid", return_lse=True), r"return_lse=True is only defined for score='softmax'"),
    ("scale_inf", dict(scale=float("inf")), r"scale must be a finite number or None .*got inf"),
    ("sigmoid_bias_nan", dict(score="sigmoid", sigmoid_bias=float("nan")),
     r"sigmoid_bias must be a finite number or None, got nan"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD_OPTIONS, ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options(name, kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        longreach.local_attention(Q, K, V, **kwargs)


def test_non_tensor_input():
    with pytest.raises(TypeError, match=r"local_attention: q must be a tensor, got .* \(list\)"):
        longreach.local_attention(Q.tolist(), K, V)
    with pytest.raises(TypeError, match=r"local_attention: v must be a tensor, got None \(NoneType\)"):
        longreach.local_attention(Q, K, None)


def test_errors_name_the_function():
    """Every message starts with the function name, so users know which call failed."""
    for _, tensors, kwargs, _ in BAD_TENSORS:
        with pytest.raises((TypeError, ValueError)) as info:
            longreach.local_attention(*tensors, **kwargs)
        assert re.search(r"local_attention", str(info.value)), str(info.value)


def test_valid_edges_do_not_raise():
    """The boundaries of the checks are accepted: window 0, dilation 1, tiny softcap, MQA, (B, H) slopes."""
    longreach.local_attention(Q, K[:, :1], V[:, :1], window=(0, 0), dilation=1, softcap=1e-3,
                              alibi_slopes=torch.zeros(1, 4))
    longreach.local_attention(Q, K, V, window=(None, 0), score="sigmoid", sigmoid_bias=0.0, scale=0.0)
