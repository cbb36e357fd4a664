// IOUCTL_HOST_DEVICE marks the per-element math that both backends run (`#include "common/host_device.h"`;
// kernels/ is on every library's include path): __host__ __device__ under nvcc (or hipcc), so a CUDA kernel calls the
// very function the CPU tests cover, and plain `inline` in a C++ build (PyTorch's C10_HOST_DEVICE, without c10).
#pragma once

#ifndef IOUCTL_HOST_DEVICE
#if defined(__CUDACC__) || defined(__HIPCC__)
#define IOUCTL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define IOUCTL_HOST_DEVICE inline
#endif
#endif
