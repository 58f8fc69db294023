// CUDA kernels of infigw::topk_degrees and infigw::topk_degrees_backward (schemas in csrc/ops.cpp). Thin
// binding: argument checks, outputs, launches of the torch-free kernels in topk_degrees.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <type_traits>

#include "bindings.h"
#include "topk_degrees.cuh"

namespace infigw {
namespace cuda {
namespace {

using at::Tensor;

// Smallest b >= 1 with 2^b >= vocab: the id field of the selection composites.
int id_bits(int64_t vocab) {
  int bits = 1;
  while ((int64_t{1} << bits) < vocab) ++bits;
  return bits;
}

KeptRows kept_rows(const Tensor& kept_values, const Tensor& kept_ids, const Tensor& row_graph,
                   int64_t num_graphs, int64_t num_nodes, int64_t nodes_mode, const Tensor& counts,
                   const Tensor& diag) {
  KeptRows R;
  R.kept_values = kept_values.data_ptr<float>();
  R.kept_ids = kept_ids.data_ptr<int64_t>();
  R.row_graph = row_graph.data_ptr<int64_t>();
  R.rows = kept_values.size(0);
  R.k = static_cast<int>(kept_values.size(1));
  R.num_graphs = num_graphs;
  R.num_nodes = num_nodes;
  R.nodes_mode = static_cast<int>(nodes_mode);
  R.row_counts = counts.defined() ? counts.data_ptr<int>() : nullptr;
  R.diag = diag.defined() ? diag.data_ptr<float>() : nullptr;
  return R;
}

// Valid rows per graph (int32), for the mean norm; undefined otherwise.
Tensor row_counts(const Tensor& row_graph, int64_t num_graphs, int64_t norm_mode, cudaStream_t stream) {
  if (norm_mode != kNormMean) return Tensor();
  Tensor counts = at::zeros({num_graphs}, row_graph.options().dtype(at::kInt));
  check_launch(launch_count_rows(row_graph.data_ptr<int64_t>(), row_graph.size(0), num_graphs,
                                 counts.data_ptr<int>(), stream));
  return counts;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_degrees_cuda(
    const Tensor& logits_in, const Tensor& row_graph_in, int64_t num_graphs, int64_t k, int64_t values_mode,
    double temperature, int64_t nodes_mode, int64_t norm_mode, bool deterministic) {
  check_logits(logits_in, "logits");
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1);
  check_row_graph(row_graph_in, logits_in, rows);
  check_modes(num_graphs, values_mode, temperature, nodes_mode, norm_mode);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab && k <= kMaxK,
                    "k must be in [1, min(vocab, ", kMaxK, ")] = [1, ", std::min<int64_t>(vocab, kMaxK),
                    "] for the CUDA kernels, got ", k);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor logits = logits_in.contiguous();
  const Tensor row_graph = row_graph_in.contiguous();
  const int64_t num_nodes = nodes_mode == kNodesVocab ? vocab : k;
  const auto f32 = logits.options().dtype(at::kFloat);

  Tensor degrees = at::zeros({num_graphs, num_nodes}, f32);
  Tensor touched = at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kBool));
  Tensor kept_values = at::empty({rows, k}, f32);
  Tensor kept_ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  Tensor row_lse = at::empty({values_mode == kValuesProbs ? rows : 0}, f32);
  if (rows == 0) return {degrees, touched, kept_values, kept_ids, row_lse};

  const bool cosine = norm_mode == kNormCosine;
  const Tensor counts = row_counts(row_graph, num_graphs, norm_mode, stream);
  Tensor diag = cosine ? at::zeros({num_graphs, num_nodes}, f32) : Tensor();

  TopkParams P;
  P.rows = rows;
  P.vocab = vocab;
  P.k = static_cast<int>(k);
  P.idx_bits = id_bits(vocab);
  P.row_graph = row_graph.data_ptr<int64_t>();
  P.num_graphs = num_graphs;
  P.num_nodes = num_nodes;
  P.values_mode = static_cast<int>(values_mode);
  P.nodes_mode = static_cast<int>(nodes_mode);
  P.inv_temperature = static_cast<float>(1.0 / temperature);
  P.row_counts = counts.defined() ? counts.data_ptr<int>() : nullptr;
  P.scatter_kind = deterministic ? kScatterNone : (cosine ? kScatterSquares : kScatterDegrees);
  P.scatter_out = deterministic ? nullptr : (cosine ? diag : degrees).data_ptr<float>();
  P.touched = touched.data_ptr<bool>();
  P.kept_values = kept_values.data_ptr<float>();
  P.kept_ids = kept_ids.data_ptr<int64_t>();
  P.row_lse = values_mode == kValuesProbs ? row_lse.data_ptr<float>() : nullptr;
  dispatch_logits(logits, [&](auto* data) { check_launch(launch_topk_rows(data, P, stream)); });

