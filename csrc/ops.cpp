// The operator schemas of infigw, in one place. Kernels register against them per device:
// csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(infigw, CPU, m)) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL(infigw, CUDA, m)).
// Python adds fake (meta) kernels and autograd in infigw/extension.py. The math is docs/math.md;
// the codes below are shared with infigw/contract.py.
//
//   values_mode: 0 = logits, 1 = probs (full-vocabulary softmax of logits / temperature), 2 = topk_probs
//   nodes_mode:  0 = vocab (node = token id, num_nodes = V), 1 = rank (node = rank slot, num_nodes = k)
//   norm_mode:   0 = mean, 1 = sum, 2 = cosine
//
// Rows are flattened positions: logits (N, V); row_graph (N,) int64 holds each row's graph index in
// [0, num_graphs) or -1 for a masked row (no contribution, zero gradient).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// infigw._C is imported only to run the static registrations below; it has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(infigw, m) {
  // Fused top-k selection -> value transform -> per-graph degree aggregation (the graph is never formed).
  // Returns degrees (G, num_nodes) f32, touched (G, num_nodes) bool, and what backward needs:
  // kept_values (N, k) f32 (transformed a_p; 0 on masked rows), kept_ids (N, k) int64 (rank order:
  // value descending, ties to the smaller id), row_lse (N,) f32 = logsumexp(logits/temperature) for
  // probs, an empty tensor otherwise.
  m.def(
      "topk_degrees(Tensor logits, Tensor row_graph, int num_graphs, int k, int values_mode, "
      "float temperature, int nodes_mode, int norm_mode, bool deterministic) -> "
      "(Tensor degrees, Tensor touched, Tensor kept_values, Tensor kept_ids, Tensor row_lse)");
  // Gradient of the degrees -> gradient of the logits (N, V) in the logits' dtype: k-sparse rows for
  // logits/topk_probs, dense rows for probs, zero rows for masked rows.
  m.def(
      "topk_degrees_backward(Tensor grad_degrees, Tensor logits, Tensor row_graph, Tensor kept_values, "
      "Tensor kept_ids, Tensor row_lse, int num_graphs, int values_mode, float temperature, "
      "int nodes_mode, int norm_mode) -> Tensor");
  // 1-D GW closed form (min of identity / anti-identity matchings, centred fp64 power sums) between
  // descending lists x, y (G, L) f32 whose first lengths[g] entries are the points -> (G,) f32.
  m.def("sorted_gw1d(Tensor x, Tensor y, Tensor lengths) -> Tensor");
  m.def("sorted_gw1d_backward(Tensor grad, Tensor x, Tensor y, Tensor lengths) -> (Tensor, Tensor)");
}
