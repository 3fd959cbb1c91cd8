// CPU forward and backward of longreach::local_attention.
//
// Flash-style and O(L * keys per row). Work is cut into RowChunks (tile_plan.h):
// runs of blocks of 64 query rows of one (batch, kv head, residue class). A
// chunk packs the keys its blocks read once (K^T and V^T as panel-major "B"
// operands, see pack_columns) and serves every query head of its GQA group.
// Each block visits the span of keys its windows cover, in tiles of up to
// kKeyTile keys, then the global keys outside the band ("extras"). In a tile,
// row a sees one run of keys [first[a], end[a]) (plan_runs), and every product
// runs on the register-blocked vector kernels of tile_ops.h, banded by those
// runs so that the masked triangles at the band's edges are (almost) skipped:
//
//   forward:  S = Q K^T,  online softmax (or sigmoid) along the rows,  O += P V
//   backward: S = Q K^T,  dP = dO V^T,  P and dS,
//             dQ += dS K,   dK += dS^T Q,   dV += P^T dO
//
// The backward is one pass over the rows: a chunk accumulates the dK and dV
// of the keys it touches in private float buffers, and a final pass sums the
// chunks' buffers per key in plan order, so results are deterministic and do
// not depend on the number of threads. The window and score math come from
// csrc/common (window.h: window_key_range, in_window, tile_in_window;
// scores.h: soft-cap, ALiBi and their gradients, the softmax / sigmoid
// gradients).
//
// float32 and float64 rows are read in place; bfloat16 and float16 rows are
// converted to float once per chunk (keys) or block (queries) and accumulated
// in float.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <new>
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

// Most keys per score tile: a block's whole span for windows up to ~1000 keys,
// so each row's softmax runs once, without rescaling (measured best on
// AVX-512; the S tile is 64 x 1024 floats, an L2-resident 256 KiB).
constexpr int64_t kKeyTile = 1024;

// Longest chunk, in blocks of rows. The forward packs a chunk's K^T up front,
// then every block rereads its span of it: at 16 blocks ((1024 + window) keys,
// about 400 KiB for a 511-key window at D = 64) it is still in L2 when read;
// at 64 blocks two threads at L = 32768 ran ~15% slower (the packed keys had
// left L2). The backward keeps 64: its chunks sum their key gradients at the
// end, and more, shorter chunks made it ~15% slower (measured 2 threads, L =
// 32768, window (511, 0), D = 64).
constexpr int64_t kForwardChunkBlocks = 16;
constexpr int64_t kBackwardChunkBlocks = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch and packed operands start on a cache line, so the 64-byte vector
// loads and stores of the kernels never straddle two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

template <typename T>
struct HeadRows {  // rows of one head of one problem, contiguous within a row
  T* data;
  int64_t stride_l;
  T* row(int64_t l) const { return data + l * stride_l; }
};

// Head h of problem b: batch row b of a dense (B, H, L, D) tensor, or the rows
// from `start` on of a packed (total, H, D) tensor (start: the sequence's
// q_start or k_start, see geometry.h).
template <typename T>
HeadRows<T> head_rows(const at::Tensor& t, int64_t b, int64_t start, int64_t h) {
  T* base = static_cast<T*>(t.data_ptr());
  if (t.dim() == 3) return {base + start * t.stride(0) + h * t.stride(1), t.stride(0)};
  return {base + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Query-side (q, out, grad_out, dq) and key-side (k, v, dk, dv) rows of problem b.
template <typename T>
HeadRows<T> q_rows(const at::Tensor& t, const TilePlan& plan, int64_t b, int64_t h) {
  return head_rows<T>(t, b, plan.seq(b).q_start, h);
}
template <typename T>
HeadRows<T> k_rows(const at::Tensor& t, const TilePlan& plan, int64_t b, int64_t h) {
  return head_rows<T>(t, b, plan.seq(b).k_start, h);
}

// Per-row statistics (lse, the softmax row dots) of head h of problem b: a
// dense (B, Hq, Lq) tensor or a packed (Hq, total_q) one, contiguous.
template <typename T>
T* stat_row(const at::Tensor& t, const AttentionParams& P, const TilePlan& plan, int64_t b, int64_t h) {
  T* base = t.data_ptr<T>();
  if (t.dim() == 2) return base + h * t.size(1) + plan.seq(b).q_start;
  return base + (b * P.q_heads + h) * P.q_len;
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// dst[i] = mul * src[i] from the input type to the accumulation type, and back
// (vectorised for bfloat16 / float16 by the ISA tables).
template <typename scalar_t, typename acc_t>
void convert_in(const TileOps<acc_t>& ops, const scalar_t* src, int64_t n, acc_t mul, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = mul * src[i];
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ops.bf16_to_float(src, n, mul, dst);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "unexpected input type");
    ops.half_to_float(src, n, mul, dst);
  }
}

template <typename scalar_t, typename acc_t>
void convert_out(const TileOps<acc_t>& ops, const acc_t* src, int64_t n, acc_t mul, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = mul * src[i];
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ops.float_to_bf16(src, n, mul, dst);
  } else {
    ops.float_to_half(src, n, mul, dst);
  }
}

