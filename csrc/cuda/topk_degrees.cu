// CUDA kernels of infigw::topk_degrees and infigw::topk_degrees_backward (schemas in csrc/ops.cpp). Thin
// binding: argument checks (csrc/op_checks.h; the index data only with check_data=true, a host sync), outputs,
// and the launches of the torch-free kernels in topk_degrees.cuh and topk_degrees_backward.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <string>
#include <tuple>
#include <type_traits>

#include "bindings.h"
#include "kernels.h"
#include "topk_degrees.cuh"
#include "topk_degrees_backward.cuh"

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

// Valid rows per graph (int32): the mean norm's c.
Tensor row_counts(const Tensor& row_graph, int64_t num_graphs, cudaStream_t stream) {
  Tensor counts = at::zeros({num_graphs}, row_graph.options().dtype(at::kInt));
  check_launch(launch_count_rows(row_graph.data_ptr<int64_t>(), row_graph.size(0), num_graphs,
                                 counts.data_ptr<int>(), stream));
  return counts;
}

const float* data_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

KeptRows kept_rows(const Tensor& kept_values, const Tensor& kept_ids, const Tensor& row_graph, int64_t num_graphs,
                   int64_t num_nodes, int64_t vocab, const Options& options, const Tensor& kept_logs) {
  KeptRows R;
  R.kept_values = kept_values.data_ptr<float>();
  R.kept_ids = kept_ids.data_ptr<int64_t>();
  R.row_graph = row_graph.data_ptr<int64_t>();
  R.rows = kept_values.size(0);
  R.k = static_cast<int>(kept_values.size(1));
  R.num_graphs = num_graphs;
  R.num_nodes = num_nodes;
  R.vocab = vocab;
  R.nodes_mode = options.nodes;
  R.row_counts = nullptr;
  R.kept_logs = data_or_null(kept_logs);
  R.node_max = nullptr;
  R.inv_sqrt_q = nullptr;
  return R;
}

// The (G, num_nodes) fp64 sums of one kind of per-slot term over the kept rows: fp64 atomics, or (deterministic)
// per-slot terms stably sorted by (graph, node) and summed per node in that order. The sort is done once per call.
class SlotSums {
 public:
  SlotSums(const KeptRows& rows, bool deterministic, const at::TensorOptions& options, cudaStream_t stream)
      : R_(rows), deterministic_(deterministic), options_(options), stream_(stream) {}

  Tensor sum(int kind) {
    Tensor out = at::zeros({R_.num_graphs, R_.num_nodes}, options_.dtype(at::kDouble));
    if (!deterministic_) {
      check_launch(launch_rows_contrib(R_, kind, out.data_ptr<double>(), nullptr, nullptr, stream_));
      return out;
    }
    const int64_t entries = R_.rows * R_.k;
    Tensor contrib = at::empty({entries}, options_.dtype(at::kDouble));
    Tensor keys = at::empty({entries}, options_.dtype(at::kLong));
    check_launch(launch_rows_contrib(R_, kind, nullptr, contrib.data_ptr<double>(), keys.data_ptr<int64_t>(),
                                     stream_));
    if (!order_.defined()) std::tie(sorted_keys_, order_) = at::sort(keys, /*stable=*/true, /*dim=*/0, false);
    check_launch(launch_segment_sum(sorted_keys_.data_ptr<int64_t>(), order_.data_ptr<int64_t>(), entries,
                                    contrib.data_ptr<double>(), R_.num_graphs * R_.num_nodes,
                                    out.data_ptr<double>(), stream_));
    return out;
  }

  // The cosine scale of every node into R (csrc/formulas.h): M by an atomic max (order-free), then Q^-1/2.
  void cosine_scale(KeptRows& R, Tensor& node_max, Tensor& inv_sqrt_q) {
    R_.node_max = node_max.data_ptr<float>();
    const Tensor q = sum(kContribSquares);
    inv_sqrt_q = at::where(q > 0, q.rsqrt(), at::zeros_like(q)).to(at::kFloat);
    R.node_max = R_.node_max;
    R.inv_sqrt_q = R_.inv_sqrt_q = inv_sqrt_q.data_ptr<float>();
  }

 private:
  KeptRows R_;
  bool deterministic_;
  at::TensorOptions options_;
  cudaStream_t stream_;
  Tensor sorted_keys_, order_;
};

