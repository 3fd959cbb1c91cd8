// The host logic of the CUDA attention entry points, parameterised by a
// Backend that runs the blocks: the CUDA backend (local_attention_cuda.cu)
// launches kernels on the current stream, the host emulation
// (tests/emulation/) runs the same block functions in a loop. Both share the
// argument checks, allocations, global-token lists, row constants and the
// split of a call by chunk grid (chunk_heads.h, as on CPU) here.
//
// A Backend provides, for T in {c10::Half, c10::BFloat16, float}:
//   template <T> void forward(const AttentionArgs<T, float>&);
//   template <T> void backward(const AttentionArgs<T, float>&);   // dQ pass, then dK/dV pass
//   at::Tensor row_dot(P, grad_out, out, grad_lse);               // (B, Hq, Lq) float32, dense batches
//   int64_t multiprocessors();             // SMs of the device (dkv_split_by_query_head)
//   at::Tensor unfilled(sizes, options);   // an output the kernels write in full: at::empty on the
//                                          // device; the host emulation fills it with NaN, so an
//                                          // element no block writes fails its tests
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../attention_params.h"
#include "../chunk_heads.h"
#include "../dtype_names.h"
#include "attention_launch.h"

namespace longreach::cuda_kernels {

// What the CUDA kernels support beyond the shared checks: float16, bfloat16
// and float32 (docs/semantics.md: no float64 on CUDA), head dims up to 256.
inline void check_cuda_inputs(const at::Tensor& q, const char* owner = "local_attention (CUDA)") {
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, owner, ": q has dtype ",
              dtype_name(q.scalar_type()), "; the CUDA kernels support float16, bfloat16 and float32 (use float32, or run float64 on CPU)");
  TORCH_CHECK_VALUE(q.size(-1) <= 256, owner, ": head dim ", q.size(-1), " is not supported; expected 1 .. 256");
}

// The kernels' masks compare indices within a sequence in 32 bits
// (attention_blocks.cuh TileSide ranges), so sequences must be shorter than
// 2^31 (the CPU kernels have no such bound). Checked before any allocation.
inline void check_cuda_lengths(const AttentionParams& P) {
  TORCH_CHECK_VALUE(P.q_len <= kMaxCudaSeqLen && P.k_len <= kMaxCudaSeqLen,
                    "local_attention (CUDA): sequence lengths Lq = ", P.q_len, ", Lk = ", P.k_len,
                    " exceed the CUDA kernels' 32-bit index range; expected at most ", kMaxCudaSeqLen,
                    " (2^31 - 1) each (the CPU kernels take longer sequences)");
}

template <typename F>
void dispatch_cuda_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kFloat:
      f(float{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "local_attention (CUDA): unsupported dtype ", dtype_name(dt));
  }
}

// FlashAttention-2's GQA / MQA backward. The dK/dV grid has one block per (key
// block, kv head, batch element), each walking the G = Hq / Hk query heads of
// its group in turn; with few kv heads that grid can be too small to fill the
// GPU. When it holds fewer than two waves (blocks < 2 x SMs; at 58-99 KiB of
// shared memory per block, about one block is resident per SM) and G > 1, the
// grid gets one block per query head instead (G times the blocks, each 1/G of
// the work), writing float32 parts that the host sums per group (at::sum: no
// atomics, deterministic; it costs 2 x B x Hq x Lk x D float32 of memory and a
// different float32 summation order than the shared-memory sum).
// LONGREACH_CUDA_DKV_SPLIT=1 / 0 forces the split on / off (the tests run both).
inline bool dkv_split_by_query_head(const AttentionParams& P, int64_t key_blocks_per_head, int64_t multiprocessors) {
  if (P.group_size() <= 1) return false;
  const char* force = std::getenv("LONGREACH_CUDA_DKV_SPLIT");
  if (force != nullptr && std::strcmp(force, "1") == 0) return true;
  if (force != nullptr && std::strcmp(force, "0") == 0) return false;
  return key_blocks_per_head * P.kv_heads * P.batch < 2 * multiprocessors;
}

