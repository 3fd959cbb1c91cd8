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
#include <c10/util/Exception.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/scores.h"
#include "tile_ops.h"
#if defined(CPU_CAPABILITY_AVX512)
#include "exp_avx512.h"
#endif

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
// Banded products and row operations handle at most this many rows per call
// (a block of query rows, or the keys of a tile).
constexpr int64_t kMaxRows = 4096;
constexpr int64_t kMaxBlocks = (kMaxRows + kMR - 1) / kMR;

// exp(x - shift) for the softmax, sigmoid and their gradients. float on
// AVX-512: exp_avx512.h (a degree-6 polynomial of 2^f and vscalefps, about 2
// ulp; inputs below -120 give exactly 0, so does -inf). Elsewhere ATen's fast float
// exp (the one PyTorch's CPU flash attention uses) and the 1-ulp SLEEF exp for
// double, so float64 results stay ~1e-15 exact.
#if defined(CPU_CAPABILITY_AVX512)
inline Vectorized<float> vexp_shifted(const Vectorized<float>& x, float shift) {
  return avx512_math::exp_shifted(x, _mm512_set1_ps(shift));
}
#else
inline Vectorized<float> vexp_shifted(const Vectorized<float>& x, float shift) {
  return (x - Vectorized<float>(shift)).exp_u20();
}
#endif
inline Vectorized<double> vexp_shifted(const Vectorized<double>& x, double shift) {
  return (x - Vectorized<double>(shift)).exp();
}
template <typename T>
Vectorized<T> vexp(const Vectorized<T>& x) {
  return vexp_shifted(x, T(0));
}

template <typename T>
Vectorized<T> neg_inf_vec() {
  return Vectorized<T>(-std::numeric_limits<T>::infinity());
}

// sigmoid(x) = 1 / (1 + exp(-x)), exactly 0 at x = -inf (masked keys), so that
// rows with nothing allowed stay exact zeros, and NaN at x = NaN (the fast
// float exp clamps its input and would give a weight of 1).
template <typename T>
Vectorized<T> vsigmoid(const Vectorized<T>& x) {
  const Vectorized<T> one(T(1));
  const Vectorized<T> s = one / (one + vexp(Vectorized<T>(T(0)) - x));
  const Vectorized<T> masked = Vectorized<T>::blendv(s, Vectorized<T>(T(0)), x == neg_inf_vec<T>());
  return Vectorized<T>::blendv(masked, x, x.isnan());
}

// ------------------------------------------------------------------ gemm --

template <typename T, int MR, int NV>
void micro_kernel(int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, int64_t b_vec,
                  T* C, int64_t ldc, bool accumulate) {
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
  const T* bv[NV];
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) bv[v] = B + v * b_vec;
  for (int64_t p = 0; p < k; ++p) {
    V b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = V::loadu(bv[v] + p * ldb);
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

// micro_kernel<T, mr, nv> for run-time mr <= MR and nv <= NV.
template <typename T, int MR, int NV>
void micro_dispatch(int64_t mr, int64_t nv, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
                    int64_t ldb, int64_t b_vec, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0 && NV > 0) {
    if (nv < NV) return micro_dispatch<T, MR, NV - 1>(mr, nv, k, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate);
    if (mr < MR) return micro_dispatch<T, MR - 1, NV>(mr, nv, k, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate);
    micro_kernel<T, MR, NV>(k, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate);
  }
}

// Where a B operand keeps its columns. Row-major: column c of row p at
// B[p * ld + c]. Panel-major (keys packed by pack_columns in the kernels):
// groups of one vector of columns, each a k x vec_width block, so column c of
// row p is at B[(c / W) * group + p * W + c % W]; every vector of a row is then
// its own contiguous stream, which keeps the hardware prefetchers and the TLB
// happy however many columns the matrix has.
template <typename T>
struct BLayout {
  const T* B;
  int64_t ld;     // distance between rows
  int64_t group;  // distance between groups of W columns (W for row-major)
  const T* at(int64_t p, int64_t c) const {
    constexpr int64_t W = Vectorized<T>::size();
    return B + (c / W) * group + p * ld + c % W;
  }
};

