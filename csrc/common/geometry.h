// Sequence geometry as data: the window every row applies, and where one
// sequence's rows and keys are. Kernels and planners take these two instead of
// the whole AttentionParams, so a dense batch (one view per batch row), a packed
// varlen batch (one view per sequence) and, later, caches and rank offsets are
// a change of how views are built, not of the window math.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace longreach {

// The band of keys a row sees, in dilated steps on each side of its position,
// already clipped so that `left * dilation` cannot overflow (window.h), and the
// rules of the keys beyond the band (window.h key_allowed): with `causal`,
// global rows and keys only look backwards; the first `sink_tokens` keys of a
// sequence are seen by every row at or after them (already clipped to k_len).
// chunk > 0 (0 = off) restricts the band to the row's chunk of `chunk`
// positions, offset by the head's shift: chunk_phase is that shift modulo
// chunk, in [0, chunk), as only the residue matters (window.h chunk_residue).
// A WindowSpec describes one head's grid; heads with other shifts get their own.
struct WindowSpec {
  int64_t left = 0;
  int64_t right = 0;
  int64_t dilation = 1;
  bool causal = false;
  int64_t sink_tokens = 0;
  int64_t chunk = 0;
  int64_t chunk_phase = 0;
};

// One independent problem: Lq query rows against Lk keys, bottom-right aligned
// (row i sits at key position i + Lk - Lq). q_start / k_start are the first row
// and key of the sequence in packed (total, H, D) tensors; 0 in a dense batch,
// whose rows are addressed by the batch index instead. With a key padding mask
// some of the Lk positions hold no key: k_present counts the real ones (-1 =
// all Lk), which is what the default sigmoid bias counts (window.h).
struct SequenceView {
  int64_t q_len = 0;
  int64_t k_len = 0;
  int64_t q_start = 0;
  int64_t k_start = 0;
  int64_t k_present = -1;
  LR_HOST_DEVICE int64_t position_offset() const { return k_len - q_len; }
  LR_HOST_DEVICE int64_t keys_present() const { return k_present < 0 ? k_len : k_present; }
};

}  // namespace longreach
