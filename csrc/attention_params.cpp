#include "attention_params.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/window.h"
#include "dtype_names.h"

namespace longreach {
namespace {

// q, k, v of one layout: (B, H, L, D) dense or (total, H, D) packed; heads are
// dimension 1 and the head dim the last in both.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t rank, const char* layout) {
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK_VALUE(t->dim() == rank, "local_attention: ", name, " must be a ", rank, "-D tensor ", layout,
                      ", got shape ", t->sizes());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "local_attention: q, k and v must share one dtype, got q ", dtype_name(q.scalar_type()), ", k ", dtype_name(k.scalar_type()),
              ", v ", dtype_name(v.scalar_type()));
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
              "local_attention: q, k and v must be on one device, got q on ", q.device(), ", k on ",
              k.device(), ", v on ", v.device());
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
              "local_attention: q has dtype ", dtype_name(q.scalar_type()),
              "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "local_attention: k and v must have the same shape, got k ",
              k.sizes(), " and v ", v.sizes());
  if (rank == 4) {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "local_attention: batch size of k (", k.size(0),
                ") does not match q (", q.size(0), ")");
  }
  TORCH_CHECK_VALUE(k.size(-1) == q.size(-1), "local_attention: head dim of k (", k.size(-1),
              ") does not match q (", q.size(-1), ")");
  TORCH_CHECK_VALUE(k.size(1) >= 1, "local_attention: k must have at least one head, got ", k.size(1));
  TORCH_CHECK_VALUE(q.size(1) % k.size(1) == 0, "local_attention: number of query heads (", q.size(1),
              ") must be a multiple of the number of key/value heads (", k.size(1), ")");
}

// A bool mask of one flag per key (global_mask, key_padding_mask).
void check_bool_mask(const at::Tensor& g, const char* name, const at::Tensor& q, at::IntArrayRef shape,
                     const char* shape_name) {
  TORCH_CHECK_TYPE(g.scalar_type() == at::kBool, "local_attention: ", name, " must be a bool tensor, got ",
                   dtype_name(g.scalar_type()));
  std::string expected = "(";  // as Python writes a shape
  for (size_t i = 0; i < shape.size(); ++i) expected += std::to_string(shape[i]) + (i + 1 < shape.size() ? ", " : "");
  expected += shape.size() == 1 ? ",)" : ")";
  TORCH_CHECK_VALUE(g.sizes() == shape, "local_attention: ", name, " must have shape ", shape_name, " = ", expected,
                    ", got ", g.sizes());
  TORCH_CHECK_VALUE(g.device() == q.device(), "local_attention: ", name, " is on ", g.device(), " but q is on ",
                    q.device());
}


// The sequence boundaries of a packed batch, checked and read on the host:
// cu[0] = 0, non-decreasing, cu[N] = total, no sequence longer than max_len.
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q, int64_t total,
                                     int64_t max_len, const char* max_name, const char* total_name) {
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "local_attention_varlen: ", name,
                    " must be a 1-D tensor (num_seqs + 1,), got shape ", cu.sizes());
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong, "local_attention_varlen: ", name,
                   " must be torch.int32 or torch.int64, got ", dtype_name(cu.scalar_type()));
  TORCH_CHECK_VALUE(cu.device() == q.device(), "local_attention_varlen: ", name, " is on ", cu.device(),
                    " but q is on ", q.device());
  TORCH_CHECK_VALUE(max_len >= 0, "local_attention_varlen: ", max_name, " must be >= 0, got ", max_len);
  const at::Tensor host = cu.to(at::kCPU, at::kLong).contiguous();  // a device sync on CUDA
  const int64_t* c = host.data_ptr<int64_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(c[0] == 0, "local_attention_varlen: ", name, " must start at 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], "local_attention_varlen: ", name, " must be non-decreasing, got ", c[i - 1],
                      " then ", c[i], " at entries ", i - 1, " and ", i);
    TORCH_CHECK_VALUE(c[i] - c[i - 1] <= max_len, "local_attention_varlen: sequence ", i - 1, " has length ",
                      c[i] - c[i - 1], " (", name, "[", i, "] - ", name, "[", i - 1, "]) but ", max_name, " is ",
                      max_len);
  }
  TORCH_CHECK_VALUE(c[n - 1] == total, "local_attention_varlen: ", name, " must end at ", total_name, " = ", total,
                    ", got ", c[n - 1]);
  return std::vector<int64_t>(c, c + n);
}

}  // namespace

