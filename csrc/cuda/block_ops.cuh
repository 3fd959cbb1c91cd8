// Block-cooperative building blocks of the attention kernels: the thread
// layout, barriers, tile loads into shared memory and the three tile products.
//
// Every piece of work is spread over the block with `for (e = tid; e < n; e +=
// nthreads)` loops, and every product writes its whole output before the
// caller's barrier, so the result never depends on the thread count. That is
// what lets the same kernel bodies run on the host with one "thread" per block
// (tests/emulation/), where block_sync() is a no-op: the tile schedule, masks,
// online softmax and backward are tested on a machine without a GPU.
//
// The products run on tensor cores (WMMA m16n16k16, float32 accumulation) for
// float16 / bfloat16 on sm80+, and as plain loops otherwise (float32, and the
// host emulation). Tiles live in shared memory, row-major, with leading
// dimensions that are multiples of 16 elements and 32-byte aligned bases, as
// WMMA requires.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../common/host_device.h"
#include "../common/scores.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define LR_WMMA_AVAILABLE 1
#else
#define LR_WMMA_AVAILABLE 0
#endif

namespace longreach::cuda_kernels {

// The block's thread layout; one thread, one warp of one lane on the host.
struct BlockCtx {
  int tid;
  int nthreads;
  int warp;
  int nwarps;
  int lane;
  int warp_size;
};

// The threaded host emulation (tests/emulation/threaded/) runs every CUDA
// thread of a block as a std::thread and defines these three functions: the
// calling thread's layout, a block-wide barrier, and a warp shuffle through
// scratch memory (which also orders the warp's accesses, as a shuffle does).
#if !defined(__CUDA_ARCH__) && defined(LONGREACH_THREADED_EMULATION)
#define LR_THREADED_EMULATION 1
namespace threaded_emulation {
BlockCtx block_ctx();
void block_sync();
float shfl_xor(float x, int lane_mask);
}  // namespace threaded_emulation
#else
#define LR_THREADED_EMULATION 0
#endif

LR_HOST_DEVICE BlockCtx block_ctx() {
#if defined(__CUDA_ARCH__)
  return {static_cast<int>(threadIdx.x), static_cast<int>(blockDim.x), static_cast<int>(threadIdx.x / 32),
          static_cast<int>(blockDim.x / 32), static_cast<int>(threadIdx.x % 32), 32};
#elif LR_THREADED_EMULATION
  return threaded_emulation::block_ctx();
#else
  return {0, 1, 0, 1, 0, 1};
#endif
}

// x of lane (lane ^ lane_mask) of the calling warp.
template <typename U>
LR_HOST_DEVICE U warp_shfl_xor(U x, int lane_mask) {
#if defined(__CUDA_ARCH__)
  return __shfl_xor_sync(0xffffffffu, x, lane_mask);
#elif LR_THREADED_EMULATION
  return threaded_emulation::shfl_xor(x, lane_mask);
#else
  (void)lane_mask;  // one lane: never called
  return x;
#endif
}

// Lanes per warp: 32 on the device, the emulation's own count on the host.
LR_HOST_DEVICE int warp_lanes() {
#if defined(__CUDA_ARCH__)
  return 32;
#else
  return block_ctx().warp_size;
#endif
}

// Max / sum over the lanes of a warp, in a fixed (butterfly) order; every lane
// gets the result. The identity when a warp has one lane (the host emulation).
template <typename U>
LR_HOST_DEVICE U warp_max(U x) {
  for (int s = warp_lanes() / 2; s > 0; s /= 2) x = nan_propagating_max(x, warp_shfl_xor(x, s));
  return x;
}

template <typename U>
LR_HOST_DEVICE U warp_sum(U x) {
  for (int s = warp_lanes() / 2; s > 0; s /= 2) x += warp_shfl_xor(x, s);
  return x;
}

LR_HOST_DEVICE void block_sync() {
#if defined(__CUDA_ARCH__)
  __syncthreads();
#elif LR_THREADED_EMULATION
  threaded_emulation::block_sync();
#endif
}

template <typename T>
struct TensorCoreType {
  static constexpr bool value = std::is_same<T, c10::Half>::value || std::is_same<T, c10::BFloat16>::value;
};

// Carves the dynamic shared memory into 128-byte aligned arrays.
struct SmemCarver {
  char* ptr;
  template <typename U>
  LR_HOST_DEVICE U* take(int64_t count) {
    U* out = reinterpret_cast<U*>(ptr);
    ptr += (count * static_cast<int64_t>(sizeof(U)) + 127) / 128 * 128;
    return out;
  }
};

// Bytes SmemCarver::take<U>(count) consumes (for the host's size computation).
template <typename U>
constexpr int64_t smem_bytes(int64_t count) {
  return (count * static_cast<int64_t>(sizeof(U)) + 127) / 128 * 128;
}

// Host emulation only: a precondition of the device code that the device
// would not report (a misaligned vector or WMMA access) stops the emulation.
inline void host_check(bool ok, const char* what) {
  if (!ok) throw std::logic_error(std::string("CUDA kernel precondition violated: ") + what);
}

inline bool aligned_to(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// 16 bytes from src (zeros when src is null) to dst, as one vector load and
// store; both addresses must be 16-byte aligned. The host checks that and
// copies with memcpy, so the emulation runs this path under the sanitizers.
template <typename T>
LR_HOST_DEVICE void copy_16_bytes(T* dst, const T* src) {
#if defined(__CUDA_ARCH__)
  uint4 val = make_uint4(0, 0, 0, 0);
  if (src != nullptr) val = *reinterpret_cast<const uint4*>(src);
  *reinterpret_cast<uint4*>(dst) = val;
#else
  host_check(aligned_to(dst, 16) && (src == nullptr || aligned_to(src, 16)), "16-byte access to a misaligned address");
  if (src != nullptr) {
    std::memcpy(dst, src, 16);
  } else {
    std::memset(dst, 0, 16);
  }
#endif
}

// dst[r][c] = row idx[r] of a (L, D) head slice at column c, zero for c >= D
// or idx[r] < 0; c < Dp. With `vec`, rows are read 16 bytes at a time (the
// caller checked D, the strides and the base for 16-byte alignment).
template <typename T>
LR_HOST_DEVICE void load_rows(T* dst, int ld, const T* base, int64_t stride_l, const int64_t* idx, int nrows,
                              int D, int Dp, bool vec) {
  const BlockCtx b = block_ctx();
  if (vec) {
    constexpr int V = 16 / sizeof(T);
#if !defined(__CUDA_ARCH__)
    host_check(D % V == 0 && Dp % V == 0 && ld % V == 0, "16-byte row loads need D, Dp and ld in whole 16-byte chunks");
#endif
    const int chunks = Dp / V;
    for (int e = b.tid; e < nrows * chunks; e += b.nthreads) {
      const int r = e / chunks, c = (e % chunks) * V;
      copy_16_bytes(dst + r * ld + c, idx[r] >= 0 && c < D ? base + idx[r] * stride_l + c : nullptr);
    }
    return;
  }
  for (int e = b.tid; e < nrows * Dp; e += b.nthreads) {
    const int r = e / Dp, c = e % Dp;
    dst[r * ld + c] = (idx[r] >= 0 && c < D) ? base[idx[r] * stride_l + c] : T(0.0f);
  }
}

template <typename U>
LR_HOST_DEVICE void fill(U* dst, int n, U value) {
  const BlockCtx b = block_ctx();
  for (int e = b.tid; e < n; e += b.nthreads) dst[e] = value;
}

#if LR_WMMA_AVAILABLE
template <typename T>
struct WmmaElement;
template <>
struct WmmaElement<c10::Half> {
  using type = __half;
};
template <>
struct WmmaElement<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// The three products on tensor cores: each warp owns whole 16x16 output tiles.
template <typename T, typename acc_t>
__device__ void wmma_abt(acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
  namespace w = nvcuda::wmma;
  using E = typename WmmaElement<T>::type;
  const BlockCtx b = block_ctx();
  const int tn_count = N / 16;
  for (int tile = b.warp; tile < (M / 16) * tn_count; tile += b.nwarps) {
    const int tm = tile / tn_count, tn = tile % tn_count;
    w::fragment<w::accumulator, 16, 16, 16, float> c;
    w::fill_fragment(c, 0.0f);
    for (int k = 0; k < K; k += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, E, w::row_major> a;
      w::fragment<w::matrix_b, 16, 16, 16, E, w::col_major> bt;  // B is (N, K) row-major = (K, N) col-major
      w::load_matrix_sync(a, reinterpret_cast<const E*>(A + tm * 16 * lda + k), lda);
      w::load_matrix_sync(bt, reinterpret_cast<const E*>(B + tn * 16 * ldb + k), ldb);
      w::mma_sync(c, a, bt, c);
    }
    w::store_matrix_sync(C + tm * 16 * ldc + tn * 16, c, ldc, w::mem_row_major);
  }
}

template <typename T, typename acc_t, bool kTransposeA>
__device__ void wmma_ab_acc(acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
  namespace w = nvcuda::wmma;
  using E = typename WmmaElement<T>::type;
  using LayoutA = typename std::conditional<kTransposeA, w::col_major, w::row_major>::type;
  const BlockCtx b = block_ctx();
  const int tn_count = N / 16;
  for (int tile = b.warp; tile < (M / 16) * tn_count; tile += b.nwarps) {
    const int tm = tile / tn_count, tn = tile % tn_count;
    w::fragment<w::accumulator, 16, 16, 16, float> c;
    w::load_matrix_sync(c, C + tm * 16 * ldc + tn * 16, ldc, w::mem_row_major);
    for (int k = 0; k < K; k += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, E, LayoutA> a;
      w::fragment<w::matrix_b, 16, 16, 16, E, w::row_major> bb;
      // A^T of a (K, M) row-major A is (M, K) col-major with the same leading dimension.
      const T* a_ptr = kTransposeA ? A + k * lda + tm * 16 : A + tm * 16 * lda + k;
      w::load_matrix_sync(a, reinterpret_cast<const E*>(a_ptr), lda);
      w::load_matrix_sync(bb, reinterpret_cast<const E*>(B + k * ldb + tn * 16), ldb);
      w::mma_sync(c, a, bb, c);
    }
    w::store_matrix_sync(C + tm * 16 * ldc + tn * 16, c, ldc, w::mem_row_major);
  }
}
#endif  // LR_WMMA_AVAILABLE

// Host emulation: the preconditions of the WMMA path for its operands, which
// the host's plain loops would not need. Every m16n16k16 tile of A, B and C
// the WMMA loops above load or store must start 32 bytes aligned, the leading
// dimensions must be whole 16-byte rows, and M, N, K whole fragments. The
// kind names the product: A is (M, K) row-major, or (K, M) for A^T B; B is
// (N, K) for A B^T, else (K, N).
enum class WmmaOperands { kABt, kAB, kAtB };

template <typename T, typename acc_t>
void check_wmma_operands(WmmaOperands kind, const acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M,
                         int N, int K) {
  if constexpr (!(TensorCoreType<T>::value && std::is_same<acc_t, float>::value)) {
    return;  // these types take the loops on the device too
  } else {
    host_check(M % 16 == 0 && N % 16 == 0 && K % 16 == 0, "WMMA tile product with M, N or K not a multiple of 16");
    host_check(lda % (16 / sizeof(T)) == 0 && ldb % (16 / sizeof(T)) == 0 && ldc % (16 / sizeof(acc_t)) == 0,
               "WMMA leading dimension not a multiple of 16 bytes");
    for (int tm = 0; tm < M / 16; ++tm) {
      for (int tn = 0; tn < N / 16; ++tn) {
        host_check(aligned_to(C + tm * 16 * ldc + tn * 16, 32), "WMMA accumulator tile not 32-byte aligned");
      }
    }
    for (int k = 0; k < K; k += 16) {
      for (int tm = 0; tm < M / 16; ++tm) {
        const T* a = kind == WmmaOperands::kAtB ? A + k * lda + tm * 16 : A + tm * 16 * lda + k;
        host_check(aligned_to(a, 32), "WMMA A tile not 32-byte aligned");
      }
      for (int tn = 0; tn < N / 16; ++tn) {
        const T* b = kind == WmmaOperands::kABt ? B + tn * 16 * ldb + k : B + k * ldb + tn * 16;
        host_check(aligned_to(b, 32), "WMMA B tile not 32-byte aligned");
      }
    }
  }
}

// Calls f(m, n) for the output elements of an M x N tile product this thread
// computes. The plain loops spread elements over the block's threads. WMMA
// gives each warp whole 16x16 tiles instead, so on the host the tensor-core
// types follow that ownership (warp w: tiles w, w + nwarps, ...; its lanes
// split each tile): the threaded emulation then sees every race the device's
// tile ownership would cause, with the same values (each element's sum runs
// in one fixed order either way).
template <typename T, typename acc_t, typename F>
LR_HOST_DEVICE void for_each_product_element(int M, int N, F&& f) {
  const BlockCtx b = block_ctx();
#if !defined(__CUDA_ARCH__)
  if constexpr (TensorCoreType<T>::value && std::is_same<acc_t, float>::value) {
    const int tn_count = N / 16;
    for (int tile = b.warp; tile < (M / 16) * tn_count; tile += b.nwarps) {
      const int tm = tile / tn_count, tn = tile % tn_count;
      for (int i = b.lane; i < 16 * 16; i += b.warp_size) f(tm * 16 + i / 16, tn * 16 + i % 16);
    }
    return;
  }
#endif
  for (int e = b.tid; e < M * N; e += b.nthreads) f(e / N, e % N);
}

// C[m][n] = sum_k A[m][k] * B[n][k]   (S = Q K^T, dP = dO V^T). M, N, K multiples of 16.
template <typename T, typename acc_t>
LR_HOST_DEVICE void mm_abt(acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
#if LR_WMMA_AVAILABLE
  if constexpr (TensorCoreType<T>::value && std::is_same<acc_t, float>::value) {
    wmma_abt<T, acc_t>(C, ldc, A, lda, B, ldb, M, N, K);
    return;
  }
#endif
#if !defined(__CUDA_ARCH__)
  if (block_ctx().tid == 0) check_wmma_operands<T, acc_t>(WmmaOperands::kABt, C, ldc, A, lda, B, ldb, M, N, K);
#endif
  for_each_product_element<T, acc_t>(M, N, [&](int m, int n) {
    const T* a = A + m * lda;
    const T* bb = B + n * ldb;
    // Lanes of a warp have consecutive n: starting each at k = n (mod K) puts
    // their reads of B's rows in different shared-memory banks.
    acc_t sum = acc_t(0);
    for (int i = 0, k = n % K; i < K; ++i, k = (k + 1 == K ? 0 : k + 1)) {
      sum += static_cast<acc_t>(a[k]) * static_cast<acc_t>(bb[k]);
    }
    C[m * ldc + n] = sum;
  });
}

// C[m][n] += sum_k A[m][k] * B[k][n]   (O += P V, dQ += dS K).
template <typename T, typename acc_t>
LR_HOST_DEVICE void mm_ab_acc(acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
#if LR_WMMA_AVAILABLE
  if constexpr (TensorCoreType<T>::value && std::is_same<acc_t, float>::value) {
    wmma_ab_acc<T, acc_t, false>(C, ldc, A, lda, B, ldb, M, N, K);
    return;
  }
#endif
#if !defined(__CUDA_ARCH__)
  if (block_ctx().tid == 0) check_wmma_operands<T, acc_t>(WmmaOperands::kAB, C, ldc, A, lda, B, ldb, M, N, K);
#endif
  for_each_product_element<T, acc_t>(M, N, [&](int m, int n) {
    acc_t sum = acc_t(0);
    for (int k = 0; k < K; ++k) sum += static_cast<acc_t>(A[m * lda + k]) * static_cast<acc_t>(B[k * ldb + n]);
    C[m * ldc + n] += sum;
  });
}

// C[m][n] += sum_k A[k][m] * B[k][n]   (dV += P^T dO, dK += dS^T Q).
template <typename T, typename acc_t>
LR_HOST_DEVICE void mm_atb_acc(acc_t* C, int ldc, const T* A, int lda, const T* B, int ldb, int M, int N, int K) {
#if LR_WMMA_AVAILABLE
  if constexpr (TensorCoreType<T>::value && std::is_same<acc_t, float>::value) {
    wmma_ab_acc<T, acc_t, true>(C, ldc, A, lda, B, ldb, M, N, K);
    return;
  }
#endif
#if !defined(__CUDA_ARCH__)
  if (block_ctx().tid == 0) check_wmma_operands<T, acc_t>(WmmaOperands::kAtB, C, ldc, A, lda, B, ldb, M, N, K);
#endif
  for_each_product_element<T, acc_t>(M, N, [&](int m, int n) {
    acc_t sum = acc_t(0);
    for (int k = 0; k < K; ++k) sum += static_cast<acc_t>(A[k * lda + m]) * static_cast<acc_t>(B[k * ldb + n]);
    C[m * ldc + n] += sum;
  });
}

}  // namespace longreach::cuda_kernels
