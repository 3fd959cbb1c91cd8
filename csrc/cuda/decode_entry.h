// The host logic of the CUDA decode entry point (kvcache_cuda.cpp), shared
// with the host emulation (tests/emulation/decode_emulation.cpp) through a
// Backend that runs the blocks:
//   template <T> void decode(const DecodeArgs<T>&);  // decode blocks, then the merge when n_splits > 1
//   int64_t multiprocessors();                        // for the split heuristic
// The checks and the append are the CPU op's (kvcache_params.cpp), so both
// devices reject bad input with the same messages and a rejected call leaves
// the cache as it was.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "../attention_params.h"
#include "../kvcache_params.h"
#include "attention_entry.h"
#include "decode_blocks.cuh"

namespace longreach::cuda_kernels {

// Splits per unit for num_splits = 0 (docs/cuda.md "Decoding"): enough blocks
// to fill every SM once when the units alone cannot (units < SMs), but no
// split of fewer than 256 class keys (a split costs a partial row and a share
// of the merge), and at most kDecodeMaxSplits. A given num_splits is taken as
// is, capped at kDecodeMaxSplits (it changes only the order of the sums).
inline int64_t decode_splits(int64_t asked, int64_t units, int64_t longest_span, int64_t multiprocessors) {
  if (asked > 0) return std::min(asked, kDecodeMaxSplits);
  if (units <= 0 || units >= multiprocessors) return 1;
  const int64_t fill = (multiprocessors + units - 1) / units;
  return std::max<int64_t>(1, std::min({fill, longest_span / 256, kDecodeMaxSplits}));
}

// The most class keys any unit's rows span: the window's reach (or the chunk)
// plus the rows, over dilation, at most the longest row's keys (an upper
// bound of decode_block's n; only the heuristic uses it).
inline int64_t decode_longest_span(const KvCacheProblem& pr) {
  const AttentionParams& P = pr.params;
  const WindowSpec& w = P.window;
  int64_t reach = (w.left + w.right) * w.dilation + P.q_len;
  if (w.chunk > 0) reach = std::min(reach, w.chunk + P.q_len);
  return std::min(reach, P.k_len) / w.dilation + 1;
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> kvcache_forward(
    Backend& backend, const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache,
    const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& alibi_slopes,
    const c10::optional<at::Tensor>& sinks, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale, int64_t sink_tokens,
    bool rolling, int64_t num_splits, int64_t chunk, const c10::optional<at::Tensor>& chunk_shift) {
  const KvCacheProblem pr =
      make_kvcache_params(q_in, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks, window_left,
                          window_right, dilation, score, sigmoid_bias, softcap, scale, sink_tokens, rolling, num_splits,
                          chunk, chunk_shift);
  check_cuda_inputs(q_in, "local_attention_with_kvcache (CUDA)");  // before the append: a rejected call writes nothing
  if (pr.append) append_to_cache(pr, k_cache, v_cache, *k, *v);
  const AttentionParams& P = pr.params;
  const at::Tensor q = with_contiguous_rows(q_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_shape(q), q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};

  std::vector<int64_t> lens(P.batch);
  for (int64_t b = 0; b < P.batch; ++b) lens[b] = pr.rows[b].k_len;
  const at::Tensor k_lens = at::tensor(lens, at::kLong).to(q.device());
  const at::Tensor phases =
      P.window.chunk > 0 ? at::tensor(pr.chunk_phases, at::kLong).to(q.device()) : at::Tensor();
  const at::Tensor table = pr.cache.layout == CacheLayout::kPaged
                               ? at::tensor(pr.block_table, at::kLong).to(q.device())
                               : at::Tensor();
  at::Tensor slopes;
  if (alibi_slopes.has_value()) slopes = alibi_slopes->to(q.device(), at::kFloat).contiguous();
  const at::Tensor sink = sink_logits(P, q, sinks);  // float32 (Hq,) or undefined

  const int64_t d = P.window.dilation, Lq = P.q_len;
  const int64_t classes = std::min(d, Lq);
  const int64_t row_chunks = (P.group_size() * ((Lq + d - 1) / d) + kDecodeRows - 1) / kDecodeRows;
  const int64_t units = P.kv_heads * classes * row_chunks;
  const int64_t n_splits = decode_splits(pr.num_splits, units * P.batch, decode_longest_span(pr),
                                         backend.multiprocessors());
  at::Tensor partial;
  if (n_splits > 1) {
    partial = at::empty({P.batch * P.q_heads * Lq, n_splits, P.head_dim + 2}, q.options().dtype(at::kFloat));
  }
  dispatch_cuda_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    DecodeArgs<T> a{};
    a.P = P;
    const CacheAddress base{pr.cache, 0, 0, 0, table.defined() ? table.data_ptr<int64_t>() : nullptr, pr.max_blocks};
    a.kc = base;
    a.kc.s0 = k_cache.stride(0), a.kc.s1 = k_cache.stride(1), a.kc.s2 = k_cache.stride(2);
    a.vc = base;
    a.vc.s0 = v_cache.stride(0), a.vc.s1 = v_cache.stride(1), a.vc.s2 = v_cache.stride(2);
    a.q = reinterpret_cast<const T*>(q.const_data_ptr());
    a.q_sb = q.stride(0), a.q_sh = q.stride(1), a.q_sl = q.stride(2);
    a.k = reinterpret_cast<const T*>(k_cache.const_data_ptr());
    a.v = reinterpret_cast<const T*>(v_cache.const_data_ptr());
    a.k_lens = k_lens.data_ptr<int64_t>();
    a.chunk_phases = phases.defined() ? phases.data_ptr<int64_t>() : nullptr;
    a.slopes = slopes.defined() ? slopes.data_ptr<float>() : nullptr;
    a.slope_sb = slopes.defined() && slopes.dim() == 2 ? slopes.stride(0) : 0;
    a.slope_sh = slopes.defined() ? slopes.stride(-1) : 0;
    a.sinks = sink.defined() ? sink.data_ptr<float>() : nullptr;
    a.out = reinterpret_cast<T*>(out.data_ptr());
    a.lse = lse.data_ptr<float>();
    a.partial = partial.defined() ? partial.data_ptr<float>() : nullptr;
    a.n_splits = n_splits;
    a.classes = classes;
    a.row_chunks = row_chunks;
    backend.template decode<T>(a);
  });
  return {out, lse};
}

}  // namespace longreach::cuda_kernels
