"""Training and evaluation loops of the study (model-agnostic: any ids -> logits module)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import BatchSampler, segments
from .muon import BatchedMuon

LN2 = math.log(2.0)
# AdamW's first-moment decay and the warm-up's share of the steps. Measured on rope, 1000 steps of
# 8 x 256 bytes, peak lr 3e-3 (docs/extrapolation.md, "How the default was set"): beta1 0.8 with
# 10 % warm-up ended 0.06-0.10 held-out bits per byte below 0.9 with 5 %, on each of 3 seeds.
BETA1 = 0.8
WARMUP_FRACTION = 0.10
# Muon's momentum and weight decay (torch.optim.Muon's defaults; muon.py has its update rule).
MUON_MOMENTUM = 0.95
MUON_WEIGHT_DECAY = 0.1

# What train() and evaluate() report progress to: True (a tqdm bar), False (nothing), or a
# callable (desc, total) -> an object with tqdm's update(n), set_postfix(dict) and close()
# (the study's worker processes pass bars that forward to the parent's, workers.py).
Progress = Union[bool, Callable[[str, int], Any]]


def progress_bar(progress: Progress, desc: str, total: int):
    if callable(progress):
        return progress(desc, total)
    return tqdm(total=total, desc=desc, disable=not progress, leave=True, dynamic_ncols=True)


@dataclass
class TrainResult:
    losses: List[float] = field(default_factory=list)  # bits per byte of each training batch
    seconds: float = 0.0
    tokens: int = 0  # input bytes processed (for the fine-tunes' cost per step)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def final_bpb(self) -> float:
        """Mean training bpb over the last 10 % of steps (a less noisy end-of-training figure);
        NaN for a run of 0 steps."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail) if tail else float("nan")


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first WARMUP_FRACTION of the steps, then cosine decay to 10 % of the
    peak."""
    warmup = max(1, int(steps * WARMUP_FRACTION))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def muon_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    """The parameters Muon updates: the weight matrices, that is every 2-D parameter but the
    embedding tables (Muon's authors leave embeddings and the output layer, here tied to the
    embedding, to AdamW)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [p for p in model.parameters() if p.dim() == 2 and id(p) not in tables]


def _adamw(params, lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=(BETA1, 0.95), weight_decay=0.1)


def make_optimizers(model: torch.nn.Module, lr: float, muon_lr: Optional[float]
                    ) -> List[Tuple[torch.optim.Optimizer, float]]:
    """(optimizer, peak learning rate) pairs: AdamW on every parameter, or with ``muon_lr`` Muon on
    muon_parameters() and AdamW at ``lr`` on the rest (embedding, norms, biases)."""
    if muon_lr is None:
        return [(_adamw(model.parameters(), lr), lr)]
    matrices = muon_parameters(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    pairs = []
    if matrices:
        pairs.append((BatchedMuon(matrices, lr=muon_lr, momentum=MUON_MOMENTUM, weight_decay=MUON_WEIGHT_DECAY),
                      muon_lr))
    if rest:
        pairs.append((_adamw(rest, lr), lr))
    return pairs


def train(
    model: torch.nn.Module,
    sampler: BatchSampler,
    steps: int,
    lr: float,
    device: str = "cpu",
    progress: Progress = True,
    desc: str = "train",
    position_ids: Optional[Callable[[int], torch.Tensor]] = None,
    autocast: Optional[torch.dtype] = None,
    muon_lr: Optional[float] = None,
) -> TrainResult:
    """AdamW (peak ``lr``) on next-byte cross-entropy, or with ``muon_lr`` Muon on the weight
    matrices (make_optimizers); returns per-step training bits per byte. Every optimizer follows
    learning_rate()'s schedule to its own peak.

    ``position_ids(batch_size)``, when given, supplies each step's RoPE position ids (PoSE);
    it must draw from its own generator so the batches stay those of every other scheme.
    ``autocast`` (torch.bfloat16) runs the forward under torch.autocast, weights, optimizer
    state and the loss staying float32 (mixed precision); None trains in float32.
    """
    model.to(device).train()
    optimizers = make_optimizers(model, lr, muon_lr)
    result = TrainResult()
    start = time.perf_counter()
    bar = progress_bar(progress, desc, steps)
    device_type = torch.device(device).type
    for step in range(steps):
        for opt, peak in optimizers:
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps, peak)
        inputs, targets = sampler.next()
        ids = None if position_ids is None else position_ids(inputs.shape[0]).to(device)
        with torch.autocast(device_type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(inputs.to(device), position_ids=ids)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: training loss became {loss.item()} at step {step}")
        for opt, _ in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt, _ in optimizers:
            opt.step()
        bpb = loss.item() / LN2
        result.losses.append(bpb)
        result.tokens += inputs.numel()
        bar.update(1)
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix({"bpb": f"{bpb:.3f}"})
    bar.close()
    result.seconds = time.perf_counter() - start
    return result


def _nats(model, inputs, targets, device) -> float:
    logits = model(inputs.to(device))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(), targets.to(device).reshape(-1),
                           reduction="sum").item()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    chunks: torch.Tensor,
    lengths: Sequence[int],
    configure: Callable[[int], None],
    tokens_per_batch: int = 16384,
    device: str = "cpu",
    progress: Progress = True,
    desc: str = "eval",
    context: Optional[Dict[int, Tuple[float, float]]] = None,
) -> Dict[int, float]:
    """Bits per byte on the held-out chunks at each length (same bytes scored at every length).

    ``configure(length)`` is called before each length (eval-time RoPE scaling, ALiBi slopes).
    Segments are batched so a batch holds about ``tokens_per_batch`` bytes.

    ``context``, when given a dict, receives the long-context-use measure at each length L:
    (bpb of every segment's second half given its first half, bpb of the same bytes given
    nothing: the second half fed alone). The first is read off the full segments' losses; the
    second costs one more forward at L / 2. A model that uses its context has the first lower.
    """
    model.to(device).eval()
    plans = []
    for length in lengths:
        inputs, targets = segments(chunks, length)
        per_batch = max(1, tokens_per_batch // length)
        plans.append((length, inputs, targets, per_batch))
    batches = sum(math.ceil(inp.shape[0] / pb) for _, inp, _, pb in plans)
    halves = context is not None
    bar = progress_bar(progress, desc, batches * (2 if halves else 1))
    out: Dict[int, float] = {}
    for length, inputs, targets, per_batch in plans:
        half = length // 2
        alone = 0.0
        if halves:
            configure(length)  # the scheme as configured for L, given only the second halves
            for i in range(0, inputs.shape[0], per_batch):
                alone += _nats(model, inputs[i:i + per_batch, half:], targets[i:i + per_batch, half:], device)
                bar.update(1)
        configure(length)  # afresh: dynamic NTK's tables follow the lengths seen
        nats = 0.0
        second = 0.0
        for i in range(0, inputs.shape[0], per_batch):
            logits = model(inputs[i:i + per_batch].to(device))
            per_byte = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).double(),
                                       targets[i:i + per_batch].to(device).reshape(-1),
                                       reduction="none").view(logits.shape[0], length)
            nats += per_byte.sum().item()
            second += per_byte[:, half:].sum().item()
            bar.update(1)
        out[length] = nats / (targets.numel() * LN2)
        if halves:
            scored = targets[:, half:].numel() * LN2
            context[length] = (second / scored, alone / scored)
        bar.set_postfix({f"bpb@{length}": f"{out[length]:.3f}"})
    bar.close()
    return out