template <typename acc_t>
acc_t alibi_slope(const AttentionParams& P, const at::Tensor& slopes, int64_t b, int64_t h) {
  if (!P.has_alibi) return acc_t(0);
  const float* s = slopes.data_ptr<float>();
  return static_cast<acc_t>(slopes.dim() == 2 ? s[b * slopes.stride(0) + h * slopes.stride(1)]
                                              : s[h * slopes.stride(0)]);
}

// ------------------------------------------------------- key/value rows --

// Rows of a (B, H, L, D) head as acc_t rows: row r of a chunk's key range (or
// of a block's rows) at ptr + r * ld. float/double inputs at regular strides
// are used in place; anything else is gathered (and converted) into `copy`.
template <typename acc_t>
struct Rows {
  const acc_t* ptr = nullptr;
  int64_t ld = 0;
  Buffer<acc_t> copy;
  const acc_t* row(int64_t r) const { return ptr + r * ld; }
};

template <typename scalar_t, typename acc_t, typename IndexFn>
void load_rows(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& src, int64_t n, IndexFn&& index,
               bool regular, int64_t D, Rows<acc_t>* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (regular) {
      out->ptr = n > 0 ? src.row(index(0)) : nullptr;
      out->ld = n > 1 ? src.row(index(1)) - src.row(index(0)) : D;
      return;
    }
  }
  out->copy.resize(std::max<int64_t>(n, 1) * D);
  for (int64_t r = 0; r < n; ++r) convert_in(ops, src.row(index(r)), D, acc_t(1), out->copy.data() + r * D);
  out->ptr = out->copy.data();
  out->ld = D;
}

// Keys as columns, the B operand of S = Q K^T and dP = dO V^T, panel-major as
// gemm_band_n wants it: element (x, r) = mul * src.row(index(r))[x] at
// dst[((r / W) * (D + 1) + x) * W + r % W] (a padding row per group). One zero group of slack past the last key
// (gemm_band_n may read whole vectors there). Each group of W keys is copied
// into a small row-major block, then transposed with the ISA's shuffles.
template <typename scalar_t, typename acc_t, typename IndexFn>
void pack_columns(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& src, int64_t n, IndexFn&& index,
                  int64_t D, acc_t mul, Buffer<acc_t>* dst) {
  const int64_t W = ops.vec_width;
  const int64_t groups = (n + W - 1) / W + 1;
  dst->assign(groups * (D + 1) * W, acc_t(0));
  Buffer<acc_t> rows(W * D);
  for (int64_t g = 0; g * W < n; ++g) {
    const int64_t r0 = g * W, nr = std::min(W, n - r0);
    for (int64_t r = 0; r < nr; ++r) convert_in(ops, src.row(index(r0 + r)), D, mul, rows.data() + r * D);
    acc_t* block = dst->data() + g * (D + 1) * W;
    for (int64_t x0 = 0; x0 < D; x0 += W) {
      ops.transpose(rows.data() + x0, D, block + x0 * W, W, nr, std::min(W, D - x0));
    }
  }
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

// Which keys of a tile each row sees: run[a] = [first[a], end[a]) of tile
// columns. Inside the band the window is monotone in the row position, so the
// band part is found by two pointers with window.h's in_window. A global key
// inside a masked tile is seen by every row, which can break a run: then the
// run is widened to the hull and `interior` marks that the columns of the hull
// outside [band_first, band_end) that are not global must be masked.
struct TileRuns {
  std::vector<int64_t> first, end, band_first, band_end;
  bool interior = false;
  bool masked = false;
  // The transpose, for the key-side products of the backward: key c is in the
  // runs of rows [key_first[c], key_end[c]).
  std::vector<int64_t> key_first, key_end;
};

// Runs are monotone (first and end never decrease with the row), so the rows
// whose run holds key c form one interval, found by two pointers.
void transpose_runs(int64_t nq, int64_t nk, TileRuns* runs) {
  runs->key_first.resize(nk);
  runs->key_end.resize(nk);
  int64_t lo = 0, hi = 0;
  for (int64_t c = 0; c < nk; ++c) {
    while (lo < nq && runs->end[lo] <= c) ++lo;    // rows whose run ends before c
    while (hi < nq && runs->first[hi] <= c) ++hi;  // rows whose run starts at or before c
    runs->key_first[c] = lo;
    runs->key_end[c] = std::max(lo, hi);
  }
}

template <typename acc_t>
void plan_runs(const BlockContext<acc_t>& bc, const TileKeys& keys, bool span_masked, int64_t valid_from,
               TileRuns* runs) {
  const AttentionParams& P = *bc.P;
  const int64_t nq = bc.nq, nk = keys.n;
  runs->first.assign(nq, 0);
  runs->end.assign(nq, nk);
  runs->interior = false;
  // A tile inside the band needs no mask even when its block's span does.
  runs->masked = span_masked && !tile_in_window(P.window, bc.pos[0], bc.pos[nq - 1], keys.key(0), keys.key(nk - 1));
  if (!runs->masked) return;
  // Masked tiles are span tiles: keys lo, lo + stride, ... of the rows' class.
  for (int64_t a = 0; a < nq; ++a) {
    int64_t lo, hi;
    window_key_range(P.window, bc.plan->seq(bc.batch), bc.pos[a], &lo, &hi);
    const int64_t f = lo <= keys.lo ? 0 : std::min(nk, (lo - keys.lo + keys.stride - 1) / keys.stride);
    const int64_t e = hi < keys.lo ? 0 : std::min(nk, (hi - keys.lo) / keys.stride + 1);
    runs->first[a] = f;
    runs->end[a] = std::max(f, e);
  }
  if (!bc.plan->has_global()) return;
  // Global keys left of valid_from (an alignment margin before the block's
  // span) belong to the block's extras, not to this tile.
  int64_t g_first = nk, g_last = -1;
  for (int64_t c = valid_from; c < nk; ++c) {
    if (bc.plan->key_is_global(bc.batch, keys.key(c))) {
      g_first = std::min(g_first, c);
      g_last = c;
    }
  }
  if (g_last < 0) return;
  runs->band_first = runs->first;
  runs->band_end = runs->end;
  // Widen every run to its hull with [g_first, g_last]. The band runs are
  // monotone, an empty one sitting at column 0 (band left of the tile, or a
  // row at a negative position when Lq > Lk) or nk (band right of it); taking
  // min/max with constants keeps them monotone, which transpose_runs (the
  // backward's key-side products) relies on. Columns before valid_from are
  // never in a run: their global keys are the block's extras.
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t f = std::max(runs->first[a], valid_from);
    runs->first[a] = std::min(f, g_first);
    runs->end[a] = std::max(std::max(runs->end[a], f), g_last + 1);
  }
  runs->interior = true;
}

