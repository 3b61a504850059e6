// DELLA's kernels on the CPU (csrc/cpu/rank_cpu.cpp): the per-row magnitude rank, and the drop masks'
// 32-bit uniforms for a per-element threshold.
#pragma once
#include <cstdint>

namespace fm {

// out[r*n + j] = #{k : |v[r*n+k]| < |v[r*n+j]|, or equal with k < j} for every row r of a [rows, n] fp32 matrix:
// the 0-based ascending rank of each magnitude in its row, equal magnitudes in column order, NaN last.
void cpu_row_rank(const float* values, int64_t rows, int64_t n, int32_t* out);

// out[j] = U_{first+j}, element first+j's 32-bit uniform of the name-keyed Philox stream (csrc/common/philox.h),
// j < numel: a row block starting at element `first` (a multiple of 128) of a tensor draws the whole tensor's.
void cpu_uniforms(uint64_t key, int64_t numel, int64_t first, int32_t* out);

}  // namespace fm
