// The C++ API (include/longreach/longreach.h): the Python API's option handling
// (python/longreach/ops/attention.py kernel_options: None -> the kernels' values)
// and C++ autograd Functions around the dispatcher's forward / backward ops. The
// argument checks stay the ops' own (attention_params.cpp, rotary_params.cpp).
#include "longreach/longreach.h"

#include <cmath>
#include <limits>

#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/custom_function.h>

#include "api/op_call.h"

namespace longreach {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kNoDoubleBackward =
    "longreach C++ API: double backward (create_graph=true followed by another backward) is not "
    "supported; the backward kernels have no derivative of their own";

c10::IValue opt(const std::optional<at::Tensor>& t) { return t.has_value() ? c10::IValue(*t) : c10::IValue(); }

// The ops' scalar options, as Python's kernel_options gives them.
struct OpScalars {
  int64_t window_left, window_right, dilation;
  std::string score;
  std::optional<double> sigmoid_bias;
  double softcap, scale;
  bool causal;
  int64_t sink_tokens;
  int64_t chunk;
  double dropout_p;
};

OpScalars op_scalars(const char* owner, int64_t head_dim, const AttentionOptions& o, bool return_lse) {
  TORCH_CHECK_VALUE(!return_lse || o.score == "softmax", owner, ": the log-sum-exp is only defined for score='softmax', ",
                    "got score='", o.score, "'");
  return OpScalars{o.window_left, o.causal ? 0 : o.window_right, o.dilation, o.score, o.sigmoid_bias,
                   o.softcap.value_or(0.0), o.scale.value_or(1.0 / std::sqrt(static_cast<double>(head_dim))),
                   o.causal, o.sink_tokens, o.chunk, o.dropout_p};
}

void save_scalars(AutogradContext* ctx, const OpScalars& p) {
  auto& d = ctx->saved_data;
  d["window_left"] = p.window_left, d["window_right"] = p.window_right, d["dilation"] = p.dilation;
  d["score"] = p.score, d["sigmoid_bias"] = p.sigmoid_bias, d["softcap"] = p.softcap, d["scale"] = p.scale;
  d["causal"] = p.causal, d["sink_tokens"] = p.sink_tokens, d["chunk"] = p.chunk, d["dropout_p"] = p.dropout_p;
}

OpScalars load_scalars(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return OpScalars{d["window_left"].toInt(), d["window_right"].toInt(), d["dilation"].toInt(),
                   d["score"].toStringRef(), d["sigmoid_bias"].toOptional<double>(), d["softcap"].toDouble(),
                   d["scale"].toDouble(), d["causal"].toBool(), d["sink_tokens"].toInt(), d["chunk"].toInt(),
                   d["dropout_p"].toDouble()};
}

// The scalar arguments shared by the forward and backward ops, by name.
std::vector<std::pair<const char*, c10::IValue>> scalar_args(const OpScalars& p) {
  return {{"window_left", p.window_left}, {"window_right", p.window_right}, {"dilation", p.dilation},
          {"score", p.score}, {"sigmoid_bias", p.sigmoid_bias}, {"softcap", p.softcap}, {"scale", p.scale},
          {"causal", p.causal}, {"sink_tokens", p.sink_tokens}, {"chunk", p.chunk}, {"dropout_p", p.dropout_p}};
}

// Python's dropout_options (python/longreach/ops/attention.py, dropout.draw_seed): with
// 0 < p <= 1 and no seed given, (seed, offset) from the default CPU generator, the same draw
// as torch.randint(-2**63, 2**63 - 1, (2,)), so one torch::manual_seed gives Python's mask.
// Any other p passes through unchanged for the op's own check (no draw for a rejected call).
std::optional<at::Tensor> dropout_seed(const AttentionOptions& o) {
  if (o.dropout_seed.has_value() || !(o.dropout_p > 0.0 && o.dropout_p <= 1.0)) return o.dropout_seed;
  return at::randint(std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(), {2}, at::kLong);
}

// The gradients of q, k, v, the slopes and the sinks from the backward op's outputs; the slope
// gradient has one row per batch element / sequence, summed for shared (Hq,) slopes.
variable_list attention_grads(torch::jit::Stack& s, const at::Tensor& slopes, bool slopes_grad, bool has_sinks) {
  at::Tensor g_slopes;
  if (slopes_grad) g_slopes = slopes.dim() == 1 ? s[3].toTensor().sum(0) : s[3].toTensor();
  return {s[0].toTensor(), s[1].toTensor(), s[2].toTensor(), g_slopes,
          has_sinks ? s[4].toTensor() : at::Tensor()};
}

api::NamedArgs with(api::NamedArgs args, const api::NamedArgs& more) {
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

c10::IValue maybe(const at::Tensor& t) { return t.defined() ? c10::IValue(t) : c10::IValue(); }

// Dense and varlen attention share one Function: `cu` holds (cu_seqlens_q, cu_seqlens_k,
// max_seqlen_q, max_seqlen_k) for varlen and is empty for the dense op.
struct VarlenArgs {
  at::Tensor cu_q, cu_k;
  int64_t max_q = 0, max_k = 0;
  bool varlen() const { return cu_q.defined(); }
};

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  // Forward inputs: q, k, v, global_mask, alibi_slopes, key_padding_mask, sinks, chunk_shift,
  // dropout_seed, scalars, varlen (11).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const std::optional<at::Tensor>& global_mask,
                               const std::optional<at::Tensor>& alibi_slopes,
                               const std::optional<at::Tensor>& key_padding_mask,
                               const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& chunk_shift,
                               const std::optional<at::Tensor>& dropout_seed, const OpScalars& p,
                               const VarlenArgs& vl) {
    api::NamedArgs args = with({{"q", q}, {"k", k}, {"v", v}, {"global_mask", opt(global_mask)},
                                {"alibi_slopes", opt(alibi_slopes)}, {"sinks", opt(sinks)},
                                {"chunk_shift", opt(chunk_shift)}, {"dropout_seed", opt(dropout_seed)}},
                               scalar_args(p));
    if (vl.varlen()) {
      args = with(args, {{"cu_seqlens_q", vl.cu_q}, {"cu_seqlens_k", vl.cu_k}, {"max_seqlen_q", vl.max_q},
                         {"max_seqlen_k", vl.max_k}});
    } else {
      args = with(args, {{"key_padding_mask", opt(key_padding_mask)}});
    }
    torch::jit::Stack out = api::call_op(vl.varlen() ? "local_attention_varlen_fwd" : "local_attention_fwd", args);
    const at::Tensor o = out[0].toTensor(), lse = out[1].toTensor();
    ctx->save_for_backward({q, k, v, o, lse, global_mask.value_or(at::Tensor()), alibi_slopes.value_or(at::Tensor()),
                            key_padding_mask.value_or(at::Tensor()), sinks.value_or(at::Tensor()), vl.cu_q, vl.cu_k,
                            chunk_shift.value_or(at::Tensor()), dropout_seed.value_or(at::Tensor())});
    save_scalars(ctx, p);
    ctx->saved_data["max_seqlen_q"] = vl.max_q;
    ctx->saved_data["max_seqlen_k"] = vl.max_k;
    return {o, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!c10::GradMode::is_enabled(), kNoDoubleBackward);
    const variable_list s = ctx->get_saved_variables();
    const OpScalars p = load_scalars(ctx);
    const bool slopes_grad = s[6].defined() && ctx->needs_input_grad(4);
    // lse has no meaning (and no gradient) for sigmoid scores.
    const at::Tensor grad_lse = p.score == "softmax" ? grads[1] : at::Tensor();
    api::NamedArgs args = with({{"grad_out", grads[0]}, {"grad_lse", maybe(grad_lse)}, {"q", s[0]}, {"k", s[1]},
                                {"v", s[2]}, {"out", s[3]}, {"lse", s[4]}, {"global_mask", maybe(s[5])},
                                {"alibi_slopes", maybe(s[6])}, {"alibi_grad", slopes_grad}, {"sinks", maybe(s[8])},
                                {"chunk_shift", maybe(s[11])}, {"dropout_seed", maybe(s[12])}},
                               scalar_args(p));
    const bool varlen = s[9].defined();
    if (varlen) {
      args = with(args, {{"cu_seqlens_q", s[9]}, {"cu_seqlens_k", s[10]},
                         {"max_seqlen_q", ctx->saved_data["max_seqlen_q"]},
                         {"max_seqlen_k", ctx->saved_data["max_seqlen_k"]}});
    } else {
      args = with(args, {{"key_padding_mask", maybe(s[7])}});
    }
    torch::jit::Stack g = api::call_op(varlen ? "local_attention_varlen_bwd" : "local_attention_bwd", args);
    variable_list r = attention_grads(g, s[6], slopes_grad, s[8].defined());
    return {r[0], r[1], r[2], at::Tensor(), r[3], at::Tensor(), r[4], at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

// Rotary: the backward of a rotation is the inverse rotation (the same op, conjugate flipped).
struct RotaryFunction : public torch::autograd::Function<RotaryFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const std::optional<at::Tensor>& position_ids, bool interleaved) {
    TORCH_CHECK_NOT_IMPLEMENTED(!cos.requires_grad() && !sin.requires_grad(),
                                "longreach::apply_rotary (C++): gradients of cos and sin are not implemented in the "
                                "C++ API; detach the tables (the Python API has them)");
    ctx->save_for_backward({cos, sin, position_ids.value_or(at::Tensor())});
    ctx->saved_data["interleaved"] = interleaved;
    return rotate(x, cos, sin, opt(position_ids), interleaved, false);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK_NOT_IMPLEMENTED(!c10::GradMode::is_enabled(), kNoDoubleBackward);
    const variable_list s = ctx->get_saved_variables();
    at::Tensor gx = rotate(grads[0], s[0], s[1], maybe(s[2]), ctx->saved_data["interleaved"].toBool(), true);
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }

  static at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                           const c10::IValue& position_ids, bool interleaved, bool conjugate) {
    return api::call_op("apply_rotary", {{"x", x}, {"cos", cos}, {"sin", sin}, {"position_ids", position_ids},
                                         {"interleaved", interleaved}, {"conjugate", conjugate}})[0]
        .toTensor();
  }
};

