// FM_HD: functions compiled for the host (C++ CPU kernels) and, under nvcc, for the device too.
#pragma once

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline __attribute__((always_inline))
#endif
