"""`LongreachCache`: a transformers Cache whose decode steps run through
`longreach.local_attention_with_kvcache` (docs/huggingface.md, "Generation").

transformers' attention layers call `past_key_values.update(k, v, layer_idx)` and hand what it
returns to the attention function. A `LongreachLayer` writes nothing there: it returns the new
keys tagged with itself, and `longreach_attention_forward` (hf/decoder.py) calls
`LongreachLayer.attend`, which appends and attends in one decode-op call. So a sliding-window
layer never materialises more than its ring buffer, and a full layer its contiguous cache.

- Prefill (the layer's first call) goes through the training op, `local_attention`, with the
  padding mask; the real tokens of each row are then stored, padding dropped, so
  `cache_seqlens[b]` counts row b's real tokens. With left padding a window of W positions
  over [pads, real tokens] holds exactly the last W real tokens, so this equals eager's
  sliding window (which counts positions, padding included); RoPE already used the positions
  generate() derives from the attention mask.
- Later calls (decode steps, chunked prefill) go through the decode op. Sliding layers keep a
  rolling cache of sink_tokens + (window - 1) + chunk slots (chunk: the most new tokens per
  call), flat however long the generation runs; full layers a contiguous cache that grows by
  a quarter when full.

The layer reads the window, sink_tokens and sinks (and chunk / chunk_shift, when the attention
call passes them) from the attention call (they are the attention function's business), so one
cache class serves every layer type; prefill and decode steps take them alike. CPU, and CUDA in
a build with CUDA kernels (the decode op's CUDA kernel, docs/cuda.md "Decoding"): patched models
pick this cache by default wherever `decode_op_available` says the decode op runs (hf/decoder.py),
and keep transformers' DynamicCache elsewhere.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._checks import check_int
from ..ops import local_attention, local_attention_with_kvcache, rolling_cache_capacity

_OWNER = "longreach.hf.LongreachCache"
_TAG = "_longreach_layer"  # attribute set on the key tensor update() returns

# transformers is optional for longreach: this module is imported only with it (longreach.hf.LongreachCache
# and hf/decoder.py import it lazily)
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["LongreachCache", "LongreachLayer", "decode_op_available", "layer_of"]


def decode_op_available(device: torch.device) -> bool:
    """Whether this build of longreach has a decode-op kernel for `device`'s type: always on CPU; on
    CUDA when the build has CUDA kernels (a CPU-only build has none)."""
    if device.type == "cpu":
        return True
    return device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "longreach::local_attention_kvcache_fwd", "CUDA")


def layer_of(key: torch.Tensor) -> Optional["LongreachLayer"]:
    """The LongreachLayer that returned `key` from update(), or None (any other cache)."""
    return getattr(key, _TAG, None)


class LongreachLayer(CacheLayerMixin):
    """One attention layer's cache: rolling (sliding window) or contiguous (full attention)."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False  # buffers are sized at the first attention call, from its window

    def __init__(self, chunk: int = 16, **kwargs):
        super().__init__()
        self.chunk = chunk
        self.seen = 0  # positions processed, padding included (what transformers' masks count)
        self.lengths: Optional[torch.Tensor] = None  # (B,) int32 real tokens stored per row
        self.rolling = False
        self.is_sliding = False

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        setattr(key_states, _TAG, self)  # the attention function finds the layer through it
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.lengths = None
        self.seen = 0

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError(f"{_OWNER}: beam search is not supported; use num_beams=1 or a DynamicCache")

    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    # ------------------------------------------------------------------ attention

    def attend(self, query, key, value, valid, *, window_left, sink_tokens, **options) -> torch.Tensor:
        """(B, Hq, Lq, D) attention of the new rows; appends the new keys. valid: (B, K) bool real keys of
        the positions so far (K = all positions, this call's included) or None."""
        if not decode_op_available(query.device):
            raise NotImplementedError(
                f"{_OWNER}: this build of longreach has no decode kernel for {query.device.type} tensors (CPU, "
                "and CUDA in a CUDA build); generate with transformers' DynamicCache (the default of a patched "
                "model there)")
        if self.lengths is None:
            return self._prefill(query, key, value, valid, window_left, sink_tokens, options)
        new = key.shape[2]
        if valid is not None and not bool(valid[:, -new:].all()):
            raise ValueError(f"{_OWNER}: the tokens after the first forward must all be real (attention_mask 1); "
                             "padding is supported in the prompt only")
        self._make_room(new, window_left, sink_tokens)
        out = local_attention_with_kvcache(
            query, self.keys, self.values, key, value, cache_seqlens=self.lengths, rolling=self.rolling,
            causal=True, window=(window_left, 0), sink_tokens=sink_tokens, **options)
        self.lengths += new
        return out

    def _prefill(self, query, key, value, valid, window_left, sink_tokens, options):
        batch, heads, length, dim = key.shape
        if valid is not None and (sink_tokens or options.get("chunk")) and not bool(valid.all()):
            # the training op's sink tokens and chunk grid count positions from the first one (padding, left-
            # padded); the cache's from the first real token: they would disagree
            what = "sink_tokens" if sink_tokens else "chunk"
            raise NotImplementedError(f"{_OWNER}: {what} with a padded prompt is not supported yet; "
                                      "generate one unpadded sequence per row")
        padding = None if valid is None else ~valid[:, -length:]
        out = local_attention(query, key, value, key_padding_mask=padding, causal=True, window=(window_left, 0),
                              sink_tokens=sink_tokens, **options)
        real = torch.ones(batch, length, dtype=torch.bool) if valid is None else valid[:, -length:].cpu()
        counts = real.sum(dim=1)
        self.rolling = window_left is not None
        self.is_sliding = self.rolling
        if self.rolling:
            capacity = rolling_cache_capacity(window_left, new_tokens=self.chunk, sink_tokens=sink_tokens)
        else:
            capacity = max(int(counts.max()) + self.chunk, 1)
        self.keys = key.new_zeros(batch, heads, capacity, dim)
        self.values = value.new_zeros(batch, heads, capacity, dim)
        ring = capacity - sink_tokens
        for row in range(batch):
            index = real[row].nonzero().reshape(-1)  # real tokens in order: position j = j-th real token
            positions = torch.arange(index.numel())
            if self.rolling:  # keep the sinks and the last `ring` positions, in their ring slots
                keep = (positions < sink_tokens) | (positions >= index.numel() - ring)
                index, positions = index[keep], positions[keep]
                slots = torch.where(positions < sink_tokens, positions, sink_tokens + (positions - sink_tokens) % ring)
            else:
                slots = positions
            index, slots = index.to(key.device), slots.to(key.device)
            self.keys[row, :, slots] = key[row, :, index]
            self.values[row, :, slots] = value[row, :, index]
        self.lengths = counts.to(device=key.device, dtype=torch.int32)
        return out

    def _make_room(self, new, window_left, sink_tokens) -> None:
        capacity = self.keys.shape[2]
        if self.rolling:
            if capacity < rolling_cache_capacity(window_left, new_tokens=new, sink_tokens=sink_tokens):
                raise ValueError(f"{_OWNER}: got {new} new tokens in one call, more than chunk={self.chunk} the "
                                 "rolling caches were sized for; pass LongreachCache(chunk=...) large enough")
            return
        needed = int(self.lengths.max()) + new
        if needed > capacity:  # grow by a quarter: amortised O(1) copies per token, at most 25% unused slots
            grown = max(needed, capacity + capacity // 4 + 1)
            for name in ("keys", "values"):
                old = getattr(self, name)
                buffer = old.new_zeros(old.shape[0], old.shape[1], grown, old.shape[3])
                buffer[:, :, :capacity] = old
                setattr(self, name, buffer)


class LongreachCache(Cache):
    """A transformers Cache for longreach-patched models: rolling caches for sliding-window layers
    (O(sink_tokens + window + chunk) slots), contiguous ones for full layers; decode steps run through
    `longreach.local_attention_with_kvcache`. Pass it as `past_key_values` to generate() (patched models
    use it by default on CPU, and on CUDA in a CUDA build). chunk: the most new tokens a call after the prompt may bring (1 for plain
    decoding; more for chunked prefill or speculative decoding)."""

    def __init__(self, config=None, chunk: int = 16, **kwargs):
        check_int(_OWNER, "chunk", chunk, 1)
        self.chunk = chunk
        super().__init__(layer_class_to_replicate=None, layers=[])
        self._config = config

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(LongreachLayer(chunk=self.chunk))
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def nbytes(self) -> list:
        """Bytes held by each layer's key and value buffers."""
        return [layer.nbytes() for layer in self.layers]
