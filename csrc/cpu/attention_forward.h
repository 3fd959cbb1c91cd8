// The forward kernel of longreach::local_attention on CPU.
#pragma once

#include <ATen/core/Tensor.h>

#include "../common/params.h"
#include "tile_plan.h"

namespace longreach::cpu {

// Writes every row of out (laid out like q) and lse (dense (B, Hq, Lq) or
// packed (Hq, total_q)) for the problems of `plan`; slopes is undefined without
// ALiBi; sinks the (Hq,) sink logits in lse's dtype, undefined without. q, k and
// v have contiguous rows; float32, float64, bfloat16, float16.
void attention_forward(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& slopes, const at::Tensor& sinks, at::Tensor& out,
                       at::Tensor& lse);

}  // namespace longreach::cpu
