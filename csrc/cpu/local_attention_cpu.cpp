// CPU forward and backward of longreach::local_attention.
//
// Flash-style and O(L * keys per row): work is cut into RowChunks (tile_plan.h),
// runs of blocks of 64 query rows; each block visits the span of keys its
// windows cover, in tiles of up to kKeyTile keys, then the global extras. A
// score tile is kept transposed (keys x rows, see tile_ops.h) and every product
// runs on the register-blocked vector kernels of tile_ops.h:
//
//   forward:  S^T = K Q^T,  online softmax (or sigmoid) down the columns,
//             O += P V
//   backward: S^T = K Q^T,  dP^T = V dO^T,  P and dS,
//             dQ += dS K,   dK += dS^T Q,   dV += P^T dO
//
// The backward is one pass over the rows: a chunk accumulates the dK and dV
// of the keys its blocks touch in private float buffers, and a final pass sums
// the chunks' buffers per key in a fixed order, so the result is
// deterministic and no key is counted twice. The edge masks and the optional
// soft-cap / ALiBi transform are applied to the tiles with the shared scalar
// math of csrc/common (window.h, scores.h).
//
// float32 and float64 inputs are read in place; bfloat16 and float16 rows are
// converted to float once per chunk and accumulated in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention_params.h"
#include "../common/scores.h"
#include "../common/window.h"
#include "tile_ops.h"
#include "tile_plan.h"

namespace longreach::cpu {
namespace {

constexpr int64_t kKeyTile = 512;  // most keys per score tile

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

template <typename T>
struct HeadRows {  // rows of one (batch, head) slice of a (B, H, L, D) tensor with contiguous rows
  T* data;
  int64_t stride_l;
  T* row(int64_t l) const { return data + l * stride_l; }
};

template <typename T>
HeadRows<T> head_rows(const at::Tensor& t, int64_t b, int64_t h) {
  return {static_cast<T*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename acc_t>
acc_t alibi_slope(const AttentionParams& P, const at::Tensor& slopes, int64_t b, int64_t h) {
  if (!P.has_alibi) return acc_t(0);
  const float* s = slopes.data_ptr<float>();
  return static_cast<acc_t>(slopes.dim() == 2 ? s[b * slopes.stride(0) + h * slopes.stride(1)]
                                              : s[h * slopes.stride(0)]);
}

// ------------------------------------------------------- key/value rows --

// The key and value rows a chunk reads, as acc_t rows: row r of `range` at
// k + r * ld. float/double inputs are used in place; others are converted once.
template <typename scalar_t, typename acc_t>
struct KeyRows {
  const acc_t* k = nullptr;
  const acc_t* v = nullptr;
  int64_t ld = 0;
  std::vector<acc_t> k_copy, v_copy;

  void prepare(const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V, const KeyRange& range,
               int64_t D) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      k = K.row(range.lo);
      v = V.row(range.lo);
      ld = range.stride * K.stride_l;
    } else {
      k_copy.resize(std::max<int64_t>(range.count, 1) * D);
      v_copy.resize(k_copy.size());
      for (int64_t r = 0; r < range.count; ++r) {
        const scalar_t* ks = K.row(range.at(r));
        const scalar_t* vs = V.row(range.at(r));
        acc_t* kd = k_copy.data() + r * D;
        acc_t* vd = v_copy.data() + r * D;
        for (int64_t d = 0; d < D; ++d) kd[d] = static_cast<acc_t>(ks[d]);
        for (int64_t d = 0; d < D; ++d) vd[d] = static_cast<acc_t>(vs[d]);
      }
      k = k_copy.data();
      v = v_copy.data();
      ld = D;
    }
  }
};

template <typename scalar_t, typename acc_t>
void gather_rows(const HeadRows<const scalar_t>& src, const int64_t* idx, int64_t n, int64_t D, acc_t* dst) {
  for (int64_t a = 0; a < n; ++a) {
    const scalar_t* s = src.row(idx[a]);
    for (int64_t d = 0; d < D; ++d) dst[a * D + d] = static_cast<acc_t>(s[d]);
  }
}

// dst[d * ld + a] = mul * src.row(rows[a])[d] for a < n, zero for n <= a < ncols.
template <typename scalar_t, typename acc_t>
void pack_transposed(const HeadRows<const scalar_t>& src, const std::vector<int64_t>& rows, int64_t ncols,
                     int64_t D, acc_t mul, int64_t ld, acc_t* dst) {
  const int64_t n = static_cast<int64_t>(rows.size());
  for (int64_t a = 0; a < n; ++a) {
    const scalar_t* s = src.row(rows[a]);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + a] = mul * static_cast<acc_t>(s[d]);
  }
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + n, dst + d * ld + ncols, acc_t(0));
}

