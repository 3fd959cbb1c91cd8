"""longreach inside Hugging Face decoder models (Llama, Mistral, Qwen2, Gemma2/3 and the like).

These models call `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)` in
every attention layer and build their masks through `AttentionMaskInterface`. `patch_decoder`
registers a `longreach` entry in both and switches the model to it:

- the mask function (`longreach_mask`) returns no dense mask, only which keys exist: None when
  nothing is padded, else a (B, K) bool tensor over the first K keys of the layer's key array,
  K being the last key a causal query can see (a static cache's unused tail is cut off). It also
  checks that the pattern transformers asked for is the plain causal one, or causal within
  packed documents: then it returns the (B, L) int32 document index of every token instead
  (custom patterns would need a mask the kernel cannot express, so they raise);
- the attention function (`longreach_attention_forward`) applies causal, the layer's sliding
  window (or the `window` option), soft-capping, the layer's `scaling`, GQA and ALiBi/sigmoid
  options in the fused op, with the padding as the op's key_padding_mask (any pattern, no host
  sync under torch.compile), and the `dropout` transformers passes (config.attention_dropout in
  training mode, 0 in eval) as the op's dropout_p. Packed rows
  (`cu_seq_lens_q/k` kwargs as flash_attention_2 receives them, the mask function's document
  indices, or `position_ids` that restart inside a row) go to `longreach.local_attention_varlen`,
  one problem per document.

Options are stored in `config.longreach` (a dict), so they travel with save_pretrained; when
they change the attention, `config.attn_implementation = "longreach"` goes with them, so that a
plain from_pretrained runs longreach (registered by `import longreach.hf`) instead of silently
dropping them.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Dict, Optional

import torch

from .._checks import check_choice, check_dropout_p, check_int, check_score, check_softcap, chunk_shifts
from ..ops import local_attention
from ..ops import local_attention_varlen
from .cache import layer_of
from ..positional import ALIBI_KINDS, alibi_slopes

ATTENTION_NAME = "longreach"
OPTIONS_ATTR = "longreach"
_OWNER = "longreach.hf.patch"

__all__ = ["patch_decoder", "register", "longreach_attention_forward", "longreach_mask", "ATTENTION_NAME"]


# --------------------------------------------------------------------------- options


def _check_options(window, score, alibi, softcap, rope_scaling, sink_tokens=None, chunk=None, chunk_shift=None,
                   num_heads=None) -> Dict[str, Any]:
    """Validate the user's options; returns the dict stored in config.longreach (None = keep the model's)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(
            f"longreach.hf.patch: window must be a positive int (keys per causal window, current token "
            f"included, like Hugging Face's sliding_window) or None, got {window!r}"
        )
    check_score(_OWNER, score, allow_none=True)
    check_choice(_OWNER, "alibi", alibi, ALIBI_KINDS, allow_none=True)
    softcap = check_softcap(_OWNER, softcap)
    if rope_scaling is not None and not isinstance(rope_scaling, dict):
        raise ValueError(
            f"longreach.hf.patch: rope_scaling must be a dict like {{'rope_type': 'yarn', 'factor': 4.0}} or None, "
            f"got {rope_scaling!r}"
        )
    if sink_tokens is not None:
        sink_tokens = check_int(_OWNER, "sink_tokens", sink_tokens, 0) or None  # 0: none, as if not given
    if chunk is not None or chunk_shift is not None:
        # Checked as the ops will take it; stored as config.json can hold it: "half" or a list of ints.
        chunk, shifts = chunk_shifts(_OWNER, 0 if chunk is None else chunk, chunk_shift, num_heads)
        if shifts is not None and not isinstance(chunk_shift, str):
            chunk_shift = shifts.tolist()
        chunk = chunk or None  # 0: off, as if not given
    options = {"window": window, "sink_tokens": sink_tokens, "score": score, "alibi": alibi, "softcap": None if softcap is None else float(softcap),
               "rope_scaling": None if rope_scaling is None else copy.deepcopy(rope_scaling),
               "chunk": chunk, "chunk_shift": chunk_shift}
    return {key: value for key, value in options.items() if value is not None}


def _options(config) -> Dict[str, Any]:
    return getattr(config, OPTIONS_ATTR, None) or {}


# Options that change what attention computes, which transformers' own attention would drop.
# (rope_scaling is not one: transformers rebuilds the same RoPE from config.rope_parameters.)
_ATTENTION_OPTIONS = ("window", "sink_tokens", "score", "alibi", "softcap", "chunk")


