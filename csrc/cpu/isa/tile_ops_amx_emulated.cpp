// Bf16Ops on a software model of the AMX tiles (csrc/cpu/amx_bf16_impl.h): the
// AMX kernel's packing and tiling, run on any CPU with AVX512_BF16, for tests
// (LONGREACH_CPU_AMX=emulate; tests/test_cpu_amx.py) and never chosen
// otherwise. Plain C++ (compiled with the AVX512_BF16 flags for the packing in
// amx_bf16_impl.h; the model itself uses no intrinsics). The model follows the instructions'
// definitions in the Intel SDM:
//  - a tile is `rows` rows of `colsb` bytes (16 x 64 here), set by configure();
//    a load reads rows x colsb bytes, `stride` bytes apart, and zeroes the rest
//    of the tile (as a configured tile's unused part reads zero);
//  - TDPBF16PS: each dword of A (row m, k) and of B (row k, column n) is a pair
//    of bf16, low half first (B in the "VNNI" pair layout); per (m, n) the even
//    and the odd products are summed over k in two float32 accumulators with
//    FMAs (round to nearest even, input denormals read as zero, output
//    denormals flushed), then C[m][n] += even + odd.
// The shapes are checked (A's colsb / 4 == B's rows, C's colsb == B's colsb,
// C's rows == A's rows), as the hardware would fault.
// set_emulated_tile_fault(true) breaks TDPBF16PS (the odd products are
// dropped) on the calling thread, so the tests can see the self-check of
// bf16_dispatch.cpp reject a wrong tile kernel.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace longreach::cpu::AMX_EMULATED {

namespace {
struct TileState {
  bool configured = false;
  int rows[8] = {};
  int colsb[8] = {};
  alignas(64) unsigned char data[8][16 * 64] = {};
  bool fault = false;
};
TileState& state() {
  thread_local TileState s;
  return s;
}
}  // namespace

void set_emulated_tile_fault(bool on) { state().fault = on; }

namespace tiles {
namespace {

inline void configure() {
  TileState& s = state();
  for (int t = 0; t < 8; ++t) {
    s.rows[t] = 16;
    s.colsb[t] = 64;
  }
  s.configured = true;
}
inline void release() { state().configured = false; }

inline TileState& checked(int t) {
  TileState& s = state();
  if (!s.configured || t < 0 || t >= 8) throw std::logic_error("emulated AMX: tile used without a configuration");
  return s;
}
template <int T>
void zero() {
  std::memset(checked(T).data[T], 0, sizeof(TileState::data[0]));
}
template <int T>
void load(const void* base, int64_t stride) {
  TileState& s = checked(T);
  std::memset(s.data[T], 0, sizeof(TileState::data[0]));
  for (int r = 0; r < s.rows[T]; ++r) {
    std::memcpy(s.data[T] + r * 64, static_cast<const unsigned char*>(base) + r * stride, s.colsb[T]);
  }
}
template <int T>
void store(void* base, int64_t stride) {
  TileState& s = checked(T);
  for (int r = 0; r < s.rows[T]; ++r) {
    std::memcpy(static_cast<unsigned char*>(base) + r * stride, s.data[T] + r * 64, s.colsb[T]);
  }
}

inline float bf16_in(uint16_t h) {  // input denormals read as zero
  if ((h & 0x7F80u) == 0) h &= 0x8000u;
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }

template <int C, int A, int B>
void dot() {
  TileState& s = checked(C);
  const int K = s.colsb[A] / 4, N = s.colsb[C] / 4, M = s.rows[C];
  if (s.rows[B] != K || s.colsb[B] != s.colsb[C] || s.rows[A] != M || C == A || C == B || A == B) {
    throw std::logic_error("emulated AMX: tdpbf16ps with mismatched tile shapes");
  }
  for (int m = 0; m < M; ++m) {
    float* c = reinterpret_cast<float*>(s.data[C] + m * 64);
    const uint16_t* a = reinterpret_cast<const uint16_t*>(s.data[A] + m * 64);
    for (int n = 0; n < N; ++n) {
      float even = 0.f, odd = 0.f;
      for (int k = 0; k < K; ++k) {
        const uint16_t* b = reinterpret_cast<const uint16_t*>(s.data[B] + k * 64);
        even = flush(std::fma(bf16_in(a[2 * k]), bf16_in(b[2 * n]), even));
        if (!s.fault) odd = flush(std::fma(bf16_in(a[2 * k + 1]), bf16_in(b[2 * n + 1]), odd));
      }
      c[n] = flush(c[n] + flush(even + odd));
    }
  }
}

}  // namespace
}  // namespace tiles
}  // namespace longreach::cpu::AMX_EMULATED

#define LR_AMX_NS AMX_EMULATED
#define LR_AMX_NAME "amx_bf16_emulated"
#include "../amx_bf16_impl.h"
