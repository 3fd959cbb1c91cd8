// Bf16Ops (bf16_ops.h) on AVX512_BF16: the products of the CPU attention
// kernels with bfloat16 operands and float32 accumulation. CMakeLists.txt
// compiles this file alone with -mavx512bf16; tile_ops.cpp only hands its table
// out where cpuid reports the instruction. Raw intrinsics, no ATen vector, c10
// or std template code (../flagged_helpers.h says why).
//
// The micro-kernel is the float one's shape (tile_ops_impl.h): an MR x NV-vector
// block of C in registers while k runs, now two k at a time: each step loads
// NV vectors of B pair words and broadcasts MR pair words of A, and one
// vdpbf16ps adds two products per lane, twice the float FMA's work.
#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "../bf16_ops.h"
#include "../flagged_helpers.h"

namespace longreach::cpu::AVX512_BF16 {
namespace {

using flagged::lclamp;
using flagged::lmax;
using flagged::lmin;
using flagged::round_up;

constexpr int kMR = 6;  // 6 x 4 accumulators + 4 B vectors + a broadcast of 32 zmm registers
constexpr int kNV = 4;
constexpr int64_t kW = 16;      // float lanes (and pair words) per vector
constexpr int64_t kKC = 128;    // pairs per pass: a 128-pair x 64-column B panel is 32 KiB, inside L1
constexpr int64_t kMaxRows = 4096;
constexpr int64_t kMaxBlocks = (kMaxRows + kMR - 1) / kMR;

inline __m512 dot2(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(a), reinterpret_cast<__m512bh>(b));
}

// C[i][v * 16 + lane] = mul * (C (when accumulate) + sum over kp pairs of A(i, p) . B(p, v)).
// A(i, p) is the pair word A[i * a_row + p * a_col]; B vector v of pair p at
// B + p * ldb + v * b_vec. The last vector's C lanes are those of `last`.
template <int MR, int NV>
void micro_kernel(int64_t kp, const uint32_t* A, int64_t a_row, int64_t a_col, const uint32_t* B, int64_t ldb,
                  int64_t b_vec, float* C, int64_t ldc, bool accumulate, float mul, __mmask16 last) {
  __m512 c[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? last : __mmask16(0xFFFF);
      c[i][v] = accumulate ? _mm512_maskz_loadu_ps(lanes, C + i * ldc + v * kW) : _mm512_setzero_ps();
    }
  for (int64_t p = 0; p < kp; ++p) {
    __m512i b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) b[v] = _mm512_loadu_si512(B + p * ldb + v * b_vec);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(static_cast<int>(A[i * a_row + p * a_col]));
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) c[i][v] = dot2(c[i][v], ai, b[v]);
    }
  }
  const __m512 m = _mm512_set1_ps(mul);
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const __mmask16 lanes = v == NV - 1 ? last : __mmask16(0xFFFF);
      _mm512_mask_storeu_ps(C + i * ldc + v * kW, lanes, mul == 1.f ? c[i][v] : _mm512_mul_ps(c[i][v], m));
    }
}

// micro_kernel<mr, nv> for run-time mr <= MR, nv <= NV.
template <int MR, int NV>
void micro_dispatch(int64_t mr, int64_t nv, int64_t kp, const uint32_t* A, int64_t a_row, int64_t a_col,
                    const uint32_t* B, int64_t ldb, int64_t b_vec, float* C, int64_t ldc, bool accumulate, float mul,
                    __mmask16 last) {
  if constexpr (MR > 0 && NV > 0) {
    if (nv < NV) {
      return micro_dispatch<MR, NV - 1>(mr, nv, kp, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate, mul, last);
    }
    if (mr < MR) {
      return micro_dispatch<MR - 1, NV>(mr, nv, kp, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate, mul, last);
    }
    micro_kernel<MR, NV>(kp, A, a_row, a_col, B, ldb, b_vec, C, ldc, accumulate, mul, last);
  }
}

