// The problems the threaded emulation runs, and their kernel arguments built
// without ATen (the harness links no torch library, so the sanitizers see all
// of it): what csrc/cuda/attention_launch.h's make_global_tokens and
// make_attention_args compute, in plain loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <new>
#include <random>
#include <string>
#include <vector>

#include "common/window.h"
#include "cuda/attention_blocks.cuh"

namespace longreach::cuda_kernels::threaded_emulation {

// One problem. Dense batches: B sequences of Lq rows and Lk keys. Packed
// (varlen) batches: `lq` / `lk` give each sequence's lengths (B, Lq, Lk unused).
struct Case {
  std::string name;
  int64_t B, Hq, Hk, Lq, Lk, D;
  int64_t left, right, dilation;  // window sides in dilated steps, -1 = unbounded
  int global_every = 0;           // every n-th key (from key 1) is global; 0 = no global tokens
  bool alibi = false;             // learnable ALiBi: also checks the slope gradient's warp sums
  double softcap = 0.0;
  bool sigmoid = false;
  std::vector<int64_t> lq = {}, lk = {};
  int pad_every = 0;  // dense only: key_padding_mask on every n-th key (from key 2) and keys 20..39 of batch 0
  int64_t chunk = 0, chunk_phase = 0;  // chunked attention (one chunk grid; 0 = no chunks)
  double dropout_p = 0.0;              // attention dropout, seeded by the harness's fixed (seed, offset)
  bool packed() const { return !lq.empty(); }
};

// Exactly n elements on a 64-byte boundary: 16-byte loads are legal, and
// AddressSanitizer reports a read one element past the end.
template <typename U>
struct AlignedAllocator {
  using value_type = U;
  AlignedAllocator() = default;
  template <typename V>
  AlignedAllocator(const AlignedAllocator<V>&) {}
  U* allocate(size_t n) { return static_cast<U*>(::operator new(n * sizeof(U), std::align_val_t(64))); }
  void deallocate(U* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename V>
  bool operator==(const AlignedAllocator<V>&) const { return true; }
  template <typename V>
  bool operator!=(const AlignedAllocator<V>&) const { return false; }
};
template <typename U>
using Array = std::vector<U, AlignedAllocator<U>>;

// Inputs in float32 (rounded to the element type per run) and the geometry.
struct Problem {
  Case c;
  AttentionParams P;
  int64_t total_q = 0, total_k = 0;  // rows / keys over all sequences
  std::vector<int64_t> cu_q, cu_k;   // sequence starts, dense batches too (b * Lq, b * Lk)
  std::vector<float> q, k, v, grad_out, slopes;
  std::vector<uint8_t> global_key;   // per key, in the packed order
  // Global-token lists as the launcher builds them (attention_launch.h).
  std::vector<uint8_t> flags;
  std::vector<int64_t> keys, count, row_start;
  // Key padding as the launcher passes it (make_key_padding): (B, Lk) flags, real keys per row.
  std::vector<uint8_t> padded;
  std::vector<int64_t> keys_present;

  int64_t q_len(int64_t b) const { return cu_q[b + 1] - cu_q[b]; }
  int64_t k_len(int64_t b) const { return cu_k[b + 1] - cu_k[b]; }
  // Element offset of (sequence b, head h, row i) in a q-like tensor, and of its lse entry.
  int64_t q_offset(int64_t b, int64_t h, int64_t i) const {
    if (c.packed()) return ((cu_q[b] + i) * P.q_heads + h) * P.head_dim;
    return ((b * P.q_heads + h) * P.q_len + i) * P.head_dim;
  }
  int64_t stat_index(int64_t b, int64_t h, int64_t i) const {
    return c.packed() ? h * total_q + cu_q[b] + i : (b * P.q_heads + h) * P.q_len + i;
  }
};

inline Problem make_problem(const Case& c, unsigned seed) {
  Problem p;
  p.c = c;
  const int64_t n_seq = c.packed() ? static_cast<int64_t>(c.lq.size()) : c.B;
  p.cu_q.assign(1, 0);
  p.cu_k.assign(1, 0);
  int64_t max_q = 0, max_k = 0;
  for (int64_t b = 0; b < n_seq; ++b) {
    const int64_t lq = c.packed() ? c.lq[b] : c.Lq, lk = c.packed() ? c.lk[b] : c.Lk;
    p.cu_q.push_back(p.cu_q.back() + lq);
    p.cu_k.push_back(p.cu_k.back() + lk);
    max_q = std::max(max_q, lq);
    max_k = std::max(max_k, lk);
  }
  p.total_q = p.cu_q.back();
  p.total_k = p.cu_k.back();

  AttentionParams& P = p.P;
  P.batch = n_seq;
  P.q_heads = c.Hq;
  P.kv_heads = c.Hk;
  P.q_len = max_q;
  P.k_len = max_k;
  P.head_dim = c.D;
  P.window.left = clip_window_side(c.left, max_q, max_k);
  P.window.right = clip_window_side(c.right, max_q, max_k);
  P.window.dilation = clip_dilation(c.dilation, max_q, max_k);
  P.score = c.sigmoid ? ScoreKind::kSigmoid : ScoreKind::kSoftmax;
  P.default_sigmoid_bias = c.sigmoid;  // -ln(window size) per sequence
  P.scale = 1.0 / std::sqrt(static_cast<double>(c.D));
  P.softcap = c.softcap;
  P.has_alibi = c.alibi;
  P.has_global = c.global_every > 0;
  P.has_key_padding = c.pad_every > 0;
  P.window.chunk = c.chunk;
  P.window.chunk_phase = c.chunk_phase;
  if (c.dropout_p > 0.0) {  // what set_dropout (attention_params.cpp) makes of dropout_p and a seed
    P.dropout.enabled = true;
    P.dropout.seed = 0x243F6A8885A308D3ull;
    P.dropout.offset = 0x13198A2E03707344ull;
    P.dropout.threshold = static_cast<uint64_t>(std::llround(c.dropout_p * 4294967296.0));
    P.dropout.keep_scale = c.dropout_p < 1.0 ? 1.0 / (1.0 - c.dropout_p) : 0.0;
  }

  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::vector<float>& x, int64_t n, float sd) {
    x.resize(static_cast<size_t>(n));
    for (float& e : x) e = sd * normal(gen);
  };
  randn(p.q, p.total_q * c.Hq * c.D, 1.0f);
  randn(p.k, p.total_k * c.Hk * c.D, 1.0f);
  randn(p.v, p.total_k * c.Hk * c.D, 1.0f);
  randn(p.grad_out, p.total_q * c.Hq * c.D, 1.0f);
  randn(p.slopes, n_seq * c.Hq, 0.3f);