// Columns [c0, c1) of one block of mr <= kMR rows, k rows of B from p0: whole
// panels, then whole vectors, then (odd widths only) a zero-padded copy of the
// last few columns.
template <typename T>
void block_columns(int64_t mr, int64_t k, const T* A, int64_t a_row, int64_t a_col, const BLayout<T>& B,
                   int64_t p0, T* C, int64_t ldc, bool accumulate, int64_t c0, int64_t c1) {
  constexpr int W = Vectorized<T>::size();
  int64_t c = c0;
  for (; c + W <= c1; c += kNV * W) {
    const int64_t nv = std::min<int64_t>(kNV, (c1 - c) / W);
    micro_dispatch<T, kMR, kNV>(mr, nv, k, A, a_row, a_col, B.at(p0, c), B.ld, B.group, C + c, ldc, accumulate);
    if (nv < kNV) {
      c += nv * W;
      break;
    }
  }
  if (c >= c1) return;
  const int64_t cols = c1 - c;
  T b_pad[kKC * W];
  T c_pad[kMR * W];
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t j = 0; j < W; ++j) b_pad[p * W + j] = j < cols ? *B.at(p0 + p, c + j) : T(0);
  }
  for (int64_t i = 0; i < mr; ++i) {
    for (int64_t j = 0; j < W; ++j) c_pad[i * W + j] = (accumulate && j < cols) ? C[i * ldc + c + j] : T(0);
  }
  micro_dispatch<T, kMR, 1>(mr, 1, k, A, a_row, a_col, b_pad, W, W, c_pad, W, accumulate);
  for (int64_t i = 0; i < mr; ++i) std::memcpy(C + i * ldc + c, c_pad + i * W, cols * sizeof(T));
}

// Union of the runs [first, end) of rows a0 .. a0 + mr - 1; empty as lo >= hi.
inline void block_union(const int64_t* first, const int64_t* end, int64_t a0, int64_t mr, int64_t* lo,
                        int64_t* hi) {
  *lo = std::numeric_limits<int64_t>::max();
  *hi = 0;
  for (int64_t a = a0; a < a0 + mr; ++a) {
    if (first[a] >= end[a]) continue;
    *lo = std::min(*lo, first[a]);
    *hi = std::max(*hi, end[a]);
  }
}

// The loop nest shared by the three products: k in chunks of kKC (the B panel
// stays in L1), panels of kNV vectors of columns, blocks of kMR rows; `span`
// narrows each (row block, panel) to the columns and k it needs.
template <typename T, typename Span>
void gemm_loops(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const BLayout<T>& B,
                T* C, int64_t ldc, bool accumulate, Span&& span) {
  constexpr int64_t NB = kNV * Vectorized<T>::size();
  for (int64_t k0 = 0; k0 < k; k0 += kKC) {
    const int64_t k1 = std::min(k, k0 + kKC);
    for (int64_t n0 = 0; n0 < n; n0 += NB) {
      const int64_t n1 = std::min(n, n0 + NB);
      for (int64_t m0 = 0, blk = 0; m0 < m; m0 += kMR, ++blk) {
        int64_t c0 = n0, c1 = n1, p0 = k0, p1 = k1;
        span(blk, &c0, &c1, &p0, &p1);
        if (c0 >= c1) continue;
        if (p0 >= p1) {
          if (!accumulate && k0 == 0) {  // nothing to add: C = 0
            for (int64_t i = m0; i < std::min(m, m0 + kMR); ++i) std::fill(C + i * ldc + c0, C + i * ldc + c1, T(0));
          }
          continue;
        }
        block_columns<T>(std::min<int64_t>(kMR, m - m0), p1 - p0, A + m0 * a_row + p0 * a_col, a_row, a_col, B, p0,
                         C + m0 * ldc, ldc, accumulate || p0 > 0, c0, c1);
      }
    }
  }
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::fill(C + i * ldc, C + i * ldc + n, T(0));
    }
    return;
  }
  gemm_loops<T>(m, n, k, A, a_row, a_col, BLayout<T>{B, ldb, Vectorized<T>::size()}, C, ldc, accumulate,
                [](int64_t, int64_t*, int64_t*, int64_t*, int64_t*) {});
}