// Is column c of row a allowed (given that it lies in the row's run)?
template <typename acc_t>
bool run_allows(const BlockContext<acc_t>& bc, const TileKeys& keys, const TileRuns& runs, int64_t a, int64_t c) {
  if (!runs.interior) return true;
  return (c >= runs.band_first[a] && c < runs.band_end[a]) || bc.plan->key_is_global(bc.batch, keys.key(c));
}

// Turns S = scale * Q K^T into final scores on the rows' runs: -inf where a
// widened run is not allowed, then soft-cap and ALiBi (scores.h). With
// `factor`, also writes d(final score)/d(scale * q.k) for the soft-cap chain rule.
template <typename acc_t>
void finalize_tile(const BlockContext<acc_t>& bc, const TileKeys& keys, const TileRuns& runs, acc_t* S,
                   int64_t ld, acc_t* factor, int64_t a0 = 0, int64_t a1 = -1) {
  if (a1 < 0) a1 = bc.nq;
  const AttentionParams& P = *bc.P;
  const acc_t cap = static_cast<acc_t>(P.softcap);
  const bool transform = cap > acc_t(0) || bc.slope != acc_t(0);
  if (!runs.interior && !transform) return;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t a = a0; a < a1; ++a) {
    acc_t* s = S + (a - a0) * ld;
    acc_t* f = factor ? factor + (a - a0) * ld : nullptr;
    for (int64_t c = runs.first[a]; c < runs.end[a]; ++c) {
      if (!run_allows(bc, keys, runs, a, c)) {
        s[c] = neg_inf;
        if (f) f[c] = acc_t(0);
        continue;
      }
      if (!transform) continue;
      const int64_t dist = abs_distance(bc.pos[a], keys.key(c));
      s[c] = transform_score<acc_t>(s[c], cap, bc.slope, dist);
      if (f) f[c] = transform_score_grad<acc_t>(s[c], cap, bc.slope, dist);
    }
  }
}

// The tile's part of d loss / d slope (without its sign: scores.h subtracts
// slope * |p - j|): sum of dS * |p - j| over the rows' runs, where G holds dS
// with respect to the final scores (zero where a run is masked). Then applies
// the soft-cap chain factor to G, which the grad_rows call left out.
template <typename acc_t>
acc_t alibi_slope_grad_tile(const BlockContext<acc_t>& bc, const TileKeys& keys, const TileRuns& runs, acc_t* G,
                            const acc_t* factor, int64_t ld) {
  acc_t sum = acc_t(0);
  for (int64_t a = 0; a < bc.nq; ++a) {
    acc_t* g = G + a * ld;
    const acc_t* f = factor ? factor + a * ld : nullptr;
    for (int64_t c = runs.first[a]; c < runs.end[a]; ++c) {
      sum += g[c] * static_cast<acc_t>(abs_distance(bc.pos[a], keys.key(c)));
      if (f) g[c] *= f[c];
    }
  }
  return sum;
}

