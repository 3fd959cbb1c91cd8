// Host-side preparation of the CUDA attention kernels' arguments, written with
// device-agnostic ATen ops so the host emulation (tests/emulation/) prepares
// its blocks exactly as the CUDA entry points do. No host/device
// synchronisation: the global-token lists are built by ATen ops on the
// current stream, and grids are sized with host-known upper bounds.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "../attention_params.h"
#include "../common/params.h"
#include "attention_blocks.cuh"
#include "tile_dispatch.h"

namespace longreach::cuda_kernels {

// Owns the tensors an AttentionArgs points into.
struct GlobalTokenTensors {
  at::Tensor flags, keys, count, row_start;
};
struct KeyPaddingTensors {
  at::Tensor flags;    // (B, Lk) uint8, 1 = padding
  at::Tensor present;  // (B,) int64 real keys per row (the default sigmoid bias counts them)
};

// A dense batch's key_padding_mask as the kernels read it (undefined without one).
inline KeyPaddingTensors make_key_padding(const c10::optional<at::Tensor>& key_padding_mask) {
  KeyPaddingTensors p;
  if (!key_padding_mask.has_value()) return p;
  p.flags = key_padding_mask->to(at::kByte).contiguous();
  p.present = present_key_counts(*key_padding_mask);
  return p;
}

// The sequences of a packed batch on the device: cu_seqlens as int64.
struct PackedSeqs {
  at::Tensor cu_q, cu_k;
  int64_t total_q;
  PackedSeqs(const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t total)
      : cu_q(cu_seqlens_q.to(at::kLong).contiguous()), cu_k(cu_seqlens_k.to(at::kLong).contiguous()), total_q(total) {}
  int64_t count() const { return cu_q.numel() - 1; }
  const int64_t* q_starts() const { return cu_q.data_ptr<int64_t>(); }
  const int64_t* k_starts() const { return cu_k.data_ptr<int64_t>(); }
  // (Hq, total_q) per-row values summed per sequence: (num_seqs, Hq), by
  // differences of a float64 prefix sum (deterministic, no atomics).
  at::Tensor sum_per_sequence(const at::Tensor& rows) const {
    const at::Tensor prefix = at::pad(rows.to(at::kDouble).cumsum(1), {1, 0});
    const at::Tensor ends = prefix.index_select(1, cu_q.narrow(0, 1, count()));
    const at::Tensor starts = prefix.index_select(1, cu_q.narrow(0, 0, count()));
    return (ends - starts).t().to(at::kFloat).contiguous();
  }
};

// dO . O - dlse per row for a packed batch, laid out like its lse (Hq, total_q).
inline at::Tensor packed_row_dot(const at::Tensor& grad_out, const at::Tensor& out,
                                 const c10::optional<at::Tensor>& grad_lse) {
  at::Tensor dot = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1).t().contiguous();
  if (grad_lse.has_value()) dot = dot - grad_lse->to(at::kFloat);
  return dot.contiguous();
}

// Sorted global key indices per problem (globals first, in index order), their
// count, and how many of them sit before the first row's position. A packed
// batch's (total_k,) mask is first spread into (num_seqs, max_seqlen_k) rows.
// A padded position is no key, so no global one either: its flag is cleared.
inline GlobalTokenTensors make_global_tokens(const AttentionParams& P, const PackedSeqs* packed,
                                             const c10::optional<at::Tensor>& global_mask,
                                             const KeyPaddingTensors& padding = {}) {
  GlobalTokenTensors g;
  if (!global_mask.has_value()) return g;
  at::Tensor offsets;  // Lk - Lq per problem
  if (packed == nullptr) {
    g.flags = padding.flags.defined() ? (*global_mask & padding.flags.logical_not()).to(at::kByte).contiguous()
                                      : global_mask->to(at::kByte).contiguous();
    offsets = at::full({P.batch}, P.dense_view().position_offset(), global_mask->options().dtype(at::kLong));
  } else {
    const at::Tensor& cu_k = packed->cu_k;
    const int64_t total_k = global_mask->numel();
    const at::Tensor key = at::arange(total_k, cu_k.options());
    const at::Tensor seq = at::searchsorted(cu_k, key, /*out_int32=*/false, /*right=*/true) - 1;
    const at::Tensor pos = key - cu_k.index_select(0, seq);
    g.flags = at::zeros({P.batch, P.k_len}, global_mask->options().dtype(at::kByte));
    g.flags.index_put_({seq, pos}, global_mask->to(at::kByte));
    const int64_t n = packed->count();
    offsets = (cu_k.narrow(0, 1, n) - cu_k.narrow(0, 0, n)) - (packed->cu_q.narrow(0, 1, n) - packed->cu_q.narrow(0, 0, n));
  }
  g.keys = at::argsort(g.flags, /*stable=*/true, /*dim=*/1, /*descending=*/true).contiguous();
  g.count = g.flags.sum(1, /*keepdim=*/false, at::kLong).contiguous();
  if (P.k_len == 0) {
    g.row_start = at::zeros({P.batch}, g.count.options());
  } else {  // globals at positions < offset: the prefix count at offset - 1
    const at::Tensor prefix = g.flags.cumsum(1, at::kLong);
    const at::Tensor at_offset = prefix.gather(1, (offsets - 1).clamp(0, P.k_len - 1).unsqueeze(1)).squeeze(1);
    g.row_start = at::where(offsets > 0, at_offset, at::zeros_like(at_offset)).contiguous();
  }
  return g;
}

// Dense (B, H, L, D) or packed (total, H, D) with its sequences' starts.
template <typename T>
HeadTensor<T> head_tensor(const at::Tensor& t, const int64_t* starts = nullptr) {
  if (t.dim() == 3) return {static_cast<T*>(t.data_ptr()), 0, t.stride(1), t.stride(0), starts};
  return {static_cast<T*>(t.data_ptr()), t.stride(0), t.stride(1), t.stride(2), nullptr};
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// 16-byte loads need D, the strides and the base to be multiples of 16 bytes.
inline bool rows_are_16b_aligned(const at::Tensor& t) {
  if (!t.defined()) return true;
  const int64_t v = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.size(-1) % v != 0) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.stride(d) % v != 0) return false;
  }
  return true;
}

template <typename T, typename acc_t>
AttentionArgs<T, acc_t> make_attention_args(const AttentionParams& P, const PackedSeqs* packed, const at::Tensor& q,
                                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& grad_out,
                                            const c10::optional<at::Tensor>& alibi_slopes,
                                            const GlobalTokenTensors& g, const KeyPaddingTensors& padding = {}) {
  AttentionArgs<T, acc_t> a{};
  a.P = P;
  const int64_t* qs = packed ? packed->q_starts() : nullptr;
  const int64_t* ks = packed ? packed->k_starts() : nullptr;
  if (packed) {
    a.cu_q = qs;
    a.cu_k = ks;
    a.total_q = packed->total_q;
  }
  a.q = head_tensor<const T>(q, qs);
  a.k = head_tensor<const T>(k, ks);
  a.v = head_tensor<const T>(v, ks);
  if (grad_out.defined()) a.grad_out = head_tensor<const T>(grad_out, qs);
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
  if (padding.flags.defined()) {
    a.pad.flags = padding.flags.data_ptr<uint8_t>();
    a.keys_present = padding.present.data_ptr<int64_t>();
  }
  a.vec_loads = rows_are_16b_aligned(q) && rows_are_16b_aligned(k) && rows_are_16b_aligned(v) &&
                rows_are_16b_aligned(grad_out);
  return a;
}

}  // namespace longreach::cuda_kernels
