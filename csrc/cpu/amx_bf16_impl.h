// Bf16Ops (bf16_ops.h) on AMX-BF16 tiles, written once against a thin tile
// layer and compiled twice: csrc/cpu/isa/tile_ops_amx_bf16.cpp maps the layer
// to the AMX intrinsics (its own -mamx-tile -mamx-bf16 flags), and
// csrc/cpu/isa/tile_ops_amx_emulated.cpp to a software model of exactly those
// instructions, so the packing and tiling below run (and are tested) on CPUs
// without AMX; only the intrinsic mapping is unrun there. bf16_dispatch.cpp
// hands the real table out only where cpuid reports AMX and the OS grants the
// tile state, after a self-check against the AVX512_BF16 table.
//
// The including file defines, in namespace LR_AMX_NS::tiles:
//   void configure();                 // palette 1, tiles 0..7 all 16 rows x 64 bytes
//   void release();
//   template <int T> void zero();
//   template <int T> void load(const void* base, int64_t stride);   // 16 rows of 64 bytes, `stride` bytes apart
//   template <int T> void store(void* base, int64_t stride);
//   template <int C, int A, int B> void dot();   // tdpbf16ps: C[m][n] += sum_k A pair (m, k) . B pair (k, n)
// and then includes this file.
//
// One fixed tile shape (16 x 16 float32 for C, 16 rows x 16 pair words for A
// and B), so one ldtilecfg per call. Everything a tile would read past an
// operand's edge (the last rows of a block, a K tail that is not 16 pairs, B
// columns past ldb) goes through a zero-padded copy: a tile never reads memory
// the AVX512_BF16 kernel would not read (a NaN or infinity there would
// otherwise reach other rows through 0 * inf), and C is written only where that
// kernel writes it. No c10 or std template code is instantiated here
// (flagged_helpers.h says why).
//
// Tiles, one 16-row block: C in 0..3 (up to four groups of 16 columns), A in
// 4, B in 5..7 in turn. Two 16-row blocks (32 rows; gemm_band_n, the fused
// forward's P V): C 0, 1 and 2, 3 (two groups of 16 columns of each block), A
// in 4 and 5, B in 6 and 7, so every B tile loaded serves 32 rows. The B
// operands (K^T, V) stream from L2: the D = 128 forward (L = 8192, window 512)
// went from 0.80-0.84 to 1.13-1.19 of bf16 SDPA per useful FLOP in a
// best-of-3 run on a busy host; docs/performance.md has the published runs,
// taken under other host states, where the gain is smaller.
//
// The operands are packed with AVX512_BF16 instructions (vcvtne2ps2bf16, the
// AVX512_BF16 kernel's rounding), so both including files are compiled with its
// flags; that is safe because the dispatch offers AMX, emulated or not, only
// where the AVX512_BF16 kernels run. Scalar packing was most of the time of a
// forward on real AMX tiles (gemm_band_k at 5x gemm_band_n in a profile).
#pragma once

#if !defined(__AVX512BF16__) || !defined(__AVX512BW__)
#error "amx_bf16_impl.h packs its operands with AVX512_BF16 + AVX512BW instructions: compile it with their flags"
#endif

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "bf16_ops.h"
#include "exp_avx512.h"
#include "flagged_helpers.h"

