// Implementation of TileOps (tile_ops.h) on ATen's at::vec::Vectorized. Each
// file in csrc/cpu/isa/ defines CPU_CAPABILITY (DEFAULT, AVX2 or AVX512, the
// names ATen uses), is compiled with the matching -m flags and includes this
// header once; everything here lives in a namespace named after the
// capability, so the copies never mix at link time.
//
// The matrix product is a register-blocked micro-kernel: an MR x (NV vectors)
// block of C stays in registers while k runs, each step loading NV vectors of
// B and broadcasting MR scalars of A (the classic BLIS/oneDNN shape). Blocking
// over k keeps the B panel in L1. The score math comes from csrc/common/scores.h
// where its templates accept vectors; exp and sigmoid are the vector versions
// of the scalar ones there.
#pragma once

#ifndef CPU_CAPABILITY
#error "define CPU_CAPABILITY (DEFAULT, AVX2 or AVX512) before including tile_ops_impl.h"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "../common/scores.h"
#include "tile_ops.h"

namespace longreach::cpu::CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 6;  // rows of C per micro-kernel call
constexpr int kNV = 4;  // vectors of C per row: 6 x 4 accumulators + 4 B vectors fit 32 zmm registers
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int kMR = 6;
constexpr int kNV = 2;  // 12 accumulators + 2 B vectors + 1 broadcast of 16 ymm registers
#else
constexpr int kMR = 4;
constexpr int kNV = 2;
#endif
constexpr int64_t kKC = 128;  // k per pass: a 128 x 64-float B panel is 32 KiB, inside L1

// exp for the softmax: ATen's fast float exp (the one PyTorch's own CPU flash
// attention uses, max error ~20 ulp, well below float32 attention tolerances)
// and the 1-ulp SLEEF exp for double (float64 results stay ~1e-15 exact).
inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename T>
Vectorized<T> neg_inf_vec() {
  return Vectorized<T>(-std::numeric_limits<T>::infinity());
}

// sigmoid(x) = 1 / (1 + exp(-x)), exactly 0 at x = -inf (masked keys), so that
// rows with nothing allowed stay exact zeros.
template <typename T>
Vectorized<T> vsigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> s = one / (one + vexp(Vectorized<T>(T(0)) - x));
  return Vectorized<T>::blendv(s, Vectorized<T>(T(0)), x == neg_inf_vec<T>());
}

// ------------------------------------------------------------------ gemm --

template <typename T, int MR, int NV>
void micro_kernel(int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
                  int64_t ldc, bool accumulate) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V c[MR][NV];
  if (accumulate) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = V::loadu(C + i * ldc + v * W);
  } else {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = V(T(0));
  }
  const T* a[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) a[i] = A + i * a_row;
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(B + p * ldb + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const V ai(a[i][p * a_col]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = at::vec::fmadd(ai, b[v], c[i][v]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) c[i][v].store(C + i * ldc + v * W);
}

template <typename T, int MR, int NV>
void micro_rows(int64_t mr, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
                int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (mr == MR) return micro_kernel<T, MR, NV>(k, A, a_row, a_col, B, ldb, C, ldc, accumulate);
    return micro_rows<T, MR - 1, NV>(mr, k, A, a_row, a_col, B, ldb, C, ldc, accumulate);
  }
}

// All rows of C against one panel of NV vectors of columns.
template <typename T, int NV>
void panel(int64_t m, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
           int64_t ldc, bool accumulate) {
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    micro_rows<T, kMR, NV>(std::min<int64_t>(kMR, m - m0), k, A + m0 * a_row, a_row, a_col, B, ldb, C + m0 * ldc,
                           ldc, accumulate);
  }
}

template <typename T, int NV>
void panel_of_width(int64_t nv, int64_t m, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
                    int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  if constexpr (NV > 0) {
    if (nv == NV) return panel<T, NV>(m, k, A, a_row, a_col, B, ldb, C, ldc, accumulate);
    return panel_of_width<T, NV - 1>(nv, m, k, A, a_row, a_col, B, ldb, C, ldc, accumulate);
  }
}

