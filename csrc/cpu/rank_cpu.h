// Segmented rank on the CPU (csrc/cpu/rank_cpu.cpp): DELLA's per-row magnitude rank.
#pragma once
#include <cstdint>

namespace fm {

// out[r*n + j] = #{k : |v[r*n+k]| < |v[r*n+j]|, or equal with k < j} for every row r of a [rows, n] fp32 matrix:
// the 0-based ascending rank of each magnitude in its row, equal magnitudes in column order, NaN last.
void cpu_row_rank(const float* values, int64_t rows, int64_t n, int32_t* out);

}  // namespace fm
