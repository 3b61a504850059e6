// What both pybind11 shims share: the table's layout and codes (csrc/common/table.h) as LAYOUT, and the
// TableArgs parameter struct.
#pragma once
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/table.h"

namespace fm {

// A table in memory (host for _cpu, device for _cuda): its address, rows and inputs per row.
struct TableArgs {
  uintptr_t table = 0;
  int64_t n_tensors = 0;
  int64_t n_inputs = 0;
  const int64_t* rows() const { return reinterpret_cast<const int64_t*>(table); }
};

inline void bind_layout(pybind11::module_& m) {
  pybind11::dict layout;
  for (const LayoutEntry& e : kLayout) layout[e.name] = e.value;
  m.attr("LAYOUT") = layout;
}

inline void bind_table_args(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<TableArgs>(m, "TableArgs", py::module_local(),
                        "A table (csrc/common/table.h): address, rows, inputs per row.")
      .def(py::init([](uintptr_t table, int64_t n_tensors, int64_t n_inputs) {
             return TableArgs{table, n_tensors, n_inputs};
           }),
           py::kw_only(), py::arg("table"), py::arg("n_tensors"), py::arg("n_inputs"))
      .def_readwrite("table", &TableArgs::table)
      .def_readwrite("n_tensors", &TableArgs::n_tensors)
      .def_readwrite("n_inputs", &TableArgs::n_inputs)
      .def("__repr__", [](const TableArgs& a) {
        return "TableArgs(table=" + std::to_string(a.table) + ", n_tensors=" + std::to_string(a.n_tensors) +
               ", n_inputs=" + std::to_string(a.n_inputs) + ")";
      });
}

}  // namespace fm
