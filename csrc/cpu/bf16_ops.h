// bfloat16 products on the CPU's bf16 dot-product instruction (AVX512_BF16
// vdpbf16ps: per float lane, acc += a0 * b0 + a1 * b1 for two bf16 pairs, the
// sum kept in float32) or on AMX-BF16 tiles. The AVX512_BF16 table is compiled
// in csrc/cpu/isa/tile_ops_avx512_bf16.cpp with its own -m flags; the AMX one
// (amx_bf16_impl.h) twice, on the AMX intrinsics (isa/tile_ops_amx_bf16.cpp)
// and on a software model of the tiles for tests (isa/tile_ops_amx_emulated.cpp).
// bf16_ops() (bf16_dispatch.cpp) returns the AVX512_BF16 table where the CPU
// has the instruction and ATen runs its AVX512 capability, the AMX table
// instead where cpuid also reports AMX-TILE and AMX-BF16, the OS grants the tile
// state and a first-use self-check agrees with AVX512_BF16, else nullptr, and
// the kernels then convert bf16 rows to float and use TileOps<float> as before.
// LONGREACH_CPU_BF16=0 turns both off (the float path), =1 requires the bf16
// products (an error on a CPU without them): the tests run both.
// LONGREACH_CPU_AMX=0 keeps AVX512_BF16 where AMX exists, =1 requires AMX,
// =emulate runs the AMX kernel on the software tiles (slow; tests only).
//
// The operands are "pair words": two bf16 values in one 32-bit word, the first
// in the low half, which is the layout the instruction reads. Two layouts:
//  - panel-major columns (keys as columns of S = Q K^T): group g of 16 columns
//    at B + g * (k2 + 1) * 16 words, pair p of column c at + p * 16 + c % 16
//    (k2 = k / 2 pairs, one padding pair per group, and one zero group of
//    slack past the last column), as TileOps::gemm_band_n's float panels;
//  - pair rows (V, K, Q, dO as the B of C += A B): word (p, c) holds rows
//    2p and 2p + 1 of column c at B[p * ldb + c], a zero row past an odd count.
// Softmax, the accumulators and the outputs stay float32: only the inputs of
// a product are bf16. A float A operand of gemm_band_k (P or dS) is rounded to
// bf16 (round to nearest even) inside the call; see docs/performance.md for
// which products do that.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

