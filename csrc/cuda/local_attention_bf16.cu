// The CUDA attention kernels for c10::BFloat16 (one file per element type so the
// instantiations compile in parallel).
#include "attention_kernels.cuh"

namespace longreach::cuda_kernels {
template void launch_forward<c10::BFloat16>(const AttentionArgs<c10::BFloat16, float>&, cudaStream_t);
template void launch_backward<c10::BFloat16>(const AttentionArgs<c10::BFloat16, float>&, cudaStream_t);
}  // namespace longreach::cuda_kernels