// Calls f(TileKeys, masked, col0, valid_from) for the tiles of a block. The
// span, whose first key is column span_col0 of the chunk's key operands, is cut
// into near-equal tiles of at most kKeyTile keys that start on whole vectors of
// W columns (the panel-major operands need it): the first tile may begin up to
// W - 1 keys before the span, keys no row of the block can see. Then the extras,
// whose columns are their own.
template <typename F>
void for_each_key_tile(const BlockKeys& keys, int64_t span_col0, int64_t W, F&& f) {
  const KeyRange& s = keys.span;
  if (s.count > 0) {
    const int64_t a0 = span_col0 / W * W, end = span_col0 + s.count, n = end - a0;
    const int64_t tiles = (n + kKeyTile - 1) / kKeyTile;
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t c0 = a0 + n * t / tiles / W * W;
      const int64_t c1 = t + 1 == tiles ? end : a0 + n * (t + 1) / tiles / W * W;
      const TileKeys tk{nullptr, s.lo + (c0 - span_col0) * s.stride, s.stride, c1 - c0};
      f(tk, keys.span_needs_mask || c0 < span_col0, c0, std::max<int64_t>(0, span_col0 - c0));
    }
  }
  const int64_t n_extra = static_cast<int64_t>(keys.extras.size());
  for (int64_t r0 = 0; r0 < n_extra; r0 += kKeyTile) {
    f(TileKeys{keys.extras.data() + r0, 0, 1, std::min<int64_t>(kKeyTile, n_extra - r0)}, false, r0, int64_t(0));
  }
}

// The key-side operands of a chunk (its span) or of a block's extras.
template <typename acc_t>
struct KeyOperands {
  Buffer<acc_t> kT, vT;  // scale * K^T and V^T, keys as columns, panel-major (pack_columns)
  Rows<acc_t> k, v;           // K and V rows
  int64_t D = 0, W = 0;
  // The panels from column c0 on (c0 a multiple of W).
  const acc_t* kT_from(int64_t c0) const { return kT.data() + c0 / W * (D + 1) * W; }
  const acc_t* vT_from(int64_t c0) const { return vT.data() + c0 / W * (D + 1) * W; }
};

// Which operands the tile loops read: the forward's products take scale * K^T
// packed and V rows, or, for blocks of a few rows (kFewRows), K and V rows as
// they are; the backward's take scale * K^T and V^T packed and K rows.
enum class KeyUse { kForward, kForwardFewRows, kBackward };

// A forward whose query rows are this few per head (decoding) reads keys as
// rows (TileOps::rows_dot / rows_axpy): packing K^T would cost as much as the
// products themselves. Measured 2.7x faster at one query row, window 512.
constexpr int64_t kFewRows = 4;

template <typename scalar_t, typename acc_t, typename IndexFn>
void load_key_operands(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V,
                       int64_t n, IndexFn&& index, bool regular, int64_t D, acc_t scale, KeyUse use,
                       KeyOperands<acc_t>* out) {
  out->D = D;
  out->W = ops.vec_width;
  switch (use) {
    case KeyUse::kForward:
      pack_columns(ops, K, n, index, D, scale, &out->kT);
      load_rows(ops, V, n, index, regular, D, &out->v);
      break;
    case KeyUse::kForwardFewRows:
      load_rows(ops, K, n, index, regular, D, &out->k);
      load_rows(ops, V, n, index, regular, D, &out->v);
      break;
    case KeyUse::kBackward:
      pack_columns(ops, K, n, index, D, scale, &out->kT);
      pack_columns(ops, V, n, index, D, acc_t(1), &out->vT);
      load_rows(ops, K, n, index, regular, D, &out->k);
      break;
  }
}

// Per-thread scratch of the tile loops.
template <typename acc_t>
struct Scratch {
  int64_t ld_s;                  // leading dimension of the score tiles
  Buffer<acc_t> S, G, F;    // kRowBlock x ld_s
  Buffer<acc_t> acc;        // kRowBlock x D: output or dQ accumulator
  Buffer<acc_t> m, l, alpha, lse, dot;
  Buffer<acc_t> dk_tile, dv_tile;
  Rows<acc_t> q, go;
  KeyOperands<acc_t> span, extra;
  std::vector<int64_t> rows, pos;
  TileRuns runs;
  BlockKeys keys;