Tensor node_max_buffer(int64_t num_graphs, int64_t num_nodes, bool log_domain, const at::TensorOptions& options) {
  const float empty = log_domain ? -std::numeric_limits<float>::infinity() : 0.f;
  return at::full({num_graphs, num_nodes}, empty, options.dtype(at::kFloat));
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_degrees(
    const Tensor& logits_in, const Tensor& row_graph_in, int64_t num_graphs, int64_t k, const std::string& values,
    double temperature, const std::string& nodes, const std::string& graph_norm, bool deterministic,
    bool check_data) {
  const Options options = parse_options(values, nodes, graph_norm);
  check_cuda_logits(logits_in);
  check_row_graph(row_graph_in, logits_in, num_graphs);
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1);
  check_k(k, vocab, kCudaMaxK, "k");
  check_temperature(temperature);
  if (check_data) check_index_range(row_graph_in, "row_graph", -1, num_graphs);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor logits = logits_in.contiguous();
  const Tensor row_graph = row_graph_in.contiguous();
  const int64_t num_nodes = options.nodes == kNodesVocab ? vocab : k;
  const auto f32 = logits.options().dtype(at::kFloat);
  const bool probability = options.probability_values(), cosine = options.graph_norm == kNormCosine;

  // the rows kernel scatters the degrees itself, or they are summed from the kept rows below (no zero-fill then)
  const bool scatter_degrees = !cosine && !deterministic;
  Tensor degrees = rows > 0 && !scatter_degrees ? Tensor()
                                                : at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kDouble));
  Tensor touched = at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kBool));
  Tensor kept_values = at::empty({rows, k}, f32);
  Tensor kept_ids = at::empty({rows, k}, logits.options().dtype(at::kLong));
  Tensor row_lse = at::empty({probability ? rows : 0}, f32);
  if (rows > 0) {
    const Tensor kept_logs = probability && cosine ? at::empty({rows, k}, f32) : Tensor();
    Tensor node_max = cosine ? node_max_buffer(num_graphs, num_nodes, probability, logits.options()) : Tensor();
    TopkParams P;
    P.rows = rows;
    P.vocab = vocab;
    P.k = static_cast<int>(k);
    P.idx_bits = id_bits(vocab);
    P.row_graph = row_graph.data_ptr<int64_t>();
    P.num_graphs = num_graphs;
    P.num_nodes = num_nodes;
    P.values_mode = options.values;
    P.nodes_mode = options.nodes;
    P.inv_temperature = static_cast<float>(1.0 / temperature);
    P.scatter_kind = cosine ? kScatterNodeMax : (scatter_degrees ? kScatterDegrees : kScatterNone);
    P.degrees = scatter_degrees ? degrees.data_ptr<double>() : nullptr;
    P.node_max = cosine ? node_max.data_ptr<float>() : nullptr;
    P.touched = touched.data_ptr<bool>();
    P.kept_values = kept_values.data_ptr<float>();
    P.kept_ids = kept_ids.data_ptr<int64_t>();
    P.row_lse = probability ? row_lse.data_ptr<float>() : nullptr;
    P.kept_logs = const_cast<float*>(data_or_null(kept_logs));
    dispatch_logits(logits, [&](auto* data) { check_launch(launch_topk_rows(data, P, stream)); });
    if (P.scatter_kind != kScatterDegrees) {
      KeptRows R = kept_rows(kept_values, kept_ids, row_graph, num_graphs, num_nodes, vocab, options, kept_logs);
      SlotSums sums(R, deterministic, logits.options(), stream);
      Tensor inv_sqrt_q;
      if (cosine) sums.cosine_scale(R, node_max, inv_sqrt_q);
      degrees = sums.sum(kContribDegrees);
    }
  }
  if (options.graph_norm == kNormMean)
    degrees = degrees / row_counts(row_graph, num_graphs, stream).clamp_min(1).unsqueeze(1);
  return {degrees.to(at::kFloat), touched, kept_values, kept_ids, row_lse};
}

