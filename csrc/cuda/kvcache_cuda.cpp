// CUDA entry point of longreach::local_attention_kvcache_fwd (host code only;
// the kernels live in decode_kernels.cu, free of ATen). A CUDAGuard on q's
// device, the shared host logic of decode_entry.h (the CPU op's checks and
// append, allocations, the split rule), and the launches on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "decode_entry.h"
#include "decode_launchers.h"

namespace longreach::cuda_kernels {
namespace {

struct CudaDecodeBackend {
  cudaStream_t stream;
  int device;

  template <typename T>
  void decode(const DecodeArgs<T>& a) {
    launch_decode<T>(a, stream);
  }
  int64_t multiprocessors() {
    int count = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    return count;
  }
};

std::tuple<at::Tensor, at::Tensor> local_attention_kvcache_fwd_cuda(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks, int64_t window_left,
    int64_t window_right, int64_t dilation, c10::string_view score, c10::optional<double> sigmoid_bias, double softcap,
    double scale, int64_t sink_tokens, bool rolling, int64_t num_splits, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaDecodeBackend backend{c10::cuda::getCurrentCUDAStream().stream(), static_cast<int>(q.device().index())};
  return kvcache_forward(backend, q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks,
                         window_left, window_right, dilation, score, sigmoid_bias, softcap, scale, sink_tokens,
                         rolling, num_splits, chunk, chunk_shift);
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CUDA, m) { m.impl("local_attention_kvcache_fwd", &local_attention_kvcache_fwd_cuda); }

}  // namespace longreach::cuda_kernels
