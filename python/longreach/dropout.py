"""Attention dropout's random numbers: Philox4x32-10 written with torch integer ops.

The kernels draw each (row, key) pair's keep bit from csrc/common/philox.h, keyed by
(seed, offset) and the pair's (batch * Hq + head, row, key) indices; this module computes
the same bits densely, so the tests' reference (longreach.reference.local_attention with
``dropout_mask=``) applies the op's own mask from an independent implementation.

``draw_seed`` takes (seed, offset) from torch's default CPU generator, advancing it: a
given generator state (``torch.manual_seed``) gives the same mask, forward and backward.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def draw_seed() -> torch.Tensor:
    """(seed, offset) int64 (2,) CPU tensor from the default generator (the ops' dropout_seed)."""
    return torch.randint(-2**63, 2**63 - 1, (2,), dtype=torch.int64)


def _mulhilo(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of a * b, a a constant and b uint32 values in int64 (no overflow)."""
    t0 = a * (b & 0xFFFF)            # < 2^48
    t1 = a * (b >> 16)               # < 2^48
    low = t0 + ((t1 & 0xFFFF) << 16)  # < 2^49
    return (t1 >> 16) + (low >> 32), low & _M32


def philox4x32_10(counter, k0: int, k1: int):
    """Ten Philox rounds on four int64 tensors of uint32 values; returns the four outputs."""
    x, y, z, w = counter
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], x)
        hi1, lo1 = _mulhilo(_MUL[1], z)
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & _M32, (k1 + _WEYL[1]) & _M32
    return x, y, z, w


def keep_mask(dropout_seed: torch.Tensor, dropout_p: float, batch: int, heads: int, q_len: int, k_len: int,
              device=None) -> torch.Tensor:
    """The kernels' keep mask, (batch, heads, q_len, k_len) bool: True where the weight is kept
    (and scaled by 1 / (1 - p)). Varlen: call per sequence with batch = 1 and the head rows of
    sequence i, i.e. keep_mask(...)[i] of a call with batch = num_seqs and its own lengths."""
    seed, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in dropout_seed.tolist())
    k0, k1 = seed & _M32, (seed >> 32) ^ (offset >> 32)
    threshold = round(dropout_p * 2**32)
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    row = torch.arange(q_len, dtype=torch.int64, device=device).view(1, 1, q_len, 1)
    key = torch.arange(k_len, dtype=torch.int64, device=device).view(1, 1, 1, k_len)
    shape = (batch, heads, q_len, k_len)
    counter = [t.expand(shape) & _M32 for t in ((key >> 2), row, bh, torch.full((), offset & _M32, device=device))]
    outs = torch.stack(philox4x32_10(counter, k0, k1), dim=-1)  # (..., 4)
    draw = outs.gather(-1, (key & 3).expand(shape).unsqueeze(-1)).squeeze(-1)
    return draw >= threshold
