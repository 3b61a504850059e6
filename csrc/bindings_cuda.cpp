// pybind11 shim of the CUDA kernels: raw device addresses and a stream handle in, no libtorch.
#include <pybind11/pybind11.h>

#include "cuda/combine_cuda.h"

namespace py = pybind11;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fusedmerge CUDA kernels";
  m.def(
      "combine",
      [](uintptr_t block, int64_t n_tensors, int64_t n_inputs, int64_t total_tiles, uintptr_t stream) {
        py::gil_scoped_release release;
        fm::cuda_combine(reinterpret_cast<const int64_t*>(block), n_tensors, n_inputs, total_tiles, stream);
      },
      py::arg("block"), py::arg("n_tensors"), py::arg("n_inputs"), py::arg("total_tiles"), py::arg("stream"),
      "Multi-tensor linear combination from one device block (layout in csrc/cuda/combine_cuda.h).");
  m.def("device_count", &fm::cuda_device_count, "CUDA devices the runtime sees (0 without a GPU).");
  m.attr("TILE") = fm::cuda_tile();
}
