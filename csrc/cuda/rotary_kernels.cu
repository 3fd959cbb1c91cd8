// The rotary kernel (see rotary_cuda.cpp for the entry points). Free of ATen
// so nvcc's device passes stay cheap.
//
// A block is a few head rows (threadIdx.y) by a run of slots (threadIdx.x):
// slots 0 .. half-1 rotate pair `slot` with the shared math of
// common/rotary.h, the remaining slots copy the features past rot_dim.
// Neighbouring lanes touch neighbouring features, so loads and stores coalesce
// for both the rotate-half and the interleaved layout. A thread finds the
// (batch, head, position) of its first row and of the grid stride with int64
// division once, then advances them by additions: no 64-bit division per
// element (it is a long non-inlined subroutine on the GPU).
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
  const int64_t rows = P.rows();
  int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (r >= rows) return;
  // Row r = (b * heads + h) * seq_len + l; the grid stride likewise, with dl < seq_len and
  // dh < heads, so each step carries at most once into h and into b.
  const int64_t L = P.seq_len, H = P.heads;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t dl = stride % L, dh = (stride / L) % H, db = stride / (L * H);
  int64_t l = r % L, h = (r / L) % H, b = r / (L * H);
  for (; r < rows; r += stride) {
    const scalar_t* xr = x + b * xs_b + h * xs_h + l * xs_l;
    scalar_t* yr = out + r * P.head_dim;
    for (int64_t s = threadIdx.x; s < slots; s += blockDim.x) {
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
    l += dl;
    h += dh;
    b += db;
    if (l >= L) {
      l -= L;
      ++h;
    }
    if (h >= H) {
      h -= H;
      ++b;
    }
  }
}

}  // namespace

template <typename scalar_t>
void launch_rotary(const RotaryParams& P, const scalar_t* x, int64_t xs_b, int64_t xs_h, int64_t xs_l,
                   const RotaryMath<scalar_t>* cos, const RotaryMath<scalar_t>* sin, const int64_t* pos,
                   scalar_t* out, cudaStream_t stream) {
  const int64_t slots = P.half + (P.head_dim - P.rot_dim());
  if (P.rows() == 0 || slots == 0) return;
  // 256 threads: lanes over a row's slots (up to 32), the rest over rows.
  constexpr int kThreads = 256;
  int lanes = 1;
  while (lanes < 32 && lanes < slots) lanes *= 2;
  const int rows_per_block = kThreads / lanes;
  const int64_t blocks = std::min<int64_t>((P.rows() + rows_per_block - 1) / rows_per_block, int64_t(1) << 20);
  rotary_kernel<scalar_t, RotaryMath<scalar_t>>
      <<<static_cast<unsigned>(blocks), dim3(lanes, rows_per_block), 0, stream>>>(P, x, xs_b, xs_h, xs_l, cos, sin,
                                                                                  pos, out);
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