template <typename T>
void gemm_band_n(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B_panels,
                 T* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  constexpr int64_t W = Vectorized<T>::size();
  if (m <= 0 || n <= 0 || k <= 0) return;
  const int64_t n_vec = (n + W - 1) / W * W;
  TORCH_CHECK(m <= kMaxRows, "gemm_band_n: too many rows");
  int64_t lo[kMaxBlocks], hi[kMaxBlocks];
  for (int64_t blk = 0; blk * kMR < m; ++blk) {
    block_union(first, end, blk * kMR, std::min<int64_t>(kMR, m - blk * kMR), &lo[blk], &hi[blk]);
    lo[blk] = lo[blk] / W * W;                          // whole vectors
    hi[blk] = std::min(n_vec, (hi[blk] + W - 1) / W * W);
  }
  gemm_loops<T>(m, n_vec, k, A, a_row, a_col, BLayout<T>{B_panels, W, (k + 1) * W}, C, ldc, false,
                [&](int64_t blk, int64_t* c0, int64_t* c1, int64_t*, int64_t*) {
                  *c0 = std::max(*c0, lo[blk]);
                  *c1 = std::min(*c1, hi[blk]);
                });
}

template <typename T>
void gemm_band_k(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B, int64_t ldb,
                 T* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  TORCH_CHECK(m <= kMaxRows, "gemm_band_k: too many rows");
  int64_t lo[kMaxBlocks], hi[kMaxBlocks];
  for (int64_t blk = 0; blk * kMR < m; ++blk) {
    block_union(first, end, blk * kMR, std::min<int64_t>(kMR, m - blk * kMR), &lo[blk], &hi[blk]);
  }
  gemm_loops<T>(m, n, k, A, a_row, a_col, BLayout<T>{B, ldb, Vectorized<T>::size()}, C, ldc, true,
                [&](int64_t blk, int64_t*, int64_t*, int64_t* p0, int64_t* p1) {
                  *p0 = std::max(*p0, lo[blk]);
                  *p1 = std::min(*p1, hi[blk]);
                });
}

// ------------------------------------------------------------ row ops --

template <typename T>
T hsum(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& x, Vectorized<T>& y) { return x + y; }, v);
}

template <typename T>
T hmax(const Vectorized<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vectorized<T>& x, Vectorized<T>& y) { return at::vec::maximum(x, y); }, v);
}

// f(c, count, x) over row[first:end) in vectors (the last one partial: count
// lanes valid, the others undefined and never stored by the callers).
template <typename T, typename F>
void for_each_vector(int64_t first, int64_t end, F&& f) {
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t c = first; c < end; c += W) f(c, std::min(W, end - c));
}

template <typename T>
Vectorized<T> load_n(const T* p, int64_t count) {
  return count == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, count);
}

template <typename T>
Vectorized<T> lanes_below(int64_t count) {
  return Vectorized<T>::arange(T(0), T(1)) < Vectorized<T>(static_cast<T>(count));
}

// ------------------------------------------------------ few-row products --

// Dot products of rows of A with keys as rows: one vector accumulator per
// (row, key), the keys of a run are independent, so consecutive keys overlap
// in the pipeline. Rows go in groups of kRowGroup over the columns all of them
// see, so that each key is read from memory once per group, not once per row:
// decoding is bound by reading the keys (a GQA group's query rows share them;
// in a paged cache one head's keys are Hk * D apart, where the hardware
// prefetcher helps least). The columns outside the group's common range go
// row by row.
constexpr int64_t kRowGroup = 4;

template <typename T>
void dot_row(const T* q, int64_t k, const T* K, int64_t ldk, T mul, T* s, int64_t c0, int64_t c1) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t c = c0; c < c1; ++c) {
    const T* key = K + c * ldk;
    V acc0(T(0)), acc1(T(0));
    int64_t d = 0;
    for (; d + 2 * W <= k; d += 2 * W) {
      acc0 = at::vec::fmadd(V::loadu(q + d), V::loadu(key + d), acc0);
      acc1 = at::vec::fmadd(V::loadu(q + d + W), V::loadu(key + d + W), acc1);
    }
    for (; d < k; d += W) {  // loadu(p, count) zero-fills the missing lanes
      const int64_t n = std::min(W, k - d);
      acc0 = at::vec::fmadd(load_n(q + d, n), load_n(key + d, n), acc0);
    }
    s[c] = mul * hsum(acc0 + acc1);
  }
}

