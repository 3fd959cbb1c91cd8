// The one copy of the window and dilation math (docs/semantics.md).
//
// Row i sits at key position p = i + (Lk - Lq). With dilation d, key j is in
// the window of p iff (p - j) % d == 0 and -left <= (j - p) / d <= right.
// Rows and keys therefore split into d independent "residue classes"
// (p mod d): inside a class the window is an ordinary contiguous band, which
// is how the kernels keep the work at O(L * window) for any dilation.
#pragma once

#include <cmath>
#include <cstdint>

#include "geometry.h"
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

// Chunks (docs/semantics.md): position x lies in chunk floor((x + shift) / c).
// r = (x + shift) mod c is x's place in its chunk, so the chunk of x holds the
// positions x - r .. x + (c - 1 - r). Computed without forming x + shift, which
// could overflow for chunks near 2^63: floor_mod(x, c) < c and phase < c, so
// their sum is reduced by one comparison.
LR_HOST_DEVICE int64_t chunk_residue(const WindowSpec& w, int64_t x) {
  const int64_t r = floor_mod(x, w.chunk);
  return r >= w.chunk - w.chunk_phase ? r - (w.chunk - w.chunk_phase) : r + w.chunk_phase;
}

// Is key j inside the (dilated) sliding window of position p? Global tokens are
// handled by the caller; this is only the band (with chunks: the band within p's chunk).
LR_HOST_DEVICE bool in_window(const WindowSpec& w, int64_t p, int64_t j) {
  const int64_t delta = j - p;
  int64_t steps = delta;  // dilation 1 (the common case): no int64 `%` or `/`
  if (w.dilation != 1) {
    if (floor_mod(delta, w.dilation) != 0) return false;
    steps = delta / w.dilation;  // exact: delta is a multiple
  }
  if (steps < -w.left || steps > w.right) return false;
  if (w.chunk <= 0) return true;
  const int64_t r = chunk_residue(w, p);  // same chunk: -r <= delta <= c - 1 - r
  return delta >= -r && delta <= w.chunk - 1 - r;
}

// Key j of a sequence is a sink (StreamingLLM): one of its first sink_tokens keys.
LR_HOST_DEVICE bool is_sink_key(const WindowSpec& w, int64_t j) { return j < w.sink_tokens; }

// A key beyond the band that a row at p may still see (it is a global key, a
// sink, or the row is global): bidirectional global tokens (causal = false)
// see and are seen by every position; causal global tokens and sinks only
// look backwards, key j being seen iff j <= p. A sink is thereby exactly a
// causal global key that is not a global row.
LR_HOST_DEVICE bool extra_key_visible(const WindowSpec& w, int64_t p, int64_t j, bool row_is_global,
                                      bool key_is_global) {
  if (!w.causal && (row_is_global || key_is_global)) return true;
  return (row_is_global || key_is_global || is_sink_key(w, j)) && j <= p;
}

// The full allowed-key rule (docs/semantics.md): the window, plus global keys,
// global rows and sinks. Padding is the caller's (a padded position is no key).
LR_HOST_DEVICE bool key_allowed(const WindowSpec& w, int64_t p, int64_t j, bool row_is_global, bool key_is_global) {
  return in_window(w, p, j) || extra_key_visible(w, p, j, row_is_global, key_is_global);
}

// Inclusive range [*lo, *hi] of the keys in the window of position p that lie
// in [0, Lk) of sequence s; all of them share p's residue class. Empty when *lo > *hi.
LR_HOST_DEVICE void window_key_range(const WindowSpec& w, const SequenceView& s, int64_t p, int64_t* lo,
                                     int64_t* hi) {
  const int64_t d = w.dilation;
  int64_t a = p - w.left * d;
  int64_t b = p + w.right * d;
  if (w.chunk > 0) {  // intersect with p's chunk, p - r .. p + c - 1 - r, on p's residue class
    const int64_t r = chunk_residue(w, p), up = w.chunk - 1 - r;
    if (r < p - a) a = first_in_class_at_or_after(p - r, floor_mod(p, d), d);
    if (up < b - p) b = last_in_class_at_or_before(p + up, floor_mod(p, d), d);
  }
  if (a < 0) a = first_in_class_at_or_after(0, floor_mod(p, d), d);
  if (b > s.k_len - 1) b = last_in_class_at_or_before(s.k_len - 1, floor_mod(p, d), d);
  *lo = a;
  *hi = b;
}

// Inclusive range [*lo, *hi] of query *rows* of sequence s whose window holds
// key j (the transpose of window_key_range), clipped to [0, Lq). Empty when *lo > *hi.
LR_HOST_DEVICE void window_row_range(const WindowSpec& w, const SequenceView& s, int64_t j, int64_t* lo,
                                     int64_t* hi) {
  const int64_t d = w.dilation;
  const int64_t off = s.position_offset();
  // Positions p with j - right*d <= p <= j + left*d and p == j (mod d).
  int64_t a = j - w.right * d - off;  // as row indices
  int64_t b = j + w.left * d - off;
  const int64_t residue = floor_mod(j - off, d);
  if (w.chunk > 0) {  // rows in j's chunk (the same-chunk relation is symmetric)
    const int64_t r = chunk_residue(w, j), up = w.chunk - 1 - r;
    if (r < j - off - a) a = first_in_class_at_or_after(j - r - off, residue, d);
    if (up < b - (j - off)) b = last_in_class_at_or_before(j + up - off, residue, d);
  }
  if (a < 0) a = first_in_class_at_or_after(0, residue, d);
  if (b > s.q_len - 1) b = last_in_class_at_or_before(s.q_len - 1, residue, d);
  *lo = a;
  *hi = b;
}

// Number of keys a full row of the window holds before dilation, the n of the
// default sigmoid bias -ln(n) (docs/semantics.md: min(Lk, left + right + 1)).
LR_HOST_DEVICE int64_t full_window_size(const WindowSpec& w, int64_t k_len) {
  const int64_t n = w.left + w.right + 1;
  return n < k_len ? n : k_len;
}

// The sigmoid bias of sequence s: the given one, or -ln(n) from the number of
// keys the sequence really has (its length, less its padding; 0 for a sequence
// without keys, which has no score to bias).
LR_HOST_DEVICE double sigmoid_bias_of(const AttentionParams& P, const SequenceView& s) {
  if (!P.default_sigmoid_bias) return P.sigmoid_bias;
  const int64_t n = full_window_size(P.window, s.keys_present());
  return n > 0 ? -log(static_cast<double>(n)) : 0.0;
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
// and share one residue class. The band is monotone in p (with chunks too: a
// chunk's first and last positions never decrease with p), so the four corners
// decide it; kernels then skip the per-element mask for such tiles.
LR_HOST_DEVICE bool tile_in_window(const WindowSpec& w, int64_t p_first, int64_t p_last, int64_t k_first,
                                   int64_t k_last) {
  return in_window(w, p_first, k_first) && in_window(w, p_first, k_last) && in_window(w, p_last, k_first) &&
         in_window(w, p_last, k_last);
}

}  // namespace longreach
