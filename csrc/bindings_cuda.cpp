// pybind11 shim of the CUDA kernels: raw device addresses and a stream handle in, no libtorch.
#include <pybind11/pybind11.h>

#include "bindings_common.h"
#include "cuda/combine_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedmerge CUDA kernels";
  fm::bind_layout(m);
  fm::bind_table_args(m);
  m.def(
      "combine",
      [](const fm::TableArgs& a, int64_t total_tiles, uintptr_t stream) {
        py::gil_scoped_release release;
        fm::cuda_combine(a.rows(), a.n_tensors, a.n_inputs, total_tiles, stream);
      },
      py::arg("args"), py::kw_only(), py::arg("total_tiles"), py::arg("stream"),
      "Multi-tensor linear combination on `stream`. args.table is one device block: the table, then the tile "
      "prefix (layout in csrc/cuda/combine_cuda.h).");
  m.def("device_count", &fm::cuda_device_count, "CUDA devices the runtime sees (0 without a GPU).");
  m.attr("TILE") = fm::cuda_tile();
}