// ------------------------------------------------------------ score tiles --

// The keys of one tile: key(c) = list ? list[c] : lo + c * stride.
struct TileKeys {
  const int64_t* list;
  int64_t lo, stride, n;
  int64_t key(int64_t c) const { return list ? list[c] : lo + c * stride; }
};

// Everything about a block of rows that the tile epilogue needs.
template <typename acc_t>
struct BlockContext {
  const AttentionParams* P;
  const TilePlan* plan;
  int64_t batch;
  const int64_t* pos;  // key position of each row, ascending
  int64_t nq;
  acc_t slope;  // ALiBi slope of the head, 0 when off
};

// Turns S^T = scale * K Q^T into final scores: -inf outside the window (for a
// masked span tile), then soft-cap and ALiBi. With `factor`, also writes
// d(final score)/d(scale * q.k) for the soft-cap chain rule of the backward.
// The allowed rows of one key form a contiguous run of columns (the band is
// monotone in the row position), found by two pointers over the tile.
template <typename acc_t>
void finalize_tile(const BlockContext<acc_t>& bc, const TileKeys& keys, bool masked, acc_t* S, int64_t ld,
                   acc_t* factor, std::vector<int64_t>& first, std::vector<int64_t>& end) {
  const AttentionParams& P = *bc.P;
  const acc_t cap = static_cast<acc_t>(P.softcap);
  const bool transform = cap > acc_t(0) || bc.slope != acc_t(0);
  if (!masked && !transform) return;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  first.assign(keys.n, 0);
  end.assign(keys.n, bc.nq);
  if (masked) {
    int64_t lo = 0, hi = 0;
    for (int64_t c = 0; c < keys.n; ++c) {
      const int64_t j = keys.key(c);
      acc_t* s = S + c * ld;
      if (bc.plan->key_is_global(bc.batch, j)) continue;  // every row sees a global key
      // Rows before the band of key j have p < j and are not in its window.
      while (lo < bc.nq && bc.pos[lo] < j && !in_window(P, bc.pos[lo], j)) ++lo;
      if (hi < lo) hi = lo;
      while (hi < bc.nq && in_window(P, bc.pos[hi], j)) ++hi;
      first[c] = lo;
      end[c] = hi;
      std::fill(s, s + lo, neg_inf);
      std::fill(s + hi, s + bc.nq, neg_inf);
    }
  }
  if (!transform) return;
  for (int64_t c = 0; c < keys.n; ++c) {
    const int64_t j = keys.key(c);
    acc_t* s = S + c * ld;
    acc_t* f = factor ? factor + c * ld : nullptr;
    for (int64_t a = first[c]; a < end[c]; ++a) {
      const int64_t dist = abs_distance(bc.pos[a], j);
      s[a] = transform_score<acc_t>(s[a], cap, bc.slope, dist);
      if (f) f[a] = transform_score_grad<acc_t>(s[a], cap, bc.slope, dist);
    }
    if (f) {
      std::fill(f, f + first[c], acc_t(0));
      std::fill(f + end[c], f + bc.nq, acc_t(0));
    }
  }
}

// Calls f(TileKeys, masked, first_key_row) for the tiles of a block: its span
// cut into near-equal tiles of at most kKeyTile keys, then its extras.
template <typename F>
void for_each_key_tile(const BlockKeys& keys, F&& f) {
  const KeyRange& s = keys.span;
  if (s.count > 0) {
    const int64_t tiles = (s.count + kKeyTile - 1) / kKeyTile;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = s.count * t / tiles, r1 = s.count * (t + 1) / tiles;
      f(TileKeys{nullptr, s.at(r0), s.stride, r1 - r0}, keys.span_needs_mask, r0);
    }
  }
  const int64_t n_extra = static_cast<int64_t>(keys.extras.size());
  for (int64_t r0 = 0; r0 < n_extra; r0 += kKeyTile) {
    f(TileKeys{keys.extras.data() + r0, 0, 1, std::min(kKeyTile, n_extra - r0)}, false, r0);
  }
}

