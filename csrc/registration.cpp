// The private native ops behind the public `torch.ops.glimpse.*` ops (which are defined
// in Python, see glimpse_ops/ops/). Each kernel file registers its own implementation.
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

TORCH_LIBRARY_FRAGMENT(glimpse, m) {
  m.def("_native_has_cuda() -> bool", &glimpse::native_has_cuda);
  m.def(
      "_select_tokens_native(Tensor scores, Tensor candidate_mask, float? threshold, "
      "int max_keep, int min_keep, Tensor? max_keep_per_row) -> Tensor");
  m.def("_keep_index_native(Tensor keep, int? max_len, bool left_padding) -> (Tensor, Tensor)");
  m.def("_gather_tokens_native(Tensor x, Tensor index, Scalar pad_value) -> Tensor");
  m.def(
      "_compact_kv_native(Tensor[] keys, Tensor[] values, Tensor index) -> "
      "(Tensor[], Tensor[])");
  m.def(
      "_prune_kv_native(Tensor scores, Tensor candidate_mask, Tensor[] keys, Tensor[] values, "
      "float? threshold, int max_keep, int min_keep, Tensor? max_keep_per_row, int? max_len, "
      "bool left_padding) -> (Tensor[], Tensor[], Tensor, Tensor, Tensor)");
  m.def(
      "_glimpse_scores_native(Tensor q, Tensor k, Tensor? key_mask, float scale, "
      "int normalize) -> Tensor");
  m.def(
      "_glimpse_prune_native(Tensor q, Tensor[] keys, Tensor[] values, Tensor key_mask, "
      "Tensor candidate_mask, int score_layer, float scale, float? threshold, int max_keep, "
      "int min_keep, Tensor? max_keep_per_row, int? max_len, bool left_padding) -> "
      "(Tensor[], Tensor[], Tensor, Tensor, Tensor)");
}
