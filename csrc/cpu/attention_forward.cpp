// CPU forward of longreach::local_attention, one pass over the row chunks of
// the TilePlan; per block and query head, tile by tile (tile_runs.h):
//
//   S = Q K^T,  online softmax (or sigmoid) along the rows,  O += P V
//
// The kernel is instantiated here only, for the four dtypes of the dispatch.
#include "attention_forward.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../common/scores.h"
#include "../common/window.h"
#include "attention_rows.h"
#include "bf16_ops.h"
#include "block_scratch.h"
#include "dropout_tile.h"
#include "key_operands.h"
#include "tile_ops.h"
#include "tile_runs.h"

namespace longreach::cpu {
namespace detail {
namespace {

template <typename scalar_t>
void forward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slopes, const at::Tensor& sinks, at::Tensor& out,
                    at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* sink = sinks.defined() ? sinks.data_ptr<acc_t>() : nullptr;
  const TileOps<acc_t>& ops = tile_ops<acc_t>();
  const int64_t D = P.head_dim, W = ops.vec_width;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto& chunks = plan.row_chunks();

  const bool few_rows = P.q_len <= kFewRows;
  // bfloat16 products on the CPU's bf16 dot-product instruction where it has
  // one (bf16_ops.h): S = Q K^T from the bf16 rows as they are, O += P V with P
  // rounded to bf16 (as PyTorch's own bf16 attention does); softmax and the
  // accumulators stay float32.
  const Bf16Ops* bf = nullptr;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (!few_rows && D % 2 == 0) bf = bf16_ops();
  }
  const KeyUse use = few_rows ? KeyUse::kForwardFewRows : bf ? KeyUse::kForwardBf16 : KeyUse::kForward;

