// The vectorised building blocks of the CPU attention tiles, one table per
// instruction set. csrc/cpu/isa/tile_ops_{default,avx2,avx512}.cpp compile the
// same source (tile_ops_impl.h) with different -m flags; tile_ops<T>() picks
// the best one this CPU runs, at run time, following ATen's own choice
// (at::get_cpu_capability(), so ATEN_CPU_CAPABILITY=default|avx2 forces a
// slower path for testing). The library therefore builds with flags that work
// on any x86-64 and still uses AVX-512 where it exists.
//
// Layout convention of the score tiles: a tile is stored *transposed*,
// S^T[key][row] with leading dimension ld, because then every per-row
// statistic of softmax (max, sum, lse, rowdot) is a vector across a key row and
// no horizontal reductions are needed.
#pragma once

#include <cstdint>

namespace longreach::cpu {

template <typename T>
struct TileOps {
  const char* isa;
  // Number of T lanes in one vector register; callers pad the row dimension of
  // score tiles to a multiple of it.
  int64_t vec_width;

  // C[m][n] (=, or += when accumulate) A[m][k] @ B[k][n]. A is read through
  // strides (element (i, p) at A[i * a_row + p * a_col]) so transposed operands
  // need no copy; B and C are row-major with leading dims ldb, ldc.
  void (*gemm)(int64_t m, int64_t n, int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* B,
               int64_t ldb, T* C, int64_t ldc, bool accumulate);

  // Online softmax over one S^T tile (nk keys x ncols rows): updates the running
  // row max and sum, writes exp(s - max) into S and the factor alpha by which
  // the rows' earlier accumulators must be rescaled. Fully masked rows (-inf)
  // keep max = -inf and get probabilities 0.
  void (*softmax_tile)(T* S, int64_t ld, int64_t nk, int64_t ncols, T* row_max, T* row_sum, T* alpha);

  // S = sigmoid(S + bias) in place (-inf becomes 0).
  void (*sigmoid_tile)(T* S, int64_t ld, int64_t nk, int64_t ncols, T bias);

  // Backward of one tile. On entry S holds final scores (-inf where masked) and
  // G holds dP = dO . v; on exit S holds the probabilities P and G the score
  // gradient dS (times factor[c][a] when factor is not null: the soft-cap chain
  // rule). Softmax uses the rows' lse and rowdot = dO . O; sigmoid uses bias.
  void (*softmax_grad_tile)(T* S, T* G, const T* factor, int64_t ld, int64_t nk, int64_t ncols, const T* lse,
                            const T* rowdot);
  void (*sigmoid_grad_tile)(T* S, T* G, const T* factor, int64_t ld, int64_t nk, int64_t ncols, T bias);
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
