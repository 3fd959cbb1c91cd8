// Score tiles of the CPU attention kernels and their masks. Each block visits
// the span of keys its windows cover, in tiles of up to kKeyTile keys, then the
// global keys outside the band ("extras"): for_each_key_tile. In a tile, row a
// sees one run of keys [first[a], end[a]) (plan_runs), and every product runs
// on the register-blocked vector kernels of tile_ops.h, banded by those runs so
// that the masked triangles at the band's edges are (almost) skipped;
// finalize_tile masks what a run must not see and applies the score transforms.
// The window and score math come from csrc/common (window.h:
// window_key_range, in_window, tile_in_window; scores.h: soft-cap and ALiBi).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../common/params.h"
#include "../common/scores.h"
#include "../common/window.h"
#include "tile_plan.h"

namespace longreach::cpu::detail {

// Most keys per score tile: a block's whole span for windows up to ~1000 keys,
// so each row's softmax runs once, without rescaling (measured best on
// AVX-512; the S tile is 64 x 1024 floats, an L2-resident 256 KiB).
constexpr int64_t kKeyTile = 1024;

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
  bool global_rows;  // a block of rows at global positions (tile_plan.h)
};

// Columns of tile `keys` (a span tile: lo, lo + stride, ...) whose key is at or
// before position p: the keys a causal global row or a causal extra key allow.
inline int64_t columns_at_or_before(const TileKeys& keys, int64_t p) {
  if (p < keys.lo) return 0;
  return std::min(keys.n, (p - keys.lo) / keys.stride + 1);
}

// Which keys of a tile each row sees: run[a] = [first[a], end[a]) of tile
// columns. Inside the band the window is monotone in the row position, so the
// band part is found by two pointers with window.h's in_window. An extra key
// (global or sink) inside a masked tile is seen by rows outside its band, which
// can break a run: then the run is widened to the hull and `interior` marks
// that the columns of the hull outside [band_first, band_end) must be checked
// (run_allows: extra keys a row sees stay, the rest is masked).
struct TileRuns {
  std::vector<int64_t> first, end, band_first, band_end;
  bool interior = false;
  bool masked = false;
  bool padded = false;  // some key of the tile is padding: run_allows rejects it
  // The transpose, for the key-side products of the backward: key c is in the
  // runs of rows [key_first[c], key_end[c]).
  std::vector<int64_t> key_first, key_end;
};

