// Helpers for the translation units compiled with their own -m flags
// (csrc/cpu/isa/tile_ops_avx512_bf16.cpp and the two AMX files).
//
// Why not std::min, std::vector, std::string there: an inline function or a
// template member (std::vector::resize, std::string's constructor, even
// std::min at -O0) instantiated in such a file is a weak symbol compiled with
// those flags, and the linker keeps one copy of it for the whole library, so
// a CPU without AVX-512 could run an AVX-512 copy through an unrelated call.
// Everything here is in an unnamed namespace: each including file gets its own
// internal copy, never shared with the rest of the library.
#pragma once

#include <cstdint>
#include <new>

namespace longreach::cpu::flagged {
namespace {

inline int64_t lmin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t lmax(int64_t a, int64_t b) { return a > b ? a : b; }
inline int64_t lclamp(int64_t x, int64_t lo, int64_t hi) { return lmin(hi, lmax(lo, x)); }
inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A growing, 64-byte aligned buffer of T (plain new[], not std::vector: see
// above). get(n) keeps nothing of the old contents when it grows.
template <typename T>
struct AlignedBuffer {
  T* p = nullptr;
  int64_t cap = 0;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { ::operator delete[](p, std::align_val_t(64)); }
  T* get(int64_t n) {
    if (n > cap) {
      ::operator delete[](p, std::align_val_t(64));
      p = nullptr;  // cleared first: a throwing new must not leave a freed pointer behind
      cap = 0;
      p = static_cast<T*>(::operator new[](n * sizeof(T), std::align_val_t(64)));
      cap = n;
    }
    return p;
  }
};

}  // namespace
}  // namespace longreach::cpu::flagged
