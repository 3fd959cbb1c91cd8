// CPU kernels of the test hooks declared at the end of ops.cpp: they return
// what csrc/common/window.h and tile_schedule.h compute, which the CUDA
// kernels run on the device, so tests/test_common_math.py can check that math
// against the dense reference mask on a machine without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/tile_schedule.h"
#include "bf16_ops.h"
#include "../common/window.h"

namespace longreach::cpu {
namespace {

WindowSpec window_spec(int64_t q_len, int64_t k_len, int64_t window_left, int64_t window_right, int64_t dilation) {
  TORCH_CHECK(q_len >= 0 && k_len >= 0, "_debug: lengths must be >= 0, got q_len ", q_len, ", k_len ", k_len);
  TORCH_CHECK(dilation >= 1, "_debug: dilation must be >= 1, got ", dilation);
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "_debug: window sides must be >= -1, got (", window_left,
              ", ", window_right, ")");
  return WindowSpec{clip_window_side(window_left, q_len, k_len), clip_window_side(window_right, q_len, k_len),
                    clip_dilation(dilation, q_len, k_len)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> debug_window_ranges(
    int64_t q_len, int64_t k_len, int64_t window_left, int64_t window_right, int64_t dilation, int64_t chunk,
    int64_t chunk_phase) {
  TORCH_CHECK(chunk >= 0 && (chunk == 0 ? chunk_phase == 0 : chunk_phase >= 0 && chunk_phase < chunk),
              "_debug_window_ranges: need chunk >= 0 and 0 <= chunk_phase < chunk, got ", chunk, ", ", chunk_phase);
  WindowSpec w = window_spec(q_len, k_len, window_left, window_right, dilation);
  w.chunk = chunk;
  w.chunk_phase = chunk_phase;
  const SequenceView s{q_len, k_len};
  at::Tensor key_lo = at::empty({q_len}, at::kLong), key_hi = at::empty({q_len}, at::kLong);
  at::Tensor row_lo = at::empty({k_len}, at::kLong), row_hi = at::empty({k_len}, at::kLong);
  for (int64_t i = 0; i < q_len; ++i) {
    window_key_range(w, s, i + s.position_offset(), key_lo.data_ptr<int64_t>() + i, key_hi.data_ptr<int64_t>() + i);
  }
  for (int64_t j = 0; j < k_len; ++j) {
    window_row_range(w, s, j, row_lo.data_ptr<int64_t>() + j, row_hi.data_ptr<int64_t>() + j);
  }
  return {key_lo, key_hi, row_lo, row_hi};
}

at::Tensor debug_tile_bands(int64_t q_len, int64_t k_len, int64_t window_left, int64_t window_right, int64_t dilation,
                            int64_t tile, bool by_keys) {
  const WindowSpec w = window_spec(q_len, k_len, window_left, window_right, dilation);
  const SequenceView s{q_len, k_len};
  TORCH_CHECK(tile >= 1, "_debug_tile_bands: tile must be >= 1, got ", tile);
  const int64_t n = by_keys ? k_len : q_len, d = w.dilation, off = s.position_offset();
  std::vector<int64_t> rows;
  for (int64_t cls = 0; cls < class_number(n, d); ++cls) {
    for (int64_t t = 0; t < tiles_per_class(n, d, tile); ++t) {
      int64_t first, last, lo, hi;
      class_tile_members(n, cls, d, tile, t, &first, &last);
      if (first > last) continue;
      const int64_t a = class_member(cls, first, d), b = class_member(cls, last, d);
      if (by_keys) {
        key_tile_row_band(w, s, a, b, &lo, &hi);
      } else {
        row_tile_key_band(w, s, a + off, b + off, &lo, &hi);
      }
      rows.insert(rows.end(), {cls, a, b, lo, hi});
    }
  }
  const int64_t count = static_cast<int64_t>(rows.size()) / 5;
  return at::tensor(rows, at::kLong).reshape({count, 5});
}

at::Tensor debug_tile_in_window(int64_t q_len, int64_t k_len, int64_t window_left, int64_t window_right,
                                int64_t dilation, const at::Tensor& corners) {
  const WindowSpec w = window_spec(q_len, k_len, window_left, window_right, dilation);
  TORCH_CHECK(corners.dim() == 2 && corners.size(1) == 4 && corners.scalar_type() == at::kLong,
              "_debug_tile_in_window: corners must be an (N, 4) int64 tensor, got ", corners.dtype(), " ",
              corners.sizes());
  const at::Tensor c = corners.contiguous();
  const int64_t* p = c.data_ptr<int64_t>();
  at::Tensor out = at::empty({c.size(0)}, at::kBool);
  for (int64_t r = 0; r < c.size(0); ++r) {
    out.data_ptr<bool>()[r] = tile_in_window(w, p[4 * r], p[4 * r + 1], p[4 * r + 2], p[4 * r + 3]);
  }
  return out;
}

}  // namespace

// The hooks take no tensors to dispatch on (or a CPU one): CompositeExplicitAutograd
// would also do, but CPU keeps them out of every other backend.
TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("_debug_tile_in_window", &debug_tile_in_window);
}

TORCH_LIBRARY_IMPL(longreach, CompositeExplicitAutograd, m) {
  m.impl("_debug_window_ranges", &debug_window_ranges);
  m.impl("_debug_tile_bands", &debug_tile_bands);
  m.impl("_debug_cpu_kernels", [] { return cpu_kernels_in_use(); });
  m.impl("_debug_bf16_choice", [](std::string env, std::string capability, bool cpu_has_bf16) {
    return choose_bf16_kernels(env, capability, cpu_has_bf16);
  });
  m.impl("_debug_amx_choice", [](std::string env, std::string bf16_choice, bool cpu_has_amx, bool os_grants_amx) {
    return choose_amx_kernels(env, bf16_choice, cpu_has_amx, os_grants_amx);
  });
  m.impl("_debug_amx_self_check", [](bool broken) { return amx_emulated_self_check(broken); });
}

}  // namespace longreach::cpu