// Fewer columns than one vector (odd head dims): run one vector's kernel on
// zero-padded copies of the B and C columns.
template <typename T>
void narrow_panel(int64_t cols, int64_t m, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
                  int64_t ldb, T* C, int64_t ldc, bool accumulate) {
  constexpr int W = Vectorized<T>::size();
  T b_pad[kKC * W];
  T c_pad[kMR * W];
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < W; ++j) b_pad[p * W + j] = j < cols ? B[p * ldb + j] : T(0);
  }
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    const int64_t mr = std::min<int64_t>(kMR, m - m0);
    for (int64_t i = 0; i < mr; ++i) {
      for (int64_t j = 0; j < W; ++j) c_pad[i * W + j] = (accumulate && j < cols) ? C[(m0 + i) * ldc + j] : T(0);
    }
    micro_rows<T, kMR, 1>(mr, k, A + m0 * a_row, a_row, a_col, b_pad, W, c_pad, W, accumulate);
    for (int64_t i = 0; i < mr; ++i) std::memcpy(C + (m0 + i) * ldc, c_pad + i * W, cols * sizeof(T));
  }
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate) {
  constexpr int W = Vectorized<T>::size();
  constexpr int64_t NB = kNV * W;
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, T(0));
    }
    return;
  }
  for (int64_t k0 = 0; k0 < k; k0 += kKC) {
    const int64_t kc = std::min(kKC, k - k0);
    const bool acc = accumulate || k0 > 0;
    const T* Ak = A + k0 * a_col;
    const T* Bk = B + k0 * ldb;
    int64_t n0 = 0;
    for (; n0 + NB <= n; n0 += NB) panel<T, kNV>(m, kc, Ak, a_row, a_col, Bk + n0, ldb, C + n0, ldc, acc);
    const int64_t nv = (n - n0) / W;
    if (nv > 0) {
      panel_of_width<T, kNV - 1>(nv, m, kc, Ak, a_row, a_col, Bk + n0, ldb, C + n0, ldc, acc);
      n0 += nv * W;
    }
    if (n0 < n) narrow_panel<T>(n - n0, m, kc, Ak, a_row, a_col, Bk + n0, ldb, C + n0, ldc, acc);
  }
}

// --------------------------------------------------------- score tiles --

template <typename T>
void softmax_tile(T* S, int64_t ld, int64_t nk, int64_t ncols, T* row_max, T* row_sum, T* alpha) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  const V ninf = neg_inf_vec<T>();
  for (int64_t a = 0; a < ncols; a += W) {
    V mx = ninf;
    for (int64_t c = 0; c < nk; ++c) mx = at::vec::maximum(mx, V::loadu(S + c * ld + a));
    const V m_old = V::loadu(row_max + a);
    const V m_new = at::vec::maximum(m_old, mx);
    // Rows with nothing allowed yet keep max -inf; subtract 0 instead so exp(-inf) = 0, never NaN.
    const V m_safe = V::blendv(m_new, V(T(0)), m_new == ninf);
    const V al = vexp(m_old - m_safe);
    V sum(T(0));
    for (int64_t c = 0; c < nk; ++c) {
      const V p = vexp(V::loadu(S + c * ld + a) - m_safe);
      p.store(S + c * ld + a);
      sum = sum + p;
    }
    m_new.store(row_max + a);
    al.store(alpha + a);
    at::vec::fmadd(V::loadu(row_sum + a), al, sum).store(row_sum + a);
  }
}

template <typename T>
void sigmoid_tile(T* S, int64_t ld, int64_t nk, int64_t ncols, T bias) {
  using V = Vectorized<T>;
  const V b(bias);
  for (int64_t c = 0; c < nk; ++c) {
    for (int64_t a = 0; a < ncols; a += V::size()) vsigmoid<T>(V::loadu(S + c * ld + a) + b).store(S + c * ld + a);
  }
}

template <typename T>
void softmax_grad_tile(T* S, T* G, const T* factor, int64_t ld, int64_t nk, int64_t ncols, const T* lse,
                       const T* rowdot) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  const V ninf = neg_inf_vec<T>();
  for (int64_t a = 0; a < ncols; a += W) {
    const V l = V::loadu(lse + a);
    // An empty row (lse = -inf) gets P = exp(s - inf) = 0 everywhere.
    const V l_safe = V::blendv(l, V(std::numeric_limits<T>::infinity()), l == ninf);
    const V dot = V::loadu(rowdot + a);
    for (int64_t c = 0; c < nk; ++c) {
      const V p = vexp(V::loadu(S + c * ld + a) - l_safe);
      V g = softmax_score_grad<V>(p, V::loadu(G + c * ld + a), dot);
      if (factor) g = g * V::loadu(factor + c * ld + a);
      p.store(S + c * ld + a);
      g.store(G + c * ld + a);
    }
  }
}

template <typename T>
void sigmoid_grad_tile(T* S, T* G, const T* factor, int64_t ld, int64_t nk, int64_t ncols, T bias) {
  using V = Vectorized<T>;
  const V b(bias);
  for (int64_t c = 0; c < nk; ++c) {
    for (int64_t a = 0; a < ncols; a += V::size()) {
      const V sig = vsigmoid<T>(V::loadu(S + c * ld + a) + b);
      V g = sigmoid_score_grad<V>(sig, V::loadu(G + c * ld + a));
      if (factor) g = g * V::loadu(factor + c * ld + a);
      sig.store(S + c * ld + a);
      g.store(G + c * ld + a);
    }
  }
}

template <typename T>
TileOps<T> make_ops() {
  return TileOps<T>{LR_ISA_NAME,        Vectorized<T>::size(), &gemm<T>,
                    &softmax_tile<T>,   &sigmoid_tile<T>,      &softmax_grad_tile<T>,
                    &sigmoid_grad_tile<T>};
}

}  // namespace

const TileOps<float>& float_ops() {
  static const TileOps<float> ops = make_ops<float>();
  return ops;
}

const TileOps<double>& double_ops() {
  static const TileOps<double> ops = make_ops<double>();
  return ops;
}

}  // namespace longreach::cpu::CPU_CAPABILITY
