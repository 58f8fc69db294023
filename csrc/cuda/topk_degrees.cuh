// Fused top-k selection -> value transform -> per-graph degrees (docs/math.md §2, §3): the selecting kernel and
// the degree aggregation over the kept rows. Torch-free kernel bodies and launchers; the torch binding is
// topk_degrees.cu, the backward topk_degrees_backward.cuh, the selection machinery topk_select.cuh.
//
// The selecting kernel, one 512-thread block per row, in five named steps: scan the row (seed the threshold
// from the first full tile, then filter every tile into the candidate buffer), rank the kept set, the block
// logsumexp (values="probs"), and transform and scatter (node values a_p, kept outputs, and the block's own
// scatter into the per-graph sums).
//
// Degrees accumulate in fp64: a term a_r s_p of finite fp32 logits may exceed fp32 (|logits| above ~1e19) but
// never fp64, so no degree becomes inf - inf; the binding divides by c (mean) and rounds to fp32. mean/sum norms
// are scatter-added by the selecting block itself. Cosine scales every node first (csrc/formulas.h): the block
// scatters each slot's scale key into the node maximum M (an order-free atomic max), a warp-per-row pass sums
// Q = sum u^2, and a second one adds the normalised degrees. deterministic=true replaces every float atomic sum
// by per-slot terms sorted by (graph, node) with a stable sort (done by the binding) and summed per node in a
// fixed order (segment_sum_kernel).
#pragma once

#include <climits>

#include "kept_rows.cuh"
#include "topk_select.cuh"

namespace infigw {
namespace cuda {

// What the selecting block scatters itself: the degree terms (mean/sum), the cosine scale keys, or nothing
// (deterministic mean/sum, summed afterwards from the kept rows).
enum ScatterKind { kScatterNone = 0, kScatterDegrees = 1, kScatterNodeMax = 2 };

struct TopkParams {
  int64_t rows, vocab;
  int k, idx_bits;
  const int64_t* row_graph;
  int64_t num_graphs, num_nodes;
  int values_mode, nodes_mode;
  float inv_temperature;
  int scatter_kind;   // ScatterKind
  double* degrees;    // kScatterDegrees: (num_graphs, num_nodes) sums of a s
  float* node_max;    // kScatterNodeMax: (num_graphs, num_nodes) largest scale key
  bool* touched;      // (num_graphs, num_nodes)
  float* kept_values;  // (rows, k)
  int64_t* kept_ids;   // (rows, k)
  float* row_lse;      // (rows,) for the probability values, else null
  float* kept_logs;    // (rows, k) log a of the probability values under the cosine norm, else null
};

// ---- the selecting kernel ----------------------------------------------------------------------------

// Step 1-2: the scan of one row by the whole block, leaving its top k (composites) in buffer[0, k).
template <typename T, bool kProbs>
struct RowScan {
  static constexpr int kVec = Vec<T>::kVec;
  static constexpr int kTileVecs = kTopkBlock * kTopkUnroll;
  // Compact once more candidates than this are held: one more tile then still fits.
  static constexpr int kLimit = TopkTile<T>::kCapacity - TopkTile<T>::kElems;

  const T* row;
  int k, idx_bits, nbits;
  float inv_t;
  unsigned long long* buffer;
  TopkShared& sh;
  Lse lse;

  // Step 1, seed the threshold: the k-th largest per-thread maximum of the first full tile. At least k elements
  // reach its key, so every element with a smaller key anywhere in the row is out.
  __device__ __forceinline__ void seed_threshold(const uint4 (&tile)[kTopkUnroll], int64_t head) {
    unsigned long long best = 0;
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t first = head + (static_cast<int64_t>(u) * kTopkBlock + threadIdx.x) * kVec;
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        const unsigned long long c = composite(Elem<T>::key(Vec<T>::bits(tile[u], j)), first + j, idx_bits);
        best = c > best ? c : best;
      }
    }
    sh.scratch[threadIdx.x] = best;
    __syncthreads();
    unsigned long long prefix, mask;
    radix_select(sh.scratch, kTopkBlock, k, nbits, sh.select, prefix, mask);
    const unsigned long long kth = gather_selected(sh.scratch, kTopkBlock, prefix, mask, nullptr, sh.select);
    if (threadIdx.x == 0) {
      const unsigned int seed = static_cast<unsigned int>(kth >> idx_bits) - 1u;
      if (seed > sh.threshold) sh.threshold = seed;
    }
    __syncthreads();
  }

