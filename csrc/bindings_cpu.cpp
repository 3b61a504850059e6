// pybind11 shim of the CPU kernels: raw addresses in, no libtorch. Parameters travel as structs built by
// field name (keyword-only), so two arguments cannot be swapped silently.
#include <omp.h>
#include <pybind11/pybind11.h>

#include "bindings_common.h"
#include "cpu/combine_cpu.h"
#include "cpu/dots_cpu.h"
#include "cpu/rank_cpu.h"
#include "cpu/ties_cpu.h"

namespace py = pybind11;

namespace fm {
namespace {

struct TiesSelectArgs {
  TableArgs table;
  bool model_scope = false;  // one threshold per model over all rows, else one per (row, model)
  uintptr_t ks = 0;          // int64 [scopes, n_inputs]: k of each threshold
  uintptr_t thresholds = 0;  // uint32 [scopes, n_inputs], written
};

struct TiesMergeArgs {
  TableArgs table;
  uintptr_t thresholds = 0;  // uint32 [scopes, n_inputs] from ties_select (unused on rows with a drop threshold)
  bool model_scope = false;
  bool elect_count = false;
  bool weighted_vote = false;
  MergeMode merge = kMergeSum;
  double scaling = 1.0;
  double drop_rescale = 1.0;
  bool majority_tie = false;  // signs that tie take the sign of the whole table's vote, else +1
};

struct RowRankArgs {
  uintptr_t values = 0;  // fp32 [rows, n], contiguous
  int64_t rows = 0;
  int64_t n = 0;
  uintptr_t out = 0;  // int32 [rows, n], written
};

struct DotsArgs {
  TableArgs table;
  uintptr_t rows = 0;   // int64 [n_tensors]: rows of each table row's tensor (seen as [rows, numel / rows])
  uintptr_t pairs = 0;  // int64 [n_pairs, 2]: input indices (a, c)
  int64_t n_pairs = 0;
  uintptr_t sums = 0;  // fp64 [Σ rows, n_pairs], written: each row's tree sum of u_a·u_c
};

MergeMode checked(MergeMode merge) {
  if (merge != kMergeSum && merge != kMergeMean && merge != kMergeMax)
    throw py::value_error("fusedmerge: unknown TIES merge mode " + std::to_string(static_cast<int64_t>(merge)));
  return merge;
}

}  // namespace
}  // namespace fm

