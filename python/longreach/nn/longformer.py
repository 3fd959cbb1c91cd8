"""Longformer self-attention on longreach's fused op: a drop-in for Hugging Face's
`LongformerSelfAttention` (same constructor, parameters, forward and outputs).

What Hugging Face computes, and how it maps onto `longreach.local_attention`:

- Local rows (tokens without global attention) attend, with the `query`/`key`/
  `value` projections, to the keys within `attention_window // 2` on each
  side, minus padded keys, plus every global key (counted once even when it is
  also inside the window). That is one op call with
  `window=(w // 2, w // 2)`, `global_mask = global tokens` and the padding
  as the op's `key_padding_mask` (which also zeroes the padded rows).
- Global rows attend, with the separate `query_global`/`key_global`/
  `value_global` projections, to every key that is not padding. That is a
  second op call on the gathered global rows with an unbounded window; padded
  keys are removed there with a key bias column (`_append_key_bias`), because
  those rows are not at key positions of their own (the op's key_padding_mask
  would zero a gathered row that happens to sit at a padded position). The
  first call also computes those rows (the op makes a global position a full
  row), but their values are overwritten, exactly as in Hugging Face.
- Padded rows return zeros.

Unlike Hugging Face's chunked implementation, the sequence length need not be
a multiple of the window, and no (L, 2w + 1) score matrix is materialised
unless `output_attentions=True` asks for the probabilities.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from .._checks import check_int
from ..ops import local_attention
from ._longformer_probs import global_row_probs, local_row_probs


def _per_layer(value, layer_id: int, name: str):
    """`value` if it is a single setting, else its entry for `layer_id` (HF stores one per layer)."""
    if isinstance(value, (list, tuple)):
        if not 0 <= layer_id < len(value):
            raise ValueError(f"LongformerSelfAttention: config.{name} has {len(value)} entries, no entry for "
                             f"layer_id={layer_id}")
        return value[layer_id]
    return value


def _check_window(window, layer_id: int) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0 or window % 2 != 0:
        raise ValueError(
            f"LongformerSelfAttention: attention_window for layer {layer_id} must be a positive even int "
            f"(it is split into window // 2 keys on each side), got {window!r}"
        )
    return window


def _check_dilation(dilation, layer_id: int) -> int:
    return check_int("LongformerSelfAttention", f"dilation for layer {layer_id}", dilation, 1)


def _check_token_mask(name: str, mask: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        got = f"{mask.dtype} tensor of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        raise ValueError(f"LongformerSelfAttention: {name} must be a bool tensor of shape (batch, seq_len) = "
                         f"({batch}, {length}), got {got}")
    return mask


def _append_key_bias(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding: torch.Tensor):
    """Append a column so that q'.k' = q.k + bias_j, bias_j = finfo.min at padded keys, else 0.

    For the gathered global rows (see the module docstring); this removes padded keys exactly as
    Hugging Face does (it adds finfo.min to their scores): their probability
    is exp(finfo.min - max) = 0, so they get no weight and no gradient. v gets
    a zero column because the op wants k and v of one shape; the caller drops
    that output column, and the concatenations' backward drops the extra
    columns' gradients.
    """
    batch, heads, length, _ = k.shape
    bias = torch.zeros(batch, 1, length, 1, dtype=k.dtype, device=k.device)
    bias = bias.masked_fill(key_padding[:, None, :, None], torch.finfo(k.dtype).min)
    q = torch.cat([q, q.new_ones(q.shape[:-1] + (1,))], dim=-1)
    k = torch.cat([k, bias.expand(batch, heads, length, 1)], dim=-1)
    v = torch.cat([v, v.new_zeros(v.shape[:-1] + (1,))], dim=-1)
    return q, k, v


def _attend_global_rows(q, k, v, key_padding: Optional[torch.Tensor], return_lse: bool = False, **kwargs):
    """longreach.local_attention of gathered rows on already-scaled q, padded keys removed when there are any."""
    if key_padding is None:
        return local_attention(q, k, v, scale=1.0, return_lse=return_lse, **kwargs)
    head_dim = v.shape[-1]
    result = local_attention(*_append_key_bias(q, k, v, key_padding), scale=1.0, return_lse=return_lse, **kwargs)
    if return_lse:
        return result[0][..., :head_dim], result[1]
    return result[..., :head_dim]


def global_token_order(is_index_global_attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(positions, valid), both (B, G) with G = most global tokens in any batch element.

    positions[b, :n_b] are the global positions of element b in increasing
    order (Hugging Face's order); the remaining slots hold its other positions
    (distinct, so scattering to them never collides) and valid is False there.
    """
    counts = is_index_global_attn.sum(dim=1)
    max_global = int(counts.max()) if counts.numel() else 0
    order = torch.sort(is_index_global_attn.to(torch.uint8), dim=1, descending=True, stable=True).indices
    positions = order[:, :max_global]
    valid = torch.arange(max_global, device=counts.device)[None, :] < counts[:, None]
    return positions, valid


