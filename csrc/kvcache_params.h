// Host-side checks of the decode op (longreach::local_attention_kvcache_fwd)
// and the append of the new keys into the cache. Shared by the CPU and CUDA
// entry points: every argument is checked, and cache_seqlens / block_table
// read, before anything is written, so a rejected call leaves the cache as it
// was (docs/semantics.md, "KV caches").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "common/kv_cache.h"
#include "common/params.h"

namespace longreach {

struct KvCacheProblem {
  // batch, heads, head_dim, window, score options; q_len = Lq (the new rows),
  // k_len = the longest row's key count (the window and dilation clips cover it).
  AttentionParams params;
  CacheGeometry cache;
  // Per batch row: q_len = Lq, k_len = cache_seqlens[b] (+ Lq when new keys
  // are appended): rows sit at positions k_len - Lq .. k_len - 1.
  std::vector<SequenceView> rows;
  std::vector<int64_t> block_table;  // paged: (B, max_blocks) on the host, row-major
  int64_t max_blocks = 0;
  int64_t sink_tokens = 0;
  bool has_sinks = false;
  int64_t num_splits = 0;  // as given: 0 lets the kernel choose
  bool append = false;     // k and v given
  // Chunks (params.window.chunk > 0): each query head's shift modulo the chunk,
  // read on the host; the decode kernel takes them as per-head data (one call
  // serves every shift, unlike the training ops' call per chunk grid).
  std::vector<int64_t> chunk_phases;

  // The window of query head h: params.window with the head's chunk grid.
  WindowSpec head_window(int64_t h) const {
    WindowSpec w = params.window;
    if (w.chunk > 0) w.chunk_phase = chunk_phases[h];
    return w;
  }
};

KvCacheProblem make_kvcache_params(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v,
                                   const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                   const c10::optional<at::Tensor>& alibi_slopes,
                                   const c10::optional<at::Tensor>& sinks, int64_t window_left,
                                   int64_t window_right, int64_t dilation, c10::string_view score,
                                   c10::optional<double> sigmoid_bias, double softcap, double scale,
                                   int64_t sink_tokens, bool rolling, int64_t num_splits, int64_t chunk,
                                   const c10::optional<at::Tensor>& chunk_shift);

// Writes k / v (B, Hk, Lq, D) into the caches at positions cache_seqlens[b] ..
// + Lq - 1 of each row (through the layout's slots), with ATen ops: one
// index_put_ per cache on any device.
void append_to_cache(const KvCacheProblem& problem, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                     const at::Tensor& v);

}  // namespace longreach
