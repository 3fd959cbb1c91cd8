// Per-head chunk shifts (docs/semantics.md "Chunks") for the kernels, which
// take one WindowSpec, i.e. one chunk grid, per call: heads are grouped by
// their shift modulo the chunk, and a call whose heads do not all share one
// runs the kernels once per group on those heads (q, out, lse, slopes, sinks
// sliced along the head dimension; k and v gathered per query head, so a GQA
// group split across shifts reads its kv head in each part, and the key
// gradients are summed back). LongLoRA and SCCA use two shifts (0 and c / 2):
// two calls, each O(L * c) per head. Device-agnostic (ATen ops only): the CPU
// entries (cpu/local_attention_cpu.cpp) and the CUDA ones (cuda/attention_entry.h,
// shared with the host emulation) both split calls here.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "attention_params.h"

namespace longreach {

struct ShiftGroup {
  int64_t phase = 0;
  at::Tensor heads;     // int64 indices of the query heads with this phase
  at::Tensor kv_heads;  // their kv heads (head / group size)
};

// One group per distinct phase, in order of first appearance; empty when all
// heads share one phase (then the caller just sets it in P.window).
inline std::vector<ShiftGroup> shift_groups(const std::vector<int64_t>& phases, int64_t group_size,
                                            const at::Device& device) {
  std::vector<int64_t> distinct;
  for (int64_t ph : phases) {
    bool seen = false;
    for (int64_t d : distinct) seen = seen || d == ph;
    if (!seen) distinct.push_back(ph);
  }
  std::vector<ShiftGroup> groups;
  if (distinct.size() <= 1) return groups;
  for (int64_t ph : distinct) {
    std::vector<int64_t> heads, kv;
    for (size_t h = 0; h < phases.size(); ++h) {
      if (phases[h] == ph) {
        heads.push_back(static_cast<int64_t>(h));
        kv.push_back(static_cast<int64_t>(h) / group_size);
      }
    }
    const auto opts = at::TensorOptions().dtype(at::kLong);
    groups.push_back({ph, at::tensor(heads, opts).to(device), at::tensor(kv, opts).to(device)});
  }
  return groups;
}

// Dropout's mask is keyed by the query head (common/philox.h): a chunk grid's
// call sees a subset of the heads under new indices, so it passes their
// indices in the whole call (the group's `heads`, on q's device) and the number
// of heads there; the mask is then the one the call would have drawn whole.
struct DropoutHeads {
  const at::Tensor* ids = nullptr;  // nullptr: the call holds every head
  int64_t all_heads = 0;
};

inline DropoutHeads dropout_heads_of(const ShiftGroup& g, const AttentionParams& whole) {
  return DropoutHeads{&g.heads, whole.q_heads};
}

// After set_dropout: key a group's call by its heads' indices in the whole call.
inline void set_dropout_heads(AttentionParams& P, const DropoutHeads& heads) {
  if (heads.ids == nullptr || !P.dropout.enabled) return;
  TORCH_INTERNAL_ASSERT(heads.ids->scalar_type() == at::kLong && heads.ids->is_contiguous() &&
                        heads.ids->numel() == P.q_heads);
  P.dropout.head_ids = heads.ids->data_ptr<int64_t>();
  P.dropout.all_heads = heads.all_heads;
}

// The chunk grids of a call: several, which the caller runs one by one (one
// call per ShiftGroup, each with a single chunk_shift value), or one (or none),
// which this sets in P.window.
inline std::vector<ShiftGroup> chunk_grids(AttentionParams& P, const at::Tensor& q, int64_t chunk,
                                           const c10::optional<at::Tensor>& chunk_shift) {
  const std::vector<int64_t> phases = chunk_phases(q, P.q_heads, chunk, chunk_shift);
  std::vector<ShiftGroup> groups = shift_groups(phases, P.group_size(), q.device());
  P.window.chunk = chunk;
  P.window.chunk_phase = phases.empty() ? 0 : phases[0];
  return groups;
}

// The chunk_shift argument of a group's call: its phase for each of its heads.
inline at::Tensor group_shift(const ShiftGroup& g, const at::Tensor& q_group) {
  return at::full({q_group.size(1)}, g.phase, q_group.options().dtype(at::kLong));
}

// The part of a per-head tensor (heads along `dim`) that a group reads; an
// absent or empty tensor stays as it is.
inline c10::optional<at::Tensor> heads_of(const c10::optional<at::Tensor>& t, int64_t dim, const at::Tensor& idx) {
  if (!t.has_value() || !t->defined() || t->numel() == 0) return t;
  return t->index_select(dim < 0 ? t->dim() + dim : dim, idx);
}

// The forward by groups: f(group, q, k, v, slopes, sinks) -> (out, lse) of the
// group's heads; heads are dimension 1 of q, k, v and out, `lse_dim` of lse.
template <typename F>
std::tuple<at::Tensor, at::Tensor> forward_by_shift(const std::vector<ShiftGroup>& groups, const at::Tensor& q,
                                                    const at::Tensor& k, const at::Tensor& v,
                                                    const c10::optional<at::Tensor>& slopes,
                                                    const c10::optional<at::Tensor>& sinks, int64_t lse_dim, F&& f) {
  at::Tensor out, lse;
  for (const ShiftGroup& g : groups) {
    auto [o, l] = f(g, q.index_select(1, g.heads), k.index_select(1, g.kv_heads), v.index_select(1, g.kv_heads),
                    heads_of(slopes, -1, g.heads), heads_of(sinks, 0, g.heads));
    if (!out.defined()) {
      out = at::empty(q.sizes(), o.options().memory_format(at::MemoryFormat::Contiguous));
      std::vector<int64_t> shape = l.sizes().vec();
      shape[lse_dim] = q.size(1);
      lse = at::empty(shape, l.options());
    }
    out.index_copy_(1, g.heads, o);
    lse.index_copy_(lse_dim, g.heads, l);
  }
  return {out, lse};
}

// A group's part of grad_lse: unlike heads_of's optional per-head inputs, where
// an empty tensor means "absent", an empty grad_lse (Lq = 0) is sliced too.
inline c10::optional<at::Tensor> lse_grad_of(const c10::optional<at::Tensor>& t, int64_t dim, const at::Tensor& idx) {
  if (!t.has_value() || !t->defined()) return t;
  return t->index_select(dim, idx);
}

using ShiftGradients = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The backward by groups: f(group, grad_out, grad_lse, q, k, v, out, lse,
// slopes, sinks) -> (dq, dk, dv, dslopes, dsinks) of the group's heads; the
// key and value gradients of a kv head read by several groups are summed.
template <typename F>
ShiftGradients backward_by_shift(const std::vector<ShiftGroup>& groups, const at::Tensor& grad_out,
                                 const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                 const c10::optional<at::Tensor>& slopes, const c10::optional<at::Tensor>& sinks,
                                 int64_t lse_dim, F&& f) {
  at::Tensor dq, dk, dv, dslopes, dsinks;
  for (const ShiftGroup& g : groups) {
    auto [gq, gk, gv, gs, gsk] =
        f(g, grad_out.index_select(1, g.heads), lse_grad_of(grad_lse, lse_dim, g.heads), q.index_select(1, g.heads),
          k.index_select(1, g.kv_heads), v.index_select(1, g.kv_heads), out.index_select(1, g.heads),
          lse.index_select(lse_dim, g.heads), heads_of(slopes, -1, g.heads), heads_of(sinks, 0, g.heads));
    if (!dq.defined()) {
      const auto contiguous = at::MemoryFormat::Contiguous;
      dq = at::empty(q.sizes(), gq.options().memory_format(contiguous));
      dk = at::zeros(k.sizes(), gk.options().memory_format(contiguous));
      dv = at::zeros(v.sizes(), gv.options().memory_format(contiguous));
      dslopes = gs.numel() == 0 ? gs : at::empty({gs.size(0), q.size(1)}, gs.options());
      dsinks = gsk.numel() == 0 ? gsk : at::empty({q.size(1)}, gsk.options());
    }
    dq.index_copy_(1, g.heads, gq);
    dk.index_add_(1, g.kv_heads, gk);
    dv.index_add_(1, g.kv_heads, gv);
    if (dslopes.numel() > 0) dslopes.index_copy_(1, g.heads, gs);
    if (dsinks.numel() > 0) dsinks.index_copy_(0, g.heads, gsk);
  }
  return {dq, dk, dv, dslopes, dsinks};
}

}  // namespace longreach