  Scratch(int64_t D, int64_t vec_width, bool backward, bool softcap) {
    ld_s = round_up(kKeyTile, vec_width) + vec_width;
    S.resize(kRowBlock * ld_s);
    if (backward) G.resize(kRowBlock * ld_s);
    if (backward && softcap) F.resize(kRowBlock * ld_s);
    acc.resize(kRowBlock * D);
    for (auto* v : {&m, &l, &alpha, &lse, &dot}) v->resize(kRowBlock);
  }
};

// Loads a block's rows (Q, and dO for the backward) and its extras' key operands.
template <typename scalar_t, typename acc_t>
void load_block(const TileOps<acc_t>& ops, const AttentionParams& P, const TilePlan& plan, const RowChunk& chunk,
                int64_t t, const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V, KeyUse use,
                Scratch<acc_t>& ws) {
  plan.rows_of_block(chunk, t, &ws.rows);
  if (ws.rows.empty()) return;
  const int64_t nq = static_cast<int64_t>(ws.rows.size());
  ws.pos.resize(nq);
  const int64_t offset = plan.seq(chunk.batch).position_offset();
  for (int64_t a = 0; a < nq; ++a) ws.pos[a] = ws.rows[a] + offset;
  plan.keys_of_block(chunk, ws.rows, &ws.keys);
  const auto& extras = ws.keys.extras;
  if (!extras.empty()) {
    load_key_operands(ops, K, V, static_cast<int64_t>(extras.size()), [&](int64_t r) { return extras[r]; }, false,
                      P.head_dim, static_cast<acc_t>(P.scale), use, &ws.extra);
  }
}

// Asks the caches for rows[a] + shift of a head, the query rows the next
// head or block will read: they come from memory, and a micro-kernel waiting
// for its first operands would stall.
template <typename T>
void prefetch_rows(const HeadRows<const T>& src, const std::vector<int64_t>& rows, int64_t D, int64_t n_rows,
                   int64_t shift = 0) {
  constexpr int64_t kLine = 64;
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t r : rows) {
    if (r + shift >= n_rows) break;
    const char* p = reinterpret_cast<const char*>(src.row(r + shift));
    for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(p + o);
  }
}

// Equally spaced rows can be read in place with one leading dimension.
bool rows_are_regular(const std::vector<int64_t>& rows) {
  for (size_t a = 2; a < rows.size(); ++a) {
    if (rows[a] - rows[a - 1] != rows[1] - rows[0]) return false;
  }
  return true;
}

// Runs body(item, scratch) for items 0..n-1 on the intra-op threads, handing
// items out one at a time from a shared counter: on a machine where a core
// can be taken away for a while, the other threads pick up its share instead
// of waiting for it at the end. Which thread runs an item never changes the
// result (items write disjoint outputs or private buffers).
template <typename MakeScratch, typename Body>
void parallel_items(int64_t n, MakeScratch&& make_scratch, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, scratch);
  });
}

// ---------------------------------------------------------------- forward --

