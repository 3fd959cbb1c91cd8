"""Fine-tune a Hugging Face decoder to a longer context with longreach: sliding window + YaRN or PI.

    # a real model (downloads it), 4x its context with YaRN, a 4096-key window, LoRA:
    python examples/finetune_hf_long_context.py --model Qwen/Qwen2.5-0.5B --rope yarn --factor 4 \\
        --window 4096 --seq-len 131072 --steps 200 --data my_corpus.txt --out runs/qwen-128k

    # offline smoke run: a tiny random Llama (pretrained length 64) taken to 256 tokens
    python examples/finetune_hf_long_context.py --tiny --steps 30

    # LongLoRA's shifted sparse attention (S2-Attn): chunks of 64 tokens in training, half the heads
    # shifted by 32; the held-out loss (eval mode) and the saved model use the windowed attention
    python examples/finetune_hf_long_context.py --tiny --steps 30 --chunk 64 --chunk-shift half

The recipe: `longreach.hf.patch(model, window=W, rope_scaling={...})` makes every layer attend
to the last W keys with the fused kernel (cost and memory grow with W, not with the sequence)
and rescales RoPE; gradient checkpointing and LoRA (peft) keep training memory small; the
merged model is saved with the options in its config, and
`longreach.hf.patch(AutoModelForCausalLM.from_pretrained(out))` restores them. With --chunk,
training attends within chunks (LongLoRA), inference does not (docs/huggingface.md).
See docs/huggingface.md.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import sys
import time

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face model id or local path (a decoder: Llama, Mistral, Qwen2, Gemma...)")
    src.add_argument("--tiny", action="store_true", help="a tiny random Llama (byte vocabulary), no download")
    p.add_argument("--rope", choices=["yarn", "linear", "dynamic", "none"], default="yarn",
                   help="RoPE scaling: yarn (YaRN), linear (Position Interpolation), dynamic (NTK), none")
    p.add_argument("--factor", type=float, default=4.0, help="context extension factor for --rope (default 4)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window in keys, current token included (default: the pretrained length)")
    p.add_argument("--chunk", type=int, default=None,
                   help="LongLoRA's S2-Attn: in training, attend only within chunks of this many tokens "
                   "(eval mode, the held-out loss and the saved model's inference run without chunks)")
    p.add_argument("--chunk-shift", choices=["half", "none"], default=None,
                   help="with --chunk: 'half' (default) shifts the chunks of half the heads by chunk/2, 'none' keeps "
                   "one grid")
    p.add_argument("--seq-len", type=int, default=None,
                   help="training sequence length (default: factor x the pretrained length)")
    p.add_argument("--data", default=None, help="a text file or folder of .txt/.py/.md files "
                   "(default: the Python standard library's own sources)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank on the attention projections; 0 = full fine-tuning")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--out", default=None, help="folder for the merged, patched model (and tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("factor", "lr"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("window", "chunk", "seq_len", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive int, got {value}")
    if args.chunk_shift is not None and args.chunk is None:
        p.error("--chunk-shift needs --chunk")
    if args.lora_r < 0:
        p.error(f"--lora-r must be >= 0, got {args.lora_r}")
    return args


def load_text(path):
    if path is None:  # always there, no download: the standard library's sources
        path = os.path.dirname(os.__file__)
        files = sorted(glob.glob(os.path.join(path, "*.py")))
    elif os.path.isdir(path):
        files = sorted(f for ext in ("txt", "py", "md") for f in glob.glob(os.path.join(path, "**", f"*.{ext}"),
                                                                           recursive=True))
    else:
        files = [path]
    if not files:
        sys.exit(f"error: --data {path!r}: no .txt/.py/.md files found")
    parts = []
    for name in files:
        try:
            with open(name, encoding="utf-8", errors="replace") as handle:
                parts.append(handle.read())
        except OSError as error:
            sys.exit(f"error: --data: cannot read {name!r}: {error}")
    return "\n\n".join(parts)


def build_model(args):
    import transformers

    if args.tiny:
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
        )
        return transformers.LlamaForCausalLM(config), None
    dtype = getattr(torch, args.dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    return model, transformers.AutoTokenizer.from_pretrained(args.model)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    import longreach.hf

    model, tokenizer = build_model(args)
    pretrained = model.config.max_position_embeddings
    window = args.window or pretrained
    seq_len = args.seq_len or int(args.factor * pretrained)
    rope_scaling = None if args.rope == "none" else {"rope_type": args.rope, "factor": args.factor}
    chunks = {}
    if args.chunk:
        chunks = dict(chunk=args.chunk, chunk_shift=None if args.chunk_shift == "none" else "half")
    longreach.hf.patch(model, window=window, rope_scaling=rope_scaling, **chunks)
    chunked = f", training in chunks of {args.chunk} (shift {chunks['chunk_shift']})" if chunks else ""
    print(f"patched {type(model).__name__}: window {window} keys, rope {rope_scaling}{chunked}, "
          f"pretrained length {pretrained} -> training length {seq_len}")

    text = load_text(args.data)
    ids = (torch.tensor(list(text.encode("utf-8")), dtype=torch.long) if tokenizer is None
           else tokenizer(text, return_tensors="pt").input_ids[0])
    chunks = ids[: (len(ids) // seq_len) * seq_len].view(-1, seq_len)
    if len(chunks) < 2:
        sys.exit(f"error: --data has {len(ids)} tokens, fewer than two sequences of --seq-len {seq_len}")
    held_out, train = chunks[:1], chunks[1:]
    print(f"data: {len(ids)} tokens, {len(train)} training sequences of {seq_len}")

    model.activation_checkpointing_enable()
    if args.lora_r:
        import peft

        lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = peft.get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in params):,}")
    optimizer = torch.optim.AdamW(params, lr=args.lr)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=held_out, labels=held_out).loss.item()
        model.train()
        return loss

    print(f"held-out loss at {seq_len} tokens before: {held_out_loss():.4f}")
    model.train()
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, len(train), (args.batch_size,))
        batch = train[rows]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - start:.0f} s)")
    after = held_out_loss()
    print(f"held-out loss at {seq_len} tokens after: {after:.4f} (bits per token {after / math.log(2):.3f})")

    if args.out:
        merged = model.merge_and_unload() if args.lora_r else model
        merged.save_pretrained(args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        print(f"saved to {args.out}; reload with "
              f"longreach.hf.patch(AutoModelForCausalLM.from_pretrained({args.out!r}))")


if __name__ == "__main__":
    main()
