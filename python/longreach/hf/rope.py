"""Swap a Hugging Face decoder's rotary embedding for a scaled one (PI, YaRN, dynamic NTK, LongRoPE, Llama-3).

Hugging Face decoders compute `(cos, sin)` once per forward in `model.model.rotary_emb` and
hand them to every attention layer, which rotates q and k with its own `apply_rotary_pos_emb`.
`swap_rotary_embedding` writes the scaling into `config.rope_parameters` (so a saved model
reloads with it, in plain transformers too) and replaces that module with
`ScaledRotaryEmbedding`, whose frequencies come from `longreach.rope_frequencies` and whose
seq-len dependent schemes (dynamic, longrope) follow `longreach.nn.RotaryEmbedding`.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..nn.rotary import RotaryEmbedding
from ..positional import ROPE_TYPES, rope_frequencies, rope_type_of

__all__ = ["ScaledRotaryEmbedding", "swap_rotary_embedding"]

# the types transformers itself knows (so a patched checkpoint loads in plain transformers)
HF_ROPE_TYPES = tuple(t for t in ROPE_TYPES if t != "ntk")
# rope types whose frequencies depend on the sequence length seen so far
_LENGTH_DEPENDENT = ("dynamic", "longrope")
# rope types that read the pretraining length; written into the config explicitly
_NEEDS_ORIGINAL_LENGTH = ("yarn", "longrope", "llama3")


class ScaledRotaryEmbedding(nn.Module):
    """Drop-in for a transformers `*RotaryEmbedding`: `forward(x, position_ids, layer_type=None)`
    returns `(cos, sin)`, each (B, L, rot_dim) in x's dtype, already multiplied by the
    scheme's attention factor, in Hugging Face's rotate-half layout.

    `parameters` is one `rope_parameters` dict, or a dict of them per layer type (Gemma3).
    Static schemes compute the angles on the fly from the positions (no host sync, so
    torch.compile(fullgraph=True) works); dynamic and longrope read max(position_ids), as
    transformers' own `dynamic_rope_update` does.
    """

    def __init__(self, head_dim: int, max_position_embeddings: int, parameters: Mapping[str, Any], device=None):
        super().__init__()
        nested = all(isinstance(value, Mapping) for value in parameters.values())
        per_type = dict(parameters) if nested else {None: parameters}
        self.schemes = nn.ModuleDict()
        self._names: Dict[Optional[str], str] = {}
        for index, (layer_type, params) in enumerate(per_type.items()):
            name = f"scheme{index}"
            self._names[layer_type] = name
            self.schemes[name] = _Scheme(head_dim, max_position_embeddings, params, device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: Optional[str] = None):
        name = self._names.get(layer_type, self._names.get(None))
        if name is None:
            raise KeyError(f"ScaledRotaryEmbedding: no rope parameters for layer_type {layer_type!r}")
        return self.schemes[name](x, position_ids)


class _Scheme(nn.Module):
    def __init__(self, head_dim, max_position_embeddings, params, device):
        super().__init__()
        params = dict(params)
        base = float(params.pop("rope_theta", 10000.0))
        self.rope_type = rope_type_of(params)
        # Validates the numbers; kept out of the buffers so that model.to(bfloat16) cannot round them.
        self._inv_freq, self.attention_factor = rope_frequencies(
            head_dim, base, params, max_position_embeddings=max_position_embeddings, device=device
        )
        self.rotary = None
        if self.rope_type in _LENGTH_DEPENDENT:  # its tables follow the length seen, as transformers does
            self.rotary = RotaryEmbedding(head_dim, base, max_position_embeddings, params, device=device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        if self.rotary is not None:
            cos, sin = self.rotary.tables(int(position_ids.max()) + 1)
            cos, sin = cos.to(x.device)[position_ids], sin.to(x.device)[position_ids]
        else:  # the same float32 operations as transformers' rotary embeddings
            if self._inv_freq.device != x.device:
                self._inv_freq = self._inv_freq.to(x.device)
            freqs = position_ids[..., None].float() * self._inv_freq
            cos, sin = freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
        return torch.cat((cos, cos), dim=-1).to(x.dtype), torch.cat((sin, sin), dim=-1).to(x.dtype)


def _scaled_parameters(old: Mapping[str, Any], scaling: Mapping[str, Any], max_position_embeddings: int) -> dict:
    """The model's rope parameters (rope_theta, partial_rotary_factor...) with the scaling on top."""
    kept = {key: value for key, value in old.items() if key in ("rope_theta", "partial_rotary_factor")}
    new = {**kept, **scaling}
    if rope_type_of(new) in _NEEDS_ORIGINAL_LENGTH:
        new.setdefault("original_max_position_embeddings", max_position_embeddings)
    return new


def _check_scaling(scaling) -> None:
    if not isinstance(scaling, Mapping):
        raise ValueError(f"longreach.hf.patch: rope_scaling must be a dict (Hugging Face's rope_parameters), "
                         f"got {type(scaling).__name__}")
    rope_type = rope_type_of(scaling)
    if rope_type not in HF_ROPE_TYPES:
        hint = (" ('ntk' is longreach's static NTK scaling, not a transformers rope type: a saved model could "
                "not be loaded by transformers; use 'dynamic' or 'yarn')" if rope_type == "ntk" else "")
        raise ValueError(f"longreach.hf.patch: rope_scaling['rope_type'] must be one of {HF_ROPE_TYPES}, "
                         f"got {rope_type!r}{hint}")


def rotary_children(model):
    """(parent, attribute name, module) of every transformers rotary embedding in the model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__.endswith("RotaryEmbedding") and not isinstance(child, ScaledRotaryEmbedding):
                found.append((parent, name, child))
    return found


def swap_rotary_embedding(model, scaling: Mapping[str, Any]) -> None:
    """Apply a rope scaling dict to a transformers decoder, in place (config and rotary module).

    `scaling` is flat ({"rope_type": "yarn", "factor": 4.0, ...}: applied to every layer
    type) or per layer type ({"full_attention": {...}}: only those types change).
    """
    config = model.config.get_text_config(decoder=True)
    old = config.rope_parameters
    if not isinstance(old, Mapping):
        raise ValueError(f"longreach.hf.patch: {type(model).__name__} has no rope_parameters to scale")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    max_len = config.max_position_embeddings
    old_nested = all(isinstance(value, Mapping) for value in old.values())
    scaling_nested = isinstance(scaling, Mapping) and scaling and all(isinstance(v, Mapping) for v in scaling.values())
    if scaling_nested:
        if not old_nested or set(scaling) - set(old):
            raise ValueError(f"longreach.hf.patch: rope_scaling is keyed by layer type {sorted(scaling)}, but the "
                             f"model's rope_parameters are {'keyed by ' + str(sorted(old)) if old_nested else 'flat'}")
        for part in scaling.values():
            _check_scaling(part)
        new = {key: (_scaled_parameters(value, scaling[key], max_len) if key in scaling else dict(value))
               for key, value in old.items()}
    else:
        _check_scaling(scaling)
        new = ({key: _scaled_parameters(value, scaling, max_len) for key, value in old.items()} if old_nested
               else _scaled_parameters(old, scaling, max_len))

    modules = rotary_children(model)
    if not modules:
        raise ValueError(f"longreach.hf.patch: found no rotary embedding module in {type(model).__name__}")
    device = next(iter(modules[0][2].buffers()), torch.empty(0)).device
    replacement = ScaledRotaryEmbedding(head_dim, max_len, new, device=device)  # validates every number
    config.rope_parameters = copy.deepcopy(new)
    for parent, name, _ in modules:
        setattr(parent, name, replacement)
