// The bodies of the CUDA local-attention kernels: one function per kind of
// thread block (forward, backward dQ, backward dK/dV), written with the
// block-cooperative operations of block_ops.cuh so they also run on the host
// (tests/emulation/). All window, dilation and score math comes from
// csrc/common/.
//
// Work decomposition (the CUDA twin of cpu/tile_plan.*):
//   * A row block is BM rows of one residue class (rows i = cls + d*m), or BM
//     global rows. A class block visits the band of keys its rows' windows
//     cover (common/tile_schedule.h), BN at a time, then the global keys outside
//     that band. Global rows see every key, so their blocks visit all keys.
//   * A key block (dK/dV) is the transpose: BN keys of one class visit the band
//     of rows whose windows hold them plus all global rows; blocks of global
//     keys visit every row.
// Each (row, key) pair is therefore visited by exactly one block, and each side
// of a tile carries a mode per index: 0 = excluded, 1 = always allowed,
// 2 = allowed when inside the window band (common/window.h in_window).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/params.h"
#include "../common/scores.h"
#include "../common/tile_schedule.h"
#include "../common/window.h"
#include "block_ops.cuh"

namespace longreach::cuda_kernels {

// A dense (B, H, L, D) tensor with a contiguous last dimension, or a packed
// (total, H, D) one whose sequence b starts at row starts[b] (cu_seqlens).
template <typename T>
struct HeadTensor {
  T* data;
  int64_t sb, sh, sl;
  const int64_t* starts = nullptr;  // packed layouts only
  LR_HOST_DEVICE T* head(int64_t b, int64_t h) const { return data + (starts ? starts[b] * sl : b * sb) + h * sh; }
};

// Global tokens, precomputed on the device by the launcher (no host sync):
// keys[b][0 .. count[b]) are the global key indices of batch b, sorted; the
// ones from row_start[b] on sit at positions p >= Lk - Lq, i.e. are global rows
// (row = key - (Lk - Lq)).
struct GlobalTokens {
  const uint8_t* flags = nullptr;  // (B, Lk) contiguous; null without global tokens
  const int64_t* keys = nullptr;   // (B, Lk) contiguous
  const int64_t* count = nullptr;  // (B,)
  const int64_t* row_start = nullptr;
  LR_HOST_DEVICE bool key_is_global(const AttentionParams& P, int64_t b, int64_t j) const {
    return flags != nullptr && flags[b * P.k_len + j] != 0;
  }
  LR_HOST_DEVICE bool row_is_global(const AttentionParams& P, const SequenceView& s, int64_t b, int64_t i) const {
    const int64_t p = i + s.position_offset();
    return flags != nullptr && p >= 0 && p < s.k_len && flags[b * P.k_len + p] != 0;
  }
  LR_HOST_DEVICE int64_t key_count(int64_t b) const { return flags != nullptr ? count[b] : 0; }
  LR_HOST_DEVICE int64_t row_count(int64_t b) const { return flags != nullptr ? count[b] - row_start[b] : 0; }
  LR_HOST_DEVICE int64_t key(const AttentionParams& P, int64_t b, int64_t n) const { return keys[b * P.k_len + n]; }
  LR_HOST_DEVICE int64_t row(const AttentionParams& P, const SequenceView& s, int64_t b, int64_t n) const {
    return keys[b * P.k_len + row_start[b] + n] - s.position_offset();
  }
};

// A dense batch's key padding (key_padding_mask, True = padding): a padded
// position holds no key, and a query row at it is in no block (its outputs
// keep the launcher's zeros). Global-token lists never hold padded positions
// (the launcher clears their flags).
struct KeyPadding {
  const uint8_t* flags = nullptr;  // (B, Lk) contiguous; null without padding
  LR_HOST_DEVICE bool key(const AttentionParams& P, int64_t b, int64_t j) const {
    return flags != nullptr && flags[b * P.k_len + j] != 0;
  }
  LR_HOST_DEVICE bool row(const AttentionParams& P, const SequenceView& s, int64_t b, int64_t i) const {
    const int64_t p = i + s.position_offset();
    return flags != nullptr && p >= 0 && p < s.k_len && flags[b * P.k_len + p] != 0;
  }
};

template <typename T, typename acc_t>
struct AttentionArgs {
  AttentionParams P;
  HeadTensor<const T> q, k, v;
  HeadTensor<const T> grad_out;  // backward only
  HeadTensor<T> out;             // forward: out; backward: unused
  HeadTensor<T> dq, dk, dv;      // backward only
  acc_t* lse;                    // (B, Hq, Lq) contiguous; forward writes it, backward reads it
  const acc_t* row_dot;          // backward: dO.O - dlse per row, (B, Hq, Lq) contiguous
  // Packed (varlen) batches: sequence b's rows start at cu_q[b] and its keys at
  // cu_k[b] (int64 on the device); null for a dense batch.
  const int64_t* cu_q = nullptr;
  const int64_t* cu_k = nullptr;
  int64_t total_q = 0;
  KeyPadding pad;
  const int64_t* keys_present = nullptr;  // (B,) real keys per row with padding, else null
  LR_HOST_DEVICE SequenceView view(int64_t b) const {
    if (cu_q == nullptr) {
      SequenceView s = P.dense_view();
      if (keys_present != nullptr) s.k_present = keys_present[b];
      return s;
    }
    return SequenceView{cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b], cu_q[b], cu_k[b]};
  }
  // Index of row 0 of head h of problem b in lse / row_dot / slope_grad:
  // (B, Hq, Lq) dense, (Hq, total_q) packed.
  LR_HOST_DEVICE int64_t stat_base(int64_t b, int64_t h) const {
    return cu_q == nullptr ? (b * P.q_heads + h) * P.q_len : h * total_q + cu_q[b];
  }
  const float* slopes;           // ALiBi, null when off
  int64_t slope_sb, slope_sh;
  // Learnable ALiBi (backward, else null): zeros laid out like lse on entry; each
  // dQ row block writes its d loss / d slope at its first row, the host sums per sequence.
  acc_t* slope_grad;
  // Learnable sinks (gpt-oss, else null): the (Hq,) logits; in the backward
  // each dQ row block writes its rows' d loss / d sink (scores.h
  // sink_grad_of_row) into sink_grad, laid out like lse; the host sums per head.
  const acc_t* sinks = nullptr;
  acc_t* sink_grad = nullptr;
  GlobalTokens global;
  bool vec_loads;                // 16-byte loads are safe for q, k, v, grad_out
  // GQA dK/dV split by query head (attention_entry.h dkv_split_by_query_head):
  // the dK/dV grid has one block per (key block, query head), each writing its
  // head's float32 dK / dV part here (laid out like k, with Hq heads); the host
  // sums each group's parts. Off: one block per kv head sums the group's query
  // heads in shared memory and writes dk / dv.
  bool dkv_per_query_head = false;
  HeadTensor<acc_t> dk_part{}, dv_part{};
  LR_HOST_DEVICE int64_t dkv_grid_heads() const { return dkv_per_query_head ? P.q_heads : P.kv_heads; }
};