// Per-thread scratch of the tile loops.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> S, G, F;          // kKeyTile x kRowBlock score tiles (transposed)
  std::vector<acc_t> qT, goT;          // D x kRowBlock
  std::vector<acc_t> q_rows, go_rows;  // kRowBlock x D
  std::vector<acc_t> acc;              // kRowBlock x D: output or dQ accumulator
  std::vector<acc_t> m, l, alpha, lse, dot;
  std::vector<acc_t> k_extra, v_extra, dk_extra, dv_extra;
  std::vector<int64_t> rows, pos, first, end;
  BlockKeys keys;

  Scratch(int64_t D, bool backward) {
    S.resize(kKeyTile * kRowBlock);
    if (backward) G.resize(kKeyTile * kRowBlock);
    qT.resize(D * kRowBlock);
    acc.resize(kRowBlock * D);
    for (auto* v : {&m, &l, &alpha, &lse, &dot}) v->resize(kRowBlock);
    if (backward) {
      goT.resize(D * kRowBlock);
      q_rows.resize(kRowBlock * D);
      go_rows.resize(kRowBlock * D);
    }
  }
};

// Gather (converted) key and value rows of a block's extras.
template <typename scalar_t, typename acc_t>
void gather_extras(const BlockKeys& keys, const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V,
                   int64_t D, Scratch<acc_t>& ws) {
  const int64_t n = static_cast<int64_t>(keys.extras.size());
  if (n == 0) return;
  ws.k_extra.resize(n * D);
  ws.v_extra.resize(n * D);
  gather_rows(K, keys.extras.data(), n, D, ws.k_extra.data());
  gather_rows(V, keys.extras.data(), n, D, ws.v_extra.data());
}

// ---------------------------------------------------------------- forward --

template <typename scalar_t>
void forward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slopes, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, BM = kRowBlock, off = P.position_offset();
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t bias = static_cast<acc_t>(P.sigmoid_bias);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto& chunks = plan.row_chunks();

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> ws(D, /*backward=*/false);
    KeyRows<scalar_t, acc_t> kv_rows;
    for (int64_t ci = begin; ci < end; ++ci) {
      const RowChunk& chunk = chunks[ci];
      const int64_t b = chunk.batch, hk = chunk.kv_head;
      const auto K = head_rows<const scalar_t>(k, b, hk);
      const auto V = head_rows<const scalar_t>(v, b, hk);
      const KeyRange chunk_keys = plan.span_of_chunk(chunk);
      kv_rows.prepare(K, V, chunk_keys, D);

      for (int64_t t = chunk.first_block; t < chunk.first_block + chunk.n_blocks; ++t) {
        plan.rows_of_block(chunk, t, &ws.rows);
        if (ws.rows.empty()) continue;
        const int64_t nq = static_cast<int64_t>(ws.rows.size());
        const int64_t ncols = round_up(nq, ops.vec_width);
        ws.pos.resize(nq);
        for (int64_t a = 0; a < nq; ++a) ws.pos[a] = ws.rows[a] + off;
        plan.keys_of_block(chunk, ws.rows, &ws.keys);
        gather_extras(ws.keys, K, V, D, ws);
        // Offset of the block's span inside the chunk's key rows.
        const int64_t span_row0 =
            ws.keys.span.count > 0 ? (ws.keys.span.lo - chunk_keys.lo) / std::max<int64_t>(chunk_keys.stride, 1) : 0;

        for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
          const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h)};
          pack_transposed(head_rows<const scalar_t>(q, b, h), ws.rows, ncols, D, static_cast<acc_t>(P.scale), BM,
                          ws.qT.data());
          std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));
          std::fill(ws.m.begin(), ws.m.begin() + ncols, neg_inf);
          std::fill(ws.l.begin(), ws.l.begin() + ncols, acc_t(0));

          for_each_key_tile(ws.keys, [&](const TileKeys& keys, bool masked, int64_t r0) {
            const bool extra = keys.list != nullptr;
            const acc_t* kp = extra ? ws.k_extra.data() + r0 * D : kv_rows.k + (span_row0 + r0) * kv_rows.ld;
            const acc_t* vp = extra ? ws.v_extra.data() + r0 * D : kv_rows.v + (span_row0 + r0) * kv_rows.ld;
            const int64_t ld = extra ? D : kv_rows.ld;
            acc_t* S = ws.S.data();
            ops.gemm(keys.n, ncols, D, kp, ld, 1, ws.qT.data(), BM, S, BM, false);
            finalize_tile(bc, keys, masked, S, BM, static_cast<acc_t*>(nullptr), ws.first, ws.end);
            if (sigmoid_score) {
              ops.sigmoid_tile(S, BM, keys.n, ncols, bias);
            } else {
              ops.softmax_tile(S, BM, keys.n, ncols, ws.m.data(), ws.l.data(), ws.alpha.data());
              for (int64_t a = 0; a < nq; ++a) {
                const acc_t al = ws.alpha[a];
                if (al == acc_t(1)) continue;
                acc_t* o = ws.acc.data() + a * D;
                for (int64_t d = 0; d < D; ++d) o[d] *= al;
              }
            }
            ops.gemm(nq, D, keys.n, S, 1, BM, vp, ld, ws.acc.data(), D, true);
          });

          auto O = head_rows<scalar_t>(out, b, h);
          acc_t* lse_row = lse.data_ptr<acc_t>() + (b * P.q_heads + h) * P.q_len;
          for (int64_t a = 0; a < nq; ++a) {
            scalar_t* o = O.row(ws.rows[a]);
            const acc_t* src = ws.acc.data() + a * D;
            if (sigmoid_score) {
              for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(src[d]);
              lse_row[ws.rows[a]] = acc_t(0);  // not defined for sigmoid
              continue;
            }
            const bool empty = !(ws.l[a] > acc_t(0));  // a row with no allowed key returns zeros
            const acc_t inv = empty ? acc_t(0) : acc_t(1) / ws.l[a];
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(src[d] * inv);
            lse_row[ws.rows[a]] = empty ? neg_inf : ws.m[a] + std::log(ws.l[a]);
          }
        }
      }
    }
  });
}

