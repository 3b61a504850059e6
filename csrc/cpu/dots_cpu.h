// Multi-tensor sums of products on the CPU (the `dots` primitive, csrc/cpu/dots_cpu.cpp).
#pragma once
#include <cstdint>

#include "../common/table.h"

namespace fm {

// Elements of one chunk of a row (a power of two): chunk sums feed fusedmerge/reductions.py tree_sum.
constexpr int64_t kDotsChunk = 1024;

// chunks: int64 [n_chunks, 3] (table row, first element, length ≤ kDotsChunk); pairs: int64 [n_pairs, 2];
// partials: fp64 [n_chunks, n_pairs], written.
struct DotsParams {
  const int64_t* chunks;
  int64_t n_chunks;
  const int64_t* pairs;
  int64_t n_pairs;
  double* partials;
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