  // Step 2, filter a tile of 16-byte vectors (number t of the aligned body) into the candidate buffer.
  __device__ __forceinline__ void filter_tile(const uint4 (&tile)[kTopkUnroll], int64_t t, int64_t head,
                                              int64_t nvec) {
    const float bound = admission_bound<T>(sh.threshold);
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t vi = t * kTileVecs + u * kTopkBlock + threadIdx.x;
      uint32_t bits[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) bits[j] = Vec<T>::bits(tile[u], j);
      filter<T, kProbs, kVec>(bits, head + vi * kVec, vi < nvec, bound, inv_t, idx_bits, lse, buffer, &sh.count);
    }
  }

  // Step 2 on the < kVec elements before the first aligned address or after the last full vector.
  __device__ __forceinline__ void filter_scalars(int64_t first, int64_t n) {
    compact_if_full(buffer, sh, kLimit, k, nbits, idx_bits);
    const bool active = threadIdx.x < n;
    const uint32_t bits[1] = {active ? Elem<T>::load_bits(row + first + threadIdx.x) : 0u};
    filter<T, kProbs, 1>(bits, first + threadIdx.x, active, admission_bound<T>(sh.threshold), inv_t, idx_bits,
                         lse, buffer, &sh.count);
  }

  // The whole row: scalar head, the aligned body in tiles (the next tile's loads issued before the current one
  // is filtered), scalar tail; then the buffer is compacted to exactly k.
  __device__ __forceinline__ void scan(int64_t vocab) {
    const int64_t head = misaligned_head(row, vocab);
    const int64_t nvec = (vocab - head) / kVec;
    const uint4* body = reinterpret_cast<const uint4*>(row + head);
    const int64_t ntiles = (nvec + kTileVecs - 1) / kTileVecs;
    if (head > 0) filter_scalars(0, head);
    uint4 cur[kTopkUnroll], nxt[kTopkUnroll];
    auto load_tile = [&](int64_t t, uint4 (&v)[kTopkUnroll]) {
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const int64_t vi = t * kTileVecs + u * kTopkBlock + threadIdx.x;
        v[u] = vi < nvec ? __ldcs(body + vi) : make_uint4(0u, 0u, 0u, 0u);
      }
    };
    if (ntiles > 0) load_tile(0, cur);
    for (int64_t t = 0; t < ntiles; ++t) {
      if (t + 1 < ntiles) load_tile(t + 1, nxt);
      compact_if_full(buffer, sh, kLimit, k, nbits, idx_bits);
      if (t == 0 && nvec >= kTileVecs) seed_threshold(cur, head);
      filter_tile(cur, t, head, nvec);
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) cur[u] = nxt[u];
    }
    const int64_t tail = head + nvec * kVec;
    if (tail < vocab) filter_scalars(tail, vocab - tail);
    compact_if_full(buffer, sh, k, k, nbits, idx_bits);
  }
};

// Step 3, rank the kept set: the rank of a kept composite is the number of larger ones (all distinct), so
// sh.scratch[0, k) holds them in rank order.
__device__ __forceinline__ void rank_kept(const unsigned long long* buffer, TopkShared& sh, int k) {
  if (threadIdx.x < k) {
    const unsigned long long c = buffer[threadIdx.x];
    int rank = 0;
    for (int j = 0; j < k; ++j) rank += buffer[j] > c;
    sh.scratch[rank] = c;
  }
}

