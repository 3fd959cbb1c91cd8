// Launchers of the CUDA decode kernels (decode_kernels.cu, one explicit
// instantiation per element type), called by the entry point in kvcache_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include "decode_blocks.cuh"

namespace longreach::cuda_kernels {

// The decode blocks: grid n_splits x (units per batch row x batch, folded as
// grid_fold.h), then, with n_splits > 1, the merge of the splits' partials.
template <typename T>
void launch_decode(const DecodeArgs<T>& a, cudaStream_t stream);

}  // namespace longreach::cuda_kernels
