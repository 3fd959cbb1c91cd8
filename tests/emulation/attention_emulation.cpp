// Host emulation of the CUDA local-attention kernels, for tests on machines
// without a GPU: the same block functions (csrc/cuda/attention_blocks.cuh) and
// the same entry logic (csrc/cuda/attention_entry.h), with every block run in
// a loop by one host "thread". Tile products take the plain-loop path (the
// WMMA path needs sm80), so this checks the schedule, masks, online softmax,
// score transforms and backward of the CUDA kernels, not the tensor-core code.
// Built on the fly by tests/cuda_emulation.py.
#include <torch/extension.h>

#include <limits>
#include <memory>
#include <vector>

#include "cuda/attention_entry.h"
#include "cuda/grid_fold.h"

namespace longreach::cuda_kernels {
namespace {

// Blocks per row of the folded (head, batch) grid: the device's 65535, or
// less for tests (set_grid_fold_limit), so a few pairs fill several rows.
int64_t grid_fold_limit = kMaxGridYZ;

struct HostBackend {
  template <typename Body>
  static void run_blocks(int64_t smem, int64_t blocks, int64_t heads, int64_t batch, Body&& body) {
    TORCH_CHECK(smem <= kMaxSharedBytes, "emulation: block needs ", smem, " bytes of shared memory");
    std::vector<char> buffer(static_cast<size_t>(smem) + 128);
    char* base = buffer.data() + (128 - reinterpret_cast<uintptr_t>(buffer.data()) % 128) % 128;
    // The grid the kernels are launched with: heads x batch folded into
    // grid.y x grid.z (grid_fold.h), each block finding its (head, batch) as they do.
    const HeadBatchGrid grid = fold_heads_batch(heads, batch, grid_fold_limit);
    TORCH_CHECK(grid.z <= kMaxGridYZ, "emulation: too many (head, batch) pairs");
    for (int64_t z = 0; z < grid.z; ++z) {
      for (int64_t y = 0; y < grid.y; ++y) {
        int64_t h = 0, b = 0;
        if (!unfold_head_batch(heads, batch, y, z, grid.y, &h, &b)) continue;
        for (int64_t blk = 0; blk < blocks; ++blk) {
          // Poison shared memory so a read-before-write shows up as a wrong result.
          std::fill(buffer.begin(), buffer.end(), static_cast<char>(0x7f));
          body(blk, h, b, base);
        }
      }
    }
  }

  template <typename T>
  void forward(const AttentionArgs<T, float>& a) {
    dispatch_head_dim(a.P.head_dim, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      using S = TileShape<T, DMAX>;
      run_blocks(ForwardSmem<T, float, DMAX, S::kFwdM, S::kFwdN>::bytes(), row_blocks(a.P, S::kFwdM), a.P.q_heads,
                 a.P.batch, [&](int64_t blk, int64_t h, int64_t b, char* smem) {
                   forward_block<T, float, DMAX, S::kFwdM, S::kFwdN>(a, blk, h, b, smem);
                 });
    });
  }

  template <typename T>
  void backward(const AttentionArgs<T, float>& a) {
    dispatch_head_dim(a.P.head_dim, [&](auto dmax) {
      constexpr int DMAX = decltype(dmax)::value;
      using S = TileShape<T, DMAX>;
      run_blocks(DqSmem<T, float, DMAX, S::kDqM, S::kDqN>::bytes(), row_blocks(a.P, S::kDqM), a.P.q_heads,
                 a.P.batch, [&](int64_t blk, int64_t h, int64_t b, char* smem) {
                   backward_dq_block<T, float, DMAX, S::kDqM, S::kDqN>(a, blk, h, b, smem);
                 });
      run_blocks(DkvSmem<T, float, DMAX, S::kDkvM, S::kDkvN>::bytes(), key_blocks(a.P, S::kDkvN), a.dkv_grid_heads(),
                 a.P.batch, [&](int64_t blk, int64_t hk, int64_t b, char* smem) {
                   backward_dkv_block<T, float, DMAX, S::kDkvM, S::kDkvN>(a, blk, hk, b, smem);
                 });
    });
  }

  // The device leaves these outputs uninitialised (every element is written by
  // a block); NaN here makes an element no block writes fail the tests.
  at::Tensor unfilled(at::IntArrayRef sizes, const at::TensorOptions& options) {
    return at::full(sizes, std::numeric_limits<double>::quiet_NaN(), options);
  }

  // As if on an H100 SXM (132 SMs); LONGREACH_CUDA_DKV_SPLIT forces either dK/dV path in tests.
  int64_t multiprocessors() const { return 132; }