  KeptRows R = kept_rows(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes_mode, counts, diag);
  if (!deterministic) {
    if (cosine) check_launch(launch_rows_contrib(R, kContribCosine, degrees.data_ptr<float>(), nullptr, nullptr, stream));
    return {degrees, touched, kept_values, kept_ids, row_lse};
  }
  // Deterministic: per-slot contributions, stably sorted by (graph, node), summed per node in a fixed order.
  Tensor contrib = at::empty({rows * k}, f32);
  Tensor keys = at::empty({rows * k}, kept_ids.options());
  check_launch(launch_rows_contrib(R, cosine ? kContribSquares : kContribDegrees, nullptr,
                                   contrib.data_ptr<float>(), keys.data_ptr<int64_t>(), stream));
  Tensor sorted_keys, order;
  std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto reduce = [&](Tensor& out) {
    check_launch(launch_segment_sum(sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(), rows * k,
                                    contrib.data_ptr<float>(), num_graphs * num_nodes, out.data_ptr<float>(),
                                    stream));
  };
  if (cosine) {
    reduce(diag);
    check_launch(launch_rows_contrib(R, kContribCosine, nullptr, contrib.data_ptr<float>(), nullptr, stream));
  }
  reduce(degrees);
  return {degrees, touched, kept_values, kept_ids, row_lse};
}

Tensor topk_degrees_backward_cuda(const Tensor& grad_degrees_in, const Tensor& logits_in,
                                  const Tensor& row_graph_in, const Tensor& kept_values_in,
                                  const Tensor& kept_ids_in, const Tensor& row_lse_in, int64_t num_graphs,
                                  int64_t values_mode, double temperature, int64_t nodes_mode, int64_t norm_mode) {
  check_logits(logits_in, "logits");
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1);
  check_row_graph(row_graph_in, logits_in, rows);
  check_modes(num_graphs, values_mode, temperature, nodes_mode, norm_mode);
  check_kept(kept_values_in, kept_ids_in, logits_in, rows);
  const int64_t k = kept_values_in.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab && k <= kMaxK, "kept entries must have 1 <= k <= min(vocab, ", kMaxK,
                    "), got k = ", k);
  const int64_t num_nodes = nodes_mode == kNodesVocab ? vocab : k;
  check_f32(grad_degrees_in, "grad_degrees", logits_in, {num_graphs, num_nodes});
  if (values_mode == kValuesProbs) check_f32(row_lse_in, "row_lse", logits_in, {rows});
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor logits = logits_in.contiguous();
  const Tensor row_graph = row_graph_in.contiguous();
  const Tensor kept_values = kept_values_in.contiguous();
  const Tensor kept_ids = kept_ids_in.contiguous();
  const Tensor grad_degrees = grad_degrees_in.contiguous();
  const Tensor row_lse = row_lse_in.contiguous();
  const bool probs = values_mode == kValuesProbs, cosine = norm_mode == kNormCosine;
  // k-sparse rows: zero-fill, then k stores per row. probs: every entry is written by the dense kernel.
  Tensor grad = probs ? at::empty_like(logits) : at::zeros_like(logits);
  if (rows == 0) return grad;

  const auto f32 = logits.options().dtype(at::kFloat);
  const Tensor counts = row_counts(row_graph, num_graphs, norm_mode, stream);
  Tensor diag = cosine ? at::zeros({num_graphs, num_nodes}, f32) : Tensor();
  Tensor gw = cosine ? at::zeros({num_graphs, num_nodes}, f32) : Tensor();
  BackwardRows B;
  B.kept = kept_rows(kept_values, kept_ids, row_graph, num_graphs, num_nodes, nodes_mode, counts, diag);
  B.grad_degrees = grad_degrees.data_ptr<float>();
  B.gw = cosine ? gw.data_ptr<float>() : nullptr;
  B.cosine = cosine;
  B.values_mode = static_cast<int>(values_mode);
  B.inv_temperature = static_cast<float>(1.0 / temperature);
  B.vocab = vocab;
  Tensor grad_a = probs ? at::empty({rows, k}, f32) : Tensor();
  float* grad_a_ptr = probs ? grad_a.data_ptr<float>() : nullptr;

  dispatch_logits(logits, [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    T* grad_ptr = probs ? nullptr : reinterpret_cast<T*>(grad.data_ptr());
    if (cosine) {
      check_launch(launch_rows_contrib(B.kept, kContribSquares, diag.data_ptr<float>(), nullptr, nullptr, stream));
      check_launch(launch_degrees_backward_rows<T>(B, kStageCosineGw, nullptr, nullptr, stream));
    }
    check_launch(launch_degrees_backward_rows<T>(B, cosine ? kStageCosineGrad : kStageGrad, grad_ptr,
                                                 grad_a_ptr, stream));
    if (probs) {
      check_launch(launch_probs_backward<T>(data, row_lse.data_ptr<float>(),
                                            row_graph.data_ptr<int64_t>(), num_graphs,
                                            kept_values.data_ptr<float>(), kept_ids.data_ptr<int64_t>(),
                                            grad_a_ptr, static_cast<int>(k), rows, vocab, B.inv_temperature,
                                            reinterpret_cast<T*>(grad.data_ptr()), stream));
    }
  });
  return grad;
}

}  // namespace
}  // namespace cuda
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CUDA, m) {
  m.impl("topk_degrees", &infigw::cuda::topk_degrees_cuda);
  m.impl("topk_degrees_backward", &infigw::cuda::topk_degrees_backward_cuda);
}
