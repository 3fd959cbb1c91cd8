// The one copy of the score pipeline (docs/semantics.md):
//   s = scale * q.k  ->  softcap: c * tanh(s / c)  ->  ALiBi: s -= slope * |p - j|
// then softmax (online, with running max and sum) or sigmoid(s + bias).
// Kernels call these per element so CPU and CUDA can never disagree.
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace longreach {

// s is already scale * q.k (kernels pre-scale q). Returns the final score.
template <typename acc_t>
LR_HOST_DEVICE acc_t transform_score(acc_t s, acc_t softcap, acc_t alibi_slope, int64_t distance) {
  if (softcap > acc_t(0)) s = softcap * tanh(s / softcap);
  return s - alibi_slope * static_cast<acc_t>(distance);
}

// d(final score)/d(scale * q.k), given the final score and the ALiBi term that
// was subtracted (the derivative of c*tanh(x/c) is 1 - tanh^2).
template <typename acc_t>
LR_HOST_DEVICE acc_t transform_score_grad(acc_t final_score, acc_t softcap, acc_t alibi_slope,
                                          int64_t distance) {
  if (!(softcap > acc_t(0))) return acc_t(1);
  const acc_t t = (final_score + alibi_slope * static_cast<acc_t>(distance)) / softcap;
  return acc_t(1) - t * t;
}

template <typename acc_t>
LR_HOST_DEVICE acc_t sigmoid(acc_t x) {
  // Written to avoid overflow of exp for large |x|.
  if (x >= acc_t(0)) {
    return acc_t(1) / (acc_t(1) + exp(-x));
  }
  const acc_t e = exp(x);
  return e / (acc_t(1) + e);
}

// Softmax backward through one score: dS = P * (dP - rowsum(dO * O)).
template <typename acc_t>
LR_HOST_DEVICE acc_t softmax_score_grad(acc_t p, acc_t dp, acc_t row_dot) {
  return p * (dp - row_dot);
}

// Sigmoid backward through one score: dS = dP * sig * (1 - sig).
template <typename acc_t>
LR_HOST_DEVICE acc_t sigmoid_score_grad(acc_t sig, acc_t dp) {
  return dp * sig * (acc_t(1) - sig);
}

// max(a, b) that returns NaN when either is NaN: the running softmax max must
// carry a NaN score through to the row's sum (a NaN row), where a plain
// comparison would drop it and the row would look empty (zeros).
template <typename acc_t>
LR_HOST_DEVICE acc_t nan_propagating_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

// The end of a softmax row: running max m and sum l = sum exp(s - m) of its
// scores (l = 0 without any) give the factor of the accumulated sum exp(s - m) v
// and the row's lse. With a learnable sink logit (gpt-oss) the denominator holds
// one more term exp(sink) whose value vector is zero: the raw logit, no scale,
// soft-cap or ALiBi, and lse includes it. A row without keys then gives out = 0,
// lse = sink; a sink of -inf weighs nothing. NaN in m carries through.
template <typename acc_t>
LR_HOST_DEVICE void finish_softmax_row(acc_t m, acc_t l, bool has_sink, acc_t sink, acc_t* out_factor, acc_t* lse) {
  const acc_t neg_inf = -static_cast<acc_t>(INFINITY);
  if (!has_sink) {
    const bool empty = l == acc_t(0);  // a NaN sum (a NaN score) is not empty: NaN row
    *out_factor = empty ? acc_t(0) : acc_t(1) / l;
    *lse = empty ? neg_inf : m + log(l);
    return;
  }
  const acc_t m2 = nan_propagating_max(l == acc_t(0) ? neg_inf : m, sink);
  if (m2 == neg_inf) {  // no key and a -inf sink
    *out_factor = acc_t(0);
    *lse = neg_inf;
    return;
  }
  const acc_t keys = l == acc_t(0) ? acc_t(0) : exp(m - m2);
  const acc_t total = l * keys + exp(sink - m2);
  *out_factor = keys / total;
  *lse = m2 + log(total);
}

// The sink's probability in a row, exp(sink - lse) (0 for a -inf sink), and its
// gradient: d loss / d sink = p_sink * (dlse - dO . O) = -p_sink * row_dot, with
// row_dot = dO . O - dlse the softmax backward's row constant. The other
// gradients do not change: out is still sum_j P_j v_j and lse includes the sink.
template <typename acc_t>
LR_HOST_DEVICE acc_t sink_grad_of_row(acc_t sink, acc_t lse, acc_t row_dot) {
  if (sink == -static_cast<acc_t>(INFINITY)) return acc_t(0);
  return -exp(sink - lse) * row_dot;
}

LR_HOST_DEVICE int64_t abs_distance(int64_t p, int64_t j) { return p > j ? p - j : j - p; }

}  // namespace longreach
