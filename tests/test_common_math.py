"""The shared window / tile-schedule math of csrc/common against the dense reference.

csrc/common/window.h and tile_schedule.h run inside the CUDA kernels (and the
CPU ones); here the CPU test hooks `torch.ops.longreach._debug_*` return what
that math computes, and every answer is checked against
longreach.reference.allowed_keys over many (Lq, Lk, window, dilation) cases, so
a bug in the one copy of the math fails on a machine without a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import longreach  # noqa: F401  (loads the ops)
from longreach.reference import allowed_keys

LENGTHS = [(1, 1), (1, 9), (9, 1), (7, 7), (13, 29), (29, 13), (40, 40), (3, 50)]
WINDOWS = [(None, None), (0, 0), (2, 3), (5, 0), (0, 4), (None, 2), (3, None), (100, 1)]
DILATIONS = [1, 2, 3, 7]
CASES = list(itertools.product(LENGTHS, WINDOWS, DILATIONS))


def _side(x):
    return -1 if x is None else x


def _mask(q_len, k_len, window, dilation):
    return allowed_keys(q_len, k_len, window, False, dilation)[0]


def _band(lo, hi, d):
    return set(range(lo, hi + 1, d)) if hi >= lo else set()


def _ids(case):
    (lq, lk), w, d = case
    return f"Lq{lq}-Lk{lk}-w{w[0]}_{w[1]}-d{d}"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_window_ranges_are_the_reference_mask(case):
    (q_len, k_len), window, d = case
    mask = _mask(q_len, k_len, window, d)
    key_lo, key_hi, row_lo, row_hi = torch.ops.longreach._debug_window_ranges(
        q_len, k_len, _side(window[0]), _side(window[1]), d
    )
    for i in range(q_len):  # window_key_range: exactly the allowed keys of row i
        expected = set(torch.nonzero(mask[i]).flatten().tolist())
        assert _band(int(key_lo[i]), int(key_hi[i]), d) == expected, f"row {i}"
    for j in range(k_len):  # window_row_range: exactly the rows that allow key j
        expected = set(torch.nonzero(mask[:, j]).flatten().tolist())
        assert _band(int(row_lo[j]), int(row_hi[j]), d) == expected, f"key {j}"


@pytest.mark.parametrize("tile", [1, 4, 16])
@pytest.mark.parametrize("by_keys", [False, True], ids=["row_tiles", "key_tiles"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_class_tiles_cover_everything_once_and_their_bands_hold_the_window(case, by_keys, tile):
    (q_len, k_len), window, d = case
    mask = _mask(q_len, k_len, window, d)
    if by_keys:
        mask = mask.t()  # rows of `mask` are now the tiled side
    n = mask.shape[0]
    bands = torch.ops.longreach._debug_tile_bands(q_len, k_len, _side(window[0]), _side(window[1]), d, tile, by_keys)
    seen = []
    for cls, first, last, lo, hi in bands.tolist():
        members = list(range(first, last + 1, d))
        assert first % d == cls and 1 <= len(members) <= tile
        seen += members
        # The band holds every allowed partner of every member, and its ends are reached.
        partners = set(torch.nonzero(mask[members].any(dim=0)).flatten().tolist())
        band = _band(lo, hi, d)
        assert partners <= band, f"tile {members}: partners {sorted(partners - band)} outside band [{lo}, {hi}]"
        if band:
            assert lo in partners and hi in partners, f"tile {members}: band [{lo}, {hi}] is not tight"
    assert sorted(seen) == list(range(n)), "class tiles must cover every index exactly once"


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_tile_in_window_is_true_exactly_for_tiles_inside_the_band(case):
    (q_len, k_len), window, d = case
    mask = _mask(q_len, k_len, window, d)
    off = k_len - q_len
    gen = torch.Generator().manual_seed(q_len * 1000 + k_len * 10 + d)
    corners, expected = [], []
    for _ in range(200):
        # A tile: rows of one class, keys of the same class (as the kernels build them).
        i0, i1 = sorted(torch.randint(0, q_len, (2,), generator=gen).tolist())
        i1 = i0 + (i1 - i0) // d * d
        cls = (i0 + off) % d
        keys_in_class = list(range(cls, k_len, d))
        if not keys_in_class:
            continue
        a, b = sorted(torch.randint(0, len(keys_in_class), (2,), generator=gen).tolist())
        j0, j1 = keys_in_class[a], keys_in_class[b]
        corners.append([i0 + off, i1 + off, j0, j1])
        expected.append(bool(mask[i0 : i1 + 1 : d, j0 : j1 + 1 : d].all()))
    got = torch.ops.longreach._debug_tile_in_window(
        q_len, k_len, _side(window[0]), _side(window[1]), d, torch.tensor(corners, dtype=torch.long).view(-1, 4)
    )
    assert got.tolist() == expected


def test_debug_hooks_reject_bad_arguments():
    with pytest.raises(RuntimeError, match="dilation must be >= 1, got 0"):
        torch.ops.longreach._debug_window_ranges(4, 4, 1, 1, 0)
    with pytest.raises(RuntimeError, match=r"corners must be an \(N, 4\) int64 tensor"):
        torch.ops.longreach._debug_tile_in_window(4, 4, 1, 1, 1, torch.zeros(3, 3, dtype=torch.long))