std::tuple<at::Tensor, at::Tensor> run_attention(const char* owner, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const AttentionOptions& o, bool return_lse,
                                                 const VarlenArgs& vl) {
  TORCH_CHECK_VALUE(q.defined() && q.dim() >= 1 && q.size(-1) >= 1, owner,
                    ": q must be a tensor with head dim D >= 1 in its last dimension");
  const OpScalars p = op_scalars(owner, q.size(-1), o, return_lse);
  variable_list r = AttentionFunction::apply(q, k, v, o.global_mask, o.alibi_slopes, o.key_padding_mask, o.sinks,
                                             o.chunk_shift, dropout_seed(o), p, vl);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace longreach

namespace longreach {

at::Tensor local_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const AttentionOptions& options) {
  return std::get<0>(run_attention("longreach::local_attention", q, k, v, options, false, {}));
}

std::tuple<at::Tensor, at::Tensor> local_attention_with_lse(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const AttentionOptions& options) {
  return run_attention("longreach::local_attention_with_lse", q, k, v, options, true, {});
}

at::Tensor local_attention_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                  int64_t max_seqlen_k, const AttentionOptions& options) {
  return std::get<0>(local_attention_varlen_with_lse(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     options));
}

std::tuple<at::Tensor, at::Tensor> local_attention_varlen_with_lse(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, const AttentionOptions& options) {
  TORCH_CHECK_VALUE(!options.key_padding_mask.has_value(), "longreach::local_attention_varlen: key_padding_mask is ",
                    "not an option of the varlen op (packed sequences have no padding)");
  TORCH_CHECK_VALUE(cu_seqlens_q.defined() && cu_seqlens_k.defined(),
                    "longreach::local_attention_varlen: cu_seqlens_q and cu_seqlens_k must be defined tensors");
  return run_attention("longreach::local_attention_varlen", q, k, v, options, false,
                       VarlenArgs{cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k});
}

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const std::optional<at::Tensor>& position_ids, bool interleaved) {
  return RotaryFunction::apply(x, cos, sin, position_ids, interleaved);
}

