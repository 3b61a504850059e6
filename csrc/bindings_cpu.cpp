// pybind11 shim of the CPU kernels: raw addresses in, no libtorch.
#include <omp.h>
#include <pybind11/pybind11.h>

#include "cpu/combine_cpu.h"
#include "cpu/ties_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedmerge C++ CPU kernels";
  m.def(
      "combine",
      [](uintptr_t table, int64_t n_tensors, int64_t n_inputs) {
        py::gil_scoped_release release;
        fm::cpu_combine(reinterpret_cast<const int64_t*>(table), n_tensors, n_inputs);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"),
      "Multi-tensor linear combination driven by an int64 table (see csrc/cpu/combine_cpu.h).");
  m.def(
      "l1_buckets",
      [](uintptr_t table, int64_t n_tensors, int64_t n_inputs, uintptr_t buckets) {
        py::gil_scoped_release release;
        fm::cpu_l1_buckets(reinterpret_cast<const int64_t*>(table), n_tensors, n_inputs,
                           reinterpret_cast<int64_t*>(buckets));
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"), py::arg("buckets"),
      "Exact L1 norms of x - base, all and kept, as int64 mantissa sums per exponent [rows, inputs, 2, 256].");
  m.def(
      "ties_select",
      [](uintptr_t table, int64_t n_tensors, int64_t n_inputs, bool model_scope, uintptr_t ks, uintptr_t thresholds) {
        py::gil_scoped_release release;
        fm::cpu_ties_select(reinterpret_cast<const int64_t*>(table), n_tensors, n_inputs, model_scope,
                            reinterpret_cast<const int64_t*>(ks), reinterpret_cast<uint32_t*>(thresholds));
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"), py::arg("model_scope"), py::arg("ks"),
      py::arg("thresholds"), "k-th largest |x - base| (as float bits) per (scope, model) into thresholds[uint32].");
  m.def(
      "ties_merge",
      [](uintptr_t table, int64_t n_tensors, int64_t n_inputs, uintptr_t thresholds, bool model_scope, bool elect_count,
         bool weighted_vote, int64_t merge, double scaling, double drop_rescale, bool majority_tie) {
        py::gil_scoped_release release;
        const auto* t = reinterpret_cast<const int64_t*>(table);
        const auto* thr = reinterpret_cast<const uint32_t*>(thresholds);
        const fm::TiesParams p{model_scope, elect_count, weighted_vote, merge, scaling, drop_rescale};
        float tie_sign = 1.0f;
        if (majority_tie) {
          const int64_t total = fm::cpu_ties_sign_sum(t, n_tensors, n_inputs, p, thr);
          tie_sign = static_cast<float>((total > 0) - (total < 0));
        }
        fm::cpu_ties_merge(t, n_tensors, n_inputs, p, thr, tie_sign);
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"), py::arg("thresholds"), py::arg("model_scope"),
      py::arg("elect_count"), py::arg("weighted_vote"), py::arg("merge"), py::arg("scaling"), py::arg("drop_rescale"),
      py::arg("majority_tie"), "TIES merge of the table's rows (csrc/cpu/ties_cpu.cpp).");
  m.def("isa", &fm::cpu_isa, "The kernel variant this CPU runs (baseline, avx2, avx512).");
  m.def("max_threads", &omp_get_max_threads, "OpenMP threads the kernels use.");
}
