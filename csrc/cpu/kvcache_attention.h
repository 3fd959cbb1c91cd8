// The CPU decode kernel of longreach::local_attention_kvcache_fwd (kvcache_attention.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include "../kvcache_params.h"

namespace longreach::cpu {

// Writes every row of out (B, Hq, Lq, D) and lse (B, Hq, Lq).
void kvcache_attention_forward(const KvCacheProblem& problem, const at::Tensor& q, const at::Tensor& k_cache,
                               const at::Tensor& v_cache, const at::Tensor& slopes, const at::Tensor& sinks,
                               at::Tensor& out, at::Tensor& lse);

}  // namespace longreach::cpu