class LongformerSelfAttention(nn.Module):
    """Hugging Face `LongformerSelfAttention` computed with longreach's fused op.

    Same constructor `(config, layer_id)`, same parameters (`query`, `key`,
    `value`, `query_global`, `key_global`, `value_global`), same forward
    arguments and returned tuple: `(attn_output,)`, plus `(attn_probs,)` with
    `output_attentions=True`, plus `(global_attn_probs,)` when there are global
    tokens. `attention_mask` (B, L) follows Hugging Face's convention: < 0
    padding, 0 local attention, > 0 global attention (-10000 / 0 / +10000, or
    finfo.min / 0 / finfo.max in transformers 5).

    `dilation` (keyword, default `config.attention_dilation` if present, else 1;
    an int or one per layer) spaces the window's keys `dilation` apart, as the
    Longformer paper's dilated sliding window; 1 is Hugging Face's model.
    Attention dropout (`attention_probs_dropout_prob`, `self.dropout`) runs in
    the op in training mode (`dropout_p`, as Hugging Face's dropout of the local
    and the global probabilities; the masks differ from torch's nn.Dropout).
    """

    def __init__(self, config, layer_id: int, *, dilation: Optional[int] = None):
        super().__init__()
        if config.hidden_size % config.num_attention_heads != 0:
            raise ValueError(
                f"LongformerSelfAttention: hidden_size ({config.hidden_size}) is not a multiple of "
                f"num_attention_heads ({config.num_attention_heads})"
            )
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.embed_dim = config.hidden_size

        self.query = nn.Linear(config.hidden_size, self.embed_dim)
        self.key = nn.Linear(config.hidden_size, self.embed_dim)
        self.value = nn.Linear(config.hidden_size, self.embed_dim)
        # Separate projections for tokens with global attention (Longformer's "global" weights).
        self.query_global = nn.Linear(config.hidden_size, self.embed_dim)
        self.key_global = nn.Linear(config.hidden_size, self.embed_dim)
        self.value_global = nn.Linear(config.hidden_size, self.embed_dim)

        self.dropout = config.attention_probs_dropout_prob
        self.layer_id = layer_id
        attention_window = _check_window(_per_layer(config.attention_window, layer_id, "attention_window"), layer_id)
        self.one_sided_attn_window_size = attention_window // 2
        if dilation is None:
            dilation = _per_layer(getattr(config, "attention_dilation", 1), layer_id, "attention_dilation")
        self.dilation = _check_dilation(dilation, layer_id)
        self.config = config

    @classmethod
    def from_hf(cls, hf_module: nn.Module, *, dilation: Optional[int] = None) -> "LongformerSelfAttention":
        """Wrap the projections of a transformers LongformerSelfAttention (shared, not copied)."""
        with torch.device("meta"):  # the fresh Linear layers are replaced right away: don't allocate them
            module = cls(hf_module.config, hf_module.layer_id, dilation=dilation)
        for name in ("query", "key", "value", "query_global", "key_global", "value_global"):
            setattr(module, name, getattr(hf_module, name))
        module.dropout = hf_module.dropout
        module.train(hf_module.training)
        return module

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"window=({self.one_sided_attn_window_size}, {self.one_sided_attn_window_size}), "
                f"dilation={self.dilation}")

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, E) -> (B, H, L, D) view."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (B, L, E)."""
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        is_index_masked: Optional[torch.Tensor] = None,
        is_index_global_attn: Optional[torch.Tensor] = None,
        is_global_attn: Optional[bool] = None,
        output_attentions: bool = False,
    ):
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.embed_dim:
            raise ValueError(f"LongformerSelfAttention: hidden_states must be (batch, seq_len, {self.embed_dim}), "
                             f"got shape {tuple(hidden_states.shape)}")
        dropout_p = self.dropout if self.training else 0.0
        batch, length, _ = hidden_states.shape
        padded, is_global_token, has_global = self._token_masks(
            attention_mask, is_index_masked, is_index_global_attn, is_global_attn, batch, length)
        # One host sync, as Hugging Face's own `is_global_attn.item()`: the padding-free path skips the masks.
        key_padding = padded if bool(padded.any()) else None

        w = self.one_sided_attn_window_size
        q = self._heads(self.query(hidden_states)) / math.sqrt(self.head_dim)  # scaled before q.k, as in HF
        k = self._heads(self.key(hidden_states))
        v = self._heads(self.value(hidden_states))
        local = local_attention(q, k, v, scale=1.0, window=(w, w), dilation=self.dilation,
                                global_mask=is_global_token if has_global else None, key_padding_mask=key_padding,
                                return_lse=output_attentions, dropout_p=dropout_p)
        out, lse = local if output_attentions else (local, None)
        attn_output = self._merge_heads(out)

        if has_global:
            positions, valid = order = global_token_order(is_global_token)
            global_out, q_global, k_global = self._global_rows(hidden_states, positions, valid, key_padding,
                                                                dropout_p)
            index = positions[:, :, None].expand(-1, -1, self.embed_dim)
            scattered = torch.zeros_like(attn_output).scatter(1, index, global_out)
            attn_output = torch.where(is_global_token[:, :, None], scattered, attn_output)
        attn_output = attn_output.masked_fill(padded[:, :, None], 0.0)

        outputs = (attn_output,)
        if output_attentions:
            probs = local_row_probs(q, k, lse, w, self.dilation, padded, is_global_token,
                                    order if has_global else None)
            outputs += (probs.to(hidden_states.dtype),)
            if has_global:
                outputs += (global_row_probs(q_global, k_global, valid, padded).to(hidden_states.dtype),)
        return outputs

    def _token_masks(self, attention_mask, is_index_masked, is_index_global_attn, is_global_attn, batch, length):
        """(padded, global, any global) from HF's arguments; the bool masks derive from attention_mask if absent."""
        if attention_mask is not None and tuple(attention_mask.shape) != (batch, length):
            raise ValueError(f"LongformerSelfAttention: attention_mask must have shape (batch, seq_len) = "
                             f"({batch}, {length}), got {tuple(attention_mask.shape)}")
        no_tokens = torch.zeros(batch, length, dtype=torch.bool, device=self.query.weight.device)
        if is_index_masked is None:
            is_index_masked = attention_mask < 0 if attention_mask is not None else no_tokens
        if is_index_global_attn is None:
            is_index_global_attn = attention_mask > 0 if attention_mask is not None else no_tokens
        padded = _check_token_mask("is_index_masked", is_index_masked, batch, length)
        is_global_token = _check_token_mask("is_index_global_attn", is_index_global_attn, batch, length)
        has_global = bool(is_global_token.any()) if is_global_attn is None else bool(is_global_attn)
        if has_global and bool((padded & is_global_token).any()):
            raise ValueError("LongformerSelfAttention: a position is marked both padded (is_index_masked) and "
                             "global (is_index_global_attn); Hugging Face's mask merge never produces that")
        return padded, is_global_token, has_global

    def _global_rows(self, hidden_states, positions, valid, key_padding, dropout_p=0.0):
        """Outputs of the global rows (B, G, E): global projections, every non-padded key."""
        gathered = hidden_states.gather(1, positions[:, :, None].expand(-1, -1, self.embed_dim))
        gathered = gathered.masked_fill(~valid[:, :, None], 0.0)  # filler slots, as HF's zero rows
        q_global = self._heads(self.query_global(gathered)) / math.sqrt(self.head_dim)
        k_global = self._heads(self.key_global(hidden_states))
        v_global = self._heads(self.value_global(hidden_states))
        out = _attend_global_rows(q_global, k_global, v_global, key_padding, window=(None, None),
                                  dropout_p=dropout_p)
        return self._merge_heads(out), q_global, k_global