template <typename acc_t>
LR_HOST_DEVICE acc_t neg_infinity() {
  return -std::numeric_limits<acc_t>::infinity();
}

template <typename T, typename acc_t>
LR_HOST_DEVICE acc_t alibi_slope_of(const AttentionArgs<T, acc_t>& a, int64_t b, int64_t h) {
  return a.slopes == nullptr ? acc_t(0) : static_cast<acc_t>(a.slopes[b * a.slope_sb + h * a.slope_sh]);
}

// Head dims round up to a multiple of 16 (zero-padded) for the tile products.
LR_HOST_DEVICE int padded_head_dim(int64_t D) { return static_cast<int>((D + 15) / 16 * 16); }

// Attention dropout (common/philox.h) of the weight w of (row, key), both
// indices in the sequence (-1 = no pair: w is 0 there): kept weights times
// 1 / (1 - p), as the CPU kernels' apply_dropout, and the same bit in the
// forward and in both backward passes. head_row = batch (sequence) * Hq + head.
template <typename acc_t>
LR_HOST_DEVICE acc_t dropped(const DropoutSpec& d, int64_t head_row, int64_t row, int64_t key, acc_t w) {
  if (!d.enabled || row < 0 || key < 0) return w;
  return d.keep(head_row, row, key) ? w * static_cast<acc_t>(d.keep_scale) : acc_t(0);
}

// ------------------------------------------------------------ tile sides --

// One side (rows or keys) of the current tile: indices (-1 = none) and modes.
// The side whose entries stay fixed for the whole block (a row block's rows, a
// key block's keys) also carries, per mode-2 entry, the inclusive range
// [lo, hi] of the other side's indices inside its window (window.h
// window_key_range / window_row_range, computed once per block): the
// per-element mask is then two 32-bit compares instead of in_window's int64
// `%` and `/`. Null lo / hi: fall back to in_window.
struct TileSide {
  int64_t* idx;
  uint8_t* mode;
  int32_t* lo = nullptr;
  int32_t* hi = nullptr;
};

// The bound the 32-bit ranges rely on: indices within a sequence below 2^31
// (checked on the host: attention_entry.h check_cuda_lengths).
constexpr int64_t kMaxCudaSeqLen = 2147483647;

// Narrows a window range [lo, hi] of indices in [0, n) to 32 bits: clamped to
// [0, n] and [-1, n - 1], which keeps which indices of [0, n) it holds (an
// empty range stays empty). n <= kMaxCudaSeqLen.
LR_HOST_DEVICE void store_range32(int64_t lo, int64_t hi, int64_t n, int32_t* lo32, int32_t* hi32) {
  *lo32 = static_cast<int32_t>(lo < 0 ? 0 : (lo > n ? n : lo));
  *hi32 = static_cast<int32_t>(hi < -1 ? -1 : (hi > n - 1 ? n - 1 : hi));
}

// Is (row a, key c) of the tile allowed? (see the modes at the top) For mode 2
// on both sides the two indices share a residue class (the block's), so the
// window test is whether one lies in the other's [lo, hi].
LR_HOST_DEVICE bool pair_allowed(const AttentionParams& P, const SequenceView& s, const TileSide& rows, int a,
                                 const TileSide& keys, int c) {
  const uint8_t row_mode = rows.mode[a], key_mode = keys.mode[c];
  if (row_mode == 0 || key_mode == 0) return false;
  if (row_mode == 1 || key_mode == 1) return true;
  if (rows.lo != nullptr) {
    const int32_t j = static_cast<int32_t>(keys.idx[c]);
    return j >= rows.lo[a] && j <= rows.hi[a];
  }
  if (keys.lo != nullptr) {
    const int32_t i = static_cast<int32_t>(rows.idx[a]);
    return i >= keys.lo[c] && i <= keys.hi[c];
  }
  return in_window(P.window, rows.idx[a] + s.position_offset(), keys.idx[c]);
}

// The sets a row block walks through: its band of keys (masked), then either
// the global keys outside the band (class blocks) or nothing (global-row
// blocks walk all keys as their "band", always allowed).
struct RowBlockPlan {
  bool valid = false;
  bool global_rows = false;  // this block holds global rows
  int64_t first = 0;         // class blocks: class member range of the rows
  int64_t cls = 0;
  int64_t n_rows = 0;        // rows in the block
  int64_t band_lo = 0, band_hi = -1;  // keys of the band (class blocks)
  int64_t n_band = 0;                 // keys in the band; all keys for global-row blocks
  int64_t n_tail = 0;                 // global keys visited after the band
};

// Upper bound of the global-row blocks per (batch, head) (the real count lives
// on the device; surplus blocks exit at once).
LR_HOST_DEVICE int64_t global_row_blocks(const AttentionParams& P, int64_t BM) {
  if (!P.has_global) return 0;
  const int64_t max_global_rows = P.q_len < P.k_len ? P.q_len : P.k_len;
  return ceil_div_i64(max_global_rows, BM);
}

// Blocks 0 .. global_row_blocks - 1 hold global rows, the rest class rows.
// Global rows come first: their blocks walk every key, the longest of the grid,
// and a GPU starts blocks about in index order, so they no longer run alone at the end.
template <int BM>
LR_HOST_DEVICE RowBlockPlan plan_row_block(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g, int64_t b,
                                           int64_t block) {
  RowBlockPlan r;
  const int64_t n_global_blocks = global_row_blocks(P, BM);
  if (block < n_global_blocks) {
    const int64_t start = block * BM;
    const int64_t n_global = g.row_count(b);
    if (start >= n_global) return r;
    r.valid = true;
    r.global_rows = true;
    r.first = start;
    r.n_rows = n_global - start < BM ? n_global - start : BM;
    r.n_band = s.k_len;
    r.n_tail = 0;
    return r;
  }
  block -= n_global_blocks;
  const int64_t d = P.window.dilation;
  const int64_t per_class = tiles_per_class(s.q_len, d, BM);
  const int64_t class_blocks = class_number(s.q_len, d) * per_class;
  if (block >= class_blocks) return r;  // past this sequence's classes (packed batches)
  r.cls = block / per_class;
  int64_t first, last;
  class_tile_members(s.q_len, r.cls, d, BM, block % per_class, &first, &last);
  if (first > last) return r;
  r.valid = true;
  r.first = first;
  r.n_rows = last - first + 1;
  const int64_t off = s.position_offset();
  row_tile_key_band(P.window, s, class_member(r.cls, first, d) + off, class_member(r.cls, last, d) + off, &r.band_lo,
                    &r.band_hi);
  r.n_band = band_count(r.band_lo, r.band_hi, d);
  r.n_tail = g.key_count(b);
  return r;
}

