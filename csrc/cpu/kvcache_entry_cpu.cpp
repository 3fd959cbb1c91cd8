// CPU entry point of longreach::local_attention_kvcache_fwd: check everything
// (kvcache_params.cpp), then append the new keys into the cache, then run the
// decode kernel (kvcache_attention.cpp). Nothing is written before the checks
// have passed, so a rejected call leaves the cache as it was.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "../attention_params.h"
#include "../kvcache_params.h"
#include "attention_rows.h"
#include "kvcache_attention.h"

namespace longreach::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> local_attention_kvcache_fwd_cpu(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, int64_t sink_tokens, bool rolling, int64_t num_splits, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift) {
  const KvCacheProblem pr =
      make_kvcache_params(q_in, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks, window_left,
                          window_right, dilation, score, sigmoid_bias, softcap, scale, sink_tokens, rolling, num_splits,
                          chunk, chunk_shift);
  if (pr.append) append_to_cache(pr, k_cache, v_cache, *k, *v);
  const at::Tensor q = detail::with_contiguous_rows(q_in);
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_shape(q), q.options().dtype(lse_dtype(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  const at::Tensor sink_logits = sinks.has_value() ? *sinks : at::Tensor();
  kvcache_attention_forward(pr, q, k_cache, v_cache, slopes, sink_logits, out, lse);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) { m.impl("local_attention_kvcache_fwd", &local_attention_kvcache_fwd_cpu); }

}  // namespace longreach::cpu
