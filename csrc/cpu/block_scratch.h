// The per-thread working set of the CPU attention kernels' tile loops
// (Scratch: score tiles, accumulators, a block's rows, runs, keys and operands)
// and load_block, which fills it for one block of rows.
#pragma once

#include <cstdint>
#include <vector>

#include "../common/params.h"
#include "attention_rows.h"
#include "key_operands.h"
#include "tile_ops.h"
#include "tile_plan.h"
#include "tile_runs.h"

namespace longreach::cpu::detail {

// Per-thread scratch of the tile loops.
template <typename acc_t>
struct Scratch {
  int64_t ld_s;                  // leading dimension of the score tiles
  Buffer<acc_t> S, G, F;    // kRowBlock x ld_s
  Buffer<acc_t> acc;        // kRowBlock x D: output or dQ accumulator
  Buffer<acc_t> m, l, alpha, lse, dot;
  Buffer<acc_t> slope_e, slope_f, slope_c;  // learnable ALiBi, per row (attention_backward.cpp)
  Buffer<acc_t> dk_tile, dv_tile;
  Rows<acc_t> q, go;
  Buffer<c10::BFloat16> q16, go16;    // bf16 products (Bf16Ops): a block's Q (and dO) rows as they are
  Buffer<uint32_t> q_pairs, go_pairs;  // and, for the backward, as pair rows
  Buffer<uint32_t> p_tiles;            // the forward's bf16 weights as AMX tiles (Bf16Ops::softmax_tiles)
  KeyOperands<acc_t> span, extra;
  std::vector<int64_t> rows, pos;
  TileRuns runs;
  BlockKeys keys;

  Scratch(int64_t D, int64_t vec_width, bool backward, bool softcap) {
    ld_s = round_up(kKeyTile, vec_width) + vec_width;
    S.resize(kRowBlock * ld_s);
    if (backward) G.resize(kRowBlock * ld_s);
    if (backward && softcap) F.resize(kRowBlock * ld_s);
    acc.resize(kRowBlock * D);
    for (auto* v : {&m, &l, &alpha, &lse, &dot, &slope_e, &slope_f, &slope_c}) v->resize(kRowBlock);
  }
};

// Loads a block's rows (Q, and dO for the backward) and its extras' key operands.
template <typename scalar_t, typename acc_t>
void load_block(const TileOps<acc_t>& ops, const AttentionParams& P, const TilePlan& plan, const RowChunk& chunk,
                int64_t t, const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V, KeyUse use,
                Scratch<acc_t>& ws) {
  plan.rows_of_block(chunk, t, &ws.rows);
  if (ws.rows.empty()) return;
  const int64_t nq = static_cast<int64_t>(ws.rows.size());
  ws.pos.resize(nq);
  const int64_t offset = plan.seq(chunk.batch).position_offset();
  for (int64_t a = 0; a < nq; ++a) ws.pos[a] = ws.rows[a] + offset;
  plan.keys_of_block(chunk, ws.rows, &ws.keys);
  const auto& extras = ws.keys.extras;
  if (!extras.empty()) {
    load_key_operands(ops, K, V, static_cast<int64_t>(extras.size()), [&](int64_t r) { return extras[r]; }, false,
                      P.head_dim, static_cast<acc_t>(P.scale), use, &ws.extra);
  }
}

}  // namespace longreach::cpu::detail
