// DELLA's kernels on the CPU (csrc/cpu/rank_cpu.cpp): the per-row magnitude rank, and the drop masks'
// 32-bit uniforms for a per-element threshold.
#pragma once
#include <cstdint>

namespace fm {

// out[r*n + j] = #{k : |v[r*n+k]| < |v[r*n+j]|, or equal with k < j} for every row r of a [rows, n] fp32 matrix:
// the 0-based ascending rank of each magnitude in its row, equal magnitudes in column order, NaN last.
void cpu_row_rank(const float* values, int64_t rows, int64_t n, int32_t* out);

// out[j] = U_j, element j's 32-bit uniform of the name-keyed Philox stream (csrc/common/philox.h), j < numel.
void cpu_uniforms(uint64_t key, int64_t numel, int32_t* out);

}  // namespace fm
