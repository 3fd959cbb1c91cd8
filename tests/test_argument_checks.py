"""Arguments that were accepted silently or rejected with an unclear error (issue 12): each
now raises TypeError (wrong type) or ValueError (out of range) naming the argument, the
value and what was expected, in longreach.local_attention and in the nn modules that share
its checks (longreach/_checks.py). Also: the subpackages are reachable after a plain
`import longreach`, which stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import longreach
from longreach.nn import LocalSelfAttention

Q = torch.randn(1, 4, 8, 16)
K = V = torch.randn(1, 2, 8, 16)

# (id, keyword arguments, exception type, message regex)
BAD_ARGUMENTS = [
    ("causal_str", dict(causal="no"), TypeError, r"causal must be a bool \(True or False\), got 'no' \(str\)"),
    ("causal_int", dict(causal=1), TypeError, r"causal must be a bool \(True or False\), got 1 \(int\)"),
    ("return_lse_str", dict(return_lse="yes"), TypeError, r"return_lse must be a bool .*got 'yes' \(str\)"),
    ("return_lse_none", dict(return_lse=None), TypeError, r"return_lse must be a bool .*got None \(NoneType\)"),
    ("scale_str", dict(scale="1"), TypeError, r"scale must be a finite number or None .*got '1' \(str\)"),
    ("scale_tensor", dict(scale=torch.ones(2)), TypeError,
     r"scale must be a finite number or None .*got a torch.float32 tensor of shape \(2,\)"),
    ("scale_bool", dict(scale=True), TypeError, r"scale must be a finite number .*got True \(bool\)"),
    ("scale_nan", dict(scale=float("nan")), ValueError, r"scale must be a finite number or None .*got nan"),
    ("softcap_str", dict(softcap="1"), TypeError, r"softcap must be a positive number or None, got '1' \(str\)"),
    ("softcap_bool", dict(softcap=True), TypeError, r"softcap must be a positive number or None, got True \(bool\)"),
    ("softcap_huge_int", dict(softcap=10**400), ValueError, r"softcap must be a positive number or None, got 1000"),
    ("sigmoid_bias_str", dict(score="sigmoid", sigmoid_bias="x"), TypeError,
     r"sigmoid_bias must be a finite number or None, got 'x' \(str\)"),
    ("sigmoid_bias_bool", dict(score="sigmoid", sigmoid_bias=False), TypeError, r"sigmoid_bias .*got False \(bool\)"),
    ("sigmoid_bias_inf", dict(score="sigmoid", sigmoid_bias=float("-inf")), ValueError,
     r"sigmoid_bias must be a finite number or None, got -inf"),
    ("sigmoid_bias_with_softmax", dict(sigmoid_bias=0.5), ValueError,
     r"sigmoid_bias is only used with score='sigmoid', got sigmoid_bias=0.5 with score='softmax'"),
    ("sigmoid_bias_nan_with_softmax", dict(sigmoid_bias=float("nan")), ValueError, r"sigmoid_bias must be .*got nan"),
    ("score_int", dict(score=1), ValueError, r"score must be one of \('softmax', 'sigmoid'\), got 1"),
    ("alibi_float", dict(alibi_slopes=0.5), TypeError,
     r"alibi_slopes must be a float32 tensor of shape \(Hq,\) or \(B, Hq\), or None, got 0.5 \(float\)"),
    ("alibi_list", dict(alibi_slopes=[0.5] * 4), TypeError, r"alibi_slopes must be a float32 tensor .*\(list\)"),
    ("global_mask_list", dict(global_mask=[[True] * 8]), TypeError,
     r"global_mask must be a bool tensor of shape \(B, Lk\) or None, got \[\[True, .*\(list\)"),
    ("global_mask_numpy", dict(global_mask=np.ones((1, 8), dtype=bool)), TypeError,
     r"global_mask must be a bool tensor of shape \(B, Lk\) or None, got .*\(ndarray\)"),
    ("window_left_2_63", dict(window=(2**63, 0)), ValueError,
     r"window left must be at most 2\*\*63 - 1 \(None means unbounded\), got 9223372036854775808"),
    ("window_right_huge", dict(window=(0, 2**70)), ValueError, r"window right must be at most 2\*\*63 - 1"),
    ("window_numpy_int", dict(window=(np.int64(3), 0)), TypeError, r"window left must be a non-negative int or None"),
    ("dilation_2_63", dict(dilation=2**63), ValueError,
     r"dilation must be at most 2\*\*63 - 1 \(the ops take int64\), got 9223372036854775808"),
    ("dilation_str", dict(dilation="2"), TypeError, r"dilation must be an int >= 1, got '2' \(str\)"),
    ("dilation_bool", dict(dilation=True), TypeError, r"dilation must be an int >= 1, got True \(bool\)"),
]


@pytest.mark.parametrize("name,kwargs,error,match", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_argument_raises_naming_it(name, kwargs, error, match):
    with pytest.raises(error, match=r"^local_attention: " + match):
        longreach.local_attention(Q, K, V, **kwargs)


def test_zero_head_dim_raises():
    q = torch.randn(1, 4, 8, 0)
    with pytest.raises(ValueError, match=r"local_attention: q must have head dim D >= 1, got shape \(1, 4, 8, 0\)"):
        longreach.local_attention(q, q[:, :2], q[:, :2])


@pytest.mark.parametrize("bad", ["q", "k", "v"])
def test_non_tensor_qkv_names_which(bad):
    args = dict(q=Q, k=K, v=V)
    args[bad] = args[bad].numpy()
    with pytest.raises(TypeError, match=rf"local_attention: {bad} must be a tensor, got .*\(ndarray\)"):
        longreach.local_attention(args["q"], args["k"], args["v"])


def test_huge_but_valid_integers_reach_the_op():
    """Values below 2**63 are the kernels' to clip (meta tensors: only the fake kernel runs)."""
    q, k = Q.to("meta"), K.to("meta")
    for kwargs in (dict(window=(2**63 - 1, 2**63 - 1)), dict(dilation=2**63 - 1),
                   dict(window=(2**62, 0), dilation=2**62)):
        assert longreach.local_attention(q, k, k, **kwargs).shape == Q.shape


