// The CUDA attention kernels for float (one file per element type so the
// instantiations compile in parallel).
#include "attention_kernels.cuh"

namespace longreach::cuda_kernels {
template void launch_forward<float>(const AttentionArgs<float, float>&, cudaStream_t);
template void launch_backward<float>(const AttentionArgs<float, float>&, cudaStream_t);
}  // namespace longreach::cuda_kernels
