"""Helpers for the local-attention tests: test data, ALiBi slopes, global-token
patterns, and error measures. Kept independent of the library's own helpers
(longreach.alibi_slopes etc.) so that the tests check them rather than copy them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

# ---------------------------------------------------------------------------
# ALiBi slopes, written out from the papers.


def standard_alibi_slopes(num_heads: int) -> torch.Tensor:
    """Press et al.: for H a power of two, slope_h = 2^(-8h/H), h = 1..H."""
    assert num_heads & (num_heads - 1) == 0, "this test helper only covers powers of two"
    return torch.tensor([2.0 ** (-8.0 * h / num_heads) for h in range(1, num_heads + 1)], dtype=torch.float32)


def balanced_alibi_slopes(num_heads: int) -> torch.Tensor:
    """SWAT's balanced ALiBi as the issue states it: half the heads +2^-k and the
    other half -2^-k, k = 1..H/2, so half the heads reward distance instead of
    penalising it (written out here independently of longreach.alibi_slopes)."""
    half = torch.tensor([2.0 ** -k for k in range(1, num_heads // 2 + 1)], dtype=torch.float32)
    return torch.cat([half, -half])


def alibi_for(kind: str, batch: int, heads: int) -> Optional[torch.Tensor]:
    """Slopes for a test case: none, (H,) standard / balanced, or (B, H) per batch element."""
    if kind == "none":
        return None
    if kind == "standard":
        return standard_alibi_slopes(heads)
    if kind == "balanced":
        return balanced_alibi_slopes(heads)
    if kind == "per_batch":  # (B, H): element b gets the balanced slopes scaled by (b + 1) and flipped for odd b
        base = balanced_alibi_slopes(heads)
        return torch.stack([base * (b + 1) * (-1) ** b for b in range(batch)])
    raise ValueError(kind)


# ---------------------------------------------------------------------------
# Global-token patterns (B, Lk) bool.

GLOBAL_PATTERNS = ("none", "scattered", "prefix", "all")


def global_mask_for(pattern: str, batch: int, k_len: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """
    scattered: the first and last key plus ~5% random keys, so global tokens
               sit both inside and far outside every window;
    prefix:    a leading block of different length per batch element (the
               Longformer question/CLS pattern; element 0 gets none at all,
               like a padded batch);
    all:       every key global, which must equal unbounded attention.
    """
    if pattern == "none":
        return None
    if pattern == "all":
        return torch.ones(batch, k_len, dtype=torch.bool)
    if pattern == "scattered":
        mask = torch.rand(batch, k_len, generator=generator) < 0.05
        mask[:, 0] = True
        mask[:, -1] = True
        return mask
    if pattern == "prefix":
        mask = torch.zeros(batch, k_len, dtype=torch.bool)
        for b in range(batch):
            mask[b, : min(k_len, 3 * b)] = True
        return mask
    raise ValueError(pattern)


# ---------------------------------------------------------------------------
# Windows by name (some depend on the sequence length).

WINDOWS = ("unbounded", "(3,0)", "(16,16)", "(128,0)", "wider")


def window_for(name: str, q_len: int, k_len: int) -> Tuple[Optional[int], Optional[int]]:
    if name == "unbounded":
        return (None, None)
    if name == "wider":  # finite but wider than the sequence on both sides
        return (q_len + k_len + 5, q_len + k_len + 5)
    left, right = name.strip("()").split(",")
    return (int(left), int(right))


# ---------------------------------------------------------------------------
# Data and errors.


def precise_dtype(device) -> torch.dtype:
    """The most precise dtype the kernels have on `device`: float64 on CPU,
    float32 on CUDA (which has no float64 path)."""
    return torch.float32 if str(device).startswith("cuda") else torch.float64


def tight_tolerance(dtype: torch.dtype) -> float:
    """Scaled-error tolerance for comparisons that should agree to rounding."""
    return 1e-12 if dtype == torch.float64 else 2e-5


def random_qkv(batch, q_heads, kv_heads, q_len, k_len, head_dim, dtype, device, generator=None):
    """q, k, v drawn in float64 then cast, so every dtype sees the same values."""
    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).to(device=device, dtype=dtype)

    return draw(batch, q_heads, q_len, head_dim), draw(batch, kv_heads, k_len, head_dim), draw(
        batch, kv_heads, k_len, head_dim
    )


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), computed in float64.

    Infinite entries (lse of empty rows) must agree exactly and are left out."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert not torch.isnan(a).any(), "result has NaN"
    inf = torch.isinf(e)
    assert torch.equal(inf, torch.isinf(a)) and torch.equal(a[inf], e[inf]), "infinities differ"
    if a.numel() == 0 or bool(inf.all()):
        return 0.0
    a, e = a[~inf], e[~inf]
    return float((a - e).abs().max() / max(1.0, float(e.abs().max())))


def rms_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Root-mean-square error / root-mean-square of expected (finite entries, float64).

    More sensitive than the max error to accumulation in a low precision,
    which the final rounding of the output would otherwise hide."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    finite = torch.isfinite(e)
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return 0.0
    return float((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-300))


def assert_close(actual, expected, tol: float, what: str) -> None:
    err = scaled_error(actual, expected)
    assert err <= tol, f"{what}: scaled error {err:.3g} > tolerance {tol:.3g}"


def grads(outputs: Sequence[torch.Tensor], cotangents: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]):
    """Vector-Jacobian product: d(sum_i <outputs_i, cotangents_i>) / d inputs
    (zeros for an input the outputs do not depend on, e.g. v for the lse)."""
    return torch.autograd.grad(list(outputs), list(inputs), list(cotangents), materialize_grads=True)


def dense_allowed_mask(q_len: int, k_len: int, left, right, dilation: int = 1) -> torch.Tensor:
    """(Lq, Lk) bool band, written independently of longreach.reference for the
    SDPA comparisons: key j is allowed for row i at position p = i + Lk - Lq iff
    (j - p) is a multiple of `dilation` and -left <= (j - p) / dilation <= right."""
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        p = i + k_len - q_len
        for j in range(k_len):
            d = j - p
            if d % dilation:
                continue
            step = d // dilation
            if (left is None or step >= -left) and (right is None or step <= right):
                mask[i, j] = True
    return mask
