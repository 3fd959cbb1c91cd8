// Where a KV cache keeps the key of a position: the one copy of the cache
// addressing math, shared by the host checks, the append and the CPU and CUDA
// decode kernels (docs/semantics.md, "KV caches").
//
//   contiguous  (B, Hk, capacity, D): position j of row b in slot j.
//   rolling     (B, Hk, capacity, D), a ring buffer for sliding-window layers:
//               the first `sink_slots` positions (StreamingLLM's sink tokens)
//               keep their slots, every later position j goes to slot
//               sink_slots + (j - sink_slots) % (capacity - sink_slots), so the
//               cache holds O(window) keys however long the generation runs.
//   paged       (num_blocks, block_size, Hk, D) with a (B, max_blocks) block
//               table (vLLM / flash-attn): position j of row b in block
//               table[b][j / block_size], at offset j % block_size.
//
// Positions stay the true ones (ALiBi distances and windows are exact after
// wrap-around); only the storage slot changes.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace longreach {

enum class CacheLayout : int32_t { kContiguous = 0, kRolling = 1, kPaged = 2 };

struct CacheGeometry {
  CacheLayout layout = CacheLayout::kContiguous;
  int64_t capacity = 0;    // positions a row can hold at once (paged: max_blocks * block_size)
  int64_t block_size = 1;  // paged only
  int64_t sink_slots = 0;  // rolling only: slots kept for the first positions
};

// The slot (contiguous, rolling) or the logical index (paged: block index times
// block_size plus offset) of position j.
LR_HOST_DEVICE int64_t cache_slot(const CacheGeometry& g, int64_t j) {
  if (g.layout != CacheLayout::kRolling || j < g.sink_slots) return j;
  return g.sink_slots + (j - g.sink_slots) % (g.capacity - g.sink_slots);
}

// Oldest non-sink position a rolling cache still holds once positions
// 0 .. end - 1 have been written (earlier ones were overwritten); 0 for the
// other layouts, which overwrite nothing.
LR_HOST_DEVICE int64_t oldest_retained(const CacheGeometry& g, int64_t end) {
  if (g.layout != CacheLayout::kRolling) return 0;
  const int64_t ring = g.capacity - g.sink_slots;
  const int64_t oldest = end - ring;
  return oldest > g.sink_slots ? oldest : g.sink_slots;
}

// Of the positions j, j + step, j + 2 step, ... (at most n of them), how many
// lie in the same stretch of storage as j, at `step` slots apart: up to the
// end of the sink slots, the wrap of the ring, or the end of a page. Kernels
// read each such run of keys in place with one stride.
LR_HOST_DEVICE int64_t cache_run_length(const CacheGeometry& g, int64_t j, int64_t step, int64_t n) {
  int64_t room = n;  // slots left in this stretch, counted in positions of the run
  if (g.layout == CacheLayout::kRolling) {
    const int64_t limit = j < g.sink_slots ? g.sink_slots : g.capacity;  // one past the stretch's last slot
    room = (limit - 1 - cache_slot(g, j)) / step + 1;
  } else if (g.layout == CacheLayout::kPaged) {
    room = (g.block_size - 1 - j % g.block_size) / step + 1;
  }
  return room < n ? room : n;
}

// Where a cache tensor keeps the key (or value) of position j of batch row b,
// kv head hk, in elements from its data pointer: the layout's slot through the
// tensor's first three strides (s0, s1, s2) and, paged, the block table
// (B, max_blocks) row-major int64 (host memory for the CPU kernel, device
// memory for the CUDA one). Plain data: the CUDA decode kernel takes it by value.
struct CacheAddress {
  CacheGeometry g;
  int64_t s0 = 0, s1 = 0, s2 = 0;
  const int64_t* table = nullptr;  // paged only
  int64_t max_blocks = 0;
  // Elements between the slots of consecutive positions of one run (cache_run_length).
  LR_HOST_DEVICE int64_t token_stride() const { return g.layout == CacheLayout::kPaged ? s1 : s2; }
  // Elements between the same position's kv heads.
  LR_HOST_DEVICE int64_t head_stride() const { return g.layout == CacheLayout::kPaged ? s2 : s1; }
  LR_HOST_DEVICE int64_t offset(int64_t b, int64_t hk, int64_t j) const {
    const int64_t slot = cache_slot(g, j);
    if (g.layout == CacheLayout::kPaged) {
      return table[b * max_blocks + slot / g.block_size] * s0 + (slot % g.block_size) * s1 + hk * s2;
    }
    return b * s0 + hk * s1 + slot * s2;
  }
};

}  // namespace longreach
