// Bf16Ops on AMX-BF16 (csrc/cpu/amx_bf16_impl.h) with the tile layer mapped to
// the AMX intrinsics. CMakeLists.txt compiles this file alone with
// -mamx-tile -mamx-bf16 (and the AVX512_BF16 file's flags: every AMX CPU has
// them, and the packing loops vectorise with them); bf16_dispatch.cpp hands the
// table out only where cpuid reports AMX-TILE and AMX-BF16, the OS grants the
// tile state (arch_prctl) and a first-use self-check agrees with AVX512_BF16.
// Not run on the development machine (no AMX there): the same kernel runs in
// tests on the software tiles of tile_ops_amx_emulated.cpp.
#include <immintrin.h>

#include <cstdint>

namespace longreach::cpu::AMX_BF16::tiles {
namespace {

// The 64-byte tile configuration of palette 1 (Intel SDM, LDTILECFG).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes: C 16 x 16 float32, A and B 16 rows of 16 pair words.
inline void configure() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}
inline void release() { _tile_release(); }
// GCC's AMX intrinsics are macros that paste the tile number into the
// instruction's text, so it must be a literal: one specialisation per tile
// (and per (C, A, B) triple that amx_bf16_impl.h uses), written out here.
template <int T>
void zero();
template <int T>
void load(const void* base, int64_t stride);
template <int T>
void store(void* base, int64_t stride);
template <int C, int A, int B>
void dot();

#define LR_TILE(T)                                                                      \
  template <>                                                                           \
  inline void zero<T>() {                                                               \
    _tile_zero(T);                                                                      \
  }                                                                                     \
  template <>                                                                           \
  inline void load<T>(const void* base, int64_t stride) {                               \
    _tile_loadd(T, base, stride);                                                       \
  }                                                                                     \
  template <>                                                                           \
  inline void store<T>(void* base, int64_t stride) {                                    \
    _tile_stored(T, base, stride);                                                      \
  }
LR_TILE(0)
LR_TILE(1)
LR_TILE(2)
LR_TILE(3)
LR_TILE(4)
LR_TILE(5)
LR_TILE(6)
LR_TILE(7)
#undef LR_TILE

#define LR_DOT(C, A, B)   \
  template <>             \
  inline void dot<C, A, B>() { \
    _tile_dpbf16ps(C, A, B); \
  }
LR_DOT(0, 4, 5)
LR_DOT(1, 4, 6)
LR_DOT(2, 4, 7)
LR_DOT(3, 4, 5)
LR_DOT(0, 4, 6)
LR_DOT(2, 5, 6)
LR_DOT(1, 4, 7)
LR_DOT(3, 5, 7)
#undef LR_DOT

}  // namespace
}  // namespace longreach::cpu::AMX_BF16::tiles

#define LR_AMX_NS AMX_BF16
#define LR_AMX_NAME "amx_bf16"
#include "../amx_bf16_impl.h"
