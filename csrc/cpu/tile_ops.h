// The vectorised building blocks of the CPU attention tiles, one table per
// instruction set. csrc/cpu/isa/tile_ops_{default,avx2,avx512}.cpp compile the
// same source (tile_ops_impl.h) with different -m flags; tile_ops<T>() picks
// the best one this CPU runs, at run time, following ATen's own choice
// (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2 forces a
// slower path for testing). The library therefore builds with flags that work
// on any x86-64 and still uses AVX-512 where it exists.
//
// Score tiles are row-major, S[row][key] with leading dimension ld. Each row a
// of a tile has one contiguous run of allowed keys [first[a], end[a]) (the
// window band is monotone; see finalize_tile in tile_runs.h); the
// "banded" products and the row operations only touch what those runs need,
// so the masked triangles at the band's edges cost (almost) nothing.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace longreach::cpu {

template <typename T>
struct TileOps {
  const char* isa;
  int64_t vec_width;  // T lanes per vector register

  // C[m][n] (=, or += when accumulate) A[m][k] @ B[k][n]. A is read through
  // strides (element (i, p) at A[i * a_row + p * a_col]), so transposed
  // operands need no copy; B and C are row-major with leading dims ldb, ldc.
  void (*gemm)(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate);

  // C = A @ B computed only where row a needs it: columns [first[a], end[a]),
  // widened to whole vectors and to the union over the rows of one register
  // block. C may be written up to round_up(n, vec_width) columns and B read as
  // far; other entries of C are left untouched. B is panel-major: column c of
  // row p at B[(c / vec_width) * (k + 1) * vec_width + p * vec_width + c % vec_width]
  // (each vector of columns a contiguous k x vec_width block, plus one vector
  // of padding so that the blocks are not a multiple of 4 KiB apart).
  void (*gemm_band_n)(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
                      T* C, int64_t ldc, const int64_t* first, const int64_t* end);

  // C += A @ B where row a of A is non-zero only in columns [first[a], end[a])
  // (A's other entries in the union of its register block must be zero).
  // Banded products and row operations take at most 4096 rows.
  void (*gemm_band_k)(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
                      int64_t ldb, T* C, int64_t ldc, const int64_t* first, const int64_t* end);

  // Products for blocks of a handful of rows (decoding: one query row against
  // a cache), where packing the keys would cost as much as using them. Keys
  // are read as rows, in place.
  // S[a][c] = mul * (A[a] . K[c]) (dot products of length k) for c in
  // [first[a], end[a]); other entries of S are left untouched.
  void (*rows_dot)(int64_t m, int64_t k, const T* A, int64_t lda, const T* K, int64_t ldk, T mul, T* S,
                   int64_t ld_s, const int64_t* first, const int64_t* end);
  // C[a][0:n] += sum over c in [first[a], end[a]) of S[a][c] * B[c][0:n].
  void (*rows_axpy)(int64_t m, int64_t n, const T* S, int64_t ld_s, const T* B, int64_t ldb, T* C, int64_t ldc,
                    const int64_t* first, const int64_t* end);

  // Forward, online softmax over one tile: for each row, the running max and
  // sum are updated from S[a][first:end], which becomes exp(s - max); alpha[a]
  // is the factor by which the row's earlier output must be rescaled. Within
  // the union of first..end of the row's register block, entries outside the
  // row's own run are set to 0, as gemm_band_k requires.
  void (*softmax_rows)(T* S, int64_t ld, int64_t m, const int64_t* first, const int64_t* end, T* row_max,
                       T* row_sum, T* alpha);
  // Forward, sigmoid: S[a][first:end] = sigmoid(s + bias), zeros as above.
  void (*sigmoid_rows)(T* S, int64_t ld, int64_t m, const int64_t* first, const int64_t* end, T bias);

  // Backward of one tile of n keys. On entry S holds final scores and G holds
  // dP = dO . v in the rows' runs; on exit S holds the probabilities P and G the
  // score gradient dS (times factor[a][c] when factor is not null: the soft-cap
  // chain rule), both zero in [0, n) outside the runs. Softmax uses the rows'
  // lse (-inf: empty row) and rowdot = dO . O; sigmoid uses bias.
  void (*softmax_grad_rows)(T* S, T* G, const T* factor, int64_t ld, int64_t m, int64_t n, const int64_t* first,
                            const int64_t* end, const T* lse, const T* rowdot);
  void (*sigmoid_grad_rows)(T* S, T* G, const T* factor, int64_t ld, int64_t m, int64_t n, const int64_t* first,
                            const int64_t* end, T bias);

  // dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n (m, n <= vec_width).
  void (*transpose)(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t m, int64_t n);

  // dst[i] = mul * src[i] across types (float tables only; null in double
  // tables): 16-bit inputs to float, and float results back with
  // round-to-nearest-even, as c10's scalar conversions do.
  void (*bf16_to_float)(const c10::BFloat16* src, int64_t n, float mul, float* dst);
  void (*half_to_float)(const c10::Half* src, int64_t n, float mul, float* dst);
  void (*float_to_bf16)(const float* src, int64_t n, float mul, c10::BFloat16* dst);
  void (*float_to_half)(const float* src, int64_t n, float mul, c10::Half* dst);
};

template <typename T>
const TileOps<T>& tile_ops();

// The tables each instruction-set file defines (namespace = ATen's CPU_CAPABILITY name).
namespace DEFAULT {
const TileOps<float>& float_ops();
const TileOps<double>& double_ops();
}  // namespace DEFAULT
namespace AVX2 {
const TileOps<float>& float_ops();
const TileOps<double>& double_ops();
}  // namespace AVX2
namespace AVX512 {
const TileOps<float>& float_ops();
const TileOps<double>& double_ops();
}  // namespace AVX512

}  // namespace longreach::cpu