// Row blocks per (batch, head): the global-row blocks' upper bound plus the class blocks.
LR_HOST_DEVICE int64_t row_blocks(const AttentionParams& P, int64_t BM) {
  return global_row_blocks(P, BM) +
         class_number(P.q_len, P.window.dilation) * tiles_per_class(P.q_len, P.window.dilation, BM);
}

// Fills the rows of a row block: class blocks exclude global rows (mode 0),
// which their own blocks handle, and padded rows; rows there are "check the
// window" (mode 2).
template <int BM>
LR_HOST_DEVICE void fill_block_rows(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g,
                                    const KeyPadding& pad, int64_t b, const RowBlockPlan& r, TileSide rows) {
  const BlockCtx t = block_ctx();
  for (int a = t.tid; a < BM; a += t.nthreads) {
    int64_t i = -1;
    uint8_t mode = 0;
    if (a < r.n_rows) {
      if (r.global_rows) {
        i = g.row(P, s, b, r.first + a);
        mode = 1;
      } else {
        i = class_member(r.cls, r.first + a, P.window.dilation);
        if (!g.row_is_global(P, s, b, i) && !pad.row(P, s, b, i)) mode = 2;
      }
    }
    rows.idx[a] = mode == 0 ? -1 : i;
    rows.mode[a] = mode;
    if (rows.lo != nullptr) {  // the keys in row i's window, once per block
      int64_t lo = 0, hi = -1;
      if (mode == 2) window_key_range(P.window, s, i + s.position_offset(), &lo, &hi);
      store_range32(lo, hi, s.k_len, &rows.lo[a], &rows.hi[a]);
    }
  }
}

// Fills key tile `start .. start + BN` of a row block's walk: band keys
// (stepping by d from band_lo, or all keys for global rows) when `in_band_part`,
// else the global keys outside the band. Band keys that are global are always
// allowed; a band tile lying wholly inside every row's window needs no mask.
// Padded band keys are excluded (and not loaded).
template <int BN>
LR_HOST_DEVICE void fill_row_block_keys(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g,
                                        const KeyPadding& pad, int64_t b, const RowBlockPlan& r, bool in_band_part,
                                        int64_t start, TileSide keys) {
  const BlockCtx t = block_ctx();
  const int64_t d = P.window.dilation;
  bool whole_tile_in_window = false;
  if (in_band_part && !r.global_rows) {
    const int64_t off = s.position_offset();
    const int64_t last = (start + BN < r.n_band ? start + BN : r.n_band) - 1;
    whole_tile_in_window =
        tile_in_window(P.window, class_member(r.cls, r.first, d) + off, class_member(r.cls, r.first + r.n_rows - 1, d) + off,
                       r.band_lo + start * d, r.band_lo + last * d);
  }
  for (int c = t.tid; c < BN; c += t.nthreads) {
    const int64_t n = start + c;
    int64_t j = -1;
    uint8_t mode = 0;
    if (in_band_part) {
      if (n < r.n_band) {
        if (r.global_rows) {
          j = n;
          mode = 1;
        } else {
          j = r.band_lo + n * d;
          mode = (whole_tile_in_window || g.key_is_global(P, b, j)) ? 1 : 2;
        }
        if (pad.key(P, b, j)) mode = 0;
      }
    } else if (n < r.n_tail) {
      j = g.key(P, b, n);
      mode = in_band(j, r.band_lo, r.band_hi, d) ? 0 : 1;  // band keys were visited already
    }
    keys.idx[c] = mode == 0 ? -1 : j;
    keys.mode[c] = mode;
  }
}

// The transposed plan of a key block (dK/dV).
struct KeyBlockPlan {
  bool valid = false;
  bool global_keys = false;
  int64_t first = 0, cls = 0, n_keys = 0;
  int64_t band_lo = 0, band_hi = -1;  // rows of the band (class blocks)
  int64_t n_band = 0;                 // rows in the band; all rows for global-key blocks
  int64_t n_tail = 0;                 // global rows visited after the band
};

LR_HOST_DEVICE int64_t global_key_blocks(const AttentionParams& P, int64_t BN) {
  return P.has_global ? ceil_div_i64(P.k_len, BN) : 0;
}

// As plan_row_block: the global-key blocks (which walk every row) first.
template <int BN>
LR_HOST_DEVICE KeyBlockPlan plan_key_block(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g, int64_t b,
                                           int64_t block) {
  KeyBlockPlan r;
  const int64_t n_global_blocks = global_key_blocks(P, BN);
  if (block < n_global_blocks) {
    const int64_t start = block * BN;
    const int64_t n_global = g.key_count(b);
    if (start >= n_global) return r;
    r.valid = true;
    r.global_keys = true;
    r.first = start;
    r.n_keys = n_global - start < BN ? n_global - start : BN;
    r.n_band = s.q_len;
    return r;
  }
  block -= n_global_blocks;
  const int64_t d = P.window.dilation;
  const int64_t per_class = tiles_per_class(s.k_len, d, BN);
  const int64_t class_blocks = class_number(s.k_len, d) * per_class;
  if (block >= class_blocks) return r;  // past this sequence's classes (packed batches)
  r.cls = block / per_class;
  int64_t first, last;
  class_tile_members(s.k_len, r.cls, d, BN, block % per_class, &first, &last);
  if (first > last) return r;
  r.valid = true;
  r.first = first;
  r.n_keys = last - first + 1;
  key_tile_row_band(P.window, s, class_member(r.cls, first, d), class_member(r.cls, last, d), &r.band_lo, &r.band_hi);
  r.n_band = band_count(r.band_lo, r.band_hi, d);
  r.n_tail = g.row_count(b);
  return r;
}

