// The softmax backward's row constant, row_dot[r] = dO_r . O_r - dlse_r: one
// warp per row with a fixed reduction order (deterministic).
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "attention_launchers.h"

namespace longreach::cuda_kernels {
namespace {

template <typename T>
__global__ void row_dot_kernel(HeadTensor<const T> grad_out, HeadTensor<const T> out, const float* grad_lse,
                               float* row_dot, int64_t heads, int64_t len, int64_t dim, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // uniform across the warp
  const int64_t l = row % len, h = (row / len) % heads, b = row / (len * heads);
  const T* go = grad_out.head(b, h) + l * grad_out.sl;
  const T* o = out.head(b, h) + l * out.sl;
  float sum = 0.0f;
  for (int64_t d = lane; d < dim; d += 32) sum += static_cast<float>(go[d]) * static_cast<float>(o[d]);
  for (int s = 16; s > 0; s /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, s);
  if (lane == 0) row_dot[row] = grad_lse != nullptr ? sum - grad_lse[row] : sum;
}

}  // namespace

template <typename T>
void launch_row_dot(HeadTensor<const T> grad_out, HeadTensor<const T> out, const float* grad_lse, float* row_dot,
                    int64_t heads, int64_t len, int64_t dim, int64_t rows, cudaStream_t stream) {
  if (rows == 0) return;
  constexpr int kWarps = 8;
  row_dot_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kWarps * 32, 0, stream>>>(
      grad_out, out, grad_lse, row_dot, heads, len, dim, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_row_dot<c10::Half>(HeadTensor<const c10::Half>, HeadTensor<const c10::Half>, const float*,
                                        float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template void launch_row_dot<c10::BFloat16>(HeadTensor<const c10::BFloat16>, HeadTensor<const c10::BFloat16>,
                                            const float*, float*, int64_t, int64_t, int64_t, int64_t, cudaStream_t);
template void launch_row_dot<float>(HeadTensor<const float>, HeadTensor<const float>, const float*, float*, int64_t,
                                    int64_t, int64_t, int64_t, cudaStream_t);

}  // namespace longreach::cuda_kernels
