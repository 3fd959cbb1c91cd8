// The one copy of the window and dilation math (docs/semantics.md).
//
// Row i sits at key position p = i + (Lk - Lq). With dilation d, key j is in
// the window of p iff (p - j) % d == 0 and -left <= (j - p) / d <= right.
// Rows and keys therefore split into d independent "residue classes"
// (p mod d): inside a class the window is an ordinary contiguous band, which
// is how the kernels keep the work at O(L * window) for any dilation.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "params.h"

namespace longreach {

// Non-negative remainder, also for negative x (p can be negative when Lq > Lk).
LR_HOST_DEVICE int64_t floor_mod(int64_t x, int64_t m) {
  int64_t r = x % m;
  return r < 0 ? r + m : r;
}

// Smallest value >= lo that is congruent to `residue` modulo m.
LR_HOST_DEVICE int64_t first_in_class_at_or_after(int64_t lo, int64_t residue, int64_t m) {
  return lo + floor_mod(residue - lo, m);
}

// Largest value <= hi that is congruent to `residue` modulo m.
LR_HOST_DEVICE int64_t last_in_class_at_or_before(int64_t hi, int64_t residue, int64_t m) {
  return hi - floor_mod(hi - residue, m);
}

// Is key j inside the (dilated) sliding window of position p? Global tokens are
// handled by the caller; this is only the band.
LR_HOST_DEVICE bool in_window(const AttentionParams& P, int64_t p, int64_t j) {
  const int64_t delta = j - p;
  if (floor_mod(delta, P.dilation) != 0) return false;
  const int64_t steps = delta / P.dilation;  // exact: delta is a multiple
  return steps >= -P.window_left && steps <= P.window_right;
}

// The full allowed-key rule: window, plus global keys, plus global rows
// (a row whose own position is a global token sees every key).
LR_HOST_DEVICE bool key_allowed(const AttentionParams& P, int64_t p, int64_t j,
                                bool row_is_global, bool key_is_global) {
  return row_is_global || key_is_global || in_window(P, p, j);
}

// Inclusive range [*lo, *hi] of the keys in the window of position p that lie
// in [0, Lk); all of them share p's residue class. Empty when *lo > *hi.
LR_HOST_DEVICE void window_key_range(const AttentionParams& P, int64_t p, int64_t* lo, int64_t* hi) {
  const int64_t d = P.dilation;
  int64_t a = p - P.window_left * d;
  int64_t b = p + P.window_right * d;
  if (a < 0) a = first_in_class_at_or_after(0, floor_mod(p, d), d);
  if (b > P.k_len - 1) b = last_in_class_at_or_before(P.k_len - 1, floor_mod(p, d), d);
  *lo = a;
  *hi = b;
}

// Inclusive range [*lo, *hi] of query *rows* whose window holds key j (the
// transpose of window_key_range), clipped to [0, Lq). Empty when *lo > *hi.
LR_HOST_DEVICE void window_row_range(const AttentionParams& P, int64_t j, int64_t* lo, int64_t* hi) {
  const int64_t d = P.dilation;
  const int64_t off = P.position_offset();
  // Positions p with j - right*d <= p <= j + left*d and p == j (mod d).
  int64_t a = j - P.window_right * d - off;  // as row indices
  int64_t b = j + P.window_left * d - off;
  const int64_t residue = floor_mod(j - off, d);
  if (a < 0) a = first_in_class_at_or_after(0, residue, d);
  if (b > P.q_len - 1) b = last_in_class_at_or_before(P.q_len - 1, residue, d);
  *lo = a;
  *hi = b;
}

// Number of keys a full row of the window holds before dilation, the n of the
// default sigmoid bias -ln(n) (docs/semantics.md: min(Lk, left + right + 1)).
LR_HOST_DEVICE int64_t full_window_size(const AttentionParams& P) {
  const int64_t n = P.window_left + P.window_right + 1;
  return n < P.k_len ? n : P.k_len;
}

// Clip a window side (-1 = unbounded) so that `side * dilation` never
// overflows yet still covers every key: Lk + Lq steps reach past both ends.
LR_HOST_DEVICE int64_t clip_window_side(int64_t side, int64_t q_len, int64_t k_len) {
  const int64_t cover = q_len + k_len + 1;
  return (side < 0 || side > cover) ? cover : side;
}

// Clip the dilation to max(Lq, Lk, 1). Rows sit at positions Lk - Lq .. Lk - 1
// and keys at 0 .. Lk - 1, less than max(Lq, Lk) apart, so with any dilation
// at least that large a row's residue class holds only its own position: the
// problem is the same, and the products of window sides and the dilation
// (at most (Lq + Lk + 1) * max(Lq, Lk)) and the residue arithmetic stay far
// from overflowing for any dilation up to 2^63 - 1.
LR_HOST_DEVICE int64_t clip_dilation(int64_t dilation, int64_t q_len, int64_t k_len) {
  int64_t reach = q_len > k_len ? q_len : k_len;
  if (reach < 1) reach = 1;
  return dilation > reach ? reach : dilation;
}

}  // namespace longreach

namespace longreach {

// True when every (row, key) pair of a tile lies inside the window band, given
// rows at positions p_first..p_last and keys k_first..k_last that are sorted
// and share one residue class. The band is monotone in p, so the four corners
// decide it; kernels then skip the per-element mask for such tiles.
LR_HOST_DEVICE bool tile_in_window(const AttentionParams& P, int64_t p_first, int64_t p_last,
                                   int64_t k_first, int64_t k_last) {
  return in_window(P, p_first, k_first) && in_window(P, p_first, k_last) &&
         in_window(P, p_last, k_first) && in_window(P, p_last, k_last);
}

}  // namespace longreach
