// Launcher of the CUDA rotary kernel (rotary_kernels.cu), called by the entry
// points in rotary_cuda.cpp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "../common/rotary.h"

namespace longreach::cuda_kernels {

// The math type of the rotary kernel: double for double, float otherwise
// (rotary_math_dtype of rotary_params.h, as a type).
template <typename scalar_t>
using RotaryMath = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

// x rows with a contiguous last dim (strides xs_*), cos / sin contiguous
// (table_len, half) tables, pos the position ids or null, out contiguous.
template <typename scalar_t>
void launch_rotary(const RotaryParams& P, const scalar_t* x, int64_t xs_b, int64_t xs_h, int64_t xs_l,
                   const RotaryMath<scalar_t>* cos, const RotaryMath<scalar_t>* sin, const int64_t* pos,
                   scalar_t* out, cudaStream_t stream);

}  // namespace longreach::cuda_kernels
