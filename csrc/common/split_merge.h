// The one copy of the split-KV merge of the decode kernels (CPU and CUDA):
// a softmax row computed over disjoint key sets ("splits") leaves, per split,
// its running max m_s, sum l_s = sum exp(s - m_s) and accumulator
// acc_s = sum exp(s - m_s) v. The row is then
//
//   total = sum_s exp(m_s - shift) l_s  (+ exp(sink - shift) with a learnable sink)
//   out   = sum_s exp(m_s - shift) acc_s / total,   lse = shift + log(total)
//
// for any shift; the largest m_s (and sink) keeps the exponentials <= 1. This is
// merge_attention's sum (python/longreach/ops/merge.py, docs/semantics.md
// "Merging partial results") on (max, sum) pairs instead of (out, lse) pairs:
// a part without keys (m_s = -inf) weighs nothing, a row no part saw is zeros
// with lse -inf (or lse = sink with a sink and no key), NaN carries through.
// Sigmoid rows have no normaliser: their parts simply add up.
#pragma once

#include <cmath>

#include "host_device.h"
#include "scores.h"

namespace longreach {

template <typename acc_t>
struct SplitMerge {
  acc_t shift;
  acc_t total;

  // Where the max over the parts starts: the sink logit, or -inf without one.
  LR_HOST_DEVICE static acc_t start_max(bool has_sink, acc_t sink) {
    return has_sink ? sink : -static_cast<acc_t>(INFINITY);
  }
  // The next part's max folded in (a NaN max stays NaN).
  LR_HOST_DEVICE static acc_t fold_max(acc_t running, acc_t part_max) { return nan_propagating_max(part_max, running); }

  // max_all: start_max folded with every part's max. A non-finite max (no
  // part saw a key; or NaN) shifts by 0; x - x == 0 exactly for finite x.
  LR_HOST_DEVICE SplitMerge(acc_t max_all, bool has_sink, acc_t sink)
      : shift(max_all - max_all == acc_t(0) ? max_all : acc_t(0)), total(has_sink ? exp(sink - shift) : acc_t(0)) {}

  // The factor of a part's accumulator and sum (0 for a part without keys).
  LR_HOST_DEVICE acc_t weight(acc_t part_max) const {
    return part_max == -static_cast<acc_t>(INFINITY) ? acc_t(0) : exp(part_max - shift);
  }
  LR_HOST_DEVICE void add(acc_t part_max, acc_t part_sum) { total += weight(part_max) * part_sum; }

  // After every add: a row without keys (and without a sink) is empty: zeros, lse -inf.
  LR_HOST_DEVICE bool empty() const { return total == acc_t(0); }
  LR_HOST_DEVICE acc_t inv_total() const { return empty() ? acc_t(0) : acc_t(1) / total; }
  LR_HOST_DEVICE acc_t lse() const { return empty() ? -static_cast<acc_t>(INFINITY) : shift + log(total); }
};

}  // namespace longreach
