// csrc/cpu/module.cpp -- the Python module `minigpt._C` and the `minigpt` op namespace.
//
// The module itself is empty: importing it runs the static registrations in each
// op's .cpp file (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL), after which the
// kernels are reachable as torch.ops.minigpt.<name>. We use the bare CPython API
// instead of pybind11 (torch/extension.h) to keep compile times short.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/isa.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "MiniGPT C++ kernels", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}

namespace {
std::string cpu_isa() { return minigpt::cpu::isa_name(minigpt::cpu::active_isa()); }
std::string cpu_isa_detected() { return minigpt::cpu::isa_name(minigpt::cpu::detected_isa()); }
void set_cpu_isa(const std::string& name) {
  minigpt::cpu::set_active_isa(minigpt::cpu::parse_isa(name));
}
}  // namespace

// The one TORCH_LIBRARY block of the namespace; each op adds its schemas with
// TORCH_LIBRARY_FRAGMENT in its own file.
TORCH_LIBRARY(minigpt, m) {
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_isa_detected() -> str", &cpu_isa_detected);
  m.def("set_cpu_isa(str name) -> ()", &set_cpu_isa);
}