// Step 4, the block logsumexp (values="probs") of the per-thread (max, sum) pairs: warp tree, then every thread
// over the warp results.
__device__ __forceinline__ float block_logsumexp(Lse lse, TopkShared& sh) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float om = __shfl_xor_sync(kFullMask, lse.m, offset);
    const float os = __shfl_xor_sync(kFullMask, lse.s, offset);
    lse.merge(om, os);
  }
  const int warps = kTopkBlock / kWarp;
  if (threadIdx.x % kWarp == 0) {
    sh.reduce[threadIdx.x / kWarp] = lse.m;
    sh.reduce[warps + threadIdx.x / kWarp] = lse.s;
  }
  __syncthreads();
  Lse total;
  for (int w = 0; w < warps; ++w) total.merge(sh.reduce[w], sh.reduce[warps + w]);
  return total.m == -INFINITY ? -INFINITY : total.m + __logf(total.s);
}

// Step 5, transform and scatter: thread r < k takes the r-th kept entry, forms its node value a_p (for the
// probability values a = exp(x / T - lse), lse of the row or of the k kept entries), writes the kept outputs and
// scatters into the per-graph sums. `lse` is the row's logsumexp for values="probs".
template <typename T>
__device__ __forceinline__ void transform_and_scatter(const TopkParams& P, int64_t row, const T* row_ptr,
                                                      TopkShared& sh, float lse) {
  const int r = threadIdx.x;
  const bool slot = r < P.k;
  const unsigned long long id_mask = (1ull << P.idx_bits) - 1;
  const int64_t id = slot ? static_cast<int64_t>(id_mask - (sh.scratch[r] & id_mask)) : 0;
  const float inv_t = P.inv_temperature;
  const float x = slot ? load_float(row_ptr + id) : 0.f;
  float a = x, log_a = 0.f;
  if (P.values_mode == kValuesTopkProbs) {
    const float top = load_float(row_ptr + (id_mask - (sh.scratch[0] & id_mask))) * inv_t;
    lse = top + __logf(block_sum1(slot ? __expf(x * inv_t - top) : 0.f, sh.reduce));
  }
  if (P.values_mode != kValuesLogits) {
    log_a = x * inv_t - lse;
    a = __expf(log_a);
    if (threadIdx.x == 0) P.row_lse[row] = lse;
    if (slot && P.kept_logs) P.kept_logs[row * P.k + r] = log_a;
  }
  if (!slot) a = 0.f;
  const double s = P.scatter_kind == kScatterDegrees ? block_sum1<double>(a, sh.reduce64) : 0.0;
  const int64_t g = graph_of(P.row_graph, row, P.num_graphs);
  if (!slot) return;
  P.kept_ids[row * P.k + r] = id;
  P.kept_values[row * P.k + r] = g >= 0 ? a : 0.f;
  if (g < 0) return;
  const int64_t at = g * P.num_nodes + (P.nodes_mode == kNodesVocab ? id : r);
  P.touched[at] = true;
  if (P.scatter_kind == kScatterDegrees) atomicAdd(P.degrees + at, static_cast<double>(a) * s);
  if (P.scatter_kind == kScatterNodeMax) atomic_max_float(P.node_max + at, cosine_key(a, log_a, P.kept_logs != nullptr));
}

template <typename T, bool kProbs>
static __global__ void __launch_bounds__(kTopkBlock, kTopkMinBlocks)
    topk_rows_kernel(const T* __restrict__ logits, TopkParams P) {
  extern __shared__ unsigned long long buffer[];
  __shared__ TopkShared sh;
  const int64_t row = blockIdx.x;
  const T* row_ptr = logits + row * P.vocab;
  if (threadIdx.x == 0) {
    sh.count = 0;
    sh.threshold = 0;  // no element has key 0 (that would be a NaN bit pattern): admit all
  }
  RowScan<T, kProbs> scan{row_ptr, P.k, P.idx_bits, (Elem<T>::kKeyBits + P.idx_bits + 7) / 8 * 8,
                          P.inv_temperature, buffer, sh, Lse()};
  scan.scan(P.vocab);
  rank_kept(buffer, sh, P.k);
  const float lse = kProbs ? block_logsumexp(scan.lse, sh) : 0.f;
  __syncthreads();
  transform_and_scatter<T>(P, row, row_ptr, sh, lse);
}

// ---- degree aggregation over the kept rows (one warp per row) -----------------------------------------

