// CUDA kernel of infigw::coactivation_graph (schema in csrc/ops.cpp): thin binding over graph.cuh. The
// number of entries is data dependent, so this op reads it back to the host once (like torch.unique).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "bindings.h"
#include "graph.cuh"

namespace infigw {
namespace cuda {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor> coactivation_graph_cuda(const Tensor& kept_values_in, const Tensor& kept_ids_in,
                                                   const Tensor& row_graph_in, int64_t num_graphs,
                                                   int64_t nodes_mode, int64_t norm_mode) {
  TORCH_CHECK_VALUE(kept_values_in.is_cuda(), "kept_values must be a CUDA tensor, got one on ",
                    kept_values_in.device());
  TORCH_CHECK_VALUE(kept_values_in.dim() == 2, "kept_values must be 2-D (rows, k), got shape ",
                    kept_values_in.sizes());
  const int64_t rows = kept_values_in.size(0), k = kept_values_in.size(1);
  check_kept(kept_values_in, kept_ids_in, kept_values_in, rows);
  check_row_graph(row_graph_in, kept_values_in, rows);
  check_modes(num_graphs, kValuesLogits, 1.0, nodes_mode, norm_mode);
  const c10::cuda::CUDAGuard guard(kept_values_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor kept_values = kept_values_in.contiguous();
  const Tensor kept_ids = kept_ids_in.contiguous();
  const Tensor row_graph = row_graph_in.contiguous();
  const auto i64 = kept_ids.options();
  const int64_t entries = rows * k * k;
  if (entries == 0) return {at::empty({3, 0}, i64), at::empty({0}, kept_values.options())};
  // Node ids index the vocabulary (vocab nodes) or the rank slots; the key space needs their bound.
  int64_t num_nodes = k;
  if (nodes_mode == kNodesVocab) {
    const auto range = at::aminmax(kept_ids);
    const int64_t lowest = std::get<0>(range).item<int64_t>(), highest = std::get<1>(range).item<int64_t>();
    TORCH_CHECK_VALUE(lowest >= 0 && highest < (int64_t{1} << 31), "kept_ids must lie in [0, 2^31), got [",
                      lowest, ", ", highest, "]");
    num_nodes = highest + 1;
  }
  TORCH_CHECK_VALUE(num_graphs <= std::numeric_limits<int64_t>::max() / num_nodes / num_nodes,
                    "num_graphs * num_nodes^2 must fit in int64 (the pair keys), got num_graphs = ", num_graphs,
                    ", num_nodes = ", num_nodes);

  GraphRows R;
  R.kept_values = kept_values.data_ptr<float>();
  R.kept_ids = kept_ids.data_ptr<int64_t>();
  R.row_graph = row_graph.data_ptr<int64_t>();
  R.rows = rows;
  R.k = static_cast<int>(k);
  R.num_graphs = num_graphs;
  R.num_nodes = num_nodes;
  R.nodes_mode = static_cast<int>(nodes_mode);
  Tensor keys = at::empty({entries}, i64);
  Tensor products = at::empty({entries}, kept_values.options());
  check_launch(launch_graph_pairs(R, keys.data_ptr<int64_t>(), products.data_ptr<float>(), stream));
  Tensor sorted_keys, order;
  std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  Tensor heads = at::empty({entries}, i64);
  check_launch(launch_graph_heads(sorted_keys.data_ptr<int64_t>(), entries, heads.data_ptr<int64_t>(), stream));
  const Tensor entry_of = at::cumsum(heads, 0);
  const int64_t nnz = entry_of[entries - 1].item<int64_t>();
  Tensor indices = at::empty({3, nnz}, i64);
  Tensor values = at::empty({nnz}, kept_values.options());
  if (nnz == 0) return {indices, values};

  Tensor starts = at::empty({nnz + 1}, i64);
  check_launch(launch_graph_starts(sorted_keys.data_ptr<int64_t>(), heads.data_ptr<int64_t>(),
                                   entry_of.data_ptr<int64_t>(), entries, starts.data_ptr<int64_t>(), stream));
  Tensor counts;
  if (norm_mode == kNormMean) {
    counts = at::zeros({num_graphs}, i64.dtype(at::kInt));
    check_launch(launch_count_rows(row_graph.data_ptr<int64_t>(), rows, num_graphs, counts.data_ptr<int>(), stream));
  }
  Tensor sums = at::empty({nnz}, kept_values.options());
  check_launch(launch_graph_reduce(sorted_keys.data_ptr<int64_t>(), order.data_ptr<int64_t>(),
                                   products.data_ptr<float>(), starts.data_ptr<int64_t>(), nnz, num_nodes,
                                   counts.defined() ? counts.data_ptr<int>() : nullptr,
                                   indices.data_ptr<int64_t>(), sums.data_ptr<float>(), values.data_ptr<float>(),
                                   stream));
  if (norm_mode == kNormCosine) {
    Tensor entry_keys = at::empty({nnz}, i64);
    check_launch(launch_graph_cosine(sorted_keys.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                     indices.data_ptr<int64_t>(), sums.data_ptr<float>(), nnz, num_nodes,
                                     entry_keys.data_ptr<int64_t>(), values.data_ptr<float>(), stream));
  }
  return {indices, values};
}

}  // namespace
}  // namespace cuda
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CUDA, m) { m.impl("coactivation_graph", &infigw::cuda::coactivation_graph_cuda); }
