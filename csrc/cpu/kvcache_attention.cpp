// CPU decode kernel of longreach::local_attention_kvcache_fwd: a few new query
// rows against a KV cache (contiguous, rolling or paged; common/kv_cache.h),
// read in place. Work items are (batch row, residue class, block of rows,
// split): a block holds up to 32 rows of one residue class (p mod dilation),
// query heads in order, so each key it reads serves the rows of its GQA
// group and a tile reads every head's keys of its positions together; splits cut the block's keys into parts (split-KV) that
// run on different threads when there are fewer blocks than threads, and
// their partial (out, max, sum) are merged by log-sum-exp at the end, where
// the learnable sink logits join the denominator. Keys are read as rows
// (rows_dot / rows_axpy: packing K^T costs as much as using it for a few
// rows), in runs of one stride through the cache's storage. Chunks: each row
// applies its head's window (KvCacheProblem::head_window, the per-head shift as
// data, so one call serves heads of every shift), and a block reads only the
// keys of its rows' chunks, O(Lq + chunk) per row, not the history.
#include "kvcache_attention.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common/scores.h"
#include "../common/split_merge.h"
#include "../common/window.h"
#include "attention_rows.h"
#include "tile_ops.h"

namespace longreach::cpu {
namespace detail {
namespace {

constexpr int64_t kBlockRows = 32;  // rows of a work item (softmax_rows takes at most 4096)
constexpr int64_t kTileKeys = 128;  // keys per score tile
constexpr int64_t kMaxSplits = 256;
constexpr int64_t kInterleavedPiece = 16;  // keys per piece where a position's heads are interleaved
constexpr int64_t kConvertedPiece = 32;    // the same, 16-bit caches converted a piece at a time

// A block of rows of one (batch row, residue class): query heads in order, so
// the rows of each kv head are a contiguous range of the block, and the class
// keys its windows cover: positions lo, lo + d, ..., n of them. A block spans
// kv heads so that a tile reads all heads of its positions together: in a
// paged cache (num_blocks, block_size, Hk, D) one head's keys are Hk * D apart,
// and a block per kv head touched a new page for every key (the paged decode
// step took 1.6-1.9x the contiguous one; bench_decode.py).
struct RowBlock {
  int64_t b;
  std::vector<int64_t> heads, rows;  // row a: query head heads[a], row index rows[a] (position k_len - Lq + rows[a])
  int64_t lo = 0, n = 0;
};

std::vector<RowBlock> make_blocks(const KvCacheProblem& pr) {
  const AttentionParams& P = pr.params;
  const int64_t d = P.window.dilation, Lq = P.q_len;
  std::vector<RowBlock> blocks;
  for (int64_t b = 0; b < P.batch; ++b) {
    for (int64_t i0 = 0; i0 < std::min(d, Lq); ++i0) {  // one residue class per first row
      RowBlock blk{b, {}, {}};
      for (int64_t h = 0; h < P.q_heads; ++h) {
        for (int64_t i = i0; i < Lq; i += d) {
          if (static_cast<int64_t>(blk.rows.size()) == kBlockRows) {
            blocks.push_back(blk);
            blk.heads.clear();
            blk.rows.clear();
          }
          blk.heads.push_back(h);
          blk.rows.push_back(i);
        }
      }
      if (!blk.rows.empty()) blocks.push_back(blk);
    }
  }
  // The class keys the block's windows cover: the span from the lowest to the
  // highest key of the rows' bands (each a band in the one class). Every row is
  // asked, as with chunks the heads' grids differ (per-head shifts), so the
  // bands are not ordered by row; a block's span is then at most Lq + chunk
  // positions, not the history.
  for (RowBlock& blk : blocks) {
    const SequenceView& s = pr.rows[blk.b];
    const int64_t off = s.position_offset();
    int64_t lo_all = 0, hi_all = -1;
    for (size_t a = 0; a < blk.rows.size(); ++a) {
      int64_t lo, hi;
      window_key_range(pr.head_window(blk.heads[a]), s, blk.rows[a] + off, &lo, &hi);
      if (lo > hi) continue;
      if (hi_all < lo_all) {
        lo_all = lo, hi_all = hi;
      } else {
        lo_all = std::min(lo_all, lo), hi_all = std::max(hi_all, hi);
      }
    }
    blk.lo = lo_all;
    blk.n = hi_all >= lo_all ? (hi_all - lo_all) / d + 1 : 0;
  }
  return blocks;
}

// Splits per block: as asked, or enough to give every thread two items when
// the blocks alone cannot, without parts of fewer than ~512 keys.
int64_t choose_splits(const KvCacheProblem& pr, const std::vector<RowBlock>& blocks) {
  if (pr.num_splits > 0) return std::min(pr.num_splits, kMaxSplits);
  int64_t longest = 0;
  for (const RowBlock& blk : blocks) longest = std::max(longest, blk.n);
  const int64_t nb = std::max<int64_t>(1, static_cast<int64_t>(blocks.size()));
  const int64_t threads = at::get_num_threads();
  if (nb >= 2 * threads) return 1;
  const int64_t wanted = (2 * threads + nb - 1) / nb;
  return std::max<int64_t>(1, std::min({wanted, longest / 512, kMaxSplits}));
}

template <typename acc_t>
struct DecodeScratch {
  int64_t ld_s;
  Buffer<acc_t> q, S, alpha, kbuf, vbuf, piece;
  std::vector<int64_t> first, end, run_first, run_end, pos;
  DecodeScratch(int64_t D, int64_t W) : ld_s(round_up(kTileKeys, W) + W) {
    q.resize(kBlockRows * D);
    S.resize(kBlockRows * ld_s);
    alpha.resize(kBlockRows);
    kbuf.resize(kTileKeys * D);
    vbuf.resize(kTileKeys * D);
    for (auto* v : {&first, &end, &run_first, &run_end, &pos}) v->resize(kBlockRows);
  }
};

template <typename scalar_t>
void decode_kernel(const KvCacheProblem& pr, const at::Tensor& q, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slopes, const at::Tensor& sinks, at::Tensor& out,
                   at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionParams& P = pr.params;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, W = ops.vec_width, d = P.window.dilation;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t scale = static_cast<acc_t>(P.scale), softcap = static_cast<acc_t>(P.softcap);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const CacheAddress ka{pr.cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), pr.block_table.data(),
                        pr.max_blocks};
  const CacheAddress va{pr.cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), pr.block_table.data(),
                        pr.max_blocks};
  // One head's consecutive keys are not consecutive rows (paged, or a (B, L, Hk, D)
  // cache seen through a transpose).
  const bool spread_keys = ka.token_stride() > D || va.token_stride() > D;
  const scalar_t* K = k_cache.const_data_ptr<scalar_t>();
  const scalar_t* V = v_cache.const_data_ptr<scalar_t>();
  const scalar_t* Q = q.const_data_ptr<scalar_t>();