enum ContribKind { kContribSquares = 0, kContribDegrees = 1 };

// The largest cosine scale key of every node (order-free atomic max into node_max, initialised to 0 or -inf).
static __global__ void node_max_kernel(KeptRows R, float* node_max) {
  for (int64_t row = first_warp_row(); row < R.rows; row += warp_row_stride()) {
    WarpRow w;
    w.load(R, row);
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      if (w.at[i] >= 0) atomic_max_float(node_max + w.at[i], cosine_key(w.a[i], w.log_a[i], R.kept_logs != nullptr));
    }
  }
}

// Per-slot terms of the kept rows: u^2 (the cosine Q) or b s (the degrees; b = a, or the cosine b), in fp64.
// Either scatter-added into atomic_out (G, num_nodes) or written to contrib_out (rows, k) with keys_out = flat
// (graph, node) index (LLONG_MAX for dead slots, so they sort last) for the deterministic reduction.
static __global__ void rows_contrib_kernel(KeptRows R, int kind, double* atomic_out, double* contrib_out,
                                           int64_t* keys_out) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = first_warp_row(); row < R.rows; row += warp_row_stride()) {
    WarpRow w;
    w.load(R, row);
    double term[kMaxKPerLane];
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) term[i] = kind == kContribSquares ? w.unit(R, i) : w.contributed(R, i);
    const double s = kind == kContribDegrees ? w.sum(term) : 0.0;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      if (r >= R.k) break;
      const double c = kind == kContribSquares ? term[i] * term[i] : term[i] * s;
      if (atomic_out) {
        if (w.at[i] >= 0) atomicAdd(atomic_out + w.at[i], c);
      } else {
        contrib_out[row * R.k + r] = c;
        keys_out[row * R.k + r] = w.at[i] >= 0 ? w.at[i] : LLONG_MAX;
      }
    }
  }
}

// out[slot] = sum of contrib[order[i]] over the i with sorted_keys[i] == slot, one warp per slot, lanes
// strided and a fixed shuffle tree: the same bits on every run.
static __global__ void segment_sum_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                          int64_t entries, const double* __restrict__ contrib, int64_t slots,
                                          double* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  for (int64_t slot = first_warp_row(); slot < slots; slot += warp_row_stride()) {
    const int64_t lo = lower_bound(sorted_keys, entries, slot);
    const int64_t hi = lower_bound(sorted_keys, entries, slot + 1);
    double t = 0.0;
    for (int64_t i = lo + lane; i < hi; i += kWarp) t += contrib[order[i]];
    t = warp_sum(t);
    if (lane == 0) out[slot] = t;
  }
}

// ---- launchers (host) -------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_topk_rows(const T* logits, const TopkParams& P, cudaStream_t stream) {
  const size_t smem = TopkTile<T>::kSmemBytes;
  auto kernel = P.values_mode == kValuesProbs ? topk_rows_kernel<T, true> : topk_rows_kernel<T, false>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(P.rows), kTopkBlock, smem, stream>>>(logits, P);
  return cudaGetLastError();
}

inline cudaError_t launch_node_max(const KeptRows& R, float* node_max, cudaStream_t stream) {
  node_max_kernel<<<warp_rows_grid(R.rows), kRowsBlock, 0, stream>>>(R, node_max);
  return cudaGetLastError();
}

inline cudaError_t launch_rows_contrib(const KeptRows& R, int kind, double* atomic_out, double* contrib_out,
                                       int64_t* keys_out, cudaStream_t stream) {
  rows_contrib_kernel<<<warp_rows_grid(R.rows), kRowsBlock, 0, stream>>>(R, kind, atomic_out, contrib_out,
                                                                          keys_out);
  return cudaGetLastError();
}

inline cudaError_t launch_segment_sum(const int64_t* sorted_keys, const int64_t* order, int64_t entries,
                                      const double* contrib, int64_t slots, double* out, cudaStream_t stream) {
  segment_sum_kernel<<<warp_rows_grid(slots), kRowsBlock, 0, stream>>>(sorted_keys, order, entries, contrib,
                                                                        slots, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
