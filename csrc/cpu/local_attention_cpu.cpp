// CPU entry points of longreach::local_attention (dense (B, H, L, D) batches)
// and local_attention_varlen (packed (total, H, D) sequences): they check the
// arguments, build the TilePlan, allocate the outputs and run the kernels
// (attention_forward.cpp, attention_backward.cpp); TORCH_LIBRARY_IMPL
// registration.
//
// Flash-style and O(L * keys per row). Work is cut into RowChunks (tile_plan.h):
// runs of blocks of 64 query rows of one (batch, kv head, residue class). A
// chunk packs the keys its blocks read once (key_operands.h) and serves every
// query head of its GQA group. Each block visits the span of keys its windows
// cover, then the global keys outside the band, in score tiles banded by each
// row's run of keys (tile_runs.h), on the vector kernels of tile_ops.h. The
// pieces, one job each:
//
//   attention_rows.h      buffers, a head's rows and statistics, dtype conversions, parallel_items
//   key_operands.h        a chunk's or a block's keys packed as the products' operands
//   tile_runs.h           score tiles: which keys each row sees, masks and score transforms
//   block_scratch.h       the per-thread scratch of the tile loops, loading a block's rows
//   attention_forward.*   the forward kernel
//   attention_backward.*  the backward kernel and its deterministic gradient reductions
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "../attention_params.h"
#include "../chunk_heads.h"
#include "attention_backward.h"
#include "attention_forward.h"
#include "attention_rows.h"
#include "tile_plan.h"