namespace longreach::cpu {

// Key pairs [q0, q1) that a block's P tiles (softmax_tiles) cover; empty when q0 >= q1.
struct PairSpan {
  int64_t q0 = 0, q1 = 0;
};

struct Bf16Ops {
  const char* isa;
  // C = mul * A @ B over the rows' runs, exactly as TileOps<float>::gemm_band_n
  // (C written on whole vectors of 16 columns of the runs' block unions, up to
  // round_up(n, 16); AMX: unions of 32-row blocks). A: m rows of k bf16 (k
  // even) at A + a * lda; B panel-major.
  void (*gemm_band_n)(int64_t m, int64_t n, int64_t k, const c10::BFloat16* A, int64_t lda, const uint32_t* B,
                      float mul, float* C, int64_t ldc, const int64_t* first, const int64_t* end);
  // C += round_bf16(A) @ B as TileOps<float>::gemm_band_k: A float, element (i, p)
  // at A[i * a_row + p * a_col] with a_col == 1 or a_row == 1, non-zero only in
  // [first[i], end[i]); B pair rows with leading dimension ldb (>= n words).
  void (*gemm_band_k)(int64_t m, int64_t n, int64_t k, const float* A, int64_t a_row, int64_t a_col,
                      const uint32_t* B, int64_t ldb, float* C, int64_t ldc, const int64_t* first,
                      const int64_t* end);
  // Query rows the forward takes through S = Q K^T, softmax and O += P V at a
  // time (0: the whole block of kRowBlock rows). AMX: two 16-row tiles, so that
  // each K^T and V tile loaded serves 32 rows (amx_bf16_impl.h) and the fused
  // softmax below reads 32 rows of scores (<= 132 KiB) the product just wrote.
  int64_t forward_rows;
  // The forward's plain softmax fused with P's packing, where the table has it
  // (AMX; else both nullptr). softmax_tiles takes m <= forward_rows rows of raw
  // products S (gemm_band_n with mul = 1) and the scale mul > 0, and does what
  // TileOps<float>::softmax_rows does on mul * S over the runs [first, end)
  // (row_max, row_sum and alpha updated alike, NaN and empty rows included),
  // except that the weights, rounded to bf16, go into `tiles` (p_tile_words(k)
  // words) instead of back into S; *span says which key pairs they cover.
  // gemm_tiles_k then adds those weights times B (pair rows, ldb words) to C's
  // m rows of n columns, as gemm_band_k would with the float weights. Between
  // the two calls the caller rescales C by alpha (online softmax).
  void (*softmax_tiles)(int64_t m, int64_t k, const float* S, int64_t ld_s, float mul, const int64_t* first,
                        const int64_t* end, float* row_max, float* row_sum, float* alpha, uint32_t* tiles,
                        PairSpan* span);
  void (*gemm_tiles_k)(int64_t m, int64_t n, const uint32_t* tiles, PairSpan span, const uint32_t* B, int64_t ldb,
                       float* C, int64_t ldc);
};

// Words softmax_tiles may write for a tile of k keys: two row tiles of 16 x
// 16-word tiles covering at most (k + 1) / 2 pairs from any even start.
// (Internal linkage: the -m flagged files include this header too,
// flagged_helpers.h says why.)
namespace {
inline int64_t p_tile_words(int64_t k) { return 2 * ((k + 1) / 2 / 16 + 2) * 256; }
}  // namespace

// The table this process uses, or nullptr (see above). Decided once.
const Bf16Ops* bf16_ops();
// The rule behind it, testable on any machine: "avx512_bf16" or "off" for the
// variable's value, ATen's capability and cpuid's answer; raises for a bad value
// (ValueError) or for =1 where the kernels cannot run.
std::string choose_bf16_kernels(const std::string& env, const std::string& capability, bool cpu_has_bf16);
// The AMX rule, testable on any machine: "amx_bf16", "amx_bf16_emulated" or
// "off" for LONGREACH_CPU_AMX's value, the bf16 rule's answer above, cpuid's
// AMX-TILE + AMX-BF16 and whether the OS granted the tile state. Raises for a
// bad value (ValueError) or for =1 / =emulate where the kernels cannot run.
// ("emulate_broken" is "emulate" with a broken tile op, for the self-check's test.)
std::string choose_amx_kernels(const std::string& env, const std::string& bf16_choice, bool cpu_has_amx,
                               bool os_grants_amx);
// The first-use self-check: the largest difference between `test`'s and
// `ref`'s products on a small banded problem of each kind (both layouts of
// gemm_band_k, K and N tails), relative to the largest result. The AMX table
// is used only when this is below kAmxSelfCheckTolerance.
double bf16_table_difference(const Bf16Ops& test, const Bf16Ops& ref);
constexpr double kAmxSelfCheckTolerance = 1e-4;
// The self-check of the emulated AMX table against AVX512_BF16, with the
// emulated tile op broken or not (a test hook; needs AVX512_BF16).
double amx_emulated_self_check(bool broken);
// "avx512", "avx512+avx512_bf16", "avx512+amx_bf16", ...: the float table and the bf16 one in use.
std::string cpu_kernels_in_use();

namespace AVX512_BF16 {
const Bf16Ops& bf16_table();
}  // namespace AVX512_BF16
namespace AMX_BF16 {
const Bf16Ops& bf16_table();
}  // namespace AMX_BF16
namespace AMX_EMULATED {
const Bf16Ops& bf16_table();
void set_emulated_tile_fault(bool on);  // on the calling thread
}  // namespace AMX_EMULATED

}  // namespace longreach::cpu
