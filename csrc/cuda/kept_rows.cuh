// The kept slots of a forward pass as the O(N k) kernels read them, one warp per row: the forward's degree
// aggregation (topk_degrees.cuh) and the backward (topk_degrees_backward.cuh). Torch-free, like every .cuh here.
#pragma once

#include "common.cuh"

namespace infigw {
namespace cuda {

// The one parameter struct of the kept-row kernels.
struct KeptRows {
  const float* kept_values;  // (rows, k)
  const int64_t* kept_ids;   // (rows, k)
  const int64_t* row_graph;  // (rows,)
  int64_t rows;
  int k;
  int64_t num_graphs, num_nodes, vocab;
  int nodes_mode;
  const int* row_counts;  // mean: valid rows per graph (the backward's 1/c); null otherwise
  // The cosine norm (csrc/formulas.h); all null otherwise.
  const float* kept_logs;   // (rows, k) log a: the scale key of the probability values; null for values=logits
  const float* node_max;    // (G, num_nodes) the largest scale key M of each node
  const float* inv_sqrt_q;  // (G, num_nodes) Q^-1/2 of each node
};

// One row's kept slots, spread over the lanes of a warp: slot r = lane + 32 i.
struct WarpRow {
  float a[kMaxKPerLane];
  float log_a[kMaxKPerLane];
  int64_t at[kMaxKPerLane];  // flat (graph, node) index; -1 for a dead slot
  int64_t g;

  // A slot is dead past k, on a masked row, or where its id lies outside [0, vocab) (possible only in a direct
  // call with check_data=false): dead slots are never followed.
  __device__ __forceinline__ void load(const KeptRows& R, int64_t row) {
    const int lane = threadIdx.x % kWarp;
    g = graph_of(R.row_graph, row, R.num_graphs);
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      const bool slot = r < R.k && g >= 0;
      const int64_t id = slot ? R.kept_ids[row * R.k + r] : 0;
      const bool live = slot && id >= 0 && id < R.vocab;
      a[i] = live ? R.kept_values[row * R.k + r] : 0.f;
      log_a[i] = live && R.kept_logs ? R.kept_logs[row * R.k + r] : -INFINITY;
      at[i] = live ? g * R.num_nodes + (R.nodes_mode == kNodesVocab ? id : r) : -1;
    }
  }
  // u of a slot under the cosine norm.
  __device__ __forceinline__ float unit(const KeptRows& R, int i) const {
    return at[i] < 0 ? 0.f : cosine_unit(a[i], log_a[i], R.node_max[at[i]], R.kept_logs != nullptr);
  }
  // The node value a slot contributes with: b = u Q^-1/2 under the cosine norm, else a.
  __device__ __forceinline__ float contributed(const KeptRows& R, int i) const {
    if (!R.node_max) return a[i];
    return at[i] < 0 ? 0.f : unit(R, i) * R.inv_sqrt_q[at[i]];
  }
  template <typename A>
  __device__ __forceinline__ A sum(const A (&v)[kMaxKPerLane]) const {
    A t = 0;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) t += v[i];
    return warp_sum(t);
  }
};

constexpr int kRowsBlock = 256;  // 8 rows (warps) per block in the warp-per-row kernels

inline unsigned warp_rows_grid(int64_t rows) { return grid_for(rows, kRowsBlock / kWarp); }

// The grid-stride loop of the warp-per-row kernels: for (row = first_warp_row(); row < n; row += warp_row_stride()).
__device__ __forceinline__ int64_t first_warp_row() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t warp_row_stride() {
  return static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
}

}  // namespace cuda
}  // namespace infigw
