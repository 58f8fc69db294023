// Argument checks of the infigw ops, shared by the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) bindings.
// Errors surface in Python as ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE) naming the argument.
//
// Shapes, dtypes, devices and options are read from metadata. The index data (row_graph, kept_ids, lengths) is
// scanned by check_index_range: always on CPU, where the scan is cheap and the kernels index with these values;
// on CUDA only when the call passes check_data=true (the schema default), because reading the result back is a
// host sync. infigw's own calls (the GLD forward and the backward autograd runs) pass check_data=false: their
// indices are built by infigw, and the CUDA kernels skip an out-of-range index rather than follow it.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <sstream>
#include <string>

#include "contract.h"

namespace infigw {

// The option codes of one call.
struct Options {
  int values, nodes, graph_norm;

  bool probability_values() const { return values != kValuesLogits; }
};

template <int N>
std::string choices(const char* const (&names)[N]) {
  std::ostringstream out;
  out << "(";
  for (int i = 0; i < N; ++i) out << (i ? ", '" : "'") << names[i] << "'";
  out << ")";
  return out.str();
}

template <int N>
int parse_option(const char* const (&names)[N], const std::string& name, const char* argument) {
  const int code = code_of(names, name.c_str());
  TORCH_CHECK_VALUE(code >= 0, argument, " must be one of ", choices(names), ", got '", name, "'");
  return code;
}

inline Options parse_options(const std::string& values, const std::string& nodes, const std::string& graph_norm) {
  return {parse_option(kValuesNames, values, "values"), parse_option(kNodesNames, nodes, "nodes"),
          parse_option(kGraphNormNames, graph_norm, "graph_norm")};
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

// logits (N, V) of a float dtype (float64 too where allow_fp64: the CPU kernels, for gradcheck).
inline void check_logits(const at::Tensor& logits, bool allow_fp64, const char* name = "logits") {
  const auto dtype = logits.scalar_type();
  const bool ok = dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  (allow_fp64 && dtype == at::kDouble);
  TORCH_CHECK_TYPE(ok, name, " must be float32, float16 or bfloat16", allow_fp64 ? " (or float64)" : "", ", got ",
                   dtype);
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, name, " must have shape (N, V) with V >= 1, got ",
                    logits.sizes());
}

inline void check_row_graph(const at::Tensor& row_graph, const at::Tensor& logits, int64_t num_graphs) {
  check_same_device(row_graph, "row_graph", logits);
  TORCH_CHECK_TYPE(row_graph.scalar_type() == at::kLong, "row_graph must be int64, got ", row_graph.scalar_type());
  TORCH_CHECK_VALUE(row_graph.dim() == 1 && row_graph.size(0) == logits.size(0), "row_graph must have shape (",
                    logits.size(0), ",), got ", row_graph.sizes());
  TORCH_CHECK_VALUE(num_graphs >= 0, "num_graphs must be >= 0, got ", num_graphs);
}

inline void check_k(int64_t k, int64_t vocab, int64_t max_k, const char* name) {
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab && k <= max_k, name, " must lie in [1, min(V=", vocab, ", ", max_k,
                    ")], got ", k);
}

inline void check_temperature(double temperature) {
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a positive finite number, got ",
                    temperature);
}

// t (any shape) of dtype `dtype` and sizes `shape` on the logits' device.
inline void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, at::ScalarType dtype,
                         at::IntArrayRef shape) {
  check_same_device(t, name, like);
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

// Every entry of the integer tensor t lies in [lo, hi). One aminmax; on CUDA its read-back syncs with the host.
inline void check_index_range(const at::Tensor& t, const char* name, int64_t lo, int64_t hi) {
  if (t.numel() == 0) return;
  const auto bounds = at::aminmax(t);
  const at::Tensor both = at::stack({std::get<0>(bounds), std::get<1>(bounds)}).cpu();
  const int64_t smallest = both[0].item<int64_t>(), largest = both[1].item<int64_t>();
  TORCH_CHECK_VALUE(smallest >= lo && largest < hi, name, " entries must lie in [", lo, ", ", hi, "), got values in [",
                    smallest, ", ", largest, "]");
}

// The kept entries of a forward pass as the backward receives them: kept_values (N, k) in the accumulation
// dtype, kept_ids (N, k) int64, and row_lse (N,) for the probability values.
inline void check_kept(const at::Tensor& kept_values, const at::Tensor& kept_ids, const at::Tensor& row_lse,
                       const at::Tensor& logits, at::ScalarType acc_dtype, const Options& options) {
  const int64_t rows = logits.size(0);
  TORCH_CHECK_VALUE(kept_ids.dim() == 2 && kept_ids.size(0) == rows, "kept_ids must have shape (", rows,
                    ", k), got ", kept_ids.sizes());
  check_tensor(kept_ids, "kept_ids", logits, at::kLong, kept_ids.sizes());
  check_tensor(kept_values, "kept_values", logits, acc_dtype, kept_ids.sizes());
  if (options.probability_values()) check_tensor(row_lse, "row_lse", logits, acc_dtype, {rows});
}

// grad_degrees (G, num_nodes) of any float dtype (the kernels convert it to their accumulation dtype).
inline void check_grad_degrees(const at::Tensor& grad, const at::Tensor& logits, int64_t num_graphs,
                               int64_t num_nodes) {
  check_same_device(grad, "grad_degrees", logits);
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad_degrees must be floating, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == num_graphs && grad.size(1) == num_nodes,
                    "grad_degrees must have shape (", num_graphs, ", ", num_nodes, "), got ", grad.sizes());
}

// x, y (G, L) of one float dtype, lengths (G,) int64 on their device.
inline void check_point_lists(const at::Tensor& x, const at::Tensor& y, const at::Tensor& lengths, bool allow_fp64) {
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || (allow_fp64 && dtype == at::kDouble), "x must be float32",
                   allow_fp64 ? " (or float64)" : "", ", got ", dtype);
  TORCH_CHECK_TYPE(y.scalar_type() == dtype, "y must be ", dtype, " like x, got ", y.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, "x must have shape (G, L), got ", x.sizes());
  TORCH_CHECK_VALUE(y.sizes() == x.sizes(), "y must have the shape of x ", x.sizes(), ", got ", y.sizes());
  check_same_device(y, "y", x);
  check_tensor(lengths, "lengths", x, at::kLong, {x.size(0)});
}

inline void check_point_grad(const at::Tensor& grad, const at::Tensor& x) {
  check_same_device(grad, "grad", x);
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "grad must be floating, got ", grad.scalar_type());
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == x.size(0), "grad must have shape (", x.size(0), ",), got ",
                    grad.sizes());
}

}  // namespace infigw
