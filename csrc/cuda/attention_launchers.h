// Launchers of the CUDA attention kernels, one explicit instantiation per
// element type (local_attention_{f16,bf16,f32}.cu, compiled in parallel).
#pragma once

#include <cuda_runtime_api.h>

#include "attention_blocks.cuh"

namespace longreach::cuda_kernels {

// Forward: one block per (row block, query head, batch element).
template <typename T>
void launch_forward(const AttentionArgs<T, float>& a, cudaStream_t stream);

// Backward: the dQ pass over row blocks, then the dK/dV pass over key blocks
// of each kv head. Every output row is written by one block: deterministic.
template <typename T>
void launch_backward(const AttentionArgs<T, float>& a, cudaStream_t stream);

// row_dot[r] = dO_r . O_r - grad_lse[r] (grad_lse may be null) for the
// B * Hq * Lq rows, the softmax backward's row constant.
template <typename T>
void launch_row_dot(HeadTensor<const T> grad_out, HeadTensor<const T> out, const float* grad_lse, float* row_dot,
                    int64_t heads, int64_t len, int64_t dim, int64_t rows, cudaStream_t stream);

}  // namespace longreach::cuda_kernels
