// Multi-tensor sums of products on the CPU (the `dots` primitive, csrc/cpu/dots_cpu.cpp).
#pragma once
#include <cstdint>

#include "../common/table.h"

namespace fm {

// Elements of one chunk of a row (a power of two): each row's chunk sums are added by the same tree.
constexpr int64_t kDotsChunk = 1024;

// rows: int64 [n_tensors], the rows of each table row's tensor (numel / rows elements each, rows = 0 only
// for an empty tensor); pairs: int64 [n_pairs, 2]; sums: fp64 [Σ rows, n_pairs], written table row by table
// row, row by row.
struct DotsParams {
  const int64_t* rows;
  const int64_t* pairs;
  int64_t n_pairs;
  double* sums;
};

#define FM_DECLARE_CPU_DOTS(ns)                                                              \
  namespace ns {                                                                             \
  void dots(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const DotsParams& p); \
  }
FM_DECLARE_CPU_DOTS(baseline)
FM_DECLARE_CPU_DOTS(avx2)
FM_DECLARE_CPU_DOTS(avx512)
#undef FM_DECLARE_CPU_DOTS

// The best variant for this CPU (csrc/cpu/dispatch.cpp).
void cpu_dots(const int64_t* table, int64_t n_tensors, int64_t n_inputs, const DotsParams& p);

}  // namespace fm
