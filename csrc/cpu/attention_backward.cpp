// CPU backward of longreach::local_attention: one pass over the rows of the
// TilePlan's row chunks; per block and query head, tile by tile (tile_runs.h):
//
//   S = Q K^T,  dP = dO V^T,  P and dS,
//   dQ += dS K,   dK += dS^T Q,   dV += P^T dO
//
// A chunk accumulates the dK and dV of the keys it touches in private float
// buffers (ChunkKeyGrads), and a final pass sums the chunks' buffers per key in
// plan order (reduce_key_gradients), so results are deterministic and do not
// depend on the number of threads; learnable ALiBi slopes likewise
// (reduce_alibi_slope_gradients). The score gradients come from csrc/common
// (scores.h: soft-cap, ALiBi and their gradients, the softmax / sigmoid
// gradients).
//
// The kernel is instantiated here only, for the four dtypes of the dispatch.
#include "attention_backward.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <map>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/scores.h"
#include "../common/window.h"
#include "attention_rows.h"
#include "bf16_ops.h"
#include "block_scratch.h"
#include "dropout_tile.h"
#include "key_operands.h"
#include "tile_ops.h"
#include "tile_runs.h"

namespace longreach::cpu {
namespace detail {
namespace {

// The tile's part of d loss / d slope, per row a (without its sign: scores.h
// subtracts slope * |p - j|). G holds dS with respect to the final scores
// (zero where a run is masked) and S the probabilities. Accumulates
// E[a] += sum dS * d, F[a] += sum dS and C[a] += sum P * d, d = |p - j|, then
// applies the soft-cap chain factor to G, which the grad_rows call left out.
// For softmax rows the gradient is E + (dlse - F) * C, not E: dS was formed
// with the row constant dO . O of the *rounded* output, and since the
// probabilities of a row sum to 1 the true row constant is sum P dP - dlse =
// rowdot + F - dlse; the error of the rounded one, multiplied by distances
// of hundreds of keys, made bfloat16 slope gradients 5-16% off.
template <typename acc_t>
void alibi_slope_grad_tile(const BlockContext<acc_t>& bc, const TileKeys& keys, const TileRuns& runs, const acc_t* S,
                           acc_t* G, const acc_t* factor, int64_t ld, acc_t* E, acc_t* F, acc_t* C) {
  for (int64_t a = 0; a < bc.nq; ++a) {
    const acc_t* p = S + a * ld;
    acc_t* g = G + a * ld;
    const acc_t* f = factor ? factor + a * ld : nullptr;
    acc_t e = acc_t(0), sum_g = acc_t(0), c_sum = acc_t(0);
    for (int64_t c = runs.first[a]; c < runs.end[a]; ++c) {
      const acc_t d = static_cast<acc_t>(abs_distance(bc.pos[a], keys.key(c)));
      e += g[c] * d;
      sum_g += g[c];
      c_sum += p[c] * d;
      if (f) g[c] *= f[c];
    }
    E[a] += e;
    F[a] += sum_g;
    C[a] += c_sum;
  }
}

// rowdot[b,h,i] = dO_i . O_i - dlse_i: the softmax backward's row constant,
// laid out like lse (dense (B, Hq, Lq) or packed (Hq, total_q)).
template <typename scalar_t>
at::Tensor softmax_row_dots(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                            const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& grad_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor rowdot = at::empty(lse.sizes(), lse.options());
  at::Tensor glse;
  if (grad_lse.has_value()) glse = grad_lse->to(rowdot.scalar_type()).contiguous();
  const int64_t D = P.head_dim;
  auto row_dot = [&](int64_t b, int64_t h, int64_t i) {
    const auto go = q_rows<const scalar_t>(grad_out, plan, b, h);
    const auto o = q_rows<const scalar_t>(out, plan, b, h);
    acc_t sum = acc_t(0);
    for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(go.row(i)[d]) * static_cast<acc_t>(o.row(i)[d]);
    const acc_t* gl = glse.defined() ? stat_row<acc_t>(glse, P, plan, b, h) : nullptr;
    stat_row<acc_t>(rowdot, P, plan, b, h)[i] = gl ? sum - gl[i] : sum;
  };
  if (grad_out.dim() == 3) {  // packed (total, H, D): token by token, all heads of a token's contiguous rows
    std::vector<int64_t> ends(P.batch);  // sequence b's rows end at ends[b] (sequences are in order)
    for (int64_t b = 0; b < P.batch; ++b) ends[b] = plan.seq(b).q_start + plan.seq(b).q_len;
    at::parallel_for(0, grad_out.size(0), 256, [&](int64_t begin, int64_t end) {
      int64_t b = std::upper_bound(ends.begin(), ends.end(), begin) - ends.begin();
      for (int64_t t = begin; t < end; ++t) {
        while (t >= ends[b]) ++b;
        for (int64_t h = 0; h < P.q_heads; ++h) row_dot(b, h, t - plan.seq(b).q_start);
      }
    });
    return rowdot;
  }
  at::parallel_for(0, P.batch * P.q_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      for (int64_t i = 0; i < plan.seq(bh / P.q_heads).q_len; ++i) row_dot(bh / P.q_heads, bh % P.q_heads, i);
    }
  });
  return rowdot;
}

// The key gradients one chunk accumulated (without the factor `scale` of dK).
// Rows [own_begin, own_end) of its span are keys no other chunk's span holds:
// with float/double outputs they accumulate in place in dK and dV. The other
// span rows (the overlaps with the neighbouring chunks, or all of them) live in
// `dk`/`dv`: rows [0, own_begin) first, then [own_end, span.count). Global keys
// reached as extras go by rank into dk_extra/dv_extra.
template <typename acc_t>
struct ChunkKeyGrads {
  KeyRange span;
  int64_t own_begin = 0, own_end = 0;
  Buffer<acc_t> dk, dv;
  Buffer<acc_t> dk_extra, dv_extra;  // n_global x D, empty when no extras were visited
  std::vector<acc_t> dslope;         // per query head of the group: sum of dS * |p - j| (learnable ALiBi)
  std::vector<acc_t> dsink;          // per query head of the group: d loss / d sink of its rows
  int64_t buffer_row(int64_t r) const { return r < own_begin ? r : r - (own_end - own_begin); }
  bool owns(int64_t r) const { return r >= own_begin && r < own_end; }
};

// The span rows each chunk owns: those past the previous chunk's span and
// before the next one's (spans of a run of blocks only grow). Only when the
// outputs are the accumulation type and no global row (whose chunk sees every
// key) shares the keys.
template <typename acc_t>
void assign_owned_rows(const TilePlan& plan, bool outputs_accumulate, std::vector<ChunkKeyGrads<acc_t>>* grads) {
  const auto& chunks = plan.row_chunks();
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    (*grads)[ci].span = plan.span_of_chunk(chunks[ci]);
  }
  // The previous and next chunk of each chunk's run of blocks (-1: none).
  std::vector<int64_t> prev(chunks.size(), -1), next(chunks.size(), -1);
  std::map<std::tuple<int64_t, int64_t, bool, int64_t>, int64_t> last_of_run;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const auto run = std::make_tuple(chunks[ci].batch, chunks[ci].kv_head, chunks[ci].global_rows, chunks[ci].cls);
    const auto it = last_of_run.find(run);
    if (it != last_of_run.end()) {
      prev[ci] = it->second;
      next[it->second] = static_cast<int64_t>(ci);
    }
    last_of_run[run] = static_cast<int64_t>(ci);
  }
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    ChunkKeyGrads<acc_t>& g = (*grads)[ci];
    if (!outputs_accumulate || chunks[ci].global_rows || plan.has_global_rows(chunks[ci].batch) ||
        g.span.count == 0) {
      continue;
    }
    int64_t begin = 0, end = g.span.count;
    if (prev[ci] >= 0 && (*grads)[prev[ci]].span.count > 0) {
      const KeyRange& before = (*grads)[prev[ci]].span;
      const int64_t before_last = before.at(before.count - 1);
      begin = std::clamp<int64_t>((before_last - g.span.lo) / g.span.stride + 1, 0, g.span.count);
    }
    if (next[ci] >= 0 && (*grads)[next[ci]].span.count > 0) {
      const KeyRange& after = (*grads)[next[ci]].span;
      end = std::clamp<int64_t>((after.lo - g.span.lo) / g.span.stride, begin, g.span.count);
    }
    g.own_begin = begin;
    g.own_end = std::max(begin, end);
  }
}

