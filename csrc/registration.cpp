// The private native ops behind the public `torch.ops.glimpse.*` ops (which are defined
// in Python, see glimpse_ops/ops/).
// There is no pybind11: importing glimpse_ops._C only runs these static registrations.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <mutex>
#include <set>
#include <thread>

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

// How many threads an at::parallel_for of this build really runs on. It is a header
// template: built without OpenMP it runs every CPU kernel serially whatever
// torch.get_num_threads() says (tests/ops/test_registration.py checks this).
static int64_t native_parallel_threads() {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace glimpse

// The native ops' schemas are generated in Python from each op's kernel calling convention
// (glimpse_ops/ops/<op>.py, class Kernel); each kernel file only registers its implementation.
TORCH_LIBRARY_FRAGMENT(glimpse, m) {
  m.def("_native_has_cuda() -> bool", &glimpse::native_has_cuda);
  m.def("_native_parallel_threads() -> int", &glimpse::native_parallel_threads);
}