  auto make_scratch = [&] { return Scratch<acc_t>(D, W, /*backward=*/false, /*softcap=*/false); };
  parallel_items(static_cast<int64_t>(chunks.size()), make_scratch, [&](int64_t ci, Scratch<acc_t>& ws) {
    const RowChunk& chunk = chunks[ci];
    const int64_t b = chunk.batch, hk = chunk.kv_head;
    const auto K = k_rows<const scalar_t>(k, plan, b, hk);
    const auto V = k_rows<const scalar_t>(v, plan, b, hk);
    const int64_t q_len = plan.seq(b).q_len;
    const acc_t bias = static_cast<acc_t>(sigmoid_bias_of(P, plan.seq(b)));
    const KeyRange chunk_keys = plan.span_of_chunk(chunk);
    load_key_operands(ops, K, V, chunk_keys.count, [&](int64_t r) { return chunk_keys.at(r); }, true, D, scale,
                      use, &ws.span);

    for (int64_t t = chunk.first_block; t < chunk.first_block + chunk.n_blocks; ++t) {
      load_block(ops, P, plan, chunk, t, K, V, use, ws);
      if (ws.rows.empty()) continue;
      const int64_t nq = static_cast<int64_t>(ws.rows.size());
      // Offset of the block's span inside the chunk's key rows.
      const int64_t span_row0 = ws.keys.span.count > 0 ? (ws.keys.span.lo - chunk_keys.lo) / chunk_keys.stride : 0;

      for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
        const BlockContext<acc_t> bc{&P, &plan, b, ws.pos.data(), nq, alibi_slope<acc_t>(P, slopes, b, h),
                                     chunk.global_rows};
        // The table's softmax fused with P's packing (Bf16Ops::softmax_tiles) where the scores are
        // scale * q.k as they are: no ALiBi, soft-cap, sigmoid or dropout, and a scale > 0.
        const bool fused_softmax = bf && bf->softmax_tiles && !sigmoid_score && !P.dropout.enabled &&
                                   bc.slope == acc_t(0) && !(P.softcap > 0) && scale > acc_t(0) &&
                                   std::isfinite(scale);
        if (bf) {
          const auto Q = q_rows<const scalar_t>(q, plan, b, h);
          ws.q16.resize(nq * D);
          for (int64_t a = 0; a < nq; ++a) std::memcpy(ws.q16.data() + a * D, Q.row(ws.rows[a]), D * sizeof(scalar_t));
        } else {
          load_rows(ops, q_rows<const scalar_t>(q, plan, b, h), nq, [&](int64_t a) { return ws.rows[a]; },
                    rows_are_regular(ws.rows), D, &ws.q);
        }
        if (h + 1 < (hk + 1) * P.group_size()) {
          prefetch_rows(q_rows<const scalar_t>(q, plan, b, h + 1), ws.rows, D, q_len);
        } else if (t + 1 < chunk.first_block + chunk.n_blocks) {
          prefetch_rows(q_rows<const scalar_t>(q, plan, b, hk * P.group_size()), ws.rows, D, q_len,
                        kRowBlock * P.window.dilation);
        }
        std::fill(ws.acc.begin(), ws.acc.begin() + nq * D, acc_t(0));
        std::fill(ws.m.begin(), ws.m.begin() + nq, neg_inf);
        std::fill(ws.l.begin(), ws.l.begin() + nq, acc_t(0));
        bool first_tile = true;

        for_each_key_tile(ws.keys, span_row0, W, [&](const TileKeys& keys, bool masked, int64_t col0,
                                                     int64_t valid_from) {
          const KeyOperands<acc_t>& ko = keys.list != nullptr ? ws.extra : ws.span;
          TileRuns& runs = ws.runs;
          plan_runs(bc, keys, masked, valid_from, &runs);
          if (fused_softmax && static_cast<int64_t>(ws.p_tiles.size()) < p_tile_words(keys.n)) {
            ws.p_tiles.resize(p_tile_words(keys.n));
          }
          // Rows [r0, r1) at a time (Bf16Ops::forward_rows; else the whole block):
          // their scores start at the buffer's first row whichever rows they are.
          const int64_t step = bf && bf->forward_rows > 0 ? bf->forward_rows : nq;
          for (int64_t r0 = 0; r0 < nq; r0 += step) {
            const int64_t r1 = std::min(nq, r0 + step), mr = r1 - r0;
            const int64_t* first = runs.first.data() + r0;
            const int64_t* last = runs.end.data() + r0;
            acc_t* S = ws.S.data();
            acc_t* acc = ws.acc.data() + r0 * D;
            if constexpr (std::is_same_v<acc_t, float>) {
              if (bf) {
                bf->gemm_band_n(mr, keys.n, D, ws.q16.data() + r0 * D, D, ko.kT_pairs_from(col0),
                                fused_softmax ? 1.f : scale, S, ws.ld_s, first, last);
              }
            }
            if (bf) {
            } else if (few_rows) {
              ops.rows_dot(mr, D, ws.q.ptr + r0 * ws.q.ld, ws.q.ld, ko.k.row(col0), ko.k.ld, scale, S, ws.ld_s, first,
                           last);
            } else {
              ops.gemm_band_n(mr, keys.n, D, ws.q.ptr + r0 * ws.q.ld, ws.q.ld, 1, ko.kT_from(col0), S, ws.ld_s, first,
                              last);
            }
            // Masks only when fused (no ALiBi or soft-cap): -inf is -inf at any scale > 0.
            finalize_tile(bc, keys, runs, S, ws.ld_s, static_cast<acc_t*>(nullptr), r0, r1);
            PairSpan p_span;
            if constexpr (std::is_same_v<acc_t, float>) {
              if (fused_softmax) {
                bf->softmax_tiles(mr, keys.n, S, ws.ld_s, scale, first, last, ws.m.data() + r0, ws.l.data() + r0,
                                  ws.alpha.data() + r0, ws.p_tiles.data(), &p_span);
              }
            }
            if (sigmoid_score) {
              ops.sigmoid_rows(S, ws.ld_s, mr, first, last, bias);
            } else {
              if (!fused_softmax) {
                ops.softmax_rows(S, ws.ld_s, mr, first, last, ws.m.data() + r0, ws.l.data() + r0,
                                 ws.alpha.data() + r0);
              }
              for (int64_t a = r0; a < r1 && !first_tile; ++a) {  // nothing to rescale before the first tile
                const acc_t al = ws.alpha[a];
                if (al == acc_t(1)) continue;
                acc_t* o = ws.acc.data() + a * D;
                for (int64_t d = 0; d < D; ++d) o[d] *= al;
              }
            }
            // Dropout after the softmax (the row sums l above saw every weight, so lse is unaffected).
            if (P.dropout.enabled) {
              apply_dropout(P.dropout, P.dropout.head_row(b, h, P.q_heads), ws.rows.data(), r0, r1, keys, runs, S,
                            ws.ld_s);
            }
            if constexpr (std::is_same_v<acc_t, float>) {
              if (fused_softmax) {
                bf->gemm_tiles_k(mr, D, ws.p_tiles.data(), p_span, ko.v_pairs_from(col0), ko.ld_pairs, acc, D);
              } else if (bf) {
                bf->gemm_band_k(mr, D, keys.n, S, ws.ld_s, 1, ko.v_pairs_from(col0), ko.ld_pairs, acc, D, first, last);
              }
            }
            if (bf) {
            } else if (few_rows) {
              ops.rows_axpy(mr, D, S, ws.ld_s, ko.v.row(col0), ko.v.ld, acc, D, first, last);
            } else {
              ops.gemm_band_k(mr, D, keys.n, S, ws.ld_s, 1, ko.v.row(col0), ko.v.ld, acc, D, first, last);
            }
          }
          first_tile = false;
        });

        auto O = q_rows<scalar_t>(out, plan, b, h);
        acc_t* lse_row = stat_row<acc_t>(lse, P, plan, b, h);
        for (int64_t a = 0; a < nq; ++a) {
          const acc_t* src = ws.acc.data() + a * D;
          if (sigmoid_score) {
            convert_out(ops, src, D, acc_t(1), O.row(ws.rows[a]));
            lse_row[ws.rows[a]] = acc_t(0);  // not defined for sigmoid
            continue;
          }
          // A row with no allowed key returns zeros; a NaN sum (a NaN score) gives NaN.
          acc_t factor, row_lse;
          finish_softmax_row<acc_t>(ws.m[a], ws.l[a], sink != nullptr, sink ? sink[h] : acc_t(0), &factor, &row_lse);
          convert_out(ops, src, D, factor, O.row(ws.rows[a]));
          lse_row[ws.rows[a]] = row_lse;
        }
      }
    }
  });
}

}  // namespace
}  // namespace detail

void attention_forward(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& slopes, const at::Tensor& sinks, at::Tensor& out,
                       at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_fwd_cpu", [&] {
    detail::forward_kernel<scalar_t>(P, plan, q, k, v, slopes, sinks, out, lse);
  });
}

}  // namespace longreach::cpu