// The options every layout shares (window, score, soft-cap, scale, bias, ALiBi),
// checked against P's lengths and heads; `batch_name` is what the slopes'
// first dimension counts ("B", or "num_seqs" for a packed batch).
void set_options(AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& alibi_slopes,
                 const char* batch_name, int64_t window_left, int64_t window_right, int64_t dilation,
                 c10::string_view score, c10::optional<double> sigmoid_bias, double softcap, double scale,
                 const SinkOptions& sinks) {
  TORCH_CHECK_VALUE(window_left >= -1, "local_attention: window left must be >= 0 (or None/-1 for unbounded), got ",
              window_left);
  TORCH_CHECK_VALUE(window_right >= -1,
              "local_attention: window right must be >= 0 (or None/-1 for unbounded), got ", window_right);
  TORCH_CHECK_VALUE(dilation >= 1, "local_attention: dilation must be >= 1, got ", dilation);
  P.window.left = clip_window_side(window_left, P.q_len, P.k_len);
  P.window.right = clip_window_side(window_right, P.q_len, P.k_len);
  P.window.dilation = clip_dilation(dilation, P.q_len, P.k_len);
  TORCH_CHECK_VALUE(!sinks.causal || window_right == 0,
                    "local_attention: causal=True needs window right = 0, got ", window_right);
  TORCH_CHECK_VALUE(sinks.sink_tokens >= 0, "local_attention: sink_tokens must be an int >= 0, got ",
                    sinks.sink_tokens);
  P.window.causal = sinks.causal;
  P.window.sink_tokens = std::min(sinks.sink_tokens, P.k_len);  // sequences are at most k_len long

  if (score == "softmax") {
    P.score = ScoreKind::kSoftmax;
  } else if (score == "sigmoid") {
    P.score = ScoreKind::kSigmoid;
  } else {
    TORCH_CHECK_VALUE(false, "local_attention: score must be 'softmax' or 'sigmoid', got '", std::string(score), "'");
  }
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0.0,
              "local_attention: softcap must be a positive number (0 disables it), got ", softcap);
  TORCH_CHECK_VALUE(std::isfinite(scale), "local_attention: scale must be finite, got ", scale);
  // float32, bfloat16 and float16 compute in float32: a value beyond its range
  // would become inf there and turn every score into inf or NaN.
  const bool float_compute = q.scalar_type() != at::kDouble;
  const double compute_max = float_compute ? static_cast<double>(std::numeric_limits<float>::max())
                                           : std::numeric_limits<double>::max();
  const char* compute_name = float_compute ? "float32" : "float64";
  TORCH_CHECK_VALUE(std::abs(scale) <= compute_max, "local_attention: scale ", scale, " does not fit the ",
              compute_name, " computation of ", dtype_name(q.scalar_type()), " inputs (at most ", compute_max,
              " in magnitude)");
  TORCH_CHECK_VALUE(softcap <= compute_max, "local_attention: softcap ", softcap, " does not fit the ", compute_name,
              " computation of ", dtype_name(q.scalar_type()), " inputs (at most ", compute_max,
              "; use None for no soft-capping)");
  P.softcap = softcap;
  P.scale = scale;
  if (P.score == ScoreKind::kSigmoid) {
    if (sigmoid_bias.has_value()) {
      TORCH_CHECK_VALUE(std::isfinite(*sigmoid_bias), "local_attention: sigmoid_bias must be finite, got ",
                  *sigmoid_bias);
      TORCH_CHECK_VALUE(std::abs(*sigmoid_bias) <= compute_max, "local_attention: sigmoid_bias ", *sigmoid_bias,
                  " does not fit the ", compute_name, " computation of ", dtype_name(q.scalar_type()),
                  " inputs (at most ", compute_max, " in magnitude)");
      P.sigmoid_bias = *sigmoid_bias;
    } else {
      P.default_sigmoid_bias = true;  // per sequence: window.h sigmoid_bias_of
    }
  }

  if (alibi_slopes.has_value()) {
    const auto& s = *alibi_slopes;
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "local_attention: alibi_slopes must be float32, got ",
                dtype_name(s.scalar_type()));
    const bool per_head = s.dim() == 1 && s.size(0) == P.q_heads;
    const bool per_batch_head = s.dim() == 2 && s.size(0) == P.batch && s.size(1) == P.q_heads;
    TORCH_CHECK_VALUE(per_head || per_batch_head, "local_attention: alibi_slopes must have shape (Hq,) = (",
                P.q_heads, ",) or (", batch_name, ", Hq) = (", P.batch, ", ", P.q_heads, "), got ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == q.device(), "local_attention: alibi_slopes is on ", s.device(),
                " but q is on ", q.device());
    P.has_alibi = true;
  }

  if (sinks.sinks != nullptr && sinks.sinks->has_value()) {
    const at::Tensor& t = **sinks.sinks;
    const auto dt = t.scalar_type();
    TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                     "local_attention: sinks must be a floating tensor (float32, float64, bfloat16 or float16), got ",
                     dtype_name(dt));
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == P.q_heads, "local_attention: sinks must have shape (Hq,) = (",
                      P.q_heads, ",), got ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == q.device(), "local_attention: sinks is on ", t.device(), " but q is on ",
                      q.device());
    TORCH_CHECK_VALUE(P.score == ScoreKind::kSoftmax,
                      "local_attention: sinks are only defined for score='softmax' (a sink logit enters the "
                      "softmax denominator), got score='sigmoid'");
    P.has_sinks = true;
  }
}

