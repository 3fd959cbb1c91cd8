// Which query rows and which keys each unit of CPU work visits.
//
// Query rows split into residue classes (row position mod dilation); inside a
// class the window is an ordinary band, so a block of kRowBlock consecutive rows
// of a class sees one contiguous run of the class's keys, its "span", which is
// known before any score is computed. A block visits its span (masked only at
// the band's edges), then the "extra" keys outside the band: global keys and
// sink tokens (window.h extra_key_visible: bidirectional global keys are seen
// by every row, causal global keys and sinks by the rows at or after them).
// Rows at global positions see every key (causal: every key up to their
// position): they are taken out of the class blocks and get blocks of their
// own whose span is all keys (causal: all keys up to the last row's position).
// Every (row, key) pair is therefore visited exactly once, which both the
// forward and the one-pass backward rely on.
//
// A RowChunk, the unit of parallel work, is a run of consecutive blocks of one
// (batch, kv head, class) (or of the global rows); it processes every query
// head of its GQA group, so the key/value rows it reads are shared by them,
// and it owns the key-gradient contributions of its blocks until the final
// deterministic reduction.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "../common/geometry.h"
#include "../common/params.h"
#include "../common/window.h"

namespace longreach::cpu {

constexpr int64_t kRowBlock = 64;  // query rows per block

// keys lo, lo + stride, ..., lo + (count - 1) * stride
struct KeyRange {
  int64_t lo = 0;
  int64_t count = 0;
  int64_t stride = 1;
  int64_t at(int64_t r) const { return lo + r * stride; }
  bool contains(int64_t j) const {
    return count > 0 && j >= lo && j <= at(count - 1) && (j - lo) % stride == 0;
  }
};

// span_of_chunk starts on a multiple of this many keys of the class.
constexpr int64_t kKeyAlign = 64;

struct RowChunk {
  int64_t batch;
  int64_t kv_head;
  bool global_rows;  // blocks of rows at global positions (see every key)
  int64_t cls;       // residue class (row index mod dilation); 0 for global rows
  int64_t first_block;
  int64_t n_blocks;
};

struct BlockKeys {
  KeyRange span;
  bool span_needs_mask = false;       // some row/key pair of the span may be outside the band
  std::vector<int64_t> extras;        // extra keys outside the band that some row of the block sees, sorted
  std::vector<int64_t> extra_ranks;   // their positions in extra_keys(batch)
};

// A dense batch: B problems of the same lengths.
inline std::vector<SequenceView> dense_views(const AttentionParams& P) {
  return std::vector<SequenceView>(P.batch, P.dense_view());
}

class TilePlan {
 public:
  // max_chunk_blocks: the longest run of blocks one chunk takes. It bounds the
  // per-thread packed key operands (which should stay in L2 while the chunk's
  // blocks reread them) and the chunk's key-gradient buffers; the forward's
  // result does not depend on it, the backward's summation order does.
  // One SequenceView per problem b (a dense batch row or a packed sequence);
  // global_mask is (B, Lk) for a dense batch or (total_k,) for a packed one,
  // where sequence b's keys start at seqs[b].k_start. key_padding_mask (dense
  // batches only, (B, Lk), True = padding): a padded position is no key (not
  // even a global one) and a query row at it is in no block (the caller
  // zero-fills its outputs).
  TilePlan(const AttentionParams& P, std::vector<SequenceView> seqs, const c10::optional<at::Tensor>& global_mask,
           const c10::optional<at::Tensor>& key_padding_mask, int64_t max_chunk_blocks);

  const AttentionParams& params() const { return P_; }
  const WindowSpec& window() const { return P_.window; }
  const SequenceView& seq(int64_t b) const { return seqs_[b]; }
  bool has_global() const { return has_global_; }
  bool key_is_global(int64_t b, int64_t j) const {
    return has_global_ && is_global_key_[flag_offset_[b] + j] != 0;
  }
  // Keys beyond the band that rows may see: global keys and sinks (window.h).
  bool has_extra_keys() const { return has_global_ || P_.window.sink_tokens > 0; }
  bool key_is_extra(int64_t b, int64_t j) const {
    return key_is_global(b, j) || (is_sink_key(P_.window, j) && !key_is_padded(b, j));
  }
  bool row_is_global(int64_t b, int64_t i) const {
    const int64_t p = i + seqs_[b].position_offset();
    return p >= 0 && p < seqs_[b].k_len && key_is_global(b, p);
  }
  bool has_padding() const { return has_padding_; }
  bool key_is_padded(int64_t b, int64_t j) const { return has_padding_ && is_padded_key_[b * P_.k_len + j] != 0; }
  bool row_is_padded(int64_t b, int64_t i) const {
    const int64_t p = i + seqs_[b].position_offset();
    return p >= 0 && p < seqs_[b].k_len && key_is_padded(b, p);
  }
  // Is any of the keys first..last (inclusive) of problem b padded?
  bool any_key_padded(int64_t b, int64_t first, int64_t last) const {
    if (first < 0) first = 0;
    if (last >= P_.k_len) last = P_.k_len - 1;
    if (!has_padding_ || first > last) return false;
    const int64_t base = b * (P_.k_len + 1);
    return padded_prefix_[base + last + 1] != padded_prefix_[base + first];
  }
  // The extra keys of problem b (global keys and sinks, no padded position), sorted.
  const std::vector<int64_t>& extra_keys(int64_t b) const { return extra_keys_[b]; }
  bool has_global_rows(int64_t b) const { return !global_rows_[b].empty(); }

  // Chunks of one (batch, kv head, class) are in row order; the chunks of one
  // piece of rows for every kv head follow each other (see the constructor).
  const std::vector<RowChunk>& row_chunks() const { return chunks_; }
  // Rows of block `block` of the chunk's class (or of the global rows), ascending.
  void rows_of_block(const RowChunk& c, int64_t block, std::vector<int64_t>* rows) const;
  // The keys a block of rows visits (rows as returned by rows_of_block, non-empty).
  void keys_of_block(const RowChunk& c, const std::vector<int64_t>& rows, BlockKeys* keys) const;
  // The union of the spans of the chunk's blocks, widened on the left to a
  // multiple of kKeyAlign class keys: the key rows it reads and whose
  // gradients it accumulates (extras aside).
  KeyRange span_of_chunk(const RowChunk& c) const;

 private:
  KeyRange span_of_rows(int64_t b, int64_t first_row, int64_t last_row) const;

  AttentionParams P_;
  std::vector<SequenceView> seqs_;
  bool has_global_ = false;
  std::vector<uint8_t> is_global_key_;             // the mask's flags, contiguous
  std::vector<int64_t> flag_offset_;               // where problem b's keys start in is_global_key_
  bool has_padding_ = false;
  std::vector<uint8_t> is_padded_key_;             // (B, Lk) flags of key_padding_mask
  std::vector<int64_t> padded_prefix_;             // per problem, Lk + 1 prefix counts of padded keys
  std::vector<std::vector<int64_t>> extra_keys_;   // per batch, sorted
  std::vector<std::vector<int64_t>> global_rows_;  // per batch, sorted
  std::vector<RowChunk> chunks_;
};

}  // namespace longreach::cpu
