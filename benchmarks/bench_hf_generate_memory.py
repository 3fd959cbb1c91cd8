"""KV-cache memory of a sliding-window layer and of a full-attention layer over a long greedy
generation (issue 14, "Hugging Face"): longreach's LongreachCache against transformers' DynamicCache.

A tiny Qwen2 with random weights (layer 0 full attention, layer 1 sliding, window --window),
patched with longreach.hf.patch, decodes --tokens tokens one at a time after a short prompt, once
with each cache. Reported: the bytes each layer's key and value buffers hold after 1K, 2K, 5K and
10K tokens (the numbers are sizes, not timings: a busy machine cannot change them).

    OMP_NUM_THREADS=1 python benchmarks/bench_hf_generate_memory.py      # a few minutes
"""

from __future__ import annotations

import argparse

import torch

import longreach.hf
from longreach.hf import LongreachCache


def layer_bytes(cache) -> list:
    sizes = []
    for layer in cache.layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        sizes.append(0 if keys is None else keys.numel() * keys.element_size() + values.numel() * values.element_size())
    return sizes


def run(model, cache, prompt, tokens, checkpoints) -> dict:
    """Greedy decoding, one token per forward; {step: [bytes of layer 0, bytes of layer 1]}."""
    found = {}
    with torch.no_grad():
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        for step in range(1, tokens + 1):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, past_key_values=cache, use_cache=True).logits
            if step in checkpoints:
                found[step] = layer_bytes(cache)
    return found


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args()
    config = transformers.Qwen2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2 * args.tokens, use_sliding_window=True,
        sliding_window=args.window, max_window_layers=1)
    torch.manual_seed(0)
    model = longreach.hf.patch(transformers.Qwen2ForCausalLM(config).eval())
    prompt = torch.randint(0, 128, (1, 16))
    checkpoints = [n for n in (1_000, 2_000, 5_000, 10_000) if n <= args.tokens]
    results = {"LongreachCache": run(model, LongreachCache(chunk=1), prompt, args.tokens, checkpoints),
               "DynamicCache": run(model, transformers.DynamicCache(config=model.config), prompt, args.tokens,
                                   checkpoints)}
    print(f"tiny Qwen2: Hk=2, D=16, float32, batch 1, window {args.window}; bytes of keys + values per layer")
    print("| generated | longreach sliding | longreach full | DynamicCache sliding | DynamicCache full |")
    print("|---:|---:|---:|---:|---:|")
    for n in checkpoints:
        ours, theirs = results["LongreachCache"][n], results["DynamicCache"][n]
        print(f"| {n} | {ours[1]:,} | {ours[0]:,} | {theirs[1]:,} | {theirs[0]:,} |")


if __name__ == "__main__":
    main()
