#include "rotary_params.h"

#include <ATen/ATen.h>

#include "dtype_names.h"

namespace longreach {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

}  // namespace

RotaryParams make_rotary_params(const at::Tensor& x, const char* x_name, const at::Tensor& cos,
                                const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                                bool interleaved, bool conjugate) {
  TORCH_CHECK_VALUE(x.dim() == 4, "apply_rotary: ", x_name, " must be a 4-D tensor (B, H, L, D), got shape ",
              x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), "apply_rotary: ", x_name, " has dtype ", dtype_name(x.scalar_type()),
              "; expected float32, float64, bfloat16 or float16");
  TORCH_CHECK_VALUE(cos.dim() == 2, "apply_rotary: cos must be a 2-D table (max_positions, rot_dim / 2), got shape ",
              cos.sizes());
  TORCH_CHECK_VALUE(cos.sizes() == sin.sizes(), "apply_rotary: cos and sin must have the same shape, got cos ",
              cos.sizes(), " and sin ", sin.sizes());
  TORCH_CHECK_TYPE(is_supported_float(cos.scalar_type()) && cos.scalar_type() == sin.scalar_type(),
              "apply_rotary: cos and sin must share one floating dtype, got cos ", dtype_name(cos.scalar_type()), " and sin ",
              dtype_name(sin.scalar_type()));
  TORCH_CHECK_VALUE(cos.device() == x.device() && sin.device() == x.device(), "apply_rotary: cos and sin are on ",
              cos.device(), " and ", sin.device(), " but ", x_name, " is on ", x.device());

  RotaryParams P;
  P.batch = x.size(0);
  P.heads = x.size(1);
  P.seq_len = x.size(2);
  P.head_dim = x.size(3);
  P.half = cos.size(1);
  P.table_len = cos.size(0);
  P.interleaved = interleaved;
  P.conjugate = conjugate;
  TORCH_CHECK_VALUE(P.half >= 1, "apply_rotary: cos / sin must have at least one column (rot_dim / 2), got shape ",
              cos.sizes());
  TORCH_CHECK_VALUE(P.rot_dim() <= P.head_dim, "apply_rotary: cos / sin have ", P.half,
              " columns, so they rotate rot_dim = ", P.rot_dim(), " features, but ", x_name, " has head dim ",
              P.head_dim, " (rot_dim = 2 * cos.shape[-1] must be <= D; an odd D cannot be fully rotated)");

  if (position_ids.has_value()) {
    const at::Tensor& pos = *position_ids;
    TORCH_CHECK_TYPE(pos.scalar_type() == at::kLong, "apply_rotary: position_ids must be int64, got ",
                dtype_name(pos.scalar_type()));
    TORCH_CHECK_VALUE(pos.dim() == 2 && (pos.size(0) == P.batch || pos.size(0) == 1) && pos.size(1) == P.seq_len,
                "apply_rotary: position_ids must have shape (B, L) = (", P.batch, ", ", P.seq_len,
                ") or (1, L), got ", pos.sizes());
    TORCH_CHECK_VALUE(pos.device() == x.device(), "apply_rotary: position_ids is on ", pos.device(), " but ", x_name,
                " is on ", x.device());
    P.has_position_ids = true;
    P.pos_stride_b = pos.size(0) == 1 ? 0 : pos.stride(0);
    P.pos_stride_l = pos.stride(1);
  } else {
    TORCH_CHECK_VALUE(P.seq_len <= P.table_len, "apply_rotary: ", x_name, " has sequence length L = ", P.seq_len,
                " but the cos / sin tables have only ", P.table_len,
                " rows (positions 0 .. table_len - 1); pass a longer table or explicit position_ids");
  }
  return P;
}

void check_position_ids_in_table(const at::Tensor& position_ids, int64_t table_len) {
  if (position_ids.numel() == 0) return;
  const auto [lo_t, hi_t] = at::aminmax(position_ids);
  const int64_t lo = lo_t.item<int64_t>();
  const int64_t hi = hi_t.item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0, "apply_rotary: position_ids holds ", lo, "; positions must be >= 0");
  TORCH_CHECK_VALUE(hi < table_len, "apply_rotary: position_ids holds ", hi, " but the cos / sin tables have only ",
              table_len, " rows (positions 0 .. ", table_len - 1, "); build a longer table");
}

at::Tensor rotary_table(const at::Tensor& table, at::ScalarType x_dtype) {
  return table.to(rotary_math_dtype(x_dtype)).contiguous();
}

void check_rotary_qk_dtypes(const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "apply_rotary_qk: q and k must share one dtype, got q ",
                   dtype_name(q.scalar_type()), " and k ", dtype_name(k.scalar_type()));
}

}  // namespace longreach
