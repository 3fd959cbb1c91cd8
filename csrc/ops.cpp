// Operator schemas of the longreach library, and nothing else: kernels are
// registered per device in cpu/ and cuda/, fake (meta) kernels and autograd in
// python/longreach/ops.py. Forward and backward are separate ops so
// torch.compile traces both without graph breaks.
#include <torch/library.h>

TORCH_LIBRARY(longreach, m) {
  // window_left / window_right count dilated steps; -1 means unbounded.
  // softcap 0 disables soft-capping; sigmoid_bias None means -ln(window size).
  // The backward's grad_alibi_slopes is (B, Hq) float32 with alibi_grad (the
  // caller sums it over B for (Hq,) slopes), else an empty (0,) tensor.
  // key_padding_mask (B, Lk) bool, True = padding: that position holds no key
  // (positions of the others are kept) and a query row at it returns zeros.
  // causal: window_right must then be 0, and global tokens are causal (a
  // global row sees the keys up to its position, a global key only the rows at
  // or after it). sink_tokens: the first n keys are seen by every row at or
  // after them. sinks (Hq,) any floating dtype: a learnable logit added to each
  // softmax row's denominator (lse includes it); the backward's grad_sinks has
  // sinks' dtype and shape, or is an empty (0,) tensor without sinks.
  // chunk > 0: a row sees window keys of its own chunk only, chunks of `chunk`
  // positions offset per head by chunk_shift (Hq,) int32/int64 (None = 0).
  // dropout_p: attention dropout of the weights after softmax / sigmoid (lse
  // unaffected), its mask regenerated from dropout_seed, an int64 (2,) CPU
  // tensor (seed, offset) the Python op draws from torch's generator
  // (common/philox.h); the backward takes the forward's values.
  m.def(
      "local_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? global_mask, Tensor? alibi_slopes, "
      "int window_left, int window_right, int dilation, str score, float? sigmoid_bias, float softcap, "
      "float scale, Tensor? key_padding_mask=None, bool causal=False, int sink_tokens=0, Tensor? sinks=None, "
      "int chunk=0, Tensor? chunk_shift=None, float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor out, Tensor lse)");
  m.def(
      "local_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor? global_mask, Tensor? alibi_slopes, int window_left, int window_right, "
      "int dilation, str score, float? sigmoid_bias, float softcap, float scale, bool alibi_grad=False, "
      "Tensor? key_padding_mask=None, bool causal=False, int sink_tokens=0, Tensor? sinks=None, int chunk=0, "
      "Tensor? chunk_shift=None, float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_alibi_slopes, Tensor grad_sinks)");
}

// Packed (variable-length) batches in flash-attn's layout: q (total_q, Hq, D),
// k / v (total_k, Hk, D), cu_seqlens_* int32 or int64 (num_seqs + 1,), every
// sequence its own problem with local_attention's semantics. lse is
// (Hq, total_q), global_mask (total_k,), alibi_slopes (Hq,) or (num_seqs, Hq),
// grad_alibi_slopes (num_seqs, Hq) with alibi_grad. Chunks count from each
// sequence's position 0.
TORCH_LIBRARY_FRAGMENT(longreach, m) {
  m.def(
      "local_attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, Tensor? global_mask, Tensor? alibi_slopes, int window_left, "
      "int window_right, int dilation, str score, float? sigmoid_bias, float softcap, float scale, "
      "bool causal=False, int sink_tokens=0, Tensor? sinks=None, int chunk=0, Tensor? chunk_shift=None, "
      "float dropout_p=0.0, Tensor? dropout_seed=None) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "local_attention_varlen_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
      "Tensor? global_mask, Tensor? alibi_slopes, int window_left, int window_right, int dilation, str score, "
      "float? sigmoid_bias, float softcap, float scale, bool alibi_grad=False, bool causal=False, "
      "int sink_tokens=0, Tensor? sinks=None, int chunk=0, Tensor? chunk_shift=None, float dropout_p=0.0, "
      "Tensor? dropout_seed=None) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_alibi_slopes, Tensor grad_sinks)");
}

