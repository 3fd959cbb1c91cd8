"""ALiBi: per-head slopes for the attention op's fused linear bias."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..positional import alibi_slopes


class ALiBi(nn.Module):
    """Holds the ALiBi slopes of one attention layer; ``forward()`` returns them
    as the (num_heads,) float32 tensor ``local_attention(alibi_slopes=...)`` takes.

    ``kind="standard"`` (Press et al.) or ``"balanced"`` (SWAT: half the heads
    reward distance); ``interpolation`` >= 1 divides the slopes (running at
    that many times the training length). See `longreach.alibi_slopes`.
    """

    def __init__(self, num_heads: int, kind: str = "standard", interpolation: float = 1.0, *,
                 device: Optional[Union[torch.device, str]] = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kind = kind
        self.interpolation = interpolation
        self.register_buffer("slopes", alibi_slopes(num_heads, kind, interpolation, device=device), persistent=False)

    def forward(self) -> torch.Tensor:
        # The op wants float32 even if the module was cast (module.half()).
        return self.slopes.float()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kind={self.kind!r}, interpolation={self.interpolation}"