namespace longreach::cpu::LR_AMX_NS {
namespace {

constexpr int64_t kT = 16;           // tile rows, pair words per A/B row, floats per C row
constexpr int64_t kTileWords = kT * kT;
constexpr int64_t kStride = kT * 4;  // bytes between the rows of a packed tile
constexpr int64_t kMaxRows = 4096;   // as the AVX512_BF16 table

using flagged::lmax;
using flagged::lmin;
using flagged::round_up;

// Bits [a, b) of a 32-lane mask, a and b clamped to [0, 32].
inline uint32_t lane_bits(int64_t a, int64_t b) {
  a = lmax(0, lmin(32, a));
  b = lmax(0, lmin(32, b));
  if (a >= b) return 0;
  const uint32_t below_b = b == 32 ? 0xFFFFFFFFu : (1u << b) - 1;
  return below_b & ~((1u << a) - 1);
}

// 32 floats from src as 16 pair words (element 2j low half of word j), rounded
// to bf16 as vcvtne2ps2bf16 (round to nearest even, denormals to signed zero);
// lanes outside `keep` are zero and never read.
inline __m512i pair_words(const float* src, uint32_t keep) {
  if (keep == 0) return _mm512_setzero_si512();
  const __m512 lo = _mm512_maskz_loadu_ps(__mmask16(keep), src);
  const __m512 hi = _mm512_maskz_loadu_ps(__mmask16(keep >> 16), src + 16);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// Rows become columns: word j of r[i] moves to word i of r[j] (unpack 32 and 64
// bits, then two rounds of 128-bit lane shuffles).
inline void transpose_words(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// gemm_band_k's A tiles of the 16-row block at m0 (mr rows), pairs
// [q0, q0 + 16 * steps): element x of row i is pair x / 2 - q0, half x % 2,
// zero outside [first[i], min(end[i], k)) and in rows past mr.
void pack_k_tiles(const float* A, int64_t a_row, int64_t a_col, int64_t m0, int64_t mr, int64_t k,
                  const int64_t* first, const int64_t* end, int64_t q0, int64_t steps, uint32_t* tiles_out) {
  if (a_col == 1) {  // rows: each tile row is 32 consecutive elements of one row
    for (int64_t r = 0; r < kT; ++r) {
      const int64_t i = m0 + r;
      const int64_t f = r < mr ? lmax(first[i], 2 * q0) : 0, e = r < mr ? lmin(end[i], k) : 0;
      for (int64_t st = 0; st < steps; ++st) {
        const int64_t e0 = 2 * (q0 + st * kT);
        const uint32_t keep = lane_bits(f - e0, e - e0);
        const __m512i w = keep ? pair_words(A + i * a_row + e0, keep) : _mm512_setzero_si512();
        _mm512_store_si512(tiles_out + st * kTileWords + r * kT, w);
      }
    }
    return;
  }
  // Transposed (a_row == 1): element x of the block's 16 rows is 16 consecutive
  // floats; two of them make one tile column, and a transpose makes the rows.
  alignas(64) int64_t f[kT], e[kT];
  for (int64_t r = 0; r < kT; ++r) {
    f[r] = r < mr ? first[m0 + r] : 1;
    e[r] = r < mr ? lmin(end[m0 + r], k) : 0;
  }
  const __m512i f_lo = _mm512_load_si512(f), f_hi = _mm512_load_si512(f + 8);
  const __m512i e_lo = _mm512_load_si512(e), e_hi = _mm512_load_si512(e + 8);
  auto rows_at = [&](int64_t x) {  // the block's rows whose run holds element x
    const __m512i X = _mm512_set1_epi64(x);
    const uint32_t lo = _mm512_cmple_epi64_mask(f_lo, X) & _mm512_cmplt_epi64_mask(X, e_lo);
    const uint32_t hi = _mm512_cmple_epi64_mask(f_hi, X) & _mm512_cmplt_epi64_mask(X, e_hi);
    return __mmask16(lo | (hi << 8));
  };
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i interleave = _mm512_load_si512(kInterleave);
  for (int64_t st = 0; st < steps; ++st) {
    __m512i col[kT];
    for (int64_t pp = 0; pp < kT; ++pp) {
      const int64_t x = 2 * (q0 + st * kT + pp);
      const __mmask16 even = rows_at(x), odd = rows_at(x + 1);
      const __m512 lo = even ? _mm512_maskz_loadu_ps(even, A + m0 + x * a_col) : _mm512_setzero_ps();
      const __m512 hi = odd ? _mm512_maskz_loadu_ps(odd, A + m0 + (x + 1) * a_col) : _mm512_setzero_ps();
      col[pp] = _mm512_permutexvar_epi16(interleave, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
    }
    transpose_words(col);
    for (int64_t r = 0; r < kT; ++r) _mm512_store_si512(tiles_out + st * kTileWords + r * kT, col[r]);
  }
}

// A per-thread word buffer (flagged_helpers.h: no std::vector here).
using Words = flagged::AlignedBuffer<uint32_t>;

struct Scratch {
  Words a, a1;    // a block's (and gemm_band_n's second block's) A tiles, one per step of 16 pairs
  Words b_tail;   // gemm_band_n: each column group's last, partial K tile
  Words b_edge;   // gemm_band_k: one zero-padded B tile
  Words c_edge;   // up to four zero-padded C tiles
};

Scratch& scratch() {
  thread_local Scratch s;
  return s;
}

// Union of the runs of rows a0 .. a0 + mr - 1; empty as lo >= hi.
void block_union(const int64_t* first, const int64_t* end, int64_t a0, int64_t mr, int64_t* lo, int64_t* hi) {
  *lo = INT64_MAX;
  *hi = 0;
  for (int64_t a = a0; a < a0 + mr; ++a) {
    if (first[a] >= end[a]) continue;
    *lo = lmin(*lo, first[a]);
    *hi = lmax(*hi, end[a]);
  }
}

// `message` a literal: building a std::string here would instantiate its
// constructor with this file's -m flags (the header comment's rule).
void check_rows(int64_t m, const char* message) {
  if (m > kMaxRows) throw std::runtime_error(message);
}

// C tile j of the current batch += A tile (4) . B tile: the B tile from `b`
// with row stride `stride` bytes. Tile numbers are immediates of the instructions.
// (Alternating A between tiles 4 and 5 by step, so that a step's A load need not
// wait for the previous step's dots, measured no faster: forward, L = 8192.)
template <int J>
inline void step(const void* b, int64_t stride) {
  constexpr int kB = 5 + J % 3;
  tiles::load<kB>(b, stride);
  tiles::dot<J, 4, kB>();
}

inline void step_all(int64_t nc, const uint32_t* const* b, const int64_t* stride) {
  step<0>(b[0], stride[0]);
  if (nc > 1) step<1>(b[1], stride[1]);
  if (nc > 2) step<2>(b[2], stride[2]);
  if (nc > 3) step<3>(b[3], stride[3]);
}

template <int J>
inline void c_load(int64_t nc, float* const* c, const int64_t* stride) {
  if (nc > J) tiles::load<J>(c[J], stride[J]);
}
template <int J>
inline void c_store(int64_t nc, float* const* c, const int64_t* stride) {
  if (nc > J) tiles::store<J>(c[J], stride[J]);
}
inline void c_load_all(int64_t nc, float* const* c, const int64_t* stride) {
  c_load<0>(nc, c, stride);
  c_load<1>(nc, c, stride);
  c_load<2>(nc, c, stride);
  c_load<3>(nc, c, stride);
}
inline void c_store_all(int64_t nc, float* const* c, const int64_t* stride) {
  c_store<0>(nc, c, stride);
  c_store<1>(nc, c, stride);
  c_store<2>(nc, c, stride);
  c_store<3>(nc, c, stride);
}

// Two row tiles by two column tiles per step (C tiles 0, 1: rows 0-15, 2, 3:
// rows 16-31; A in 4 and 5, B in 6 and 7): each B tile loaded serves 32 rows.
template <int J, int B>
inline void dot_pair_rows() {
  tiles::dot<J, 4, B>();
  tiles::dot<J + 2, 5, B>();
}

// The operands of gemm_band_n, shared by its one- and two-block steps.
struct BandN {
  int64_t k2, steps, group, n_vec, tail, a_row;
  const uint32_t* Aw;  // A as pair words
  const uint32_t* B;
  const uint32_t* b_tail;  // each group's last, zero-padded K tile, or nullptr (whole tiles)
  float mul;
  float* C;
  int64_t ldc;
  float* c_edge;  // four zero-padded C tiles
  const uint32_t* b_at(int64_t g, int64_t st) const {
    return st == steps - 1 && b_tail ? b_tail + g * kTileWords : B + g * group + st * kT * kT;
  }
  // Block rows [m0, m0 + mr) as A tiles: in place when whole tiles, else
  // copied into `buf`, rows past mr and pairs past k2 zero.
  struct ATiles {
    const uint32_t* p;
    int64_t stride, step_words;  // bytes between tile rows; words from one step's tile to the next
    const uint32_t* at(int64_t st) const { return p + st * step_words; }
  };
  ATiles a_tiles(int64_t m0, int64_t mr, uint32_t* buf) const {
    if (mr == kT && tail == kT) return {Aw + m0 * a_row, a_row * 4, kT};
    std::memset(buf, 0, steps * kTileWords * 4);
    for (int64_t r = 0; r < mr; ++r) {
      const uint32_t* src = Aw + (m0 + r) * a_row;
      for (int64_t st = 0; st < steps; ++st) {
        std::memcpy(buf + st * kTileWords + r * kT, src + st * kT, lmin(kT, k2 - st * kT) * 4);
      }
    }
    return {buf, kStride, kTileWords};
  }
  // After the tiles are stored: C = mul * them for `rows` rows of tile j at
  // column c, from C itself (direct) or from its c_edge slot.
  void scale_out(int64_t m0, int64_t rows, int64_t c, bool direct, int64_t slot) const {
    if (direct && mul == 1.f) return;
    // A vector per row (as a plain loop the compiler kept it scalar, src and
    // dst possibly overlapping; vectorised, this function went from 32% to 18%
    // of a D = 64 bf16 forward's samples).
    const __m512 scale = _mm512_set1_ps(mul);
    for (int64_t r = 0; r < rows; ++r) {
      float* dst = C + (m0 + r) * ldc + c;
      const float* src = direct ? dst : c_edge + slot * kTileWords + r * kT;
      _mm512_storeu_ps(dst, _mm512_mul_ps(scale, _mm512_loadu_ps(src)));
    }
  }
};

// One 16-row block (mr rows at m0) over columns [lo, hi): C tiles 0..3 take up
// to four groups of 16 columns at a time.
void band_n_block(const BandN& op, int64_t m0, int64_t mr, int64_t lo, int64_t hi, uint32_t* a_buf) {
  const BandN::ATiles a = op.a_tiles(m0, mr, a_buf);
  const bool direct = mr == kT;
  for (int64_t c0 = lo; c0 < hi; c0 += 4 * kT) {
    const int64_t nc = lmin(4, (hi - c0) / kT);
    float* c_ptr[4];
    int64_t c_stride[4];
    for (int64_t j = 0; j < nc; ++j) {
      c_ptr[j] = direct ? op.C + m0 * op.ldc + c0 + j * kT : op.c_edge + j * kTileWords;
      c_stride[j] = direct ? op.ldc * 4 : kStride;
    }
    tiles::zero<0>();
    if (nc > 1) tiles::zero<1>();
    if (nc > 2) tiles::zero<2>();
    if (nc > 3) tiles::zero<3>();
    for (int64_t st = 0; st < op.steps; ++st) {
      tiles::load<4>(a.at(st), a.stride);
      const uint32_t* b_ptr[4];
      int64_t b_stride[4] = {kStride, kStride, kStride, kStride};
      for (int64_t j = 0; j < nc; ++j) b_ptr[j] = op.b_at(c0 / kT + j, st);
      step_all(nc, b_ptr, b_stride);
    }
    c_store_all(nc, c_ptr, c_stride);
    for (int64_t j = 0; j < nc; ++j) op.scale_out(m0, mr, c0 + j * kT, direct, j);
  }
}

// Two blocks (16 rows at m0, mr1 <= 16 rows at m0 + 16) over the columns
// [lo, hi) of their union, two groups of 16 columns at a time.
void band_n_pair(const BandN& op, int64_t m0, int64_t mr1, int64_t lo, int64_t hi, uint32_t* a_buf0,
                 uint32_t* a_buf1) {
  const BandN::ATiles a0 = op.a_tiles(m0, kT, a_buf0);
  const BandN::ATiles a1 = op.a_tiles(m0 + kT, mr1, a_buf1);
  const bool direct1 = mr1 == kT;
  for (int64_t c0 = lo; c0 < hi; c0 += 2 * kT) {
    const bool two = hi - c0 > kT;
    tiles::zero<0>();
    tiles::zero<2>();
    if (two) {
      tiles::zero<1>();
      tiles::zero<3>();
    }
    for (int64_t st = 0; st < op.steps; ++st) {
      tiles::load<4>(a0.at(st), a0.stride);
      tiles::load<5>(a1.at(st), a1.stride);
      tiles::load<6>(op.b_at(c0 / kT, st), kStride);
      dot_pair_rows<0, 6>();
      if (two) {
        tiles::load<7>(op.b_at(c0 / kT + 1, st), kStride);
        dot_pair_rows<1, 7>();
      }
    }
    float* const row0 = op.C + m0 * op.ldc + c0;
    tiles::store<0>(row0, op.ldc * 4);
    if (two) tiles::store<1>(row0 + kT, op.ldc * 4);
    float* const row1 = op.C + (m0 + kT) * op.ldc + c0;
    if (direct1) {
      tiles::store<2>(row1, op.ldc * 4);
      if (two) tiles::store<3>(row1 + kT, op.ldc * 4);
    } else {
      tiles::store<2>(op.c_edge + 2 * kTileWords, kStride);
      if (two) tiles::store<3>(op.c_edge + 3 * kTileWords, kStride);
    }
    for (int64_t j = 0; j < (two ? 2 : 1); ++j) {
      op.scale_out(m0, kT, c0 + j * kT, true, j);
      op.scale_out(m0 + kT, mr1, c0 + j * kT, direct1, 2 + j);
    }
  }
}

// C = mul * A @ B over the runs' block unions (whole groups of 16 columns),
// blocks of 32 rows where there are that many (two row tiles share each B
// tile: K^T streams from L2 once per 32 rows), else of 16.
void gemm_band_n(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda, const uint32_t* B, float mul,
                 float* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  check_rows(m, "amx gemm_band_n: too many rows");
  BandN op;
  op.k2 = k / 2;
  op.steps = (op.k2 + kT - 1) / kT;
  op.group = (op.k2 + 1) * kT;
  op.n_vec = round_up(n, kT);
  op.tail = op.k2 - (op.steps - 1) * kT;
  op.a_row = lda / 2;
  op.Aw = reinterpret_cast<const uint32_t*>(A);  // k and lda even: whole pairs
  op.B = B;
  op.mul = mul;
  op.C = C;
  op.ldc = ldc;
  Scratch& s = scratch();
  uint32_t* const a_buf0 = s.a.get(op.steps * kTileWords);
  uint32_t* const a_buf1 = s.a1.get(op.steps * kTileWords);
  op.c_edge = reinterpret_cast<float*>(s.c_edge.get(4 * kTileWords));
  // Each group's last K tile, zero rows past k2 (a panel's next rows are the
  // next group's keys), when k2 is not whole tiles.
  op.b_tail = nullptr;
  if (op.tail < kT) {
    const int64_t n_groups = op.n_vec / kT;
    uint32_t* b_tail = s.b_tail.get(n_groups * kTileWords);
    std::memset(b_tail, 0, n_groups * kTileWords * 4);
    for (int64_t g = 0; g < n_groups; ++g) {
      std::memcpy(b_tail + g * kTileWords, B + g * op.group + (op.steps - 1) * kT * kT, op.tail * kT * 4);
    }
    op.b_tail = b_tail;
  }
  tiles::configure();
  for (int64_t m0 = 0; m0 < m; m0 += 2 * kT) {
    const int64_t rows = lmin(2 * kT, m - m0);
    int64_t lo, hi;
    block_union(first, end, m0, rows, &lo, &hi);
    lo = lo / kT * kT;
    hi = lmin(op.n_vec, round_up(hi, kT));
    if (lo >= hi) continue;
    if (rows > kT) {
      band_n_pair(op, m0, rows - kT, lo, hi, a_buf0, a_buf1);
    } else {
      band_n_block(op, m0, rows, lo, hi, a_buf0);
    }
  }
  tiles::release();
}

// A B tile of pair rows [p, p + 16) and columns [col, col + 16): in place,
// or zero-padded into `edge` past q1 or ldb (bytes between rows in *stride).
inline const uint32_t* b_rows_tile(const uint32_t* B, int64_t ldb, int64_t p, int64_t q1, int64_t col, int64_t n,
                                   uint32_t* edge, int64_t* stride) {
  const int64_t rows = lmin(kT, q1 - p), cols = lmin(kT, n - col);
  if (rows == kT && col + kT <= ldb) {
    *stride = ldb * 4;
    return B + p * ldb + col;
  }
  std::memset(edge, 0, kTileWords * 4);
  for (int64_t r = 0; r < rows; ++r) std::memcpy(edge + r * kT, B + (p + r) * ldb + col, cols * 4);
  *stride = kStride;
  return edge;
}

// A C tile that the products add to: rows x cols floats at dst (ldc apart),
// loaded in place when whole, else through a zero-padded copy in `edge` that
// write_back() returns to dst.
struct AccTile {
  float* dst;
  int64_t ldc, rows, cols;
  float* ptr;
  int64_t stride;
  AccTile() = default;
  AccTile(float* d, int64_t ld, int64_t r, int64_t c, float* edge) : dst(d), ldc(ld), rows(r), cols(c) {
    if (rows == kT && cols == kT) {
      ptr = dst;
      stride = ldc * 4;
      return;
    }
    ptr = edge;
    stride = kStride;
    std::memset(ptr, 0, kTileWords * 4);
    for (int64_t i = 0; i < rows; ++i) std::memcpy(ptr + i * kT, dst + i * ldc, cols * 4);
  }
  void write_back() const {
    if (ptr == dst) return;
    for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * ldc, ptr + i * kT, cols * 4);
  }
};

// C (mr <= 16 rows, row 0 at C, n columns exactly) += the block's A tiles
// (`steps` tiles from pair q0, pairs at or past q1 zero) @ B, pair rows of ldb
// words read in [q0, q1) only. Tiles configured by the caller.
void tiles_times_b(int64_t mr, int64_t n, const uint32_t* a_tiles, int64_t q0, int64_t q1, int64_t steps,
                   const uint32_t* B, int64_t ldb, float* C, int64_t ldc, Scratch& s) {
  float* const c_edge = reinterpret_cast<float*>(s.c_edge.get(4 * kTileWords));
  uint32_t* const b_edge = s.b_edge.get(4 * kTileWords);
  for (int64_t n0 = 0; n0 < n; n0 += 4 * kT) {
    const int64_t nc = lmin(4, (n - n0 + kT - 1) / kT);
    AccTile c[4];
    float* c_ptr[4];
    int64_t c_stride[4];
    for (int64_t j = 0; j < nc; ++j) {
      c[j] = AccTile(C + n0 + j * kT, ldc, mr, lmin(kT, n - n0 - j * kT), c_edge + j * kTileWords);
      c_ptr[j] = c[j].ptr;
      c_stride[j] = c[j].stride;
    }
    c_load_all(nc, c_ptr, c_stride);
    for (int64_t st = 0; st < steps; ++st) {
      tiles::load<4>(a_tiles + st * kTileWords, kStride);
      const int64_t p = q0 + st * kT;
      const uint32_t* b_ptr[4];
      int64_t b_stride[4];
      for (int64_t j = 0; j < nc; ++j) {
        b_ptr[j] = b_rows_tile(B, ldb, p, q1, n0 + j * kT, n, b_edge + j * kTileWords, &b_stride[j]);
      }
      step_all(nc, b_ptr, b_stride);
    }
    c_store_all(nc, c_ptr, c_stride);
    for (int64_t j = 0; j < nc; ++j) c[j].write_back();
  }
}

// tiles_times_b for two row tiles (16 rows of C at C, mr1 <= 16 at C + 16 ldc)
// sharing each B tile: two groups of 16 columns at a time, C tiles 0, 1 the
// first rows, 2, 3 the second (dot_pair_rows), so B streams once per 32 rows.
void tiles_times_b_pair(int64_t mr1, int64_t n, const uint32_t* a0, const uint32_t* a1, int64_t q0, int64_t q1,
                        int64_t steps, const uint32_t* B, int64_t ldb, float* C, int64_t ldc, Scratch& s) {
  float* const c_edge = reinterpret_cast<float*>(s.c_edge.get(4 * kTileWords));
  uint32_t* const b_edge = s.b_edge.get(4 * kTileWords);
  for (int64_t n0 = 0; n0 < n; n0 += 2 * kT) {
    const bool two = n - n0 > kT;
    // C tile t = 2 * block + j: rows of block (16 or mr1), columns n0 + 16 j.
    AccTile c[4];
    for (int64_t t = 0; t < (two ? 4 : 3); ++t) {
      if (t == 1 && !two) continue;
      const int64_t blk = t / 2, j = t % 2;
      c[t] = AccTile(C + blk * kT * ldc + n0 + j * kT, ldc, blk ? mr1 : kT, lmin(kT, n - n0 - j * kT),
                     c_edge + t * kTileWords);
    }
    tiles::load<0>(c[0].ptr, c[0].stride);
    tiles::load<2>(c[2].ptr, c[2].stride);
    if (two) {
      tiles::load<1>(c[1].ptr, c[1].stride);
      tiles::load<3>(c[3].ptr, c[3].stride);
    }
    for (int64_t st = 0; st < steps; ++st) {
      const int64_t p = q0 + st * kT;
      tiles::load<4>(a0 + st * kTileWords, kStride);
      tiles::load<5>(a1 + st * kTileWords, kStride);
      int64_t b_stride;  // set by b_rows_tile before the load reads it (not in one call's arguments)
      const uint32_t* b0 = b_rows_tile(B, ldb, p, q1, n0, n, b_edge, &b_stride);
      tiles::load<6>(b0, b_stride);
      dot_pair_rows<0, 6>();
      if (two) {
        const uint32_t* b1 = b_rows_tile(B, ldb, p, q1, n0 + kT, n, b_edge + kTileWords, &b_stride);
        tiles::load<7>(b1, b_stride);
        dot_pair_rows<1, 7>();
      }
    }
    tiles::store<0>(c[0].ptr, c[0].stride);
    tiles::store<2>(c[2].ptr, c[2].stride);
    if (two) {
      tiles::store<1>(c[1].ptr, c[1].stride);
      tiles::store<3>(c[3].ptr, c[3].stride);
    }
    for (int64_t t = 0; t < (two ? 4 : 3); ++t) {
      if (t != 1 || two) c[t].write_back();
    }
  }
}

// C += round_bf16(A) @ B, A read through (a_row, a_col), zero outside each
// row's own run; B pair rows (ldb words), read only in the pairs of a block's
// union; C's n columns exactly.
void gemm_band_k(int64_t m, int64_t n, int64_t k, const float* A, int64_t a_row, int64_t a_col, const uint32_t* B,
                 int64_t ldb, float* C, int64_t ldc, const int64_t* first, const int64_t* end) {
  if (m <= 0 || n <= 0 || k <= 0) return;
  check_rows(m, "amx gemm_band_k: too many rows");
  Scratch& s = scratch();
  tiles::configure();
  // Blocks of 32 rows (two row tiles over the pairs of their union, sharing
  // each B tile) where there are that many, else of 16.
  for (int64_t m0 = 0; m0 < m; m0 += 2 * kT) {
    const int64_t rows = lmin(2 * kT, m - m0);
    int64_t lo, hi;
    block_union(first, end, m0, rows, &lo, &hi);
    hi = lmin(hi, k);
    if (lo >= hi) continue;
    const int64_t q0 = lo / 2, q1 = (hi + 1) / 2, steps = (q1 - q0 + kT - 1) / kT;
    uint32_t* const a0 = s.a.get(steps * kTileWords);
    pack_k_tiles(A, a_row, a_col, m0, lmin(kT, rows), k, first, end, q0, steps, a0);
    if (rows > kT) {
      uint32_t* const a1 = s.a1.get(steps * kTileWords);
      pack_k_tiles(A, a_row, a_col, m0 + kT, rows - kT, k, first, end, q0, steps, a1);
      tiles_times_b_pair(rows - kT, n, a0, a1, q0, q1, steps, B, ldb, C + m0 * ldc, ldc, s);
    } else {
      tiles_times_b(rows, n, a0, q0, q1, steps, B, ldb, C + m0 * ldc, ldc, s);
    }
  }
  tiles::release();
}

// Bf16Ops::softmax_tiles (bf16_ops.h): TileOps<float>::softmax_rows on mul * S
// for up to 32 rows (two row tiles over the pairs of the rows' union), row by
// row in two passes instead of four (scale, max, exp, pack): the raw
// row max (max of fl(mul * s) is fl(mul * max s) for mul > 0, rounding being
// monotone), then exp(mul * s - max) summed in float32, rounded to bf16 pairs
// and stored as the rows of P's A tiles, zero outside the row's run. The exp
// is softmax_rows' own (exp_avx512.h); the compiler may contract mul * s - max
// into one FMA, so a weight can differ from softmax_rows' in its last float
// bit before the bf16 rounding, and the row sum adds in another order.
void softmax_tiles(int64_t m, int64_t k, const float* S, int64_t ld_s, float mul, const int64_t* first,
                   const int64_t* end, float* row_max, float* row_sum, float* alpha, uint32_t* tiles,
                   PairSpan* span) {
  if (m > 2 * kT) throw std::runtime_error("amx softmax_tiles: more than 32 rows");
  const float neg_inf = -__builtin_inff();
  const __m512 v_neg_inf = _mm512_set1_ps(neg_inf), v_mul = _mm512_set1_ps(mul);
  int64_t lo, hi;
  block_union(first, end, 0, m, &lo, &hi);
  hi = lmin(hi, k);
  *span = PairSpan{};
  const int64_t q0 = lo < hi ? lo / 2 : 0, q1 = lo < hi ? (hi + 1) / 2 : 0, steps = (q1 - q0 + kT - 1) / kT;
  if (lo < hi) *span = PairSpan{q0, q1};
  const int64_t blocks = m > kT ? 2 : 1;  // row tiles, all over the pairs [q0, q1) of the rows' union
  alignas(64) float shift[2 * kT], tile_sum[2 * kT];  // shift: max_new - max_old until the exp below
  for (int64_t r = 0; r < blocks * kT; ++r) {
    shift[r] = 0.f;
    tile_sum[r] = 0.f;
    uint32_t* out = tiles + (r / kT) * steps * kTileWords + (r % kT) * kT;  // row r of every step's tile
    const int64_t f = r < m ? first[r] : 0, e = r < m ? lmin(end[r], k) : 0;
    auto zero_row = [&] {
      for (int64_t st = 0; st < steps; ++st) _mm512_storeu_si512(out + st * kTileWords, _mm512_setzero_si512());
    };
    if (f >= e) {
      zero_row();
      continue;
    }
    const float* s = S + r * ld_s;
    // Raw row max: two chains, the last partial vector padded with -inf; NaN
    // lanes recorded apart (vmaxps drops them).
    __m512 mx0 = v_neg_inf, mx1 = v_neg_inf;
    __mmask16 nan = 0;
    int64_t c = f;
    for (; c + 32 <= e; c += 32) {
      const __m512 x0 = _mm512_loadu_ps(s + c), x1 = _mm512_loadu_ps(s + c + 16);
      nan |= _mm512_cmp_ps_mask(x0, x1, _CMP_UNORD_Q);
      mx0 = _mm512_max_ps(mx0, x0);
      mx1 = _mm512_max_ps(mx1, x1);
    }
    for (; c < e; c += 16) {
      const __mmask16 keep = __mmask16(lane_bits(0, e - c));
      const __m512 x = _mm512_mask_loadu_ps(v_neg_inf, keep, s + c);
      nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
      mx0 = _mm512_max_ps(mx0, x);
    }
    const float m_old = row_max[r];
    const float qnan = __builtin_nanf("");
    const float tile_max = nan ? qnan : mul * _mm512_reduce_max_ps(_mm512_max_ps(mx0, mx1));
    // softmax_rows' std::max(m_old, tile_max): a NaN row max (an earlier NaN tile) stays NaN.
    const float m_new = tile_max != tile_max ? tile_max : (m_old < tile_max ? tile_max : m_old);
    if (m_new != m_new) {
      // A NaN score makes the row NaN (softmax_rows' rule): NaN weights in
      // the run, NaN in row_max, alpha and the sum.
      const __m512 v_nan = _mm512_set1_ps(qnan);
      for (int64_t st = 0; st < steps; ++st) {
        const int64_t e0 = 2 * (q0 + st * kT);
        const uint32_t keep = lane_bits(f - e0, e - e0);
        const __m512 lo_v = _mm512_maskz_mov_ps(__mmask16(keep), v_nan);
        const __m512 hi_v = _mm512_maskz_mov_ps(__mmask16(keep >> 16), v_nan);
        _mm512_storeu_si512(out + st * kTileWords, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi_v, lo_v)));
      }
      shift[r] = qnan;
      tile_sum[r] = qnan;
      row_max[r] = qnan;
      continue;
    }
    if (m_new == neg_inf) {  // nothing allowed yet (all scores -inf)
      zero_row();
      continue;
    }
    const __m512 v_max = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t st = 0; st < steps; ++st) {
      const int64_t e0 = 2 * (q0 + st * kT);
      const uint32_t keep = lane_bits(f - e0, e - e0);
      if (keep == 0) {
        _mm512_storeu_si512(out + st * kTileWords, _mm512_setzero_si512());
        continue;
      }
      const __mmask16 k_lo = __mmask16(keep), k_hi = __mmask16(keep >> 16);
      const __m512 x0 = _mm512_mul_ps(v_mul, _mm512_maskz_loadu_ps(k_lo, s + e0));
      const __m512 x1 = _mm512_mul_ps(v_mul, _mm512_maskz_loadu_ps(k_hi, s + e0 + 16));
      const __m512 p0 = _mm512_maskz_mov_ps(k_lo, avx512_math::exp_shifted(x0, v_max));
      const __m512 p1 = _mm512_maskz_mov_ps(k_hi, avx512_math::exp_shifted(x1, v_max));
      sum = _mm512_add_ps(sum, _mm512_add_ps(p0, p1));
      _mm512_storeu_si512(out + st * kTileWords, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(p1, p0)));
    }
    shift[r] = m_old - m_new;  // -inf for the first keys of a row: alpha = 0
    row_max[r] = m_new;
    tile_sum[r] = _mm512_reduce_add_ps(sum);
  }
  // alpha = exp(max_old - max_new) and the running sums, as softmax_rows.
  for (int64_t r0 = 0; r0 < m; r0 += kT) {
    const __mmask16 rows = __mmask16(lane_bits(0, m - r0));
    const __m512 al = avx512_math::exp_shifted(_mm512_load_ps(shift + r0), _mm512_setzero_ps());
    _mm512_mask_storeu_ps(alpha + r0, rows, al);
    const __m512 sums =
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rows, row_sum + r0), al, _mm512_load_ps(tile_sum + r0));
    _mm512_mask_storeu_ps(row_sum + r0, rows, sums);
  }
}