// d loss / d slope (B, Hq) into dslopes: the chunks' sums per query head added
// chunk by chunk in plan order, like the key gradients: deterministic.
template <typename acc_t>
void reduce_alibi_slope_gradients(const AttentionParams& P, const TilePlan& plan,
                                  const std::vector<ChunkKeyGrads<acc_t>>& key_grads, at::Tensor* dslopes) {
  const auto& chunks = plan.row_chunks();
  std::vector<double> sums(P.batch * P.q_heads, 0.0);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    for (int64_t g = 0; g < P.group_size(); ++g) {
      sums[chunks[ci].batch * P.q_heads + chunks[ci].kv_head * P.group_size() + g] += key_grads[ci].dslope[g];
    }
  }
  float* dst = dslopes->data_ptr<float>();
  for (size_t i = 0; i < sums.size(); ++i) dst[i] = static_cast<float>(-sums[i]);  // scores subtract slope * |p - j|
}

// d loss / d sinks (Hq,) into dsinks: the chunks' sums per query head added in
// plan order (a sink's gradient sums over every row of its head and the batch).
template <typename acc_t>
void reduce_sink_gradients(const AttentionParams& P, const TilePlan& plan,
                           const std::vector<ChunkKeyGrads<acc_t>>& key_grads, at::Tensor* dsinks) {
  const auto& chunks = plan.row_chunks();
  std::vector<double> sums(P.q_heads, 0.0);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    for (int64_t g = 0; g < P.group_size(); ++g) sums[chunks[ci].kv_head * P.group_size() + g] += key_grads[ci].dsink[g];
  }
  acc_t* dst = dsinks->data_ptr<acc_t>();
  for (int64_t h = 0; h < P.q_heads; ++h) dst[h] = static_cast<acc_t>(sums[h]);
}

