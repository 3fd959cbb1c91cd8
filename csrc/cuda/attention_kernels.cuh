// __global__ wrappers around the block functions of attention_blocks.cuh and
// their launchers. Included only by the per-dtype instantiation files, which
// stay free of ATen: the device passes of nvcc then parse little but the kernels.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <limits>

#include "attention_blocks.cuh"
#include "attention_launchers.h"
#include "device_check.h"
#include "grid_fold.h"
#include "tile_dispatch.h"

namespace longreach::cuda_kernels {

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionArgs<T, float> a) {
  extern __shared__ __align__(128) char smem[];
  int64_t h, b;
  if (!unfold_head_batch(a.P.q_heads, a.P.batch, blockIdx.y, blockIdx.z, gridDim.y, &h, &b)) return;
  forward_block<T, float, DMAX, BM, BN>(a, blockIdx.x, h, b, smem);
}

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(const AttentionArgs<T, float> a) {
  extern __shared__ __align__(128) char smem[];
  int64_t h, b;
  if (!unfold_head_batch(a.P.q_heads, a.P.batch, blockIdx.y, blockIdx.z, gridDim.y, &h, &b)) return;
  backward_dq_block<T, float, DMAX, BM, BN>(a, blockIdx.x, h, b, smem);
}

template <typename T, int DMAX, int BM, int BN>
__global__ void __launch_bounds__(kThreads) backward_dkv_kernel(const AttentionArgs<T, float> a) {
  extern __shared__ __align__(128) char smem[];
  int64_t h, b;
  if (!unfold_head_batch(a.dkv_grid_heads(), a.P.batch, blockIdx.y, blockIdx.z, gridDim.y, &h, &b)) return;
  backward_dkv_block<T, float, DMAX, BM, BN>(a, blockIdx.x, h, b, smem);
}

// Opts the kernel into `smem` bytes of dynamic shared memory (checked against
// the device) and launches a grid of `blocks` x (heads x batch, folded into
// grid.y x grid.z: grid_fold.h) on `stream`.
template <typename T>
void launch_blocks(void (*kernel)(const AttentionArgs<T, float>), int64_t smem, int64_t blocks, int64_t heads,
                   int64_t batch, cudaStream_t stream, const AttentionArgs<T, float>& a) {
  if (blocks == 0 || heads == 0 || batch == 0) return;
  const HeadBatchGrid grid = fold_heads_batch(heads, batch);
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max() && grid.z <= kMaxGridYZ,
              "local_attention (CUDA): grid of ", blocks, " blocks x ", heads, " heads x ", batch,
              " batch elements is too large (at most 2^31-1 blocks and 65535^2 (head, batch) pairs)");
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  check_device_runs(device, reinterpret_cast<const void*>(kernel));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= max_smem, "local_attention (CUDA): head dim ", a.P.head_dim, " needs ", smem,
              " bytes of shared memory per block but device ", device, " allows ", max_smem);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)), kThreads,
           static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_forward(const AttentionArgs<T, float>& a, cudaStream_t stream) {
  dispatch_head_dim(a.P.head_dim, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    constexpr int BM = TileShape<T, DMAX>::kFwdM, BN = TileShape<T, DMAX>::kFwdN;
    constexpr int64_t smem = ForwardSmem<T, float, DMAX, BM, BN>::bytes();
    static_assert(smem <= kMaxSharedBytes, "forward tile shape exceeds the shared-memory budget");
    launch_blocks<T>(forward_kernel<T, DMAX, BM, BN>, smem, row_blocks(a.P, BM), a.P.q_heads, a.P.batch, stream, a);
  });
}

template <typename T>
void launch_backward(const AttentionArgs<T, float>& a, cudaStream_t stream) {
  dispatch_head_dim(a.P.head_dim, [&](auto dmax) {
    constexpr int DMAX = decltype(dmax)::value;
    using S = TileShape<T, DMAX>;
    constexpr int64_t dq_smem = DqSmem<T, float, DMAX, S::kDqM, S::kDqN>::bytes();
    constexpr int64_t dkv_smem = DkvSmem<T, float, DMAX, S::kDkvM, S::kDkvN>::bytes();
    static_assert(dq_smem <= kMaxSharedBytes, "dQ tile shape exceeds the shared-memory budget");
    static_assert(dkv_smem <= kMaxSharedBytes, "dK/dV tile shape exceeds the shared-memory budget");
    launch_blocks<T>(backward_dq_kernel<T, DMAX, S::kDqM, S::kDqN>, dq_smem, row_blocks(a.P, S::kDqM), a.P.q_heads,
                     a.P.batch, stream, a);
    launch_blocks<T>(backward_dkv_kernel<T, DMAX, S::kDkvM, S::kDkvN>, dkv_smem, key_blocks(a.P, S::kDkvN),
                     a.dkv_grid_heads(), a.P.batch, stream, a);
  });
}

}  // namespace longreach::cuda_kernels
