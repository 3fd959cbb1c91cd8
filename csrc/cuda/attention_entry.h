// The host logic of the CUDA attention entry points, parameterised by a
// Backend that runs the blocks: the CUDA backend (local_attention_cuda.cu)
// launches kernels on the current stream, the host emulation
// (tests/emulation/) runs the same block functions in a loop. Both share the
// argument checks, allocations, global-token lists and row constants here.
//
// A Backend provides, for T in {c10::Half, c10::BFloat16, float}:
//   template <T> void forward(const AttentionArgs<T, float>&);
//   template <T> void backward(const AttentionArgs<T, float>&);   // dQ pass, then dK/dV pass
//   at::Tensor row_dot(P, grad_out, out, grad_lse);               // (B, Hq, Lq) float32
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <tuple>

#include "../attention_params.h"
#include "../dtype_names.h"
#include "attention_launch.h"

namespace longreach::cuda_kernels {

// What the CUDA kernels support beyond the shared checks: float16, bfloat16
// and float32 (docs/semantics.md: no float64 on CUDA), head dims up to 256.
inline void check_cuda_inputs(const at::Tensor& q) {
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "local_attention (CUDA): q has dtype ",
              dtype_name(q.scalar_type()), "; the CUDA kernels support float16, bfloat16 and float32 (use float32, or run float64 on CPU)");
  TORCH_CHECK(q.size(3) <= 256, "local_attention (CUDA): head dim ", q.size(3),
              " is not supported; expected 1 .. 256");
}

template <typename F>
void dispatch_cuda_dtype(at::ScalarType dt, F&& f) {
  switch (dt) {
    case at::kHalf:
      f(c10::Half{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kFloat:
      f(float{});
      break;
    default:
      TORCH_CHECK(false, "local_attention (CUDA): unsupported dtype ", dt);
  }
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor> attention_forward(Backend& backend, const at::Tensor& q_in, const at::Tensor& k_in,
                                                     const at::Tensor& v_in, const c10::optional<at::Tensor>& global_mask,
                                                     const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                                     int64_t window_right, int64_t dilation, c10::string_view score,
                                                     c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  check_cuda_inputs(q_in);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  at::Tensor out = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::full({P.batch, P.q_heads, P.q_len}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(at::kFloat));
  if (out.numel() == 0 || P.k_len == 0) return {out, lse};
  const GlobalTokenTensors g = make_global_tokens(P, global_mask);
  dispatch_cuda_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T, float> a = make_attention_args<T, float>(P, q, k, v, at::Tensor(), alibi_slopes, g);
    a.out = head_tensor<T>(out);
    a.lse = lse.data_ptr<float>();
    backend.template forward<T>(a);
  });
  return {out, lse};
}

template <typename Backend>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward(
    Backend& backend, const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in,
    const at::Tensor& lse_in, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse_in, grad_lse, alibi_grad);
  // Per-row partial sums of the slope gradient (see AttentionArgs::slope_grad), summed over Lq below.
  at::Tensor slope_rows = alibi_grad ? at::zeros({P.batch, P.q_heads, P.q_len}, q_in.options().dtype(at::kFloat))
                                     : at::Tensor();
  auto slopes_grad = [&] { return alibi_grad ? slope_rows.sum(-1) : alibi_slopes_grad_buffer(P, q_in, false); };
  check_cuda_inputs(q_in);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::zeros(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::zeros(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::zeros(v.sizes(), v.options().memory_format(contiguous));
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk, dv, slopes_grad()};
  const at::Tensor lse = lse_in.contiguous();
  const bool softmax = P.score == ScoreKind::kSoftmax;
  const at::Tensor row_dot = softmax ? backend.row_dot(P, grad_out, with_contiguous_rows(out_in), grad_lse) : at::Tensor();
  const GlobalTokenTensors g = make_global_tokens(P, global_mask);
  dispatch_cuda_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    AttentionArgs<T, float> a = make_attention_args<T, float>(P, q, k, v, grad_out, alibi_slopes, g);
    a.dq = head_tensor<T>(dq);
    a.dk = head_tensor<T>(dk);
    a.dv = head_tensor<T>(dv);
    a.lse = lse.data_ptr<float>();
    a.row_dot = softmax ? row_dot.data_ptr<float>() : nullptr;
    a.slope_grad = alibi_grad ? slope_rows.data_ptr<float>() : nullptr;
    backend.template backward<T>(a);
  });
  return {dq, dk, dv, slopes_grad()};
}

}  // namespace longreach::cuda_kernels
