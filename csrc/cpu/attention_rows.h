// Rows of the CPU attention kernels' operands, and the helpers every kernel
// shares: cache-line aligned buffers (Buffer), the rows of one head of one
// problem in a dense (B, H, L, D) or packed (total, H, D) tensor (HeadRows,
// q_rows, k_rows) and its per-row statistics (stat_row), conversions between
// the input type and the accumulation type (convert_in, convert_out), a
// block's or chunk's rows as acc_t rows (Rows, load_rows), the ALiBi slope of a
// head, prefetching, and parallel_items, which hands the kernels' work items
// (row chunks) to the intra-op threads.
//
// float32 and float64 rows are read in place; bfloat16 and float16 rows are
// converted to float once per chunk (keys) or block (queries) and accumulated
// in float.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <new>
#include <type_traits>
#include <vector>

#include "../common/params.h"
#include "tile_ops.h"
#include "tile_plan.h"

namespace longreach::cpu::detail {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Scratch and packed operands start on a cache line, so the 64-byte vector
// loads and stores of the kernels never straddle two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;

template <typename T>
struct HeadRows {  // rows of one head of one problem, contiguous within a row
  T* data;
  int64_t stride_l;
  T* row(int64_t l) const { return data + l * stride_l; }
};

// Head h of problem b: batch row b of a dense (B, H, L, D) tensor, or the rows
// from `start` on of a packed (total, H, D) tensor (start: the sequence's
// q_start or k_start, see geometry.h).
template <typename T>
HeadRows<T> head_rows(const at::Tensor& t, int64_t b, int64_t start, int64_t h) {
  T* base = static_cast<T*>(t.data_ptr());
  if (t.dim() == 3) return {base + start * t.stride(0) + h * t.stride(1), t.stride(0)};
  return {base + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Query-side (q, out, grad_out, dq) and key-side (k, v, dk, dv) rows of problem b.
template <typename T>
HeadRows<T> q_rows(const at::Tensor& t, const TilePlan& plan, int64_t b, int64_t h) {
  return head_rows<T>(t, b, plan.seq(b).q_start, h);
}
template <typename T>
HeadRows<T> k_rows(const at::Tensor& t, const TilePlan& plan, int64_t b, int64_t h) {
  return head_rows<T>(t, b, plan.seq(b).k_start, h);
}

// Per-row statistics (lse, the softmax row dots) of head h of problem b: a
// dense (B, Hq, Lq) tensor or a packed (Hq, total_q) one, contiguous.
template <typename T>
T* stat_row(const at::Tensor& t, const AttentionParams& P, const TilePlan& plan, int64_t b, int64_t h) {
  T* base = t.data_ptr<T>();
  if (t.dim() == 2) return base + h * t.size(1) + plan.seq(b).q_start;
  return base + (b * P.q_heads + h) * P.q_len;
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
inline at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// dst[i] = mul * src[i] from the input type to the accumulation type, and back
// (vectorised for bfloat16 / float16 by the ISA tables).
template <typename scalar_t, typename acc_t>
void convert_in(const TileOps<acc_t>& ops, const scalar_t* src, int64_t n, acc_t mul, acc_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = mul * src[i];
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ops.bf16_to_float(src, n, mul, dst);
  } else {
    static_assert(std::is_same_v<scalar_t, c10::Half>, "unexpected input type");
    ops.half_to_float(src, n, mul, dst);
  }
}

template <typename scalar_t, typename acc_t>
void convert_out(const TileOps<acc_t>& ops, const acc_t* src, int64_t n, acc_t mul, scalar_t* dst) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = mul * src[i];
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    ops.float_to_bf16(src, n, mul, dst);
  } else {
    ops.float_to_half(src, n, mul, dst);
  }
}

template <typename acc_t>
acc_t alibi_slope(const AttentionParams& P, const at::Tensor& slopes, int64_t b, int64_t h) {
  if (!P.has_alibi) return acc_t(0);
  const float* s = slopes.data_ptr<float>();
  return static_cast<acc_t>(slopes.dim() == 2 ? s[b * slopes.stride(0) + h * slopes.stride(1)]
                                              : s[h * slopes.stride(0)]);
}

// Rows of a (B, H, L, D) head as acc_t rows: row r of a chunk's key range (or
// of a block's rows) at ptr + r * ld. float/double inputs whose rows are
// adjacent (ld == D) are used in place; anything else is gathered (and
// converted) into `copy` once. Strided rows used in place (the packed varlen
// layout, rows H * D apart, or dilated classes, d * D apart) are reread by
// every tile's product across many pages: the packed forward at L = 16384,
// H = 8, D = 64, window 511 took 277 ms in place, 222 ms copied (one thread;
// the dense layout 185 ms).
template <typename acc_t>
struct Rows {
  const acc_t* ptr = nullptr;
  int64_t ld = 0;
  Buffer<acc_t> copy;
  const acc_t* row(int64_t r) const { return ptr + r * ld; }
};

template <typename scalar_t, typename acc_t, typename IndexFn>
void load_rows(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& src, int64_t n, IndexFn&& index,
               bool regular, int64_t D, Rows<acc_t>* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (regular && (n < 2 || src.row(index(1)) - src.row(index(0)) == D)) {
      out->ptr = n > 0 ? src.row(index(0)) : nullptr;
      out->ld = D;
      return;
    }
  }
  out->copy.resize(std::max<int64_t>(n, 1) * D);
  for (int64_t r = 0; r < n; ++r) convert_in(ops, src.row(index(r)), D, acc_t(1), out->copy.data() + r * D);
  out->ptr = out->copy.data();
  out->ld = D;
}

// Asks the caches for rows[a] + shift of a head, the query rows the next
// head or block will read: they come from memory, and a micro-kernel waiting
// for its first operands would stall.
template <typename T>
void prefetch_rows(const HeadRows<const T>& src, const std::vector<int64_t>& rows, int64_t D, int64_t n_rows,
                   int64_t shift = 0) {
  constexpr int64_t kLine = 64;
  const int64_t bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t r : rows) {
    if (r + shift >= n_rows) break;
    const char* p = reinterpret_cast<const char*>(src.row(r + shift));
    for (int64_t o = 0; o < bytes; o += kLine) __builtin_prefetch(p + o);
  }
}

// Equally spaced rows can be read in place with one leading dimension.
inline bool rows_are_regular(const std::vector<int64_t>& rows) {
  for (size_t a = 2; a < rows.size(); ++a) {
    if (rows[a] - rows[a - 1] != rows[1] - rows[0]) return false;
  }
  return true;
}

// Runs body(item, scratch) for items 0..n-1 on the intra-op threads, handing
// items out one at a time from a shared counter: on a machine where a core
// can be taken away for a while, the other threads pick up its share instead
// of waiting for it at the end. Which thread runs an item never changes the
// result (items write disjoint outputs or private buffers).
template <typename MakeScratch, typename Body>
void parallel_items(int64_t n, MakeScratch&& make_scratch, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) body(i, scratch);
  });
}

}  // namespace longreach::cpu::detail