def _name_longreach_in_config(config) -> None:
    """Set config.attn_implementation = "longreach" when the options change the attention.

    save_pretrained writes it into config.json, and from_pretrained takes it as the model's
    attention implementation: a plain load then runs longreach with the saved options
    (`import longreach.hf` registers it), or fails where longreach is not imported, instead of
    silently running transformers' attention without them.
    """
    if config is not None and getattr(config, "attn_implementation", None) != ATTENTION_NAME and any(
        name in _options(config) for name in _ATTENTION_OPTIONS
    ):
        config.attn_implementation = ATTENTION_NAME


# --------------------------------------------------------------------------- mask function


_PACKED_AND_PADDED_MESSAGE = (
    "longreach: this batch packs several sequences into a row (position_ids restart inside a row, or "
    "cu_seq_lens were given) and also has an attention_mask with padding; packing and padding together are "
    "not supported. Pack without padding (DataCollatorWithFlattening), or pad one sequence per row."
)
_PACKED_WITH_CACHE_MESSAGE = (
    "longreach: this batch packs several sequences into a row (position_ids restart inside a row) but the "
    "layer also attends to cached keys; packed sequences are supported without a cache only (pass "
    "use_cache=False, or one sequence per row for generation)."
)


def _require(ok: torch.Tensor, message: str) -> None:
    """Raise ValueError(message) unless every element of `ok` is True (eager mode only).

    Under torch.compile the check is skipped: reading the tensor would break the graph (an
    error with fullgraph=True), and an in-graph assertion (torch._assert_async) is fused into
    a parallel C++ kernel by inductor, where a failure aborts the process instead of raising.
    """
    if not torch.compiler.is_compiling() and not bool(ok.all()):
        raise ValueError(message)


def _check_causal_pattern(mask_function, batch_size, q_length, q_offset, device) -> Optional[torch.Tensor]:
    """Probe transformers' mask function next to the diagonal: causal, or causal per packed document.

    The kernel applies causal + window itself and ignores the pattern transformers asked for,
    so a different one must raise rather than be lost. Every token must see itself and must
    not see its right neighbour (else: bidirectional or block attention). A token that cannot
    see its left neighbour starts a new document: transformers wraps the pattern so when it
    finds packed sequences in position_ids (no attention_mask, no cache). Returns None for
    the plain causal pattern, else the (B, Lq - 1) bool "starts a document" of rows 1..Lq-1
    (eager mode; under torch.compile always None, the checks are skipped). Costs O(B * Lq)
    and is traceable.
    """
    if q_length < 2:
        return None
    batch = torch.arange(batch_size, device=device)[:, None]
    head = torch.zeros((), dtype=torch.long, device=device)
    rows = torch.arange(1, q_length, device=device)[None, :] + q_offset  # each has a left neighbour
    last = q_offset + q_length - 1

    def probe(delta):
        # the last row's right neighbour does not exist (packed mask functions index a tensor
        # of Lq columns): probe the row itself there, which is allowed
        columns = torch.clamp(rows + delta, max=last)
        try:
            allowed = mask_function(batch, head, rows, columns)
        except Exception as error:  # a custom (non index-based) pattern, e.g. image-token overlays
            raise ValueError(
                "longreach: cannot evaluate the attention pattern this model asked for (a custom mask function); "
                "longreach's Hugging Face decoder path supports the plain causal / sliding-window patterns only"
            ) from error
        return torch.as_tensor(allowed, device=device).expand(batch_size, q_length - 1)

    sees_itself = probe(0)
    _require(
        ~probe(1) | (rows >= last),
        "longreach: the model asked for a non-causal attention pattern (bidirectional or block attention, "
        "e.g. image tokens); longreach's Hugging Face decoder path supports causal attention only",
    )
    _require(sees_itself, "longreach: the model asked for an attention pattern in which a token cannot see "
                          "itself; longreach's Hugging Face decoder path supports causal attention only")
    if torch.compiler.is_compiling():
        return None
    starts = ~probe(-1)
    return starts if bool(starts.any()) else None


