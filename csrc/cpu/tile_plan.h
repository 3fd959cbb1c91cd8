// Which query rows and which keys each unit of CPU work visits.
//
// Passes over query rows (forward, dQ) cut every residue class of rows into
// blocks; a block visits the band of keys its rows' windows cover (its "span"),
// then the global keys outside that span. Rows at global positions see every
// key, so they get blocks of their own over all keys. Passes over keys (dK, dV)
// are the transpose: blocks of ordinary keys visit the rows whose windows cover
// them plus all global rows; blocks of global keys visit every row.
//
// Each list is split into a "span" part (needs the per-element window mask at
// the band's edges) and an "always allowed" part, so no key is counted twice
// and tiles never straddle the two.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common/params.h"

namespace longreach::cpu {

constexpr int64_t kRowBlock = 64;  // query rows per work item / tile
constexpr int64_t kKeyBlock = 64;  // keys per tile

struct WorkItem {
  int64_t batch;
  bool global_block;  // rows (or keys) at global positions
  int64_t cls;        // residue class (row index mod dilation, or key index mod dilation)
  int64_t block;      // block number inside the class or the global list
};

// A list of indices whose first `n_span` entries need the window mask and whose
// remaining entries are always allowed.
struct IndexList {
  std::vector<int64_t> idx;
  int64_t n_span = 0;
};

class TilePlan {
 public:
  TilePlan(const AttentionParams& P, const c10::optional<at::Tensor>& global_mask);

  bool key_is_global(int64_t b, int64_t j) const {
    return has_global_ && is_global_key_[b * P_.k_len + j] != 0;
  }
  bool row_is_global(int64_t b, int64_t i) const {
    const int64_t p = i + P_.position_offset();
    return p >= 0 && p < P_.k_len && key_is_global(b, p);
  }
  const uint8_t* global_key_flags(int64_t b) const {
    return has_global_ ? is_global_key_.data() + b * P_.k_len : nullptr;
  }

  // Passes over query rows.
  const std::vector<WorkItem>& row_work() const { return row_work_; }
  void rows_of_row_work(const WorkItem& w, IndexList* rows) const;
  void keys_of_row_work(const WorkItem& w, const IndexList& rows, IndexList* keys) const;

  // Passes over keys.
  const std::vector<WorkItem>& key_work() const { return key_work_; }
  void keys_of_key_work(const WorkItem& w, IndexList* keys) const;
  void rows_of_key_work(const WorkItem& w, const IndexList& keys, IndexList* rows) const;

 private:
  AttentionParams P_;
  bool has_global_ = false;
  std::vector<uint8_t> is_global_key_;             // B * Lk
  std::vector<std::vector<int64_t>> global_keys_;  // per batch, sorted
  std::vector<std::vector<int64_t>> global_rows_;  // per batch, sorted
  std::vector<WorkItem> row_work_;
  std::vector<WorkItem> key_work_;
};

}  // namespace longreach::cpu
