// The private native ops behind the public `torch.ops.glimpse.*` ops (which are defined
// in Python, see glimpse_ops/ops/).
// There is no pybind11: importing glimpse_ops._C only runs these static registrations.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace glimpse {

static bool native_has_cuda() {
#ifdef GLIMPSE_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace glimpse

// The native ops' schemas are generated in Python from each op's kernel calling convention
// (glimpse_ops/ops/<op>.py, class Kernel); each kernel file only registers its implementation.
TORCH_LIBRARY_FRAGMENT(glimpse, m) {
  m.def("_native_has_cuda() -> bool", &glimpse::native_has_cuda);
}
