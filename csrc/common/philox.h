// Attention dropout's counter-based RNG: Philox4x32-10 (Salmon et al., SC'11,
// the generator of curand and of flash-attn's dropout), written once for the
// CPU and CUDA kernels. A (row, key) pair's keep bit is a pure function of
// (seed, offset, batch * Hq + head, row, key), so the backward regenerates the
// forward's mask without storing it, and no thread count, tiling or device
// changes it. python/longreach/dropout.py computes the same bits with torch
// ops (the tests' independent copy).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace longreach {

struct Philox4 {
  uint32_t x, y, z, w;
};

LR_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

// Ten rounds of Philox4x32 on `counter` with the 64-bit key (k0, k1).
LR_HOST_DEVICE Philox4 philox4x32_10(Philox4 c, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kMul0, c.x, &hi0, &lo0);
    philox_mulhilo(kMul1, c.z, &hi1, &lo1);
    c = Philox4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return c;
}

// Dropout of one attention problem: keep probability 1 - p, kept weights scaled
// by 1 / (1 - p). The key is the 64-bit seed; the counter (key / 4, row,
// batch * Hq + head, offset) gives four keys' draws per Philox call, so a row's
// consecutive keys share one call. Rows and keys are indices inside their
// sequence (varlen: per sequence), all taken mod 2^32 (key / 4 mod 2^32).
struct DropoutSpec {
  uint64_t seed = 0;
  uint64_t offset = 0;
  // Keep iff the draw (uint32) >= threshold = round(p * 2^32); p = 1 gives 2^32: nothing kept.
  uint64_t threshold = 0;
  double keep_scale = 1.0;  // 1 / (1 - p); 0 for p = 1 (every weight dropped)
  bool enabled = false;

  LR_HOST_DEVICE uint32_t draw(int64_t head_row, int64_t row, int64_t key) const {
    const Philox4 counter{static_cast<uint32_t>(static_cast<uint64_t>(key) >> 2), static_cast<uint32_t>(row),
                          static_cast<uint32_t>(head_row), static_cast<uint32_t>(offset)};
    const Philox4 r = philox4x32_10(counter, static_cast<uint32_t>(seed),
                                    static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32));
    switch (key & 3) {
      case 0: return r.x;
      case 1: return r.y;
      case 2: return r.z;
      default: return r.w;
    }
  }
  // A call on a subset of the heads (one chunk grid's call, csrc/chunk_heads.h)
  // keys the mask by each head's index in the whole call, head_ids[h] of
  // all_heads (int64, on the kernels' device), so splitting a call by chunk
  // grid leaves the mask as it is; nullptr: the call holds every head.
  const int64_t* head_ids = nullptr;
  int64_t all_heads = 0;

  // The mask's key of (batch or sequence b, query head h of the call's q_heads):
  // b * Hq + head, in the whole call's numbering.
  LR_HOST_DEVICE int64_t head_row(int64_t b, int64_t h, int64_t q_heads) const {
    return head_ids == nullptr ? b * q_heads + h : b * all_heads + head_ids[h];
  }

  // head_row: from head_row() above.
  LR_HOST_DEVICE bool keep(int64_t head_row, int64_t row, int64_t key) const {
    return static_cast<uint64_t>(draw(head_row, row, key)) >= threshold;
  }
};

}  // namespace longreach