// Union of the runs [first, end) of rows a0 .. a0 + mr - 1; empty as lo >= hi.
void block_union(const int64_t* first, const int64_t* end, int64_t a0, int64_t mr, int64_t* lo, int64_t* hi) {
  *lo = INT64_MAX;
  *hi = 0;
  for (int64_t a = a0; a < a0 + mr; ++a) {
    if (first[a] >= end[a]) continue;
    *lo = lmin(*lo, first[a]);
    *hi = lmax(*hi, end[a]);
  }
}

// `message` a literal: no std::string built here (flagged_helpers.h).
void check_rows(int64_t m, const char* message) {
  if (m > kMaxRows) throw std::runtime_error(message);
}

void gemm_band_n(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda, const uint32_t* B, float mul,
                 float* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  check_rows(m, "bf16 gemm_band_n: too many rows");
  const int64_t k2 = k / 2, n_vec = round_up(n, kW), group = (k2 + 1) * kW;
  const uint32_t* Aw = reinterpret_cast<const uint32_t*>(A);  // k and lda even: whole pairs
  const int64_t a_row = lda / 2;
  int64_t lo[kMaxBlocks], hi[kMaxBlocks];
  for (int64_t blk = 0; blk * kMR < m; ++blk) {
    block_union(first, end, blk * kMR, lmin(kMR, m - blk * kMR), &lo[blk], &hi[blk]);
    lo[blk] = lo[blk] / kW * kW;  // whole vectors
    hi[blk] = lmin(n_vec, round_up(hi[blk], kW));
  }
  constexpr int64_t NB = kNV * kW;
  for (int64_t p0 = 0; p0 < k2; p0 += kKC) {
    const int64_t kp = lmin(kKC, k2 - p0);
    const bool last_pass = p0 + kp == k2;
    for (int64_t n0 = 0; n0 < n_vec; n0 += NB) {
      for (int64_t m0 = 0, blk = 0; m0 < m; m0 += kMR, ++blk) {
        const int64_t c0 = lmax(n0, lo[blk]), c1 = lmin(n0 + NB, hi[blk]);
        if (c0 >= c1) continue;
        micro_dispatch<kMR, kNV>(lmin(kMR, m - m0), (c1 - c0) / kW, kp, Aw + m0 * a_row + p0, a_row, 1,
                                 B + (c0 / kW) * group + p0 * kW, kW, group, C + m0 * ldc + c0, ldc, p0 > 0,
                                 last_pass ? mul : 1.f, __mmask16(0xFFFF));
      }
    }
  }
}

// 16 floats to 16 bf16, round to nearest even (NaN stays NaN), in the low half.
inline __m256i to_bf16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

// Pair words of A (float) for gemm_band_k, rounded to bf16.
// Row layout (a_col == 1): per row block, rows of its pairs [lo2, hi2), elements
// outside the block's union [lo, hi) zero (the caller's A is only defined there).
// Transposed layout (a_row == 1): every pair p of k, word (i, p) at At[p * ldt + i].

