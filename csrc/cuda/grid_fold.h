// The (head, batch element) of a block: a CUDA grid's y and z dimensions hold
// at most 65535 blocks each, so the heads x batch pairs of a launch are folded
// into grid.y x grid.z (pair p = b * heads + h, grid.y fastest) instead of
// one dimension each. Shared by the kernels and the host emulation
// (tests/emulation/), which walks the same folded grid.
#pragma once

#include <cstdint>

#include "../common/host_device.h"

namespace longreach::cuda_kernels {

constexpr int64_t kMaxGridYZ = 65535;

struct HeadBatchGrid {
  int64_t y = 0, z = 0;  // grid.y, grid.z; y * z >= heads * batch
};

// The folded grid of heads x batch pairs, rows of at most max_y blocks; z >
// kMaxGridYZ means too many pairs. (The host emulation's tests fold with a
// small max_y, to reach the surplus blocks of a partial last row cheaply.)
inline HeadBatchGrid fold_heads_batch(int64_t heads, int64_t batch, int64_t max_y = kMaxGridYZ) {
  const int64_t pairs = heads * batch;
  HeadBatchGrid g;
  if (pairs == 0) return g;
  g.y = pairs < max_y ? pairs : max_y;
  g.z = (pairs + g.y - 1) / g.y;
  return g;
}

// The head and batch element of block (y, z) of a folded grid of grid_y
// columns; false for the surplus blocks of the last row, which exit.
// In 32-bit arithmetic: the launcher allows at most 65535^2 < 2^32 pairs, and a
// 64-bit division is a subroutine call on the GPU (a stack frame in every kernel).
LR_HOST_DEVICE bool unfold_head_batch(int64_t heads, int64_t batch, int64_t y, int64_t z, int64_t grid_y, int64_t* h,
                                      int64_t* b) {
  const uint32_t pair = static_cast<uint32_t>(z) * static_cast<uint32_t>(grid_y) + static_cast<uint32_t>(y);
  if (pair >= static_cast<uint64_t>(heads) * static_cast<uint64_t>(batch)) return false;
  *h = pair % static_cast<uint32_t>(heads);
  *b = pair / static_cast<uint32_t>(heads);
  return true;
}

}  // namespace longreach::cuda_kernels