def _documents_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, L - 1) bool "row r + 1 starts a document" -> (B, L) int32 document index, from 0 in every row."""
    first = torch.zeros_like(starts[:, :1])
    return torch.cat([first, starts], dim=1).to(torch.int32).cumsum(dim=1, dtype=torch.int32)


def _position_starts(position_ids, key_valid, batch_size, q_length) -> Optional[torch.Tensor]:
    """(B, Lq - 1) bool: where position_ids do not step by 1 between two real tokens of a row (a new
    packed sequence starts there, as transformers' find_packed_sequence_indices and the
    flash_attention_2 path see it); None when they never do, or under torch.compile (not checked).

    transformers itself only looks for packing when there is no cache; this also covers a
    first forward with use_cache=True. Padding tokens are skipped (generate gives them dummy
    positions).
    """
    if torch.compiler.is_compiling() or q_length < 2:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2 or position_ids.shape[-1] != q_length:
        return None
    if position_ids.shape[0] != batch_size:
        if position_ids.shape[0] != 1:
            return None
        position_ids = position_ids.expand(batch_size, -1)
    starts = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if key_valid is not None:
        real = key_valid[:, -q_length:]
        starts = starts & real[:, 1:] & real[:, :-1]
    return starts if bool(starts.any()) else None


def longreach_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset=0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Optional[torch.Tensor] = None,
    config=None,
    device="cpu",
    **kwargs,
) -> Optional[torch.Tensor]:
    """AttentionMaskInterface entry: None, (B, K) bool of real keys over the first K keys (any
    pattern: holes too), or for a packed batch (B, L) int32 document indices.

    K = q_offset - kv_offset + q_length, the key index after the last query (queries see no
    key beyond it). For growing caches K == kv_length; for a static cache's layer it cuts the
    unused tail. The attention function slices keys to K, so its bottom-right alignment holds.
    `attention_mask` may also be this function's own output (generate() hands it back): it is
    idempotent.
    """
    if isinstance(q_offset, torch.Tensor):
        if torch.compiler.is_compiling():
            raise NotImplementedError(
                "longreach: static caches under torch.compile are not supported (the number of filled cache "
                "slots is a traced tensor); use the default DynamicCache"
            )
        q_offset = int(q_offset)
    if not torch.compiler.is_compiling():  # no config mutation inside a graph
        # from_pretrained moves config.json's attn_implementation into config._attn_implementation,
        # which save_pretrained does not write: put it back, so that a model loaded from a patched
        # checkpoint still names longreach when it is saved again.
        _name_longreach_in_config(config)
    starts = None
    if mask_function is not None:
        starts = _check_causal_pattern(mask_function, batch_size, q_length, q_offset, device)
    if starts is not None:  # packed documents (transformers finds them only without a cache and a mask)
        if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
            raise ValueError(_PACKED_AND_PADDED_MESSAGE)
        if q_offset != 0 or kv_offset != 0 or kv_length != q_length:
            raise ValueError(_PACKED_WITH_CACHE_MESSAGE)
        # No dense mask: which document each token is in. The attention function runs one
        # problem per document, so no key of another document is seen.
        return _documents_from_starts(starts.to(device))
    horizon = q_offset - kv_offset + q_length
    if not 0 < horizon <= kv_length:
        raise ValueError(f"longreach: inconsistent cache sizes (q_offset={q_offset}, kv_offset={kv_offset}, "
                         f"q_length={q_length}, kv_length={kv_length})")
    if attention_mask is None:
        if horizon == kv_length:
            return None
        return torch.ones(batch_size, horizon, dtype=torch.bool, device=device)
    valid = attention_mask.to(device=device, dtype=torch.bool)
    # Either transformers' 2-D mask over all tokens so far (column j: the token at position j),
    # or this function's own (B, K) output coming back: with a static cache generate() calls the
    # mask function itself and passes the result as attention_mask, and models with one mask type
    # (Llama, Mistral) run it through here again. Slicing that at kv_offset a second time dropped
    # the newest keys, so a mask of K columns is taken as it is (with kv_offset 0, both agree).
    if valid.shape[-1] != horizon:
        if valid.shape[-1] < kv_offset + horizon:
            raise ValueError(
                f"longreach: attention_mask has {valid.shape[-1]} columns but the cache and the input hold "
                f"{kv_offset + horizon} tokens; pass a mask over the cached and the new tokens"
            )
        valid = valid[:, kv_offset : kv_offset + horizon]
    # Eager: one host sync per mask (as transformers' own sdpa mask does when not compiling)
    # spares the kernels an all-False key_padding_mask. Under torch.compile the mask goes to
    # the op as it is: no graph break, no recompile for a new padding pattern.
    if not torch.compiler.is_compiling() and horizon == kv_length and bool(valid.all()):
        return None
    return valid


# --------------------------------------------------------------------------- attention function

_SLOPES_CACHE: Dict[tuple, torch.Tensor] = {}
_SHIFTS_CACHE: Dict[tuple, torch.Tensor] = {}


def _chunk_shift(options, num_heads: int, device) -> Optional[torch.Tensor]:
    """config.longreach's chunk_shift ("half" or a list of ints) as the op's (Hq,) tensor, made once."""
    shift = options.get("chunk_shift")
    if shift is None:
        return None
    key = (options["chunk"], shift if isinstance(shift, str) else tuple(shift), num_heads, str(device))
    if key not in _SHIFTS_CACHE:
        _SHIFTS_CACHE[key] = chunk_shifts(_OWNER, options["chunk"], shift, num_heads, device)[1]
    return _SHIFTS_CACHE[key]


def _alibi_slopes(kind: str, num_heads: int, device) -> torch.Tensor:
    key = (kind, num_heads, str(device))
    if key not in _SLOPES_CACHE:
        _SLOPES_CACHE[key] = alibi_slopes(num_heads, kind, device=device)
    return _SLOPES_CACHE[key]


def _length(value, cu_seqlens: torch.Tensor) -> int:
    """max_length_q/k as an int (flash_attention_2 receives ints from the collator, 0-d tensors from
    prepare_fa_kwargs_from_position_ids); the longest sequence of cu_seqlens when not given."""
    if value is None:
        value = (cu_seqlens[1:] - cu_seqlens[:-1]).max() if cu_seqlens.numel() > 1 else 0
    return int(value)


def _cu_seqlens_from_documents(documents: torch.Tensor) -> torch.Tensor:
    """(B, L) document indices, each row from its first token on, -> int32 cu_seqlens over the B * L
    flattened tokens (a new sequence at every row start and every change of index)."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = starts.reshape(-1).nonzero().reshape(-1).to(torch.int32)
    return torch.cat([first, first.new_tensor([documents.numel()])])


