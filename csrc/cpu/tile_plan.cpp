#include "tile_plan.h"

#include <ATen/ATen.h>

#include <algorithm>

#include "../common/tile_schedule.h"
#include "../common/window.h"

namespace longreach::cpu {
namespace {

// Chunks wanted overall, so that up to a few dozen threads all get work; more
// chunks only cost the re-packing and re-summing of the keys they share.
constexpr int64_t kTargetChunks = 64;

}  // namespace

TilePlan::TilePlan(const AttentionParams& P, std::vector<SequenceView> seqs,
                   const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& key_padding_mask,
                   int64_t max_chunk_blocks)
    : P_(P), seqs_(std::move(seqs)) {
  TORCH_CHECK(max_chunk_blocks >= 1, "TilePlan: max_chunk_blocks must be >= 1");
  TORCH_CHECK(static_cast<int64_t>(seqs_.size()) == P.batch, "TilePlan: ", seqs_.size(), " views for ", P.batch,
              " problems");
  const int64_t d = P.window.dilation;
  extra_keys_.resize(P.batch);
  global_rows_.resize(P.batch);
  if (key_padding_mask.has_value() && key_padding_mask->numel() > 0) {
    TORCH_CHECK(key_padding_mask->dim() == 2, "TilePlan: key_padding_mask is for dense batches");
    has_padding_ = true;
    const at::Tensor m = key_padding_mask->to(at::kByte).contiguous();
    is_padded_key_.assign(m.data_ptr<uint8_t>(), m.data_ptr<uint8_t>() + m.numel());
    padded_prefix_.assign(P.batch * (P.k_len + 1), 0);
    for (int64_t b = 0; b < P.batch; ++b) {
      int64_t* prefix = padded_prefix_.data() + b * (P.k_len + 1);
      for (int64_t j = 0; j < P.k_len; ++j) prefix[j + 1] = prefix[j] + is_padded_key_[b * P.k_len + j];
      seqs_[b].k_present = seqs_[b].k_len - prefix[seqs_[b].k_len];
    }
  }
  if (global_mask.has_value() && global_mask->numel() > 0) {
    has_global_ = true;
    const at::Tensor g = global_mask->to(at::kByte).contiguous();
    const uint8_t* flags = g.data_ptr<uint8_t>();
    is_global_key_.assign(flags, flags + g.numel());
    if (has_padding_) {  // a padded position is no key, so no global one either
      for (size_t j = 0; j < is_global_key_.size(); ++j) is_global_key_[j] &= static_cast<uint8_t>(!is_padded_key_[j]);
    }
    const bool packed = g.dim() == 1;
    flag_offset_.resize(P.batch);
    for (int64_t b = 0; b < P.batch; ++b) {
      const SequenceView& s = seqs_[b];
      flag_offset_[b] = packed ? s.k_start : b * P.k_len;
      for (int64_t i = 0; i < s.q_len; ++i) {
        if (row_is_global(b, i)) global_rows_[b].push_back(i);
      }
    }
  }
  if (has_extra_keys()) {
    for (int64_t b = 0; b < P.batch; ++b) {
      for (int64_t j = 0; j < seqs_[b].k_len; ++j) {
        if (key_is_extra(b, j)) extra_keys_[b].push_back(j);
      }
    }
  }

  // Chunks per run of blocks: enough for kTargetChunks overall, never longer
  // than max_chunk_blocks. Fixed numbers, not the thread count: the order in
  // which key gradients are summed follows the chunks, and results must be
  // bit-identical for any number of threads.
  const int64_t classes = std::min(d, P.q_len);
  const int64_t runs = std::max<int64_t>(1, P.batch * P.kv_heads * classes);  // runs of blocks per (batch, kv head, class)
  const int64_t wanted_per_run = std::max<int64_t>(1, ceil_div_i64(kTargetChunks, runs));
  // The chunks of one piece of rows follow each other for every kv head: the
  // threads then work on the same tokens at once, whose rows of all heads
  // share cache lines and pages in the packed (total, H, D) layout (head by
  // head, each line came from memory once per head). Per (batch, kv head,
  // class) the chunks stay in row order.
  auto add_run = [&](int64_t b, bool global_rows, int64_t cls, int64_t n_blocks) {
    if (n_blocks <= 0) return;
    const int64_t pieces = std::min(n_blocks, std::max(wanted_per_run, ceil_div_i64(n_blocks, max_chunk_blocks)));
    for (int64_t t = 0; t < pieces; ++t) {
      const int64_t first = n_blocks * t / pieces, last = n_blocks * (t + 1) / pieces;
      for (int64_t hk = 0; hk < P.kv_heads; ++hk) chunks_.push_back({b, hk, global_rows, cls, first, last - first});
    }
  };
  for (int64_t b = 0; b < P.batch; ++b) {
    const SequenceView& s = seqs_[b];  // rows of a sequence without keys still get blocks: they write zeros
    for (int64_t c = 0; c < std::min(d, s.q_len); ++c) {
      add_run(b, false, c, ceil_div_i64(class_count(s.q_len, c, d), kRowBlock));
    }
    add_run(b, true, 0, ceil_div_i64(static_cast<int64_t>(global_rows_[b].size()), kRowBlock));
  }
}

void TilePlan::rows_of_block(const RowChunk& c, int64_t block, std::vector<int64_t>* rows) const {
  rows->clear();
  if (c.global_rows) {
    const auto& g = global_rows_[c.batch];
    const int64_t start = block * kRowBlock;
    const int64_t stop = std::min<int64_t>(start + kRowBlock, g.size());
    rows->assign(g.begin() + start, g.begin() + stop);
    return;
  }
  const int64_t d = P_.window.dilation;
  for (int64_t a = 0; a < kRowBlock; ++a) {
    const int64_t i = c.cls + d * (block * kRowBlock + a);
    if (i >= seqs_[c.batch].q_len) break;
    if (!row_is_global(c.batch, i) && !row_is_padded(c.batch, i)) rows->push_back(i);
  }
}

// Class keys from the first window key of first_row to the last of last_row.
KeyRange TilePlan::span_of_rows(int64_t b, int64_t first_row, int64_t last_row) const {
  const SequenceView& s = seqs_[b];
  const int64_t off = s.position_offset(), d = P_.window.dilation;
  int64_t lo, hi, unused;
  window_key_range(P_.window, s, first_row + off, &lo, &unused);
  window_key_range(P_.window, s, last_row + off, &unused, &hi);
  KeyRange r;
  r.stride = d;
  r.lo = lo;
  r.count = hi >= lo ? (hi - lo) / d + 1 : 0;
  return r;
}

void TilePlan::keys_of_block(const RowChunk& c, const std::vector<int64_t>& rows, BlockKeys* keys) const {
  keys->extras.clear();
  keys->extra_ranks.clear();
  const int64_t off = seqs_[c.batch].position_offset();
  if (c.global_rows) {  // global rows see every key; causal ones those up to their position (tile_runs.h)
    const int64_t k_len = seqs_[c.batch].k_len;
    keys->span = KeyRange{0, P_.window.causal ? std::min(k_len, rows.back() + off + 1) : k_len, 1};
    keys->span_needs_mask = P_.window.causal;
    return;
  }
  keys->span = span_of_rows(c.batch, rows.front(), rows.back());
  const KeyRange& s = keys->span;
  keys->span_needs_mask =
      s.count > 0 && !tile_in_window(P_.window, rows.front() + off, rows.back() + off, s.lo, s.at(s.count - 1));
  if (has_extra_keys()) {
    const auto& g = extra_keys_[c.batch];
    const int64_t p_last = rows.back() + off;  // visibility only grows with the position: the last row decides
    for (size_t r = 0; r < g.size(); ++r) {
      if (!s.contains(g[r]) && extra_key_visible(P_.window, p_last, g[r], false, key_is_global(c.batch, g[r]))) {
        keys->extras.push_back(g[r]);
        keys->extra_ranks.push_back(static_cast<int64_t>(r));
      }
    }
  }
}

KeyRange TilePlan::span_of_chunk(const RowChunk& c) const {
  if (c.global_rows) return KeyRange{0, seqs_[c.batch].k_len, 1};
  // Rows of a class only grow with the block number, and so do their windows.
  std::vector<int64_t> rows;
  int64_t first = -1, last = -1;
  for (int64_t t = c.first_block; t < c.first_block + c.n_blocks; ++t) {
    rows_of_block(c, t, &rows);
    if (rows.empty()) continue;
    if (first < 0) first = rows.front();
    last = rows.back();
  }
  if (first < 0) return KeyRange{0, 0, P_.window.dilation};
  // Start on a multiple of kKeyAlign keys of the class, so the kernels' tile
  // boundaries (whole vectors of chunk columns) sit at the same keys however
  // the blocks are cut into chunks: results do not depend on the chunking.
  KeyRange r = span_of_rows(c.batch, first, last);
  if (r.count > 0) {
    const int64_t d = P_.window.dilation, cls = floor_mod(r.lo, d);
    const int64_t aligned = cls + (r.lo - cls) / d / kKeyAlign * kKeyAlign * d;
    r.count += (r.lo - aligned) / d;
    r.lo = aligned;
  }
  return r;
}

}  // namespace longreach::cpu
