// CPU forward and backward of longreach::local_attention.
//
// Flash-style: a work item is a block of query rows (forward, dQ) or of keys
// (dK, dV) for one head; it gathers its tiles into float (double for float64)
// buffers, multiplies them, applies the shared score pipeline and, for the
// forward, an online softmax. Only the tiles the TilePlan lists are visited,
// so the work is O(L * (window + global tokens)) and no (Lq, Lk) matrix exists.
//
// The backward recomputes scores tile by tile in two passes: one over query
// blocks writes dQ, one over key blocks writes dK and dV (summing the query
// heads of a GQA group). Each output row is owned by exactly one work item, so
// there are no atomics and the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../attention_params.h"
#include "../common/scores.h"
#include "../common/window.h"
#include "tile_math.h"
#include "tile_plan.h"

namespace longreach::cpu {
namespace {

template <typename T>
HeadView<T> head_view(const at::Tensor& t, int64_t b, int64_t h) {
  return {static_cast<T*>(t.data_ptr()) + b * t.stride(0) + h * t.stride(1), t.stride(2)};
}

// Kernels read rows with a contiguous last dimension; anything else is copied once.
at::Tensor with_contiguous_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Calls f(start, count, in_span) for the tiles of `list`, never mixing its
// masked span part with its always-allowed tail.
template <typename F>
void for_each_tile(const IndexList& list, int64_t block, F&& f) {
  const int64_t n = static_cast<int64_t>(list.idx.size());
  for (int64_t s = 0; s < list.n_span; s += block) f(s, std::min(block, list.n_span - s), true);
  for (int64_t s = list.n_span; s < n; s += block) f(s, std::min(block, n - s), false);
}

// Everything a tile needs to turn raw scores into final scores.
template <typename acc_t>
struct TileContext {
  const AttentionParams* P;
  const int64_t* rows;
  int64_t nq;
  const int64_t* keys;
  int64_t nk;
  bool needs_mask;            // some (row, key) pair may fall outside the window
  const uint8_t* key_global;  // per-key flags of this batch element, or null
  acc_t slope;                // ALiBi slope of this (batch, head), 0 when off
};

template <typename acc_t>
bool tile_needs_mask(const AttentionParams& P, const int64_t* rows, int64_t nq, const int64_t* keys, int64_t nk,
                     bool rows_in_span, bool keys_in_span) {
  if (!rows_in_span || !keys_in_span) return false;  // global rows or global keys: always allowed
  const int64_t off = P.position_offset();
  return !tile_in_window(P, rows[0] + off, rows[nq - 1] + off, keys[0], keys[nk - 1]);
}

// S[a][c] = scale * q_a . k_c on entry; the final score (or -inf where the key
// is not allowed) on exit.
template <typename acc_t>
void finalize_scores(const TileContext<acc_t>& t, acc_t* S, int64_t ld) {
  const AttentionParams& P = *t.P;
  const acc_t cap = static_cast<acc_t>(P.softcap);
  const int64_t off = P.position_offset();
  const bool transform = cap > acc_t(0) || t.slope != acc_t(0);
  if (!t.needs_mask && !transform) return;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t a = 0; a < t.nq; ++a) {
    const int64_t p = t.rows[a] + off;
    acc_t* s = S + a * ld;
    for (int64_t c = 0; c < t.nk; ++c) {
      const int64_t j = t.keys[c];
      if (t.needs_mask && !key_allowed(P, p, j, false, t.key_global != nullptr && t.key_global[j] != 0)) {
        s[c] = neg_inf;
      } else if (transform) {
        s[c] = transform_score<acc_t>(s[c], cap, t.slope, abs_distance(p, j));
      }
    }
  }
}

template <typename acc_t>
acc_t alibi_slope(const AttentionParams& P, const at::Tensor& slopes, int64_t b, int64_t h) {
  if (!P.has_alibi) return acc_t(0);
  const float* s = slopes.data_ptr<float>();
  return static_cast<acc_t>(slopes.dim() == 2 ? s[b * slopes.stride(0) + h * slopes.stride(1)]
                                              : s[h * slopes.stride(0)]);
}

// ---------------------------------------------------------------- forward --

template <typename scalar_t>
void forward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& slopes, at::Tensor& out, at::Tensor& lse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = P.head_dim;
  const auto& work = plan.row_work();
  const int64_t n_items = static_cast<int64_t>(work.size()) * P.q_heads;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t bias = static_cast<acc_t>(P.sigmoid_bias);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(kRowBlock * D), kt(D * kKeyBlock), vv(kKeyBlock * D), s(kRowBlock * kKeyBlock),
        acc(kRowBlock * D), m(kRowBlock), l(kRowBlock);
    IndexList rows, keys;
    for (int64_t item = begin; item < end; ++item) {
      const WorkItem& w = work[item / P.q_heads];
      const int64_t h = item % P.q_heads, b = w.batch, hk = h / P.group_size();
      plan.rows_of_row_work(w, &rows);
      if (rows.idx.empty()) continue;
      plan.keys_of_row_work(w, rows, &keys);
      const int64_t nq = static_cast<int64_t>(rows.idx.size());
      const auto qv = head_view<const scalar_t>(q, b, h);
      const auto kv = head_view<const scalar_t>(k, b, hk);
      const auto vview = head_view<const scalar_t>(v, b, hk);
      gather_rows(qv, rows.idx.data(), nq, D, static_cast<acc_t>(P.scale), qs.data());
      std::fill(acc.begin(), acc.begin() + nq * D, acc_t(0));
      std::fill(m.begin(), m.begin() + nq, neg_inf);
      std::fill(l.begin(), l.begin() + nq, acc_t(0));
      const acc_t slope = alibi_slope<acc_t>(P, slopes, b, h);

      for_each_tile(keys, kKeyBlock, [&](int64_t start, int64_t nk, bool keys_in_span) {
        const int64_t* kidx = keys.idx.data() + start;
        gather_rows_transposed(kv, kidx, nk, D, kKeyBlock, kt.data());
        gather_rows(vview, kidx, nk, D, acc_t(1), vv.data());
        tile_matmul(nq, nk, D, qs.data(), D, kt.data(), kKeyBlock, s.data(), kKeyBlock, false);
        const TileContext<acc_t> t{&P,
                                   rows.idx.data(),
                                   nq,
                                   kidx,
                                   nk,
                                   tile_needs_mask<acc_t>(P, rows.idx.data(), nq, kidx, nk, true, keys_in_span) &&
                                       !w.global_block,
                                   plan.global_key_flags(b),
                                   slope};
        finalize_scores(t, s.data(), kKeyBlock);
        for (int64_t a = 0; a < nq; ++a) {
          acc_t* sa = s.data() + a * kKeyBlock;
          if (sigmoid_score) {
            for (int64_t c = 0; c < nk; ++c) sa[c] = sa[c] == neg_inf ? acc_t(0) : sigmoid<acc_t>(sa[c] + bias);
            continue;
          }
          // Online softmax: rescale what was accumulated when the running max grows.
          acc_t tile_max = neg_inf;
          for (int64_t c = 0; c < nk; ++c) tile_max = std::max(tile_max, sa[c]);
          const acc_t m_new = std::max(m[a], tile_max);
          if (m_new == neg_inf) {  // nothing allowed so far in this row
            for (int64_t c = 0; c < nk; ++c) sa[c] = acc_t(0);
            continue;
          }
          const acc_t alpha = std::exp(m[a] - m_new);
          acc_t sum = acc_t(0);
          for (int64_t c = 0; c < nk; ++c) {
            sa[c] = std::exp(sa[c] - m_new);
            sum += sa[c];
          }
          l[a] = l[a] * alpha + sum;
          m[a] = m_new;
          if (alpha != acc_t(1)) {
            acc_t* o = acc.data() + a * D;
            for (int64_t d = 0; d < D; ++d) o[d] *= alpha;
          }
        }
        tile_matmul(nq, D, nk, s.data(), kKeyBlock, vv.data(), D, acc.data(), D, true);
      });

      auto ov = head_view<scalar_t>(out, b, h);
      acc_t* lse_row = lse.data_ptr<acc_t>() + (b * P.q_heads + h) * P.q_len;
      for (int64_t a = 0; a < nq; ++a) {
        scalar_t* o = ov.row(rows.idx[a]);
        const acc_t* src = acc.data() + a * D;
        if (sigmoid_score) {
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(src[d]);
          lse_row[rows.idx[a]] = acc_t(0);  // not defined for sigmoid
          continue;
        }
        const bool empty = !(l[a] > acc_t(0));  // a row with no allowed key returns zeros
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[a];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(src[d] * inv);
        lse_row[rows.idx[a]] = empty ? neg_inf : m[a] + std::log(l[a]);
      }
    }
  });
}

