// The CUDA decode kernels (decode_blocks.cuh) and their launcher, for the
// three element types: 2 kernels x 3 types, one file (each kernel is small;
// head dims are a runtime value, so there are no head-dim buckets).
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>

#include "decode_launchers.h"
#include "device_check.h"
#include "grid_fold.h"

namespace longreach::cuda_kernels {

constexpr int kDecodeThreads = 128;  // 4 warps: one row each in the softmax step

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_kernel(const DecodeArgs<T> a) {
  extern __shared__ __align__(128) char smem[];
  int64_t unit, b;
  if (!unfold_head_batch(a.units_per_batch(), a.P.batch, blockIdx.y, blockIdx.z, gridDim.y, &unit, &b)) return;
  decode_block<T>(a, blockIdx.x, unit, b, smem);
}

template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_merge_kernel(const DecodeArgs<T> a) {
  decode_merge_block<T>(a, blockIdx.x);
}

template <typename T>
void launch_decode(const DecodeArgs<T>& a, cudaStream_t stream) {
  const int64_t units = a.units_per_batch();
  if (a.rows() == 0 || units == 0) return;
  const HeadBatchGrid grid = fold_heads_batch(units, a.P.batch);
  TORCH_CHECK_VALUE(grid.z <= kMaxGridYZ && a.n_splits <= std::numeric_limits<int32_t>::max(),
                    "local_attention_with_kvcache (CUDA): grid of ", units, " units x ", a.P.batch,
                    " batch rows is too large (at most 65535^2)");
  int device = 0, max_smem = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  check_device_runs(device, reinterpret_cast<const void*>(decode_kernel<T>));
  const int64_t smem = decode_smem_bytes(a.P.head_dim);
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(smem <= max_smem, "local_attention_with_kvcache (CUDA): head dim ", a.P.head_dim, " needs ", smem,
              " bytes of shared memory per block but device ", device, " allows ", max_smem);
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(decode_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  decode_kernel<T><<<dim3(static_cast<unsigned>(a.n_splits), static_cast<unsigned>(grid.y),
                          static_cast<unsigned>(grid.z)),
                     kDecodeThreads, static_cast<size_t>(smem), stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.n_splits == 1) return;
  const int64_t merge_blocks = (a.rows() + kDecodeMergeRows - 1) / kDecodeMergeRows;
  TORCH_CHECK_VALUE(merge_blocks <= std::numeric_limits<int32_t>::max(),
                    "local_attention_with_kvcache (CUDA): too many rows (", a.rows(), ")");
  decode_merge_kernel<T><<<static_cast<unsigned>(merge_blocks), kDecodeThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_decode<c10::Half>(const DecodeArgs<c10::Half>&, cudaStream_t);
template void launch_decode<c10::BFloat16>(const DecodeArgs<c10::BFloat16>&, cudaStream_t);
template void launch_decode<float>(const DecodeArgs<float>&, cudaStream_t);

}  // namespace longreach::cuda_kernels