VarlenProblem make_varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, const c10::optional<at::Tensor>& global_mask,
                                 const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                 int64_t window_right, int64_t dilation, c10::string_view score,
                                 c10::optional<double> sigmoid_bias, double softcap, double scale,
                                 const SinkOptions& sinks) {
  check_qkv(q, k, v, 3, "(total, H, D)");
  const std::vector<int64_t> cq =
      read_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q, q.size(0), max_seqlen_q, "max_seqlen_q", "total_q");
  const std::vector<int64_t> ck =
      read_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q, k.size(0), max_seqlen_k, "max_seqlen_k", "total_k");
  TORCH_CHECK_VALUE(cq.size() == ck.size(), "local_attention_varlen: cu_seqlens_q holds ", cq.size() - 1,
                    " sequences but cu_seqlens_k holds ", ck.size() - 1, "; expected the same number");
  VarlenProblem out;
  AttentionParams& P = out.params;
  P.batch = static_cast<int64_t>(cq.size()) - 1;
  P.q_heads = q.size(1);
  P.kv_heads = k.size(1);
  P.q_len = max_seqlen_q;  // the longest sequences: the window and dilation clips cover every sequence
  P.k_len = max_seqlen_k;
  P.head_dim = q.size(2);
  set_options(P, q, alibi_slopes, "num_seqs", window_left, window_right, dilation, score, sigmoid_bias, softcap,
              scale, sinks);
  if (global_mask.has_value()) {
    check_bool_mask(*global_mask, "global_mask", q, {k.size(0)}, "(total_k,)");
    P.has_global = true;
  }
  out.seqs.resize(P.batch);
  for (int64_t b = 0; b < P.batch; ++b) {
    out.seqs[b] = SequenceView{cq[b + 1] - cq[b], ck[b + 1] - ck[b], cq[b], ck[b]};
  }
  return out;
}

AttentionParams make_attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const c10::optional<at::Tensor>& global_mask,
                                      const c10::optional<at::Tensor>& alibi_slopes,
                                      int64_t window_left, int64_t window_right, int64_t dilation,
                                      c10::string_view score, c10::optional<double> sigmoid_bias,
                                      double softcap, double scale,
                                      const c10::optional<at::Tensor>& key_padding_mask,
                                      const SinkOptions& sinks) {
  check_qkv(q, k, v, 4, "(B, H, L, D)");
  AttentionParams P;
  P.batch = q.size(0);
  P.q_heads = q.size(1);
  P.kv_heads = k.size(1);
  P.q_len = q.size(2);
  P.k_len = k.size(2);
  P.head_dim = q.size(3);
  set_options(P, q, alibi_slopes, "B", window_left, window_right, dilation, score, sigmoid_bias, softcap, scale,
              sinks);
  if (global_mask.has_value()) {
    check_bool_mask(*global_mask, "global_mask", q, {P.batch, P.k_len}, "(B, Lk)");
    P.has_global = true;
  }
  if (key_padding_mask.has_value()) {
    check_bool_mask(*key_padding_mask, "key_padding_mask", q, {P.batch, P.k_len}, "(B, Lk)");
    P.has_key_padding = true;
  }
  return P;
}

