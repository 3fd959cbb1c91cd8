"""merge_attention: the exact softmax attention over a union of disjoint key sets, from the
results over each set and their row log-sum-exps.

Softmax attention over keys K = K_1 u ... u K_n (disjoint) is

    lse = log sum_i exp(lse_i),    out = sum_i exp(lse_i - lse) * out_i

where (out_i, lse_i) is the attention over K_i alone. Split-KV decoding, context parallelism
and cascade attention all end in this sum. A part whose rows saw no key (lse_i = -inf, the ops
return zeros there) weighs nothing; a row that no part saw stays zeros with lse = -inf, as the
ops return it. Written with torch operations, so it runs on every device, traces under
torch.compile, and autograd differentiates it (with respect to every out_i and lse_i).
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

from .._checks import check_tensor, describe

OWNER = "merge_attention"

TensorList = Union[Sequence[torch.Tensor], torch.Tensor]


def merge_attention(outs: TensorList, lses: TensorList) -> Tuple[torch.Tensor, torch.Tensor]:
    """Combine partial softmax attention results computed over disjoint key sets.

    outs: n tensors of one shape (..., L, D) (or one stacked (n, ..., L, D) tensor); lses: their
    row log-sum-exps, n tensors of shape (..., L) (or stacked (n, ..., L)), float32 or float64,
    -inf for rows that saw no key: exactly what the ops return with return_lse=True (batched:
    out (B, H, L, D), lse (B, H, L)). For the varlen layout, whose out is (total, H, D) and lse
    (H, total), pass out.transpose(0, 1).

    Returns (out, lse): out in the dtype of outs (accumulated in the lse dtype), lse in the lse
    dtype. Differentiable. Softmax only: sigmoid attention has no normaliser, and its partial
    results over disjoint keys simply add up.
    """
    out_stack, lse_stack = _stacked(outs, lses)
    # The result does not depend on the shift m (it cancels), so it carries no gradient; a row
    # whose parts are all -inf gets m = 0 and weights 0.
    m = lse_stack.detach().amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    weights = torch.exp(lse_stack - m)  # (n, ..., L); exp(-inf) = 0
    total = weights.sum(dim=0)
    seen = total > 0
    safe_total = torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, m + torch.log(safe_total), torch.full_like(total, float("-inf")))
    share = weights / safe_total
    # A part with zero weight contributes nothing, even if its out holds garbage (NaN/inf): the out
    # is cleared before the product, so neither the value nor the lse gradient sees 0 * NaN.
    used = (share > 0).unsqueeze(-1)
    clean = torch.where(used, out_stack.to(share.dtype), torch.zeros((), dtype=share.dtype, device=share.device))
    return (share.unsqueeze(-1) * clean).sum(dim=0).to(out_stack.dtype), lse


def _stacked(outs: TensorList, lses: TensorList) -> Tuple[torch.Tensor, torch.Tensor]:
    out_stack = _stack("outs", outs)
    lse_stack = _stack("lses", lses)
    if out_stack.shape[0] != lse_stack.shape[0]:
        raise ValueError(f"{OWNER}: outs and lses must hold as many parts, got {out_stack.shape[0]} outs and "
                         f"{lse_stack.shape[0]} lses")
    if out_stack.dim() < 2:
        raise ValueError(f"{OWNER}: outs must be (..., L, D) tensors, got parts of shape "
                         f"{tuple(out_stack.shape[1:])}")
    if lse_stack.shape != out_stack.shape[:-1]:
        raise ValueError(f"{OWNER}: lses must have the shape of outs without the last dimension "
                         f"{tuple(out_stack.shape[1:-1])}, got {tuple(lse_stack.shape[1:])}")
    if lse_stack.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{OWNER}: lses must be float32 or float64 (the ops' lse dtypes), got {lse_stack.dtype}")
    if not out_stack.is_floating_point():
        raise TypeError(f"{OWNER}: outs must be floating point, got {out_stack.dtype}")
    if out_stack.device != lse_stack.device:
        raise ValueError(f"{OWNER}: outs and lses must be on one device, got {out_stack.device} and "
                         f"{lse_stack.device}")
    return out_stack, lse_stack


def _stack(name: str, parts: TensorList) -> torch.Tensor:
    if isinstance(parts, torch.Tensor):
        if parts.dim() < 1 or parts.shape[0] < 1:
            raise ValueError(f"{OWNER}: {name} as one tensor must be stacked (n, ...) with n >= 1, got "
                             f"{describe(parts)}")
        return parts
    if not isinstance(parts, (list, tuple)) or len(parts) == 0:
        raise TypeError(f"{OWNER}: {name} must be a non-empty list or tuple of tensors, got {describe(parts)}")
    for i, part in enumerate(parts):
        check_tensor(OWNER, f"{name}[{i}]", part)
    first = parts[0]
    for i, part in enumerate(parts):
        if part.shape != first.shape or part.dtype != first.dtype or part.device != first.device:
            raise ValueError(f"{OWNER}: every tensor of {name} must have the shape, dtype and device of "
                             f"{name}[0] ({describe(first)} on {first.device}), got {name}[{i}] = "
                             f"{describe(part)} on {part.device}")
    return torch.stack(list(parts))
