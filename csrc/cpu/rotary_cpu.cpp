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

#include <cstdint>
#include <cstring>
#include <tuple>

#include "../common/rotary.h"
#include "../rotary_params.h"

namespace longreach::cpu {
namespace {

// Element loads and stores of the rotation loops, in the math type acc_t. bfloat16 gets
// branch-free conversions with the bits of c10::BFloat16's (round to nearest even, NaN to
// 0x7FC0): c10's float -> bfloat16 branches on NaN, which kept the loops below from
// vectorising (a bfloat16 apply_rotary_qk of 8 x 4 x 256 x 32 q and k took ~1 ms).
template <typename acc_t, typename scalar_t>
acc_t load(scalar_t x) {
  return static_cast<acc_t>(x);
}
template <typename scalar_t, typename acc_t>
scalar_t store(acc_t y) {
  return static_cast<scalar_t>(y);
}
template <>
float load<float, c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return y;
}
template <>
c10::BFloat16 store<c10::BFloat16, float>(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  const uint32_t rounded = (bits + UINT32_C(0x7FFF) + ((bits >> 16) & 1)) >> 16;
  const bool nan = (bits & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000);
  return c10::BFloat16(static_cast<uint16_t>(nan ? UINT32_C(0x7FC0) : rounded), c10::BFloat16::from_bits());
}

// Rotates one head row. Each layout gets its own loop, with the conjugate's sign folded into
// the sine up front, so the compiler can vectorise it: rotate-half pairs are (i, i + half), two
// contiguous runs; interleaved pairs are (2i, 2i + 1). The pair math is common/rotary.h's.
// __restrict__: out is a fresh tensor (rotate() allocates it), so it never overlaps x or the tables,
// and the loops need no run-time overlap checks (a row has only 16-64 pairs).
template <typename scalar_t, typename acc_t>
void rotate_row(const RotaryParams& P, const scalar_t* __restrict__ x, const acc_t* __restrict__ c,
                const acc_t* __restrict__ s, scalar_t* __restrict__ out) {
  const int64_t half = P.half;
  const acc_t sign = P.conjugate ? acc_t(-1) : acc_t(1);
  if (P.interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      acc_t y1, y2;
      rotate_pair<acc_t>(load<acc_t>(x[2 * i]), load<acc_t>(x[2 * i + 1]), c[i], sign * s[i], false, &y1, &y2);
      out[2 * i] = store<scalar_t>(y1);
      out[2 * i + 1] = store<scalar_t>(y2);
    }
  } else {
    const scalar_t* x2 = x + half;
    scalar_t* out2 = out + half;
    for (int64_t i = 0; i < half; ++i) {
      acc_t y1, y2;
      rotate_pair<acc_t>(load<acc_t>(x[i]), load<acc_t>(x2[i]), c[i], sign * s[i], false, &y1, &y2);
      out[i] = store<scalar_t>(y1);
      out2[i] = store<scalar_t>(y2);
    }
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
    // (b, h, l) of row r, stepped along instead of divided out per row: three int64 divisions
    // per row of 16 rotary pairs had cost more than the rotation.
    int64_t l = begin % L, h = (begin / L) % H, b = begin / (L * H);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t p = pos ? pos[b * P.pos_stride_b + l * P.pos_stride_l] : l;
      rotate_row<scalar_t, acc_t>(P, xp + b * xs_b + h * xs_h + l * xs_l, cp + p * P.half, sp + p * P.half,
                                  op + r * D);
      if (++l == L) {
        l = 0;
        if (++h == H) {
          h = 0;
          ++b;
        }
      }
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
