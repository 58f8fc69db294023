// Explicit co-activation graphs G_g = (1/c_g) sum_p a_p a_p^T as coalesced COO entries (GLD.md section 3).
// Torch-free kernel bodies and launchers; the torch binding (graph.cu) sorts the pair keys and sizes the
// output. Every pair (r, r') of kept slots of a valid row gives the key (graph * n + node_r) * n + node_r'
// and the product a_r a_r'; after a stable sort by key each distinct key is one entry, summed by one warp in
// the sorted order (deterministic), divided by c_g (mean) or normalised by its diagonal entries (cosine).
#pragma once

#include <climits>

#include "common.cuh"

namespace infigw {
namespace cuda {

struct GraphRows {
  const float* kept_values;  // (rows, k)
  const int64_t* kept_ids;   // (rows, k)
  const int64_t* row_graph;  // (rows,)
  int64_t rows;
  int k;
  int64_t num_graphs, num_nodes;
  int nodes_mode;
};

// keys/products (rows * k * k); masked rows get key LLONG_MAX (sorted last, dropped).
static __global__ void graph_pairs_kernel(GraphRows R, int64_t* __restrict__ keys, float* __restrict__ products) {
  const int64_t kk = static_cast<int64_t>(R.k) * R.k, total = R.rows * kk;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = e / kk;
    const int r = static_cast<int>((e % kk) / R.k), c = static_cast<int>(e % R.k);
    const int64_t g = graph_of(R.row_graph, row, R.num_graphs);
    if (g < 0) {
      keys[e] = LLONG_MAX;
      products[e] = 0.f;
      continue;
    }
    const int64_t* ids = R.kept_ids + row * R.k;
    const int64_t i = R.nodes_mode == kNodesVocab ? ids[r] : r;
    const int64_t j = R.nodes_mode == kNodesVocab ? ids[c] : c;
    keys[e] = (g * R.num_nodes + i) * R.num_nodes + j;
    products[e] = R.kept_values[row * R.k + r] * R.kept_values[row * R.k + c];
  }
}

// heads[i] = 1 where sorted_keys[i] starts a new (valid) key, else 0.
static __global__ void graph_heads_kernel(const int64_t* __restrict__ sorted_keys, int64_t entries,
                                   int64_t* __restrict__ heads) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < entries;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = sorted_keys[i];
    heads[i] = key != LLONG_MAX && (i == 0 || sorted_keys[i - 1] != key);
  }
}

// From the inclusive cumsum of heads: starts[s] = first sorted position of entry s, starts[nnz] = end of
// the valid keys.
static __global__ void graph_starts_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ heads,
                                    const int64_t* __restrict__ entry_of, int64_t entries,
                                    int64_t* __restrict__ starts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < entries;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t key = sorted_keys[i];
    if (key == LLONG_MAX) continue;
    if (heads[i]) starts[entry_of[i] - 1] = i;
    if (i + 1 == entries || sorted_keys[i + 1] == LLONG_MAX) starts[entry_of[i]] = i + 1;
  }
}

// One warp per entry: the sum of its products in sorted order, the (graph, i, j) indices, and the value
// divided by c_g for the mean norm (row_counts non-null). `sums` keeps the raw sum (cosine needs it).
static __global__ void graph_reduce_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                    const float* __restrict__ products, const int64_t* __restrict__ starts,
                                    int64_t nnz, int64_t num_nodes, const int* __restrict__ row_counts,
                                    int64_t* __restrict__ indices, float* __restrict__ sums,
                                    float* __restrict__ values) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t s = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; s < nnz; s += warps) {
    const int64_t lo = starts[s], hi = starts[s + 1];
    float t = 0.f;
    for (int64_t i = lo + lane; i < hi; i += kWarp) t += products[order[i]];
    t = warp_sum(t);
    if (lane == 0) {
      const int64_t key = sorted_keys[lo];
      const int64_t g = key / (num_nodes * num_nodes), i = (key / num_nodes) % num_nodes, j = key % num_nodes;
      indices[s] = g;
      indices[nnz + s] = i;
      indices[2 * nnz + s] = j;
      sums[s] = t;
      values[s] = row_counts ? t / static_cast<float>(row_counts[g]) : t;
    }
  }
}