LR_HOST_DEVICE int64_t key_blocks(const AttentionParams& P, int64_t BN) {
  return global_key_blocks(P, BN) +
         class_number(P.k_len, P.window.dilation) * tiles_per_class(P.k_len, P.window.dilation, BN);
}

// Keys of a key block: class blocks exclude global keys (their own blocks
// handle them) and padded keys; global-key blocks see every row.
template <int BN>
LR_HOST_DEVICE void fill_block_keys(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g,
                                    const KeyPadding& pad, int64_t b, const KeyBlockPlan& r, TileSide keys) {
  const BlockCtx t = block_ctx();
  for (int c = t.tid; c < BN; c += t.nthreads) {
    int64_t j = -1;
    uint8_t mode = 0;
    if (c < r.n_keys) {
      if (r.global_keys) {
        j = g.key(P, b, r.first + c);
        mode = 1;
      } else {
        j = class_member(r.cls, r.first + c, P.window.dilation);
        if (!g.key_is_global(P, b, j) && !pad.key(P, b, j)) mode = 2;
      }
    }
    keys.idx[c] = mode == 0 ? -1 : j;
    keys.mode[c] = mode;
    if (keys.lo != nullptr) {  // the rows whose window holds key j, once per block
      int64_t lo = 0, hi = -1;
      if (mode == 2) window_row_range(P.window, s, j, &lo, &hi);
      store_range32(lo, hi, s.q_len, &keys.lo[c], &keys.hi[c]);
    }
  }
}

// Rows of tile `start .. start + BM` of a key block's walk: band rows (global
// rows excluded: they come in the tail, always allowed), or all rows for a
// global-key block; padded rows excluded.
template <int BM>
LR_HOST_DEVICE void fill_key_block_rows(const AttentionParams& P, const SequenceView& s, const GlobalTokens& g,
                                        const KeyPadding& pad, int64_t b, const KeyBlockPlan& r, bool in_band_part,
                                        int64_t start, TileSide rows) {
  const BlockCtx t = block_ctx();
  for (int a = t.tid; a < BM; a += t.nthreads) {
    const int64_t n = start + a;
    int64_t i = -1;
    uint8_t mode = 0;
    if (in_band_part) {
      if (n < r.n_band) {
        if (r.global_keys) {
          i = n;
          mode = 1;
        } else {
          i = r.band_lo + n * P.window.dilation;
          mode = g.row_is_global(P, s, b, i) ? 0 : 2;
        }
        if (pad.row(P, s, b, i)) mode = 0;
      }
    } else if (n < r.n_tail) {
      i = g.row(P, s, b, n);
      mode = 1;
    }
    rows.idx[a] = mode == 0 ? -1 : i;
    rows.mode[a] = mode;
  }
}

// Turns raw products S[a][c] = q_a . k_c (row a at S + a * ld) into final
// scores (scale, softcap, ALiBi), -inf where the pair is not allowed.
template <typename acc_t, int BM, int BN>
LR_HOST_DEVICE void finalize_scores(const AttentionParams& P, const SequenceView& s, acc_t* S, int ld, TileSide rows,
                                    TileSide keys, acc_t slope) {
  const BlockCtx t = block_ctx();
  const acc_t scale = static_cast<acc_t>(P.scale), cap = static_cast<acc_t>(P.softcap);
  for (int e = t.tid; e < BM * BN; e += t.nthreads) {
    const int a = e / BN, c = e % BN;
    acc_t& x = S[a * ld + c];
    if (!pair_allowed(P, s, rows, a, keys, c)) {
      x = neg_infinity<acc_t>();
      continue;
    }
    x = transform_score<acc_t>(scale * x, cap, slope, abs_distance(rows.idx[a] + s.position_offset(), keys.idx[c]));
  }
}

// ------------------------------------------------------------ tile shapes --

// Tile sizes per (element type, head-dim bucket), chosen so every kernel's
// shared memory stays under 99 KiB (the per-block limit of sm86/sm89; sm80
// and sm90 allow more) with 128 threads per block.
template <typename T, int DMAX>
struct TileShape;
// float16 / bfloat16 (tensor cores: multiples of 16)
#define LR_TILE_SHAPE(T, DMAX, FM, FN, QM, QN, KM, KN)                                                \
  template <>                                                                                         \
  struct TileShape<T, DMAX> {                                                                         \
    static constexpr int kFwdM = FM, kFwdN = FN, kDqM = QM, kDqN = QN, kDkvM = KM, kDkvN = KN;        \
  };
LR_TILE_SHAPE(c10::Half, 64, 64, 64, 64, 64, 32, 64)
LR_TILE_SHAPE(c10::Half, 128, 64, 32, 32, 64, 32, 32)
LR_TILE_SHAPE(c10::Half, 256, 32, 32, 32, 16, 32, 16)
LR_TILE_SHAPE(c10::BFloat16, 64, 64, 64, 64, 64, 32, 64)
LR_TILE_SHAPE(c10::BFloat16, 128, 64, 32, 32, 64, 32, 32)
LR_TILE_SHAPE(c10::BFloat16, 256, 32, 32, 32, 16, 32, 16)
LR_TILE_SHAPE(float, 64, 64, 32, 64, 32, 32, 32)
LR_TILE_SHAPE(float, 128, 32, 32, 32, 32, 16, 32)
LR_TILE_SHAPE(float, 256, 16, 16, 16, 16, 16, 16)
#undef LR_TILE_SHAPE

constexpr int kThreads = 128;
constexpr int64_t kMaxSharedBytes = 99 * 1024;

// When the element type is the accumulation type (float32), probabilities and
// score gradients overwrite the scores in place instead of taking a buffer.
template <typename T, typename acc_t>
constexpr bool kAliasScores = std::is_same<T, acc_t>::value;

// Leading dimension (elements) of a shared-memory tile of n-element rows of U
// in a kernel on T. For the tensor-core types each row is padded by 16 bytes:
// n is a multiple of 16 elements, so unpadded rows are 32 or 64 bytes x 2^k
// apart and the 8 rows an ldmatrix phase (or an accumulator store) touches
// fall into the same 4 banks: an 8-way conflict. A 16-byte shift per row puts
// them on all 32 banks. It keeps WMMA's preconditions (ldm a multiple of
// 16 bytes; every 16-row / 16-column fragment start 32-byte aligned, as
// 16 * ld * sizeof(U) is) and the 16-byte loads' (ld a multiple of 16 bytes).
// float32 kernels run plain loops, whose access pattern this would not help:
// no padding (and P may keep aliasing S).
template <typename T, typename U>
constexpr int smem_ld(int n) {
  return n + (TensorCoreType<T>::value ? static_cast<int>(16 / sizeof(U)) : 0);
}

