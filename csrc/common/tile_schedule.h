// How the CUDA kernels cut the attention problem into tiles, as host/device
// functions over a WindowSpec and a SequenceView (the CPU kernels build the same decomposition
// with host vectors in cpu/tile_plan.*).
//
// Rows (or keys) split into residue classes modulo the dilation; a class's
// members are cls, cls + d, cls + 2d, ... and a tile holds `tile` consecutive
// members. Rows of one class see keys of one class (window.h), so a tile of
// rows visits the band of keys between the first row's window start and the
// last row's window end, stepping by d, and nothing else of the window.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "params.h"
#include "window.h"

namespace longreach {

LR_HOST_DEVICE int64_t ceil_div_i64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of indices in [0, n) congruent to cls modulo d (0 <= cls < d).
LR_HOST_DEVICE int64_t class_count(int64_t n, int64_t cls, int64_t d) {
  return cls < n ? ceil_div_i64(n - cls, d) : 0;
}

// Non-empty classes of [0, n): min(n, d).
LR_HOST_DEVICE int64_t class_number(int64_t n, int64_t d) { return n < d ? n : d; }

// Tiles per class, sized for the largest class (class 0); smaller classes
// leave their last tile partly or wholly empty.
LR_HOST_DEVICE int64_t tiles_per_class(int64_t n, int64_t d, int64_t tile) {
  return ceil_div_i64(class_count(n, 0, d), tile);
}

// Index of member m of class cls (0 <= m < class_count).
LR_HOST_DEVICE int64_t class_member(int64_t cls, int64_t m, int64_t d) { return cls + m * d; }

// Members first..last (inclusive) of class cls that tile t holds; empty when *first > *last.
LR_HOST_DEVICE void class_tile_members(int64_t n, int64_t cls, int64_t d, int64_t tile, int64_t t,
                                       int64_t* first, int64_t* last) {
  const int64_t count = class_count(n, cls, d);
  *first = t * tile;
  const int64_t end = (t + 1) * tile < count ? (t + 1) * tile : count;
  *last = end - 1;
}

// Keys [*lo, *hi] (stepping by d) that the windows of rows at positions
// p_first <= p_last of one residue class reach; empty when *lo > *hi.
// The window is monotone in p, so the ends come from the two extreme rows.
LR_HOST_DEVICE void row_tile_key_band(const WindowSpec& w, const SequenceView& s, int64_t p_first, int64_t p_last,
                                      int64_t* lo, int64_t* hi) {
  int64_t unused;
  window_key_range(w, s, p_first, lo, &unused);
  window_key_range(w, s, p_last, &unused, hi);
}

// The transpose: rows [*lo, *hi] (stepping by d) whose windows hold some key of
// j_first <= j_last of one residue class; empty when *lo > *hi.
LR_HOST_DEVICE void key_tile_row_band(const WindowSpec& w, const SequenceView& s, int64_t j_first, int64_t j_last,
                                      int64_t* lo, int64_t* hi) {
  int64_t unused;
  window_row_range(w, s, j_first, lo, &unused);
  window_row_range(w, s, j_last, &unused, hi);
}

// Members of the band lo, lo + d, ..., <= hi.
LR_HOST_DEVICE int64_t band_count(int64_t lo, int64_t hi, int64_t d) { return hi >= lo ? (hi - lo) / d + 1 : 0; }

// Is x one of lo, lo + d, ..., <= hi?
LR_HOST_DEVICE bool in_band(int64_t x, int64_t lo, int64_t hi, int64_t d) {
  return x >= lo && x <= hi && (d == 1 || floor_mod(x - lo, d) == 0);  // d == 1: no int64 `%`
}

}  // namespace longreach