// Sums the chunks' key gradients per key, chunk by chunk in plan order (so
// the result does not depend on the threads), and writes dK = scale * sum and
// dV = sum.
template <typename scalar_t, typename acc_t>
void reduce_key_gradients(const TileOps<acc_t>& ops, const AttentionParams& P, const TilePlan& plan,
                          const std::vector<ChunkKeyGrads<acc_t>>& key_grads, at::Tensor& dk, at::Tensor& dv) {
  const int64_t D = P.head_dim;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const auto& chunks = plan.row_chunks();
  std::vector<std::vector<int64_t>> chunks_of_head(P.batch * P.kv_heads);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    chunks_of_head[chunks[ci].batch * P.kv_heads + chunks[ci].kv_head].push_back(static_cast<int64_t>(ci));
  }
  constexpr int64_t kKeysPerTask = 256;
  const int64_t tasks_per_head = (P.k_len + kKeysPerTask - 1) / kKeysPerTask;
  at::parallel_for(0, P.batch * P.kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    Buffer<acc_t> sk(kKeysPerTask * D), sv(kKeysPerTask * D);
    auto add_rows = [D](const acc_t* src, acc_t* dst) {
      for (int64_t d = 0; d < D; ++d) dst[d] += src[d];
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tasks_per_head;
      const int64_t b = bh / P.kv_heads, hk = bh % P.kv_heads;
      const int64_t j0 = (task % tasks_per_head) * kKeysPerTask;
      const int64_t j1 = std::min(j0 + kKeysPerTask, plan.seq(b).k_len);
      if (j0 >= j1) continue;  // past this sequence's keys (P.k_len is the longest)
      std::fill(sk.begin(), sk.end(), acc_t(0));
      std::fill(sv.begin(), sv.end(), acc_t(0));
      auto dK = k_rows<scalar_t>(dk, plan, b, hk);
      auto dV = k_rows<scalar_t>(dv, plan, b, hk);
      const auto& globals = plan.extra_keys(b);
      const auto g0 = std::lower_bound(globals.begin(), globals.end(), j0);
      const auto g1 = std::lower_bound(globals.begin(), globals.end(), j1);
      for (int64_t ci : chunks_of_head[bh]) {
        const ChunkKeyGrads<acc_t>& g = key_grads[ci];
        const KeyRange& r = g.span;
        if (r.count > 0) {  // span keys lo + i * stride inside [j0, j1)
          const int64_t i0 = std::max<int64_t>(0, (j0 - r.lo + r.stride - 1) / r.stride);
          const int64_t i1 = std::min<int64_t>(r.count, j1 > r.lo ? (j1 - r.lo + r.stride - 1) / r.stride : 0);
          for (int64_t i = i0; i < i1; ++i) {
            const int64_t row = r.at(i) - j0;
            if (g.owns(i)) {  // accumulated in place (scalar_t == acc_t): read back before this task overwrites it
              add_rows(reinterpret_cast<const acc_t*>(dK.row(r.at(i))), sk.data() + row * D);
              add_rows(reinterpret_cast<const acc_t*>(dV.row(r.at(i))), sv.data() + row * D);
              continue;
            }
            add_rows(g.dk.data() + g.buffer_row(i) * D, sk.data() + row * D);
            add_rows(g.dv.data() + g.buffer_row(i) * D, sv.data() + row * D);
          }
        }
        if (!g.dk_extra.empty()) {
          for (auto it = g0; it != g1; ++it) {
            const int64_t rank = it - globals.begin(), row = *it - j0;
            add_rows(g.dk_extra.data() + rank * D, sk.data() + row * D);
            add_rows(g.dv_extra.data() + rank * D, sv.data() + row * D);
          }
        }
      }
      for (int64_t j = j0; j < j1; ++j) {
        convert_out(ops, sk.data() + (j - j0) * D, D, scale, dK.row(j));
        convert_out(ops, sv.data() + (j - j0) * D, D, acc_t(1), dV.row(j));
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                     const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                     const at::Tensor& sinks, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dslopes,
                     at::Tensor* dsinks) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* sink = dsinks ? sinks.data_ptr<acc_t>() : nullptr;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, W = ops.vec_width;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const bool softcap = P.softcap > 0.0;
  const at::Tensor lse_acc = lse.contiguous();
  // bfloat16 products on the CPU's bf16 dot-product instruction where it has
  // one (bf16_ops.h), as in the forward: S = Q K^T and dP = dO V^T from the
  // bf16 rows as they are; dQ += dS K, dK += dS^T Q and dV += P^T dO with P
  // and dS rounded to bf16 (PyTorch's bf16 attention backward rounds them
  // too). Softmax, dS and every accumulator stay float32.
  const Bf16Ops* bf = nullptr;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (D % 2 == 0) bf = bf16_ops();
  }
  const KeyUse use = bf ? KeyUse::kBackwardBf16 : KeyUse::kBackward;
  const at::Tensor rowdot =
      sigmoid_score ? at::Tensor() : softmax_row_dots<scalar_t>(P, plan, grad_out, out, lse_acc, grad_lse);
  const at::Tensor glse_acc =  // d loss / d lse per row, for the slope gradient's row constant
      dslopes && grad_lse.has_value() ? grad_lse->to(lse_acc.scalar_type()).contiguous() : at::Tensor();
  auto row_stats = [&](const at::Tensor& t, int64_t b, int64_t h) -> const acc_t* {
    return t.defined() ? stat_row<acc_t>(t, P, plan, b, h) : nullptr;
  };
  const auto& chunks = plan.row_chunks();
  std::vector<ChunkKeyGrads<acc_t>> key_grads(chunks.size());
  // In place only into adjacent rows: the packed layout's rows (Hk * D apart) take every tile's
  // key-gradient products across many pages, the private buffers are faster there.
  const int64_t key_row_stride = dk.dim() == 3 ? dk.stride(0) : dk.stride(2);
  assign_owned_rows(plan, std::is_same_v<scalar_t, acc_t> && key_row_stride == D, &key_grads);

  auto make_scratch = [&] { return Scratch<acc_t>(D, W, /*backward=*/true, softcap); };
  parallel_items(static_cast<int64_t>(chunks.size()), make_scratch, [&](int64_t ci, Scratch<acc_t>& ws) {
    const RowChunk& chunk = chunks[ci];
    const int64_t b = chunk.batch, hk = chunk.kv_head;
    const auto K = k_rows<const scalar_t>(k, plan, b, hk);
    const auto V = k_rows<const scalar_t>(v, plan, b, hk);
    const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, plan.seq(b)));
    ChunkKeyGrads<acc_t>& grads = key_grads[ci];
    const KeyRange& chunk_keys = grads.span;
    load_key_operands(ops, K, V, chunk_keys.count, [&](int64_t r) { return chunk_keys.at(r); }, true, D, scale,
                      use, &ws.span);
    if (dslopes) grads.dslope.assign(P.group_size(), acc_t(0));
    if (sink) grads.dsink.assign(P.group_size(), acc_t(0));
    const int64_t n_owned = grads.own_end - grads.own_begin;
    grads.dk.assign((chunk_keys.count - n_owned) * D, acc_t(0));
    grads.dv.assign((chunk_keys.count - n_owned) * D, acc_t(0));
    // Owned rows accumulate in dK / dV themselves (only when scalar_t == acc_t).
    // (dk and dv are allocated alike: one row stride serves both)
    const auto dK_rows = k_rows<scalar_t>(dk, plan, b, hk), dV_rows = k_rows<scalar_t>(dv, plan, b, hk);
    acc_t* dk_own = reinterpret_cast<acc_t*>(dK_rows.row(0));
    acc_t* dv_own = reinterpret_cast<acc_t*>(dV_rows.row(0));
    const int64_t key_ld = dK_rows.stride_l, own_ld = chunk_keys.stride * key_ld;
    for (int64_t r = grads.own_begin; r < grads.own_end; ++r) {
      std::fill(dk_own + chunk_keys.at(r) * key_ld, dk_own + chunk_keys.at(r) * key_ld + D, acc_t(0));
      std::fill(dv_own + chunk_keys.at(r) * key_ld, dv_own + chunk_keys.at(r) * key_ld + D, acc_t(0));
    }

    for (int64_t t = chunk.first_block; t < chunk.first_block + chunk.n_blocks; ++t) {
      load_block(ops, P, plan, chunk, t, K, V, use, ws);
      if (ws.rows.empty()) continue;
      const int64_t nq = static_cast<int64_t>(ws.rows.size());
      if (!ws.keys.extras.empty() && grads.dk_extra.empty()) {
        const int64_t n_global = static_cast<int64_t>(plan.extra_keys(b).size());
        grads.dk_extra.assign(n_global * D, acc_t(0));
        grads.dv_extra.assign(n_global * D, acc_t(0));
      }
      const int64_t span_row0 = ws.keys.span.count > 0 ? (ws.keys.span.lo - chunk_keys.lo) / chunk_keys.stride : 0;
      const bool regular = rows_are_regular(ws.rows);
      auto row_index = [&](int64_t a) { return ws.rows[a]; };

      for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
        const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h),
                                     chunk.global_rows};
        if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
          if (bf) {
            load_bf16_rows(q_rows<const scalar_t>(q, plan, b, h), nq, row_index, D, &ws.q16, &ws.q_pairs);
            load_bf16_rows(q_rows<const scalar_t>(grad_out, plan, b, h), nq, row_index, D, &ws.go16, &ws.go_pairs);
          }
        }
        if (!bf) {
          load_rows(ops, q_rows<const scalar_t>(q, plan, b, h), nq, row_index, regular, D, &ws.q);
          load_rows(ops, q_rows<const scalar_t>(grad_out, plan, b, h), nq, row_index, regular, D, &ws.go);
        }
        const acc_t* lse_all = row_stats(lse_acc, b, h);
        const acc_t* dot_all = row_stats(rowdot, b, h);
        for (int64_t a = 0; a < nq; ++a) {
          ws.lse[a] = sigmoid_score ? acc_t(0) : lse_all[ws.rows[a]];
          ws.dot[a] = dot_all ? dot_all[ws.rows[a]] : acc_t(0);
        }
        if (sink) {  // the sink's gradient needs only the row statistics (scores.h)
          acc_t sum = acc_t(0);
          for (int64_t a = 0; a < nq; ++a) sum += sink_grad_of_row<acc_t>(sink[h], ws.lse[a], ws.dot[a]);
          grads.dsink[h - hk * P.group_size()] += sum;
        }
        std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));
        if (dslopes) {
          for (auto* v : {&ws.slope_e, &ws.slope_f, &ws.slope_c}) std::fill(v->begin(), v->begin() + nq, acc_t(0));
        }

        for_each_key_tile(ws.keys, span_row0, W, [&](const TileKeys& keys, bool masked, int64_t col0,
                                                     int64_t valid_from) {
          const bool extra = keys.list != nullptr;
          const KeyOperands<acc_t>& ko = extra ? ws.extra : ws.span;
          const int64_t nk = keys.n;
          TileRuns& runs = ws.runs;
          plan_runs(bc, keys, masked, valid_from, &runs);
          acc_t* S = ws.S.data();
          acc_t* G = ws.G.data();
          acc_t* F = softcap ? ws.F.data() : nullptr;
          const int64_t* first = runs.first.data();
          const int64_t* last = runs.end.data();
          // S = scale Q K^T, dP = dO V^T (bf is only ever set where acc_t is float)
          if constexpr (std::is_same_v<acc_t, float>) {
            if (bf) {
              bf->gemm_band_n(nq, nk, D, ws.q16.data(), D, ko.kT_pairs_from(col0), scale, S, ws.ld_s, first, last);
              bf->gemm_band_n(nq, nk, D, ws.go16.data(), D, ko.vT_pairs_from(col0), 1.f, G, ws.ld_s, first, last);
            }
          }
          if (!bf) {
            ops.gemm_band_n(nq, nk, D, ws.q.ptr, ws.q.ld, 1, ko.kT_from(col0), S, ws.ld_s, first, last);
            ops.gemm_band_n(nq, nk, D, ws.go.ptr, ws.go.ld, 1, ko.vT_from(col0), G, ws.ld_s, first, last);
          }
          finalize_tile(bc, keys, runs, S, ws.ld_s, F);
          // Dropout Z (keep / (1 - p)): out = (P o Z) V, so the weights' gradient is dP = Z o (dO V^T),
          // and dV takes P o Z (below); dS = P o (dP - dO . O) keeps the undropped P.
          const bool dropout = P.dropout.enabled;
          const int64_t head_row = P.dropout.head_row(b, h, P.q_heads);
          if (dropout) apply_dropout(P.dropout, head_row, ws.rows.data(), 0, nq, keys, runs, G, ws.ld_s);
          // With learnable slopes the soft-cap factor is applied after the
          // slope gradient has read dS with respect to the final score.
          const acc_t* grad_factor = dslopes ? nullptr : F;
          if (sigmoid_score) {
            ops.sigmoid_grad_rows(S, G, grad_factor, ws.ld_s, nq, nk, first, last, bias);
          } else {
            ops.softmax_grad_rows(S, G, grad_factor, ws.ld_s, nq, nk, first, last, ws.lse.data(), ws.dot.data());
          }
          if (dslopes) {
            alibi_slope_grad_tile(bc, keys, runs, S, G, F, ws.ld_s, ws.slope_e.data(), ws.slope_f.data(),
                                  ws.slope_c.data());
          }
          if (dropout) apply_dropout(P.dropout, head_row, ws.rows.data(), 0, nq, keys, runs, S, ws.ld_s);
          // dQ += dS K
          if constexpr (std::is_same_v<acc_t, float>) {
            if (bf) {
              bf->gemm_band_k(nq, D, nk, G, ws.ld_s, 1, ko.k_pairs_from(col0), ko.ld_pairs, ws.acc.data(), D, first,
                              last);
            }
          }
          if (!bf) ops.gemm_band_k(nq, D, nk, G, ws.ld_s, 1, ko.k.row(col0), ko.k.ld, ws.acc.data(), D, first, last);
          // dK += dS^T Q, dV += P^T dO: into the chunk's span rows, or a scratch for extras
          transpose_runs(nq, nk, &runs);
          // Keys [c0, c1) of the tile into rows of ld `ld` at dk_dst / dv_dst.
          auto key_products = [&](int64_t c0, int64_t c1, acc_t* dk_dst, acc_t* dv_dst, int64_t ld) {
            if (c0 >= c1) return;
            const int64_t* kf = runs.key_first.data() + c0;
            const int64_t* ke = runs.key_end.data() + c0;
            if constexpr (std::is_same_v<acc_t, float>) {
              if (bf) {
                const int64_t ldp = bf16_pair_ld(D);
                bf->gemm_band_k(c1 - c0, D, nq, G + c0, 1, ws.ld_s, ws.q_pairs.data(), ldp, dk_dst, ld, kf, ke);
                bf->gemm_band_k(c1 - c0, D, nq, S + c0, 1, ws.ld_s, ws.go_pairs.data(), ldp, dv_dst, ld, kf, ke);
                return;
              }
            }
            ops.gemm_band_k(c1 - c0, D, nq, G + c0, 1, ws.ld_s, ws.q.ptr, ws.q.ld, dk_dst, ld, kf, ke);
            ops.gemm_band_k(c1 - c0, D, nq, S + c0, 1, ws.ld_s, ws.go.ptr, ws.go.ld, dv_dst, ld, kf, ke);
          };
          if (extra) {
            ws.dk_tile.assign(nk * D, acc_t(0));
            ws.dv_tile.assign(nk * D, acc_t(0));
            key_products(0, nk, ws.dk_tile.data(), ws.dv_tile.data(), D);
          } else {
            // Span rows col0 .. col0 + nk - 1: before, inside and after the owned rows.
            const int64_t own0 = std::clamp<int64_t>(grads.own_begin - col0, 0, nk);
            const int64_t own1 = std::clamp<int64_t>(grads.own_end - col0, own0, nk);
            key_products(0, own0, grads.dk.data() + grads.buffer_row(col0) * D,
                         grads.dv.data() + grads.buffer_row(col0) * D, D);
            if (own0 < own1) {
              const int64_t key = chunk_keys.at(col0 + own0);
              key_products(own0, own1, dk_own + key * key_ld, dv_own + key * key_ld, own_ld);
            }
            if (own1 < nk) {
              key_products(own1, nk, grads.dk.data() + grads.buffer_row(col0 + own1) * D,
                           grads.dv.data() + grads.buffer_row(col0 + own1) * D, D);
            }
          }
          if (extra) {
            for (int64_t c = 0; c < nk; ++c) {
              const int64_t rank = ws.keys.extra_ranks[col0 + c];
              for (int64_t d = 0; d < D; ++d) {
                grads.dk_extra[rank * D + d] += ws.dk_tile[c * D + d];
                grads.dv_extra[rank * D + d] += ws.dv_tile[c * D + d];
              }
            }
          }
        });

        auto dQ = q_rows<scalar_t>(dq, plan, b, h);
        for (int64_t a = 0; a < nq; ++a) convert_out(ops, ws.acc.data() + a * D, D, scale, dQ.row(ws.rows[a]));
        if (dslopes) {  // see alibi_slope_grad_tile
          const acc_t* dlse = row_stats(glse_acc, b, h);
          acc_t sum = acc_t(0);
          for (int64_t a = 0; a < nq; ++a) {
            sum += ws.slope_e[a];
            if (!sigmoid_score) {
              const acc_t row_dlse = dlse ? dlse[ws.rows[a]] : acc_t(0);
              sum += (row_dlse - ws.slope_f[a]) * ws.slope_c[a];
            }
          }
          grads.dslope[h - hk * P.group_size()] += sum;
        }
      }
    }
  });

  if (dslopes) reduce_alibi_slope_gradients(P, plan, key_grads, dslopes);
  if (sink) reduce_sink_gradients(P, plan, key_grads, dsinks);
  reduce_key_gradients<scalar_t>(ops, P, plan, key_grads, dk, dv);
}

}  // namespace
}  // namespace detail

void attention_backward(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                        const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                        const at::Tensor& sinks, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dslopes,
                        at::Tensor* dsinks) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_bwd_cpu", [&] {
    detail::backward_kernel<scalar_t>(P, plan, grad_out, grad_lse, q, k, v, out, lse, slopes, sinks, dq, dk, dv, dslopes,
                                      dsinks);
  });
}

}  // namespace longreach::cpu