// Key blocks per (kv head, batch element) of the dK/dV grid for element type T.
template <typename T>
int64_t dkv_key_blocks(const AttentionParams& P) {
  int64_t n = 0;
  dispatch_head_dim(P.head_dim, [&](auto dmax) { n = key_blocks(P, TileShape<T, decltype(dmax)::value>::kDkvN); });
  return n;
}

// The learnable sinks of a SinkOptions (none when it holds no pointer).
inline c10::optional<at::Tensor> sinks_of(const SinkOptions& so) {
  return so.sinks != nullptr ? *so.sinks : c10::nullopt;
}

// The forward of either layout, once P is checked: `packed` null for a dense
// batch, else the sequences' starts (cu_seqlens as int64 on q's device).
template <typename Backend>
std::tuple<at::Tensor, at::Tensor> run_forward(Backend& backend, const AttentionParams& P, const PackedSeqs* packed,
                                               const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const c10::optional<at::Tensor>& global_mask,
                                               const c10::optional<at::Tensor>& alibi_slopes,
                                               const c10::optional<at::Tensor>& key_padding_mask = c10::nullopt,
                                               const c10::optional<at::Tensor>& sinks = c10::nullopt) {
  check_cuda_lengths(P);
  check_cuda_inputs(q_in);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  // Every row of a launch is in exactly one block, which writes its out and
  // lse (zeros and -inf, or the sink, for a row without allowed keys), so no
  // memset is needed, except for rows no block visits: query rows at padded
  // positions (out 0, lse -inf), and every row when no kernel runs.
  const bool launched = q.numel() > 0 && k.numel() > 0;
  const bool every_row_written = launched && !key_padding_mask.has_value();
  const auto out_options = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = every_row_written ? backend.unfilled(q.sizes(), out_options) : at::zeros(q.sizes(), out_options);
  at::Tensor lse = every_row_written
                       ? backend.unfilled(lse_shape(q), q.options().dtype(at::kFloat))
                       : at::full(lse_shape(q), -std::numeric_limits<double>::infinity(), q.options().dtype(at::kFloat));
  const at::Tensor sink = sink_logits(P, q, sinks);  // float32 (Hq,) or undefined
  // A row without keys (no block visits it) has lse = its head's sink logit.
  // A query row at a padded position is in no block and keeps lse = -inf (as on CPU).
  if (sink.defined() && !every_row_written) {
    lse.copy_(q.dim() == 3 ? sink.view({-1, 1}) : sink.view({1, -1, 1}));
    if (key_padding_mask.has_value()) {
      const int64_t lq = P.q_len, lk = P.k_len;  // rows sit at positions lk - lq .. lk - 1
      at::Tensor rows = key_padding_mask->to(at::kBool).narrow(1, std::max<int64_t>(lk - lq, 0), std::min(lq, lk));
      if (lq > lk) rows = at::cat({at::zeros({rows.size(0), lq - lk}, rows.options()), rows}, 1);
      lse.masked_fill_(rows.unsqueeze(1), -std::numeric_limits<double>::infinity());
    }
  }
  if (!launched) return {out, lse};
  const KeyPaddingTensors padding = make_key_padding(key_padding_mask);
  const GlobalTokenTensors g = make_global_tokens(P, packed, global_mask, padding);
  dispatch_cuda_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T, float> a =
        make_attention_args<T, float>(P, packed, q, k, v, at::Tensor(), alibi_slopes, g, padding);
    a.out = head_tensor<T>(out, packed ? packed->q_starts() : nullptr);
    a.lse = lse.data_ptr<float>();
    a.sinks = sink.defined() ? sink.data_ptr<float>() : nullptr;
    backend.template forward<T>(a);
  });
  return {out, lse};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    Backend& backend, const AttentionParams& P, const PackedSeqs* packed, const at::Tensor& grad_out_in,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, bool alibi_grad,
    const c10::optional<at::Tensor>& key_padding_mask = c10::nullopt,
    const c10::optional<at::Tensor>& sinks = c10::nullopt) {
  check_cuda_lengths(P);
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse_in, grad_lse, alibi_grad);
  // Per-row d loss / d sink (AttentionArgs::sink_grad), laid out like lse,
  // summed per head and cast to sinks' dtype (gpt-oss keeps them in the model dtype).
  at::Tensor sink_rows = P.has_sinks ? at::zeros(lse_shape(q_in), q_in.options().dtype(at::kFloat)) : at::Tensor();
  const std::vector<int64_t> row_dims = q_in.dim() == 3 ? std::vector<int64_t>{1} : std::vector<int64_t>{0, 2};
  auto sinks_grad = [&] {
    if (!P.has_sinks) return sinks_grad_buffer(P, q_in, sinks);
    return sink_rows.sum(row_dims).to(sinks->scalar_type());
  };
  // Per-row partial sums of the slope gradient, laid out like lse (see
  // AttentionArgs::slope_grad), summed per problem below.
  at::Tensor slope_rows = alibi_grad ? at::zeros(lse_shape(q_in), q_in.options().dtype(at::kFloat)) : at::Tensor();
  auto slopes_grad = [&] {
    if (!alibi_grad) return alibi_slopes_grad_buffer(P, q_in, false);
    return packed ? packed->sum_per_sequence(slope_rows) : slope_rows.sum(-1);
  };
  check_cuda_inputs(q_in);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in);
  // Each row's dQ and each key's dK / dV (summed over its GQA group inside the
  // block) is written by exactly one block, zeros where nothing is allowed;
  // only padded rows and keys are in no block and need the zero fill, as do
  // all of them when no kernel runs. slope_rows / sink_rows above stay zeroed:
  // only some of their rows are written.
  const bool launched = q.numel() > 0 && k.numel() > 0;
  const bool every_row_written = launched && !key_padding_mask.has_value();
  const auto contiguous = at::MemoryFormat::Contiguous;
  auto grad_buffer = [&](const at::Tensor& like) {
    const auto options = like.options().memory_format(contiguous);
    return every_row_written ? backend.unfilled(like.sizes(), options) : at::zeros(like.sizes(), options);
  };
  at::Tensor dq = grad_buffer(q), dk = grad_buffer(k), dv = grad_buffer(v);
  if (!launched) {
    // rows without keys: lse = sink, p_sink = 1 and out = 0, so d sink = sum of dlse
    if (P.has_sinks && grad_lse.has_value() && grad_lse->numel() > 0) sink_rows.copy_(*grad_lse);
    return {dq, dk, dv, slopes_grad(), sinks_grad()};
  }
  const at::Tensor lse = lse_in.contiguous();
  const bool softmax = P.score == ScoreKind::kSoftmax;
  at::Tensor row_dot;
  if (softmax) {
    const at::Tensor out = with_contiguous_rows(out_in);
    row_dot = packed ? packed_row_dot(grad_out, out, grad_lse) : backend.row_dot(P, grad_out, out, grad_lse);
  }
  const KeyPaddingTensors padding = make_key_padding(key_padding_mask);
  const GlobalTokenTensors g = make_global_tokens(P, packed, global_mask, padding);
  const at::Tensor sink = sink_logits(P, q, sinks);
  const int64_t* qs = packed ? packed->q_starts() : nullptr;
  const int64_t* ks = packed ? packed->k_starts() : nullptr;
  dispatch_cuda_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T, float> a =
        make_attention_args<T, float>(P, packed, q, k, v, grad_out, alibi_slopes, g, padding);
    a.dq = head_tensor<T>(dq, qs);
    a.dk = head_tensor<T>(dk, ks);
    a.dv = head_tensor<T>(dv, ks);
    a.lse = lse.data_ptr<float>();
    a.row_dot = softmax ? row_dot.data_ptr<float>() : nullptr;
    a.slope_grad = alibi_grad ? slope_rows.data_ptr<float>() : nullptr;
    a.sinks = sink.defined() ? sink.data_ptr<float>() : nullptr;
    a.sink_grad = sink.defined() ? sink_rows.data_ptr<float>() : nullptr;
    at::Tensor dk_part, dv_part;  // (.., Hq, ..) float32 shares of dk / dv
    if (dkv_split_by_query_head(P, dkv_key_blocks<T>(P), backend.multiprocessors())) {
      std::vector<int64_t> sizes = k.sizes().vec();
      sizes[1] = P.q_heads;  // heads are dim 1 of dense (B, H, L, D) and packed (total, H, D)
      const auto options = k.options().dtype(at::kFloat).memory_format(contiguous);
      dk_part = every_row_written ? backend.unfilled(sizes, options) : at::zeros(sizes, options);
      dv_part = every_row_written ? backend.unfilled(sizes, options) : at::zeros(sizes, options);
      a.dkv_per_query_head = true;
      a.dk_part = head_tensor<float>(dk_part, ks);
      a.dv_part = head_tensor<float>(dv_part, ks);
    }
    backend.template backward<T>(a);
    if (a.dkv_per_query_head) {  // sum each group's G query heads
      dk.copy_(dk_part.unflatten(1, {P.kv_heads, P.group_size()}).sum(2));
      dv.copy_(dv_part.unflatten(1, {P.kv_heads, P.group_size()}).sum(2));
    }
  });
  return {dq, dk, dv, slopes_grad(), sinks_grad()};
}

