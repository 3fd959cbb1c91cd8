// Host-side validation of the attention op's arguments and construction of
// AttentionParams. Shared by the CPU and CUDA entry points so both reject bad
// input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

#include "common/params.h"

namespace longreach {

// The options of sink tokens, learnable sinks and causal global tokens, as the
// ops' schemas take them (the last arguments of every attention op).
struct SinkOptions {
  bool causal = false;
  int64_t sink_tokens = 0;
  const c10::optional<at::Tensor>* sinks = nullptr;  // (Hq,) floating, or none
};

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& global_mask,
                                      const c10::optional<at::Tensor>& alibi_slopes,
                                      int64_t window_left, int64_t window_right, int64_t dilation,
                                      c10::string_view score, c10::optional<double> sigmoid_bias,
                                      double softcap, double scale,
                                      const c10::optional<at::Tensor>& key_padding_mask = c10::nullopt,
                                      const SinkOptions& sinks = SinkOptions{});

// The options every layout shares (window, score, soft-cap, scale, sigmoid
// bias, ALiBi), checked against P's lengths and heads, which must be set;
// `batch_name` is what the slopes' first dimension counts ("B", "num_seqs").
void set_options(AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& alibi_slopes,
                 const char* batch_name, int64_t window_left, int64_t window_right, int64_t dilation,
                 c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale,
                 const SinkOptions& sinks = SinkOptions{});

// Chunked attention (docs/semantics.md "Chunks"): checks chunk >= 0 and
// chunk_shift (None, or an int32/int64 (Hq,) tensor on q's device, only with
// chunk > 0) and returns each query head's shift modulo chunk (its phase, read
// on the host: a device sync on CUDA), or an empty vector when chunk is 0.
// `owner` names the op in the messages.
std::vector<int64_t> chunk_phases(const at::Tensor& q, int64_t q_heads, int64_t chunk,
                                  const c10::optional<at::Tensor>& chunk_shift,
                                  const char* owner = "local_attention");

// dropout_p in [0, 1] and its (seed, offset) int64 (2,) CPU tensor (the ops'
// last two arguments; a seed is required when dropout_p > 0) into P.dropout.
void set_dropout(AttentionParams& P, double dropout_p, const c10::optional<at::Tensor>& dropout_seed);

// Number of real (unpadded) keys per batch row of a (B, Lk) key_padding_mask,
// int64 (B,) on the mask's device: what the default sigmoid bias counts.
at::Tensor present_key_counts(const at::Tensor& key_padding_mask);

// A packed (varlen) batch: flash-attn's layout, q (total_q, Hq, D), k and v
// (total_k, Hk, D), sequence i at rows cu_seqlens[i] .. cu_seqlens[i + 1].
// params.batch is the number of sequences, params.q_len / k_len the max_seqlen
// arguments (checked to bound every sequence); one SequenceView per sequence.
struct VarlenProblem {
  AttentionParams params;
  std::vector<SequenceView> seqs;
};

VarlenProblem make_varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const c10::optional<at::Tensor>& global_mask,
                                 const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                 int64_t window_right, int64_t dilation, c10::string_view score,
                                 c10::optional<double> sigmoid_bias, double softcap, double scale,
                                 const SinkOptions& sinks = SinkOptions{});

// lse's shape: (B, Hq, Lq) for a dense q (B, Hq, Lq, D), (Hq, total_q) for a packed q (total_q, Hq, D).
inline std::vector<int64_t> lse_shape(const at::Tensor& q) {
  if (q.dim() == 3) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(1), q.size(2)};
}

// The log-sum-exp is kept in the accumulation type: float64 for float64
// inputs (so gradcheck sees exact gradients), float32 otherwise.
inline at::ScalarType lse_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// Checks for the extra tensors the backward receives (shapes must match the forward's).
void check_backward_inputs(const AttentionParams& P, const at::Tensor& q, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse,
                           const c10::optional<at::Tensor>& grad_lse, bool alibi_grad);

// The backward's grad_alibi_slopes: (B, Hq) float32 on q's device when
// alibi_grad (the kernels write every element), else an empty (0,) tensor.
at::Tensor alibi_slopes_grad_buffer(const AttentionParams& P, const at::Tensor& q, bool alibi_grad);

// The sink logits in the accumulation type (lse_dtype), contiguous (Hq,);
// undefined without sinks.
at::Tensor sink_logits(const AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& sinks);

// The backward's d loss / d sinks before the cast to sinks' dtype: zeros (Hq,)
// in the accumulation type with sinks, else an empty (0,) float32 tensor.
at::Tensor sinks_grad_buffer(const AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& sinks);

}  // namespace longreach