// Runs are monotone (first and end never decrease with the row), so the rows
// whose run holds key c form one interval, found by two pointers.
inline void transpose_runs(int64_t nq, int64_t nk, TileRuns* runs) {
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

// The runs of a masked tile (span tiles: keys lo, lo + stride, ... of the
// rows' class): each row's window band, widened to the extra keys it may see.
template <typename acc_t>
void plan_band_runs(const BlockContext<acc_t>& bc, const TileKeys& keys, int64_t valid_from, TileRuns* runs) {
  const AttentionParams& P = *bc.P;
  const int64_t nq = bc.nq, nk = keys.n;
  for (int64_t a = 0; a < nq; ++a) {
    int64_t lo, hi;
    window_key_range(P.window, bc.plan->seq(bc.batch), bc.pos[a], &lo, &hi);
    const int64_t f = lo <= keys.lo ? 0 : std::min(nk, (lo - keys.lo + keys.stride - 1) / keys.stride);
    const int64_t e = hi < keys.lo ? 0 : std::min(nk, (hi - keys.lo) / keys.stride + 1);
    runs->first[a] = f;
    runs->end[a] = std::max(f, e);
  }
  if (!bc.plan->has_extra_keys()) return;
  // Extra keys left of valid_from (an alignment margin before the block's
  // span) belong to the block's extras, not to this tile.
  int64_t g_first = nk, g_last = -1;
  for (int64_t c = valid_from; c < nk; ++c) {
    if (bc.plan->key_is_extra(bc.batch, keys.key(c))) {
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
  // never in a run: their global keys are the block's extras. Under causal
  // every extra key is seen only at or after it, so a run need not reach
  // past its row's position (columns_at_or_before is monotone too).
  const bool causal = P.window.causal;
  for (int64_t a = 0; a < nq; ++a) {
    const int64_t f = std::max(runs->first[a], valid_from);
    const int64_t g_end = causal ? std::min(g_last + 1, columns_at_or_before(keys, bc.pos[a])) : g_last + 1;
    runs->first[a] = std::min(f, g_first);
    runs->end[a] = std::max(std::max(runs->end[a], f), g_end);
  }
  runs->interior = true;
}

template <typename acc_t>
void plan_runs(const BlockContext<acc_t>& bc, const TileKeys& keys, bool span_masked, int64_t valid_from,
               TileRuns* runs) {
  const AttentionParams& P = *bc.P;
  const TilePlan& plan = *bc.plan;
  const int64_t nq = bc.nq, nk = keys.n;
  runs->first.assign(nq, 0);
  runs->end.assign(nq, nk);
  runs->interior = false;
  // Padded keys are never extras (the plan leaves them out of the global
  // keys), but any span tile may hold some: they are masked column by column.
  runs->padded = keys.list == nullptr && plan.any_key_padded(bc.batch, keys.key(0), keys.key(nk - 1));
  if (bc.global_rows) {
    // Global rows see every key of their span (all keys); causal ones the
    // keys at or before their position, a prefix of the tile.
    runs->masked = false;
    if (P.window.causal) {
      for (int64_t a = 0; a < nq; ++a) runs->end[a] = columns_at_or_before(keys, bc.pos[a]);
    }
  } else if (keys.list != nullptr) {
    // Extras (keys.list, sorted): every bidirectional global key is seen by
    // every row; causal global keys and sinks by the rows at or after them.
    runs->masked = false;
    if (P.window.causal) {  // every extra is causal: a prefix of the list per row
      for (int64_t a = 0; a < nq; ++a) {
        runs->end[a] = std::upper_bound(keys.list, keys.list + nk, bc.pos[a]) - keys.list;
      }
    } else if (P.window.sink_tokens > 0 && keys.list[0] < P.window.sink_tokens) {  // sinks among them
      runs->band_first.assign(nq, 0);
      runs->band_end.assign(nq, 0);
      runs->interior = true;  // run_allows decides each column
    }
    return;
  } else {
    // A tile inside the band needs no mask even when its block's span does.
    runs->masked = span_masked && !tile_in_window(P.window, bc.pos[0], bc.pos[nq - 1], keys.key(0), keys.key(nk - 1));
    if (runs->masked) plan_band_runs(bc, keys, valid_from, runs);
  }
  if (runs->padded && !runs->interior) {  // every column of the runs is checked (run_allows)
    runs->band_first = runs->first;
    runs->band_end = runs->end;
    runs->interior = true;
  }
}

// Is column c of row a allowed (given that it lies in the row's run)?
template <typename acc_t>
bool run_allows(const BlockContext<acc_t>& bc, const TileKeys& keys, const TileRuns& runs, int64_t a, int64_t c) {
  if (!runs.interior) return true;
  const int64_t j = keys.key(c);
  if (runs.padded && bc.plan->key_is_padded(bc.batch, j)) return false;
  if (c >= runs.band_first[a] && c < runs.band_end[a]) return true;
  return bc.plan->key_is_extra(bc.batch, j) &&
         extra_key_visible(bc.P->window, bc.pos[a], j, bc.global_rows, bc.plan->key_is_global(bc.batch, j));
}

// Whether finalize_tile's vectorized ALiBi loop applies to rows [a0, a1): a finite slope (an
// infinite one makes slope * 0 NaN, which must not reach a masked score), evenly spaced keys (no
// list of extra keys) and every row's distances, and its column indices, exact in int32.
template <typename acc_t>
bool alibi_fits_int32(const BlockContext<acc_t>& bc, const TileKeys& keys, int64_t a0, int64_t a1) {
  if (!std::isfinite(bc.slope) || keys.list || a1 <= a0) return false;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max() / 2;
  const int64_t span = keys.n * (keys.stride < 0 ? -keys.stride : keys.stride);
  if (keys.n > kMax || span > kMax) return false;
  for (int64_t a : {a0, a1 - 1}) {  // positions ascend, so the first and last row bound the rest
    const int64_t base = bc.pos[a] - keys.lo;
    if (base > kMax || base < -kMax) return false;
  }
  return true;
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
  if (!factor && !(cap > acc_t(0)) && (bc.slope == acc_t(0) || alibi_fits_int32(bc, keys, a0, a1))) {
    // No soft-cap: mask first (where the runs need it), then subtract the ALiBi term slope *
    // distance in a loop the compiler vectorizes (-inf stays -inf). The per-score loop below made
    // ALiBi models' attention 2-2.7x slower than RoPE's (bfloat16 training step of the
    // extrapolation study, issue 18).
    if (runs.interior) {
      for (int64_t a = a0; a < a1; ++a) {
        acc_t* s = S + (a - a0) * ld;
        for (int64_t c = runs.first[a]; c < runs.end[a]; ++c)
          if (!run_allows(bc, keys, runs, a, c)) s[c] = neg_inf;
      }
    }
    if (bc.slope == acc_t(0)) return;
    const acc_t slope = bc.slope;
    const int32_t stride = static_cast<int32_t>(keys.stride);
    for (int64_t a = a0; a < a1; ++a) {
      acc_t* s = S + (a - a0) * ld;
      const int32_t base = static_cast<int32_t>(bc.pos[a] - keys.lo);  // distance = |base - c * stride|
      const int32_t c1 = static_cast<int32_t>(runs.end[a]);
      for (int32_t c = static_cast<int32_t>(runs.first[a]); c < c1; ++c) {
        const int32_t d = base - c * stride;
        s[c] -= slope * static_cast<acc_t>(d < 0 ? -d : d);
      }
    }
    return;
  }
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

}  // namespace longreach::cpu::detail