// --------------------------------------------------------------- backward --

// rowdot[b,h,i] = dO_i . O_i - dlse_i: the softmax backward's row constant.
template <typename scalar_t>
at::Tensor softmax_row_dots(const AttentionParams& P, const at::Tensor& grad_out, const at::Tensor& out,
                            const c10::optional<at::Tensor>& grad_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor rowdot = at::empty({P.batch, P.q_heads, P.q_len}, out.options().dtype(c10::CppTypeToScalarType<acc_t>()));
  at::Tensor glse;
  if (grad_lse.has_value()) glse = grad_lse->to(rowdot.scalar_type()).contiguous();
  const int64_t D = P.head_dim;
  at::parallel_for(0, P.batch * P.q_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / P.q_heads, h = bh % P.q_heads;
      const auto go = head_rows<const scalar_t>(grad_out, b, h);
      const auto o = head_rows<const scalar_t>(out, b, h);
      acc_t* r = rowdot.data_ptr<acc_t>() + bh * P.q_len;
      const acc_t* gl = glse.defined() ? glse.data_ptr<acc_t>() + bh * P.q_len : nullptr;
      for (int64_t i = 0; i < P.q_len; ++i) {
        acc_t sum = acc_t(0);
        for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(go.row(i)[d]) * static_cast<acc_t>(o.row(i)[d]);
        r[i] = gl ? sum - gl[i] : sum;
      }
    }
  });
  return rowdot;
}

// The key gradients one chunk accumulated: rows of its span, and rows of the
// global keys (by rank) it reached as extras.
template <typename acc_t>
struct ChunkKeyGrads {
  KeyRange span;
  std::vector<acc_t> dk, dv;              // span.count x D
  std::vector<acc_t> dk_extra, dv_extra;  // n_global x D, empty when no extras were visited
};

