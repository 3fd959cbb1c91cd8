"""longreach.padding.local_attention_padded: exact key padding by slicing each row's run of real keys.

The truth is a dense computation with the padding folded into the boolean mask:
F.scaled_dot_product_attention for softmax, and the sigmoid sum written out, both over
longreach.reference.allowed_keys(...) & key_valid. Padding query rows must be zero.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longreach import reference
from longreach.padding import contiguous_spans, local_attention_padded


def make_valid(batch: int, length: int, kind: str) -> torch.Tensor:
    valid = torch.ones(batch, length, dtype=torch.bool)
    for row in range(1, batch):
        if kind in ("left", "both"):
            valid[row, : 2 * row] = False
        if kind in ("right", "both"):
            valid[row, length - 3 * row :] = False
    if kind == "empty_row":
        valid[-1] = False
    return valid


def dense(q, k, v, valid, window, causal, score="softmax", slopes=None, dilation=1):
    q_len, k_len = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    allowed = reference.allowed_keys(q_len, k_len, window, causal, dilation)[0] & valid[:, None, :]  # (B, Lq, Lk)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if slopes is not None:
        pos = torch.arange(q_len) + k_len - q_len
        s = s - slopes[:, None, None] * (pos[:, None] - torch.arange(k_len)[None, :]).abs()
    if score == "softmax":
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        return torch.softmax(s, -1).nan_to_num(0.0) @ v
    # sigmoid: default bias from each row's own number of real keys (padding is invisible)
    left, right = window
    right = 0 if causal else right
    n = valid.sum(1).to(s.dtype)
    if left is not None and right is not None:
        n = n.clamp(max=left + right + 1)
    bias = -torch.log(n)[:, None, None, None]
    return (torch.sigmoid(s + bias) * allowed[:, None]) @ v


@pytest.mark.parametrize("kind", ["left", "right", "both", "empty_row"])
@pytest.mark.parametrize("causal, window", [(True, (3, 0)), (True, (None, 0)), (False, (2, 4)), (False, (None, None))])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_matches_dense_masked_attention(kind, causal, window, score):
    batch, length = 4, 13
    q = torch.randn(batch, 4, length, 8, dtype=torch.float64)
    k = torch.randn(batch, 2, length, 8, dtype=torch.float64)
    v = torch.randn(batch, 2, length, 8, dtype=torch.float64)
    valid = make_valid(batch, length, kind)
    slopes = torch.tensor([0.3, -0.2, 0.1, 0.05], dtype=torch.float32)
    got = local_attention_padded(q, k, v, valid, causal=causal, window=window, score=score, alibi_slopes=slopes)
    expected = dense(q, k, v, valid, window, causal, score, slopes.double())
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], expected[real], atol=1e-12, rtol=1e-12)
    assert not got[~real].any()  # padding query rows are zero


def test_decoding_against_a_cache_with_left_padding():
    """Lq < Lk (bottom-right alignment): the rows sit at the end of each row's run."""
    q = torch.randn(3, 2, 2, 8, dtype=torch.float64)
    k = torch.randn(3, 2, 10, 8, dtype=torch.float64)
    v = torch.randn(3, 2, 10, 8, dtype=torch.float64)
    valid = make_valid(3, 10, "left")
    got = local_attention_padded(q, k, v, valid, causal=True, window=(4, 0))
    torch.testing.assert_close(got, dense(q, k, v, valid, (4, 0), True), atol=1e-12, rtol=1e-12)


def test_dilation_and_per_batch_slopes():
    q, k, v = (torch.randn(3, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    valid = make_valid(3, 12, "both")
    slopes = torch.tensor([[0.1, 0.2], [0.3, -0.1], [0.0, 0.5]], dtype=torch.float32)
    got = local_attention_padded(q, k, v, valid, causal=True, window=(3, 0), dilation=2, alibi_slopes=slopes)
    for row in range(3):
        expected = dense(q[row:row + 1], k[row:row + 1], v[row:row + 1], valid[row:row + 1], (3, 0), True,
                         slopes=slopes[row].double(), dilation=2)
        real = valid[row]
        torch.testing.assert_close(got[row][:, real], expected[0][:, real], atol=1e-12, rtol=1e-12)


def test_gradients_match_dense():
    q, k, v = (torch.randn(3, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    valid = make_valid(3, 9, "both")
    weight = torch.randn(3, 2, 9, 4, dtype=torch.float64) * valid[:, None, :, None]
    grads = []
    for fn in (lambda: local_attention_padded(q, k, v, valid, causal=True, window=(2, 0)),
               lambda: dense(q, k, v, valid, (2, 0), True)):
        grads.append(torch.autograd.grad((fn() * weight).sum(), (q, k, v)))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_no_padding_is_one_plain_call():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    from longreach import local_attention

    plain = local_attention(q, k, v, causal=True, window=(2, 0))
    assert torch.equal(local_attention_padded(q, k, v, None, causal=True, window=(2, 0)), plain)
    everything = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(local_attention_padded(q, k, v, everything, causal=True, window=(2, 0)), plain)


def test_errors_name_the_problem():
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    holes = torch.ones(2, 6, dtype=torch.bool)
    holes[1, 2] = False
    with pytest.raises(ValueError, match="key_valid: row 1 has padding in the middle"):
        local_attention_padded(q, k, v, holes, causal=True)
    with pytest.raises(ValueError, match=r"key_valid must have shape \(batch, Lk\) = \(2, 6\), got \(2, 5\)"):
        local_attention_padded(q, k, v, torch.ones(2, 5, dtype=torch.bool), causal=True)
    with pytest.raises(ValueError, match="must be a 2-D"):
        contiguous_spans(torch.ones(2, 1, 6, dtype=torch.bool))