// --------------------------------------------------------------- forward --

template <typename T, typename acc_t, int DMAX, int BM, int BN>
struct ForwardSmem {
  static constexpr int64_t bytes() {
    constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);
    constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
    return smem_bytes<T>(BM * ldT) + 2 * smem_bytes<T>(BN * ldT) + smem_bytes<acc_t>(BM * ldS) +
           (kAliasScores<T, acc_t> ? 0 : smem_bytes<T>(BM * ldP)) + smem_bytes<acc_t>(BM * ldA) +
           3 * smem_bytes<acc_t>(BM) + smem_bytes<int64_t>(BM) + smem_bytes<int64_t>(BN) + smem_bytes<uint8_t>(BM) +
           smem_bytes<uint8_t>(BN) + 2 * smem_bytes<int32_t>(BM);
  }
};

template <typename T, typename acc_t, int DMAX, int BM, int BN>
LR_HOST_DEVICE void forward_block(const AttentionArgs<T, acc_t>& a, int64_t block, int64_t h, int64_t b,
                                  char* smem) {
  const AttentionParams& P = a.P;
  const SequenceView s = a.view(b);
  const RowBlockPlan plan = plan_row_block<BM>(P, s, a.global, b, block);
  if (!plan.valid) return;  // uniform over the block: before any barrier
  const BlockCtx t = block_ctx();
  const int D = static_cast<int>(P.head_dim), Dp = padded_head_dim(P.head_dim);
  const int64_t hk = h / P.group_size();
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, s));
  const acc_t slope = alibi_slope_of(a, b, h);
  const int64_t head_row = P.dropout.head_row(b, h, P.q_heads);  // dropout's key (common/philox.h)

  constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);  // see smem_ld
  constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
  SmemCarver sm{smem};
  T* sQ = sm.take<T>(BM * ldT);
  T* sK = sm.take<T>(BN * ldT);
  T* sV = sm.take<T>(BN * ldT);
  acc_t* sS = sm.take<acc_t>(BM * ldS);
  T* sP = kAliasScores<T, acc_t> ? reinterpret_cast<T*>(sS) : sm.take<T>(BM * ldP);
  acc_t* sO = sm.take<acc_t>(BM * ldA);
  acc_t* row_max = sm.take<acc_t>(BM);
  acc_t* row_sum = sm.take<acc_t>(BM);
  acc_t* row_scale = sm.take<acc_t>(BM);
  TileSide rows{sm.take<int64_t>(BM), nullptr};
  TileSide keys{sm.take<int64_t>(BN), nullptr};
  rows.mode = sm.take<uint8_t>(BM);
  keys.mode = sm.take<uint8_t>(BN);
  rows.lo = sm.take<int32_t>(BM);
  rows.hi = sm.take<int32_t>(BM);

  fill_block_rows<BM>(P, s, a.global, a.pad, b, plan, rows);
  fill(sO, BM * ldA, acc_t(0));
  fill(row_max, BM, neg_infinity<acc_t>());
  fill(row_sum, BM, acc_t(0));
  block_sync();
  load_rows(sQ, ldT, a.q.head(b, h), a.q.sl, rows.idx, BM, D, Dp, a.vec_loads);

  const int64_t n_band_tiles = ceil_div_i64(plan.n_band, BN), n_tail_tiles = ceil_div_i64(plan.n_tail, BN);
  for (int64_t tile = 0; tile < n_band_tiles + n_tail_tiles; ++tile) {
    const bool band_part = tile < n_band_tiles;
    fill_row_block_keys<BN>(P, s, a.global, a.pad, b, plan, band_part, (band_part ? tile : tile - n_band_tiles) * BN, keys);
    block_sync();
    load_rows(sK, ldT, a.k.head(b, hk), a.k.sl, keys.idx, BN, D, Dp, a.vec_loads);
    load_rows(sV, ldT, a.v.head(b, hk), a.v.sl, keys.idx, BN, D, Dp, a.vec_loads);
    block_sync();
    mm_abt<T, acc_t>(sS, ldS, sQ, ldT, sK, ldT, BM, BN, Dp);
    block_sync();
    finalize_scores<acc_t, BM, BN>(P, s, sS, ldS, rows, keys, slope);
    block_sync();
    if (sigmoid_score) {  // no running max or sum: each weight is final
      for (int e = t.tid; e < BM * BN; e += t.nthreads) {
        const int r = e / BN, c = e % BN;
        const acc_t s = sS[r * ldS + c];
        const acc_t w = s == neg_infinity<acc_t>() ? acc_t(0) : sigmoid<acc_t>(s + bias);
        sP[r * ldP + c] = static_cast<T>(dropped<acc_t>(P.dropout, head_row, rows.idx[r], keys.idx[c], w));
      }
    } else {  // online softmax: a warp per row, its lanes over the row's keys
      for (int r = t.warp; r < BM; r += t.nwarps) {
        const acc_t* s = sS + r * ldS;
        acc_t tile_max = neg_infinity<acc_t>();
        for (int c = t.lane; c < BN; c += t.warp_size) tile_max = nan_propagating_max(tile_max, s[c]);
        tile_max = warp_max(tile_max);
        const acc_t m_old = row_max[r];
        const acc_t m_new = nan_propagating_max(m_old, tile_max);  // NaN scores make a NaN row
        acc_t alpha = acc_t(1), sum = acc_t(0);
        if (m_new == neg_infinity<acc_t>()) {  // nothing allowed in this row so far
          for (int c = t.lane; c < BN; c += t.warp_size) sP[r * ldP + c] = static_cast<T>(acc_t(0));
        } else {
          alpha = exp(m_old - m_new);  // 0 when m_old = -inf
          for (int c = t.lane; c < BN; c += t.warp_size) {
            const acc_t p = exp(s[c] - m_new);
            sum += p;  // before dropout: the row's sum (so lse) sees every weight, as on CPU
            // may alias s[c] (float32): read above
            sP[r * ldP + c] = static_cast<T>(dropped<acc_t>(P.dropout, head_row, rows.idx[r], keys.idx[c], p));
          }
        }
        sum = warp_sum(sum);  // also orders every lane's read of row_max[r] before lane 0's write
        if (t.lane == 0) {
          row_sum[r] = row_sum[r] * alpha + sum;
          row_max[r] = m_new;
          row_scale[r] = alpha;
        }
      }
      block_sync();
      for (int e = t.tid; e < BM * Dp; e += t.nthreads) sO[(e / Dp) * ldA + e % Dp] *= row_scale[e / Dp];
    }
    block_sync();
    mm_ab_acc<T, acc_t>(sO, ldA, sP, ldP, sV, ldT, BM, Dp, BN);
    block_sync();
  }

  // Normalise and write (scores.h finish_softmax_row): a softmax row with no
  // allowed key has sum 0: zeros, lse = -inf, or lse = sink with a learnable
  // sink (a NaN sum, from a NaN score, gives NaN).
  acc_t* lse = a.lse + a.stat_base(b, h);
  const bool has_sink = a.sinks != nullptr;
  const acc_t sink = has_sink ? a.sinks[h] : acc_t(0);
  for (int r = t.tid; r < BM; r += t.nthreads) {
    acc_t row_lse = acc_t(0);
    if (sigmoid_score) {
      row_scale[r] = acc_t(1);
    } else {
      finish_softmax_row<acc_t>(row_max[r], row_sum[r], has_sink, sink, &row_scale[r], &row_lse);
    }
    if (rows.idx[r] >= 0) lse[rows.idx[r]] = row_lse;
  }
  block_sync();
  T* out = a.out.head(b, h);
  for (int e = t.tid; e < BM * D; e += t.nthreads) {
    const int r = e / D, c = e % D;
    if (rows.idx[r] >= 0) out[rows.idx[r] * a.out.sl + c] = static_cast<T>(sO[r * ldA + c] * row_scale[r]);
  }
}