// The ops' last four arguments: chunked attention (chunk, chunk_shift) and
// attention dropout (dropout_p, dropout_seed), as the schemas take them.
struct ChunkDropoutOptions {
  int64_t chunk = 0;
  c10::optional<at::Tensor> chunk_shift;
  double dropout_p = 0.0;
  c10::optional<at::Tensor> dropout_seed;
  DropoutHeads heads;  // a chunk grid's call: its heads' indices in the whole call
};

// Checks the chunk and dropout options into P (the same checks and the same
// P.dropout as on CPU, so a dropout_seed gives the CPU op's mask) and returns
// the chunk grids (chunk_heads.h): empty when one grid (or none) serves every
// head, which is then in P.window.
inline std::vector<ShiftGroup> set_chunk_dropout(AttentionParams& P, const at::Tensor& q,
                                                 const ChunkDropoutOptions& cd) {
  set_dropout(P, cd.dropout_p, cd.dropout_seed);
  set_dropout_heads(P, cd.heads);
  return chunk_grids(P, q, cd.chunk, cd.chunk_shift);
}

// A shift group's call: one chunk grid; dropout keyed by the heads' indices in the whole call.
inline ChunkDropoutOptions group_options(const ChunkDropoutOptions& cd, const ShiftGroup& g, const at::Tensor& qg,
                                         const AttentionParams& whole) {
  return ChunkDropoutOptions{cd.chunk, group_shift(g, qg), cd.dropout_p, cd.dropout_seed, dropout_heads_of(g, whole)};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> attention_forward(Backend& backend, const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v, const c10::optional<at::Tensor>& global_mask,
                                                     const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                                     int64_t window_right, int64_t dilation, c10::string_view score,
                                                     c10::optional<double> sigmoid_bias, double softcap, double scale,
                                                     const c10::optional<at::Tensor>& key_padding_mask,
                                                     const SinkOptions& so = SinkOptions{},
                                                     const ChunkDropoutOptions& cd = ChunkDropoutOptions{}) {
  AttentionParams P = make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation,
                                            score, sigmoid_bias, softcap, scale, key_padding_mask, so);
  const std::vector<ShiftGroup> groups = set_chunk_dropout(P, q, cd);
  if (!groups.empty()) {  // heads with different chunk grids: one call per grid (chunk_heads.h)
    return forward_by_shift(groups, q, k, v, alibi_slopes, sinks_of(so), 1,
                            [&](const ShiftGroup& g, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& vg,
                                const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
                              return attention_forward(backend, qg, kg, vg, global_mask, sg, window_left, window_right,
                                                       dilation, score, sigmoid_bias, softcap, scale, key_padding_mask,
                                                       SinkOptions{so.causal, so.sink_tokens, &sinks_g},
                                                       group_options(cd, g, qg, P));
                            });
  }
  return run_forward(backend, P, nullptr, q, k, v, global_mask, alibi_slopes, key_padding_mask, sinks_of(so));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    Backend& backend, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool alibi_grad, const c10::optional<at::Tensor>& key_padding_mask,
    const SinkOptions& so = SinkOptions{}, const ChunkDropoutOptions& cd = ChunkDropoutOptions{}) {
  AttentionParams P = make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation,
                                            score, sigmoid_bias, softcap, scale, key_padding_mask, so);
  const std::vector<ShiftGroup> groups = set_chunk_dropout(P, q, cd);
  if (!groups.empty()) {
    check_backward_inputs(P, q, grad_out, out, lse, grad_lse, alibi_grad);
    return backward_by_shift(
        groups, grad_out, grad_lse, q, k, v, out, lse, alibi_slopes, sinks_of(so), 1,
        [&](const ShiftGroup& g, const at::Tensor& go, const c10::optional<at::Tensor>& gl, const at::Tensor& qg,
            const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& og, const at::Tensor& lg,
            const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
          return attention_backward(backend, go, gl, qg, kg, vg, og, lg, global_mask, sg, window_left, window_right,
                                    dilation, score, sigmoid_bias, softcap, scale, alibi_grad, key_padding_mask,
                                    SinkOptions{so.causal, so.sink_tokens, &sinks_g}, group_options(cd, g, qg, P));
        });
  }
  return run_backward(backend, P, nullptr, grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad, key_padding_mask, sinks_of(so));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> attention_varlen_forward(
    Backend& backend, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, const SinkOptions& so = SinkOptions{}, const ChunkDropoutOptions& cd = ChunkDropoutOptions{}) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias,
                                       softcap, scale, so);
  const std::vector<ShiftGroup> groups = set_chunk_dropout(V.params, q, cd);
  if (!groups.empty()) {  // one call per chunk grid; a packed lse is (Hq, total_q)
    return forward_by_shift(groups, q, k, v, alibi_slopes, sinks_of(so), 0,
                            [&](const ShiftGroup& g, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& vg,
                                const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
                              return attention_varlen_forward(
                                  backend, qg, kg, vg, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  global_mask, sg, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                                  scale, SinkOptions{so.causal, so.sink_tokens, &sinks_g}, group_options(cd, g, qg, V.params));
                            });
  }
  const PackedSeqs packed(cu_seqlens_q, cu_seqlens_k, q.size(0));
  return run_forward(backend, V.params, &packed, q, k, v, global_mask, alibi_slopes, c10::nullopt, sinks_of(so));
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_varlen_backward(
    Backend& backend, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool alibi_grad, const SinkOptions& so = SinkOptions{},
    const ChunkDropoutOptions& cd = ChunkDropoutOptions{}) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias,
                                       softcap, scale, so);
  const std::vector<ShiftGroup> groups = set_chunk_dropout(V.params, q, cd);
  if (!groups.empty()) {
    check_backward_inputs(V.params, q, grad_out, out, lse, grad_lse, alibi_grad);
    return backward_by_shift(
        groups, grad_out, grad_lse, q, k, v, out, lse, alibi_slopes, sinks_of(so), 0,
        [&](const ShiftGroup& g, const at::Tensor& go, const c10::optional<at::Tensor>& gl, const at::Tensor& qg,
            const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& og, const at::Tensor& lg,
            const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
          return attention_varlen_backward(backend, go, gl, qg, kg, vg, og, lg, cu_seqlens_q, cu_seqlens_k,
                                           max_seqlen_q, max_seqlen_k, global_mask, sg, window_left, window_right,
                                           dilation, score, sigmoid_bias, softcap, scale, alibi_grad,
                                           SinkOptions{so.causal, so.sink_tokens, &sinks_g}, group_options(cd, g, qg, V.params));
        });
  }
  const PackedSeqs packed(cu_seqlens_q, cu_seqlens_k, q.size(0));
  return run_backward(backend, V.params, &packed, grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad, c10::nullopt, sinks_of(so));
}

}  // namespace longreach::cuda_kernels
