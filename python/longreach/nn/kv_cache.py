"""A per-layer key/value cache that keeps only the keys a causal window can still reach."""

from __future__ import annotations

from typing import Optional, Tuple

import torch


class SlidingKVCache:
    """Keys (after RoPE), values and key validity of one attention layer, for decoding.

    ``keep``: how many past keys a future query can reach (``left * dilation`` for a causal
    window of ``left`` steps), or None to keep everything (unbounded window). After each
    ``update`` only the last ``keep`` keys stay, so memory is O(window), not O(sequence).
    ``seen`` counts every key ever added; ``valid`` is None while no padding was seen, else
    (B, kept) bool.
    """

    def __init__(self, keep: Optional[int]):
        if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 0):
            raise ValueError(f"SlidingKVCache: keep must be a non-negative int or None, got {keep!r}")
        self.keep = keep
        self.keys: Optional[torch.Tensor] = None
        self.values: Optional[torch.Tensor] = None
        self.valid: Optional[torch.Tensor] = None
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, valid: Optional[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Append (B, Hk, L, D) keys/values and (B, L) validity (None = all real); returns the
        cached-plus-new keys, values and validity the new queries attend to."""
        if self.keys is not None:
            if keys.shape[0] != self.keys.shape[0]:
                raise ValueError(f"SlidingKVCache: batch size changed from {self.keys.shape[0]} to {keys.shape[0]}")
            past_valid = self.valid
            if valid is not None and past_valid is None:
                past_valid = torch.ones(self.keys.shape[0], len(self), dtype=torch.bool, device=keys.device)
            if valid is None and past_valid is not None:
                valid = torch.ones(keys.shape[0], keys.shape[2], dtype=torch.bool, device=keys.device)
            keys = torch.cat((self.keys, keys), dim=2)
            values = torch.cat((self.values, values), dim=2)
            valid = None if valid is None else torch.cat((past_valid, valid), dim=1)
        self.seen += keys.shape[2] - len(self)
        start = 0 if self.keep is None else max(0, keys.shape[2] - self.keep)
        self.keys, self.values = keys[:, :, start:], values[:, :, start:]
        self.valid = None if valid is None else valid[:, start:]
        return keys, values, valid