  at::Tensor row_dot(const AttentionParams&, const at::Tensor& grad_out, const at::Tensor& out,
                     const c10::optional<at::Tensor>& grad_lse) {
    at::Tensor r = (grad_out.to(at::kFloat) * out.to(at::kFloat)).sum(-1);
    if (grad_lse.has_value()) r = r - grad_lse->to(at::kFloat);
    return r.contiguous();
  }
};

// The ops' chunk= / chunk_shift= and dropout arguments (keywords of every emulated entry).
ChunkDropoutOptions chunk_dropout(int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
                                  const c10::optional<at::Tensor>& dropout_seed) {
  return ChunkDropoutOptions{chunk, chunk_shift, dropout_p, dropout_seed};
}

std::tuple<at::Tensor, at::Tensor> emulated_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const c10::optional<at::Tensor>& global_mask,
                                                const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left,
                                                int64_t window_right, int64_t dilation, const std::string& score,
                                                c10::optional<double> sigmoid_bias, double softcap, double scale,
                                                const c10::optional<at::Tensor>& key_padding_mask,
                                                const c10::optional<at::Tensor>& sinks, int64_t chunk,
                                                const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
                                                const c10::optional<at::Tensor>& dropout_seed) {
  HostBackend backend;
  return attention_forward(backend, q, k, v, global_mask, alibi_slopes, window_left, window_right, dilation, score,
                           sigmoid_bias, softcap, scale, key_padding_mask, SinkOptions{false, 0, &sinks},
                           chunk_dropout(chunk, chunk_shift, dropout_p, dropout_seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    const std::string& score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& sinks, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift, double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  HostBackend backend;
  return attention_backward(backend, grad_out, grad_lse, q, k, v, out, lse, global_mask, alibi_slopes, window_left,
                            window_right, dilation, score, sigmoid_bias, softcap, scale, alibi_grad,
                            key_padding_mask, SinkOptions{false, 0, &sinks},
                            chunk_dropout(chunk, chunk_shift, dropout_p, dropout_seed));
}

std::tuple<at::Tensor, at::Tensor> emulated_varlen_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    const std::string& score, c10::optional<double> sigmoid_bias, double softcap, double scale, int64_t chunk,
    const c10::optional<at::Tensor>& chunk_shift, double dropout_p, const c10::optional<at::Tensor>& dropout_seed) {
  HostBackend backend;
  return attention_varlen_forward(backend, q, k, v, cu_q, cu_k, max_q, max_k, global_mask, alibi_slopes, window_left,
                                  window_right, dilation, score, sigmoid_bias, softcap, scale, SinkOptions{},
                                  chunk_dropout(chunk, chunk_shift, dropout_p, dropout_seed));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_varlen_bwd(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q, const at::Tensor& cu_k,
    int64_t max_q, int64_t max_k, const c10::optional<at::Tensor>& global_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, int64_t dilation,
    const std::string& score, c10::optional<double> sigmoid_bias, double softcap, double scale, bool alibi_grad,
    int64_t chunk, const c10::optional<at::Tensor>& chunk_shift, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  HostBackend backend;
  return attention_varlen_backward(backend, grad_out, grad_lse, q, k, v, out, lse, cu_q, cu_k, max_q, max_k,
                                   global_mask, alibi_slopes, window_left, window_right, dilation, score, sigmoid_bias,
                                   softcap, scale, alibi_grad, SinkOptions{},
                                   chunk_dropout(chunk, chunk_shift, dropout_p, dropout_seed));
}

}  // namespace
}  // namespace longreach::cuda_kernels

// The keywords every entry takes after its positional arguments (the ops' chunk and dropout ones).
#define LR_CHUNK_DROPOUT_ARGS                                                                        \
  pybind11::arg("chunk") = 0, pybind11::arg("chunk_shift") = pybind11::none(),                        \
      pybind11::arg("dropout_p") = 0.0, pybind11::arg("dropout_seed") = pybind11::none()

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.def("fwd", &longreach::cuda_kernels::emulated_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("global_mask"), py::arg("alibi_slopes"), py::arg("window_left"), py::arg("window_right"),
        py::arg("dilation"), py::arg("score"), py::arg("sigmoid_bias"), py::arg("softcap"), py::arg("scale"),
        py::arg("key_padding_mask") = py::none(), py::arg("sinks") = py::none(), LR_CHUNK_DROPOUT_ARGS);
  m.def("bwd", &longreach::cuda_kernels::emulated_bwd, py::arg("grad_out"), py::arg("grad_lse"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("global_mask"), py::arg("alibi_slopes"),
        py::arg("window_left"), py::arg("window_right"), py::arg("dilation"), py::arg("score"),
        py::arg("sigmoid_bias"), py::arg("softcap"), py::arg("scale"), py::arg("alibi_grad") = false,
        py::arg("key_padding_mask") = py::none(), py::arg("sinks") = py::none(), LR_CHUNK_DROPOUT_ARGS);
  m.def("set_grid_fold_limit", [](int64_t limit) {
    TORCH_CHECK(limit >= 1 && limit <= longreach::cuda_kernels::kMaxGridYZ, "grid fold limit must be 1 .. 65535");
    longreach::cuda_kernels::grid_fold_limit = limit;
  });
  m.def("varlen_fwd", &longreach::cuda_kernels::emulated_varlen_fwd, py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("global_mask"), py::arg("alibi_slopes"), py::arg("window_left"), py::arg("window_right"),
        py::arg("dilation"), py::arg("score"), py::arg("sigmoid_bias"), py::arg("softcap"), py::arg("scale"),
        LR_CHUNK_DROPOUT_ARGS);
  m.def("varlen_bwd", &longreach::cuda_kernels::emulated_varlen_bwd, py::arg("grad_out"), py::arg("grad_lse"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("cu_seqlens_q"),
        py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("global_mask"),
        py::arg("alibi_slopes"), py::arg("window_left"), py::arg("window_right"), py::arg("dilation"),
        py::arg("score"), py::arg("sigmoid_bias"), py::arg("softcap"), py::arg("scale"), py::arg("alibi_grad"),
        LR_CHUNK_DROPOUT_ARGS);
}
