"""What `longreach.hf.patch` changes in a model, kept so that `unpatch` can undo it.

Patching never writes into the config object the model was built with: transformers lets
several models share one (two `from_config(config)` calls, or `cls(config)` twice), and a
change made for one would switch its twin to longreach too. `detach_config` gives the model
and every submodule holding that config (attention layers, rotary embedding, ...) a private
deep copy first; `unpatch` hands the original object back, together with the submodules
`patch` replaced (rotary embeddings, Longformer self-attention).
"""

from __future__ import annotations

import copy
from typing import List, Tuple

from torch import nn

_RECORD = "_longreach_unpatch"


class _Record:
    def __init__(self):
        self.configs: List[Tuple[nn.Module, object]] = []  # (module, its config before patch)
        self.children: List[Tuple[nn.Module, str, nn.Module]] = []  # (parent, name, child before patch)


def _record(model: nn.Module, create: bool):
    record = model.__dict__.get(_RECORD)
    if record is None and create:
        record = _Record()
        model.__dict__[_RECORD] = record
    return record


def is_patched(model: nn.Module) -> bool:
    return _RECORD in model.__dict__


def detach_config(model: nn.Module) -> None:
    """Replace model.config (and its sub-configs, wherever a submodule holds one) by a deep copy."""
    old = getattr(model, "config", None)
    if old is None or is_patched(model):  # patched before: its config is already its own
        return
    new = copy.deepcopy(old)
    copies = {id(old): new}
    for name, value in vars(old).items():  # sub-configs of composite models (text_config, ...)
        if type(value).__name__.endswith("Config") and hasattr(value, "to_dict"):
            copies[id(value)] = getattr(new, name)
    record = _record(model, create=True)
    for module in model.modules():
        config = module.__dict__.get("config")
        if config is not None and id(config) in copies:
            record.configs.append((module, config))
            module.config = copies[id(config)]


def remember_children(model: nn.Module, children) -> None:
    """Keep (parent, name, child) of submodules about to be replaced (only the first patch's)."""
    record = _record(model, create=True)
    known = {(id(parent), name) for parent, name, _ in record.children}
    record.children += [(p, n, c) for p, n, c in children if (id(p), n) not in known]


def restore(model: nn.Module) -> None:
    """Undo every change recorded for `model`; ValueError when nothing was recorded."""
    record = _record(model, create=False)
    if record is None:
        raise ValueError(
            f"longreach.hf.unpatch: this {type(model).__name__} was not patched by longreach.hf.patch in this "
            "process, so there is nothing to restore (a model loaded from a patched checkpoint: load it with "
            "from_pretrained(..., attn_implementation='sdpa') to run transformers' own attention)"
        )
    for parent, name, child in record.children:
        setattr(parent, name, child)
    for module, config in record.configs:
        module.config = config
    model.__dict__.pop("_prepare_cache_for_generation", None)  # patch_decoder's default LongreachCache
    del model.__dict__[_RECORD]