// Out of line (as transposed_pairs), so that a profile shows the packing apart
// from the products; one call per gemm_band_k call costs nothing measurable.
// Row block blk's rows start at word offsets[blk] of the returned words, its
// pairs are [lo2s[blk], hi2s[blk]) (all three 0 for a block without keys).
__attribute__((noinline)) const uint32_t* row_pairs(int64_t m, int64_t k, const float* A, int64_t a_row,
                                                    const int64_t* first, const int64_t* end,
                                                    flagged::AlignedBuffer<uint32_t>* out, int64_t* offsets,
                                                    int64_t* lo2s, int64_t* hi2s) {
  const int64_t blocks = (m + kMR - 1) / kMR;
  int64_t total = 0;
  int64_t lo[kMaxBlocks], hi[kMaxBlocks];
  for (int64_t blk = 0; blk < blocks; ++blk) {
    block_union(first, end, blk * kMR, lmin(kMR, m - blk * kMR), &lo[blk], &hi[blk]);
    hi[blk] = lmin(hi[blk], k);
    offsets[blk] = lo2s[blk] = hi2s[blk] = 0;
    if (lo[blk] >= hi[blk]) continue;
    lo2s[blk] = lo[blk] / 2;
    hi2s[blk] = (hi[blk] + 1) / 2;
    offsets[blk] = total;
    total += kMR * (hi2s[blk] - lo2s[blk]);
  }
  // Plain pointers and values from here on: `out` is a thread_local, and read
  // through it the loop reloaded the buffers' fields after every store and
  // looked the variable up again (a __tls_get_addr call, spilling the zmm
  // registers around it) every 32 elements.
  uint32_t* const words = out->get(lmax(total, 1));
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t lo2 = lo2s[blk], hi2 = hi2s[blk], np = hi2 - lo2, offset = offsets[blk];
    if (np <= 0) continue;
    const int64_t lo_e = lo[blk], hi_e = hi[blk];
    for (int64_t i = blk * kMR; i < lmin(m, (blk + 1) * kMR); ++i) {
      const float* src = A + i * a_row;
      uint32_t* dst = words + offset + (i - blk * kMR) * np;
      // Elements [2 lo2, 2 hi2), 32 at a time; lanes outside [lo, hi) read as 0.
      // Only the steps at the union's edges need masks: computing them for
      // every step was most of this loop's work.
      auto masked_step = [&](int64_t e) {
        auto lanes = [&](int64_t e0) {
          const int64_t a = lclamp(lo_e - e0, 0, kW), b = lclamp(hi_e - e0, 0, kW);
          return __mmask16(((1u << b) - 1) & ~((1u << a) - 1));
        };
        const __m512 x0 = _mm512_maskz_loadu_ps(lanes(e), src + e);
        const __m512 x1 = _mm512_maskz_loadu_ps(lanes(e + kW), src + e + kW);
        const __m512i w = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));
        const int64_t left = lmin(kW, (2 * hi2 - e) / 2);  // words left in this row
        _mm512_mask_storeu_epi32(dst + (e / 2 - lo2), __mmask16((1u << left) - 1), w);
      };
      int64_t e = 2 * lo2;
      if (e < lo_e) {  // lo odd: the first pair's low half is outside
        masked_step(e);
        e += 2 * kW;
      }
      for (; e + 2 * kW <= hi_e; e += 2 * kW) {
        const __m512i w =
            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + e + kW), _mm512_loadu_ps(src + e)));
        _mm512_storeu_si512(dst + (e / 2 - lo2), w);
      }
      for (; e < 2 * hi2; e += 2 * kW) masked_step(e);
    }
  }
  return words;
}

__attribute__((noinline)) const uint32_t* transposed_pairs(int64_t m, int64_t k, const float* A, int64_t a_col,
                                                           int64_t ldt, flagged::AlignedBuffer<uint32_t>* At) {
  const int64_t k2 = (k + 1) / 2;
  // Interleave: word j = (bf16 of row 2p, lane j; bf16 of row 2p + 1, lane j).
  alignas(64) static const uint16_t kIdx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i idx = _mm512_load_si512(kIdx);
  // Words [m, ldt) of each pair row are never written nor read.
  uint32_t* const dst = At->get(lmax(k2 * ldt, 1));  // not through At in the loop: see row_pairs
  for (int64_t p = 0; p < k2; ++p) {
    const float* r0 = A + 2 * p * a_col;
    const float* r1 = 2 * p + 1 < k ? A + (2 * p + 1) * a_col : nullptr;
    int64_t i = 0;
    if (r1) {  // whole vectors of rows without masks, as row_pairs
      for (; i + kW <= m; i += kW) {
        const __m512i w =
            reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(r1 + i), _mm512_loadu_ps(r0 + i)));
        _mm512_storeu_si512(dst + p * ldt + i, _mm512_permutexvar_epi16(idx, w));
      }
    }
    for (; i < m; i += kW) {
      const int64_t cnt = lmin(kW, m - i);
      const __mmask16 lanes = __mmask16((1u << cnt) - 1);
      const __m512 x0 = _mm512_maskz_loadu_ps(lanes, r0 + i);
      const __m512 x1 = r1 ? _mm512_maskz_loadu_ps(lanes, r1 + i) : _mm512_setzero_ps();
      const __m512i w = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(x1, x0));  // x0 low half, x1 high half
      _mm512_mask_storeu_epi32(dst + p * ldt + i, lanes, _mm512_permutexvar_epi16(idx, w));
    }
  }
  return dst;
}

