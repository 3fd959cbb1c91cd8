// Host-side preparation of the CUDA attention kernels' arguments, written with
// device-agnostic ATen ops so the host emulation (tests/emulation/) prepares
// its blocks exactly as the CUDA entry points do. No host/device
// synchronisation: the global-token lists are built by ATen ops on the
// current stream, and grids are sized with host-known upper bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../common/params.h"
#include "attention_blocks.cuh"
#include "tile_dispatch.h"

namespace longreach::cuda_kernels {

// Owns the tensors an AttentionArgs points into.
struct GlobalTokenTensors {
  at::Tensor flags, keys, count, row_start;
};

// Sorted global key indices per batch element (globals first, in index order),
// their count, and how many of them sit before the first row's position.
inline GlobalTokenTensors make_global_tokens(const AttentionParams& P, const c10::optional<at::Tensor>& global_mask) {
  GlobalTokenTensors g;
  if (!global_mask.has_value()) return g;
  g.flags = global_mask->to(at::kByte).contiguous();
  g.keys = at::argsort(g.flags, /*stable=*/true, /*dim=*/1, /*descending=*/true).contiguous();
  g.count = g.flags.sum(1, /*keepdim=*/false, at::kLong).contiguous();
  const int64_t off = P.dense_view().position_offset();
  g.row_start = off > 0 ? g.flags.narrow(1, 0, off).sum(1, false, at::kLong).contiguous()
                        : at::zeros({P.batch}, g.count.options());
  return g;
}

template <typename T>
HeadTensor<T> head_tensor(const at::Tensor& t) {
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// 16-byte loads need D, the strides and the base to be multiples of 16 bytes.
inline bool rows_are_16b_aligned(const at::Tensor& t) {
  if (!t.defined()) return true;
  const int64_t v = 16 / static_cast<int64_t>(t.element_size());
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.size(3) % v == 0 && t.stride(0) % v == 0 &&
         t.stride(1) % v == 0 && t.stride(2) % v == 0;
}

template <typename T, typename acc_t>
AttentionArgs<T, acc_t> make_attention_args(const AttentionParams& P, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& grad_out,
                                            const c10::optional<at::Tensor>& alibi_slopes,
                                            const GlobalTokenTensors& g) {
  AttentionArgs<T, acc_t> a{};
  a.P = P;
  a.q = head_tensor<const T>(q);
  a.k = head_tensor<const T>(k);
  a.v = head_tensor<const T>(v);
  if (grad_out.defined()) a.grad_out = head_tensor<const T>(grad_out);
  a.slopes = nullptr;
  if (alibi_slopes.has_value()) {
    const at::Tensor& s = *alibi_slopes;
    a.slopes = s.data_ptr<float>();
    a.slope_sb = s.dim() == 2 ? s.stride(0) : 0;
    a.slope_sh = s.stride(-1);
  }
  if (g.flags.defined()) {
    a.global.flags = g.flags.data_ptr<uint8_t>();
    a.global.keys = g.keys.data_ptr<int64_t>();
    a.global.count = g.count.data_ptr<int64_t>();
    a.global.row_start = g.row_start.data_ptr<int64_t>();
  }
  a.vec_loads = rows_are_16b_aligned(q) && rows_are_16b_aligned(k) && rows_are_16b_aligned(v) &&
                rows_are_16b_aligned(grad_out);
  return a;
}

}  // namespace longreach::cuda_kernels
