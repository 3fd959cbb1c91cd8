// longreach's public C++ (LibTorch) API: plain C++ functions over the same
// dispatcher ops torch.ops.longreach.* that the Python package calls, with the
// Python API's defaults (docs/cpp.md). local_attention, local_attention_varlen
// and apply_rotary are differentiable: each runs inside a C++
// torch::autograd::Function, so a C++ training loop gets gradients without
// Python. Link liblongreach.so (find_package(longreach), target
// longreach::longreach); it has no Python symbols.
//
// Argument checks and the semantics (docs/semantics.md) are the ops' own: bad
// input raises c10::ValueError / c10::TypeError (std::exception subclasses)
// naming the argument, as in Python.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace longreach {

// The keyword options of longreach.local_attention and local_attention_varlen.
// window_left / window_right count dilated steps; -1 means unbounded (Python's
// None); causal=true forces window_right = 0.
struct AttentionOptions {
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool causal = false;
  int64_t dilation = 1;
  std::optional<at::Tensor> global_mask;       // (B, Lk) bool; varlen: (total_k,)
  std::optional<at::Tensor> alibi_slopes;      // (Hq,) or (B, Hq) float32; differentiable
  std::string score = "softmax";               // or "sigmoid"
  std::optional<double> sigmoid_bias;          // nullopt: -ln(window size)
  std::optional<double> softcap;               // nullopt: no soft-capping
  std::optional<double> scale;                 // nullopt: D ** -0.5
  std::optional<at::Tensor> key_padding_mask;  // (B, Lk) bool, true = padding (dense op only)
  int64_t sink_tokens = 0;
  std::optional<at::Tensor> sinks;             // (Hq,) learnable sink logits; differentiable
  int64_t chunk = 0;                           // > 0: a row sees window keys of its own chunk only
  std::optional<at::Tensor> chunk_shift;       // (Hq,) int32/int64 per-head chunk offsets (chunk > 0)
  double dropout_p = 0.0;                      // attention dropout of the weights (training)
  std::optional<at::Tensor> dropout_seed;      // (2,) int64 CPU (seed, offset); nullopt: drawn from
                                               // the default CPU generator per call, as Python does

  // Chainable setters, so `AttentionOptions().window(64, 0).causal(true)` reads like Python.
  AttentionOptions& window(int64_t left, int64_t right) { window_left = left; window_right = right; return *this; }
};

// q (B, Hq, Lq, D); k, v (B, Hk, Lk, D). Returns (B, Hq, Lq, D).
at::Tensor local_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const AttentionOptions& options = {});
// The same, and the row log-sum-exp (B, Hq, Lq) (softmax only; Python's return_lse=True).
std::tuple<at::Tensor, at::Tensor> local_attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const AttentionOptions& options = {});

// Packed batches in flash-attn's layout: q (total_q, Hq, D), k / v (total_k, Hk, D),
// cu_seqlens_* (num_seqs + 1,) int32 or int64. Returns (total_q, Hq, D) [and lse (Hq, total_q)].
at::Tensor local_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                  int64_t max_seqlen_k, const AttentionOptions& options = {});
std::tuple<at::Tensor, at::Tensor> local_attention_varlen_with_lse(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const AttentionOptions& options = {});

// Rotary embedding of x (B, H, L, D) from cos / sin tables (table_len, rot_dim / 2);
// position_ids (B, L) or (1, L) int64, nullopt = 0 .. L-1. Differentiable in x; unlike the
// Python op, cos and sin are constants here (a gradient asked of them raises).
at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const std::optional<at::Tensor>& position_ids = std::nullopt, bool interleaved = false);

// The options of longreach.local_attention_with_kvcache (forward only).
struct KvCacheOptions {
  std::optional<at::Tensor> k;               // (B, Hk, Lq, D) new keys, appended in place
  std::optional<at::Tensor> v;
  std::optional<at::Tensor> block_table;     // (B, max_blocks) int32: paged caches
  bool rolling = false;                      // the caches are ring buffers
  int64_t window_left = -1;
  int64_t window_right = -1;
  bool causal = false;
  int64_t dilation = 1;
  std::optional<at::Tensor> alibi_slopes;
  std::string score = "softmax";
  std::optional<double> sigmoid_bias;
  std::optional<double> softcap;
  std::optional<double> scale;
  int64_t sink_tokens = 0;
  std::optional<at::Tensor> sinks;
  int64_t num_splits = 0;                    // 0: the kernel chooses
  int64_t chunk = 0;                         // chunks counted from position 0 of each sequence
  std::optional<at::Tensor> chunk_shift;     // (Hq,) int32/int64, with chunk > 0
};

// Decoding against a KV cache: q (B, Hq, Lq, D); caches (B, Hk, capacity, D) or paged;
// cache_seqlens (B,) int32. Returns (out, lse). Not differentiable (inference).
std::tuple<at::Tensor, at::Tensor> local_attention_with_kvcache(const at::Tensor& q, at::Tensor& k_cache,
                                                                at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                                const KvCacheOptions& options = {});

}  // namespace longreach
