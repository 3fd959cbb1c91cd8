"""merge_attention against attention over the union of the key sets (the reference), values and
gradients, with fully masked parts and rows; the partial results are written out densely here."""

import pytest
import torch

import longreach
from longreach import reference

torch.manual_seed(0)


def _parts(q, k, v, splits, window):
    """Softmax attention of q over each key subset lo:hi within the window, written out densely."""
    allowed = reference.allowed_keys(q.shape[2], k.shape[2], window=window)[0]
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    outs, lses = [], []
    for lo, hi in splits:
        mask = allowed.clone()
        mask[:, :lo] = False
        mask[:, hi:] = False
        s = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        p = torch.where(mask, torch.exp(s - torch.where(lse.isinf(), 0, lse)[..., None]), 0)
        outs.append(p @ v)
        lses.append(lse)
    return outs, lses


@pytest.mark.parametrize("splits", [[(0, 40)], [(0, 13), (13, 40)], [(0, 5), (5, 6), (6, 30), (30, 40)],
                                    [(0, 20), (20, 20), (20, 40)]])
@pytest.mark.parametrize("window", [(None, None), (7, 0), (3, 5)])
def test_merge_equals_attention_over_the_union(splits, window):
    q = torch.randn(2, 3, 17, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 40, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 40, 8, dtype=torch.float64, requires_grad=True)
    outs, lses = _parts(q, k, v, splits, window)
    out, lse = longreach.merge_attention(outs, lses)
    ref_out, ref_lse = reference.local_attention(q, k, v, window=window, return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * g).sum() + (lse.masked_fill(lse.isinf(), 0) * gl).sum(), (q, k, v))
    ref = torch.autograd.grad((ref_out * g).sum() + (ref_lse.masked_fill(ref_lse.isinf(), 0) * gl).sum(), (q, k, v))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
        assert torch.isfinite(a).all()


def test_rows_no_part_saw_are_zero_with_minus_infinity():
    out = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    lse = torch.randn(3, 2, 4, dtype=torch.float64)
    lse[:, 0, 1] = float("-inf")
    out[:, 0, 1] = float("nan")  # garbage where the weight is zero must not leak
    lse[1, 1, 2] = float("-inf")
    out[1, 1, 2] = float("inf")
    lse.requires_grad_(True)
    out.requires_grad_(True)
    merged, merged_lse = longreach.merge_attention(out, lse)
    assert (merged[0, 1] == 0).all() and merged_lse[0, 1] == float("-inf")
    assert torch.isfinite(merged).all()
    expected = (torch.softmax(lse[:, 1, 2].detach()[[0, 2]], 0)[:, None] * out[[0, 2], 1, 2].detach()).sum(0)
    torch.testing.assert_close(merged[1, 2], expected)
    (merged.sum() + merged_lse[torch.isfinite(merged_lse)].sum()).backward()
    assert torch.isfinite(lse.grad).all() and torch.isfinite(out.grad).all()
    assert (out.grad[:, 0, 1] == 0).all()


def test_gradcheck_float64():
    out = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda o, l: longreach.merge_attention(o, l), (out, lse))


def test_large_lse_values_are_stable():
    out = torch.randn(2, 1, 3, 4)
    lse = torch.tensor([[[1e4, -1e4, 80.0]], [[1e4 + 1, -1e4, 90.0]]])
    merged, merged_lse = longreach.merge_attention(list(out), list(lse))
    assert torch.isfinite(merged).all() and torch.isfinite(merged_lse).all()
    torch.testing.assert_close(merged_lse, torch.logsumexp(lse, 0))


def test_bfloat16_outs_keep_their_dtype_and_compile():
    out = torch.randn(2, 1, 3, 8, dtype=torch.bfloat16)
    lse = torch.randn(2, 1, 3)
    merged, merged_lse = torch.compile(longreach.merge_attention, fullgraph=True)(out, lse)
    assert merged.dtype == torch.bfloat16 and merged_lse.dtype == torch.float32
    eager, _ = longreach.merge_attention(out, lse)
    torch.testing.assert_close(merged, eager)


@pytest.mark.parametrize("outs, lses, error, match", [
    ([], [], TypeError, "outs must be a non-empty list"),
    ([torch.zeros(1, 2, 3)], [torch.zeros(1, 3)], ValueError, "lses must have the shape of outs"),
    ([torch.zeros(1, 2, 3)], [torch.zeros(1, 2), torch.zeros(1, 2)], ValueError, "as many parts"),
    ([torch.zeros(1, 2, 3), torch.zeros(1, 2, 4)], [torch.zeros(1, 2)] * 2, ValueError, r"outs\[1\]"),
    ([torch.zeros(1, 2, 3)], [torch.zeros(1, 2, dtype=torch.float16)], TypeError, "float32 or float64"),
    ([torch.zeros(1, 2, 3, dtype=torch.int32)], [torch.zeros(1, 2)], TypeError, "floating point"),
    ([torch.zeros(1, 2, 3)], [[0.0]], TypeError, r"lses\[0\] must be a tensor"),
])
def test_bad_input(outs, lses, error, match):
    with pytest.raises(error, match=match):
        longreach.merge_attention(outs, lses)