template <typename T>
void dot_group(const T* A, int64_t lda, int64_t k, const T* K, int64_t ldk, T mul, T* S, int64_t ld_s, int64_t c0,
               int64_t c1) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  constexpr int64_t G = kRowGroup;
  for (int64_t c = c0; c < c1; ++c) {
    const T* key = K + c * ldk;
    V acc[G];
    for (int64_t g = 0; g < G; ++g) acc[g] = V(T(0));
    for (int64_t d = 0; d < k; d += W) {
      const int64_t n = std::min(W, k - d);
      const V kv = load_n(key + d, n);
      for (int64_t g = 0; g < G; ++g) acc[g] = at::vec::fmadd(load_n(A + g * lda + d, n), kv, acc[g]);
    }
    for (int64_t g = 0; g < G; ++g) S[g * ld_s + c] = mul * hsum(acc[g]);
  }
}

// Runs row_part(a, c0, c1) and group_part(a, c0, c1) so that every row a covers
// its columns [first[a], end[a]) once: groups of kRowGroup rows share the
// columns common to all of them.
template <typename RowPart, typename GroupPart>
void by_row_groups(int64_t m, const int64_t* first, const int64_t* end, RowPart&& row_part, GroupPart&& group_part) {
  int64_t a = 0;
  for (; a + kRowGroup <= m; a += kRowGroup) {
    int64_t cf = first[a], ce = end[a];
    for (int64_t g = 1; g < kRowGroup; ++g) {
      cf = std::max(cf, first[a + g]);
      ce = std::min(ce, end[a + g]);
    }
    if (cf >= ce) {
      for (int64_t g = 0; g < kRowGroup; ++g) row_part(a + g, first[a + g], end[a + g]);
      continue;
    }
    group_part(a, cf, ce);
    for (int64_t g = 0; g < kRowGroup; ++g) {
      row_part(a + g, first[a + g], cf);
      row_part(a + g, ce, end[a + g]);
    }
  }
  for (; a < m; ++a) row_part(a, first[a], end[a]);
}

template <typename T>
void rows_dot(int64_t m, int64_t k, const T* A, int64_t lda, const T* K, int64_t ldk, T mul, T* S, int64_t ld_s,
              const int64_t* first, const int64_t* end) {
  by_row_groups(
      m, first, end,
      [&](int64_t a, int64_t c0, int64_t c1) { dot_row(A + a * lda, k, K, ldk, mul, S + a * ld_s, c0, c1); },
      [&](int64_t a, int64_t c0, int64_t c1) { dot_group(A + a * lda, lda, k, K, ldk, mul, S + a * ld_s, ld_s, c0, c1); });
}

// C[a][0:n] += S[a][c] * B[c][0:n] over c in [c0, c1) for the rows [0, R) of S
// and C (R = 1 or kRowGroup): kNV vectors of each output row stay in registers
// while the keys' value rows stream by, each read once for the R rows.
template <typename T, int64_t R>
void axpy_rows(const T* S, int64_t ld_s, int64_t n, const T* B, int64_t ldb, T* C, int64_t ldc, int64_t c0,
               int64_t c1) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  if (c0 >= c1) return;
  for (int64_t n0 = 0; n0 < n; n0 += kNV * W) {
    V acc[R][kNV];
    int64_t cnt[kNV];
    for (int v = 0; v < kNV; ++v) cnt[v] = std::max<int64_t>(0, std::min(W, n - n0 - v * W));
    for (int64_t r = 0; r < R; ++r) {
      for (int v = 0; v < kNV; ++v) acc[r][v] = cnt[v] > 0 ? load_n(C + r * ldc + n0 + v * W, cnt[v]) : V(T(0));
    }
    for (int64_t c = c0; c < c1; ++c) {
      const T* row = B + c * ldb + n0;
      for (int v = 0; v < kNV; ++v) {
        if (cnt[v] == 0) continue;
        const V x = load_n(row + v * W, cnt[v]);
        for (int64_t r = 0; r < R; ++r) acc[r][v] = at::vec::fmadd(V(S[r * ld_s + c]), x, acc[r][v]);
      }
    }
    for (int64_t r = 0; r < R; ++r) {
      for (int v = 0; v < kNV; ++v) {
        if (cnt[v] > 0) acc[r][v].store(C + r * ldc + n0 + v * W, cnt[v]);
      }
    }
  }
}