  const std::vector<RowBlock> blocks = make_blocks(pr);
  const int64_t n_splits = choose_splits(pr, blocks);
  const int64_t part = D + 2;  // a row's partial result: acc[D], max, sum
  std::vector<int64_t> part_base(blocks.size() + 1, 0);
  for (size_t i = 0; i < blocks.size(); ++i) {
    part_base[i + 1] = part_base[i] + static_cast<int64_t>(blocks[i].rows.size()) * n_splits * part;
  }
  Buffer<acc_t> partial(std::max<int64_t>(1, part_base.back()));

  auto make_scratch = [&] { return DecodeScratch<acc_t>(D, W); };
  const int64_t n_items = static_cast<int64_t>(blocks.size()) * n_splits;
  parallel_items(n_items, make_scratch, [&](int64_t item, DecodeScratch<acc_t>& ws) {
    const RowBlock& blk = blocks[item / n_splits];
    const int64_t split = item % n_splits;
    const SequenceView& seq = pr.rows[blk.b];
    const int64_t m = static_cast<int64_t>(blk.rows.size());
    const int64_t off = seq.position_offset();
    const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, seq));
    acc_t* res = partial.data() + part_base[item / n_splits] + split * m * part;  // rows' partials, `part` apart
    // The block's rows of each kv head: [seg[t], seg[t + 1]) reads kv head seg_head[t].
    std::vector<int64_t> seg{0}, seg_head;
    for (int64_t a = 0; a < m; ++a) {
      const int64_t hk = blk.heads[a] / P.group_size();
      if (seg_head.empty() || seg_head.back() != hk) {
        if (!seg_head.empty()) seg.push_back(a);
        seg_head.push_back(hk);
      }
    }
    seg.push_back(m);
    std::vector<acc_t> slope(m);
    std::vector<WindowSpec> win(m);  // each row's window: its head's chunk grid
    for (int64_t a = 0; a < m; ++a) {
      ws.pos[a] = blk.rows[a] + off;
      win[a] = pr.head_window(blk.heads[a]);
      slope[a] = alibi_slope<acc_t>(P, slopes, blk.b, blk.heads[a]);
      const scalar_t* src = Q + blk.b * q.stride(0) + blk.heads[a] * q.stride(1) + blk.rows[a] * q.stride(2);
      convert_in(ops, src, D, acc_t(1), ws.q.data() + a * D);
      acc_t* r = res + a * part;
      std::fill(r, r + D, acc_t(0));
      r[D] = neg_inf;
      r[D + 1] = acc_t(0);
    }