def test_valid_numbers_of_every_accepted_type():
    """ints for the float options, numpy float64 (a float subclass), scale 0 and negative scale."""
    longreach.local_attention(Q, K, V, softcap=30, scale=1, window=(2, 2))
    longreach.local_attention(Q, K, V, score="sigmoid", sigmoid_bias=np.float64(-1.0), scale=-0.5)
    longreach.local_attention(Q, K, V, scale=0)


# --------------------------------------------------------------------------- nn modules


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(causal="yes"), TypeError, r"LocalSelfAttention: causal must be a bool \(True or False\), got 'yes' \(str\)"),
    (dict(softcap=True), TypeError, r"LocalSelfAttention: softcap must be a positive number or None, got True"),
    (dict(softcap="5"), TypeError, r"LocalSelfAttention: softcap must be a positive number or None, got '5' \(str\)"),
    (dict(sigmoid_bias=-1.0), ValueError, r"LocalSelfAttention: sigmoid_bias is only used with score='sigmoid'"),
    (dict(score="sigmoid", window=4, sigmoid_bias=float("nan")), ValueError, r"sigmoid_bias must be a finite number"),
    (dict(dilation=2**63), ValueError, r"LocalSelfAttention: dilation must be at most 2\*\*63 - 1"),
    (dict(dilation=2.0), TypeError, r"LocalSelfAttention: dilation must be an int >= 1, got 2.0"),
    (dict(window=(2.5, 0), causal=False), TypeError, r"window left must be a non-negative int or None, got 2.5"),
    (dict(window=(2**63, 0)), ValueError, r"LocalSelfAttention: window left must be at most 2\*\*63 - 1"),
    (dict(window=2**64), ValueError, r"LocalSelfAttention: window left must be at most 2\*\*63 - 1"),
    (dict(score=None), ValueError, r"LocalSelfAttention: score must be one of \('softmax', 'sigmoid'\), got None"),
], ids=["causal_str", "softcap_bool", "softcap_str", "sigmoid_bias_softmax", "sigmoid_bias_nan", "dilation_huge",
        "dilation_float", "window_float", "window_huge", "int_window_huge", "score_none"])
def test_module_checks_are_the_ops_checks(kwargs, error, match):
    with pytest.raises(error, match=match):
        LocalSelfAttention(32, 4, **kwargs)


def test_longformer_dilation_check():
    from longreach.nn.longformer import _check_dilation

    with pytest.raises(TypeError, match=r"LongformerSelfAttention: dilation for layer 3 must be an int >= 1, got '2'"):
        _check_dilation("2", 3)
    assert _check_dilation(2, 0) == 2


# ------------------------------------------------------------------- lazy subpackages


def test_subpackages_are_reachable_and_import_stays_light():
    """Run in a fresh interpreter: what `import longreach` loads must not depend on other tests."""
    code = (
        "import sys, longreach\n"
        "heavy = [m for m in ('transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, f'import longreach imported {heavy}'\n"
        "assert 'longreach.nn' not in sys.modules and 'longreach.hf' not in sys.modules\n"
        "assert longreach.nn.LocalSelfAttention is not None\n"
        "assert not [m for m in ('transformers', 'matplotlib') if m in sys.modules]\n"
        "for name in ('reference', 'positional', 'position_ids', 'padding', 'ops', 'extrapolate', 'hf'):\n"
        "    assert getattr(longreach, name).__name__ == 'longreach.' + name, name\n"
        "assert 'nn' in dir(longreach) and 'hf' in dir(longreach)\n"
        "try:\n"
        "    longreach.no_such_module\n"
        "except AttributeError as e:\n"
        "    assert \"module 'longreach' has no attribute 'no_such_module'\" in str(e)\n"
        "else:\n"
        "    raise AssertionError('no AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
