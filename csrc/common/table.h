// The int64 table that drives a multi-tensor launch, and the codes it holds: the one definition shared by
// the C++ CPU kernels, the CUDA kernel and the bindings. The Python side holds the same values in
// fusedmerge/dispatch/_table.py (written there by build_table, read by the Triton kernels through
// triton_kernels/table.py); tests/test_layout.py checks them against kLayout, which the extensions export
// as LAYOUT.
//
// One row per output tensor, table_width(n_inputs) int64 entries:
//   [out_ptr, out_dtype, numel, base_ptr (0: none), base_dtype, drop_threshold (0: keep all),
//    first (index of the row's first element in its whole tensor when the row is a block of it, a multiple
//    of 128: the Philox counters start there), then per input i: in_ptr, in_dtype, coeff (fp64 bit pattern), philox
//    key]
#pragma once
#include <cstdint>
#include <cstring>

#include "hd.h"

namespace fm {

// Dtype codes of the table's dtype columns.
enum DType : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// TIES merge modes (fusedmerge/reference.py TiesSpec.merge: "sum", "mean", "max").
enum MergeMode : int64_t { kMergeSum = 0, kMergeMean = 1, kMergeMax = 2 };

// Column offsets of a row.
namespace col {
// The header: one of each per row.
constexpr int64_t kOutPtr = 0;
constexpr int64_t kOutDtype = 1;
constexpr int64_t kNumel = 2;
constexpr int64_t kBasePtr = 3;
constexpr int64_t kBaseDtype = 4;
constexpr int64_t kDropThreshold = 5;
constexpr int64_t kFirst = 6;
constexpr int64_t kHeaderWidth = 7;
// Per input i, at kHeaderWidth + kInputStride * i + the offset below.
constexpr int64_t kInPtr = 0;
constexpr int64_t kInDtype = 1;
constexpr int64_t kCoeff = 2;
constexpr int64_t kKey = 3;
constexpr int64_t kInputStride = 4;

FM_HD constexpr int64_t input(int64_t i, int64_t offset) { return kHeaderWidth + kInputStride * i + offset; }
}  // namespace col

static_assert(col::kOutPtr < col::kHeaderWidth && col::kOutDtype < col::kHeaderWidth &&
                  col::kNumel < col::kHeaderWidth && col::kBasePtr < col::kHeaderWidth &&
                  col::kBaseDtype < col::kHeaderWidth && col::kDropThreshold < col::kHeaderWidth &&
                  col::kFirst < col::kHeaderWidth,
              "header columns lie inside the header");
static_assert(col::kOutPtr + col::kOutDtype + col::kNumel + col::kBasePtr + col::kBaseDtype + col::kDropThreshold +
                      col::kFirst ==
                  col::kHeaderWidth * (col::kHeaderWidth - 1) / 2,
              "header columns are 0 .. kHeaderWidth-1, each once");
static_assert(col::kInPtr + col::kInDtype + col::kCoeff + col::kKey ==
                      col::kInputStride * (col::kInputStride - 1) / 2 &&
                  col::kInPtr < col::kInputStride && col::kInDtype < col::kInputStride &&
                  col::kCoeff < col::kInputStride && col::kKey < col::kInputStride,
              "per-input columns are 0 .. kInputStride-1, each once");
static_assert(sizeof(double) == sizeof(int64_t), "a coefficient travels as the bits of one int64 entry");

FM_HD constexpr int64_t table_width(int64_t n_inputs) { return col::kHeaderWidth + col::kInputStride * n_inputs; }

static_assert(table_width(0) == col::kHeaderWidth, "a row without inputs is its header");
static_assert(table_width(3) - table_width(2) == col::kInputStride, "inputs are kInputStride apart");
static_assert(col::input(2, col::kKey) == table_width(3) - 1, "the last input's last column ends the row");

FM_HD constexpr int64_t dtype_size(int64_t dt) { return dt == kF64 ? 8 : dt == kF32 ? 4 : 2; }

static_assert(dtype_size(kF32) == 4 && dtype_size(kF16) == 2 && dtype_size(kBF16) == 2 && dtype_size(kF64) == 8,
              "element sizes of the dtype codes");

// Row t of a table with n_inputs inputs per row.
struct TableRow {
  const int64_t* r;
  FM_HD TableRow(const int64_t* table, int64_t n_inputs, int64_t t) : r(table + t * table_width(n_inputs)) {}
  FM_HD void* out() const { return reinterpret_cast<void*>(r[col::kOutPtr]); }
  FM_HD int64_t out_dtype() const { return r[col::kOutDtype]; }
  FM_HD int64_t numel() const { return r[col::kNumel]; }
  FM_HD const void* base() const { return reinterpret_cast<const void*>(r[col::kBasePtr]); }
  FM_HD int64_t base_dtype() const { return r[col::kBaseDtype]; }
  FM_HD uint32_t drop_threshold() const { return static_cast<uint32_t>(r[col::kDropThreshold]); }
  FM_HD int64_t first() const { return r[col::kFirst]; }
  FM_HD const void* input(int64_t i) const { return reinterpret_cast<const void*>(r[col::input(i, col::kInPtr)]); }
  FM_HD int64_t input_dtype(int64_t i) const { return r[col::input(i, col::kInDtype)]; }
  FM_HD double coeff(int64_t i) const {
    double c;
    memcpy(&c, r + col::input(i, col::kCoeff), sizeof(double));
    return c;
  }
  FM_HD uint64_t key(int64_t i) const { return static_cast<uint64_t>(r[col::input(i, col::kKey)]); }
  // fp64 accumulation when the base or any input is fp64.
  FM_HD bool accumulates_in_f64(int64_t n_inputs) const {
    bool f64 = base() != nullptr && base_dtype() == kF64;
    for (int64_t i = 0; i < n_inputs; ++i) f64 = f64 || input_dtype(i) == kF64;
    return f64;
  }
};

// Every value above by name, as the extensions export it (LAYOUT) and fusedmerge/dispatch/_table.py
// spells it (LAYOUT there).
struct LayoutEntry {
  const char* name;
  int64_t value;
};
inline constexpr LayoutEntry kLayout[] = {
    {"OUT_PTR", col::kOutPtr},
    {"OUT_DTYPE", col::kOutDtype},
    {"NUMEL", col::kNumel},
    {"BASE_PTR", col::kBasePtr},
    {"BASE_DTYPE", col::kBaseDtype},
    {"DROP_THRESHOLD", col::kDropThreshold},
    {"FIRST", col::kFirst},
    {"HEADER_WIDTH", col::kHeaderWidth},
    {"IN_PTR", col::kInPtr},
    {"IN_DTYPE", col::kInDtype},
    {"COEFF", col::kCoeff},
    {"KEY", col::kKey},
    {"INPUT_STRIDE", col::kInputStride},
    {"F32", kF32},
    {"F16", kF16},
    {"BF16", kBF16},
    {"F64", kF64},
    {"MERGE_SUM", kMergeSum},
    {"MERGE_MEAN", kMergeMean},
    {"MERGE_MAX", kMergeMax},
};

}  // namespace fm