def _packed_geometry(kwargs, attention_mask, position_ids, query, key):
    """(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) over the B * L flattened tokens
    for a packed batch, or None for an ordinary one.

    Sources, first found wins: the cu_seq_lens_q/k (+ max_length_q/k) kwargs, as transformers'
    flash_attention_2 path receives them; the mask function's (B, L) int32 document indices;
    position_ids that do not step by 1 inside a row (a first forward with use_cache=True, where
    transformers builds no packed mask). Packing with padding raises.
    """
    batch, q_length, k_length = query.shape[0], query.shape[2], key.shape[2]
    padding = attention_mask is not None and attention_mask.dtype == torch.bool
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None or cu_k is not None:
        if padding:
            raise ValueError(_PACKED_AND_PADDED_MESSAGE)
        if cu_q is None or cu_k is None:
            raise ValueError("longreach: got only one of cu_seq_lens_q and cu_seq_lens_k; pass both (as "
                             "DataCollatorWithFlattening(return_flash_attn_kwargs=True) does) or neither")
        cu_q, cu_k = (torch.as_tensor(t, device=query.device) for t in (cu_q, cu_k))
        return (cu_q, cu_k, _length(kwargs.get("max_length_q"), cu_q), _length(kwargs.get("max_length_k"), cu_k))
    if attention_mask is not None and not padding:  # document indices from longreach_mask
        if tuple(attention_mask.shape) != (batch, q_length) or k_length != q_length:
            raise ValueError(
                f"longreach: got packed document indices of shape {tuple(attention_mask.shape)} for queries of "
                f"shape {tuple(query.shape)} and keys of shape {tuple(key.shape)}; expected ({batch}, {q_length}) "
                "with as many keys as queries (packed sequences are supported without a cache only)"
            )
        documents = attention_mask
    else:
        starts = _position_starts(position_ids, attention_mask, batch, q_length)
        if starts is None:
            return None
        if padding:
            raise ValueError(_PACKED_AND_PADDED_MESSAGE)
        if k_length != q_length:
            raise ValueError(_PACKED_WITH_CACHE_MESSAGE)
        documents = _documents_from_starts(starts)
    cu_seqlens = _cu_seqlens_from_documents(documents.to(query.device))
    longest = _length(None, cu_seqlens)
    return cu_seqlens, cu_seqlens, longest, longest


