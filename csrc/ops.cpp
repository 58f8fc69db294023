// The operator schemas of infigw and the kernels that implement them per device, in one place: csrc/cpu/*.cpp and
// (when built with CUDA) csrc/cuda/*.cu, whose entry points csrc/kernels.h declares. Python adds fake (meta)
// kernels and autograd in infigw/extension.py. The math is docs/math.md (§2 node values,
// §3 graph and degrees, §4 the closed forms, §6 gradients).
//
// The options are strings, mapped to the codes of csrc/contract.h once per call (csrc/op_checks.h):
//   values:     "logits" | "probs" (full-vocabulary softmax of logits / temperature) | "topk_probs" (softmax over
//               the k kept entries)
//   nodes:      "vocab" (node = token id, num_nodes = V) | "rank" (node = rank slot, num_nodes = k)
//   graph_norm: "mean" | "sum" | "cosine"
// Rows are flattened positions: logits (N, V); row_graph (N,) int64 holds each row's graph index in
// [0, num_graphs) or -1 for a masked row (no contribution, zero gradient). check_data: scan the index arguments
// for out-of-range values (always on CPU; on CUDA it syncs with the host, see csrc/op_checks.h).
#include <Python.h>
#include <torch/library.h>

#include "kernels.h"

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
  // value descending, ties to the smaller id), row_lse (N,) f32 for the probability values = logsumexp of
  // logits / temperature over the row (probs) or over the k kept entries (topk_probs), an empty tensor otherwise.
  m.def(
      "topk_degrees(Tensor logits, Tensor row_graph, int num_graphs, int k, str values, float temperature, "
      "str nodes, str graph_norm, bool deterministic, bool check_data=True) -> "
      "(Tensor degrees, Tensor touched, Tensor kept_values, Tensor kept_ids, Tensor row_lse)");
  // Gradient of the degrees -> gradient of the logits (N, V) in the logits' dtype: k-sparse rows for
  // logits/topk_probs, dense rows for probs, zero rows for masked rows.
  m.def(
      "topk_degrees_backward(Tensor grad_degrees, Tensor logits, Tensor row_graph, Tensor kept_values, "
      "Tensor kept_ids, Tensor row_lse, int num_graphs, str values, float temperature, str nodes, "
      "str graph_norm, bool check_data=True) -> Tensor");
  // 1-D GW closed form (min of identity / anti-identity matchings, centred fp64 power sums) between
  // descending lists x, y (G, L) f32 whose first lengths[g] entries are the points -> (G,) f32.
  m.def("sorted_gw1d(Tensor x, Tensor y, Tensor lengths, bool check_data=True) -> Tensor");
  m.def(
      "sorted_gw1d_backward(Tensor grad, Tensor x, Tensor y, Tensor lengths, bool check_data=True) -> "
      "(Tensor, Tensor)");
}

namespace {

// Registers the kernels of one device for the four schemas above.
void implement(torch::Library& m, infigw::TopkDegreesFn* topk_degrees,
               infigw::TopkDegreesBackwardFn* topk_degrees_backward, infigw::SortedGw1dFn* sorted_gw1d,
               infigw::SortedGw1dBackwardFn* sorted_gw1d_backward) {
  m.impl("topk_degrees", topk_degrees);
  m.impl("topk_degrees_backward", topk_degrees_backward);
  m.impl("sorted_gw1d", sorted_gw1d);
  m.impl("sorted_gw1d_backward", sorted_gw1d_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(infigw, CPU, m) {
  using namespace infigw::cpu;
  implement(m, &topk_degrees, &topk_degrees_backward, &sorted_gw1d, &sorted_gw1d_backward);
}

#ifdef INFIGW_WITH_CUDA
TORCH_LIBRARY_IMPL(infigw, CUDA, m) {
  using namespace infigw::cuda;
  implement(m, &topk_degrees, &topk_degrees_backward, &sorted_gw1d, &sorted_gw1d_backward);
}
#endif
