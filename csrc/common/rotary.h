// Rotary position embedding (RoPE) math shared by the CPU and CUDA kernels.
//
// A head row of x (D features) holds rot_dim = 2 * half rotated features and
// D - rot_dim untouched ones. Pair i (0 <= i < half) at position p turns by the
// angle p * inv_freq[i]:
//     y1 = x1 * cos - x2 * sin,    y2 = x2 * cos + x1 * sin.
// The kernels never evaluate trigonometric functions: they read cos and sin
// from position-indexed tables (table_len, half), already multiplied by any
// attention factor (YaRN, LongRoPE).
//
// The inverse rotation ("conjugate") negates sin. It is also the backward:
// the rotation matrix times a scalar attention factor m is m * R, and its
// transpose m * R^T is the same tables with sin negated.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace longreach {

// Where the two features of rotary pair i live in a head row.
struct RotaryPair {
  int64_t first;
  int64_t second;
};

// Rotate-half (GPT-NeoX, Hugging Face): pair i is (i, i + half).
// Interleaved (GPT-J, Meta's complex form): pair i is (2i, 2i + 1).
LR_HOST_DEVICE RotaryPair rotary_pair(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? RotaryPair{2 * i, 2 * i + 1} : RotaryPair{i, i + half};
}

// Rotates (x1, x2) by the angle whose cosine and sine are (c, s); by minus
// that angle when `conjugate`. acc_t is float (double for float64 inputs).
template <typename acc_t>
LR_HOST_DEVICE void rotate_pair(acc_t x1, acc_t x2, acc_t c, acc_t s, bool conjugate, acc_t* y1, acc_t* y2) {
  const acc_t sn = conjugate ? -s : s;
  *y1 = x1 * c - x2 * sn;
  *y2 = x2 * c + x1 * sn;
}

// The problem description every rotary kernel (CPU or CUDA) receives, filled
// on the host by make_rotary_params(). Plain data, passed by value to kernels.
struct RotaryParams {
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t seq_len = 0;
  int64_t head_dim = 0;
  int64_t half = 0;       // rot_dim / 2 = number of rotary pairs = table columns
  int64_t table_len = 0;  // rows of the cos / sin tables (positions 0 .. table_len - 1)
  bool interleaved = false;
  bool conjugate = false;
  bool has_position_ids = false;
  // position_ids strides; batch stride 0 when one row of ids serves every batch element.
  int64_t pos_stride_b = 0;
  int64_t pos_stride_l = 0;

  LR_HOST_DEVICE int64_t rot_dim() const { return 2 * half; }
  LR_HOST_DEVICE int64_t rows() const { return batch * heads * seq_len; }
};

}  // namespace longreach