// --------------------------------------------------------------- backward --

// Per-tile probabilities and score gradients shared by both backward passes.
// On exit: prob[a][c] = P or sigmoid value, ds[a][c] = dLoss/d(scale*q.k).
template <typename acc_t>
void tile_score_grads(const TileContext<acc_t>& t, const acc_t* lse_rows, const acc_t* rowdot_rows,
                      acc_t* s /*scores in, kept*/, acc_t* prob, acc_t* dp_ds /*dP in, dS out*/, int64_t ld) {
  const AttentionParams& P = *t.P;
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const acc_t bias = static_cast<acc_t>(P.sigmoid_bias);
  const acc_t cap = static_cast<acc_t>(P.softcap);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t off = P.position_offset();
  finalize_scores(t, s, ld);
  for (int64_t a = 0; a < t.nq; ++a) {
    const acc_t* sa = s + a * ld;
    acc_t* pa = prob + a * ld;
    acc_t* ga = dp_ds + a * ld;
    const acc_t row_lse = sigmoid_score ? acc_t(0) : lse_rows[a];
    const bool empty_row = !sigmoid_score && row_lse == neg_inf;
    for (int64_t c = 0; c < t.nk; ++c) {
      if (empty_row || sa[c] == neg_inf) {
        pa[c] = acc_t(0);
        ga[c] = acc_t(0);
        continue;
      }
      acc_t g;
      if (sigmoid_score) {
        pa[c] = sigmoid<acc_t>(sa[c] + bias);
        g = sigmoid_score_grad<acc_t>(pa[c], ga[c]);
      } else {
        pa[c] = std::exp(sa[c] - row_lse);
        g = softmax_score_grad<acc_t>(pa[c], ga[c], rowdot_rows[a]);
      }
      if (cap > acc_t(0)) {
        g *= transform_score_grad<acc_t>(sa[c], cap, t.slope, abs_distance(t.rows[a] + off, t.keys[c]));
      }
      ga[c] = g;
    }
  }
}