std::vector<int64_t> chunk_phases(const at::Tensor& q, int64_t q_heads, int64_t chunk,
                                  const c10::optional<at::Tensor>& chunk_shift, const char* owner) {
  TORCH_CHECK_VALUE(chunk >= 0, owner, ": chunk must be an int >= 0 (0 = no chunks), got ", chunk);
  const bool has_shift = chunk_shift.has_value() && chunk_shift->defined();
  TORCH_CHECK_VALUE(chunk > 0 || !has_shift, owner, ": chunk_shift needs chunk > 0, got chunk = 0");
  if (chunk == 0) return {};
  std::vector<int64_t> phases(q_heads, 0);
  if (!has_shift) return phases;
  const at::Tensor& t = *chunk_shift;
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong,
                   owner, ": chunk_shift must be an int32 or int64 tensor, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == q_heads, owner, ": chunk_shift must have shape (Hq,) = (",
                    q_heads, ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), owner, ": chunk_shift is on ", t.device(), " but q is on ",
                    q.device());
  const at::Tensor host = t.to(at::kCPU, at::kLong).contiguous();
  for (int64_t h = 0; h < q_heads; ++h) phases[h] = floor_mod(host.data_ptr<int64_t>()[h], chunk);
  return phases;
}

at::Tensor present_key_counts(const at::Tensor& key_padding_mask) {
  return key_padding_mask.logical_not().sum(1, /*keepdim=*/false, at::kLong).contiguous();
}

void check_backward_inputs(const AttentionParams& P, const at::Tensor& q, const at::Tensor& grad_out,
                           const at::Tensor& out, const at::Tensor& lse,
                           const c10::optional<at::Tensor>& grad_lse, bool alibi_grad) {
  TORCH_CHECK_VALUE(!alibi_grad || P.has_alibi,
                    "local_attention backward: alibi_grad=True needs alibi_slopes, got None");
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "local_attention backward: grad_out and out must have q's shape ", q.sizes(), ", got ",
              grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
              "local_attention backward: grad_out and out must have q's dtype ", dtype_name(q.scalar_type()));
  const std::vector<int64_t> shape = lse_shape(q);
  TORCH_CHECK_TYPE(lse.sizes() == at::IntArrayRef(shape) && lse.scalar_type() == lse_dtype(q.scalar_type()),
              "local_attention backward: lse must be ", dtype_name(lse_dtype(q.scalar_type())), " of shape ",
              at::IntArrayRef(shape), ", got ", dtype_name(lse.scalar_type()), " ", lse.sizes());
  if (grad_lse.has_value()) {
    TORCH_CHECK_VALUE(grad_lse->sizes() == lse.sizes(), "local_attention backward: grad_lse must have shape ",
                lse.sizes(), ", got ", grad_lse->sizes());
  }
}

at::Tensor alibi_slopes_grad_buffer(const AttentionParams& P, const at::Tensor& q, bool alibi_grad) {
  const auto options = q.options().dtype(at::kFloat);
  return alibi_grad ? at::empty({P.batch, P.q_heads}, options) : at::empty({0}, options);
}

at::Tensor sink_logits(const AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& sinks) {
  if (!P.has_sinks) return at::Tensor();
  return sinks->to(lse_dtype(q.scalar_type())).contiguous();
}

at::Tensor sinks_grad_buffer(const AttentionParams& P, const at::Tensor& q, const c10::optional<at::Tensor>& sinks) {
  return P.has_sinks ? at::zeros({P.q_heads}, q.options().dtype(lse_dtype(q.scalar_type())))
                     : at::empty({0}, q.options().dtype(at::kFloat));
}

void set_dropout(AttentionParams& P, double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "local_attention: dropout_p must be in [0, 1], got ",
                    dropout_p);
  if (dropout_p == 0.0) return;  // p = 0 is the op without dropout, bit for bit
  TORCH_CHECK_VALUE(dropout_seed.has_value(), "local_attention: dropout_p > 0 needs dropout_seed");
  const at::Tensor& seed = *dropout_seed;
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "local_attention: dropout_seed must be an int64 tensor, got ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.dim() == 1 && seed.size(0) == 2 && seed.device().is_cpu(),
                    "local_attention: dropout_seed must be a CPU tensor of shape (2,) (seed, offset), got shape ",
                    seed.sizes(), " on ", seed.device());
  const at::Tensor values = seed.contiguous();
  P.dropout.enabled = true;
  P.dropout.seed = static_cast<uint64_t>(values.data_ptr<int64_t>()[0]);
  P.dropout.offset = static_cast<uint64_t>(values.data_ptr<int64_t>()[1]);
  P.dropout.threshold = static_cast<uint64_t>(std::llround(dropout_p * 4294967296.0));
  P.dropout.keep_scale = dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
}

}  // namespace longreach
