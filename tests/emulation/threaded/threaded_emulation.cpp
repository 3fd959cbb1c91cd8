// The CUDA kernel bodies (csrc/cuda/attention_blocks.cuh) on real threads:
// forward, backward dQ and backward dK/dV of every case in float32, float16
// and bfloat16, once on one thread (the existing emulation's layout, scalar
// loads) and once with the real block shape (4 warps x 32 lanes, 16-byte loads
// where the launcher would use them); the two must agree. Built and run under
// ThreadSanitizer and AddressSanitizer + UBSan by tests/threaded_emulation.py.
//
// Usage: threaded_emulation [--cases quick|all] [--only NAME] [--skip-sync N] [--short-smem] [--misalign-smem]
//                           [--dkv-split]
//   --skip-sync N  skips the N-th block_sync() of every block (harness self-test:
//                  ThreadSanitizer must then report races)
//   --short-smem   gives every block 128 bytes less shared memory than it needs
//                  (harness self-test: AddressSanitizer must report the overflow)
//   --misalign-smem  starts shared memory 16 bytes past a 32-byte boundary (self-test
//                  of the WMMA precondition checks: they must stop the run)
// Prints one line per (case, dtype) and a summary; exits 1 on a mismatch.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "problem.h"
#include "threaded_block.h"

namespace longreach::cuda_kernels::threaded_emulation {
namespace {

struct Options {
  bool all_cases = false;
  std::string only;
  int skip_sync = -1;
  bool short_smem = false;
  bool misalign_smem = false;
  bool dkv_split = false;  // GQA cases: the dK/dV pass split by query head (AttentionArgs::dkv_per_query_head)
  int threads = kThreads;
  int warp_size = 32;
};

// Cases chosen to reach every branch of the block plans: GQA, Lq > Lk (rows
// that see nothing), decoding, dilation, global rows and keys, ALiBi with its
// slope gradient, softcap, sigmoid, scalar loads (D = 20), each head-dim
// bucket, a packed batch with empty sequences, key padding, and chunks with dropout.
std::vector<Case> cases(bool all) {
  std::vector<Case> quick = {
      {"causal_gqa_d64", 1, 2, 1, 70, 70, 64, 31, 0, 1},
      {"global_gqa_dil_d32", 2, 4, 2, 100, 120, 32, 3, 5, 2, 7, true, 20.0},
      {"lq_gt_lk_d32", 1, 2, 2, 90, 40, 32, 5, 0, 1, 9},
      {"sigmoid_d20_scalar", 1, 2, 1, 50, 60, 20, 10, 3, 1, 11, false, 0.0, true},
      {"decode_mqa_d128", 1, 4, 1, 1, 150, 128, 60, 0, 1},
      {"varlen_global_alibi", 0, 2, 1, 0, 0, 16, 6, 2, 2, 5, true, 2.0, false, {5, 0, 40, 1, 33}, {7, 4, 36, 0, 33}},
      {"unbounded_d256", 1, 2, 2, 33, 33, 256, -1, -1, 1},
      {"key_padding_global_d64", 2, 2, 1, 40, 48, 64, 12, 3, 1, 9, false, 0.0, false, {}, {}, 5},
      // chunks of 13 shifted by 5 (blocks spanning chunk ends) with dropout: the keep bits in all three passes
      {"chunk_dropout_gqa_d32", 1, 4, 2, 60, 60, 32, 20, 4, 1, 0, false, 0.0, false, {}, {}, 0, 13, 5, 0.3},
  };
  if (!all) return quick;
  std::vector<Case> more = {
      {"global_rows_only_d100", 1, 3, 1, 64, 64, 100, 2, 2, 3, 4, true, 5.0},
      {"sigmoid_global_d48", 2, 2, 2, 45, 45, 48, 4, 4, 1, 6, false, 0.0, true},
      {"key_padding_sigmoid_dil", 2, 2, 2, 50, 50, 32, 5, 5, 2, 0, true, 0.0, true, {}, {}, 4},
  };
  quick.insert(quick.end(), more.begin(), more.end());
  return quick;
}

template <typename T>
const char* dtype_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, c10::Half>::value) return "float16";
  return "bfloat16";
}

