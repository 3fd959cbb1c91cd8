// The problem description every attention kernel (CPU or CUDA) receives.
// Filled once on the host by make_attention_params(); plain data so it can be
// passed by value to a CUDA kernel.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace longreach {

enum class ScoreKind : int32_t { kSoftmax = 0, kSigmoid = 1 };

struct AttentionParams {
  int64_t batch = 0;
  int64_t q_heads = 0;
  int64_t kv_heads = 0;
  int64_t q_len = 0;
  int64_t k_len = 0;
  int64_t head_dim = 0;

  // Window in *dilated steps* on each side of a row's position, already
  // clipped to the sequence so that `left * dilation` cannot overflow.
  // A value >= k_len + q_len behaves as unbounded.
  int64_t window_left = 0;
  int64_t window_right = 0;
  int64_t dilation = 1;

  ScoreKind score = ScoreKind::kSoftmax;
  // Kept in double so float64 kernels (and gradcheck) see exact values;
  // float kernels convert them once.
  double scale = 1.0;
  double softcap = 0.0;       // 0 disables soft-capping
  double sigmoid_bias = 0.0;  // only read for ScoreKind::kSigmoid
  bool has_alibi = false;
  bool has_global = false;

  // Query row i sits at key position i + position_offset (bottom-right alignment).
  LR_HOST_DEVICE int64_t position_offset() const { return k_len - q_len; }
  LR_HOST_DEVICE int64_t group_size() const { return q_heads / kv_heads; }
};

}  // namespace longreach
