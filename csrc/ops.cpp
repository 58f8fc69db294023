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

  // ---- ULD and the student's top-k summary (docs/math.md §7) ----
  // Full-vocabulary ULD of student rows (N, V) against teacher rows (M, V_t): logits, softmaxed at temperature,
  // or probabilities taken as given (teacher_probs). partner (N,) int64: the teacher row of each student row, -1
  // for none (loss 0, zero gradient, the teacher row is never read). Returns loss (N,) f32 (f64 for f64
  // students), both rows' logsumexps (N,) at temperature (0 where not computed) and, with keep_signs (a call
  // that will be differentiated; kernels may ignore it), dL/dp (N, V) and sum_j p_j dL/dp_j (N,), else empty
  // tensors: what backward reuses.
  m.def(
      "uld_full(Tensor student, Tensor teacher, Tensor partner, float temperature, bool teacher_probs, "
      "bool keep_signs) -> (Tensor loss, Tensor student_lse, Tensor teacher_lse, Tensor signs, Tensor dot)");
  m.def(
      "uld_full_backward(Tensor grad, Tensor student, Tensor teacher, Tensor partner, Tensor student_lse, "
      "Tensor teacher_lse, Tensor signs, Tensor dot, float temperature, bool teacher_probs) -> Tensor");
  // One read of each valid student row: its top-k logits kept (N, k) and ids (N, k) in rank order (ties to the
  // smaller id), lse (N,) = logsumexp(logits / temperature), unit (N,) = logsumexp(logits) (empty unless
  // unit_lse), the gold logit (N,) (empty without gold); and, for every teacher s (rows of teachers[s] paired by
  // partners[s], as uld_full), uld (S, N), the teachers' logsumexps (S, N) and, with keep_signs and one teacher,
  // its signs (N, V) and dot (1, N) as uld_full keeps them (else empty). Zeros on invalid rows. Backward writes
  // the logits gradient once: the dense softmax terms, the ULD terms and the k-sparse kept entries.
  m.def(
      "topk_summary(Tensor logits, Tensor row_valid, int k, float temperature, Tensor? gold, bool unit_lse, "
      "Tensor[] teachers, Tensor partners, bool[] teacher_probs, bool keep_signs) -> (Tensor kept, Tensor ids, "
      "Tensor lse, Tensor unit, Tensor gold_logit, Tensor uld, Tensor teacher_lse, Tensor signs, Tensor uld_dot)");
  m.def(
      "topk_summary_backward(Tensor grad_kept, Tensor grad_lse, Tensor grad_unit, Tensor grad_gold, "
      "Tensor grad_uld, Tensor logits, Tensor row_valid, Tensor ids, Tensor lse, Tensor unit, Tensor? gold, "
      "float temperature, Tensor[] teachers, Tensor partners, bool[] teacher_probs, Tensor teacher_lse, "
      "Tensor signs, Tensor uld_dot) -> Tensor");
}
