// The problem description every attention kernel (CPU or CUDA) receives.
// Filled once on the host by make_attention_params(); plain data so it can be
// passed by value to a CUDA kernel.
#pragma once

#include <cstdint>

#include "geometry.h"
#include "host_device.h"
#include "philox.h"

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
  WindowSpec window;

  ScoreKind score = ScoreKind::kSoftmax;
  // Kept in double so float64 kernels (and gradcheck) see exact values;
  // float kernels convert them once.
  double scale = 1.0;
  double softcap = 0.0;       // 0 disables soft-capping
  double sigmoid_bias = 0.0;  // only read for ScoreKind::kSigmoid, unless default_sigmoid_bias
  // No bias given: each sequence uses -ln(window keys of a full row) (window.h: sigmoid_bias_of).
  bool default_sigmoid_bias = false;
  bool has_alibi = false;
  bool has_global = false;
  bool has_key_padding = false;  // dense batches: a (B, Lk) key_padding_mask (True = no key there)
  // Learnable sink logits (Hq,) (gpt-oss): one more term of every softmax row's
  // denominator, with no value (scores.h finish_softmax_row). Sink tokens and
  // causal global tokens are part of the window (geometry.h WindowSpec).
  bool has_sinks = false;
  // Attention dropout (philox.h): applied to the weights after softmax / sigmoid; lse is not affected.
  DropoutSpec dropout;

  // The problem of one batch row of a dense batch (q_len, k_len are then its
  // lengths; for a packed batch they are the maxima over sequences).
  LR_HOST_DEVICE SequenceView dense_view() const { return SequenceView{q_len, k_len, 0, 0}; }
  LR_HOST_DEVICE int64_t group_size() const { return q_heads / kv_heads; }
};

}  // namespace longreach
