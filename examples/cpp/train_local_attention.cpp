// A few SGD steps of a tiny sliding-window attention layer in C++ (LibTorch),
// gradients from longreach's C++ autograd. Prints, one `name value` a line:
//   out_sum        sum of local_attention's output on fixed inputs
//   grad_q_sum ... sums of the gradients of q, k, v (tests/test_cpp_api.py compares
//                  these with the Python op on the same torch::manual_seed inputs)
//   fd_error       |autograd - central finite difference| of one entry, float64
//   loss_<step>    the training loss, which must decrease
#include <cmath>
#include <cstdio>

#include <torch/torch.h>

#include <longreach/longreach.h>

int main() {
  torch::manual_seed(0);
  // 1. Fixed inputs, compared with Python: (B, H, L, D) = (2, 2, 16, 8), window (4, 0), causal.
  auto q = torch::randn({2, 2, 16, 8}).requires_grad_();
  auto k = torch::randn({2, 2, 16, 8}).requires_grad_();
  auto v = torch::randn({2, 2, 16, 8}).requires_grad_();
  longreach::AttentionOptions opts;
  opts.window(4, 0).causal = true;
  auto out = longreach::local_attention(q, k, v, opts);
  (out * out).sum().backward();
  std::printf("out_sum %.9g\ngrad_q_sum %.9g\ngrad_k_sum %.9g\ngrad_v_sum %.9g\n", out.sum().item<double>(),
              q.grad().sum().item<double>(), k.grad().sum().item<double>(), v.grad().sum().item<double>());

  // 2. One gradient entry against a central finite difference, in float64.
  auto qd = torch::randn({1, 2, 12, 4}, torch::kFloat64).requires_grad_();
  auto kd = torch::randn({1, 2, 12, 4}, torch::kFloat64);
  auto vd = torch::randn({1, 2, 12, 4}, torch::kFloat64);
  longreach::AttentionOptions dopts;
  dopts.window(3, 1);
  auto f = [&](const torch::Tensor& x) { return longreach::local_attention(x, kd, vd, dopts).pow(2).sum(); };
  f(qd).backward();
  const double eps = 1e-6;
  torch::Tensor plus, minus;
  {
    torch::NoGradGuard no_grad;
    plus = qd.detach().clone();
    minus = qd.detach().clone();
    plus[0][1][5][2] += eps;
    minus[0][1][5][2] -= eps;
  }
  const double fd = (f(plus).item<double>() - f(minus).item<double>()) / (2 * eps);
  std::printf("fd_error %.3g\n", std::abs(qd.grad()[0][1][5][2].item<double>() - fd));

  // 3. Training: x -> (q, k, v) projections -> local attention -> output projection, fit a target.
  const int64_t L = 32, E = 16, H = 2, D = E / H;
  auto x = torch::randn({4, L, E});
  auto target = torch::randn({4, L, E}) * 0.5;
  torch::nn::Linear qkv(E, 3 * E), proj(E, E);
  std::vector<torch::Tensor> params = qkv->parameters();
  for (auto& p : proj->parameters()) params.push_back(p);
  torch::optim::SGD sgd(params, torch::optim::SGDOptions(0.5));
  longreach::AttentionOptions topts;
  topts.window(8, 0).causal = true;
  for (int step = 0; step < 8; ++step) {
    auto parts = qkv->forward(x).view({4, L, 3, H, D}).permute({2, 0, 3, 1, 4});  // (3, B, H, L, D)
    auto y = longreach::local_attention(parts[0], parts[1], parts[2], topts);   // (B, H, L, D)
    auto loss = torch::mse_loss(proj->forward(y.transpose(1, 2).reshape({4, L, E})), target);
    sgd.zero_grad();
    loss.backward();
    sgd.step();
    std::printf("loss_%d %.9g\n", step, loss.item<double>());
  }
  return 0;
}
