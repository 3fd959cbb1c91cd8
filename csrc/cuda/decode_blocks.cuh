// The bodies of the CUDA decode kernels of longreach::local_attention_kvcache_fwd
// (a few query rows against a KV cache read in place), written with the
// block-cooperative pieces of block_ops.cuh so they also run on the host
// (tests/emulation/decode_emulation.cpp). All window, score, cache and merge
// math comes from csrc/common/ (window.h, scores.h, kv_cache.h, split_merge.h).
//
// Work decomposition, the CPU decode kernel's (cpu/kvcache_attention.cpp):
//   * A *unit* is (batch row b, kv head hk, residue class cls of the rows mod
//     the dilation, row chunk): up to kDecodeRows query rows i = cls, cls + d,
//     ... of the query heads of hk's GQA group, head-major. All its rows see
//     keys of one residue class, so each key (or value) the block loads from
//     the cache serves every query head of the group (GQA/MQA: the kv head is
//     read once, not once per query head).
//   * The unit's keys are the class keys from the lowest to the highest key of
//     its rows' window bands (window_key_range: window, dilation, chunk), plus
//     the sink tokens. A split (blockIdx.x) takes one contiguous part of those
//     class keys (split-KV) and split 0 also the sink tokens; each split leaves
//     its rows' (max, sum, accumulator), merged by split_merge.h in a second
//     kernel, or the block finishes its rows itself when there is one split.
//   * Per tile of keys: the block loads the keys into shared memory as float
//     (any layout: each key's slot from kv_cache.h, coalesced along D), every
//     thread computes whole scores of (row, key) pairs from shared memory,
//     one warp per row updates the online softmax with warp-shuffle max / sum
//     over the tile's keys (a row's keys are spread over the lanes, so a row
//     costs two butterflies per tile, not a loop over 32 lanes' results), then
//     the values replace the keys and every thread accumulates elements of
//     O += P V. One warp per row rather than one per key: with Lq * group <=
//     16 rows and tiles of 32-128 keys, rows are what the reductions run over.
//
// A plain kernel: float32 shared-memory tiles and scalar loads, no tensor
// cores (Lq * group is a handful of rows; the key loads dominate decoding).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "../common/geometry.h"
#include "../common/kv_cache.h"
#include "../common/params.h"
#include "../common/scores.h"
#include "../common/split_merge.h"
#include "../common/window.h"
#include "block_ops.cuh"

namespace longreach::cuda_kernels {

constexpr int kDecodeRows = 16;          // query rows of a unit (a block)
constexpr int kDecodeTileFloats = 8192;  // a key (value) tile: 32 KiB of float, keys = this / D
constexpr int kDecodeMergeRows = 4;      // rows per block of the merge kernel (one warp each)
constexpr int64_t kDecodeMaxSplits = 128;

// Keys per tile for head dim D: 32 (D = 256) to 128 (D <= 64).
LR_HOST_DEVICE int decode_tile_keys(int64_t D) {
  const int64_t n = kDecodeTileFloats / D;
  return static_cast<int>(n < 16 ? 16 : (n > 128 ? 128 : n));
}

// One query row of a block, filled at the block's start.
struct DecodeRow {
  WindowSpec win;     // its head's window (the head's chunk grid)
  int64_t pos;        // its position T_b - Lq + i
  int64_t lo, hi;     // the class keys of its window band (lo > hi: none)
  int64_t out_row;    // (b * Hq + h) * Lq + i: its row of out / lse
  float slope;        // ALiBi (0 without)
  float sink;         // learnable sink logit (when has_sink)
};

template <typename T>
struct DecodeArgs {
  AttentionParams P;  // k_len: the longest row's key count; window with chunk (phase per head below)
  CacheAddress kc, vc;
  const T* q;         // (B, Hq, Lq, D), last dimension contiguous
  int64_t q_sb, q_sh, q_sl;
  const T* k;
  const T* v;
  const int64_t* k_lens;        // (B,): T_b, the keys of row b
  const int64_t* chunk_phases;  // (Hq,) each head's chunk_shift mod chunk, null without chunks
  const float* slopes;          // ALiBi (Hq,) or (B, Hq), null when off
  int64_t slope_sb, slope_sh;
  const float* sinks;           // (Hq,) learnable sink logits, null when off
  T* out;                       // (B, Hq, Lq, D) contiguous
  float* lse;                   // (B, Hq, Lq)
  float* partial;               // n_splits > 1: (B * Hq * Lq, n_splits, D + 2): acc[D], max, sum
  int64_t n_splits;
  int64_t classes;              // min(dilation, Lq): residue classes of the rows
  int64_t row_chunks;           // units per (kv head, class): ceil(group * rows of class 0 / kDecodeRows)