def longreach_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
):
    """AttentionInterface entry: q (B, Hq, Lq, D), k/v (B, Hk, Lk, D) -> ((B, Lq, Hq, D), None).

    attention_mask: None, longreach_mask's (B, K) bool real keys, or its (B, L) int32 document
    indices of a packed batch. Packed batches (also from `cu_seq_lens_q/k` / `max_length_q/k`
    kwargs or restarting `position_ids`) run as one longreach.local_attention_varlen call over
    the B * L flattened tokens, one problem per document.
    """
    options = _options(module.config)
    sinks = kwargs.get("s_aux")  # gpt-oss's learnable sink logits (Hq,): one more softmax term per row
    # transformers passes the model's attention dropout in training mode (0.0 in eval): the op's dropout_p
    dropout = check_dropout_p("longreach", dropout, "dropout")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise NotImplementedError("longreach: the Hugging Face decoder path supports causal attention only")
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.dtype not in (torch.bool, torch.int32):
            raise ValueError(
                "longreach: got a prepared attention mask of shape "
                f"{tuple(attention_mask.shape)} and dtype {attention_mask.dtype}; longreach takes a 2-D padding "
                "mask (batch, keys) and applies causal and window masking itself. Pass the 2-D attention_mask."
            )
        if attention_mask.dtype == torch.bool and attention_mask.shape[1] < key.shape[2]:
            # static cache: drop the unused tail
            key = key[:, :, : attention_mask.shape[1]]
            value = value[:, :, : attention_mask.shape[1]]

    window = options.get("window", sliding_window)
    left = None if window is None else window - 1
    cap = options.get("softcap", softcap)
    alibi = options.get("alibi")
    slopes = None if alibi is None else _alibi_slopes(alibi, query.shape[1], query.device)
    sink_tokens = options.get("sink_tokens", 0)
    # LongLoRA's recipe: chunks (S2-Attn) while training, the full or windowed attention in eval mode.
    chunk = options.get("chunk", 0) if module.training else 0
    cache_layer = layer_of(key)
    if chunk and (cache_layer is not None or key.shape[2] != query.shape[2]):
        raise NotImplementedError(
            f"longreach: patch(chunk={chunk}) applies chunks in training mode, to whole sequences; this call attends "
            "to cached keys. Train with use_cache=False, or call model.eval() to run without chunks")
    if cache_layer is not None:  # a LongreachCache layer: it appends and attends (decode op after the prompt)
        if dropout:
            raise NotImplementedError(
                f"longreach: attention dropout (dropout={dropout}, the model is in training mode) with a "
                "LongreachCache is not supported: the decode op has no dropout; call model.eval() before generating")
        out = cache_layer.attend(query, key, value, attention_mask, window_left=left, sink_tokens=sink_tokens,
                                 alibi_slopes=slopes, score=options.get("score", "softmax"), softcap=cap,
                                 scale=scaling, sinks=sinks)
        return out.transpose(1, 2).contiguous(), None

    packed = _packed_geometry(kwargs, attention_mask, kwargs.get("position_ids"), query, key)
    common = dict(causal=True, window=(left, 0), alibi_slopes=slopes, score=options.get("score", "softmax"),
                  softcap=cap, scale=scaling)
    if sink_tokens:
        common["sink_tokens"] = sink_tokens
    if chunk:
        common.update(chunk=chunk, chunk_shift=_chunk_shift(options, query.shape[1], query.device))
    context_parallel = getattr(module, "longreach_context_parallel", None)  # longreach.distributed
    if context_parallel is not None:
        if attention_mask is not None or packed is not None:
            raise ValueError("longreach: with context parallelism the input is a shard of one unpadded, unpacked "
                             "sequence per row (no attention_mask, no packing; pass the true position_ids)")
        if sinks is not None or sink_tokens or chunk:
            raise ValueError("longreach: context parallelism does not take attention sinks (s_aux, sink_tokens) or "
                             "chunks (patch(chunk=...)) yet")
        if dropout:
            raise ValueError(f"longreach: context parallelism does not take attention dropout yet (dropout={dropout} "
                             "in training mode); set config.attention_dropout = 0.0")
        return context_parallel.attend(query, key, value, **common).transpose(1, 2).contiguous(), None
    if sinks is not None:
        common["sinks"] = sinks
    if dropout:
        common["dropout_p"] = dropout
    if packed is not None:
        batch, heads, q_length, dim = query.shape
        flat = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value)]
        out = local_attention_varlen(*flat, *packed, **common)
        return out.view(batch, q_length, heads, dim), None
    padding = None if attention_mask is None else ~attention_mask  # True = padding, any pattern
    out = local_attention(query, key, value, key_padding_mask=padding, **common)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register `longreach` in transformers' AttentionInterface and AttentionMaskInterface (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, longreach_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, longreach_mask)


