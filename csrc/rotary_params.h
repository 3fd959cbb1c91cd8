// Host-side validation of the rotary op's arguments and construction of
// RotaryParams. Shared by the CPU and CUDA entry points so both reject bad
// input with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "common/rotary.h"

namespace longreach {

// Checks x (B, H, L, D), the cos / sin tables (table_len, half) and the
// optional position_ids ((B, L) or (1, L), int64) against each other. `x_name`
// names x in messages ("x", "q" or "k"). Does not read tensor data.
RotaryParams make_rotary_params(const at::Tensor& x, const char* x_name, const at::Tensor& cos,
                                const at::Tensor& sin, const c10::optional<at::Tensor>& position_ids,
                                bool interleaved, bool conjugate);

// Raises when a position id is negative or >= the table length. Reads the ids
// (on CUDA that is a device synchronisation).
void check_position_ids_in_table(const at::Tensor& position_ids, int64_t table_len);

// The math type of a rotary kernel: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType rotary_math_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The table in the kernel's math type with contiguous rows: a no-op for tables
// built by longreach (float32), one conversion otherwise.
at::Tensor rotary_table(const at::Tensor& table, at::ScalarType x_dtype);

// apply_rotary_qk rotates q and k with one table: they must share a dtype.
void check_rotary_qk_dtypes(const at::Tensor& q, const at::Tensor& k);

}  // namespace longreach
