// Small dense building blocks for the CPU attention tiles: gathering rows of a
// strided (B, H, L, D) tensor into a float tile, and the three tile products
// the kernels need. The loops put the contiguous dimension innermost so the
// compiler vectorises them without -ffast-math (no reductions in the inner loop).
#pragma once

#include <cstdint>

namespace longreach::cpu {

// Rows of one (batch, head) slice of a (B, H, L, D) tensor whose last dim is contiguous.
template <typename T>
struct HeadView {
  T* data;
  int64_t stride_l;
  T* row(int64_t l) const { return data + l * stride_l; }
};

// dst[a][0:D] = mul * src.row(idx[a])  (a < n), converted to acc_t.
template <typename scalar_t, typename acc_t>
void gather_rows(const HeadView<const scalar_t>& src, const int64_t* idx, int64_t n, int64_t D, acc_t mul,
                 acc_t* dst) {
  for (int64_t a = 0; a < n; ++a) {
    const scalar_t* s = src.row(idx[a]);
    acc_t* o = dst + a * D;
    for (int64_t d = 0; d < D; ++d) o[d] = mul * static_cast<acc_t>(s[d]);
  }
}

// dst[d][a] = src.row(idx[a])[d]: the transposed gather, leading dimension ld >= n.
template <typename scalar_t, typename acc_t>
void gather_rows_transposed(const HeadView<const scalar_t>& src, const int64_t* idx, int64_t n, int64_t D,
                            int64_t ld, acc_t* dst) {
  for (int64_t a = 0; a < n; ++a) {
    const scalar_t* s = src.row(idx[a]);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + a] = static_cast<acc_t>(s[d]);
  }
}

// C[m][n] (=|+=) A[m][k] @ B[k][n]; row-major with leading dims lda, ldb, ldc.
template <typename acc_t>
void tile_matmul(int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda, const acc_t* B, int64_t ldb,
                 acc_t* C, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; ++i) {
    acc_t* c = C + i * ldc;
    if (!accumulate) {
      for (int64_t j = 0; j < n; ++j) c[j] = acc_t(0);
    }
    for (int64_t p = 0; p < k; ++p) {
      const acc_t a = A[i * lda + p];
      if (a == acc_t(0)) continue;  // masked scores are exact zeros; skipping them is free
      const acc_t* b = B + p * ldb;
      for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

// C[m][n] += A[k][m]^T @ B[k][n]: accumulates key-side gradients from a row tile.
template <typename acc_t>
void tile_matmul_tn(int64_t m, int64_t n, int64_t k, const acc_t* A, int64_t lda, const acc_t* B,
                    int64_t ldb, acc_t* C, int64_t ldc) {
  for (int64_t p = 0; p < k; ++p) {
    const acc_t* b = B + p * ldb;
    for (int64_t i = 0; i < m; ++i) {
      const acc_t a = A[p * lda + i];
      if (a == acc_t(0)) continue;
      acc_t* c = C + i * ldc;
      for (int64_t j = 0; j < n; ++j) c[j] += a * b[j];
    }
  }
}

}  // namespace longreach::cpu
