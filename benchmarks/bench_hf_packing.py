"""A training step of a tiny Hugging Face Llama on packed vs padded batches (issue 13's last target).

The same documents (lengths drawn with a fixed seed from --min-length..--max-length) as one
batch two ways, through a model patched with longreach.hf.patch(window=W):

    packed   one row of all documents, DataCollatorWithFlattening's form: position_ids
             restarting per document and the cu_seq_lens_q/k + max_length_q/k kwargs (one
             local_attention_varlen call per layer)
    padded   one row per document, right-padded to the longest, with an attention_mask
             (the op's key_padding_mask: padded rows are skipped by the attention, but the
             projections, MLPs and logits still run on every padded token)

A step is forward, loss (labels -100 at padding), backward and an AdamW step. Timed like the
other CPU benchmarks: one intra-op thread, the thread's CPU time (time.thread_time), the two
methods interleaved for --rounds rounds after a warm-up each, best round each. tokens/s counts
real tokens only. Both runs' losses are printed: they agree (the same documents and weights).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_hf_packing.py          # about a minute
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import longreach.hf


def build_model(args):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192, pad_token_id=0, attention_dropout=0.0)
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(config)
    return longreach.hf.patch(model, window=args.window).train()


def batches(lengths, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    cu = torch.zeros(len(docs) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    flat = torch.cat(docs)[None]
    labels = flat.clone()
    labels[0, cu[:-1].long()] = -100  # no prediction across a document start (as the collator does)
    packed = dict(input_ids=flat, labels=labels, position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths), max_length_k=max(lengths),
                  use_cache=False)
    longest = max(lengths)
    ids = torch.zeros(len(docs), longest, dtype=torch.long)
    mask = torch.zeros(len(docs), longest, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d
        mask[i, : len(d)] = 1
    padded = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    return packed, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--min-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.min_length, args.max_length + 1, (args.docs,), generator=gen).tolist()
    packed, padded = batches(lengths, args.vocab, args.seed + 1)
    base = build_model(args)
    models = {"packed": base, "padded": copy.deepcopy(base)}
    inputs = {"packed": packed, "padded": padded}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    losses = {}

    def step(name):
        loss = models[name](**inputs[name]).loss
        optims[name].zero_grad()
        loss.backward()
        optims[name].step()
        return loss.item()

    for name in models:  # warm-up; also the first losses, on identical weights
        losses[name] = step(name)
    best = {name: float("inf") for name in models}
    for _ in range(args.rounds):
        for name in models:
            start = time.thread_time()
            step(name)
            best[name] = min(best[name], time.thread_time() - start)

    tokens = sum(lengths)
    padded_tokens = len(lengths) * max(lengths)
    print(f"tiny Llama training step (hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"window {args.window}), {args.docs} documents of {args.min_length}..{args.max_length} tokens: "
          f"{tokens} real tokens, {padded_tokens} padded; one thread, best of {args.rounds}")
    for name in models:
        print(f"  {name:7s} {best[name] * 1e3:9.1f} ms/step  {tokens / best[name]:9.0f} tokens/s  "
              f"first loss {losses[name]:.4f}")
    print(f"  packed / padded tokens/s: {best['padded'] / best['packed']:.2f}x")


if __name__ == "__main__":
    main()
