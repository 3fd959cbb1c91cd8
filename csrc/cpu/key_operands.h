// The key-side operands of the CPU attention kernels. A chunk packs the keys
// its blocks read once (K^T and V^T as panel-major "B" operands, see
// pack_columns), a block its extras, into KeyOperands, in the form the tile
// loops read (KeyUse): the forward's, a decoding forward's (kFewRows), or the
// backward's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <type_traits>

#include "attention_rows.h"
#include "tile_ops.h"

namespace longreach::cpu::detail {

// Keys as columns, the B operand of S = Q K^T and dP = dO V^T, panel-major as
// gemm_band_n wants it: element (x, r) = mul * src.row(index(r))[x] at
// dst[((r / W) * (D + 1) + x) * W + r % W] (a padding row per group). One zero group of slack past the last key
// (gemm_band_n may read whole vectors there). Each group of W keys is copied
// into a small row-major block, then transposed with the ISA's shuffles.
template <typename scalar_t, typename acc_t, typename IndexFn>
void pack_columns(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& src, int64_t n, IndexFn&& index,
                  int64_t D, acc_t mul, Buffer<acc_t>* dst) {
  const int64_t W = ops.vec_width;
  const int64_t groups = (n + W - 1) / W + 1;
  dst->assign(groups * (D + 1) * W, acc_t(0));
  Buffer<acc_t> rows(W * D);
  for (int64_t g = 0; g * W < n; ++g) {
    const int64_t r0 = g * W, nr = std::min(W, n - r0);
    for (int64_t r = 0; r < nr; ++r) convert_in(ops, src.row(index(r0 + r)), D, mul, rows.data() + r * D);
    acc_t* block = dst->data() + g * (D + 1) * W;
    for (int64_t x0 = 0; x0 < D; x0 += W) {
      ops.transpose(rows.data() + x0, D, block + x0 * W, W, nr, std::min(W, D - x0));
    }
  }
}

// bfloat16 keys as pair words for Bf16Ops (bf16_ops.h), copied bit for bit:
// panel-major columns (K^T for S = Q K^T) and pair rows (V for O += P V).
// D is even on this path.
// Words per pair row: whole vectors of 16 (Bf16Ops reads whole vectors of B).
inline int64_t bf16_pair_ld(int64_t D) { return (D + 15) / 16 * 16; }

// Panel-major pair columns: each group of 16 keys, as rows of D / 2 words, is
// transposed by the ISA's float transpose, which only moves bits
// (it was a scalar copy per word, 5% of a bf16 forward on AMX at D = 64). Every
// word of the buffer is written: the padding pair, a short last group's
// missing keys and the slack group are zero.
template <typename IndexFn>
void pack_pair_columns(const TileOps<float>& ops, const HeadRows<const c10::BFloat16>& src, int64_t n,
                       IndexFn&& index, int64_t D, Buffer<uint32_t>* dst) {
  constexpr int64_t W = 16;
  const int64_t k2 = D / 2, full = (n + W - 1) / W, groups = full + 1, group_words = (k2 + 1) * W;
  dst->resize(groups * group_words);
  uint32_t* const out = dst->data();
  Buffer<uint32_t> rows(W * k2);
  for (int64_t g = 0; g < full; ++g) {
    const int64_t r0 = g * W, nr = std::min(W, n - r0);
    uint32_t* block = out + g * group_words;
    // Keys evenly spaced in memory (a span's, whole words apart) are transposed
    // where they are; others are gathered first.
    const c10::BFloat16* first_row = src.row(index(r0));
    const int64_t step = nr > 1 ? src.row(index(r0 + 1)) - first_row : 0;
    bool even = step > 0 && step % 2 == 0;
    for (int64_t r = 2; r < nr && even; ++r) even = src.row(index(r0 + r)) == first_row + r * step;
    const uint32_t* words = rows.data();
    int64_t ld_words = k2;
    if (even) {
      words = reinterpret_cast<const uint32_t*>(first_row);
      ld_words = step / 2;
    } else {
      for (int64_t r = 0; r < nr; ++r) std::memcpy(rows.data() + r * k2, src.row(index(r0 + r)), k2 * sizeof(uint32_t));
    }
    if (ops.vec_width == W) {
      for (int64_t x0 = 0; x0 < k2; x0 += W) {
        ops.transpose(reinterpret_cast<const float*>(words + x0), ld_words, reinterpret_cast<float*>(block + x0 * W), W,
                      nr, std::min(W, k2 - x0));
      }
    } else {
      for (int64_t r = 0; r < nr; ++r) {
        for (int64_t p = 0; p < k2; ++p) block[p * W + r] = words[r * ld_words + p];
      }
    }
    if (nr < W) {
      for (int64_t p = 0; p < k2; ++p) std::memset(block + p * W + nr, 0, (W - nr) * sizeof(uint32_t));
    }
    std::memset(block + k2 * W, 0, W * sizeof(uint32_t));  // the padding pair
  }
  std::memset(out + full * group_words, 0, (groups - full) * group_words * sizeof(uint32_t));
}

// Pair rows: word (p, d) = rows 2p (low half) and 2p + 1 of column d, a loop
// the compiler vectorises with the baseline SSE2 unpacks. Words d >= D of a
// row, the zero row past an odd count and the slack row are written as zeros
// (not the whole buffer first: that fill was 2% of a bf16 forward).
template <typename IndexFn>
void pack_pair_rows(const HeadRows<const c10::BFloat16>& src, int64_t n, IndexFn&& index, int64_t D, int64_t ld,
                    Buffer<uint32_t>* dst) {
  const int64_t pairs = (n + 1) / 2;
  dst->resize((pairs + 1) * ld);  // a zero row past an odd count, and one of slack
  for (int64_t r = 0; r < n; r += 2) {
    const uint16_t* lo = reinterpret_cast<const uint16_t*>(src.row(index(r)));
    const uint16_t* hi = r + 1 < n ? reinterpret_cast<const uint16_t*>(src.row(index(r + 1))) : nullptr;
    uint32_t* out = dst->data() + (r / 2) * ld;
    if (hi == nullptr) {
      for (int64_t d = 0; d < D; ++d) out[d] = lo[d];
    } else {
      for (int64_t d = 0; d < D; ++d) out[d] = static_cast<uint32_t>(lo[d]) | static_cast<uint32_t>(hi[d]) << 16;
    }
    if (ld > D) std::memset(out + D, 0, (ld - D) * sizeof(uint32_t));
  }
  std::memset(dst->data() + pairs * ld, 0, ld * sizeof(uint32_t));
}

// A block's query-side rows (Q or dO of one head) for the bf16 backward: the
// rows as they are (the A of gemm_band_n) and as pair rows (the B of dK += dS^T Q
// and dV += P^T dO).
template <typename IndexFn>
void load_bf16_rows(const HeadRows<const c10::BFloat16>& src, int64_t n, IndexFn&& index, int64_t D,
                    Buffer<c10::BFloat16>* rows, Buffer<uint32_t>* pairs) {
  rows->resize(std::max<int64_t>(n, 1) * D);
  for (int64_t r = 0; r < n; ++r) std::memcpy(rows->data() + r * D, src.row(index(r)), D * sizeof(c10::BFloat16));
  pack_pair_rows(src, n, index, D, bf16_pair_ld(D), pairs);
}

// The key-side operands of a chunk (its span) or of a block's extras.
template <typename acc_t>
struct KeyOperands {
  Buffer<acc_t> kT, vT;  // scale * K^T and V^T, keys as columns, panel-major (pack_columns)
  Rows<acc_t> k, v;           // K and V rows
  // bf16 pair words (bf16_ops.h): K^T (and V^T, backward) as panel-major
  // columns, V (forward) or K (backward) as pair rows.
  Buffer<uint32_t> kT_pairs, vT_pairs, v_pairs, k_pairs;
  int64_t D = 0, W = 0, ld_pairs = 0;
  // From column / key c0 on (c0 a multiple of 16, so of 2).
  const uint32_t* kT_pairs_from(int64_t c0) const { return kT_pairs.data() + c0 / 16 * (D / 2 + 1) * 16; }
  const uint32_t* vT_pairs_from(int64_t c0) const { return vT_pairs.data() + c0 / 16 * (D / 2 + 1) * 16; }
  const uint32_t* v_pairs_from(int64_t c0) const { return v_pairs.data() + c0 / 2 * ld_pairs; }
  const uint32_t* k_pairs_from(int64_t c0) const { return k_pairs.data() + c0 / 2 * ld_pairs; }
  // The panels from column c0 on (c0 a multiple of W).
  const acc_t* kT_from(int64_t c0) const { return kT.data() + c0 / W * (D + 1) * W; }
  const acc_t* vT_from(int64_t c0) const { return vT.data() + c0 / W * (D + 1) * W; }
};

// Which operands the tile loops read: the forward's products take scale * K^T
// packed and V rows, or, for blocks of a few rows (kFewRows), K and V rows as
// they are; the backward's take scale * K^T and V^T packed and K rows. The
// bf16 kinds hold the same operands as bf16 pair words (bf16_ops.h), K^T
// unscaled (the products take scale as their `mul`).
enum class KeyUse { kForward, kForwardFewRows, kBackward, kForwardBf16, kBackwardBf16 };

// A forward whose query rows are this few per head (decoding) reads keys as
// rows (TileOps::rows_dot / rows_axpy): packing K^T would cost as much as the
// products themselves. Measured 2.7x faster at one query row, window 512.
constexpr int64_t kFewRows = 4;

template <typename scalar_t, typename acc_t, typename IndexFn>
void load_key_operands(const TileOps<acc_t>& ops, const HeadRows<const scalar_t>& K, const HeadRows<const scalar_t>& V,
                       int64_t n, IndexFn&& index, bool regular, int64_t D, acc_t scale, KeyUse use,
                       KeyOperands<acc_t>* out) {
  out->D = D;
  out->W = ops.vec_width;
  switch (use) {
    case KeyUse::kForward:
      pack_columns(ops, K, n, index, D, scale, &out->kT);
      load_rows(ops, V, n, index, regular, D, &out->v);
      break;
    case KeyUse::kForwardFewRows:
      load_rows(ops, K, n, index, regular, D, &out->k);
      load_rows(ops, V, n, index, regular, D, &out->v);
      break;
    case KeyUse::kBackward:
      pack_columns(ops, K, n, index, D, scale, &out->kT);
      pack_columns(ops, V, n, index, D, acc_t(1), &out->vT);
      load_rows(ops, K, n, index, regular, D, &out->k);
      break;
    case KeyUse::kForwardBf16:
    case KeyUse::kBackwardBf16:
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        out->ld_pairs = bf16_pair_ld(D);
        pack_pair_columns(ops, K, n, index, D, &out->kT_pairs);
        if (use == KeyUse::kForwardBf16) {
          pack_pair_rows(V, n, index, D, out->ld_pairs, &out->v_pairs);
        } else {
          pack_pair_columns(ops, V, n, index, D, &out->vT_pairs);
          pack_pair_rows(K, n, index, D, out->ld_pairs, &out->k_pairs);
        }
      } else {
        TORCH_CHECK(false, "the bf16 key operands are for bfloat16 keys");
      }
      break;
  }
}

}  // namespace longreach::cpu::detail
