// Marks functions that both the CPU (C++) and CUDA kernels compile from one source.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LR_HOST_DEVICE inline
#endif