  if (P.has_key_padding) {
    p.padded.assign(static_cast<size_t>(n_seq * max_k), 0);
    p.keys_present.assign(static_cast<size_t>(n_seq), 0);
    for (int64_t b = 0; b < n_seq; ++b) {
      for (int64_t j = 2; j < max_k; j += c.pad_every) p.padded[b * max_k + j] = 1;
      for (int64_t j = 20; b == 0 && j < 40 && j < max_k; ++j) p.padded[j] = 1;
      for (int64_t j = 0; j < max_k; ++j) p.keys_present[b] += !p.padded[b * max_k + j];
    }
  }
  p.global_key.assign(static_cast<size_t>(p.total_k), 0);
  if (P.has_global) {
    for (int64_t j = 1; j < p.total_k; j += c.global_every) p.global_key[j] = 1;
    // A padded position holds no key, so no global one either (the launcher clears its flag;
    // padding is dense-only, where the packed key order is b * Lk + j).
    for (int64_t j = 0; P.has_key_padding && j < p.total_k; ++j) p.global_key[j] &= !p.padded[j];
    // (B, max Lk) flags, then per sequence: the global keys in index order
    // followed by the others, their count, and how many sit before the first
    // row's position (row = key - (Lk - Lq)).
    p.flags.assign(static_cast<size_t>(n_seq * max_k), 0);
    p.keys.assign(static_cast<size_t>(n_seq * max_k), 0);
    p.count.assign(static_cast<size_t>(n_seq), 0);
    p.row_start.assign(static_cast<size_t>(n_seq), 0);
    for (int64_t b = 0; b < n_seq; ++b) {
      for (int64_t j = 0; j < p.k_len(b); ++j) p.flags[b * max_k + j] = p.global_key[p.cu_k[b] + j];
      int64_t n = 0;
      for (int64_t j = 0; j < max_k; ++j)
        if (p.flags[b * max_k + j]) p.keys[b * max_k + n++] = j;
      p.count[b] = n;
      for (int64_t j = 0, m = n; j < max_k; ++j)
        if (!p.flags[b * max_k + j]) p.keys[b * max_k + m++] = j;
      const int64_t offset = p.k_len(b) - p.q_len(b);
      for (int64_t j = 0; j < offset; ++j) p.row_start[b] += p.flags[b * max_k + j];
    }
  }
  return p;
}

// The tensors of one run in element type T, and the kernel arguments pointing into them.
template <typename T>
struct RunBuffers {
  Array<T> q, k, v, grad_out, out, dq, dk, dv;
  Array<float> lse, row_dot, slope_grad;
  Array<float> dk_part, dv_part;  // the GQA dK/dV split by query head (AttentionArgs::dk_part)
  std::vector<float> slopes;
  AttentionArgs<T, float> args{};
};

template <typename T>
Array<T> rounded(const std::vector<float>& x) {
  Array<T> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) out[i] = static_cast<T>(x[i]);
  return out;
}

