// The per-ISA CPU entry points, and the chunking of a table (csrc/common/table.h) for one parallel loop.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "../common/table.h"

namespace fm {

// The rows of a table cut into chunks of `chunk` elements, numbered across rows in table order, so that
// one parallel loop over chunk numbers balances rows of any size.
struct ChunkGrid {
  struct Span { int64_t row, start, n; };
  const int64_t* table;
  int64_t n_inputs, chunk;
  std::vector<int64_t> first;  // first chunk number of each row, and the total at the end
  ChunkGrid(const int64_t* table_, int64_t n_tensors, int64_t n_inputs_, int64_t chunk_)
      : table(table_), n_inputs(n_inputs_), chunk(chunk_), first(n_tensors + 1, 0) {
    for (int64_t t = 0; t < n_tensors; ++t)
      first[t + 1] = first[t] + (TableRow(table, n_inputs, t).numel() + chunk - 1) / chunk;
  }
  int64_t total() const { return first.back(); }
  Span operator[](int64_t g) const {
    const int64_t t = std::upper_bound(first.begin(), first.end(), g) - first.begin() - 1;
    const int64_t start = (g - first[t]) * chunk;
    return {t, start, std::min(chunk, TableRow(table, n_inputs, t).numel() - start)};
  }
};

#define FM_DECLARE_CPU_COMBINE(ns)                                                              \
  namespace ns {                                                                                \
  void combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs);                      \
  void l1_buckets(const int64_t* table, int64_t n_tensors, int64_t n_inputs, int64_t* buckets); \
  }
FM_DECLARE_CPU_COMBINE(baseline)
FM_DECLARE_CPU_COMBINE(avx2)
FM_DECLARE_CPU_COMBINE(avx512)
#undef FM_DECLARE_CPU_COMBINE

// Picks the best variant this CPU runs; returns its name.
const char* cpu_isa();
void cpu_combine(const int64_t* table, int64_t n_tensors, int64_t n_inputs);
void cpu_l1_buckets(const int64_t* table, int64_t n_tensors, int64_t n_inputs, int64_t* buckets);

}  // namespace fm
