// Head-dim buckets of the attention kernels (one tile configuration each);
// light enough for the kernel files, which never include ATen.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

namespace longreach::cuda_kernels {

// Calls f(std::integral_constant<int, DMAX>) for the head-dim bucket of D:
// three tile configurations cover every head dim up to 256.
template <typename F>
void dispatch_head_dim(int64_t D, F&& f) {
  TORCH_CHECK_VALUE(D >= 1 && D <= 256, "local_attention (CUDA): head dim ", D, " is not supported; expected 1 .. 256");
  if (D <= 64) {
    f(std::integral_constant<int, 64>{});
  } else if (D <= 128) {
    f(std::integral_constant<int, 128>{});
  } else {
    f(std::integral_constant<int, 256>{});
  }
}

}  // namespace longreach::cuda_kernels
