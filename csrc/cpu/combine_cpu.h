// The table that drives a multi-tensor launch, and the per-ISA CPU entry points.
//
// One int64 row per output tensor, written by fusedmerge/dispatch/_table.py:
//   [out_ptr, out_dtype, numel, base_ptr (0: none), base_dtype, drop_threshold (0: keep all),
//    then per input i: in_ptr, in_dtype, coeff (fp64 bit pattern), philox key]
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../numerics.h"

namespace fm {

FM_HD int64_t dtype_size(int64_t dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

FM_HD int64_t table_width(int64_t n_inputs) { return 6 + 4 * n_inputs; }

struct TableRow {
  const int64_t* r;
  FM_HD TableRow(const int64_t* table, int64_t n_inputs, int64_t t) : r(table + t * table_width(n_inputs)) {}
  FM_HD void* out() const { return reinterpret_cast<void*>(r[0]); }
  FM_HD int64_t out_dtype() const { return r[1]; }
  FM_HD int64_t numel() const { return r[2]; }
  FM_HD const void* base() const { return reinterpret_cast<const void*>(r[3]); }
  FM_HD int64_t base_dtype() const { return r[4]; }
  FM_HD uint32_t drop_threshold() const { return static_cast<uint32_t>(r[5]); }
  FM_HD const void* input(int64_t i) const { return reinterpret_cast<const void*>(r[6 + 4 * i]); }
  FM_HD int64_t input_dtype(int64_t i) const { return r[7 + 4 * i]; }
  FM_HD double coeff(int64_t i) const {
    double c;
    memcpy(&c, r + 8 + 4 * i, sizeof(double));
    return c;
  }
  FM_HD uint64_t key(int64_t i) const { return static_cast<uint64_t>(r[9 + 4 * i]); }
  // fp64 accumulation when the base or any input is fp64.
  FM_HD bool accumulates_in_f64(int64_t n_inputs) const {
    bool f64 = base() != nullptr && base_dtype() == kF64;
    for (int64_t i = 0; i < n_inputs; ++i) f64 = f64 || input_dtype(i) == kF64;
    return f64;
  }
};

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
