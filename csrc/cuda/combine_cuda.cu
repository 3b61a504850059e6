// Multi-tensor linear combination on CUDA: the same formula as csrc/cpu/combine_cpu.cpp,
//     out[j] = round(b[j] + (((c_0*(x_0[j]-b[j])) + c_1*(x_1[j]-b[j])) + ...))
// with explicitly rounded (_rn) operations so nvcc cannot contract them into FMAs.
//
// One launch serves the whole table: a grid-stride loop over tiles of kTile elements; each tile finds its
// tensor by binary search over the per-tensor tile prefix. Loads are coalesced (thread k reads element
// k, k+kThreads, ...) and each thread keeps kPerThread accumulators in registers.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <algorithm>

#include "../cpu/combine_cpu.h"
#include "combine_cuda.h"

namespace fm {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int64_t kTile = int64_t(kThreads) * kPerThread;

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

template <typename Acc>
__device__ void combine_tile(const TableRow& row, int64_t n_inputs, const double* coeffs, int64_t start) {
  const int64_t numel = row.numel();
  const bool has_base = row.base() != nullptr;
  Acc acc[kPerThread];
  Acc b[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
    b[k] = (has_base && j < numel) ? load_as<Acc>(row.base(), row.base_dtype(), j) : Acc(0);
  }
  for (int64_t i = 0; i < n_inputs; ++i) {
    const void* x = row.input(i);
    const int64_t dt = row.input_dtype(i);
    const Acc c = static_cast<Acc>(coeffs[i]);
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
      if (j < numel) {
        Acc v = load_as<Acc>(x, dt, j);
        if (has_base) v = sub_rn(v, b[k]);
        v = mul_rn(v, c);
        acc[k] = i == 0 ? v : add_rn(acc[k], v);
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = start + int64_t(k) * kThreads + threadIdx.x;
    if (j < numel) store_as<Acc>(row.out(), row.out_dtype(), j, has_base ? add_rn(b[k], acc[k]) : acc[k]);
  }
}

__global__ void __launch_bounds__(kThreads)
combine_kernel(const int64_t* table, const int64_t* first_tile, int64_t n_tensors, int64_t n_inputs,
               const double* coeffs) {
  const int64_t total = first_tile[n_tensors];
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    int64_t lo = 0, hi = n_tensors;  // find t with first_tile[t] <= tile < first_tile[t+1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (first_tile[mid] <= tile) lo = mid; else hi = mid;
    }
    const TableRow row(table, n_inputs, lo);
    const int64_t start = (tile - first_tile[lo]) * kTile;
    if (row.accumulates_in_f64(n_inputs)) combine_tile<double>(row, n_inputs, coeffs, start);
    else combine_tile<float>(row, n_inputs, coeffs, start);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("fusedmerge CUDA: ") + what + ": " + cudaGetErrorString(err));
}

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

void cuda_combine(const int64_t* block, int64_t n_tensors, int64_t n_inputs, int64_t total_tiles,
                  uintptr_t stream_handle) {
  if (total_tiles == 0) return;
  int device = 0, sms = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  const int64_t* first_tile = block + n_tensors * (5 + 2 * n_inputs);
  const double* coeffs = reinterpret_cast<const double*>(first_tile + n_tensors + 1);
  const int64_t grid = std::min<int64_t>(total_tiles, int64_t(sms) * 8);
  combine_kernel<<<static_cast<unsigned>(grid), kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      block, first_tile, n_tensors, n_inputs, coeffs);
  check(cudaGetLastError(), "combine_kernel launch");
}

int64_t cuda_tile() { return kTile; }

}  // namespace fm