  LR_HOST_DEVICE int64_t units_per_batch() const { return P.kv_heads * classes * row_chunks; }
  LR_HOST_DEVICE int64_t rows() const { return P.batch * P.q_heads * P.q_len; }
  // KvCacheProblem::head_window on the device: the window with head h's chunk grid.
  LR_HOST_DEVICE WindowSpec head_window(int64_t h) const {
    WindowSpec w = P.window;
    if (w.chunk > 0) w.chunk_phase = chunk_phases[h];
    return w;
  }
};

// Shared memory of a decode block for head dim D (host and device agree).
inline int64_t decode_smem_bytes(int64_t D) {
  const int64_t nt = decode_tile_keys(D);
  return smem_bytes<DecodeRow>(kDecodeRows) + 2 * smem_bytes<float>(kDecodeRows * D) + smem_bytes<float>(nt * D) +
         smem_bytes<float>(kDecodeRows * nt) + 3 * smem_bytes<float>(kDecodeRows);
}

// Block (split, unit) of batch row b. Rows without a key, splits without a
// key and surplus units are all written (zeros, lse -inf or the sink): the
// launcher allocates out / lse / partial uninitialised.
template <typename T>
LR_HOST_DEVICE void decode_block(const DecodeArgs<T>& a, int64_t split, int64_t unit, int64_t b, char* smem) {
  const BlockCtx t = block_ctx();
  const AttentionParams& P = a.P;
  const int64_t G = P.group_size(), Lq = P.q_len, Hq = P.q_heads, d = P.window.dilation;
  const int D = static_cast<int>(P.head_dim);
  const int64_t chunk = unit % a.row_chunks;
  const int64_t cls = (unit / a.row_chunks) % a.classes;
  const int64_t hk = unit / (a.row_chunks * a.classes);
  const int64_t per_head = (Lq - cls + d - 1) / d;  // rows of this class per query head
  const int64_t r0 = chunk * kDecodeRows;
  if (r0 >= G * per_head) return;  // a surplus unit (classes past 0 can have fewer rows): the whole block exits
  const int m = static_cast<int>(G * per_head - r0 < kDecodeRows ? G * per_head - r0 : kDecodeRows);
  const SequenceView seq{Lq, a.k_lens[b], 0, 0};
  const int64_t off = seq.position_offset();
  const int nt = decode_tile_keys(D);
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const bool has_sink = a.sinks != nullptr;
  const float neg_inf = -std::numeric_limits<float>::infinity();

  SmemCarver carve{smem};
  DecodeRow* rows = carve.take<DecodeRow>(kDecodeRows);
  float* qs = carve.take<float>(kDecodeRows * D);   // the rows' q
  float* acc = carve.take<float>(kDecodeRows * D);  // sum exp(s - max) v (sigmoid: sum sigmoid v)
  float* kv = carve.take<float>(static_cast<int64_t>(nt) * D);  // a tile of keys, then of values
  float* S = carve.take<float>(kDecodeRows * nt);   // scores, then weights
  float* row_max = carve.take<float>(kDecodeRows);
  float* row_sum = carve.take<float>(kDecodeRows);
  float* alpha = carve.take<float>(kDecodeRows);    // the tile's rescale of acc

  // Row rr of the unit: query head hk * G + rr / per_head, row index cls + (rr % per_head) * d.
  for (int r = t.tid; r < m; r += t.nthreads) {
    const int64_t rr = r0 + r, h = hk * G + rr / per_head, i = cls + (rr % per_head) * d;
    DecodeRow& row = rows[r];
    row.win = a.head_window(h);
    row.pos = i + off;
    window_key_range(row.win, seq, row.pos, &row.lo, &row.hi);
    row.out_row = (b * Hq + h) * Lq + i;
    row.slope = a.slopes == nullptr ? 0.0f : a.slopes[b * a.slope_sb + h * a.slope_sh];
    row.sink = has_sink ? a.sinks[h] : 0.0f;
    row_max[r] = neg_inf;
    row_sum[r] = 0.0f;
  }
  for (int e = t.tid; e < m * D; e += t.nthreads) {
    const int r = e / D, x = e % D;
    const int64_t rr = r0 + r, h = hk * G + rr / per_head, i = cls + (rr % per_head) * d;
    qs[e] = static_cast<float>(a.q[b * a.q_sb + h * a.q_sh + i * a.q_sl + x]);
    acc[e] = 0.0f;
  }
  block_sync();

  // The unit's class keys: lo_all, lo_all + d, ..., n of them (every thread the same).
  int64_t lo_all = 0, hi_all = -1;
  for (int r = 0; r < m; ++r) {
    if (rows[r].lo > rows[r].hi) continue;
    if (hi_all < lo_all) {
      lo_all = rows[r].lo, hi_all = rows[r].hi;
    } else {
      lo_all = rows[r].lo < lo_all ? rows[r].lo : lo_all;
      hi_all = rows[r].hi > hi_all ? rows[r].hi : hi_all;
    }
  }
  const int64_t n = hi_all >= lo_all ? (hi_all - lo_all) / d + 1 : 0;
  const float scale = static_cast<float>(P.scale), softcap = static_cast<float>(P.softcap);
  const float bias = static_cast<float>(sigmoid_bias_of(P, seq));

  // Keys j0 + c * step, c in [0, ncols). In the window segment a row sees the
  // keys of its band [lo, hi]; in the sink segment the sink keys at or before
  // its position that its window does not hold (window.h's one rule, as CPU).
  auto run_segment = [&](int64_t j0, int64_t step, int64_t ncols, bool sink_segment) {
    for (int64_t c0 = 0; c0 < ncols; c0 += nt) {
      const int nk = static_cast<int>(ncols - c0 < nt ? ncols - c0 : nt);
      const int64_t jt = j0 + c0 * step;
      for (int e = t.tid; e < nk * D; e += t.nthreads) {
        const int c = e / D, x = e % D;
        kv[e] = static_cast<float>(a.k[a.kc.offset(b, hk, jt + c * step) + x]);
      }
      block_sync();
      for (int e = t.tid; e < m * nk; e += t.nthreads) {
        const int r = e / nk, c = e % nk;
        const DecodeRow& row = rows[r];
        const int64_t j = jt + c * step;
        const bool seen = sink_segment ? !in_window(row.win, row.pos, j) &&
                                             extra_key_visible(row.win, row.pos, j, false, false)
                                       : j >= row.lo && j <= row.hi;
        float s = sigmoid_score ? 0.0f : neg_inf;
        if (seen) {
          const float* qr = qs + r * D;
          const float* kr = kv + c * D;
          float dot = 0.0f;
          for (int x = 0; x < D; ++x) dot += qr[x] * kr[x];
          s = transform_score<float>(scale * dot, softcap, row.slope, abs_distance(row.pos, j));
          if (sigmoid_score) s = sigmoid<float>(s + bias);  // final at once: no max, no sum
        }
        S[r * nt + c] = s;
      }
      block_sync();
      if (!sigmoid_score) {
        // Online softmax, one warp per row: the tile's max, the new running
        // max, the weights exp(s - max) in place of the scores, and their sum.
        for (int r = t.warp; r < m; r += t.nwarps) {
          const float m_old = row_max[r];
          float tile_max = neg_inf;
          for (int c = t.lane; c < nk; c += t.warp_size) tile_max = nan_propagating_max(S[r * nt + c], tile_max);
          const float m_new = nan_propagating_max(warp_max(tile_max), m_old);
          const float base = m_new == neg_inf ? 0.0f : m_new;  // no key yet: every weight is exp(-inf) = 0
          float psum = 0.0f;
          for (int c = t.lane; c < nk; c += t.warp_size) {
            const float p = exp(S[r * nt + c] - base);
            S[r * nt + c] = p;
            psum += p;
          }
          psum = warp_sum(psum);
          if (t.lane == 0) {  // the shuffles above ordered every lane's read of row_max[r] before this
            const float al = exp(m_old - base);  // m_old = -inf: 0 (acc and sum are still 0)
            row_max[r] = m_new;
            row_sum[r] = row_sum[r] * al + psum;
            alpha[r] = al;
          }
        }
      }
      // The tile's values replace its keys (every score has been computed).
      for (int e = t.tid; e < nk * D; e += t.nthreads) {
        const int c = e / D, x = e % D;
        kv[e] = static_cast<float>(a.v[a.vc.offset(b, hk, jt + c * step) + x]);
      }
      block_sync();
      for (int e = t.tid; e < m * D; e += t.nthreads) {
        const int r = e / D, x = e % D;
        float o = sigmoid_score ? acc[e] : acc[e] * alpha[r];
        for (int c = 0; c < nk; ++c) o += S[r * nt + c] * kv[c * D + x];
        acc[e] = o;
      }
      block_sync();
    }
  };

  // Sink tokens (split 0): keys 0 .. sink_tokens - 1 of the row's sequence.
  const int64_t n_sink = P.window.sink_tokens < seq.k_len ? P.window.sink_tokens : seq.k_len;
  if (split == 0 && n_sink > 0) run_segment(0, 1, n_sink, true);
  // This split's part of the class keys.
  const int64_t c_begin = n * split / a.n_splits, c_end = n * (split + 1) / a.n_splits;
  if (c_begin < c_end) run_segment(lo_all + c_begin * d, d, c_end - c_begin, false);

  if (a.n_splits > 1) {  // the rows' partial results, merged by decode_merge_block
    const int part = D + 2;
    for (int e = t.tid; e < m * part; e += t.nthreads) {
      const int r = e / part, x = e % part;
      float* dst = a.partial + (rows[r].out_row * a.n_splits + split) * part;
      dst[x] = x < D ? acc[r * D + x] : (x == D ? row_max[r] : row_sum[r]);
    }
    return;
  }
  // One split: the merge of one part (and the sink), split_merge.h as in decode_merge_block.
  for (int r = t.warp; r < m; r += t.nwarps) {
    const DecodeRow& row = rows[r];
    float factor = 1.0f, lse = 0.0f;  // sigmoid: no normaliser, lse not defined (0, as CPU)
    bool empty = false;
    if (!sigmoid_score) {
      SplitMerge<float> merge(
          SplitMerge<float>::fold_max(SplitMerge<float>::start_max(has_sink, row.sink), row_max[r]), has_sink,
          row.sink);
      merge.add(row_max[r], row_sum[r]);
      empty = merge.empty();
      factor = merge.weight(row_max[r]) * merge.inv_total();
      lse = merge.lse();
    }
    for (int x = t.lane; x < D; x += t.warp_size) {
      a.out[row.out_row * D + x] = static_cast<T>(empty ? 0.0f : acc[r * D + x] * factor);
    }
    if (t.lane == 0) a.lse[row.out_row] = lse;
  }
}

// Block blk of the merge kernel: rows blk * kDecodeMergeRows .. + 3 of out /
// lse from their n_splits partial results (split_merge.h), one warp per row.
template <typename T>
LR_HOST_DEVICE void decode_merge_block(const DecodeArgs<T>& a, int64_t blk) {
  const BlockCtx t = block_ctx();
  const AttentionParams& P = a.P;
  const int D = static_cast<int>(P.head_dim), part = D + 2;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const bool has_sink = a.sinks != nullptr;
  for (int rr = t.warp; rr < kDecodeMergeRows; rr += t.nwarps) {
    const int64_t row = blk * kDecodeMergeRows + rr;
    if (row >= a.rows()) break;
    const float* parts = a.partial + row * a.n_splits * part;
    if (sigmoid_score) {
      for (int x = t.lane; x < D; x += t.warp_size) {
        float o = 0.0f;
        for (int64_t s = 0; s < a.n_splits; ++s) o += parts[s * part + x];
        a.out[row * D + x] = static_cast<T>(o);
      }
      if (t.lane == 0) a.lse[row] = 0.0f;
      continue;
    }
    const float sink = has_sink ? a.sinks[(row / P.q_len) % P.q_heads] : 0.0f;
    float mx = SplitMerge<float>::start_max(has_sink, sink);
    for (int64_t s = 0; s < a.n_splits; ++s) mx = SplitMerge<float>::fold_max(mx, parts[s * part + D]);
    SplitMerge<float> merge(mx, has_sink, sink);
    for (int64_t s = 0; s < a.n_splits; ++s) merge.add(parts[s * part + D], parts[s * part + D + 1]);
    const float inv = merge.inv_total();
    for (int x = t.lane; x < D; x += t.warp_size) {
      float o = 0.0f;
      for (int64_t s = 0; s < a.n_splits; ++s) {
        if (parts[s * part + D] == -std::numeric_limits<float>::infinity()) continue;  // a part without keys
        o += merge.weight(parts[s * part + D]) * parts[s * part + x];
      }
      a.out[row * D + x] = static_cast<T>(merge.empty() ? 0.0f : o * inv);
    }
    if (t.lane == 0) a.lse[row] = merge.lse();
  }
}

}  // namespace longreach::cuda_kernels