// rowdot[b,h,i] = dO_i . O_i - dlse_i: the softmax backward's row constant.
template <typename scalar_t>
at::Tensor softmax_row_dots(const AttentionParams& P, const at::Tensor& grad_out, const at::Tensor& out,
                            const c10::optional<at::Tensor>& grad_lse) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor rowdot = at::empty({P.batch, P.q_heads, P.q_len}, out.options().dtype(c10::CppTypeToScalarType<acc_t>()));
  at::Tensor glse;
  if (grad_lse.has_value()) glse = grad_lse->to(rowdot.scalar_type()).contiguous();
  const int64_t D = P.head_dim;
  at::parallel_for(0, P.batch * P.q_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / P.q_heads, h = bh % P.q_heads;
      const auto go = head_view<const scalar_t>(grad_out, b, h);
      const auto o = head_view<const scalar_t>(out, b, h);
      acc_t* r = rowdot.data_ptr<acc_t>() + bh * P.q_len;
      const acc_t* gl = glse.defined() ? glse.data_ptr<acc_t>() + bh * P.q_len : nullptr;
      for (int64_t i = 0; i < P.q_len; ++i) {
        acc_t sum = acc_t(0);
        for (int64_t d = 0; d < D; ++d) sum += static_cast<acc_t>(go.row(i)[d]) * static_cast<acc_t>(o.row(i)[d]);
        r[i] = gl ? sum - gl[i] : sum;
      }
    }
  });
  return rowdot;
}

