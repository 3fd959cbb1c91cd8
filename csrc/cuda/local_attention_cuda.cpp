// CUDA entry points of longreach::local_attention_fwd / _bwd (host code only;
// the kernels live in the .cu files, free of ATen, so nvcc's device passes stay
// cheap).
//
// Each entry point puts a CUDAGuard on the input's device, runs the shared
// host logic of attention_entry.h (argument checks from attention_params.cpp,
// allocations, global-token lists) and launches the kernels on the current
// CUDA stream (c10::cuda::getCurrentCUDAStream, which at::cuda re-exports), so
// the ops compose with torch.cuda streams and CUDA graphs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "attention_entry.h"
#include "attention_launchers.h"

namespace longreach::cuda_kernels {
namespace {

struct CudaBackend {
  cudaStream_t stream;

  template <typename T>
  void forward(const AttentionArgs<T, float>& a) {
    launch_forward<T>(a, stream);
  }
  template <typename T>
  void backward(const AttentionArgs<T, float>& a) {
    launch_backward<T>(a, stream);
  }

  // Outputs every element of which a kernel writes: no memset.
  at::Tensor unfilled(at::IntArrayRef sizes, const at::TensorOptions& options) { return at::empty(sizes, options); }

  // SMs of the current device (the entry's CUDAGuard set it), for dkv_split_by_query_head.
  int64_t multiprocessors() const {
    int device = 0, count = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }

  at::Tensor row_dot(const AttentionParams& P, const at::Tensor& grad_out, const at::Tensor& out,
                     const c10::optional<at::Tensor>& grad_lse) {
    at::Tensor result = at::empty({P.batch, P.q_heads, P.q_len}, out.options().dtype(at::kFloat));
    at::Tensor glse;
    if (grad_lse.has_value()) glse = grad_lse->to(at::kFloat).contiguous();
    dispatch_cuda_dtype(out.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      launch_row_dot<T>(head_tensor<const T>(grad_out), head_tensor<const T>(out),
                        glse.defined() ? glse.data_ptr<float>() : nullptr, result.data_ptr<float>(), P.q_heads,
                        P.q_len, P.head_dim, result.numel(), stream);
    });
    return result;
  }
};

// Sink tokens and causal global tokens are implemented on CPU only so far
// (issue 14): refuse them clearly rather than compute the old rule. Learnable
// sinks are supported.
void check_cuda_sink_options(bool causal, int64_t sink_tokens, const c10::optional<at::Tensor>& global_mask) {
  TORCH_CHECK_NOT_IMPLEMENTED(sink_tokens == 0 && !(causal && global_mask.has_value()),
                              "local_attention: sink_tokens and causal global tokens are not implemented in "
                              "the CUDA kernels yet (CPU only)");
}

using Gradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, int64_t sink_tokens,
    const c10::optional<at::Tensor>& sinks, int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  check_cuda_sink_options(causal, sink_tokens, global_mask);
  const SinkOptions so{causal, sink_tokens, &sinks};
  const ChunkDropoutOptions cd{chunk, chunk_shift, dropout_p, dropout_seed};
  const c10::cuda::CUDAGuard guard(q.device());
  CudaBackend backend{c10::cuda::getCurrentCUDAStream().stream()};
  return attention_forward(backend, q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation, score,
                           sigmoid_bias, softcap, scale, key_padding_mask, so, cd);
}

Gradients local_attention_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad,
    const c10::optional<at::Tensor>& key_padding_mask, bool causal, int64_t sink_tokens,
    const c10::optional<at::Tensor>& sinks, int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  check_cuda_sink_options(causal, sink_tokens, global_mask);
  const SinkOptions so{causal, sink_tokens, &sinks};
  const ChunkDropoutOptions cd{chunk, chunk_shift, dropout_p, dropout_seed};
  const c10::cuda::CUDAGuard guard(q.device());
  CudaBackend backend{c10::cuda::getCurrentCUDAStream().stream()};
  return attention_backward(backend, grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, window_left,
                            window_right, dilation, score, sigmoid_bias, softcap, scale, alibi_grad, key_padding_mask,
                            so, cd);
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool causal, int64_t sink_tokens, const c10::optional<at::Tensor>& sinks,
    int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  check_cuda_sink_options(causal, sink_tokens, global_mask);
  const SinkOptions so{causal, sink_tokens, &sinks};
  const ChunkDropoutOptions cd{chunk, chunk_shift, dropout_p, dropout_seed};
  const c10::cuda::CUDAGuard guard(q.device());
  CudaBackend backend{c10::cuda::getCurrentCUDAStream().stream()};
  return attention_varlen_forward(backend, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  global_mask, alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias,
                                  softcap, scale, so, cd);
}

Gradients local_attention_varlen_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, bool alibi_grad, bool causal, int64_t sink_tokens, const c10::optional<at::Tensor>& sinks,
    int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  check_cuda_sink_options(causal, sink_tokens, global_mask);
  const SinkOptions so{causal, sink_tokens, &sinks};
  const ChunkDropoutOptions cd{chunk, chunk_shift, dropout_p, dropout_seed};
  const c10::cuda::CUDAGuard guard(q.device());
  CudaBackend backend{c10::cuda::getCurrentCUDAStream().stream()};
  return attention_varlen_backward(backend, grad_out, grad_lse, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, global_mask, alibi_slopes, window_left, window_right,
                                   dilation, score, sigmoid_bias, softcap, scale, alibi_grad, so, cd);
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CUDA, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cuda);
  m.impl("local_attention_bwd", &local_attention_bwd_cuda);
  m.impl("local_attention_varlen_fwd", &local_attention_varlen_fwd_cuda);
  m.impl("local_attention_varlen_bwd", &local_attention_varlen_bwd_cuda);
}

}  // namespace longreach::cuda_kernels
