// Prints `name sum weighted_sum` for outputs and gradients of the C++ API on inputs
// drawn after torch::manual_seed(0); tests/test_cpp_api.py draws the same inputs in
// Python, runs the Python API and compares. Then one line per error case:
// `error <case> <exception type> <message>`.
#include <cstdio>
#include <string>

#include <c10/util/Exception.h>
#include <torch/torch.h>

#include <longreach/longreach.h>

namespace {

void show(const char* name, const torch::Tensor& t) {
  auto flat = t.detach().to(torch::kFloat64).flatten();
  auto w = torch::linspace(0, 1, flat.numel(), torch::kFloat64);
  std::printf("%s %.12g %.12g\n", name, flat.sum().item<double>(), (flat * w).sum().item<double>());
}

template <class F>
void expect_error(const char* name, F f) {
  try {
    f();
    std::printf("error %s none\n", name);
  } catch (const c10::ValueError& e) {
    std::printf("error %s ValueError %s\n", name, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    std::printf("error %s TypeError %s\n", name, e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    std::printf("error %s NotImplementedError %s\n", name, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    std::printf("error %s Error %s\n", name, e.what_without_backtrace());
  }
}

}  // namespace

int main() {
  torch::manual_seed(0);
  // Dense, with ALiBi slopes (Hq,), learnable sinks and the lse (all differentiable).
  {
    auto q = torch::randn({2, 4, 10, 8}).requires_grad_();
    auto k = torch::randn({2, 2, 10, 8}).requires_grad_();
    auto v = torch::randn({2, 2, 10, 8}).requires_grad_();
    auto slopes = (torch::rand({4}) * 0.5).requires_grad_();
    auto sinks = torch::randn({4}).requires_grad_();
    longreach::AttentionOptions o;
    o.window(3, 2);
    o.alibi_slopes = slopes;
    o.sinks = sinks;
    o.softcap = 5.0;
    auto [out, lse] = longreach::local_attention_with_lse(q, k, v, o);
    ((out * out).sum() + lse.sum()).backward();
    show("dense_out", out), show("dense_lse", lse), show("dense_gq", q.grad()), show("dense_gk", k.grad());
    show("dense_gv", v.grad()), show("dense_gslopes", slopes.grad()), show("dense_gsinks", sinks.grad());
  }
  // Varlen: two packed sequences of 5 and 7, causal, sigmoid scores.
  {
    auto q = torch::randn({12, 2, 8}).requires_grad_();
    auto k = torch::randn({12, 2, 8}).requires_grad_();
    auto v = torch::randn({12, 2, 8}).requires_grad_();
    auto cu = torch::tensor({0, 5, 12}, torch::kInt32);
    longreach::AttentionOptions o;
    o.window(2, 0).causal = true;
    o.score = "sigmoid";
    auto out = longreach::local_attention_varlen(q, k, v, cu, cu, 7, 7, o);
    (out * out).sum().backward();
    show("varlen_out", out), show("varlen_gq", q.grad()), show("varlen_gk", k.grad()), show("varlen_gv", v.grad());
  }
  // Rotary, interleaved, with position ids; gradient of x.
  {
    auto x = torch::randn({1, 2, 6, 8}).requires_grad_();
    auto cos = torch::randn({16, 4});
    auto sin = torch::randn({16, 4});
    auto pos = torch::tensor({{3, 1, 4, 1, 5, 9}}, torch::kInt64);
    auto y = longreach::apply_rotary(x, cos, sin, pos, true);
    (y * y.detach().flip(-1)).sum().backward();
    show("rotary_out", y), show("rotary_gx", x.grad());
  }
  // Decoding: append one token to a cache holding 4, window 2.
  {
    torch::NoGradGuard no_grad;
    auto q = torch::randn({1, 2, 1, 8});
    auto k_cache = torch::zeros({1, 2, 8, 8});
    auto v_cache = torch::zeros({1, 2, 8, 8});
    k_cache.narrow(2, 0, 4).copy_(torch::randn({1, 2, 4, 8}));
    v_cache.narrow(2, 0, 4).copy_(torch::randn({1, 2, 4, 8}));
    longreach::KvCacheOptions o;
    o.k = torch::randn({1, 2, 1, 8});
    o.v = torch::randn({1, 2, 1, 8});
    o.window_left = 2;
    auto seqlens = torch::tensor({4}, torch::kInt32);
    auto [out, lse] = longreach::local_attention_with_kvcache(q, k_cache, v_cache, seqlens, o);
    show("kvcache_out", out), show("kvcache_lse", lse), show("kvcache_k_cache", k_cache);
  }
  // Chunks with per-head shifts and attention dropout, its seed drawn from the default CPU
  // generator as Python draws it (so the same torch::manual_seed state gives the same mask).
  {
    auto q = torch::randn({1, 4, 12, 8}).requires_grad_();
    auto k = torch::randn({1, 2, 12, 8}).requires_grad_();
    auto v = torch::randn({1, 2, 12, 8}).requires_grad_();
    longreach::AttentionOptions o;
    o.window(5, 0).causal = true;
    o.chunk = 4;
    o.chunk_shift = torch::tensor({0, 2, 0, 2}, torch::kInt64);
    o.dropout_p = 0.3;
    auto out = longreach::local_attention(q, k, v, o);
    (out * out).sum().backward();
    show("chunk_drop_out", out), show("chunk_drop_gq", q.grad()), show("chunk_drop_gk", k.grad());
    show("chunk_drop_gv", v.grad());
  }
  // Decoding with chunks of 3: the row at position 4 sees keys 3 and 4 only.
  {
    torch::NoGradGuard no_grad;
    auto q = torch::randn({1, 2, 1, 8});
    auto k_cache = torch::randn({1, 2, 6, 8});
    auto v_cache = torch::randn({1, 2, 6, 8});
    longreach::KvCacheOptions o;
    o.causal = true;
    o.chunk = 3;
    auto seqlens = torch::tensor({5}, torch::kInt32);
    auto [out, lse] = longreach::local_attention_with_kvcache(q, k_cache, v_cache, seqlens, o);
    show("kvcache_chunk_out", out), show("kvcache_chunk_lse", lse);
  }
  // Errors: the ops' own checks reach C++ callers with Python's exception types.
  auto q = torch::randn({1, 2, 4, 8});
  expect_error("bad_dilation", [&] {
    longreach::AttentionOptions o;
    o.dilation = 0;
    longreach::local_attention(q, q, q, o);
  });
  expect_error("bad_dropout_p", [&] {
    longreach::AttentionOptions o;
    o.dropout_p = 1.5;
    longreach::local_attention(q, q, q, o);
  });
  expect_error("chunk_shift_without_chunk", [&] {
    longreach::AttentionOptions o;
    o.chunk_shift = torch::zeros({2}, torch::kInt64);
    longreach::local_attention(q, q, q, o);
  });
  expect_error("bad_dtype", [&] { longreach::local_attention(q.to(torch::kInt32), q, q); });
  expect_error("lse_of_sigmoid", [&] {
    longreach::AttentionOptions o;
    o.score = "sigmoid";
    longreach::local_attention_with_lse(q, q, q, o);
  });
  expect_error("double_backward", [&] {
    auto x = q.clone().requires_grad_();
    auto out = longreach::local_attention(x, x, x);
    auto g = torch::autograd::grad({out.sum()}, {x}, {}, /*retain_graph=*/true, /*create_graph=*/true)[0];
    g.sum().backward();
  });
  return 0;
}