template <typename scalar_t>
void backward_kernel(const AttentionParams& P, const TilePlan& plan, const at::Tensor& grad_out,
                     const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& slopes,
                     at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = P.head_dim;
  const acc_t scale = static_cast<acc_t>(P.scale);
  const bool sigmoid_score = P.score == ScoreKind::kSigmoid;
  const at::Tensor rowdot = sigmoid_score ? at::Tensor() : softmax_row_dots<scalar_t>(P, grad_out, out, grad_lse);
  const at::Tensor lse_acc = lse.contiguous();
  auto row_stats = [&](const at::Tensor& t, int64_t b, int64_t h) -> const acc_t* {
    return t.defined() ? t.data_ptr<acc_t>() + (b * P.q_heads + h) * P.q_len : nullptr;
  };

  // Pass 1: dQ, one work item per block of query rows and head.
  const auto& row_work = plan.row_work();
  at::parallel_for(0, static_cast<int64_t>(row_work.size()) * P.q_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(kRowBlock * D), go(kRowBlock * D), kt(D * kKeyBlock), kk(kKeyBlock * D),
        vt(D * kKeyBlock), s(kRowBlock * kKeyBlock), pr(kRowBlock * kKeyBlock), ds(kRowBlock * kKeyBlock),
        dqa(kRowBlock * D), lse_r(kRowBlock), dot_r(kRowBlock);
    IndexList rows, keys;
    for (int64_t item = begin; item < end; ++item) {
      const WorkItem& w = row_work[item / P.q_heads];
      const int64_t h = item % P.q_heads, b = w.batch, hk = h / P.group_size();
      plan.rows_of_row_work(w, &rows);
      if (rows.idx.empty()) continue;
      plan.keys_of_row_work(w, rows, &keys);
      const int64_t nq = static_cast<int64_t>(rows.idx.size());
      gather_rows(head_view<const scalar_t>(q, b, h), rows.idx.data(), nq, D, scale, qs.data());
      gather_rows(head_view<const scalar_t>(grad_out, b, h), rows.idx.data(), nq, D, acc_t(1), go.data());
      const acc_t* lse_all = row_stats(lse_acc, b, h);
      const acc_t* dot_all = row_stats(rowdot, b, h);
      for (int64_t a = 0; a < nq; ++a) {
        lse_r[a] = lse_all[rows.idx[a]];
        dot_r[a] = dot_all ? dot_all[rows.idx[a]] : acc_t(0);
      }
      std::fill(dqa.begin(), dqa.begin() + nq * D, acc_t(0));
      const acc_t slope = alibi_slope<acc_t>(P, slopes, b, h);
      const auto kv = head_view<const scalar_t>(k, b, hk);
      const auto vview = head_view<const scalar_t>(v, b, hk);

      for_each_tile(keys, kKeyBlock, [&](int64_t start, int64_t nk, bool keys_in_span) {
        const int64_t* kidx = keys.idx.data() + start;
        gather_rows_transposed(kv, kidx, nk, D, kKeyBlock, kt.data());
        gather_rows(kv, kidx, nk, D, acc_t(1), kk.data());
        gather_rows_transposed(vview, kidx, nk, D, kKeyBlock, vt.data());
        tile_matmul(nq, nk, D, qs.data(), D, kt.data(), kKeyBlock, s.data(), kKeyBlock, false);
        tile_matmul(nq, nk, D, go.data(), D, vt.data(), kKeyBlock, ds.data(), kKeyBlock, false);
        const TileContext<acc_t> t{&P,
                                   rows.idx.data(),
                                   nq,
                                   kidx,
                                   nk,
                                   tile_needs_mask<acc_t>(P, rows.idx.data(), nq, kidx, nk, true, keys_in_span) &&
                                       !w.global_block,
                                   plan.global_key_flags(b),
                                   slope};
        tile_score_grads(t, lse_r.data(), dot_r.data(), s.data(), pr.data(), ds.data(), kKeyBlock);
        tile_matmul(nq, D, nk, ds.data(), kKeyBlock, kk.data(), D, dqa.data(), D, true);
      });

      auto dqv = head_view<scalar_t>(dq, b, h);
      for (int64_t a = 0; a < nq; ++a) {
        scalar_t* o = dqv.row(rows.idx[a]);
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(scale * dqa[a * D + d]);
      }
    }
  });

  // Pass 2: dK and dV, one work item per block of keys and kv head; the query
  // heads of its GQA group are summed here.
  const auto& key_work = plan.key_work();
  at::parallel_for(0, static_cast<int64_t>(key_work.size()) * P.kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qs(kRowBlock * D), go(kRowBlock * D), kt(D * kKeyBlock), vt(D * kKeyBlock),
        s(kRowBlock * kKeyBlock), pr(kRowBlock * kKeyBlock), ds(kRowBlock * kKeyBlock), dka(kKeyBlock * D),
        dva(kKeyBlock * D), lse_r(kRowBlock), dot_r(kRowBlock);
    IndexList rows, keys;
    for (int64_t item = begin; item < end; ++item) {
      const WorkItem& w = key_work[item / P.kv_heads];
      const int64_t hk = item % P.kv_heads, b = w.batch;
      plan.keys_of_key_work(w, &keys);
      if (keys.idx.empty()) continue;
      plan.rows_of_key_work(w, keys, &rows);
      const int64_t nk = static_cast<int64_t>(keys.idx.size());
      const int64_t* kidx = keys.idx.data();
      gather_rows_transposed(head_view<const scalar_t>(k, b, hk), kidx, nk, D, kKeyBlock, kt.data());
      gather_rows_transposed(head_view<const scalar_t>(v, b, hk), kidx, nk, D, kKeyBlock, vt.data());
      std::fill(dka.begin(), dka.begin() + nk * D, acc_t(0));
      std::fill(dva.begin(), dva.begin() + nk * D, acc_t(0));

      for (int64_t h = hk * P.group_size(); h < (hk + 1) * P.group_size(); ++h) {
        const acc_t slope = alibi_slope<acc_t>(P, slopes, b, h);
        const acc_t* lse_all = row_stats(lse_acc, b, h);
        const acc_t* dot_all = row_stats(rowdot, b, h);
        const auto qv = head_view<const scalar_t>(q, b, h);
        const auto gov = head_view<const scalar_t>(grad_out, b, h);
        for_each_tile(rows, kRowBlock, [&](int64_t start, int64_t nq, bool rows_in_span) {
          const int64_t* ridx = rows.idx.data() + start;
          gather_rows(qv, ridx, nq, D, scale, qs.data());
          gather_rows(gov, ridx, nq, D, acc_t(1), go.data());
          for (int64_t a = 0; a < nq; ++a) {
            lse_r[a] = lse_all[ridx[a]];
            dot_r[a] = dot_all ? dot_all[ridx[a]] : acc_t(0);
          }
          tile_matmul(nq, nk, D, qs.data(), D, kt.data(), kKeyBlock, s.data(), kKeyBlock, false);
          tile_matmul(nq, nk, D, go.data(), D, vt.data(), kKeyBlock, ds.data(), kKeyBlock, false);
          const TileContext<acc_t> t{
              &P,   ridx, nq, kidx, nk, tile_needs_mask<acc_t>(P, ridx, nq, kidx, nk, rows_in_span, !w.global_block),
              plan.global_key_flags(b), slope};
          tile_score_grads(t, lse_r.data(), dot_r.data(), s.data(), pr.data(), ds.data(), kKeyBlock);
          tile_matmul_tn(nk, D, nq, pr.data(), kKeyBlock, go.data(), D, dva.data(), D);
          tile_matmul_tn(nk, D, nq, ds.data(), kKeyBlock, qs.data(), D, dka.data(), D);
        });
      }

      auto dkv = head_view<scalar_t>(dk, b, hk);
      auto dvv = head_view<scalar_t>(dv, b, hk);
      for (int64_t c = 0; c < nk; ++c) {
        scalar_t* ok = dkv.row(kidx[c]);
        scalar_t* ov = dvv.row(kidx[c]);
        for (int64_t d = 0; d < D; ++d) {
          ok[d] = static_cast<scalar_t>(dka[c * D + d]);
          ov[d] = static_cast<scalar_t>(dva[c * D + d]);
        }
      }
    }
  });
}

