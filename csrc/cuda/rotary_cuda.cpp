// CUDA entry points of longreach::apply_rotary and apply_rotary_qk (forward,
// and backward: the same op with `conjugate` flipped, see common/rotary.h).
// Host code only; the kernel is in rotary_kernels.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../common/rotary.h"
#include "../dtype_names.h"
#include "../rotary_params.h"
#include "rotary_launcher.h"

namespace longreach::cuda_kernels {
namespace {

// Out-of-table positions are a clear host error when the ids can be read (a
// device sync); while a CUDA graph is being captured they cannot, and the
// kernel's device assert is the guard.
void check_positions(const c10::optional<at::Tensor>& position_ids, int64_t table_len, cudaStream_t stream) {
  if (!position_ids.has_value()) return;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  if (status == cudaStreamCaptureStatusNone) check_position_ids_in_table(*position_ids, table_len);
}

at::Tensor rotate(const RotaryParams& P, const at::Tensor& x_in, const at::Tensor& cos_t, const at::Tensor& sin_t,
                  const c10::optional<at::Tensor>& position_ids, cudaStream_t stream) {
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t* pos = position_ids.has_value() ? position_ids->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_rotary_cuda", [&] {
    using acc_t = RotaryMath<scalar_t>;
    launch_rotary<scalar_t>(P, x.const_data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                            cos_t.const_data_ptr<acc_t>(), sin_t.const_data_ptr<acc_t>(), pos,
                            out.mutable_data_ptr<scalar_t>(), stream);
  });
  return out;
}

at::Tensor apply_rotary_cuda(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                             const c10::optional<at::Tensor>& position_ids, bool interleaved, bool conjugate) {
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const RotaryParams P = make_rotary_params(x, "x", cos, sin, position_ids, interleaved, conjugate);
  check_positions(position_ids, P.table_len, stream);
  return rotate(P, x, rotary_table(cos, x.scalar_type()), rotary_table(sin, x.scalar_type()), position_ids, stream);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_qk_cuda(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                        const c10::optional<at::Tensor>& position_ids,
                                                        bool interleaved, bool conjugate) {
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const RotaryParams Pq = make_rotary_params(q, "q", cos, sin, position_ids, interleaved, conjugate);
  const RotaryParams Pk = make_rotary_params(k, "k", cos, sin, position_ids, interleaved, conjugate);
  check_rotary_qk_dtypes(q, k);
  check_positions(position_ids, Pq.table_len, stream);
  const at::Tensor cos_t = rotary_table(cos, q.scalar_type()), sin_t = rotary_table(sin, q.scalar_type());
  return {rotate(Pq, q, cos_t, sin_t, position_ids, stream), rotate(Pk, k, cos_t, sin_t, position_ids, stream)};
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CUDA, m) {
  m.impl("apply_rotary", &apply_rotary_cuda);
  m.impl("apply_rotary_qk", &apply_rotary_qk_cuda);
}

}  // namespace longreach::cuda_kernels
