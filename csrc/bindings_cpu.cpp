// pybind11 shim of the CPU kernels: raw addresses in, no libtorch.
#include <omp.h>
#include <pybind11/pybind11.h>

#include "cpu/combine_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "fusedmerge C++ CPU kernels";
  m.def(
      "combine",
      [](uintptr_t table, int64_t n_tensors, int64_t n_inputs, uintptr_t coeffs) {
        py::gil_scoped_release release;
        fm::cpu_combine(reinterpret_cast<const int64_t*>(table), n_tensors, n_inputs,
                        reinterpret_cast<const double*>(coeffs));
      },
      py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"), py::arg("coeffs"),
      "Multi-tensor linear combination driven by an int64 table (see csrc/cpu/combine_cpu.h).");
  m.def("isa", &fm::cpu_isa, "The kernel variant this CPU runs (baseline, avx2, avx512).");
  m.def("max_threads", &omp_get_max_threads, "OpenMP threads the kernels use.");
}