// ------------------------------------------------------------ entry points --

std::tuple<at::Tensor, at::Tensor> local_attention_fwd_cpu(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, int64_t dilation, c10::string_view score,
    c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  at::Tensor out = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::full({P.batch, P.q_heads, P.q_len}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0 || P.k_len == 0) return {out, lse};
  const TilePlan plan(P, global_mask);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_fwd_cpu", [&] {
    forward_kernel<scalar_t>(P, plan, q, k, v, slopes, out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse,
    const c10::optional<at::Tensor>& global_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, int64_t dilation, c10::string_view score,
    c10::optional<double> sigmoid_bias, double softcap, double scale) {
  const AttentionParams P = make_attention_params(q_in, k_in, v_in, global_mask, alibi_slopes, window_left,
                                                  window_right, dilation, score, sigmoid_bias, softcap, scale);
  check_backward_inputs(P, q_in, grad_out_in, out_in, lse, grad_lse);
  const at::Tensor q = with_contiguous_rows(q_in), k = with_contiguous_rows(k_in), v = with_contiguous_rows(v_in);
  const at::Tensor grad_out = with_contiguous_rows(grad_out_in), out = with_contiguous_rows(out_in);
  const auto contiguous = at::MemoryFormat::Contiguous;
  at::Tensor dq = at::zeros(q.sizes(), q.options().memory_format(contiguous));
  at::Tensor dk = at::zeros(k.sizes(), k.options().memory_format(contiguous));
  at::Tensor dv = at::zeros(v.sizes(), v.options().memory_format(contiguous));
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk, dv};
  const TilePlan plan(P, global_mask);
  const at::Tensor slopes = alibi_slopes.has_value() ? *alibi_slopes : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "local_attention_bwd_cpu", [&] {
    backward_kernel<scalar_t>(P, plan, grad_out, grad_lse, q, k, v, out, lse, slopes, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(longreach, CPU, m) {
  m.impl("local_attention_fwd", &local_attention_fwd_cpu);
  m.impl("local_attention_bwd", &local_attention_bwd_cpu);
}

}  // namespace longreach::cpu