// -------------------------------------------------------------- backward --

// The probability (or sigmoid weight) and the gradient of the raw product
// q.k for one allowed pair whose final score is s and whose dP is dp.
// Returns d loss / d (final score), the part the ALiBi slope gradient sums.
template <typename acc_t>
LR_HOST_DEVICE acc_t score_backward(const AttentionParams& P, acc_t s, acc_t dp, acc_t row_lse, acc_t row_dot,
                                    acc_t slope, acc_t bias, int64_t distance, acc_t* prob, acc_t* ds) {
  const acc_t cap = static_cast<acc_t>(P.softcap);
  acc_t g;
  if (P.score == ScoreKind::kSigmoid) {
    *prob = sigmoid<acc_t>(s + bias);
    g = sigmoid_score_grad<acc_t>(*prob, dp);
  } else {
    if (row_lse == neg_infinity<acc_t>()) {  // empty row: no gradient
      *prob = acc_t(0);
      *ds = acc_t(0);
      return acc_t(0);
    }
    *prob = exp(s - row_lse);
    g = softmax_score_grad<acc_t>(*prob, dp, row_dot);
  }
  const acc_t g_final = g;
  if (cap > acc_t(0)) g *= transform_score_grad<acc_t>(s, cap, slope, distance);
  *ds = g * static_cast<acc_t>(P.scale);  // d(score)/d(q.k) includes the scale
  return g_final;
}

// Per-element backward of one tile: S holds raw q.k, dP holds dO.v on entry
// (rows smem_ld<T, acc_t>(BN) apart; P and dS: smem_ld<T, T>(BN));
// on exit P (probabilities, element type; only with kStoreP: the dQ pass has no
// use for it) and dS (d loss / d q.k, element type). With dropout Z (keep /
// (1 - p)), out = (P o Z) V, as the CPU backward: the weights' gradient is
// Z o dP, dS is computed from it and the undropped P, and P comes out as P o Z
// (what dV = (P o Z)^T dO takes).
// Returns this thread's part of sum(dS_final * |p - j|) over the tile (the
// ALiBi slope gradient without its sign), 0 unless `slope_grad`.
template <typename T, typename acc_t, int BM, int BN, bool kStoreP = true>
LR_HOST_DEVICE acc_t tile_backward(const AttentionParams& P, const SequenceView& s, acc_t* S, acc_t* dP, T* Pout, T* dS, TileSide rows,
                                   TileSide keys, const acc_t* row_lse, const acc_t* row_dot, acc_t slope,
                                   int64_t head_row, bool slope_grad = false) {
  constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
  finalize_scores<acc_t, BM, BN>(P, s, S, ldS, rows, keys, slope);
  block_sync();
  const BlockCtx t = block_ctx();
  const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, s));
  acc_t slope_part = acc_t(0);
  for (int e = t.tid; e < BM * BN; e += t.nthreads) {
    const int a = e / BN, c = e % BN;
    const acc_t score = S[a * ldS + c];
    acc_t prob = acc_t(0), ds = acc_t(0);
    if (score != neg_infinity<acc_t>()) {
      const int64_t distance = abs_distance(rows.idx[a] + s.position_offset(), keys.idx[c]);
      const acc_t dp = dropped<acc_t>(P.dropout, head_row, rows.idx[a], keys.idx[c], dP[a * ldS + c]);
      const acc_t g = score_backward<acc_t>(P, score, dp, row_lse[a], row_dot[a], slope, bias, distance, &prob, &ds);
      if (slope_grad) slope_part += g * static_cast<acc_t>(distance);
      if constexpr (kStoreP) prob = dropped<acc_t>(P.dropout, head_row, rows.idx[a], keys.idx[c], prob);
    }
    // Pout / dS may alias S / dP (float32, same ld): each element is read before it is written.
    if constexpr (kStoreP) Pout[a * ldP + c] = static_cast<T>(prob);
    dS[a * ldP + c] = static_cast<T>(ds);
  }
  return slope_part;
}

template <typename T, typename acc_t, int DMAX, int BM, int BN>
struct DqSmem {
  static constexpr int64_t bytes() {
    constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);
    constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
    // No P tile: the dQ pass never stores P (tile_backward kStoreP = false).
    return 2 * smem_bytes<T>(BM * ldT) + 2 * smem_bytes<T>(BN * ldT) + 2 * smem_bytes<acc_t>(BM * ldS) +
           (kAliasScores<T, acc_t> ? 0 : smem_bytes<T>(BM * ldP)) + smem_bytes<acc_t>(BM * ldA) +
           2 * smem_bytes<acc_t>(BM) + smem_bytes<int64_t>(BM) + smem_bytes<int64_t>(BN) + smem_bytes<uint8_t>(BM) +
           smem_bytes<uint8_t>(BN) + 2 * smem_bytes<int32_t>(BM);
  }
};