// Decoding against a KV cache (flash-attn's flash_attn_with_kvcache contract):
// q (B, Hq, Lq, D); k / v (B, Hk, Lq, D) or None are appended in place at
// positions cache_seqlens[b] .. + Lq - 1 before the attention, which covers
// each row's cache_seqlens[b] (+ Lq) keys, bottom-right aligned. Caches:
// (B, Hk, capacity, D), as a ring buffer with `rolling`, or paged
// (num_blocks, block_size, Hk, D) with block_table (B, max_blocks) int32.
// cache_seqlens (B,) int32. sink_tokens: the first keys every later row sees;
// sinks (Hq,): learnable sink logits in the softmax denominator (lse includes
// them). num_splits 0 = the kernel chooses. chunk / chunk_shift as in
// local_attention_fwd, chunks counted from position 0 of each row's sequence
// (absolute positions, in every layout). Forward only.
TORCH_LIBRARY_FRAGMENT(longreach, m) {
  m.def(
      "local_attention_kvcache_fwd(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v, "
      "Tensor cache_seqlens, Tensor? block_table, Tensor? alibi_slopes, Tensor? sinks, int window_left, "
      "int window_right, int dilation, str score, float? sigmoid_bias, float softcap, float scale, int sink_tokens, "
      "bool rolling, int num_splits, int chunk=0, Tensor? chunk_shift=None) -> (Tensor out, Tensor lse)");
}

// Rotary position embedding. cos / sin are position-indexed tables
// (table_len, rot_dim / 2); position_ids is (B, L) or (1, L) int64, None means
// 0 .. L-1. One op serves both directions: the backward of a rotation is the
// same op with `conjugate` flipped (the inverse rotation), see common/rotary.h.
TORCH_LIBRARY_FRAGMENT(longreach, m) {
  m.def("apply_rotary(Tensor x, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved, "
        "bool conjugate) -> Tensor");
  m.def("apply_rotary_qk(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor? position_ids, bool interleaved, "
        "bool conjugate) -> (Tensor, Tensor)");
}

// Test hooks (CPU only): what the shared csrc/common window and tile-schedule
// math computes, so tests can compare it with longreach.reference.allowed_keys.
// Windows as in local_attention_fwd (-1 = unbounded).
TORCH_LIBRARY_FRAGMENT(longreach, m) {
  // Per row: [key_lo, key_hi] of window_key_range; per key: [row_lo, row_hi] of window_row_range.
  // chunk / chunk_phase (shift mod chunk): one head's chunk grid (common/geometry.h WindowSpec).
  m.def("_debug_window_ranges(int q_len, int k_len, int window_left, int window_right, int dilation, "
        "int chunk=0, int chunk_phase=0) "
        "-> (Tensor key_lo, Tensor key_hi, Tensor row_lo, Tensor row_hi)");
  // Non-empty class tiles of `tile` rows (or keys, by_keys=True): rows (cls, first, last, band_lo, band_hi).
  m.def("_debug_tile_bands(int q_len, int k_len, int window_left, int window_right, int dilation, int tile, "
        "bool by_keys) -> Tensor");
  // tile_in_window for each row (p_first, p_last, k_first, k_last) of `corners` (N, 4) int64.
  m.def("_debug_tile_in_window(int q_len, int k_len, int window_left, int window_right, int dilation, "
        "Tensor corners) -> Tensor");
  // The CPU tile kernels in use ("avx512+avx512_bf16"), and the bf16 dispatch rule (csrc/cpu/bf16_ops.h).
  m.def("_debug_cpu_kernels() -> str");
  m.def("_debug_bf16_choice(str env, str capability, bool cpu_has_bf16) -> str");
  // The AMX rule, and the emulated AMX table's self-check difference (broken: with a wrong tile op).
  m.def("_debug_amx_choice(str env, str bf16_choice, bool cpu_has_amx, bool os_grants_amx) -> str");
  m.def("_debug_amx_self_check(bool broken) -> float");
}