PYBIND11_MODULE(_cpu, m) {
  using fm::TableArgs;
  using fm::TiesMergeArgs;
  using fm::TiesSelectArgs;
  m.doc() = "fusedmerge C++ CPU kernels";
  fm::bind_layout(m);
  fm::bind_table_args(m);

  py::enum_<fm::MergeMode>(m, "MergeMode", "TIES merge modes (csrc/common/table.h).")
      .value("sum", fm::kMergeSum)
      .value("mean", fm::kMergeMean)
      .value("max", fm::kMergeMax);

  py::class_<TiesSelectArgs>(m, "TiesSelectArgs", "Parameters of ties_select.")
      .def(py::init([](const TableArgs& table, bool model_scope, uintptr_t ks, uintptr_t thresholds) {
             return TiesSelectArgs{table, model_scope, ks, thresholds};
           }),
           py::kw_only(), py::arg("table"), py::arg("model_scope").noconvert(), py::arg("ks"), py::arg("thresholds"))
      .def_readwrite("table", &TiesSelectArgs::table)
      .def_readwrite("model_scope", &TiesSelectArgs::model_scope)
      .def_readwrite("ks", &TiesSelectArgs::ks)
      .def_readwrite("thresholds", &TiesSelectArgs::thresholds);

  py::class_<TiesMergeArgs>(m, "TiesMergeArgs", "Parameters of ties_merge.")
      .def(
          py::init([](const TableArgs& table, uintptr_t thresholds, bool model_scope, bool elect_count,
                      bool weighted_vote, fm::MergeMode merge, double scaling, double drop_rescale, bool majority_tie) {
            return TiesMergeArgs{table,   thresholds,   model_scope, elect_count, weighted_vote, fm::checked(merge),
                                 scaling, drop_rescale, majority_tie};
          }),
          py::kw_only(), py::arg("table"), py::arg("thresholds"), py::arg("model_scope").noconvert(),
          py::arg("elect_count").noconvert(), py::arg("weighted_vote").noconvert(), py::arg("merge"),
          py::arg("scaling").noconvert(), py::arg("drop_rescale").noconvert(), py::arg("majority_tie").noconvert())
      .def_readwrite("table", &TiesMergeArgs::table)
      .def_readwrite("thresholds", &TiesMergeArgs::thresholds)
      .def_readwrite("model_scope", &TiesMergeArgs::model_scope)
      .def_readwrite("elect_count", &TiesMergeArgs::elect_count)
      .def_readwrite("weighted_vote", &TiesMergeArgs::weighted_vote)
      .def_readwrite("merge", &TiesMergeArgs::merge)
      .def_readwrite("scaling", &TiesMergeArgs::scaling)
      .def_readwrite("drop_rescale", &TiesMergeArgs::drop_rescale)
      .def_readwrite("majority_tie", &TiesMergeArgs::majority_tie);

  m.def(
      "combine",
      [](const TableArgs& a) {
        py::gil_scoped_release release;
        fm::cpu_combine(a.rows(), a.n_tensors, a.n_inputs);
      },
      py::arg("args"), "Multi-tensor linear combination driven by an int64 table (see csrc/common/table.h).");
  m.def(
      "l1_buckets",
      [](const TableArgs& a, uintptr_t buckets) {
        py::gil_scoped_release release;
        fm::cpu_l1_buckets(a.rows(), a.n_tensors, a.n_inputs, reinterpret_cast<int64_t*>(buckets));
      },
      py::arg("args"), py::kw_only(), py::arg("buckets"),
      "Exact L1 norms of x - base, all and kept, as int64 mantissa sums per exponent [rows, inputs, 2, 256].");
  m.def(
      "ties_select",
      [](const TiesSelectArgs& a) {
        py::gil_scoped_release release;
        fm::cpu_ties_select(a.table.rows(), a.table.n_tensors, a.table.n_inputs, a.model_scope,
                            reinterpret_cast<const int64_t*>(a.ks), reinterpret_cast<uint32_t*>(a.thresholds));
      },
      py::arg("args"), "k-th largest |x - base| (as float bits) per (scope, model) into thresholds[uint32].");
  m.def(
      "ties_merge",
      [](const TiesMergeArgs& a) {
        const fm::TiesParams p{a.model_scope, a.elect_count, a.weighted_vote, a.merge, a.scaling, a.drop_rescale};
        fm::checked(a.merge);  // the field may have been assigned after construction
        py::gil_scoped_release release;
        const int64_t* t = a.table.rows();
        const auto* thr = reinterpret_cast<const uint32_t*>(a.thresholds);
        float tie_sign = 1.0f;
        if (a.majority_tie) {
          const int64_t total = fm::cpu_ties_sign_sum(t, a.table.n_tensors, a.table.n_inputs, p, thr);
          tie_sign = static_cast<float>((total > 0) - (total < 0));
        }
        fm::cpu_ties_merge(t, a.table.n_tensors, a.table.n_inputs, p, thr, tie_sign);
      },
      py::arg("args"), "TIES merge of the table's rows (csrc/cpu/ties_cpu.cpp).");
  py::class_<fm::RowRankArgs>(m, "RowRankArgs", "Parameters of row_rank.")
      .def(py::init([](uintptr_t values, int64_t rows, int64_t n, uintptr_t out) {
             if (rows < 0 || n < 0 || n > INT32_MAX) throw py::value_error("fusedmerge: row_rank shape out of range");
             return fm::RowRankArgs{values, rows, n, out};
           }),
           py::kw_only(), py::arg("values"), py::arg("rows"), py::arg("n"), py::arg("out"))
      .def_readwrite("values", &fm::RowRankArgs::values)
      .def_readwrite("rows", &fm::RowRankArgs::rows)
      .def_readwrite("n", &fm::RowRankArgs::n)
      .def_readwrite("out", &fm::RowRankArgs::out);
  m.def(
      "row_rank",
      [](const fm::RowRankArgs& a) {
        py::gil_scoped_release release;
        fm::cpu_row_rank(reinterpret_cast<const float*>(a.values), a.rows, a.n, reinterpret_cast<int32_t*>(a.out));
      },
      py::arg("args"), "Per-row ascending rank of |values| (ties in column order) into out[int32] (rank_cpu.cpp).");
  m.def(
      "uniforms",
      [](uint64_t key, int64_t numel, uintptr_t out, int64_t first) {
        py::gil_scoped_release release;
        fm::cpu_uniforms(key, numel, first, reinterpret_cast<int32_t*>(out));
      },
      py::kw_only(), py::arg("key"), py::arg("numel"), py::arg("out"), py::arg("first") = 0,
      "The 32-bit Philox uniforms of elements first.. (a multiple of 128) of a 64-bit key into out[int32, numel] "
      "(rank_cpu.cpp).");
  py::class_<fm::DotsArgs>(m, "DotsArgs", "Parameters of dots.")
      .def(py::init([](const TableArgs& table, uintptr_t rows, uintptr_t pairs, int64_t n_pairs, uintptr_t sums) {
             return fm::DotsArgs{table, rows, pairs, n_pairs, sums};
           }),
           py::kw_only(), py::arg("table"), py::arg("rows"), py::arg("pairs"), py::arg("n_pairs"), py::arg("sums"));
  m.def(
      "dots",
      [](const fm::DotsArgs& a) {
        const fm::DotsParams p{reinterpret_cast<const int64_t*>(a.rows), reinterpret_cast<const int64_t*>(a.pairs),
                               a.n_pairs, reinterpret_cast<double*>(a.sums)};
        py::gil_scoped_release release;
        fm::cpu_dots(a.table.rows(), a.table.n_tensors, a.table.n_inputs, p);
      },
      py::arg("args"), "Per row and pair, the pairwise-tree sum of (x_a - b)(x_c - b) (csrc/cpu/dots_cpu.cpp).");
  m.def("isa", &fm::cpu_isa, "The kernel variant this CPU runs (baseline, avx2, avx512).");
  m.def("max_threads", &omp_get_max_threads, "OpenMP threads the kernels use.");
}