// dQ for one row block: the forward's walk over keys, recomputing P.
template <typename T, typename acc_t, int DMAX, int BM, int BN>
LR_HOST_DEVICE void backward_dq_block(const AttentionArgs<T, acc_t>& a, int64_t block, int64_t h, int64_t b,
                                      char* smem) {
  const AttentionParams& P = a.P;
  const SequenceView s = a.view(b);
  const RowBlockPlan plan = plan_row_block<BM>(P, s, a.global, b, block);
  if (!plan.valid) return;
  const BlockCtx t = block_ctx();
  const int D = static_cast<int>(P.head_dim), Dp = padded_head_dim(P.head_dim);
  const int64_t hk = h / P.group_size();
  const acc_t slope = alibi_slope_of(a, b, h);

  constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);  // see smem_ld
  constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
  SmemCarver sm{smem};
  T* sQ = sm.take<T>(BM * ldT);
  T* sdO = sm.take<T>(BM * ldT);
  T* sK = sm.take<T>(BN * ldT);
  T* sV = sm.take<T>(BN * ldT);
  acc_t* sS = sm.take<acc_t>(BM * ldS);
  acc_t* sdP = sm.take<acc_t>(BM * ldS);
  T* sdS = kAliasScores<T, acc_t> ? reinterpret_cast<T*>(sdP) : sm.take<T>(BM * ldP);
  acc_t* sdQ = sm.take<acc_t>(BM * ldA);
  acc_t* row_lse = sm.take<acc_t>(BM);
  acc_t* row_dot = sm.take<acc_t>(BM);
  TileSide rows{sm.take<int64_t>(BM), nullptr};
  TileSide keys{sm.take<int64_t>(BN), nullptr};
  rows.mode = sm.take<uint8_t>(BM);
  keys.mode = sm.take<uint8_t>(BN);
  rows.lo = sm.take<int32_t>(BM);
  rows.hi = sm.take<int32_t>(BM);

  fill_block_rows<BM>(P, s, a.global, a.pad, b, plan, rows);
  fill(sdQ, BM * ldA, acc_t(0));
  block_sync();
  const int64_t row_base = a.stat_base(b, h);
  for (int r = t.tid; r < BM; r += t.nthreads) {
    const int64_t i = rows.idx[r];
    row_lse[r] = i >= 0 ? a.lse[row_base + i] : acc_t(0);
    row_dot[r] = i >= 0 && a.row_dot != nullptr ? a.row_dot[row_base + i] : acc_t(0);
    // Each row is in exactly one row block, so its sink gradient is written once.
    if (i >= 0 && a.sink_grad != nullptr) a.sink_grad[row_base + i] = sink_grad_of_row<acc_t>(a.sinks[h], row_lse[r], row_dot[r]);
  }
  load_rows(sQ, ldT, a.q.head(b, h), a.q.sl, rows.idx, BM, D, Dp, a.vec_loads);
  load_rows(sdO, ldT, a.grad_out.head(b, h), a.grad_out.sl, rows.idx, BM, D, Dp, a.vec_loads);

  const int64_t n_band_tiles = ceil_div_i64(plan.n_band, BN), n_tail_tiles = ceil_div_i64(plan.n_tail, BN);
  const bool slope_grad = a.slope_grad != nullptr;
  acc_t slope_part = acc_t(0);
  for (int64_t tile = 0; tile < n_band_tiles + n_tail_tiles; ++tile) {
    const bool band_part = tile < n_band_tiles;
    fill_row_block_keys<BN>(P, s, a.global, a.pad, b, plan, band_part, (band_part ? tile : tile - n_band_tiles) * BN, keys);
    block_sync();
    load_rows(sK, ldT, a.k.head(b, hk), a.k.sl, keys.idx, BN, D, Dp, a.vec_loads);
    load_rows(sV, ldT, a.v.head(b, hk), a.v.sl, keys.idx, BN, D, Dp, a.vec_loads);
    block_sync();
    mm_abt<T, acc_t>(sS, ldS, sQ, ldT, sK, ldT, BM, BN, Dp);
    mm_abt<T, acc_t>(sdP, ldS, sdO, ldT, sV, ldT, BM, BN, Dp);
    block_sync();
    slope_part += tile_backward<T, acc_t, BM, BN, /*kStoreP=*/false>(P, s, sS, sdP, nullptr, sdS, rows, keys, row_lse, row_dot,
                                                                     slope, P.dropout.head_row(b, h, P.q_heads), slope_grad);
    block_sync();
    mm_ab_acc<T, acc_t>(sdQ, ldA, sdS, ldP, sK, ldT, BM, Dp, BN);
    block_sync();
  }
  if (slope_grad) {  // the block's sum, at its first row: warps, then lane 0 of each through row_dot
    const acc_t warp_total = warp_sum(slope_part);
    block_sync();  // row_dot is read for the last time above (or, with no tile, written at the start)
    if (t.lane == 0) row_dot[t.warp] = warp_total;
    block_sync();
    if (t.tid == 0) {
      acc_t total = acc_t(0);
      for (int w = 0; w < t.nwarps; ++w) total += row_dot[w];
      int r = 0;
      while (r < BM && rows.idx[r] < 0) ++r;
      if (r < BM) a.slope_grad[row_base + rows.idx[r]] = -total;  // scores subtract slope * |p - j|
    }
  }

  T* dq = a.dq.head(b, h);
  for (int e = t.tid; e < BM * D; e += t.nthreads) {
    const int r = e / D, c = e % D;
    if (rows.idx[r] >= 0) dq[rows.idx[r] * a.dq.sl + c] = static_cast<T>(sdQ[r * ldA + c]);
  }
}

template <typename T, typename acc_t, int DMAX, int BM, int BN>
struct DkvSmem {
  static constexpr int64_t bytes() {
    constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);
    constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
    return 2 * smem_bytes<T>(BN * ldT) + 2 * smem_bytes<T>(BM * ldT) + 2 * smem_bytes<acc_t>(BM * ldS) +
           (kAliasScores<T, acc_t> ? 0 : 2 * smem_bytes<T>(BM * ldP)) + 2 * smem_bytes<acc_t>(BN * ldA) +
           2 * smem_bytes<acc_t>(BM) + smem_bytes<int64_t>(BM) + smem_bytes<int64_t>(BN) + smem_bytes<uint8_t>(BM) +
           smem_bytes<uint8_t>(BN) + 2 * smem_bytes<int32_t>(BN);
  }
};