void gemm_band_k(int64_t m, int64_t n, int64_t k, const float* A, int64_t a_row, int64_t a_col, const uint32_t* B,
                 int64_t ldb, float* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  check_rows(m, "bf16 gemm_band_k: too many rows");
  thread_local flagged::AlignedBuffer<uint32_t> row_buffer, col_buffer;
  const bool transposed = a_col != 1;
  const int64_t blocks = (m + kMR - 1) / kMR;
  const int64_t ldt = round_up(m, kW);
  int64_t lo2[kMaxBlocks], hi2[kMaxBlocks], row_offset[kMaxBlocks];
  // Plain pointers into the thread_local buffers (see row_pairs).
  const uint32_t* col_words = nullptr;
  const uint32_t* row_words = nullptr;
  if (transposed) {
    col_words = transposed_pairs(m, k, A, a_col, ldt, &col_buffer);
    for (int64_t blk = 0; blk < blocks; ++blk) {
      int64_t lo, hi;
      block_union(first, end, blk * kMR, lmin(kMR, m - blk * kMR), &lo, &hi);
      hi = lmin(hi, k);
      lo2[blk] = lo < hi ? lo / 2 : 0;
      hi2[blk] = lo < hi ? (hi + 1) / 2 : 0;
    }
  } else {
    row_words = row_pairs(m, k, A, a_row, first, end, &row_buffer, row_offset, lo2, hi2);
  }
  const int64_t k2 = (k + 1) / 2;
  constexpr int64_t NB = kNV * kW;
  for (int64_t p0 = 0; p0 < k2; p0 += kKC) {
    const int64_t p1 = lmin(k2, p0 + kKC);
    for (int64_t n0 = 0; n0 < n; n0 += NB) {
      const int64_t cols_here = lmin(NB, n - n0);
      const int64_t nv = (cols_here + kW - 1) / kW;
      const int64_t tail = cols_here - (nv - 1) * kW;
      const __mmask16 last = __mmask16(tail == kW ? 0xFFFF : (1u << tail) - 1);
      for (int64_t m0 = 0, blk = 0; m0 < m; m0 += kMR, ++blk) {
        const int64_t q0 = lmax(p0, lo2[blk]), q1 = lmin(p1, hi2[blk]);
        if (q0 >= q1) continue;
        const uint32_t* a;
        int64_t w_row, w_col;
        if (transposed) {
          a = col_words + q0 * ldt + m0;
          w_row = 1;
          w_col = ldt;
        } else {
          const int64_t np = hi2[blk] - lo2[blk];
          a = row_words + row_offset[blk] + (q0 - lo2[blk]);
          w_row = np;
          w_col = 1;
        }
        micro_dispatch<kMR, kNV>(lmin(kMR, m - m0), nv, q1 - q0, a, w_row, w_col, B + q0 * ldb + n0, ldb,
                                 kW, C + m0 * ldc + n0, ldc, true, 1.f, last);
      }
    }
  }
}

}  // namespace

const Bf16Ops& bf16_table() {
  static const Bf16Ops ops{"avx512_bf16", &gemm_band_n, &gemm_band_k, /*forward_rows=*/0, nullptr, nullptr};
  return ops;
}

}  // namespace longreach::cpu::AVX512_BF16