Tensor topk_degrees_backward(const Tensor& grad_degrees_in, const Tensor& logits_in, const Tensor& row_graph_in,
                             const Tensor& kept_values_in, const Tensor& kept_ids_in, const Tensor& row_lse_in,
                             int64_t num_graphs, const std::string& values, double temperature,
                             const std::string& nodes, const std::string& graph_norm, bool check_data) {
  const Options options = parse_options(values, nodes, graph_norm);
  check_cuda_logits(logits_in);
  check_row_graph(row_graph_in, logits_in, num_graphs);
  check_temperature(temperature);
  check_kept(kept_values_in, kept_ids_in, row_lse_in, logits_in, at::kFloat, options);
  const int64_t rows = logits_in.size(0), vocab = logits_in.size(1), k = kept_ids_in.size(1);
  check_k(k, vocab, kCudaMaxK, "kept_ids.size(1) (k)");
  const int64_t num_nodes = options.nodes == kNodesVocab ? vocab : k;
  check_grad_degrees(grad_degrees_in, logits_in, num_graphs, num_nodes);
  if (check_data) {
    check_index_range(row_graph_in, "row_graph", -1, num_graphs);
    check_index_range(kept_ids_in, "kept_ids", 0, vocab);
  }
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor logits = logits_in.contiguous();
  const Tensor row_graph = row_graph_in.contiguous();
  const Tensor kept_values = kept_values_in.contiguous();
  const Tensor kept_ids = kept_ids_in.contiguous();
  const Tensor grad_degrees = grad_degrees_in.to(at::kFloat).contiguous();
  const Tensor row_lse = row_lse_in.contiguous();
  const bool probs = options.values == kValuesProbs, cosine = options.graph_norm == kNormCosine;
  const bool probability = options.probability_values();
  // k-sparse rows: zero-fill, then k stores per row. probs: every entry is written by the dense kernel.
  Tensor grad = probs ? at::empty_like(logits) : at::zeros_like(logits);
  if (rows == 0) return grad;

  const float inv_temperature = static_cast<float>(1.0 / temperature);
  // log a of every slot as the forward computed it (ids clamped for the gather: out-of-range slots are dead)
  const Tensor kept_logs =
      probability && cosine
          ? logits.gather(1, kept_ids.clamp(0, vocab - 1)).to(at::kFloat).mul(inv_temperature).sub(row_lse.unsqueeze(1))
          : Tensor();
  BackwardRows B;
  B.kept = kept_rows(kept_values, kept_ids, row_graph, num_graphs, num_nodes, vocab, options, kept_logs);
  const Tensor counts = options.graph_norm == kNormMean ? row_counts(row_graph, num_graphs, stream) : Tensor();
  B.kept.row_counts = counts.defined() ? counts.data_ptr<int>() : nullptr;
  B.grad_degrees = grad_degrees.data_ptr<float>();
  B.values_mode = options.values;
  B.inv_temperature = inv_temperature;
  Tensor node_max, inv_sqrt_q, z;
  if (cosine) {
    node_max = node_max_buffer(num_graphs, num_nodes, probability, logits.options());
    check_launch(launch_node_max(B.kept, node_max.data_ptr<float>(), stream));
    SlotSums(B.kept, /*deterministic=*/false, logits.options(), stream).cosine_scale(B.kept, node_max, inv_sqrt_q);
    z = at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kDouble));
  }
  B.z = cosine ? z.data_ptr<double>() : nullptr;
  Tensor grad_log_a = probs ? at::empty({rows, k}, logits.options().dtype(at::kFloat)) : Tensor();
  float* grad_log_a_ptr = probs ? grad_log_a.data_ptr<float>() : nullptr;

  dispatch_logits(logits, [&](auto* data) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
    T* grad_ptr = probs ? nullptr : reinterpret_cast<T*>(grad.data_ptr());
    if (cosine) check_launch(launch_degrees_backward_rows<T>(B, kStageCosineZ, nullptr, nullptr, stream));
    check_launch(launch_degrees_backward_rows<T>(B, kStageGrad, grad_ptr, grad_log_a_ptr, stream));
    if (probs) {
      check_launch(launch_probs_backward<T>(data, row_lse.data_ptr<float>(), row_graph.data_ptr<int64_t>(),
                                            num_graphs, kept_values.data_ptr<float>(), kept_ids.data_ptr<int64_t>(),
                                            grad_log_a_ptr, static_cast<int>(k), rows, vocab, inv_temperature,
                                            reinterpret_cast<T*>(grad.data_ptr()), stream));
    }
  });
  return grad;
}

}  // namespace cuda
}  // namespace infigw