// The forward, then both backward passes, of one run's arguments on the given thread layout.
template <typename T>
struct Kernels {
  const Options& o;
  int threads, warp_size;

  template <typename F>
  void with_dmax(int64_t D, F&& f) const {
    if (D <= 64) {
      f(std::integral_constant<int, 64>{});
    } else if (D <= 128) {
      f(std::integral_constant<int, 128>{});
    } else {
      f(std::integral_constant<int, 256>{});
    }
  }
  int64_t smem(int64_t bytes) const { return o.short_smem && threads > 1 ? bytes - 128 : bytes; }
  int skip() const { return threads > 1 ? o.skip_sync : -1; }
  int offset() const { return o.misalign_smem && threads > 1 ? 16 : 0; }

  void forward(const AttentionArgs<T, float>& a) const {
    with_dmax(a.P.head_dim, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      using S = TileShape<T, DMAX>;
      run_grid(threads, warp_size, skip(), offset(), smem(ForwardSmem<T, float, DMAX, S::kFwdM, S::kFwdN>::bytes()),
               row_blocks(a.P, S::kFwdM), a.P.q_heads, a.P.batch, [&](int64_t blk, int64_t h, int64_t b, char* sm) {
                 forward_block<T, float, DMAX, S::kFwdM, S::kFwdN>(a, blk, h, b, sm);
               });
    });
  }

  void backward(const AttentionArgs<T, float>& a) const {
    with_dmax(a.P.head_dim, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      using S = TileShape<T, DMAX>;
      run_grid(threads, warp_size, skip(), offset(), smem(DqSmem<T, float, DMAX, S::kDqM, S::kDqN>::bytes()),
               row_blocks(a.P, S::kDqM), a.P.q_heads, a.P.batch, [&](int64_t blk, int64_t h, int64_t b, char* sm) {
                 backward_dq_block<T, float, DMAX, S::kDqM, S::kDqN>(a, blk, h, b, sm);
               });
      run_grid(threads, warp_size, skip(), offset(), smem(DkvSmem<T, float, DMAX, S::kDkvM, S::kDkvN>::bytes()),
               key_blocks(a.P, S::kDkvN), a.dkv_grid_heads(), a.P.batch, [&](int64_t blk, int64_t hk, int64_t b, char* sm) {
                 backward_dkv_block<T, float, DMAX, S::kDkvM, S::kDkvN>(a, blk, hk, b, sm);
               });
    });
  }
};

// Largest |a - b| over max(1, max |b|); equal infinities agree, a NaN in one only is infinite.
template <typename U, typename A>
double scaled_diff(const std::vector<U, A>& a, const std::vector<U, A>& b) {
  double scale = 1.0, worst = 0.0;
  for (const U& y : b) {
    if (std::isfinite(static_cast<float>(y))) scale = std::max(scale, std::fabs(static_cast<double>(static_cast<float>(y))));
  }
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = static_cast<float>(a[i]), y = static_cast<float>(b[i]);
    if (x == y || (std::isnan(x) && std::isnan(y))) continue;
    if (!std::isfinite(x) || !std::isfinite(y)) return INFINITY;
    worst = std::max(worst, std::fabs(x - y));
  }
  return worst / scale;
}