// dK and dV for one key block of one kv head, summing the query heads of its
// GQA group: each key's gradient is written by exactly one block, no atomics.
// With a.dkv_per_query_head, `head` is a query head instead: the block takes
// that head's share only and writes it to dk_part / dv_part.
template <typename T, typename acc_t, int DMAX, int BM, int BN>
LR_HOST_DEVICE void backward_dkv_block(const AttentionArgs<T, acc_t>& a, int64_t block, int64_t head, int64_t b,
                                       char* smem) {
  const AttentionParams& P = a.P;
  const SequenceView s = a.view(b);
  const KeyBlockPlan plan = plan_key_block<BN>(P, s, a.global, b, block);
  if (!plan.valid) return;
  const BlockCtx t = block_ctx();
  const int D = static_cast<int>(P.head_dim), Dp = padded_head_dim(P.head_dim);
  const bool per_query_head = a.dkv_per_query_head;
  const int64_t hk = per_query_head ? head / P.group_size() : head;
  const int64_t h_first = per_query_head ? head : hk * P.group_size();
  const int64_t h_end = per_query_head ? head + 1 : (hk + 1) * P.group_size();

  constexpr int ldT = smem_ld<T, T>(DMAX), ldA = smem_ld<T, acc_t>(DMAX);  // see smem_ld
  constexpr int ldS = smem_ld<T, acc_t>(BN), ldP = smem_ld<T, T>(BN);
  SmemCarver sm{smem};
  T* sK = sm.take<T>(BN * ldT);
  T* sV = sm.take<T>(BN * ldT);
  T* sQ = sm.take<T>(BM * ldT);
  T* sdO = sm.take<T>(BM * ldT);
  acc_t* sS = sm.take<acc_t>(BM * ldS);
  acc_t* sdP = sm.take<acc_t>(BM * ldS);
  T* sP = kAliasScores<T, acc_t> ? reinterpret_cast<T*>(sS) : sm.take<T>(BM * ldP);
  T* sdS = kAliasScores<T, acc_t> ? reinterpret_cast<T*>(sdP) : sm.take<T>(BM * ldP);
  acc_t* sdK = sm.take<acc_t>(BN * ldA);
  acc_t* sdV = sm.take<acc_t>(BN * ldA);
  acc_t* row_lse = sm.take<acc_t>(BM);
  acc_t* row_dot = sm.take<acc_t>(BM);
  TileSide rows{sm.take<int64_t>(BM), nullptr};
  TileSide keys{sm.take<int64_t>(BN), nullptr};
  rows.mode = sm.take<uint8_t>(BM);
  keys.mode = sm.take<uint8_t>(BN);
  keys.lo = sm.take<int32_t>(BN);
  keys.hi = sm.take<int32_t>(BN);

  fill_block_keys<BN>(P, s, a.global, a.pad, b, plan, keys);
  fill(sdK, BN * ldA, acc_t(0));
  fill(sdV, BN * ldA, acc_t(0));
  block_sync();
  load_rows(sK, ldT, a.k.head(b, hk), a.k.sl, keys.idx, BN, D, Dp, a.vec_loads);
  load_rows(sV, ldT, a.v.head(b, hk), a.v.sl, keys.idx, BN, D, Dp, a.vec_loads);

  const int64_t n_band_tiles = ceil_div_i64(plan.n_band, BM), n_tail_tiles = ceil_div_i64(plan.n_tail, BM);
  for (int64_t h = h_first; h < h_end; ++h) {
    const acc_t slope = alibi_slope_of(a, b, h);
    const int64_t row_base = a.stat_base(b, h);
    for (int64_t tile = 0; tile < n_band_tiles + n_tail_tiles; ++tile) {
      const bool band_part = tile < n_band_tiles;
      fill_key_block_rows<BM>(P, s, a.global, a.pad, b, plan, band_part, (band_part ? tile : tile - n_band_tiles) * BM, rows);
      block_sync();
      for (int r = t.tid; r < BM; r += t.nthreads) {
        const int64_t i = rows.idx[r];
        row_lse[r] = i >= 0 ? a.lse[row_base + i] : acc_t(0);
        row_dot[r] = i >= 0 && a.row_dot != nullptr ? a.row_dot[row_base + i] : acc_t(0);
      }
      load_rows(sQ, ldT, a.q.head(b, h), a.q.sl, rows.idx, BM, D, Dp, a.vec_loads);
      load_rows(sdO, ldT, a.grad_out.head(b, h), a.grad_out.sl, rows.idx, BM, D, Dp, a.vec_loads);
      block_sync();
      mm_abt<T, acc_t>(sS, ldS, sQ, ldT, sK, ldT, BM, BN, Dp);
      mm_abt<T, acc_t>(sdP, ldS, sdO, ldT, sV, ldT, BM, BN, Dp);
      block_sync();
      tile_backward<T, acc_t, BM, BN>(P, s, sS, sdP, sP, sdS, rows, keys, row_lse, row_dot, slope,
                                      P.dropout.head_row(b, h, P.q_heads));
      block_sync();
      mm_atb_acc<T, acc_t>(sdV, ldA, sP, ldP, sdO, ldT, BN, Dp, BM);
      mm_atb_acc<T, acc_t>(sdK, ldA, sdS, ldP, sQ, ldT, BN, Dp, BM);
      block_sync();
    }
  }

  if (per_query_head) {  // this head's float32 share; the host sums the group
    acc_t* dk = a.dk_part.head(b, head);
    acc_t* dv = a.dv_part.head(b, head);
    for (int e = t.tid; e < BN * D; e += t.nthreads) {
      const int c = e / D, col = e % D;
      if (keys.idx[c] >= 0) {
        dk[keys.idx[c] * a.dk_part.sl + col] = sdK[c * ldA + col];
        dv[keys.idx[c] * a.dv_part.sl + col] = sdV[c * ldA + col];
      }
    }
    return;
  }
  T* dk = a.dk.head(b, hk);
  T* dv = a.dv.head(b, hk);
  for (int e = t.tid; e < BN * D; e += t.nthreads) {
    const int c = e / D, col = e % D;
    if (keys.idx[c] >= 0) {
      dk[keys.idx[c] * a.dk.sl + col] = static_cast<T>(sdK[c * ldA + col]);
      dv[keys.idx[c] * a.dv.sl + col] = static_cast<T>(sdV[c * ldA + col]);
    }
  }
}

}  // namespace longreach::cuda_kernels
