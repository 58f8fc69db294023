// The valid rows of every graph, grouped for the per-graph reductions of the CPU kernels.
//
// Every per-graph reduction walks the rows of one graph in ascending row order on one thread (graphs in
// parallel), so results do not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace infigw {
namespace cpu {

// Rows of every graph in ascending order, CSR style: rows[start[g] .. start[g + 1]).
struct RowsByGraph {
  std::vector<int64_t> start;
  std::vector<int64_t> rows;

  int64_t count(int64_t g) const { return start[g + 1] - start[g]; }
};

// Groups the rows by graph (stable counting sort); row_graph entries lie in [-1, num_graphs) (checked before).
inline RowsByGraph group_rows(const at::Tensor& row_graph, int64_t num_graphs) {
  const at::Tensor graph_of = row_graph.contiguous();
  const int64_t* g = graph_of.data_ptr<int64_t>();
  const int64_t n = graph_of.numel();
  RowsByGraph out;
  out.start.assign(num_graphs + 1, 0);
  for (int64_t p = 0; p < n; ++p)
    if (g[p] >= 0) ++out.start[g[p] + 1];
  for (int64_t i = 0; i < num_graphs; ++i) out.start[i + 1] += out.start[i];
  out.rows.resize(out.start[num_graphs]);
  std::vector<int64_t> fill(out.start.begin(), out.start.end() - 1);
  for (int64_t p = 0; p < n; ++p)
    if (g[p] >= 0) out.rows[fill[g[p]]++] = p;
  return out;
}

}  // namespace cpu
}  // namespace infigw