template <typename U>
HeadTensor<U> head_tensor(const Problem& p, U* data, int64_t heads, int64_t len, const int64_t* starts) {
  const int64_t D = p.P.head_dim;
  if (p.c.packed()) return HeadTensor<U>{data, 0, D, heads * D, starts};
  return HeadTensor<U>{data, heads * len * D, len * D, D, nullptr};
}

template <typename T>
void make_args(const Problem& p, RunBuffers<T>& r, bool vec_loads, bool dkv_split = false) {
  const AttentionParams& P = p.P;
  r.q = rounded<T>(p.q);
  r.k = rounded<T>(p.k);
  r.v = rounded<T>(p.v);
  r.grad_out = rounded<T>(p.grad_out);
  r.out.assign(r.q.size(), T(0.0f));
  r.dq.assign(r.q.size(), T(0.0f));
  r.dk.assign(r.k.size(), T(0.0f));
  r.dv.assign(r.v.size(), T(0.0f));
  r.lse.assign(static_cast<size_t>(P.q_heads * p.total_q), -INFINITY);
  r.slope_grad.assign(r.lse.size(), 0.0f);
  r.slopes = p.slopes;

  AttentionArgs<T, float>& a = r.args;
  a = AttentionArgs<T, float>{};
  a.P = P;
  const int64_t* qs = p.c.packed() ? p.cu_q.data() : nullptr;
  const int64_t* ks = p.c.packed() ? p.cu_k.data() : nullptr;
  if (p.c.packed()) {
    a.cu_q = qs;
    a.cu_k = ks;
    a.total_q = p.total_q;
  }
  a.q = head_tensor<const T>(p, r.q.data(), P.q_heads, P.q_len, qs);
  a.k = head_tensor<const T>(p, r.k.data(), P.kv_heads, P.k_len, ks);
  a.v = head_tensor<const T>(p, r.v.data(), P.kv_heads, P.k_len, ks);
  a.grad_out = head_tensor<const T>(p, r.grad_out.data(), P.q_heads, P.q_len, qs);
  a.out = head_tensor<T>(p, r.out.data(), P.q_heads, P.q_len, qs);
  a.dq = head_tensor<T>(p, r.dq.data(), P.q_heads, P.q_len, qs);
  a.dk = head_tensor<T>(p, r.dk.data(), P.kv_heads, P.k_len, ks);
  a.dv = head_tensor<T>(p, r.dv.data(), P.kv_heads, P.k_len, ks);
  if (dkv_split) {  // one dK/dV block per query head, writing float32 parts with Hq heads
    const size_t n = r.k.size() / static_cast<size_t>(P.kv_heads) * static_cast<size_t>(P.q_heads);
    r.dk_part.assign(n, 0.0f);
    r.dv_part.assign(n, 0.0f);
    a.dkv_per_query_head = true;
    a.dk_part = head_tensor<float>(p, r.dk_part.data(), P.q_heads, P.k_len, ks);
    a.dv_part = head_tensor<float>(p, r.dv_part.data(), P.q_heads, P.k_len, ks);
  }
  a.lse = r.lse.data();
  a.slopes = nullptr;
  if (P.has_alibi) {
    a.slopes = r.slopes.data();
    a.slope_sb = P.q_heads;
    a.slope_sh = 1;
  }
  if (P.has_global) {
    a.global.flags = p.flags.data();
    a.global.keys = p.keys.data();
    a.global.count = p.count.data();
    a.global.row_start = p.row_start.data();
  }
  if (P.has_key_padding) {
    a.pad.flags = p.padded.data();
    a.keys_present = p.keys_present.data();
  }
  // The launcher's rule (rows_are_16b_aligned): D in whole 16-byte chunks; the bases are 64-byte aligned.
  a.vec_loads = vec_loads && P.head_dim % (16 / static_cast<int64_t>(sizeof(T))) == 0;
}

// The backward's row constants dO . O - dlse (softmax), from a forward's output and lse.
template <typename T>
void set_row_dot(const Problem& p, RunBuffers<T>& r, const Array<T>& out) {
  if (p.P.score != ScoreKind::kSoftmax) {
    r.args.row_dot = nullptr;
    return;
  }
  r.row_dot.assign(r.lse.size(), 0.0f);
  for (int64_t b = 0; b < p.P.batch; ++b)
    for (int64_t h = 0; h < p.P.q_heads; ++h)
      for (int64_t i = 0; i < p.q_len(b); ++i) {
        const int64_t o = p.q_offset(b, h, i);
        float dot = 0.0f;
        for (int64_t d = 0; d < p.P.head_dim; ++d)
          dot += static_cast<float>(r.grad_out[o + d]) * static_cast<float>(out[o + d]);
        const int64_t s = p.stat_index(b, h, i);
        r.row_dot[s] = dot - (std::isfinite(r.lse[s]) ? 0.1f : 0.0f);  // a gradient of lse too
      }
  r.args.row_dot = r.row_dot.data();
}

}  // namespace longreach::cuda_kernels::threaded_emulation
