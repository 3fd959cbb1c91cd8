// Host emulation of the CUDA decode kernels (csrc/cuda/decode_blocks.cuh), for
// tests on machines without a GPU: the CUDA entry's host logic
// (csrc/cuda/decode_entry.h: the checks, the append, the split rule) with every
// block run in a loop by one host "thread", shared memory poisoned before each
// block so a read before a write shows. Built on the fly by
// tests/cuda_emulation.py (load_decode); CPU tensors in, CPU tensors out.
#include <torch/extension.h>

#include <vector>

#include "cuda/decode_entry.h"
#include "cuda/grid_fold.h"

namespace longreach::cuda_kernels {
namespace {

int64_t emulated_sms = 108;     // the split heuristic's SM count (an A100's)
int64_t grid_fold_limit = kMaxGridYZ;

struct HostDecodeBackend {
  template <typename T>
  void decode(const DecodeArgs<T>& a) {
    const int64_t smem = decode_smem_bytes(a.P.head_dim);
    TORCH_CHECK(smem <= 99 * 1024, "emulation: decode block needs ", smem, " bytes of shared memory");
    std::vector<char> buffer(static_cast<size_t>(smem) + 128);
    char* base = buffer.data() + (128 - reinterpret_cast<uintptr_t>(buffer.data()) % 128) % 128;
    const int64_t units = a.units_per_batch();
    const HeadBatchGrid grid = fold_heads_batch(units, a.P.batch, grid_fold_limit);
    for (int64_t z = 0; z < grid.z; ++z) {
      for (int64_t y = 0; y < grid.y; ++y) {
        int64_t unit = 0, b = 0;
        if (!unfold_head_batch(units, a.P.batch, y, z, grid.y, &unit, &b)) continue;
        for (int64_t split = 0; split < a.n_splits; ++split) {
          std::fill(buffer.begin(), buffer.end(), static_cast<char>(0x7f));
          decode_block<T>(a, split, unit, b, base);
        }
      }
    }
    if (a.n_splits == 1) return;
    for (int64_t blk = 0; blk * kDecodeMergeRows < a.rows(); ++blk) decode_merge_block<T>(a, blk);
  }
  int64_t multiprocessors() { return emulated_sms; }
};

std::tuple<at::Tensor, at::Tensor> emulated_kvcache_fwd(
    const at::Tensor& q, at::Tensor k_cache, at::Tensor v_cache, const c10::optional<at::Tensor>& k,
    const c10::optional<at::Tensor>& v, const at::Tensor& cache_seqlens, const c10::optional<at::Tensor>& block_table,
    const c10::optional<at::Tensor>& alibi_slopes, const c10::optional<at::Tensor>& sinks, int64_t window_left,
    int64_t window_right, int64_t dilation, const std::string& score, c10::optional<double> sigmoid_bias,
    double softcap, double scale, int64_t sink_tokens, bool rolling, int64_t num_splits, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift) {
  HostDecodeBackend backend;
  return kvcache_forward(backend, q, k_cache, v_cache, k, v, cache_seqlens, block_table, alibi_slopes, sinks,
                         window_left, window_right, dilation, score, sigmoid_bias, softcap, scale, sink_tokens,
                         rolling, num_splits, chunk, chunk_shift);
}

}  // namespace
}  // namespace longreach::cuda_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  namespace ck = longreach::cuda_kernels;
  // The schema of longreach::local_attention_kvcache_fwd, argument for argument.
  m.def("kvcache_fwd", &ck::emulated_kvcache_fwd, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("k"), py::arg("v"), py::arg("cache_seqlens"), py::arg("block_table"), py::arg("alibi_slopes"),
        py::arg("sinks"), py::arg("window_left"), py::arg("window_right"), py::arg("dilation"), py::arg("score"),
        py::arg("sigmoid_bias"), py::arg("softcap"), py::arg("scale"), py::arg("sink_tokens"), py::arg("rolling"),
        py::arg("num_splits"), py::arg("chunk") = 0, py::arg("chunk_shift") = py::none());
  m.def("set_multiprocessors", [](int64_t n) {
    TORCH_CHECK(n >= 1, "multiprocessors must be >= 1");
    ck::emulated_sms = n;
  });
  m.def("set_grid_fold_limit", [](int64_t limit) {
    TORCH_CHECK(limit >= 1 && limit <= ck::kMaxGridYZ, "grid fold limit must be 1 .. 65535");
    ck::grid_fold_limit = limit;
  });
  m.def("splits", &ck::decode_splits, py::arg("asked"), py::arg("units"), py::arg("longest_span"),
        py::arg("multiprocessors"));
}
