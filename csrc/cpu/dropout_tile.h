// Attention dropout on a score tile of the CPU kernels: every weight of a
// row's runs times keep(b * Hq + h, row, key) / (1 - p) (common/philox.h), the
// same bit the forward and the backward (and the CUDA kernels) regenerate for
// the pair, whatever the tiling or thread count.
#pragma once

#include <cstdint>

#include "../common/philox.h"
#include "tile_runs.h"

namespace longreach::cpu::detail {

// rows[a]: row a's index in its sequence; X (rows [a0, a1) of the tile, row a0
// first, ld apart) is scaled in place over each row's run [first[a], end[a]).
template <typename acc_t>
void apply_dropout(const DropoutSpec& dropout, int64_t head_row, const int64_t* rows, int64_t a0, int64_t a1,
                   const TileKeys& keys, const TileRuns& runs, acc_t* X, int64_t ld) {
  const acc_t kept = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t a = a0; a < a1; ++a) {
    acc_t* x = X + (a - a0) * ld;
    for (int64_t c = runs.first[a]; c < runs.end[a]; ++c) {
      x[c] = dropout.keep(head_row, rows[a], keys.key(c)) ? x[c] * kept : acc_t(0);
    }
  }
}

}  // namespace longreach::cpu::detail