namespace longreach::cpu {
namespace {

using detail::with_contiguous_rows;

// Longest chunk, in blocks of rows. The forward packs a chunk's K^T up front,
// then every block rereads its span of it: at 16 blocks ((1024 + window) keys,
// about 400 KiB for a 511-key window at D = 64) it is still in L2 when read;
// at 64 blocks two threads at L = 32768 ran ~15% slower (the packed keys had
// left L2). The backward keeps 64: its chunks sum their key gradients at the
// end, and more, shorter chunks made it ~15% slower (measured 2 threads, L =
// 32768, window (511, 0), D = 64).
constexpr int64_t kForwardChunkBlocks = 16;
constexpr int64_t kBackwardChunkBlocks = 64;

// The forward of any layout, once P and its sequence views are checked: a dense
// batch (q (B, Hq, Lq, D), lse (B, Hq, Lq)) or a packed one (q (total_q, Hq, D),
// lse (Hq, total_q)).
std::tuple<at::Tensor, at::Tensor> run_forward(const AttentionParams& P, std::vector<SequenceView> seqs,
                                               const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const c10::optional<at::Tensor>& global_mask,
                                               const c10::optional<at::Tensor>& alibi_slopes,
                                               const c10::optional<at::Tensor>& key_padding_mask,
                                               const c10::optional<at::Tensor>& sinks) {
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const auto lse_options = q.options().dtype(lse_dtype(q.scalar_type()));
  const auto out_options = q.options().memory_format(at::MemoryFormat::Contiguous);
  const double empty_lse = -std::numeric_limits<double>::infinity();
  const at::Tensor sink = sink_logits(P, q, sinks);
  if (q.numel() == 0 || k.numel() == 0) {  // no key at all: zeros and lse = -inf (the sink's logit with sinks)
    at::Tensor lse = at::full(lse_shape(q), empty_lse, lse_options);
    if (sink.defined() && lse.numel() > 0) lse.copy_(q.dim() == 3 ? sink.view({-1, 1}) : sink.view({1, -1, 1}));
    return {at::zeros(q.sizes(), out_options), lse};
  }
  // The kernel writes every row of out and lse, except rows at padded
  // positions (in no block): those are zeros with the lse of a row without keys.
  at::Tensor out = P.has_key_padding ? at::zeros(q.sizes(), out_options) : at::empty(q.sizes(), out_options);
  at::Tensor lse = P.has_key_padding ? at::full(lse_shape(q), empty_lse, lse_options) : at::empty(lse_shape(q), lse_options);
  const TilePlan plan(P, std::move(seqs), global_mask, key_padding_mask, kForwardChunkBlocks);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  attention_forward(P, plan, q, k, v, slopes, sink, out, lse);
  return {out, lse};
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Gradients run_backward(
    const AttentionParams& P, std::vector<SequenceView> seqs, const at::Tensor& grad_out_in,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, bool alibi_grad,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& sinks) {
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse, grad_lse, alibi_grad);
  at::Tensor dslopes = alibi_slopes_grad_buffer(P, q_in, alibi_grad);
  at::Tensor dsinks = sinks_grad_buffer(P, q_in, sinks);
  // grad_sinks comes back in sinks' dtype (gpt-oss keeps them in the model dtype).
  auto sinks_grad = [&] { return P.has_sinks ? dsinks.to(sinks->scalar_type()) : dsinks; };
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in), out = with_contiguous_rows(out_in);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options().memory_format(contiguous)),
            at::zeros(k.sizes(), k.options().memory_format(contiguous)),
            at::zeros(v.sizes(), v.options().memory_format(contiguous)), dslopes.zero_(),
            // rows without keys: lse = sink, p_sink = 1 and out = 0, so d sink = sum of dlse
            P.has_sinks && grad_lse.has_value() && grad_lse->numel() > 0
                ? grad_lse->to(dsinks.scalar_type()).sum(q.dim() == 3 ? at::IntArrayRef{1} : at::IntArrayRef{0, 2})
                      .to(sinks->scalar_type())
                : sinks_grad()};
  }
  // The kernel writes every row of dq, dk and dv, except the dq rows at padded positions.
  at::Tensor dq = P.has_key_padding ? at::zeros(q.sizes(), q.options().memory_format(contiguous))
                                    : at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(contiguous));
  const TilePlan plan(P, std::move(seqs), global_mask, key_padding_mask, kBackwardChunkBlocks);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  const at::Tensor sink = sink_logits(P, q, sinks);
  attention_backward(P, plan, grad_out, grad_lse, q, k, v, out, lse, slopes, sink, dq, dk, dv,
                     alibi_grad ? &dslopes : nullptr, P.has_sinks ? &dsinks : nullptr);
  return {dq, dk, dv, dslopes, sinks_grad()};
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_impl(
    const DropoutHeads& heads, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, int64_t sink_tokens,
    const c10::optional<at::Tensor>& sinks, int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  AttentionParams P =
      make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation, score,
                            sigmoid_bias, softcap, scale, key_padding_mask, SinkOptions{causal, sink_tokens, &sinks});
  set_dropout(P, dropout_p, dropout_seed);
  set_dropout_heads(P, heads);
  const std::vector<ShiftGroup> groups = chunk_grids(P, q, chunk, chunk_shift);
  if (!groups.empty()) {  // heads with different chunk grids: one call per grid (chunk_heads.h)
    return forward_by_shift(groups, q, k, v, alibi_slopes, sinks, 1,
                            [&](const ShiftGroup& g, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& vg,
                                const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
                              return local_attention_fwd_impl(dropout_heads_of(g, P), qg, kg, vg, global_mask, sg, window_left, window_right,
                                                             dilation, score, sigmoid_bias, softcap, scale,
                                                             key_padding_mask, causal, sink_tokens, sinks_g, chunk,
                                                             group_shift(g, qg), dropout_p, dropout_seed);
                            });
  }
  return run_forward(P, dense_views(P), q, k, v, global_mask, alibi_slopes, key_padding_mask, sinks);
}

