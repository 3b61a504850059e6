// The table that drives a multi-tensor launch, and the per-ISA CPU entry points.
//
// One int64 row per output tensor, written by fusedmerge/dispatch/_table.py:
//   [out_ptr, out_dtype, numel, base_ptr (0: none), base_dtype, in_ptr_0, in_dtype_0, ..., in_ptr_{N-1}, in_dtype_{N-1}]
#pragma once
#include <cstdint>

#include "../numerics.h"

namespace fm {

FM_HD int64_t dtype_size(int64_t dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

struct TableRow {
  const int64_t* r;
  FM_HD TableRow(const int64_t* table, int64_t n_inputs, int64_t t) : r(table + t * (5 + 2 * n_inputs)) {}
  FM_HD void* out() const { return reinterpret_cast<void*>(r[0]); }
  FM_HD int64_t out_dtype() const { return r[1]; }
  FM_HD int64_t numel() const { return r[2]; }
  FM_HD const void* base() const { return reinterpret_cast<const void*>(r[3]); }
  FM_HD int64_t base_dtype() const { return r[4]; }
  FM_HD const void* input(int64_t i) const { return reinterpret_cast<const void*>(r[5 + 2 * i]); }
  FM_HD int64_t input_dtype(int64_t i) const { return r[6 + 2 * i]; }
  // fp64 accumulation when the base or any input is fp64.
  FM_HD bool accumulates_in_f64(int64_t n_inputs) const {
    bool f64 = base() != nullptr && base_dtype() == kF64;
    for (int64_t i = 0; i < n_inputs; ++i) f64 = f64 || input_dtype(i) == kF64;
    return f64;
  }
};

#define FM_DECLARE_CPU_COMBINE(ns) \
  namespace ns { void combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const double* coeffs); }
FM_DECLARE_CPU_COMBINE(baseline)
FM_DECLARE_CPU_COMBINE(avx2)
FM_DECLARE_CPU_COMBINE(avx512)
#undef FM_DECLARE_CPU_COMBINE

// Picks the best variant this CPU runs; returns its name.
const char* cpu_isa();
void cpu_combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const double* coeffs);

}  // namespace fm
