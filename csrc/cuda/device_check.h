// Before a launch: can this device run the kernels of this build? A GPU below
// sm80 (no bfloat16 tensor cores) or a build without device code the GPU can
// run would otherwise fail with CUDA's "no kernel image is available".
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

// The architectures CMake built device code for (LONGREACH_CUDA_ARCHS).
#ifndef LONGREACH_BUILT_CUDA_ARCHS
#define LONGREACH_BUILT_CUDA_ARCHS "unknown"
#endif

namespace longreach::cuda_kernels {

inline void check_device_runs(int device, const void* kernel) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(major >= 8, "local_attention (CUDA): device ", device, " has compute capability ", major, ".", minor,
              "; the CUDA kernels need 8.0 or newer (sm80: A100, RTX 30xx and later). Run on the CPU instead.");
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction) {
    (void)cudaGetLastError();  // clear the sticky error before raising
    TORCH_CHECK(false, "local_attention (CUDA): this build of longreach has device code for sm ",
                LONGREACH_BUILT_CUDA_ARCHS, ", none of which runs on device ", device, " (sm", major, minor,
                "). Rebuild with LONGREACH_CUDA_ARCHS=\"", major, minor,
                "\" (docs/cuda.md), e.g. LONGREACH_CUDA_ARCHS=", major, minor, " scripts/build_cuda.sh");
  }
  C10_CUDA_CHECK(status);
}

}  // namespace longreach::cuda_kernels
