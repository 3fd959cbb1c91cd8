#include "tile_plan.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "../common/window.h"

namespace longreach::cpu {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of indices in [0, n) congruent to cls modulo d.
int64_t class_count(int64_t n, int64_t cls, int64_t d) { return cls < n ? ceil_div(n - cls, d) : 0; }

// Append every global index of `globals` that is not in the class-`cls` band [lo, hi].
void append_outside_band(const std::vector<int64_t>& globals, int64_t lo, int64_t hi, int64_t cls,
                         int64_t d, std::vector<int64_t>* out) {
  for (int64_t g : globals) {
    const bool in_band = g >= lo && g <= hi && floor_mod(g, d) == cls;
    if (!in_band) out->push_back(g);
  }
}

}  // namespace

TilePlan::TilePlan(const AttentionParams& P, const c10::optional<at::Tensor>& global_mask) : P_(P) {
  const int64_t d = P.dilation;
  global_keys_.resize(P.batch);
  global_rows_.resize(P.batch);
  if (global_mask.has_value() && P.k_len > 0) {
    has_global_ = true;
    const at::Tensor g = global_mask->to(at::kByte).contiguous();
    const uint8_t* flags = g.data_ptr<uint8_t>();
    is_global_key_.assign(flags, flags + P.batch * P.k_len);
    for (int64_t b = 0; b < P.batch; ++b) {
      for (int64_t j = 0; j < P.k_len; ++j) {
        if (key_is_global(b, j)) global_keys_[b].push_back(j);
      }
      for (int64_t i = 0; i < P.q_len; ++i) {
        if (row_is_global(b, i)) global_rows_[b].push_back(i);
      }
    }
  }
  for (int64_t b = 0; b < P.batch; ++b) {
    for (int64_t c = 0; c < std::min(d, P.q_len); ++c) {
      const int64_t blocks = ceil_div(class_count(P.q_len, c, d), kRowBlock);
      for (int64_t t = 0; t < blocks; ++t) row_work_.push_back({b, false, c, t});
    }
    for (int64_t t = 0; t < ceil_div(static_cast<int64_t>(global_rows_[b].size()), kRowBlock); ++t) {
      row_work_.push_back({b, true, 0, t});
    }
    for (int64_t c = 0; c < std::min(d, P.k_len); ++c) {
      const int64_t blocks = ceil_div(class_count(P.k_len, c, d), kKeyBlock);
      for (int64_t t = 0; t < blocks; ++t) key_work_.push_back({b, false, c, t});
    }
    for (int64_t t = 0; t < ceil_div(static_cast<int64_t>(global_keys_[b].size()), kKeyBlock); ++t) {
      key_work_.push_back({b, true, 0, t});
    }
  }
}

void TilePlan::rows_of_row_work(const WorkItem& w, IndexList* rows) const {
  rows->idx.clear();
  if (w.global_block) {
    const auto& g = global_rows_[w.batch];
    const int64_t start = w.block * kRowBlock;
    const int64_t stop = std::min<int64_t>(start + kRowBlock, g.size());
    rows->idx.assign(g.begin() + start, g.begin() + stop);
    rows->n_span = 0;
    return;
  }
  const int64_t d = P_.dilation;
  for (int64_t a = 0; a < kRowBlock; ++a) {
    const int64_t i = w.cls + d * (w.block * kRowBlock + a);
    if (i >= P_.q_len) break;
    if (!row_is_global(w.batch, i)) rows->idx.push_back(i);
  }
  rows->n_span = static_cast<int64_t>(rows->idx.size());
}

void TilePlan::keys_of_row_work(const WorkItem& w, const IndexList& rows, IndexList* keys) const {
  keys->idx.clear();
  keys->n_span = 0;
  if (rows.idx.empty()) return;
  if (w.global_block) {  // global rows see every key
    keys->idx.resize(P_.k_len);
    for (int64_t j = 0; j < P_.k_len; ++j) keys->idx[j] = j;
    return;
  }
  const int64_t d = P_.dilation;
  const int64_t off = P_.position_offset();
  int64_t lo, hi, unused;
  window_key_range(P_, rows.idx.front() + off, &lo, &unused);
  window_key_range(P_, rows.idx.back() + off, &unused, &hi);
  for (int64_t j = lo; j <= hi; j += d) keys->idx.push_back(j);
  keys->n_span = static_cast<int64_t>(keys->idx.size());
  if (has_global_) {
    append_outside_band(global_keys_[w.batch], lo, hi, floor_mod(rows.idx.front() + off, d), d, &keys->idx);
  }
}

void TilePlan::keys_of_key_work(const WorkItem& w, IndexList* keys) const {
  keys->idx.clear();
  if (w.global_block) {
    const auto& g = global_keys_[w.batch];
    const int64_t start = w.block * kKeyBlock;
    const int64_t stop = std::min<int64_t>(start + kKeyBlock, g.size());
    keys->idx.assign(g.begin() + start, g.begin() + stop);
  } else {
    for (int64_t a = 0; a < kKeyBlock; ++a) {
      const int64_t j = w.cls + P_.dilation * (w.block * kKeyBlock + a);
      if (j >= P_.k_len) break;
      if (!key_is_global(w.batch, j)) keys->idx.push_back(j);
    }
  }
  keys->n_span = static_cast<int64_t>(keys->idx.size());
}

void TilePlan::rows_of_key_work(const WorkItem& w, const IndexList& keys, IndexList* rows) const {
  rows->idx.clear();
  rows->n_span = 0;
  if (keys.idx.empty()) return;
  if (w.global_block) {  // every row sees a global key
    rows->idx.resize(P_.q_len);
    for (int64_t i = 0; i < P_.q_len; ++i) rows->idx[i] = i;
    return;
  }
  const int64_t d = P_.dilation;
  int64_t lo, hi, unused;
  window_row_range(P_, keys.idx.front(), &lo, &unused);
  window_row_range(P_, keys.idx.back(), &unused, &hi);
  for (int64_t i = lo; i <= hi; i += d) {
    if (!row_is_global(w.batch, i)) rows->idx.push_back(i);
  }
  rows->n_span = static_cast<int64_t>(rows->idx.size());
  const auto& g = global_rows_[w.batch];
  rows->idx.insert(rows->idx.end(), g.begin(), g.end());
}

}  // namespace longreach::cpu
