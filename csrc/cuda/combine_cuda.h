// CUDA entry points. `block` is one device buffer laid out as
//   [table (csrc/common/table.h) | first_tile[n_tensors + 1]]
// where first_tile is the prefix sum of ceil(numel / cuda_tile()) per tensor; the launch runs on `stream`.
#pragma once
#include <cstdint>

namespace fm {
int cuda_device_count();
int64_t cuda_tile();
void cuda_combine(const int64_t* block, int64_t n_tensors, int64_t n_inputs, int64_t total_tiles, uintptr_t stream);
}  // namespace fm