template <typename T>
void rows_axpy(int64_t m, int64_t n, const T* S, int64_t ld_s, const T* B, int64_t ldb, T* C, int64_t ldc,
               const int64_t* first, const int64_t* end) {
  by_row_groups(
      m, first, end,
      [&](int64_t a, int64_t c0, int64_t c1) { axpy_rows<T, 1>(S + a * ld_s, ld_s, n, B, ldb, C + a * ldc, ldc, c0, c1); },
      [&](int64_t a, int64_t c0, int64_t c1) {
        axpy_rows<T, kRowGroup>(S + a * ld_s, ld_s, n, B, ldb, C + a * ldc, ldc, c0, c1);
      });
}

template <typename T>
void fill_value(T* p, int64_t n, T value) {
  constexpr int64_t W = Vectorized<T>::size();
  const Vectorized<T> z(value);
  int64_t c = 0;
  for (; c + W <= n; c += W) z.store(p + c);
  if (c < n) z.store(p + c, n - c);
}

template <typename T>
void fill_zero(T* p, int64_t n) {
  fill_value(p, n, T(0));
}

// Zero row[lo:first) and row[end:hi) (the parts of a register block's union outside this row's run).
template <typename T>
void zero_outside(T* row, int64_t lo, int64_t hi, int64_t first, int64_t end) {
  if (first >= end) {
    if (lo < hi) fill_zero(row + lo, hi - lo);
    return;
  }
  if (lo < first) fill_zero(row + lo, first - lo);
  if (end < hi) fill_zero(row + end, hi - end);
}

template <typename T>
void softmax_rows(T* S, int64_t ld, int64_t m, const int64_t* first, const int64_t* end, T* row_max, T* row_sum,
                  T* alpha) {
  using V = Vectorized<T>;
  constexpr int64_t W = V::size();
  const T neg_inf = -std::numeric_limits<T>::infinity();
  TORCH_CHECK(m <= kMaxRows, "softmax_rows: too many rows");
  T tile_sum[kMaxRows];
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    int64_t ulo, uhi;
    block_union(first, end, m0, std::min<int64_t>(kMR, m - m0), &ulo, &uhi);
    for (int64_t a = m0; a < std::min(m, m0 + kMR); ++a) {
      T* s = S + a * ld;
      const int64_t f = first[a], e = end[a];
      zero_outside(s, ulo, uhi, f, e);
      // alpha holds max_new - max_old until the vector exp below.
      alpha[a] = T(0);
      tile_sum[a] = T(0);
      if (f >= e) continue;
      // Row max: two independent chains, the last partial vector padded with -inf.
      V mx0(neg_inf), mx1(neg_inf);
      int64_t c = f;
      for (; c + 2 * W <= e; c += 2 * W) {
        mx0 = at::vec::maximum(mx0, V::loadu(s + c));
        mx1 = at::vec::maximum(mx1, V::loadu(s + c + W));
      }
      for (; c < e; c += W) {
        const int64_t n = std::min(W, e - c);
        const V x = n == W ? V::loadu(s + c) : V::blendv(V(neg_inf), V::loadu(s + c, n), lanes_below<T>(n));
        mx0 = at::vec::maximum(mx0, x);
      }
      const T m_old = row_max[a];
      const T tile_max = hmax(at::vec::maximum(mx0, mx1));  // NaN if any score is NaN
      const T m_new = std::isnan(tile_max) ? tile_max : std::max(m_old, tile_max);
      if (std::isnan(m_new)) {
        // A NaN score (from a NaN in q, k, the scale or the slope) makes the
        // row NaN, as the dense softmax does; the fast exp below would turn
        // it into a finite number. NaN stays in row_max and row_sum.
        fill_value(s + f, e - f, m_new);
        alpha[a] = m_new;
        tile_sum[a] = m_new;
        row_max[a] = m_new;
        continue;
      }
      if (m_new == neg_inf) {  // nothing allowed yet (all scores -inf)
        fill_zero(s + f, e - f);
        continue;
      }
      // p = exp(s - max), summed in two chains; the last partial vector masked.
      V sum0(T(0)), sum1(T(0));
      c = f;
      for (; c + 2 * W <= e; c += 2 * W) {
        const V p0 = vexp_shifted(V::loadu(s + c), m_new);
        const V p1 = vexp_shifted(V::loadu(s + c + W), m_new);
        p0.store(s + c);
        p1.store(s + c + W);
        sum0 = sum0 + p0;
        sum1 = sum1 + p1;
      }
      for (; c < e; c += W) {
        const int64_t n = std::min(W, e - c);
        const V p = vexp_shifted(load_n(s + c, n), m_new);
        p.store(s + c, n);
        sum0 = sum0 + (n == W ? p : V::blendv(V(T(0)), p, lanes_below<T>(n)));
      }
      alpha[a] = m_old - m_new;  // -inf for the first keys of a row: alpha = 0
      row_max[a] = m_new;
      tile_sum[a] = hsum(sum0 + sum1);
    }
  }
  // alpha = exp(max_old - max_new) and the running sums, a vector of rows at a time.
  for (int64_t a = 0; a < m; a += W) {
    const int64_t n = std::min(W, m - a);
    const V al = vexp_shifted(V::loadu(alpha + a, n), T(0));
    al.store(alpha + a, n);
    at::vec::fmadd(V::loadu(row_sum + a, n), al, V::loadu(tile_sum + a, n)).store(row_sum + a, n);
  }
}