std::tuple<at::Tensor, at::Tensor> local_attention_with_kvcache(const at::Tensor& q, at::Tensor& k_cache,
                                                                at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                                const KvCacheOptions& o) {
  constexpr const char* owner = "longreach::local_attention_with_kvcache";
  TORCH_CHECK_VALUE(o.k.has_value() == o.v.has_value(), owner,
                    ": pass both k and v (the new keys and values) or neither");
  TORCH_CHECK_NOT_IMPLEMENTED(
      !c10::GradMode::is_enabled() || !(q.requires_grad() || (o.k && o.k->requires_grad()) ||
                                          (o.v && o.v->requires_grad())),
      owner, " is forward only (decoding); call it under torch::NoGradGuard, or train with local_attention");
  TORCH_CHECK_VALUE(q.defined() && q.dim() == 4 && q.size(-1) >= 1, owner,
                    ": q must be a 4-D tensor (B, Hq, Lq, D) with D >= 1");
  AttentionOptions a;
  a.window_left = o.window_left, a.window_right = o.window_right, a.causal = o.causal, a.dilation = o.dilation;
  a.score = o.score, a.sigmoid_bias = o.sigmoid_bias, a.softcap = o.softcap, a.scale = o.scale;
  const OpScalars p = op_scalars(owner, q.size(-1), a, false);
  torch::jit::Stack out = api::call_op(
      "local_attention_kvcache_fwd",
      {{"q", q}, {"k_cache", k_cache}, {"v_cache", v_cache}, {"k", opt(o.k)}, {"v", opt(o.v)},
       {"cache_seqlens", cache_seqlens}, {"block_table", opt(o.block_table)}, {"alibi_slopes", opt(o.alibi_slopes)},
       {"sinks", opt(o.sinks)}, {"window_left", p.window_left}, {"window_right", p.window_right},
       {"dilation", p.dilation}, {"score", p.score}, {"sigmoid_bias", p.sigmoid_bias}, {"softcap", p.softcap},
       {"scale", p.scale}, {"sink_tokens", o.sink_tokens}, {"rolling", o.rolling}, {"num_splits", o.num_splits},
       {"chunk", o.chunk}, {"chunk_shift", opt(o.chunk_shift)}});
  return {out[0].toTensor(), out[1].toTensor()};
}

}  // namespace longreach
