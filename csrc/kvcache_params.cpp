#include "kvcache_params.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "attention_params.h"
#include "common/window.h"
#include "dtype_names.h"

namespace longreach {
namespace {

constexpr const char* kOwner = "local_attention_with_kvcache";

bool is_attention_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_cache_tensor(const at::Tensor& c, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(c.scalar_type() == q.scalar_type(), kOwner, ": ", name, " must have q's dtype ",
                   dtype_name(q.scalar_type()), ", got ", dtype_name(c.scalar_type()));
  TORCH_CHECK_VALUE(c.device() == q.device(), kOwner, ": ", name, " is on ", c.device(), " but q is on ", q.device());
  // The cache is written in place and read in place: a copy would lose the append.
  TORCH_CHECK_VALUE(c.dim() == 4 && c.stride(3) == 1, kOwner, ": ", name,
                    " must be a 4-D tensor whose last dimension is contiguous, got shape ", c.sizes(), " and strides ",
                    c.strides());
}

// cache_seqlens (B,) int32, read on the host (a device sync on CUDA).
std::vector<int64_t> read_cache_seqlens(const at::Tensor& s, const at::Tensor& q) {
  const int64_t B = q.size(0);
  TORCH_CHECK_TYPE(s.scalar_type() == at::kInt, kOwner, ": cache_seqlens must be torch.int32, got ",
                   dtype_name(s.scalar_type()));
  TORCH_CHECK_VALUE(s.dim() == 1 && s.size(0) == B, kOwner, ": cache_seqlens must have shape (B,) = (", B,
                    ",), got ", s.sizes());
  TORCH_CHECK_VALUE(s.device() == q.device(), kOwner, ": cache_seqlens is on ", s.device(), " but q is on ",
                    q.device());
  const at::Tensor host = s.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> lens(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + B);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, kOwner, ": cache_seqlens must be >= 0, got ", lens[b], " at row ", b);
  }
  return lens;
}

// The used blocks of each row: inside the pool, no block twice within a row
// (two positions would share a slot).
std::vector<int64_t> read_block_table(const at::Tensor& t, const at::Tensor& q, int64_t num_blocks,
                                      int64_t block_size, const std::vector<int64_t>& totals) {
  const int64_t B = q.size(0);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOwner, ": block_table must be torch.int32, got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == B, kOwner, ": block_table must have shape (B, max_blocks) with B = ",
                    B, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOwner, ": block_table is on ", t.device(), " but q is on ",
                    q.device());
  const int64_t max_blocks = t.size(1);
  const at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
  std::vector<int64_t> table(host.data_ptr<int64_t>(), host.data_ptr<int64_t>() + B * max_blocks);
  std::vector<int64_t> used;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(totals[b] <= max_blocks * block_size, kOwner, ": row ", b, " needs ", totals[b],
                      " cache positions but block_table holds ", max_blocks, " blocks of ", block_size, " (",
                      max_blocks * block_size, " positions)");
    const int64_t n = (totals[b] + block_size - 1) / block_size;
    used.assign(table.begin() + b * max_blocks, table.begin() + b * max_blocks + n);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(used[i] >= 0 && used[i] < num_blocks, kOwner, ": block_table[", b, ", ", i, "] = ", used[i],
                        " is outside the cache's ", num_blocks, " blocks");
    }
    std::sort(used.begin(), used.end());
    const auto dup = std::adjacent_find(used.begin(), used.end());
    TORCH_CHECK_VALUE(dup == used.end(), kOwner, ": block_table row ", b, " uses block ",
                      dup == used.end() ? 0 : *dup, " twice; each position of a row needs its own slot");
  }
  return table;
}

}  // namespace