template <typename T>
void sigmoid_rows(T* S, int64_t ld, int64_t m, const int64_t* first, const int64_t* end, T bias) {
  using V = Vectorized<T>;
  const V b(bias);
  for (int64_t m0 = 0; m0 < m; m0 += kMR) {
    int64_t ulo, uhi;
    block_union(first, end, m0, std::min<int64_t>(kMR, m - m0), &ulo, &uhi);
    for (int64_t a = m0; a < std::min(m, m0 + kMR); ++a) {
      T* s = S + a * ld;
      zero_outside(s, ulo, uhi, first[a], end[a]);
      for_each_vector<T>(first[a], end[a],
                         [&](int64_t c, int64_t n) { vsigmoid<T>(load_n(s + c, n) + b).store(s + c, n); });
    }
  }
}

template <typename T>
void softmax_grad_rows(T* S, T* G, const T* factor, int64_t ld, int64_t m, int64_t n, const int64_t* first,
                       const int64_t* end, const T* lse, const T* rowdot) {
  using V = Vectorized<T>;
  for (int64_t a = 0; a < m; ++a) {
    T* s = S + a * ld;
    T* g = G + a * ld;
    const T* fa = factor ? factor + a * ld : nullptr;
    // An empty row (lse = -inf) passes no gradient.
    const bool empty_row = lse[a] == -std::numeric_limits<T>::infinity();
    const int64_t f = empty_row ? n : first[a], e = empty_row ? n : end[a];
    zero_outside(s, 0, n, f, e);
    zero_outside(g, 0, n, f, e);
    if (std::isnan(lse[a])) {  // a NaN row (see softmax_rows) passes NaN to every key it sees
      fill_value(s + f, e - f, lse[a]);
      fill_value(g + f, e - f, lse[a]);
      continue;
    }
    const V dot(rowdot[a]);
    const T l = lse[a];
    for_each_vector<T>(f, e, [&](int64_t c, int64_t cnt) {
      const V p = vexp_shifted(load_n(s + c, cnt), l);
      V ds = softmax_score_grad<V>(p, load_n(g + c, cnt), dot);
      if (fa) ds = ds * load_n(fa + c, cnt);
      p.store(s + c, cnt);
      ds.store(g + c, cnt);
    });
  }
}