Gradients local_attention_bwd_impl(
    const DropoutHeads& heads, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, int64_t sink_tokens,
    const c10::optional<at::Tensor>& sinks, int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  AttentionParams P =
      make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation, score,
                            sigmoid_bias, softcap, scale, key_padding_mask, SinkOptions{causal, sink_tokens, &sinks});
  set_dropout(P, dropout_p, dropout_seed);
  set_dropout_heads(P, heads);
  const std::vector<ShiftGroup> groups = chunk_grids(P, q, chunk, chunk_shift);
  if (!groups.empty()) {
    check_backward_inputs(P, q, grad_out, out, lse, grad_lse, alibi_grad);
    return backward_by_shift(
        groups, grad_out, grad_lse, q, k, v, out, lse, alibi_slopes, sinks, 1,
        [&](const ShiftGroup& g, const at::Tensor& go, const c10::optional<at::Tensor>& gl, const at::Tensor& qg,
            const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& og, const at::Tensor& lg,
            const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
          return local_attention_bwd_impl(dropout_heads_of(g, P), go, gl, qg, kg, vg, og, lg, global_mask, sg, window_left, window_right,
                                         dilation, score, sigmoid_bias, softcap, scale, alibi_grad, key_padding_mask,
                                         causal, sink_tokens, sinks_g, chunk,
                                         group_shift(g, qg), dropout_p, dropout_seed);
        });
  }
  return run_backward(P, dense_views(P), grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad, key_padding_mask, sinks);
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_impl(
    const DropoutHeads& heads, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool causal, int64_t sink_tokens, const c10::optional<at::Tensor>& sinks, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                                       scale, SinkOptions{causal, sink_tokens, &sinks});
  set_dropout(V.params, dropout_p, dropout_seed);
  set_dropout_heads(V.params, heads);
  const std::vector<ShiftGroup> groups = chunk_grids(V.params, q, chunk, chunk_shift);
  if (!groups.empty()) {  // one call per chunk grid (chunk_heads.h); lse is (Hq, total_q)
    return forward_by_shift(groups, q, k, v, alibi_slopes, sinks, 0,
                            [&](const ShiftGroup& g, const at::Tensor& qg, const at::Tensor& kg, const at::Tensor& vg,
                                const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
                              return local_attention_varlen_fwd_impl(dropout_heads_of(g, V.params), 
                                  qg, kg, vg, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask, sg,
                                  window_left, window_right, dilation, score, sigmoid_bias, softcap, scale, causal,
                                  sink_tokens, sinks_g, chunk, group_shift(g, qg), dropout_p, dropout_seed);
                            });
  }
  return run_forward(V.params, std::move(V.seqs), q, k, v, global_mask, alibi_slopes, c10::nullopt, sinks);
}

Gradients local_attention_varlen_bwd_impl(
    const DropoutHeads& heads, const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool alibi_grad, bool causal, int64_t sink_tokens, const c10::optional<at::Tensor>& sinks,
    int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                                       scale, SinkOptions{causal, sink_tokens, &sinks});
  set_dropout(V.params, dropout_p, dropout_seed);
  set_dropout_heads(V.params, heads);
  const std::vector<ShiftGroup> groups = chunk_grids(V.params, q, chunk, chunk_shift);
  if (!groups.empty()) {
    check_backward_inputs(V.params, q, grad_out, out, lse, grad_lse, alibi_grad);
    return backward_by_shift(
        groups, grad_out, grad_lse, q, k, v, out, lse, alibi_slopes, sinks, 0,
        [&](const ShiftGroup& g, const at::Tensor& go, const c10::optional<at::Tensor>& gl, const at::Tensor& qg,
            const at::Tensor& kg, const at::Tensor& vg, const at::Tensor& og, const at::Tensor& lg,
            const c10::optional<at::Tensor>& sg, const c10::optional<at::Tensor>& sinks_g) {
          return local_attention_varlen_bwd_impl(dropout_heads_of(g, V.params), go, gl, qg, kg, vg, og, lg, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, global_mask, sg, window_left, window_right, dilation,
                                                score, sigmoid_bias, softcap, scale, alibi_grad, causal, sink_tokens,
                                                sinks_g, chunk,
                                                group_shift(g, qg), dropout_p, dropout_seed);
        });
  }
  return run_backward(V.params, std::move(V.seqs), grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad, c10::nullopt, sinks);
}

// The registered kernel of an entry above: the whole call (every head), i.e.
// Impl(DropoutHeads{}, args...), Impl's other parameters being the schema's,
// so the four long signatures are written once.
template <auto Impl>
struct WholeCall;
template <typename R, typename... Args, R (*Impl)(const DropoutHeads&, Args...)>
struct WholeCall<Impl> {
  static R run(Args... args) { return Impl(DropoutHeads{}, args...); }
};

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("local_attention_fwd", &WholeCall<&local_attention_fwd_impl>::run);
  m.impl("local_attention_bwd", &WholeCall<&local_attention_bwd_impl>::run);
  m.impl("local_attention_varlen_fwd", &WholeCall<&local_attention_varlen_fwd_impl>::run);
  m.impl("local_attention_varlen_bwd", &WholeCall<&local_attention_varlen_bwd_impl>::run);
}

}  // namespace longreach::cpu
