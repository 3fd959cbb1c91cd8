// The rotary kernel (see rotary_cuda.cpp for the entry points). Free of ATen
// so nvcc's device passes stay cheap.
//
// One thread per (head row, slot): slots 0 .. half-1 rotate pair `slot` with
// the shared math of common/rotary.h, the remaining slots copy the features
// past rot_dim. Neighbouring threads touch neighbouring features, so loads and
// stores coalesce for both the rotate-half and the interleaved layout.
#include <c10/cuda/CUDAException.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "rotary_launcher.h"

namespace longreach::cuda_kernels {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void rotary_kernel(const RotaryParams P, const scalar_t* __restrict__ x, int64_t xs_b, int64_t xs_h,
                              int64_t xs_l, const acc_t* __restrict__ cos, const acc_t* __restrict__ sin,
                              const int64_t* __restrict__ pos, scalar_t* __restrict__ out) {
  const int64_t slots = P.half + (P.head_dim - P.rot_dim());
  const int64_t total = P.rows() * slots;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t r = e / slots, s = e % slots;
    const int64_t l = r % P.seq_len, h = (r / P.seq_len) % P.heads, b = r / (P.seq_len * P.heads);
    const scalar_t* xr = x + b * xs_b + h * xs_h + l * xs_l;
    scalar_t* yr = out + r * P.head_dim;
    if (s < P.half) {
      const int64_t p = pos != nullptr ? pos[b * P.pos_stride_b + l * P.pos_stride_l] : l;
      CUDA_KERNEL_ASSERT(p >= 0 && p < P.table_len);
      const RotaryPair pr = rotary_pair(s, P.half, P.interleaved);
      acc_t y1, y2;
      rotate_pair<acc_t>(static_cast<acc_t>(xr[pr.first]), static_cast<acc_t>(xr[pr.second]), cos[p * P.half + s],
                         sin[p * P.half + s], P.conjugate, &y1, &y2);
      yr[pr.first] = static_cast<scalar_t>(y1);
      yr[pr.second] = static_cast<scalar_t>(y2);
    } else {
      const int64_t d = P.rot_dim() + (s - P.half);
      yr[d] = xr[d];
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_rotary(const RotaryParams& P, const scalar_t* x, int64_t xs_b, int64_t xs_h, int64_t xs_l,
                   const RotaryMath<scalar_t>* cos, const RotaryMath<scalar_t>* sin, const int64_t* pos,
                   scalar_t* out, cudaStream_t stream) {
  const int64_t total = P.rows() * (P.half + (P.head_dim - P.rot_dim()));
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20);
  rotary_kernel<scalar_t, RotaryMath<scalar_t>><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      P, x, xs_b, xs_h, xs_l, cos, sin, pos, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LR_INSTANTIATE_ROTARY(T)                                                                            \
  template void launch_rotary<T>(const RotaryParams&, const T*, int64_t, int64_t, int64_t, const RotaryMath<T>*, \
                                 const RotaryMath<T>*, const int64_t*, T*, cudaStream_t);
LR_INSTANTIATE_ROTARY(float)
LR_INSTANTIATE_ROTARY(double)
LR_INSTANTIATE_ROTARY(c10::Half)
LR_INSTANTIATE_ROTARY(c10::BFloat16)
#undef LR_INSTANTIATE_ROTARY

}  // namespace longreach::cuda_kernels