template <typename scalar_t>
void forward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slopes, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, W = ops.vec_width;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto& chunks = plan.row_chunks();

  const bool few_rows = P.q_len <= kFewRows;
  const KeyUse use = few_rows ? KeyUse::kForwardFewRows : KeyUse::kForward;

  auto make_scratch = [&] { return Scratch<acc_t>(D, W, /*backward=*/false, /*softcap=*/false); };
  parallel_items(static_cast<int64_t>(chunks.size()), make_scratch, [&](int64_t ci, Scratch<acc_t>& ws) {
    const RowChunk& chunk = chunks[ci];
    const int64_t b = chunk.batch, hk = chunk.kv_head;
    const auto K = k_rows<const scalar_t>(k, plan, b, hk);
    const auto V = k_rows<const scalar_t>(v, plan, b, hk);
    const int64_t q_len = plan.seq(b).q_len;
    const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, plan.seq(b)));
    const KeyRange chunk_keys = plan.span_of_chunk(chunk);
    load_key_operands(ops, K, V, chunk_keys.count, [&](int64_t r) { return chunk_keys.at(r); }, true, D, scale,
                      use, &ws.span);

    for (int64_t t = chunk.first_block; t < chunk.first_block + chunk.n_blocks; ++t) {
      load_block(ops, P, plan, chunk, t, K, V, use, ws);
      if (ws.rows.empty()) continue;
      const int64_t nq = static_cast<int64_t>(ws.rows.size());
      // Offset of the block's span inside the chunk's key rows.
      const int64_t span_row0 = ws.keys.span.count > 0 ? (ws.keys.span.lo - chunk_keys.lo) / chunk_keys.stride : 0;

      for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
        const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h)};
        load_rows(ops, q_rows<const scalar_t>(q, plan, b, h), nq, [&](int64_t a) { return ws.rows[a]; },
                  rows_are_regular(ws.rows), D, &ws.q);
        if (h + 1 < (hk + 1) * P.group_size()) {
          prefetch_rows(q_rows<const scalar_t>(q, plan, b, h + 1), ws.rows, D, q_len);
        } else if (t + 1 < chunk.first_block + chunk.n_blocks) {
          prefetch_rows(q_rows<const scalar_t>(q, plan, b, hk * P.group_size()), ws.rows, D, q_len,
                        kRowBlock * P.window.dilation);
        }
        std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));
        std::fill(ws.m.begin(), ws.m.begin() + nq, neg_inf);
        std::fill(ws.l.begin(), ws.l.begin() + nq, acc_t(0));
        bool first_tile = true;

        for_each_key_tile(ws.keys, span_row0, W, [&](const TileKeys& keys, bool masked, int64_t col0,
                                                     int64_t valid_from) {
          const KeyOperands<acc_t>& ko = keys.list != nullptr ? ws.extra : ws.span;
          TileRuns& runs = ws.runs;
          plan_runs(bc, keys, masked, valid_from, &runs);
          const int64_t* first = runs.first.data();
          const int64_t* last = runs.end.data();
          acc_t* S = ws.S.data();
          if (few_rows) {
            ops.rows_dot(nq, D, ws.q.ptr, ws.q.ld, ko.k.row(col0), ko.k.ld, scale, S, ws.ld_s, first, last);
          } else {
            ops.gemm_band_n(nq, keys.n, D, ws.q.ptr, ws.q.ld, 1, ko.kT_from(col0), S, ws.ld_s, first, last);
          }
          finalize_tile(bc, keys, runs, S, ws.ld_s, static_cast<acc_t*>(nullptr));
          if (sigmoid_score) {
            ops.sigmoid_rows(S, ws.ld_s, nq, first, last, bias);
          } else {
            ops.softmax_rows(S, ws.ld_s, nq, first, last, ws.m.data(), ws.l.data(), ws.alpha.data());
            for (int64_t a = 0; a < nq && !first_tile; ++a) {  // nothing to rescale before the first tile
              const acc_t al = ws.alpha[a];
              if (al == acc_t(1)) continue;
              acc_t* o = ws.acc.data() + a * D;
              for (int64_t d = 0; d < D; ++d) o[d] *= al;
            }
          }
          if (few_rows) {
            ops.rows_axpy(nq, D, S, ws.ld_s, ko.v.row(col0), ko.v.ld, ws.acc.data(), D, first, last);
          } else {
            ops.gemm_band_k(nq, D, keys.n, S, ws.ld_s, 1, ko.v.row(col0), ko.v.ld, ws.acc.data(), D, first, last);
          }
          first_tile = false;
        });

        auto O = q_rows<scalar_t>(out, plan, b, h);
        acc_t* lse_row = stat_row<acc_t>(lse, P, plan, b, h);
        for (int64_t a = 0; a < nq; ++a) {
          const acc_t* src = ws.acc.data() + a * D;
          if (sigmoid_score) {
            convert_out(ops, src, D, acc_t(1), O.row(ws.rows[a]));
            lse_row[ws.rows[a]] = acc_t(0);  // not defined for sigmoid
            continue;
          }
          // A row with no allowed key returns zeros; a NaN sum (a NaN score) gives NaN.
          const bool empty = ws.l[a] == acc_t(0);
          convert_out(ops, src, D, empty ? acc_t(0) : acc_t(1) / ws.l[a], O.row(ws.rows[a]));
          lse_row[ws.rows[a]] = empty ? neg_inf : ws.m[a] + std::log(ws.l[a]);
        }
      }
    }
  });
}

// --------------------------------------------------------------- backward --

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
  at::parallel_for(0, P.batch * P.q_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / P.q_heads, h = bh % P.q_heads;
      const auto go = q_rows<const scalar_t>(grad_out, plan, b, h);
      const auto o = q_rows<const scalar_t>(out, plan, b, h);
      acc_t* r = stat_row<acc_t>(rowdot, P, plan, b, h);
      const acc_t* gl = glse.defined() ? stat_row<acc_t>(glse, P, plan, b, h) : nullptr;
      for (int64_t i = 0; i < plan.seq(b).q_len; ++i) {
        acc_t sum = acc_t(0);
        for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(go.row(i)[d]) * static_cast<acc_t>(o.row(i)[d]);
        r[i] = gl ? sum - gl[i] : sum;
      }
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
  auto same_run = [&](size_t a, size_t b) {
    return chunks[a].batch == chunks[b].batch && chunks[a].kv_head == chunks[b].kv_head &&
           chunks[a].global_rows == chunks[b].global_rows && chunks[a].cls == chunks[b].cls;
  };
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    ChunkKeyGrads<acc_t>& g = (*grads)[ci];
    if (!outputs_accumulate || chunks[ci].global_rows || plan.has_global_rows(chunks[ci].batch) ||
        g.span.count == 0) {
      continue;
    }
    int64_t begin = 0, end = g.span.count;
    if (ci > 0 && same_run(ci - 1, ci) && (*grads)[ci - 1].span.count > 0) {
      const KeyRange& prev = (*grads)[ci - 1].span;
      const int64_t prev_last = prev.at(prev.count - 1);
      begin = std::clamp<int64_t>((prev_last - g.span.lo) / g.span.stride + 1, 0, g.span.count);
    }
    if (ci + 1 < chunks.size() && same_run(ci, ci + 1) && (*grads)[ci + 1].span.count > 0) {
      const KeyRange& next = (*grads)[ci + 1].span;
      end = std::clamp<int64_t>((next.lo - g.span.lo) / g.span.stride, begin, g.span.count);
    }
    g.own_begin = begin;
    g.own_end = std::max(begin, end);
  }
}