template <typename T>
void sigmoid_grad_rows(T* S, T* G, const T* factor, int64_t ld, int64_t m, int64_t n, const int64_t* first,
                       const int64_t* end, T bias) {
  using V = Vectorized<T>;
  const V b(bias);
  for (int64_t a = 0; a < m; ++a) {
    T* s = S + a * ld;
    T* g = G + a * ld;
    const T* fa = factor ? factor + a * ld : nullptr;
    zero_outside(s, 0, n, first[a], end[a]);
    zero_outside(g, 0, n, first[a], end[a]);
    for_each_vector<T>(first[a], end[a], [&](int64_t c, int64_t cnt) {
      const V sig = vsigmoid<T>(load_n(s + c, cnt) + b);
      V ds = sigmoid_score_grad<V>(sig, load_n(g + c, cnt));
      if (fa) ds = ds * load_n(fa + c, cnt);
      sig.store(s + c, cnt);
      ds.store(g + c, cnt);
    });
  }
}

template <typename T>
void transpose(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n) {
  at::vec::transpose_mxn<T>(src, ld_src, dst, ld_dst, static_cast<int>(m), static_cast<int>(n));
}

// Only Vectorized members here, no scalar c10 conversions: an inline function
// compiled with this file's -m flags must not be the copy the linker keeps.
template <typename H>
void to_float(const H* src, int64_t n, float mul, float* dst) {
  using VH = Vectorized<H>;
  using VF = Vectorized<float>;
  const VF m(mul);
  for (int64_t i = 0; i < n; i += VH::size()) {
    const int64_t cnt = std::min<int64_t>(VH::size(), n - i);
    auto [lo, hi] = at::vec::convert_to_float<H>(cnt == VH::size() ? VH::loadu(src + i) : VH::loadu(src + i, cnt));
    (lo * m).store(dst + i, std::min<int64_t>(cnt, VF::size()));
    if (cnt > VF::size()) (hi * m).store(dst + i + VF::size(), cnt - VF::size());
  }
}

template <typename H>
void from_float(const float* src, int64_t n, float mul, H* dst) {
  using VH = Vectorized<H>;
  using VF = Vectorized<float>;
  const VF m(mul);
  for (int64_t i = 0; i < n; i += VH::size()) {
    const int64_t cnt = std::min<int64_t>(VH::size(), n - i);
    const VF lo = VF::loadu(src + i, std::min<int64_t>(cnt, VF::size())) * m;
    const VF hi = cnt > VF::size() ? VF::loadu(src + i + VF::size(), cnt - VF::size()) * m : VF(0.f);
    at::vec::convert_from_float<H>(lo, hi).store(dst + i, cnt);
  }
}

template <typename T>
void set_conversions(TileOps<T>&) {}

template <>
void set_conversions<float>(TileOps<float>& ops) {
  ops.bf16_to_float = &to_float<c10::BFloat16>;
  ops.half_to_float = &to_float<c10::Half>;
  ops.float_to_bf16 = &from_float<c10::BFloat16>;
  ops.float_to_half = &from_float<c10::Half>;
}

template <typename T>
TileOps<T> make_ops() {
  TileOps<T> ops;
  ops.isa = LR_ISA_NAME;
  ops.vec_width = Vectorized<T>::size();
  ops.gemm = &gemm<T>;
  ops.gemm_band_n = &gemm_band_n<T>;
  ops.gemm_band_k = &gemm_band_k<T>;
  ops.rows_dot = &rows_dot<T>;
  ops.rows_axpy = &rows_axpy<T>;
  ops.softmax_rows = &softmax_rows<T>;
  ops.sigmoid_rows = &sigmoid_rows<T>;
  ops.softmax_grad_rows = &softmax_grad_rows<T>;
  ops.sigmoid_grad_rows = &sigmoid_grad_rows<T>;
  ops.transpose = &transpose<T>;
  ops.bf16_to_float = nullptr;
  ops.half_to_float = nullptr;
  ops.float_to_bf16 = nullptr;
  ops.float_to_half = nullptr;
  set_conversions<T>(ops);
  return ops;
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
