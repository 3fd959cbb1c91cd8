"""Position-id tools: PoSE (positional skip-wise training) and positions that continue
across segments. Checked against the properties the PoSE paper states, a direct
two-chunk construction, and plain arange; plus an end-to-end check that PoSE ids
drive the rotary op like the same tokens at those positions in a long sequence.
"""

from __future__ import annotations

import pytest
import torch

import longreach
from longreach.nn import RotaryEmbedding


def chunks_of(ids: torch.Tensor):
    """Split a row of ids into runs of consecutive integers."""
    jumps = (torch.diff(ids) != 1).nonzero().flatten() + 1
    return torch.tensor_split(ids, jumps.tolist())


@pytest.mark.parametrize("window_len, target_len, num_chunks", [(16, 64, 2), (32, 4096, 2), (64, 1000, 4),
                                                                 (5, 5, 3), (8, 9, 8), (1, 10, 1)])
def test_pose_properties(window_len, target_len, num_chunks):
    g = torch.Generator().manual_seed(0)
    ids = longreach.pose_position_ids(window_len, target_len, num_chunks=num_chunks, batch_size=64, generator=g)
    assert ids.shape == (64, window_len) and ids.dtype == torch.int64
    assert (ids[:, 0] == 0).all()  # the first chunk keeps its positions (u_0 = 0)
    assert (torch.diff(ids, dim=1) >= 1).all()  # strictly increasing
    assert ids.max() <= target_len - 1
    for row in ids:
        runs = chunks_of(row)
        assert len(runs) <= num_chunks  # a skip of 0 merges two chunks into one run
    if target_len == window_len:
        assert torch.equal(ids, torch.arange(window_len).expand(64, -1))


def test_pose_reaches_the_target_range():
    """Over many draws the ids span the whole target range and show relative distances
    far beyond the window, which is the point of PoSE."""
    g = torch.Generator().manual_seed(1)
    ids = longreach.pose_position_ids(32, 2048, batch_size=2000, generator=g)
    assert ids.max() >= 2000
    spans = ids[:, -1] - ids[:, 0]
    assert spans.max() >= 1900 and spans.min() < 200
    skips = ids[:, -1] - 31  # two chunks: the second chunk's skip
    assert abs(skips.double().mean().item() - (2048 - 32) / 2) < 60  # uniform on [0, T - W]


def test_pose_two_chunks_matches_direct_construction():
    """The PoSE recipe with two chunks: the first chunk at 0 .. c-1, the second at c+u .. W-1+u."""
    g = torch.Generator().manual_seed(3)
    ids = longreach.pose_position_ids(20, 500, num_chunks=2, batch_size=50, generator=g)
    for row in ids:
        runs = chunks_of(row)
        c = len(runs[0]) if len(runs) == 2 else 20
        u = int(row[-1]) - 19
        want = torch.cat([torch.arange(c), torch.arange(c, 20) + u])
        assert torch.equal(row, want)
        assert 0 <= u <= 480


def test_pose_is_reproducible_and_random():
    a = longreach.pose_position_ids(16, 256, batch_size=4, generator=torch.Generator().manual_seed(5))
    b = longreach.pose_position_ids(16, 256, batch_size=4, generator=torch.Generator().manual_seed(5))
    c = longreach.pose_position_ids(16, 256, batch_size=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pose_ids_rotate_like_the_long_sequence():
    """Rotating a short window with PoSE ids equals rotating a long sequence and picking the
    same positions: the model sees exactly the relative distances of the long context."""
    g = torch.Generator().manual_seed(7)
    ids = longreach.pose_position_ids(12, 300, num_chunks=3, batch_size=2, generator=g)
    rope = RotaryEmbedding(16, 10000.0, max_position_embeddings=64, scaling={"rope_type": "linear", "factor": 4.0})
    long_x = torch.randn(2, 3, 300, 16)
    window = torch.stack([long_x[b, :, ids[b]] for b in range(2)])  # (B, H, 12, D)
    got = rope(window, position_ids=ids)  # grows its tables past 64 rows as needed
    full = rope(long_x)
    want = torch.stack([full[b, :, ids[b]] for b in range(2)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((64, 32), {}, r"target_len \(32\) must be >= window_len \(64\)"),
        ((4, 32), {"num_chunks": 5}, r"num_chunks \(5\) must be <= window_len \(4\)"),
        ((0, 32), {}, r"window_len must be an int >= 1, got 0"),
        ((8, 32), {"num_chunks": 0}, r"num_chunks must be an int >= 1, got 0"),
        ((8, 32.0), {}, r"target_len must be an int >= 1, got 32.0"),
        ((8, 32), {"batch_size": True}, r"batch_size must be an int >= 1, got True"),
    ],
)
def test_pose_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match="pose_position_ids: " + match):
        longreach.pose_position_ids(*args, **kwargs)


# ---------------------------------------------------------------------------
# Continuing positions across segments.


def test_segments_continue_positions():
    full = torch.arange(40)[None]
    parts = [longreach.segment_position_ids(10, past_len=k * 10) for k in range(4)]
    assert torch.equal(torch.cat(parts, dim=1), full)
    assert longreach.segment_position_ids(3, 5, batch_size=2).tolist() == [[5, 6, 7], [5, 6, 7]]
    assert longreach.segment_position_ids(0, 5).shape == (1, 0)


def test_segments_with_per_row_past_lengths():
    """Rows of a batch with different numbers of real tokens so far (left padding)."""
    past = torch.tensor([7, 0, 3])
    ids = longreach.segment_position_ids(4, past)
    assert ids.tolist() == [[7, 8, 9, 10], [0, 1, 2, 3], [3, 4, 5, 6]]
    assert ids.dtype == torch.int64


def test_segment_by_segment_rotation_equals_whole_sequence():
    rope = RotaryEmbedding(32, 10000.0, 16, scaling={"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 16})
    x = torch.randn(2, 2, 50, 32)
    whole = rope(x)
    pieces = [rope(x[:, :, s:s + 10], position_ids=longreach.segment_position_ids(10, s, batch_size=2))
              for s in range(0, 50, 10)]
    torch.testing.assert_close(torch.cat(pieces, dim=2), whole, rtol=0, atol=0)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((-1,), {}, r"segment_len must be an int >= 0, got -1"),
        ((4, -2), {}, r"past_len must be an int >= 0, got -2"),
        ((4, torch.tensor([1, -1])), {}, r"past_len must be >= 0, got \[1, -1\]"),
        ((4, torch.tensor([1.0])), {}, r"a tensor past_len must be a 1-D integer tensor \(B,\)"),
        ((4, torch.tensor([1, 2])), {"batch_size": 3}, r"batch_size \(3\) does not match past_len's length \(2\)"),
        ((4, 2), {"batch_size": 0}, r"batch_size must be an int >= 1, got 0"),
    ],
)
def test_segment_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match="segment_position_ids: " + match):
        longreach.segment_position_ids(*args, **kwargs)
