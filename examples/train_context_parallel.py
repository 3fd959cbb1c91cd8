"""Train longreach.nn.LocalTransformerLM with its sequence split over the ranks (context parallelism).

    # on CPU, two gloo processes, a 512-token sequence split 256 + 256, window 32:
    torchrun --standalone --nproc-per-node 2 examples/train_context_parallel.py --steps 20

    # check that the sharded loss and gradients equal one process's (rank 0 recomputes unsharded):
    torchrun --standalone --nproc-per-node 2 examples/train_context_parallel.py --steps 2 --check

Each rank holds the same model and gets its contiguous piece of every sequence
(`longreach.distributed.shard_sequence`, with the labels shifted before the split and the true
position ids for RoPE). `enable_context_parallel` makes every attention layer exchange its window's
halo with the neighbouring ranks (`longreach.distributed.local_attention`); everything else in the
model is per token. The loss is the mean over all ranks' tokens and the gradients are summed over
the ranks (all_reduce), as data parallelism does. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

import longreach.distributed as cp
from longreach.nn import LocalTransformerConfig, LocalTransformerLM

IGNORE = -100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, before the split")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--window", type=int, default=32, help="causal window in keys, current token included")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--check", action="store_true",
                   help="rank 0 also runs the unsharded model and compares loss and gradients")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any collective may wait")
    return p.parse_args(argv)


def batch_of(step: int, args, vocab: int) -> torch.Tensor:
    """The same synthetic batch on every rank: each token is a fixed function of the one before
    (x -> 5x + 3 mod vocab) from a random start, with 10% random tokens: learnable in a few steps."""
    gen = torch.Generator().manual_seed(step)
    ids = torch.empty(args.batch, args.seq_len, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (args.batch,), generator=gen)
    noise = torch.rand(args.batch, args.seq_len, generator=gen) < 0.1
    random = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    for t in range(1, args.seq_len):
        ids[:, t] = torch.where(noise[:, t], random[:, t], (5 * ids[:, t - 1] + 3) % vocab)
    return ids


def sharded_loss(model, input_ids, group=None):
    """Mean next-token loss over every rank's tokens, computed on this rank's shard."""
    labels = cp.next_token_labels(input_ids, IGNORE)
    shard = cp.shard_sequence(input_ids, labels=labels, group=group)
    logits = model(shard.input_ids, position_ids=shard.position_ids)
    total = F.cross_entropy(logits.flatten(0, 1), shard.labels.flatten(), ignore_index=IGNORE, reduction="sum")
    count = (shard.labels != IGNORE).sum().to(torch.float64)
    dist.all_reduce(count, group=group)
    return total / count.to(total.dtype)


def main(argv=None) -> int:
    args = parse_args(argv)
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    config = LocalTransformerConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, window=args.window)
    model = cp.enable_context_parallel(LocalTransformerLM(config))
    reference = LocalTransformerLM(config) if args.check and rank == 0 else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        input_ids = batch_of(step, args, config.vocab_size)
        loss = sharded_loss(model, input_ids)
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # every rank's tokens contribute to every weight
            dist.all_reduce(p.grad)
        shown = loss.detach().clone()
        dist.all_reduce(shown)  # each rank's loss is its share of the mean
        if reference is not None:
            ref_loss = F.cross_entropy(reference(input_ids).flatten(0, 1),
                                       cp.next_token_labels(input_ids, IGNORE).flatten(), ignore_index=IGNORE)
            reference.zero_grad()
            ref_loss.backward()
            grad_error = max(float((p.grad - r.grad).abs().max())
                             for p, r in zip(model.parameters(), reference.parameters()))
            print(f"check step {step}: loss sharded {float(shown):.6f} unsharded {float(ref_loss.detach()):.6f}, "
                  f"max gradient difference {grad_error:.2e}", flush=True)
        optimizer.step()
        if reference is not None:
            # Keep the reference in step with the sharded model (same update, same weights).
            reference.load_state_dict(model.state_dict())
        if rank == 0:
            print(f"step {step}: loss {float(shown):.4f} ({world} ranks, {args.seq_len // world} tokens each)",
                  flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