    // One segment of keys: positions j0 + c * step for c in [0, n); row a sees
    // columns [col_lo[a], col_hi[a]) of it, and with `sink_segment` only the
    // sink keys at or before its position that its window does not hold.
    auto run_segment = [&](int64_t j0, int64_t step, int64_t n, const std::vector<int64_t>& col_lo,
                           const std::vector<int64_t>& col_hi, bool sink_segment) {
      for (int64_t c0 = 0; c0 < n; c0 += kTileKeys) {
        const int64_t nt = std::min(kTileKeys, n - c0);
        bool any = false;
        for (int64_t a = 0; a < m; ++a) {
          ws.first[a] = std::clamp(col_lo[a] - c0, int64_t(0), nt);
          ws.end[a] = std::clamp(col_hi[a] - c0, ws.first[a], nt);
          any = any || ws.first[a] < ws.end[a];
        }
        if (!any) continue;
        acc_t* S = ws.S.data();
        const int64_t j_tile = j0 + c0 * step;
        // Each kv head's rows against the tile's keys (or values), in runs of one
        // stride through the cache; 16-bit rows are converted to acc_t per run.
        // body(a0, ma, c, rows, ld): rows [a0, a0 + ma) and the run starting at
        // column c, whose run_first / run_end are set.
        // Where a position's heads are interleaved (paged: (block, slot, Hk, D)),
        // the heads go inside short pieces of a run, so that the storage is read
        // in order, position after position: head by head over a whole run read
        // one head's D values every Hk * D, a new 4 KiB page per key for the
        // hardware prefetcher, and took 1.5-1.9x the contiguous step (one thread,
        // 32K cache, window 4096, Hq 32, Hk 8, D 128). Two more steps there: a
        // piece touches the first line of each position of the next piece
        // (prefetch), which starts the prefetcher on those pages before they are
        // read; and a 16-bit cache converts each position's heads of the block
        // (adjacent in storage) in one call into a piece buffer that every head
        // then reads, instead of one conversion and one product call per head
        // and 16 keys (bench_decode.py: paged bfloat16 1.2-1.3x -> about 1.0x
        // the contiguous step, float32 1.1-1.2x -> 1.0-1.07x, one thread, loaded machine).
        const bool interleaved = spread_keys && seg_head.size() > 1;
        const int64_t h0 = seg_head.front(), nh = seg_head.back() - h0 + 1;  // the block's kv heads
        auto for_each_run = [&](const scalar_t* base, const CacheAddress& addr, Buffer<acc_t>& buf, auto&& body) {
          const int64_t ld = step * addr.token_stride();
          const bool convert_positions = !std::is_same_v<scalar_t, acc_t> && interleaved && addr.head_stride() == D;
          for (int64_t c = 0; c < nt;) {
            const int64_t j = j_tile + c * step;
            const int64_t len = cache_run_length(pr.cache, j, step, nt - c);
            const int64_t piece = !interleaved ? len : convert_positions ? kConvertedPiece : kInterleavedPiece;
            for (int64_t c1 = c; c1 < c + len; c1 += piece) {
              const int64_t n1 = std::min(piece, c + len - c1);
              const scalar_t* first_head = base + addr.offset(blk.b, h0, j_tile + c1 * step);
              if (interleaved) {
                for (int64_t r = n1; r < std::min(n1 + piece, c + len - c1); ++r) __builtin_prefetch(first_head + r * ld);
              }
              if (convert_positions) {
                if (static_cast<int64_t>(ws.piece.size()) < n1 * nh * D) ws.piece.resize(n1 * nh * D);
                for (int64_t r = 0; r < n1; ++r) {
                  convert_in(ops, first_head + r * ld, nh * D, acc_t(1), ws.piece.data() + r * nh * D);
                }
              }
              for (size_t t = 0; t < seg_head.size(); ++t) {
                const int64_t a0 = seg[t], ma = seg[t + 1] - seg[t];
                for (int64_t a = a0; a < a0 + ma; ++a) {
                  ws.run_first[a] = std::clamp(ws.first[a] - c1, int64_t(0), n1);
                  ws.run_end[a] = std::clamp(ws.end[a] - c1, ws.run_first[a], n1);
                }
                const scalar_t* src = base + addr.offset(blk.b, seg_head[t], j_tile + c1 * step);
                if (convert_positions) {
                  body(a0, ma, c1, static_cast<const acc_t*>(ws.piece.data() + (seg_head[t] - h0) * D), nh * D);
                } else if constexpr (std::is_same_v<scalar_t, acc_t>) {
                  body(a0, ma, c1, src, ld);
                } else {
                  for (int64_t r = 0; r < n1; ++r) convert_in(ops, src + r * ld, D, acc_t(1), buf.data() + r * D);
                  body(a0, ma, c1, static_cast<const acc_t*>(buf.data()), D);
                }
              }
            }
            c += len;
          }
        };
        for_each_run(K, ka, ws.kbuf, [&](int64_t a0, int64_t ma, int64_t c, const acc_t* keys, int64_t ldk) {
          ops.rows_dot(ma, D, ws.q.data() + a0 * D, D, keys, ldk, scale, S + a0 * ws.ld_s + c, ws.ld_s,
                       ws.run_first.data() + a0, ws.run_end.data() + a0);
        });
        for (int64_t a = 0; a < m; ++a) {  // soft-cap, ALiBi, and the sink segment's mask
          acc_t* s = S + a * ws.ld_s;
          for (int64_t c = ws.first[a]; c < ws.end[a]; ++c) {
            const int64_t j = j_tile + c * step;
            // The sink keys the window does not already hold (window.h's one rule).
            if (sink_segment && (in_window(win[a], ws.pos[a], j) ||
                                 !extra_key_visible(win[a], ws.pos[a], j, false, false))) {
              s[c] = neg_inf;
              continue;
            }
            s[c] = transform_score<acc_t>(s[c], softcap, slope[a], abs_distance(ws.pos[a], j));
          }
        }
        if (sigmoid_score) {
          ops.sigmoid_rows(S, ws.ld_s, m, ws.first.data(), ws.end.data(), bias);
        } else {
          // Running max and sum live in the partial rows (strided): copy in and out.
          acc_t mx[kBlockRows], sum[kBlockRows];
          for (int64_t a = 0; a < m; ++a) {
            mx[a] = res[a * part + D];
            sum[a] = res[a * part + D + 1];
          }
          ops.softmax_rows(S, ws.ld_s, m, ws.first.data(), ws.end.data(), mx, sum, ws.alpha.data());
          for (int64_t a = 0; a < m; ++a) {
            res[a * part + D] = mx[a];
            res[a * part + D + 1] = sum[a];
            const acc_t al = ws.alpha[a];
            if (al == acc_t(1)) continue;
            acc_t* o = res + a * part;
            for (int64_t e = 0; e < D; ++e) o[e] *= al;
          }
        }
        for_each_run(V, va, ws.vbuf, [&](int64_t a0, int64_t ma, int64_t c, const acc_t* values, int64_t ldv) {
          ops.rows_axpy(ma, D, S + a0 * ws.ld_s + c, ws.ld_s, values, ldv, res + a0 * part, part,
                        ws.run_first.data() + a0, ws.run_end.data() + a0);
        });
      }
    };