# --------------------------------------------------------------------------- patch


def is_decoder_model(model) -> bool:
    """True for transformers models whose attention goes through AttentionInterface."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return (
        isinstance(base, PreTrainedModel)
        and bool(base.is_backend_compatible())
        and bool(base._can_set_attn_implementation())
    )


def patch_decoder(model, window=None, score=None, alibi=None, rope_scaling=None, softcap=None, sink_tokens=None,
                  chunk=None, chunk_shift=None):
    """Switch a transformers decoder model to longreach attention, in place; returns the model.

    window: int W, every layer attends to the last W keys (current token included), like
    Hugging Face's `sliding_window=W`; None keeps each layer's own (full or sliding).
    score: "softmax" / "sigmoid"; alibi: "standard" / "balanced" slopes added to the scores;
    softcap: a positive float replacing the model's attention-logit soft-cap (None keeps it).
    sink_tokens: int n, the first n tokens of each sequence stay visible to every later token on
    top of the window (StreamingLLM).
    rope_scaling: a Hugging Face rope-scaling dict (rope_type linear / yarn / dynamic / ...)
    that replaces the model's rotary embedding. chunk, chunk_shift: chunked attention in
    training mode only (LongLoRA's S2-Attn; longreach.hf.patch). Calling it with no option on a model saved
    after patching restores the saved options.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_decoder_model(base):
        raise TypeError(
            f"longreach.hf.patch: {type(base).__name__} does not route its attention through transformers' "
            "AttentionInterface (its class is not marked _supports_attention_backend), so longreach cannot "
            "replace it; supported: decoder models such as Llama, Mistral, Qwen2, Gemma2, Gemma3"
        )
    config = base.config.get_text_config(decoder=True)
    options = _check_options(window, score, alibi, softcap, rope_scaling, sink_tokens, chunk, chunk_shift,
                             getattr(config, "num_attention_heads", None))
    if not options:
        options = _options(config)  # re-patching a model loaded from a patched checkpoint
    if "rope_scaling" in options:
        from .rope import swap_rotary_embedding

        swap_rotary_embedding(base, options["rope_scaling"])
    if "window" in options:
        # The cache follows config.sliding_window: sliding layers then keep the window - 1 keys
        # the window needs (not fewer), and a model without sliding layers (no layer_types, e.g.
        # Llama) gets bounded sliding caches instead of caches that grow with the sequence.
        config.sliding_window = options["window"]
    setattr(config, OPTIONS_ATTR, options)
    _name_longreach_in_config(config)
    register()
    base.set_attn_implementation(ATTENTION_NAME)
    if config._attn_implementation != ATTENTION_NAME:
        raise TypeError(f"longreach.hf.patch: transformers refused to switch {type(base).__name__} to longreach")
    # generate() builds its default cache here: a LongreachCache where the decode op runs (CPU; CUDA builds).
    # A bound method in the instance dict: deepcopy rebinds it to the copy, unpatch deletes it.
    base._prepare_cache_for_generation = types.MethodType(_prepare_longreach_cache, base)
    return model


def _prepare_longreach_cache(self, generation_config, model_kwargs, *args, **kwargs):
    """generate()'s cache preparation, with a LongreachCache as the default where the decode op runs
    (CPU, and CUDA in a build with CUDA kernels: cache.decode_op_available): when the user passed no cache
    and no cache_implementation (static, offloaded, ... keep transformers' caches), and the model still
    runs longreach attention. Elsewhere transformers' DynamicCache."""
    from .cache import LongreachCache, decode_op_available

    if (model_kwargs.get("past_key_values") is None and generation_config.cache_implementation is None
            and generation_config.use_cache is not False and decode_op_available(self.device)
            and self.config.get_text_config(decoder=True)._attn_implementation == ATTENTION_NAME):
        model_kwargs["past_key_values"] = LongreachCache(self.config.get_text_config(decoder=True))
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
