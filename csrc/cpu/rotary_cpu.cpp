// CPU kernel of longreach::apply_rotary and apply_rotary_qk.
//
// One work item is one head row (b, h, l): it looks up the row's position,
// reads that row of the cos / sin tables and rotates the rot_dim leading
// features pair by pair with the shared math of common/rotary.h; the other
// features are copied. The backward is the same op with conjugate flipped
// (see common/rotary.h), so there is no separate backward kernel.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "../common/rotary.h"
#include "../rotary_params.h"

namespace longreach::cpu {
namespace {

// Rotates one head row. Rotate-half pairs are (i, i + half), so the loop reads
// two contiguous runs and vectorises; interleaved pairs are (2i, 2i + 1).
template <typename scalar_t, typename acc_t>
void rotate_row(const RotaryParams& P, const scalar_t* x, const acc_t* c, const acc_t* s, scalar_t* out) {
  for (int64_t i = 0; i < P.half; ++i) {
    const RotaryPair pr = rotary_pair(i, P.half, P.interleaved);
    acc_t y1, y2;
    rotate_pair<acc_t>(static_cast<acc_t>(x[pr.first]), static_cast<acc_t>(x[pr.second]), c[i], s[i],
                       P.conjugate, &y1, &y2);
    out[pr.first] = static_cast<scalar_t>(y1);
    out[pr.second] = static_cast<scalar_t>(y2);
  }
  for (int64_t d = P.rot_dim(); d < P.head_dim; ++d) out[d] = x[d];
}

// x: rows with a contiguous last dim; cos / sin: contiguous tables in acc_t;
// out: contiguous (B, H, L, D).
template <typename scalar_t>
void rotary_kernel(const RotaryParams& P, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                   const int64_t* pos, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const acc_t* cp = cos.const_data_ptr<acc_t>();
  const acc_t* sp = sin.const_data_ptr<acc_t>();
  const int64_t xs_b = x.stride(0), xs_h = x.stride(1), xs_l = x.stride(2);
  const int64_t H = P.heads, L = P.seq_len, D = P.head_dim;
  // Enough rows per task that scheduling costs little next to the memory traffic.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1));
  at::parallel_for(0, P.rows(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t l = r % L;
      const int64_t h = (r / L) % H;
      const int64_t b = r / (L * H);
      const int64_t p = pos ? pos[b * P.pos_stride_b + l * P.pos_stride_l] : l;
      rotate_row<scalar_t, acc_t>(P, xp + b * xs_b + h * xs_h + l * xs_l, cp + p * P.half, sp + p * P.half,
                                  op + r * D);
    }
  });
}

// Rotates x with checked params; cos_t / sin_t already in the math dtype.
at::Tensor rotate(const RotaryParams& P, const at::Tensor& x_in, const at::Tensor& cos_t, const at::Tensor& sin_t,
                  const c10::optional<at::Tensor>& position_ids) {
  const at::Tensor x = x_in.stride(-1) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const int64_t* pos = position_ids.has_value() ? position_ids->const_data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_rotary_cpu", [&] {
    rotary_kernel<scalar_t>(P, x, cos_t, sin_t, pos, out);
  });
  return out;
}

at::Tensor apply_rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const c10::optional<at::Tensor>& position_ids, bool interleaved, bool conjugate) {
  const RotaryParams P = make_rotary_params(x, "x", cos, sin, position_ids, interleaved, conjugate);
  if (position_ids.has_value()) check_position_ids_in_table(*position_ids, P.table_len);
  return rotate(P, x, rotary_table(cos, x.scalar_type()), rotary_table(sin, x.scalar_type()), position_ids);
}

std::tuple<at::Tensor, at::Tensor> apply_rotary_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       const c10::optional<at::Tensor>& position_ids,
                                                       bool interleaved, bool conjugate) {
  const RotaryParams Pq = make_rotary_params(q, "q", cos, sin, position_ids, interleaved, conjugate);
  const RotaryParams Pk = make_rotary_params(k, "k", cos, sin, position_ids, interleaved, conjugate);
  check_rotary_qk_dtypes(q, k);
  if (position_ids.has_value()) check_position_ids_in_table(*position_ids, Pq.table_len);
  const at::Tensor cos_t = rotary_table(cos, q.scalar_type()), sin_t = rotary_table(sin, q.scalar_type());
  return {rotate(Pq, q, cos_t, sin_t, position_ids), rotate(Pk, k, cos_t, sin_t, position_ids)};
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("apply_rotary", &apply_rotary_cpu);
  m.impl("apply_rotary_qk", &apply_rotary_qk_cpu);
}

}  // namespace longreach::cpu
