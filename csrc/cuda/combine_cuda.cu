// Multi-tensor linear combination with optional random drop (DARE) on CUDA: the formula of
// csrc/cpu/combine_cpu.cpp,
//     out[j] = round(b[j] + ((e_0 + e_1) + ...)),  e_i = keep_i[j] ? c_i*(x_i[j]-b[j]) : 0
// with explicitly rounded (_rn) operations so nvcc cannot contract them into FMAs.
//
// One launch serves the whole table: a grid-stride loop over tiles of kTile elements; each tile finds its
// tensor by binary search over the per-tensor tile prefix. Each thread owns kCalls Philox calls of the
// tile and the 8 elements each serves (csrc/common/philox.h: call 16 g + l serves elements 128 g + 32 w + 16 h + l),
// so 16 neighbouring threads read 16 consecutive elements.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "../common/numerics.h"
#include "../common/philox.h"
#include "../common/table.h"
#include "combine_cuda.h"

namespace fm {
namespace {

constexpr int kThreads = 256;
constexpr int kCalls = 2;
constexpr int kPerThread = 8 * kCalls;
constexpr int64_t kTile = int64_t(kThreads) * kPerThread;
static_assert(kTile % kGroup == 0, "tiles hold whole Philox groups");

__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Call q of this thread, counted from the tile's first call.
__device__ __forceinline__ int64_t tile_call(int q) { return int64_t(q) * kThreads + threadIdx.x; }

// Element k of this thread's share of the tile starting at `start`: half h = k % 2 of word w = (k / 2) % 4
// of call q = k / 8.
__device__ __forceinline__ int64_t element(int64_t start, int k) {
  const int64_t c = tile_call(k / 8);
  return start + (c / 16) * kGroup + c % 16 + 32 * ((k / 2) % 4) + 16 * (k % 2);
}

// The 32-bit uniforms of the 8 elements served by call q of this thread (csrc/common/philox.h), for comparison with
// `threshold`: stream 1 only where a high half ties with threshold >> 16.
__device__ __forceinline__ void uniforms(uint32_t (&u)[8], int64_t start, int q, uint64_t key, uint32_t threshold) {
  const uint64_t call = static_cast<uint64_t>(start / kElementsPerCall + tile_call(q));
  const Words4 a = philox4x32_10(call, key, 0);
  bool tie = false;
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const uint32_t hi = (a.w[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
    u[e] = hi << 16;
    tie = tie || hi == threshold >> 16;
  }
  if (tie) {
    const Words4 b = philox4x32_10(call, key, 1);
#pragma unroll
    for (int e = 0; e < 8; ++e) u[e] |= (b.w[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
  }
}

template <typename Acc>
__device__ void combine_tile(const TableRow& row, int64_t n_inputs, int64_t start) {
  const int64_t numel = row.numel();
  const bool has_base = row.base() != nullptr;
  const uint32_t threshold = row.drop_threshold();
  Acc acc[kPerThread];
  Acc b[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = element(start, k);
    b[k] = (has_base && j < numel) ? load_as<Acc>(row.base(), row.base_dtype(), j) : Acc(0);
  }
  for (int64_t i = 0; i < n_inputs; ++i) {
    const void* x = row.input(i);
    const int64_t dt = row.input_dtype(i);
    const Acc c = static_cast<Acc>(row.coeff(i));
    const uint64_t key = row.key(i);
#pragma unroll
    for (int q = 0; q < kCalls; ++q) {
      uint32_t u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (threshold != 0 && element(start, 8 * q) < numel) uniforms(u, row.first() + start, q, key, threshold);
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int k = 8 * q + e;
        const int64_t j = element(start, k);
        if (j < numel) {
          Acc v = load_as<Acc>(x, dt, j);
          if (has_base) v = sub_rn(v, b[k]);
          v = mul_rn(v, c);
          if (threshold != 0 && u[e] < threshold) v = Acc(0);
          acc[k] = i == 0 ? v : add_rn(acc[k], v);
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const int64_t j = element(start, k);
    if (j < numel) store_as<Acc>(row.out(), row.out_dtype(), j, has_base ? add_rn(b[k], acc[k]) : acc[k]);
  }
}

__global__ void __launch_bounds__(kThreads)
    combine_kernel(const int64_t* table, const int64_t* first_tile, int64_t n_tensors, int64_t n_inputs) {
  const int64_t total = first_tile[n_tensors];
  for (int64_t tile = blockIdx.x; tile < total; tile += gridDim.x) {
    int64_t lo = 0, hi = n_tensors;  // find t with first_tile[t] <= tile < first_tile[t+1]
    while (hi - lo > 1) {
      const int64_t mid = (lo + hi) / 2;
      if (first_tile[mid] <= tile) lo = mid;
      else hi = mid;
    }
    const TableRow row(table, n_inputs, lo);
    const int64_t start = (tile - first_tile[lo]) * kTile;
    if (row.accumulates_in_f64(n_inputs)) combine_tile<double>(row, n_inputs, start);
    else combine_tile<float>(row, n_inputs, start);
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fusedmerge CUDA: ") + what + ": " + cudaGetErrorString(err));
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
  const int64_t* first_tile = block + n_tensors * table_width(n_inputs);
  const int64_t grid = std::min<int64_t>(total_tiles, int64_t(sms) * 8);
  combine_kernel<<<static_cast<unsigned>(grid), kThreads, 0, reinterpret_cast<cudaStream_t>(stream_handle)>>>(
      block, first_tile, n_tensors, n_inputs);
  check(cudaGetLastError(), "combine_kernel launch");
}

int64_t cuda_tile() { return kTile; }

}  // namespace fm
