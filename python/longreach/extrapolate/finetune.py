"""The fine-tuning schemes: a trained model fine-tuned briefly at a longer length, PI or YaRN in force.

Position Interpolation (Chen et al. 2023), YaRN (Peng et al. 2023) and LongLoRA
(Chen et al. 2024) extend a trained RoPE model's context by rescaling its RoPE
positions for s = finetune_len / train_len (PI and LongLoRA linearly, YaRN by
frequency band with its attention temperature) and fine-tuning it for a short
while at the new length (the papers: PI 1000 steps, YaRN 400).
LongLoRA's point is that the fine-tune need not run full attention: its S2-Attn
restricts attention to chunks of the original length and shifts the chunk grid by
half a chunk in half of the heads, so information crosses chunk borders; the
fine-tuned weights then run full attention at inference.

Both fine-tunes here start from the same trained weights (the base scheme's state
dict) and see the same batches (same seed, length, batch size, steps, learning
rate); only the attention during fine-tuning differs. The chunked model and the
evaluated model are separate LocalTransformerLMs sharing one state dict (the chunk
shifts are a non-persistent buffer), so evaluation runs exactly the scheme's own
full causal attention.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from longreach.nn import LocalTransformerLM

from . import data as data_mod
from .model import ModelDims, build_model, configure_for_length, model_config
from .schemes import Scheme
from .train import Progress, TrainResult, train


@dataclass(frozen=True)
class FinetuneSettings:
    """One budget shared by every fine-tuning scheme of a run."""

    length: int  # bytes per fine-tuning sequence (the PI factor is length / train_len)
    steps: int
    batch_size: int
    lr: float  # peak learning rate (same warm-up and cosine schedule as training)
    chunk: int  # chunk of the "chunked" (S2-Attn) fine-tune
    muon_lr: Optional[float] = None  # Muon's peak on the weight matrices, as training's; None: AdamW only


def finetune_model(scheme: Scheme, dims: ModelDims, train_len: int, settings: FinetuneSettings,
                   seed: int) -> LocalTransformerLM:
    """The model ``scheme`` fine-tunes: its own configuration, plus S2-Attn's chunks for "chunked"."""
    config = model_config(scheme, dims, None, train_len)
    if scheme.finetune == "chunked":
        config = dataclasses.replace(config, chunk=settings.chunk, chunk_shift="half")
    elif scheme.finetune != "full":
        raise AssertionError(f"unhandled finetune {scheme.finetune!r}")
    torch.manual_seed(seed)  # the weights are replaced; only keeps the global RNG's use the same
    return LocalTransformerLM(config)


def finetune(scheme: Scheme, base_state: Dict[str, torch.Tensor], dims: ModelDims, train_len: int,
             settings: FinetuneSettings, stream: torch.Tensor, seed: int, device: str = "cpu",
             progress: Progress = True, desc_suffix: str = "", autocast: Optional[torch.dtype] = None,
             ) -> Tuple[LocalTransformerLM, TrainResult]:
    """Fine-tune ``base_state`` as ``scheme`` says; returns the model to evaluate (full causal
    attention, the fine-tuned weights) and the fine-tune's TrainResult. ``progress`` and
    ``autocast`` as in train()."""
    model = finetune_model(scheme, dims, train_len, settings, seed)
    model.load_state_dict(base_state)
    configure_for_length(model, scheme, train_len, settings.length, settings.length)  # PI / YaRN at factor s
    sampler = data_mod.BatchSampler(stream, settings.length, settings.batch_size, seed)
    result = train(model, sampler, settings.steps, settings.lr, device, progress,
                   desc=f"fine-tune {scheme.name}{desc_suffix}", autocast=autocast, muon_lr=settings.muon_lr)
    evaluated = build_model(scheme, dims, None, train_len, seed)
    evaluated.load_state_dict(model.state_dict())
    return evaluated.to(device), result