template <typename scalar_t>
void backward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                     const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dslopes) {
  using acc_t = at::opmath_type<scalar_t>;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, W = ops.vec_width;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const bool softcap = P.softcap > 0.0;
  const at::Tensor lse_acc = lse.contiguous();
  const at::Tensor rowdot =
      sigmoid_score ? at::Tensor() : softmax_row_dots<scalar_t>(P, plan, grad_out, out, lse_acc, grad_lse);
  auto row_stats = [&](const at::Tensor& t, int64_t b, int64_t h) -> const acc_t* {
    return t.defined() ? stat_row<acc_t>(t, P, plan, b, h) : nullptr;
  };
  const auto& chunks = plan.row_chunks();
  std::vector<ChunkKeyGrads<acc_t>> key_grads(chunks.size());
  assign_owned_rows(plan, std::is_same_v<scalar_t, acc_t>, &key_grads);

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
                      KeyUse::kBackward, &ws.span);
    if (dslopes) grads.dslope.assign(P.group_size(), acc_t(0));
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
      load_block(ops, P, plan, chunk, t, K, V, KeyUse::kBackward, ws);
      if (ws.rows.empty()) continue;
      const int64_t nq = static_cast<int64_t>(ws.rows.size());
      if (!ws.keys.extras.empty() && grads.dk_extra.empty()) {
        const int64_t n_global = static_cast<int64_t>(plan.global_keys(b).size());
        grads.dk_extra.assign(n_global * D, acc_t(0));
        grads.dv_extra.assign(n_global * D, acc_t(0));
      }
      const int64_t span_row0 = ws.keys.span.count > 0 ? (ws.keys.span.lo - chunk_keys.lo) / chunk_keys.stride : 0;
      const bool regular = rows_are_regular(ws.rows);
      auto row_index = [&](int64_t a) { return ws.rows[a]; };

      for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
        const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h)};
        load_rows(ops, q_rows<const scalar_t>(q, plan, b, h), nq, row_index, regular, D, &ws.q);
        load_rows(ops, q_rows<const scalar_t>(grad_out, plan, b, h), nq, row_index, regular, D, &ws.go);
        const acc_t* lse_all = row_stats(lse_acc, b, h);
        const acc_t* dot_all = row_stats(rowdot, b, h);
        for (int64_t a = 0; a < nq; ++a) {
          ws.lse[a] = sigmoid_score ? acc_t(0) : lse_all[ws.rows[a]];
          ws.dot[a] = dot_all ? dot_all[ws.rows[a]] : acc_t(0);
        }
        std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));

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
          // S = scale Q K^T, dP = dO V^T
          ops.gemm_band_n(nq, nk, D, ws.q.ptr, ws.q.ld, 1, ko.kT_from(col0), S, ws.ld_s, first, last);
          ops.gemm_band_n(nq, nk, D, ws.go.ptr, ws.go.ld, 1, ko.vT_from(col0), G, ws.ld_s, first, last);
          finalize_tile(bc, keys, runs, S, ws.ld_s, F);
          // With learnable slopes the soft-cap factor is applied after the
          // slope gradient has read dS with respect to the final score.
          const acc_t* grad_factor = dslopes ? nullptr : F;
          if (sigmoid_score) {
            ops.sigmoid_grad_rows(S, G, grad_factor, ws.ld_s, nq, nk, first, last, bias);
          } else {
            ops.softmax_grad_rows(S, G, grad_factor, ws.ld_s, nq, nk, first, last, ws.lse.data(), ws.dot.data());
          }
          if (dslopes) grads.dslope[h - hk * P.group_size()] += alibi_slope_grad_tile(bc, keys, runs, G, F, ws.ld_s);
          // dQ += dS K
          ops.gemm_band_k(nq, D, nk, G, ws.ld_s, 1, ko.k.row(col0), ko.k.ld, ws.acc.data(), D, first, last);
          // dK += dS^T Q, dV += P^T dO: into the chunk's span rows, or a scratch for extras
          transpose_runs(nq, nk, &runs);
          // Keys [c0, c1) of the tile into rows of ld `ld` at dk_dst / dv_dst.
          auto key_products = [&](int64_t c0, int64_t c1, acc_t* dk_dst, acc_t* dv_dst, int64_t ld) {
            if (c0 >= c1) return;
            ops.gemm_band_k(c1 - c0, D, nq, G + c0, 1, ws.ld_s, ws.q.ptr, ws.q.ld, dk_dst, ld,
                            runs.key_first.data() + c0, runs.key_end.data() + c0);
            ops.gemm_band_k(c1 - c0, D, nq, S + c0, 1, ws.ld_s, ws.go.ptr, ws.go.ld, dv_dst, ld,
                            runs.key_first.data() + c0, runs.key_end.data() + c0);
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
      }
    }
  });

  if (dslopes) {  // chunk by chunk in plan order, like the key gradients: deterministic
    std::vector<double> sums(P.batch * P.q_heads, 0.0);
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      for (int64_t g = 0; g < P.group_size(); ++g) {
        sums[chunks[ci].batch * P.q_heads + chunks[ci].kv_head * P.group_size() + g] += key_grads[ci].dslope[g];
      }
    }
    float* dst = dslopes->data_ptr<float>();
    for (size_t i = 0; i < sums.size(); ++i) dst[i] = static_cast<float>(-sums[i]);  // scores subtract slope * |p - j|
  }

  // Sum the chunks' key gradients per key, chunk by chunk in plan order (so
  // the result does not depend on the threads), and write dK = scale * sum.
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
      const auto& globals = plan.global_keys(b);
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