// Bf16Ops::gemm_tiles_k: C += the P tiles of softmax_tiles @ B.
void gemm_tiles_k(int64_t m, int64_t n, const uint32_t* p_tiles, PairSpan span, const uint32_t* B, int64_t ldb,
                  float* C, int64_t ldc) {
  if (m <= 0 || n <= 0 || span.q0 >= span.q1) return;
  if (m > 2 * kT) throw std::runtime_error("amx gemm_tiles_k: more than 32 rows");
  const int64_t steps = (span.q1 - span.q0 + kT - 1) / kT;
  tiles::configure();
  if (m > kT) {
    tiles_times_b_pair(m - kT, n, p_tiles, p_tiles + steps * kTileWords, span.q0, span.q1, steps, B, ldb, C, ldc,
                       scratch());
  } else {
    tiles_times_b(m, n, p_tiles, span.q0, span.q1, steps, B, ldb, C, ldc, scratch());
  }
  tiles::release();
}

}  // namespace

const Bf16Ops& bf16_table() {
  static const Bf16Ops ops{LR_AMX_NAME,   &gemm_band_n,   &gemm_band_k, /*forward_rows=*/2 * kT,
                           &softmax_tiles, &gemm_tiles_k};
  return ops;
}

}  // namespace longreach::cpu::LR_AMX_NS