    std::vector<int64_t> col_lo(m), col_hi(m);
    // Sink tokens (split 0): keys 0 .. sink_tokens - 1, each row masking what it may not see.
    const int64_t n_sink = std::min(pr.sink_tokens, seq.k_len);
    if (split == 0 && n_sink > 0) {
      for (int64_t a = 0; a < m; ++a) {
        col_lo[a] = 0;
        col_hi[a] = std::clamp<int64_t>(ws.pos[a] + 1, 0, n_sink);
      }
      run_segment(0, 1, n_sink, col_lo, col_hi, true);
    }
    // This split's part of the class keys the windows cover, as columns from c_begin.
    const int64_t c_begin = blk.n * split / n_splits, c_end = blk.n * (split + 1) / n_splits;
    if (c_begin < c_end) {
      for (int64_t a = 0; a < m; ++a) {
        int64_t lo, hi;
        window_key_range(win[a], seq, ws.pos[a], &lo, &hi);
        col_lo[a] = lo <= hi ? std::max(c_begin, (lo - blk.lo) / d) - c_begin : 0;
        col_hi[a] = lo <= hi ? std::min(c_end, (hi - blk.lo) / d + 1) - c_begin : 0;
      }
      run_segment(blk.lo + c_begin * d, d, c_end - c_begin, col_lo, col_hi, false);
    }
  });

  // Merge the splits of each row (and the sink logit), then write out and lse.
  const acc_t* sink_logits = nullptr;
  at::Tensor sinks_acc;
  if (pr.has_sinks) {
    sinks_acc = sinks.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    sink_logits = sinks_acc.const_data_ptr<acc_t>();
  }
  scalar_t* O = out.data_ptr<scalar_t>();
  acc_t* L = lse.data_ptr<acc_t>();
  const int64_t Hq = P.q_heads, Lq = P.q_len;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t finish) {
    std::vector<acc_t> row(D);
    for (int64_t bi = begin; bi < finish; ++bi) {
      const RowBlock& blk = blocks[bi];
      const int64_t m = static_cast<int64_t>(blk.rows.size());
      for (int64_t a = 0; a < m; ++a) {
        const int64_t h = blk.heads[a];
        auto split_row = [&](int64_t s) { return partial.data() + part_base[bi] + (s * m + a) * part; };
        std::fill(row.begin(), row.end(), acc_t(0));
        acc_t lse_value = acc_t(0);  // not defined for sigmoid
        if (sigmoid_score) {
          for (int64_t s = 0; s < n_splits; ++s) {
            const acc_t* r = split_row(s);
            for (int64_t e = 0; e < D; ++e) row[e] += r[e];
          }
        } else {
          // common/split_merge.h: the merge the CUDA decode kernel does too.
          const bool has_sink = sink_logits != nullptr;
          const acc_t sink = has_sink ? sink_logits[h] : acc_t(0);
          acc_t mx = SplitMerge<acc_t>::start_max(has_sink, sink);
          for (int64_t s = 0; s < n_splits; ++s) mx = SplitMerge<acc_t>::fold_max(mx, split_row(s)[D]);
          SplitMerge<acc_t> merge(mx, has_sink, sink);
          for (int64_t s = 0; s < n_splits; ++s) {
            const acc_t* r = split_row(s);
            if (r[D] == neg_inf) continue;  // a part without keys
            merge.add(r[D], r[D + 1]);
            const acc_t w = merge.weight(r[D]);
            for (int64_t e = 0; e < D; ++e) row[e] += w * r[e];
          }
          // A row without keys (and without a sink) returns zeros; NaN stays NaN.
          const acc_t inv = merge.inv_total();
          for (int64_t e = 0; e < D; ++e) row[e] = merge.empty() ? acc_t(0) : row[e] * inv;
          lse_value = merge.lse();
        }
        const int64_t i = blk.rows[a];
        convert_out(ops, row.data(), D, acc_t(1), O + ((blk.b * Hq + h) * Lq + i) * D);
        L[(blk.b * Hq + h) * Lq + i] = lse_value;
      }
    }
  });
}

}  // namespace
}  // namespace detail

void kvcache_attention_forward(const KvCacheProblem& pr, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slopes, const at::Tensor& sinks,
                               at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_kvcache_fwd_cpu", [&] {
    detail::decode_kernel<scalar_t>(pr, q, k_cache, v_cache, slopes, sinks, out, lse);
  });
}

}  // namespace longreach::cpu
