// CPU kernel of infigw::coactivation_graph: the explicit graphs G_g = (1/c_g) sum_p a_p a_p^T as coalesced COO
// (schema in csrc/ops.cpp, math in shared/spec/GLD.md section 3). For validation and exact-GW benchmarks.
//
// Per graph (graphs in parallel): the touched nodes are numbered locally, then each node's matrix row is
// accumulated Gustavson-style (sparse A^T A) into a dense scratch row over the graph's nodes, visiting the
// node's occurrences in row order. Memory is O(touched nodes + kept slots) per graph, never the k^2 terms.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/graph_rows.h"

namespace infigw {
namespace cpu {
namespace {

constexpr int64_t kVocab = 0;
constexpr int64_t kMean = 0, kCosine = 2;

template <typename value_t>
struct GraphEntries {
  std::vector<int64_t> row, col;
  std::vector<value_t> value;
};

template <typename value_t>
void build_graph(const GraphRows& groups, int64_t g, const value_t* kept, const int64_t* ids, int64_t k,
                 int64_t nodes_mode, int64_t norm_mode, GraphEntries<value_t>& out) {
  const int64_t num_rows = groups.count(g);
  if (num_rows == 0) return;
  const int64_t* rows = groups.rows.data() + groups.start[g];
  const int64_t slots = num_rows * k;

  // Node ids of the graph's slots (slot s = i * k + r of its i-th row), their sorted distinct values, and the
  // local number of every slot's node.
  std::vector<int64_t> node(slots);
  for (int64_t i = 0; i < num_rows; ++i)
    for (int64_t r = 0; r < k; ++r) node[i * k + r] = nodes_mode == kVocab ? ids[rows[i] * k + r] : r;
  std::vector<int64_t> nodes(node);
  std::sort(nodes.begin(), nodes.end());
  nodes.erase(std::unique(nodes.begin(), nodes.end()), nodes.end());
  const int64_t num_nodes = static_cast<int64_t>(nodes.size());
  std::vector<int64_t> local(slots);
  for (int64_t s = 0; s < slots; ++s)
    local[s] = std::lower_bound(nodes.begin(), nodes.end(), node[s]) - nodes.begin();

  // Occurrences of every local node, in slot (hence row) order.
  std::vector<int64_t> occ_start(num_nodes + 1, 0), occ(slots);
  for (int64_t s = 0; s < slots; ++s) ++occ_start[local[s] + 1];
  for (int64_t n = 0; n < num_nodes; ++n) occ_start[n + 1] += occ_start[n];
  std::vector<int64_t> fill(occ_start.begin(), occ_start.end() - 1);
  for (int64_t s = 0; s < slots; ++s) occ[fill[local[s]]++] = s;

  std::vector<value_t> acc(num_nodes), diag(num_nodes, value_t(0));
  std::vector<int64_t> seen_by(num_nodes, -1), cols;
  for (int64_t n = 0; n < num_nodes; ++n) {
    cols.clear();
    for (int64_t o = occ_start[n]; o < occ_start[n + 1]; ++o) {
      const int64_t s = occ[o], i = s / k;
      const value_t a = kept[rows[i] * k + s % k];
      for (int64_t r = 0; r < k; ++r) {
        const int64_t m = local[i * k + r];
        if (seen_by[m] != n) {
          seen_by[m] = n;
          acc[m] = 0;
          cols.push_back(m);
        }
        acc[m] += a * kept[rows[i] * k + r];
      }
    }
    std::sort(cols.begin(), cols.end());
    for (int64_t m : cols) {
      out.row.push_back(n);
      out.col.push_back(m);
      out.value.push_back(acc[m]);
    }
    diag[n] = acc[n];  // a node always co-occurs with itself
  }

  if (norm_mode == kMean) {
    for (value_t& v : out.value) v /= static_cast<value_t>(num_rows);
  } else if (norm_mode == kCosine) {
    for (value_t& d : diag) d = d > 0 ? value_t(1) / std::sqrt(d) : value_t(0);
    for (size_t e = 0; e < out.value.size(); ++e) out.value[e] *= diag[out.row[e]] * diag[out.col[e]];
  }
  for (size_t e = 0; e < out.row.size(); ++e) {
    out.row[e] = nodes[out.row[e]];
    out.col[e] = nodes[out.col[e]];
  }
}

std::tuple<at::Tensor, at::Tensor> coactivation_graph_cpu(const at::Tensor& kept_values, const at::Tensor& kept_ids,
                                                          const at::Tensor& row_graph, int64_t num_graphs,
                                                          int64_t nodes_mode, int64_t norm_mode) {
  check_modes(nodes_mode, norm_mode);
  TORCH_CHECK_VALUE(kept_values.device().is_cpu() && kept_ids.device().is_cpu(),
                    "kept_values and kept_ids must be CPU tensors");
  TORCH_CHECK_VALUE(kept_values.dim() == 2 && kept_values.sizes() == kept_ids.sizes(),
                    "kept_values and kept_ids must both have shape (N, k), got ", kept_values.sizes(), " and ",
                    kept_ids.sizes());
  TORCH_CHECK_TYPE(kept_values.scalar_type() == at::kFloat || kept_values.scalar_type() == at::kDouble,
                   "kept_values must be float32 (or float64), got ", kept_values.scalar_type());
  TORCH_CHECK_TYPE(kept_ids.scalar_type() == at::kLong, "kept_ids must be int64, got ", kept_ids.scalar_type());
  check_row_graph(row_graph, kept_values.size(0), num_graphs);
  const GraphRows groups = group_rows(row_graph, num_graphs);
  const at::Tensor ids = kept_ids.contiguous();
  const int64_t k = ids.size(1);
  if (nodes_mode == kVocab && ids.numel() > 0)
    TORCH_CHECK_VALUE(ids.min().item<int64_t>() >= 0, "kept_ids must be >= 0 for vocab nodes");

  at::Tensor indices, values;
  AT_DISPATCH_FLOATING_TYPES(kept_values.scalar_type(), "infigw_coactivation_graph", [&] {
    const at::Tensor kept = kept_values.contiguous();
    std::vector<GraphEntries<scalar_t>> per_graph(num_graphs);
    at::parallel_for(0, num_graphs, 1, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g)
        build_graph(groups, g, kept.data_ptr<scalar_t>(), ids.data_ptr<int64_t>(), k, nodes_mode, norm_mode,
                    per_graph[g]);
    });
    int64_t nnz = 0;
    for (const auto& e : per_graph) nnz += static_cast<int64_t>(e.value.size());
    indices = at::empty({3, nnz}, ids.options());
    values = at::empty({nnz}, kept.options());
    int64_t* graph_out = indices.data_ptr<int64_t>();
    int64_t* row_out = graph_out + nnz;
    int64_t* col_out = row_out + nnz;
    scalar_t* value_out = values.data_ptr<scalar_t>();
    int64_t offset = 0;
    for (int64_t g = 0; g < num_graphs; ++g) {
      const auto& e = per_graph[g];
      const int64_t count = static_cast<int64_t>(e.value.size());
      std::fill(graph_out + offset, graph_out + offset + count, g);
      std::copy(e.row.begin(), e.row.end(), row_out + offset);
      std::copy(e.col.begin(), e.col.end(), col_out + offset);
      std::copy(e.value.begin(), e.value.end(), value_out + offset);
      offset += count;
    }
  });
  return {indices, values};
}

}  // namespace
}  // namespace cpu
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CPU, m) { m.impl("coactivation_graph", &infigw::cpu::coactivation_graph_cpu); }