// Cosine: G_ij * D_i^-1/2 * D_j^-1/2 with D the diagonal entries (0 where D <= 0), as the reference. The
// diagonal entry (g, i, i) of every touched node exists; it is found by binary search over the sorted keys.
static __global__ void graph_cosine_kernel(const int64_t* __restrict__ indices, const float* __restrict__ sums,
                                    const int64_t* __restrict__ entry_keys, int64_t nnz, int64_t num_nodes,
                                    float* __restrict__ values) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < nnz;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = indices[s], i = indices[nnz + s], j = indices[2 * nnz + s];
    auto inv_sqrt_diag = [&](int64_t node) {
      const float d = sums[lower_bound(entry_keys, nnz, (g * num_nodes + node) * num_nodes + node)];
      return d > 0.f ? rsqrtf(d) : 0.f;
    };
    values[s] = sums[s] * inv_sqrt_diag(i) * inv_sqrt_diag(j);
  }
}

// entry_keys[s] = sorted_keys[starts[s]]: the sorted distinct keys, for the cosine lookups.
static __global__ void graph_entry_keys_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ starts,
                                        int64_t nnz, int64_t* __restrict__ entry_keys) {
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < nnz;
       s += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    entry_keys[s] = sorted_keys[starts[s]];
  }
}

constexpr int kGraphBlock = 256;

inline cudaError_t launch_graph_pairs(const GraphRows& R, int64_t* keys, float* products, cudaStream_t stream) {
  graph_pairs_kernel<<<grid_for(R.rows * R.k * R.k, kGraphBlock), kGraphBlock, 0, stream>>>(R, keys, products);
  return cudaGetLastError();
}

inline cudaError_t launch_graph_heads(const int64_t* sorted_keys, int64_t entries, int64_t* heads,
                                      cudaStream_t stream) {
  graph_heads_kernel<<<grid_for(entries, kGraphBlock), kGraphBlock, 0, stream>>>(sorted_keys, entries, heads);
  return cudaGetLastError();
}

inline cudaError_t launch_graph_starts(const int64_t* sorted_keys, const int64_t* heads, const int64_t* entry_of,
                                       int64_t entries, int64_t* starts, cudaStream_t stream) {
  graph_starts_kernel<<<grid_for(entries, kGraphBlock), kGraphBlock, 0, stream>>>(sorted_keys, heads, entry_of,
                                                                                  entries, starts);
  return cudaGetLastError();
}

inline cudaError_t launch_graph_reduce(const int64_t* sorted_keys, const int64_t* order, const float* products,
                                       const int64_t* starts, int64_t nnz, int64_t num_nodes,
                                       const int* row_counts, int64_t* indices, float* sums, float* values,
                                       cudaStream_t stream) {
  graph_reduce_kernel<<<grid_for(nnz, kGraphBlock / kWarp), kGraphBlock, 0, stream>>>(
      sorted_keys, order, products, starts, nnz, num_nodes, row_counts, indices, sums, values);
  return cudaGetLastError();
}

inline cudaError_t launch_graph_cosine(const int64_t* sorted_keys, const int64_t* starts, const int64_t* indices,
                                       const float* sums, int64_t nnz, int64_t num_nodes, int64_t* entry_keys,
                                       float* values, cudaStream_t stream) {
  graph_entry_keys_kernel<<<grid_for(nnz, kGraphBlock), kGraphBlock, 0, stream>>>(sorted_keys, starts, nnz,
                                                                                  entry_keys);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  graph_cosine_kernel<<<grid_for(nnz, kGraphBlock), kGraphBlock, 0, stream>>>(indices, sums, entry_keys, nnz,
                                                                              num_nodes, values);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