// ------------------------------------------------------------ entry points --

// The forward of any layout, once P and its sequence views are checked: a dense
// batch (q (B, Hq, Lq, D), lse (B, Hq, Lq)) or a packed one (q (total_q, Hq, D),
// lse (Hq, total_q)).
std::tuple<at::Tensor, at::Tensor> run_forward(const AttentionParams& P, std::vector<SequenceView> seqs,
                                               const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                               const c10::optional<at::Tensor>& global_mask,
                                               const c10::optional<at::Tensor>& alibi_slopes) {
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const auto lse_options = q.options().dtype(lse_dtype(q.scalar_type()));
  if (q.numel() == 0 || k.numel() == 0) {  // no key at all: zeros and lse = -inf
    return {at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous)),
            at::full(lse_shape(q), -std::numeric_limits<double>::infinity(), lse_options)};
  }
  // The kernel writes every row of out and lse.
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_shape(q), lse_options);
  const TilePlan plan(P, std::move(seqs), global_mask, kForwardChunkBlocks);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(P, plan, q, k, v, slopes, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    const AttentionParams& P, std::vector<SequenceView> seqs, const at::Tensor& grad_out_in,
    const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, bool alibi_grad) {
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse, grad_lse, alibi_grad);
  at::Tensor dslopes = alibi_slopes_grad_buffer(P, q_in, alibi_grad);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in), out = with_contiguous_rows(out_in);
  const auto contiguous = at::MemoryFormat::Contiguous;
  if (q.numel() == 0 || k.numel() == 0) {
    return {at::zeros(q.sizes(), q.options().memory_format(contiguous)),
            at::zeros(k.sizes(), k.options().memory_format(contiguous)),
            at::zeros(v.sizes(), v.options().memory_format(contiguous)), dslopes.zero_()};
  }
  // The kernel writes every row of dq, dk and dv.
  at::Tensor dq = at::empty(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::empty(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::empty(v.sizes(), v.options().memory_format(contiguous));
  const TilePlan plan(P, std::move(seqs), global_mask, kBackwardChunkBlocks);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_bwd_cpu", [&] {
    backward_kernel<scalar_t>(P, plan, grad_out, grad_lse, q, k, v, out, lse, slopes, dq, dk, dv,
                              alibi_grad ? &dslopes : nullptr);
  });
  return {dq, dk, dv, dslopes};
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right,
                                                  dilation, score, sigmoid_bias, softcap, scale);
  return run_forward(P, dense_views(P), q, k, v, global_mask, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad) {
  const AttentionParams P = make_attention_params(q, k, v, global_mask, alibi_slopes, window_left, window_right,
                                                  dilation, score, sigmoid_bias, softcap, scale);
  return run_backward(P, dense_views(P), grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad);
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                                       scale);
  return run_forward(V.params, std::move(V.seqs), q, k, v, global_mask, alibi_slopes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_attention_varlen_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool alibi_grad) {
  VarlenProblem V = make_varlen_params(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, global_mask,
                                       alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias, softcap,
                                       scale);
  return run_backward(V.params, std::move(V.seqs), grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes,
                      alibi_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
  m.impl("local_attention_varlen_fwd", &local_attention_varlen_fwd_cpu);
  m.impl("local_attention_varlen_bwd", &local_attention_varlen_bwd_cpu);
}

}  // namespace longreach::cpu