KvCacheProblem make_kvcache_params(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const c10::optional<at::Tensor>& k, const c10::optional<at::Tensor>& v,
                                   const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
                                   const c10::optional<at::Tensor>& alibi_slopes,
                                   const c10::optional<at::Tensor>& sinks, int64_t window_left,
                                   int64_t window_right, int64_t dilation, c10::string_view score,
                                   c10::optional<double> sigmoid_bias, double softcap, double scale,
                                   int64_t sink_tokens, bool rolling, int64_t num_splits, int64_t chunk,
                                   const c10::optional<at::Tensor>& chunk_shift) {
  TORCH_CHECK_VALUE(q.dim() == 4, kOwner, ": q must be a 4-D tensor (B, Hq, Lq, D), got shape ", q.sizes());
  TORCH_CHECK_TYPE(is_attention_dtype(q.scalar_type()), kOwner, ": q has dtype ", dtype_name(q.scalar_type()),
                   "; expected float32, float64, bfloat16 or float16");
  check_cache_tensor(k_cache, "k_cache", q);
  check_cache_tensor(v_cache, "v_cache", q);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), kOwner, ": k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  const bool paged = block_table.has_value();
  TORCH_CHECK_VALUE(!(paged && rolling), kOwner, ": a cache is either paged (block_table) or rolling, not both");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hk = paged ? k_cache.size(2) : k_cache.size(1);
  if (paged) {
    TORCH_CHECK_VALUE(k_cache.size(1) >= 1, kOwner, ": a paged k_cache (num_blocks, block_size, Hk, D) needs "
                      "block_size >= 1, got shape ", k_cache.sizes());
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) == B, kOwner, ": k_cache must be (B, Hk, capacity, D) with q's B = ", B,
                      " (or pass block_table for a paged (num_blocks, block_size, Hk, D) cache), got shape ",
                      k_cache.sizes());
  }
  TORCH_CHECK_VALUE(k_cache.size(3) == D, kOwner, ": head dim of k_cache (", k_cache.size(3), ") does not match q (",
                    D, ")");
  TORCH_CHECK_VALUE(Hk >= 1 && Hq % Hk == 0, kOwner, ": the number of query heads (", Hq,
                    ") must be a multiple of the cache's key/value heads (", Hk, ")");

  KvCacheProblem pr;
  pr.append = k.has_value() || v.has_value();
  if (pr.append) {
    TORCH_CHECK_VALUE(k.has_value() && v.has_value(), kOwner, ": pass both k and v (new keys and values) or neither");
    for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"k", &*k}, {"v", &*v}}) {
      TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kOwner, ": ", name, " must have q's dtype ",
                       dtype_name(q.scalar_type()), ", got ", dtype_name(t->scalar_type()));
      TORCH_CHECK_VALUE(t->device() == q.device(), kOwner, ": ", name, " is on ", t->device(), " but q is on ",
                        q.device());
      TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == Hk && t->size(2) == Lq && t->size(3) == D,
                        kOwner, ": ", name, " (the new keys / values) must have shape (B, Hk, Lq, D) = (", B, ", ", Hk,
                        ", ", Lq, ", ", D, "): as many new positions as q has rows; got ", t->sizes());
    }
  }
  const std::vector<int64_t> lens = read_cache_seqlens(cache_seqlens, q);
  TORCH_CHECK_VALUE(num_splits >= 0, kOwner, ": num_splits must be >= 0 (0 lets the kernel choose), got ",
                    num_splits);

  AttentionParams& P = pr.params;
  P.batch = B;
  P.q_heads = Hq;
  P.kv_heads = Hk;
  P.q_len = Lq;
  P.head_dim = D;
  std::vector<int64_t> totals(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    totals[b] = lens[b] + (pr.append ? Lq : 0);
    longest = std::max(longest, totals[b]);
  }
  P.k_len = longest;
  // The decode op has no global tokens, so causal only means window right = 0
  // (normalised by the caller); sink tokens and sinks are the training ops' (window.h).
  set_options(P, q, alibi_slopes, "B", window_left, window_right, dilation, score, sigmoid_bias, softcap, scale,
              SinkOptions{false, sink_tokens, &sinks});
  pr.has_sinks = P.has_sinks;
  pr.sink_tokens = sink_tokens;
  pr.num_splits = num_splits;
  // Chunks count from position 0 of the sequence (absolute positions, whatever
  // slot a rolling cache keeps them in), as in the training ops.
  pr.chunk_phases = chunk_phases(q, Hq, chunk, chunk_shift, kOwner);
  P.window.chunk = chunk;

  CacheGeometry& g = pr.cache;
  if (paged) {
    g.layout = CacheLayout::kPaged;
    g.block_size = k_cache.size(1);
    pr.max_blocks = block_table->size(1);
    pr.block_table = read_block_table(*block_table, q, k_cache.size(0), g.block_size, totals);
    g.capacity = pr.max_blocks * g.block_size;
  } else {
    g.layout = rolling ? CacheLayout::kRolling : CacheLayout::kContiguous;
    g.capacity = k_cache.size(2);
    if (rolling) {
      // The ring must still hold every key a new row's window reaches: from
      // the first row's position - left * dilation to the last row's.
      TORCH_CHECK_VALUE(window_left >= 0, kOwner, ": a rolling cache keeps a finite window of keys; window left "
                        "must be a non-negative int, got unbounded");
      TORCH_CHECK_VALUE(sink_tokens < g.capacity, kOwner, ": a rolling cache of ", g.capacity,
                        " slots cannot keep sink_tokens = ", sink_tokens, " sink slots and a window");
      const int64_t ring = g.capacity - sink_tokens;
      const bool fits = window_left <= (ring - Lq) / dilation && Lq <= ring;
      TORCH_CHECK_VALUE(fits, kOwner, ": a rolling cache needs at least sink_tokens + window left * dilation + Lq = ",
                        sink_tokens, " + ", window_left, " * ", dilation, " + ", Lq, " slots, got k_cache with ",
                        g.capacity);
      g.sink_slots = sink_tokens;
    } else {
      for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK_VALUE(totals[b] <= g.capacity, kOwner, ": row ", b, " needs ", totals[b], " cache positions (",
                          "cache_seqlens = ", lens[b], pr.append ? " plus the new keys" : "",
                          ") but k_cache holds ", g.capacity, " (use rolling=True or a larger cache)");
      }
    }
  }
  pr.rows.resize(B);
  for (int64_t b = 0; b < B; ++b) pr.rows[b] = SequenceView{Lq, totals[b], 0, 0};
  return pr;
}

