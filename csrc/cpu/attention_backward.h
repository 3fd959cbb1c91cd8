// The backward kernel of longreach::local_attention on CPU.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "../common/params.h"
#include "tile_plan.h"

namespace longreach::cpu {

// Writes every row of dq, dk and dv (laid out like q, k and v) for the
// problems of `plan`, and with dslopes (learnable ALiBi) d loss / d slope
// (B, Hq) float32 into it; slopes is undefined without ALiBi. With sinks (the
// (Hq,) logits in lse's dtype), d loss / d sinks (Hq,) in lse's dtype into
// dsinks. The inputs have contiguous rows; float32, float64, bfloat16, float16.
void attention_backward(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                        const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                        const at::Tensor& sinks, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor* dslopes,
                        at::Tensor* dsinks);

}  // namespace longreach::cpu