// One case in one dtype: single thread vs the real block shape. The backward
// of both runs reads the single-thread forward's out and lse, so its
// comparison sees the backward kernels alone.
template <typename T>
bool check(const Options& o, const Problem& p, int* vector_runs) {
  RunBuffers<T> one, many;
  const bool split = o.dkv_split && p.P.group_size() > 1;  // both runs take the same dK/dV path
  make_args(p, one, /*vec_loads=*/false, split);
  make_args(p, many, /*vec_loads=*/true, split);
  *vector_runs += many.args.vec_loads;
  const Kernels<T> serial{o, 1, 1}, threaded{o, o.threads, o.warp_size};
  serial.forward(one.args);
  threaded.forward(many.args);
  const double d_out = scaled_diff(many.out, one.out), d_lse = scaled_diff(many.lse, one.lse);

  many.lse = one.lse;
  set_row_dot(p, one, one.out);
  set_row_dot(p, many, one.out);
  if (!p.P.has_alibi) one.args.slope_grad = many.args.slope_grad = nullptr;
  else one.args.slope_grad = one.slope_grad.data(), many.args.slope_grad = many.slope_grad.data();
  serial.backward(one.args);
  threaded.backward(many.args);
  const double d_dq = scaled_diff(many.dq, one.dq), d_slope = scaled_diff(many.slope_grad, one.slope_grad);
  const double d_dk = split ? scaled_diff(many.dk_part, one.dk_part) : scaled_diff(many.dk, one.dk);
  const double d_dv = split ? scaled_diff(many.dv_part, one.dv_part) : scaled_diff(many.dv, one.dv);

  // The thread count changes only the order of the softmax row sums and of the
  // slope gradient's block sum (warp butterflies): float32 rounding, plus one
  // unit of the element type where out is rounded to it. Every other output
  // element is computed by one thread in a fixed order: dQ, dK, dV agree exactly.
  const double out_tol = std::is_same<T, float>::value ? 1e-5 : std::is_same<T, c10::Half>::value ? 2e-3 : 1.6e-2;
  const bool ok = d_out <= out_tol && d_lse <= 1e-5 && d_dq == 0.0 && d_dk == 0.0 && d_dv == 0.0 && d_slope <= 1e-5;
  std::printf("%s %-24s %-8s %s%s loads: out %.1e lse %.1e dq %.1e dk %.1e dv %.1e slope %.1e\n", ok ? "ok " : "BAD",
              p.c.name.c_str(), dtype_name<T>(), split ? "dK/dV per query head, " : "",
              many.args.vec_loads ? "16-byte" : "scalar ", d_out, d_lse, d_dq, d_dk,
              d_dv, d_slope);
  std::fflush(stdout);
  return ok;
}

int run(const Options& o) {
  int failed = 0, runs = 0, vector_runs = 0;
  const auto start = std::chrono::steady_clock::now();
  unsigned seed = 17;
  for (const Case& c : cases(o.all_cases)) {
    if (!o.only.empty() && c.name != o.only) continue;
    const Problem p = make_problem(c, seed++);
    failed += !check<float>(o, p, &vector_runs);
    failed += !check<c10::Half>(o, p, &vector_runs);
    failed += !check<c10::BFloat16>(o, p, &vector_runs);
    runs += 3;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("threaded emulation: %d runs, %d failed, %d with 16-byte loads, %d threads in warps of %d, %.1f s\n",
              runs, failed, vector_runs, o.threads, o.warp_size, seconds);
  return runs > 0 && failed == 0 ? 0 : 1;
}

}  // namespace
}  // namespace longreach::cuda_kernels::threaded_emulation

int main(int argc, char** argv) {
  longreach::cuda_kernels::threaded_emulation::Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--cases" && i + 1 < argc) {
      o.all_cases = std::string(argv[++i]) == "all";
    } else if (arg == "--only" && i + 1 < argc) {
      o.only = argv[++i];
    } else if (arg == "--skip-sync" && i + 1 < argc) {
      o.skip_sync = std::atoi(argv[++i]);
    } else if (arg == "--short-smem") {
      o.short_smem = true;
    } else if (arg == "--misalign-smem") {
      o.misalign_smem = true;
    } else if (arg == "--dkv-split") {
      o.dkv_split = true;
    } else {
      std::fprintf(stderr, "usage: %s [--cases quick|all] [--only NAME] [--skip-sync N] [--short-smem] [--misalign-smem] [--dkv-split]\n", argv[0]);
      return 2;
    }
  }
  return longreach::cuda_kernels::threaded_emulation::run(o);
}