void append_to_cache(const KvCacheProblem& pr, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k,
                     const at::Tensor& v) {
  const AttentionParams& P = pr.params;
  const int64_t B = P.batch, Lq = P.q_len, n = B * Lq;
  if (n == 0) return;
  std::vector<int64_t> first(n), second(n);  // (batch row, slot) or (block, offset) of each new position
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Lq; ++i) {
      const int64_t j = pr.rows[b].k_len - Lq + i;  // the position of new key i
      const int64_t slot = cache_slot(pr.cache, j);
      if (pr.cache.layout == CacheLayout::kPaged) {
        first[b * Lq + i] = pr.block_table[b * pr.max_blocks + slot / pr.cache.block_size];
        second[b * Lq + i] = slot % pr.cache.block_size;
      } else {
        first[b * Lq + i] = b;
        second[b * Lq + i] = slot;
      }
    }
  }
  const auto index_options = at::TensorOptions().dtype(at::kLong);
  const at::Tensor i0 = at::from_blob(first.data(), {n}, index_options).to(k_cache.device());
  const at::Tensor i1 = at::from_blob(second.data(), {n}, index_options).to(k_cache.device());
  // New keys as (B * Lq, Hk, D) rows; the cache viewed as (first, second, Hk, D).
  const auto rows = [&](const at::Tensor& t) { return t.permute({0, 2, 1, 3}).reshape({n, P.kv_heads, P.head_dim}); };
  const bool paged = pr.cache.layout == CacheLayout::kPaged;
  at::Tensor kc = paged ? k_cache : k_cache.permute({0, 2, 1, 3});
  at::Tensor vc = paged ? v_cache : v_cache.permute({0, 2, 1, 3});
  kc.index_put_({i0, i1}, rows(k));
  vc.index_put_({i0, i1}, rows(v));
}

}  // namespace longreach
