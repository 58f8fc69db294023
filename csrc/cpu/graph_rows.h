// Shared by the CPU kernels of infigw: argument checks and the rows of each graph.
//
// Every per-graph reduction walks the rows of one graph in ascending row order on one thread (graphs in
// parallel), so results do not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace infigw {
namespace cpu {

inline void check_row_graph(const at::Tensor& row_graph, int64_t rows, int64_t num_graphs) {
  TORCH_CHECK_TYPE(row_graph.scalar_type() == at::kLong, "row_graph must be int64, got ", row_graph.scalar_type());
  TORCH_CHECK_VALUE(row_graph.dim() == 1 && row_graph.size(0) == rows, "row_graph must have shape (", rows,
                    ",), got ", row_graph.sizes());
  TORCH_CHECK_VALUE(row_graph.device().is_cpu(), "row_graph must be a CPU tensor, got ", row_graph.device());
  TORCH_CHECK_VALUE(num_graphs >= 0, "num_graphs must be >= 0, got ", num_graphs);
}

inline void check_modes(int64_t nodes_mode, int64_t norm_mode) {
  TORCH_CHECK_VALUE(nodes_mode == 0 || nodes_mode == 1, "nodes_mode must be 0 (vocab) or 1 (rank), got ", nodes_mode);
  TORCH_CHECK_VALUE(norm_mode >= 0 && norm_mode <= 2, "norm_mode must be 0 (mean), 1 (sum) or 2 (cosine), got ",
                    norm_mode);
}

// Rows of every graph in ascending order, CSR style: rows[start[g] .. start[g + 1]).
struct GraphRows {
  std::vector<int64_t> start;
  std::vector<int64_t> rows;

  int64_t count(int64_t g) const { return start[g + 1] - start[g]; }
};

// Groups rows by graph (stable counting sort) and checks every entry lies in [-1, num_graphs).
inline GraphRows group_rows(const at::Tensor& row_graph, int64_t num_graphs) {
  const at::Tensor graph_of = row_graph.contiguous();
  const int64_t* g = graph_of.data_ptr<int64_t>();
  const int64_t n = graph_of.numel();
  GraphRows out;
  out.start.assign(num_graphs + 1, 0);
  for (int64_t p = 0; p < n; ++p) {
    TORCH_CHECK_VALUE(g[p] >= -1 && g[p] < num_graphs, "row_graph entries must lie in [-1, num_graphs=", num_graphs,
                      "), got ", g[p], " at row ", p);
    if (g[p] >= 0) ++out.start[g[p] + 1];
  }
  for (int64_t i = 0; i < num_graphs; ++i) out.start[i + 1] += out.start[i];
  out.rows.resize(out.start[num_graphs]);
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  for (int64_t p = 0; p < n; ++p)
    if (g[p] >= 0) out.rows[fill[g[p]]++] = p;
  return out;
}

}  // namespace cpu
}  // namespace infigw