template <typename scalar_t>
void backward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                     const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, BM = kRowBlock, off = P.position_offset();
  const acc_t scale = static_cast<acc_t>(P.scale);
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const bool softcap = P.softcap > 0.0;
  const acc_t bias = static_cast<acc_t>(P.sigmoid_bias);
  const at::Tensor rowdot = sigmoid_score ? at::Tensor() : softmax_row_dots<scalar_t>(P, grad_out, out, grad_lse);
  const at::Tensor lse_acc = lse.contiguous();
  auto row_stats = [&](const at::Tensor& t, int64_t b, int64_t h) -> const acc_t* {
    return t.defined() ? t.data_ptr<acc_t>() + (b * P.q_heads + h) * P.q_len : nullptr;
  };
  const auto& chunks = plan.row_chunks();
  std::vector<ChunkKeyGrads<acc_t>> key_grads(chunks.size());

  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> ws(D, /*backward=*/true);
    if (softcap) ws.F.resize(kKeyTile * kRowBlock);
    KeyRows<scalar_t, acc_t> kv_rows;
    for (int64_t ci = begin; ci < end; ++ci) {
      const RowChunk& chunk = chunks[ci];
      const int64_t b = chunk.batch, hk = chunk.kv_head;
      const auto K = head_rows<const scalar_t>(k, b, hk);
      const auto V = head_rows<const scalar_t>(v, b, hk);
      ChunkKeyGrads<acc_t>& grads = key_grads[ci];
      grads.span = plan.span_of_chunk(chunk);
      kv_rows.prepare(K, V, grads.span, D);
      grads.dk.assign(grads.span.count * D, acc_t(0));
      grads.dv.assign(grads.span.count * D, acc_t(0));

      for (int64_t t = chunk.first_block; t < chunk.first_block + chunk.n_blocks; ++t) {
        plan.rows_of_block(chunk, t, &ws.rows);
        if (ws.rows.empty()) continue;
        const int64_t nq = static_cast<int64_t>(ws.rows.size());
        const int64_t ncols = round_up(nq, ops.vec_width);
        ws.pos.resize(nq);
        for (int64_t a = 0; a < nq; ++a) ws.pos[a] = ws.rows[a] + off;
        plan.keys_of_block(chunk, ws.rows, &ws.keys);
        gather_extras(ws.keys, K, V, D, ws);
        if (!ws.keys.extras.empty() && grads.dk_extra.empty()) {
          const int64_t n_global = static_cast<int64_t>(plan.global_keys(b).size());
          grads.dk_extra.assign(n_global * D, acc_t(0));
          grads.dv_extra.assign(n_global * D, acc_t(0));
        }
        const int64_t span_row0 =
            ws.keys.span.count > 0 ? (ws.keys.span.lo - grads.span.lo) / std::max<int64_t>(grads.span.stride, 1) : 0;

        for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
          const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h)};
          const auto Q = head_rows<const scalar_t>(q, b, h);
          const auto GO = head_rows<const scalar_t>(grad_out, b, h);
          pack_transposed(Q, ws.rows, ncols, D, scale, BM, ws.qT.data());
          pack_transposed(GO, ws.rows, ncols, D, acc_t(1), BM, ws.goT.data());
          gather_rows(Q, ws.rows.data(), nq, D, ws.q_rows.data());
          for (int64_t i = 0; i < nq * D; ++i) ws.q_rows[i] *= scale;
          gather_rows(GO, ws.rows.data(), nq, D, ws.go_rows.data());
          const acc_t* lse_all = row_stats(lse_acc, b, h);
          const acc_t* dot_all = row_stats(rowdot, b, h);
          for (int64_t a = 0; a < ncols; ++a) {
            ws.lse[a] = a < nq && !sigmoid_score ? lse_all[ws.rows[a]] : acc_t(0);
            ws.dot[a] = a < nq && dot_all ? dot_all[ws.rows[a]] : acc_t(0);
          }
          std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));

          for_each_key_tile(ws.keys, [&](const TileKeys& keys, bool masked, int64_t r0) {
            const bool extra = keys.list != nullptr;
            const acc_t* kp = extra ? ws.k_extra.data() + r0 * D : kv_rows.k + (span_row0 + r0) * kv_rows.ld;
            const acc_t* vp = extra ? ws.v_extra.data() + r0 * D : kv_rows.v + (span_row0 + r0) * kv_rows.ld;
            const int64_t ld = extra ? D : kv_rows.ld;
            const int64_t nk = keys.n;
            acc_t* S = ws.S.data();
            acc_t* G = ws.G.data();
            acc_t* F = softcap ? ws.F.data() : nullptr;
            ops.gemm(nk, ncols, D, kp, ld, 1, ws.qT.data(), BM, S, BM, false);   // S^T = K Q^T
            ops.gemm(nk, ncols, D, vp, ld, 1, ws.goT.data(), BM, G, BM, false);  // dP^T = V dO^T
            finalize_tile(bc, keys, masked, S, BM, F, ws.first, ws.end);
            if (sigmoid_score) {
              ops.sigmoid_grad_tile(S, G, F, BM, nk, ncols, bias);
            } else {
              ops.softmax_grad_tile(S, G, F, BM, nk, ncols, ws.lse.data(), ws.dot.data());
            }
            // dQ += dS K
            ops.gemm(nq, D, nk, G, 1, BM, kp, ld, ws.acc.data(), D, true);
            // dK += dS^T Q, dV += P^T dO, into the chunk's span rows or a scratch for extras
            acc_t* dk_dst;
            acc_t* dv_dst;
            if (extra) {
              ws.dk_extra.assign(nk * D, acc_t(0));
              ws.dv_extra.assign(nk * D, acc_t(0));
              dk_dst = ws.dk_extra.data();
              dv_dst = ws.dv_extra.data();
            } else {
              dk_dst = grads.dk.data() + (span_row0 + r0) * D;
              dv_dst = grads.dv.data() + (span_row0 + r0) * D;
            }
            ops.gemm(nk, D, nq, G, BM, 1, ws.q_rows.data(), D, dk_dst, D, true);
            ops.gemm(nk, D, nq, S, BM, 1, ws.go_rows.data(), D, dv_dst, D, true);
            if (extra) {
              for (int64_t c = 0; c < nk; ++c) {
                const int64_t rank = ws.keys.extra_ranks[r0 + c];
                for (int64_t d = 0; d < D; ++d) {
                  grads.dk_extra[rank * D + d] += ws.dk_extra[c * D + d];
                  grads.dv_extra[rank * D + d] += ws.dv_extra[c * D + d];
                }
              }
            }
          });

          auto dQ = head_rows<scalar_t>(dq, b, h);
          for (int64_t a = 0; a < nq; ++a) {
            scalar_t* o = dQ.row(ws.rows[a]);
            for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(scale * ws.acc[a * D + d]);
          }
        }
      }
    }
  });

  // Sum the chunks' key gradients per key in chunk order (deterministic).
  std::vector<std::vector<int64_t>> chunks_of_head(P.batch * P.kv_heads);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    chunks_of_head[chunks[ci].batch * P.kv_heads + chunks[ci].kv_head].push_back(static_cast<int64_t>(ci));
  }
  constexpr int64_t kKeysPerTask = 256;
  const int64_t tasks_per_head = (P.k_len + kKeysPerTask - 1) / kKeysPerTask;
  at::parallel_for(0, P.batch * P.kv_heads * tasks_per_head, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sk(D), sv(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / tasks_per_head;
      const int64_t b = bh / P.kv_heads, hk = bh % P.kv_heads;
      const int64_t j0 = (task % tasks_per_head) * kKeysPerTask;
      auto dK = head_rows<scalar_t>(dk, b, hk);
      auto dV = head_rows<scalar_t>(dv, b, hk);
      for (int64_t j = j0; j < std::min(j0 + kKeysPerTask, P.k_len); ++j) {
        std::fill(sk.begin(), sk.end(), acc_t(0));
        std::fill(sv.begin(), sv.end(), acc_t(0));
        const bool global = plan.key_is_global(b, j);
        const int64_t rank = global ? plan.global_rank(b, j) : -1;
        for (int64_t ci : chunks_of_head[bh]) {
          const ChunkKeyGrads<acc_t>& g = key_grads[ci];
          if (g.span.contains(j)) {
            const int64_t r = (j - g.span.lo) / g.span.stride;
            for (int64_t d = 0; d < D; ++d) {
              sk[d] += g.dk[r * D + d];
              sv[d] += g.dv[r * D + d];
            }
          }
          if (global && !g.dk_extra.empty()) {
            for (int64_t d = 0; d < D; ++d) {
              sk[d] += g.dk_extra[rank * D + d];
              sv[d] += g.dv_extra[rank * D + d];
            }
          }
        }
        scalar_t* ok = dK.row(j);
        scalar_t* ov = dV.row(j);
        for (int64_t d = 0; d < D; ++d) {
          ok[d] = static_cast<scalar_t>(sk[d]);
          ov[d] = static_cast<scalar_t>(sv[d]);
        }
      }
    }
  });
}

// ------------------------------------------------------------ entry points --

// Enough chunks that every thread gets several (the plan caps it by the work there is).
int64_t target_chunks() { return 4 * at::get_num_threads(); }

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, int64_t dilation, c10::string_view score,
    c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  at::Tensor out = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::full({P.batch, P.q_heads, P.q_len}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0 || P.k_len == 0) return {out, lse};
  const TilePlan plan(P, global_mask, target_chunks());
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(P, plan, q, k, v, slopes, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, int64_t dilation, c10::string_view score,
    c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse, grad_lse);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in), out = with_contiguous_rows(out_in);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::zeros(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::zeros(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::zeros(v.sizes(), v.options().memory_format(contiguous));
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk, dv};
  const TilePlan plan(P, global_mask, target_chunks());
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_bwd_cpu", [&] {
    backward_kernel<scalar_t>(P, plan, grad_out, grad_lse, q, k, v, out, lse, slopes, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
}

}  // namespace longreach::cpu
