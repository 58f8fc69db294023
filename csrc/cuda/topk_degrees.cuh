// Fused top-k selection -> value transform -> per-graph degrees, and its backward (GLD.md sections 2, 3, 6).
// Torch-free kernel bodies and launchers; the torch binding is topk_degrees.cu.
//
// Selection design (one 512-thread block per row, the row read from HBM exactly once):
//   * The row streams through in tiles of 512 x 2 x 16-byte vectors (8192 bf16/fp16 or 4096 fp32 logits),
//     the next tile's loads issued before the current tile is filtered (register double buffer).
//   * Every element becomes a 64-bit composite (order_key(value) << idx_bits) | (2^idx_bits - 1 - id): the
//     composites are distinct and their descending order is exactly the contract's rank order (value desc,
//     NaN above every number, -0 == +0, ties to the smaller id), so an exact k-selection on composites
//     needs no separate tie pass.
//   * An element is kept as a candidate in a shared-memory buffer only if its key beats a running threshold.
//     The buffer always holds the top-k of everything read so far; when it could overflow, a block radix
//     select (8-bit digits over the composite, shared-memory histograms, early exit once the k-th digit
//     bucket is exactly filled) compacts it back to k entries and raises the threshold to the k-th key.
//     Tiles are filtered in increasing id order and compaction happens only between tiles, so an element
//     whose key *equals* the threshold loses the tie to the k-th kept entry (smaller id): the test is key >
//     threshold. The first full tile seeds the threshold with the k-th largest of the 512 per-thread maxima
//     (at least k elements of that tile reach it), so even the first tile admits only a few candidates.
//   * The threshold test is one float compare against the smallest value that beats the threshold
//     (admission_bound), and one warp vote per 16-byte vector: a rejected element costs about three
//     instructions, so the pass stays memory bound. Candidates are appended with one ballot and one shared
//     atomic per warp. For values="probs" the same pass keeps an online logsumexp.
// Why not a multi-pass radix select over global memory (torch.topk's approach): each pass re-reads the
// row (303 KB for V = 151936 bf16), which does not fit in shared memory (228 KB) and only partly in L2
// when 100+ rows are in flight, so it costs several reads of the logits instead of one. Why not per-thread
// heaps merged in shared memory: with k up to 256 a per-thread heap does not fit in registers; the
// threshold filter gives the same single read with O(candidates) work.
//
// Degrees: mean/sum norms are scatter-added (fp32 atomics) by the selecting block itself. Cosine needs the
// graph diagonal first, so the block scatters a^2 and a warp-per-row kernel adds the normalised degrees.
// deterministic=true replaces every float atomic by per-slot contributions sorted by (graph, node) with a
// stable sort (done by the binding) and summed per slot in a fixed order (segment_sum_kernel).
#pragma once

#include <climits>

#include "common.cuh"

namespace infigw {
namespace cuda {

constexpr int kTopkBlock = 512;
constexpr int kTopkUnroll = 2;
// Two resident blocks per SM (<= 64 registers a thread): 1024 threads with 2 x 16 B of the next tile in flight
// each, about 32 KB per SM, above what HBM3 needs per SM to run at full bandwidth (~18 KB by Little's law).
constexpr int kTopkMinBlocks = 2;

template <typename T>
struct TopkTile {
  static constexpr int kElems = kTopkBlock * kTopkUnroll * Vec<T>::kVec;
  // Room for one tile's worth of new candidates on top of up to 4 * kMaxK held ones: compaction runs only
  // once more than 1024 candidates have piled up, so even k = 256 compacts every few tiles, not every tile.
  // 79 KB of shared memory per block for 16-bit logits (two blocks fit an A100 or H100 SM), 46 KB for fp32.
  static constexpr int kCapacity = kElems + 4 * kMaxK;
  static constexpr size_t kSmemBytes = kCapacity * sizeof(unsigned long long);
};

enum ScatterKind { kScatterNone = 0, kScatterDegrees = 1, kScatterSquares = 2 };

struct TopkParams {
  int64_t rows, vocab;
  int k, idx_bits;
  const int64_t* row_graph;
  int64_t num_graphs, num_nodes;
  int values_mode, nodes_mode;
  float inv_temperature;
  const int* row_counts;  // valid rows per graph: mean norm divides by it; null = no division
  int scatter_kind;       // ScatterKind
  float* scatter_out;     // (num_graphs, num_nodes): degrees or the cosine diagonal
  bool* touched;          // (num_graphs, num_nodes)
  float* kept_values;     // (rows, k)
  int64_t* kept_ids;      // (rows, k)
  float* row_lse;         // (rows,) for probs, else null
};

// ---- block radix select over distinct 64-bit composites ---------------------------------------------

struct SelectShared {
  unsigned int hist[256];
  int digit, above, bucket, taken;
  unsigned long long min_kept;
};

// Warp 0: the digit d whose bucket holds the `needed`-th largest item (counts of larger digits < needed).
__device__ __forceinline__ void find_digit(SelectShared& sh, int needed) {
  const int lane = threadIdx.x;
  unsigned int local[8], total = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    local[j] = sh.hist[lane * 8 + j];
    total += local[j];
  }
  unsigned int suffix = total;  // inclusive suffix sum over lanes >= lane
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const unsigned int v = __shfl_down_sync(kFullMask, suffix, offset);
    if (lane + offset < kWarp) suffix += v;
  }
  int above = static_cast<int>(suffix - total);
#pragma unroll
  for (int j = 7; j >= 0; --j) {
    const int count = static_cast<int>(local[j]);
    if (above < needed && needed <= above + count) {
      sh.digit = lane * 8 + j;
      sh.above = above;
      sh.bucket = count;
    }
    above += count;
  }
}

// Selects the k largest of n distinct items: afterwards item c is selected iff (c & mask) >= prefix.
// nbits (a multiple of 8) covers every set bit of the items. Called by the whole block.
__device__ __forceinline__ void radix_select(const unsigned long long* items, int n, int k, int nbits,
                                             SelectShared& sh, unsigned long long& prefix,
                                             unsigned long long& mask) {
  prefix = 0;
  mask = 0;
  int needed = k;
  for (int shift = nbits - 8; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) sh.hist[i] = 0;
    __syncthreads();
    // Lanes with the same digit add once (candidates often share their leading digits: ties, one
    // binade), so the shared atomics do not serialise on one bin. The loop bound is block-uniform.
    for (int base = 0; base < n; base += blockDim.x) {
      const int i = base + threadIdx.x;
      const unsigned long long c = i < n ? items[i] : 0ull;
      const bool counted = i < n && (c & mask) == prefix;
      const unsigned int digit = counted ? static_cast<unsigned int>((c >> shift) & 255u) : 256u;
      const unsigned int peers = __match_any_sync(kFullMask, digit);
      if (counted && threadIdx.x % kWarp == __ffs(peers) - 1) atomicAdd(&sh.hist[digit], __popc(peers));
    }
    __syncthreads();
    if (threadIdx.x < kWarp) find_digit(sh, needed);
    __syncthreads();
    needed -= sh.above;
    prefix |= static_cast<unsigned long long>(sh.digit) << shift;
    mask |= 0xffull << shift;
    if (sh.bucket == needed) break;  // the whole bucket is kept: the selection is decided
  }
}

// Returns the smallest selected item (the k-th largest) to every thread and, when `out` is given, moves the
// selected items of items[0, n) into out[0, k) (any order); `out` must not overlap `items`.
__device__ __forceinline__ unsigned long long gather_selected(const unsigned long long* items, int n,
                                                              unsigned long long prefix,
                                                              unsigned long long mask,
                                                              unsigned long long* out,
                                                              SelectShared& sh) {
  __syncthreads();  // sh fields of the select are read by every thread before they are reset
  if (threadIdx.x == 0) {
    sh.taken = 0;
    sh.min_kept = ULLONG_MAX;
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const unsigned long long c = items[i];
    if ((c & mask) >= prefix) {
      if (out) out[atomicAdd(&sh.taken, 1)] = c;
      atomicMin(&sh.min_kept, c);
    }
  }
  __syncthreads();
  return sh.min_kept;
}

// ---- the selecting kernel ----------------------------------------------------------------------------

struct TopkShared {
  SelectShared select;
  unsigned long long scratch[kTopkBlock];  // per-thread seeds, then the selected set, then rank order
  int count;                               // candidates in the buffer
  unsigned int threshold;                  // an element may be in the top k only if its key > threshold
  float reduce[2 * (kTopkBlock / kWarp)];
};

__device__ __forceinline__ unsigned long long composite(uint32_t key, int64_t id, int idx_bits) {
  const unsigned long long id_mask = (1ull << idx_bits) - 1;
  return (static_cast<unsigned long long>(key) << idx_bits) | (id_mask - static_cast<unsigned long long>(id));
}

// Appends the composite c to the buffer when `admit`; one ballot and at most one shared atomic per warp.
// Every lane of the warp must call it.
__device__ __forceinline__ void offer(bool admit, unsigned long long c, unsigned long long* buffer,
                                      int* count) {
  const unsigned ballot = __ballot_sync(kFullMask, admit);
  if (ballot == 0) return;
  const int lane = threadIdx.x % kWarp;
  int base = 0;
  if (lane == 0) base = atomicAdd(count, __popc(ballot));
  base = __shfl_sync(kFullMask, base, 0);
  if (admit) buffer[base + __popc(ballot & ((1u << lane) - 1u))] = c;
}

// The admission test "key(x) > threshold" as one float compare: x is admitted iff !(x < bound) with bound
// the smallest value whose key exceeds the threshold. NaN x is always admitted (NaN ranks first). When no
// such bound is a number (threshold 0 = admit all, or a threshold at +inf or above) bound is NaN and every
// element is admitted, which is safe: admitting more candidates never changes the selection. With
// flush-to-zero the compare is monotone in x and bound, so it never rejects an element it should admit.
template <typename T>
__device__ __forceinline__ float admission_bound(unsigned int threshold) {
  return Elem<T>::from_key(threshold + 1u);
}

// Online logsumexp state of one thread: sum_j exp(z_j - m) with m the running max (-inf when empty).
struct Lse {
  float m = -INFINITY, s = 0.f;
  __device__ __forceinline__ void add_max(float new_m) {
    if (new_m > m) {  // false for NaN: a NaN z makes s NaN below
      s *= __expf(m - new_m);
      m = new_m;
    }
  }
  __device__ __forceinline__ void add(float z) {
    if (m != -INFINITY || z != -INFINITY) s += __expf(z - m);
  }
  __device__ __forceinline__ void merge(float om, float os) {
    const float new_m = fmaxf(m, om);
    if (new_m == -INFINITY) return;
    s = s * __expf(m - new_m) + os * __expf(om - new_m);
    m = new_m;
  }
};

// Compacts the buffer to its top k and raises the threshold. Called by the whole block.
__device__ __forceinline__ void compact(unsigned long long* buffer, TopkShared& sh, int k, int nbits,
                                       int idx_bits) {
  unsigned long long prefix, mask;
  radix_select(buffer, sh.count, k, nbits, sh.select, prefix, mask);
  const unsigned long long kth = gather_selected(buffer, sh.count, prefix, mask, sh.scratch, sh.select);
  for (int i = threadIdx.x; i < k; i += blockDim.x) buffer[i] = sh.scratch[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    sh.count = k;
    sh.threshold = static_cast<unsigned int>(kth >> idx_bits);
  }
  __syncthreads();
}

// Filters kN consecutive elements (bits, ids first..first+kN) of one thread: the probs pass adds them to
// the thread's logsumexp; the admitted ones go to the buffer. Only a warp with an admitted element pays for
// the keys and ballots. Every lane of the warp must call it.
template <typename T, bool kProbs, int kN>
__device__ __forceinline__ void filter(const uint32_t (&bits)[kN], int64_t first, bool active, float bound,
                                       float inv_t, int idx_bits, Lse& lse, unsigned long long* buffer,
                                       int* count) {
  float x[kN];
  bool admit[kN];
  bool any = false;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    x[j] = Elem<T>::to_float(bits[j]);
    admit[j] = active && !(x[j] < bound);
    any |= admit[j];
  }
  if (kProbs && active) {
    float vmax = -INFINITY;
#pragma unroll
    for (int j = 0; j < kN; ++j) vmax = fmaxf(vmax, x[j] * inv_t);
    lse.add_max(vmax);
#pragma unroll
    for (int j = 0; j < kN; ++j) lse.add(x[j] * inv_t);
  }
  if (!__any_sync(kFullMask, any)) return;
#pragma unroll
  for (int j = 0; j < kN; ++j) offer(admit[j], composite(Elem<T>::key(bits[j]), first + j, idx_bits), buffer, count);
}

// Between tiles: compacts when one more tile could overflow the buffer. The count is read between two
// barriers: the first waits for the previous tile's appends, the second keeps the next tile's appends from
// changing it before every thread has read it (the decision must be block-uniform).
__device__ __forceinline__ void compact_if_full(unsigned long long* buffer, TopkShared& sh, int limit, int k,
                                               int nbits, int idx_bits) {
  __syncthreads();
  const bool full = sh.count > limit;
  __syncthreads();
  if (full) compact(buffer, sh, k, nbits, idx_bits);
}

template <typename T, bool kProbs>
static __global__ void __launch_bounds__(kTopkBlock, kTopkMinBlocks) topk_rows_kernel(const T* __restrict__ logits, TopkParams P) {
  constexpr int kVec = Vec<T>::kVec;
  extern __shared__ unsigned long long buffer[];
  __shared__ TopkShared sh;

  const int64_t row = blockIdx.x;
  const T* row_ptr = logits + row * P.vocab;
  const int k = P.k, idx_bits = P.idx_bits;
  const int nbits = (Elem<T>::kKeyBits + idx_bits + 7) / 8 * 8;
  const float inv_t = P.inv_temperature;
  if (threadIdx.x == 0) {
    sh.count = 0;
    sh.threshold = 0;  // no element has key 0 (that would be a NaN bit pattern): admit all
  }
  Lse lse;

  // Scalar tiles: the < kVec elements before the first aligned address, and after the last full vector.
  constexpr int kLimit = TopkTile<T>::kCapacity - TopkTile<T>::kElems;
  auto scalar_tile = [&](int64_t first, int64_t n) {
    compact_if_full(buffer, sh, kLimit, k, nbits, idx_bits);
    const bool active = threadIdx.x < n;
    const uint32_t bits[1] = {active ? Elem<T>::load_bits(row_ptr + first + threadIdx.x) : 0u};
    filter<T, kProbs, 1>(bits, first + threadIdx.x, active, admission_bound<T>(sh.threshold), inv_t, idx_bits,
                         lse, buffer, &sh.count);
  };

  const int64_t head = misaligned_head(row_ptr, P.vocab);
  const int64_t nvec = (P.vocab - head) / kVec;
  const uint4* body = reinterpret_cast<const uint4*>(row_ptr + head);
  constexpr int kTileVecs = kTopkBlock * kTopkUnroll;
  const int64_t ntiles = (nvec + kTileVecs - 1) / kTileVecs;

  if (head > 0) scalar_tile(0, head);

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

    if (t == 0 && nvec >= kTileVecs) {
      // Seed: the k-th largest per-thread maximum of the first full tile. At least k elements reach its
      // key, so every element with a smaller key anywhere in the row is out.
      unsigned long long best = 0;
#pragma unroll
      for (int u = 0; u < kTopkUnroll; ++u) {
        const int64_t first = head + (static_cast<int64_t>(u) * kTopkBlock + threadIdx.x) * kVec;
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const unsigned long long c = composite(Elem<T>::key(Vec<T>::bits(cur[u], j)), first + j, idx_bits);
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
    const float bound = admission_bound<T>(sh.threshold);
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) {
      const int64_t vi = t * kTileVecs + u * kTopkBlock + threadIdx.x;
      uint32_t bits[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) bits[j] = Vec<T>::bits(cur[u], j);
      filter<T, kProbs, kVec>(bits, head + vi * kVec, vi < nvec, bound, inv_t, idx_bits, lse, buffer, &sh.count);
    }
#pragma unroll
    for (int u = 0; u < kTopkUnroll; ++u) cur[u] = nxt[u];
  }

  const int64_t tail = head + nvec * kVec;
  if (tail < P.vocab) scalar_tile(tail, P.vocab - tail);
  compact_if_full(buffer, sh, k, k, nbits, idx_bits);

  // Rank order: the rank of a kept composite is the number of larger kept composites (all distinct).
  if (threadIdx.x < k) {
    const unsigned long long c = buffer[threadIdx.x];
    int rank = 0;
    for (int j = 0; j < k; ++j) rank += buffer[j] > c;
    sh.scratch[rank] = c;
  }
  float lse_row = 0.f;
  if (kProbs) {
    // Block logsumexp of the per-thread (max, sum) pairs: warp tree, then warp 0 over the warp results.
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
    lse_row = total.m == -INFINITY ? -INFINITY : total.m + __logf(total.s);
    if (threadIdx.x == 0) P.row_lse[row] = lse_row;
  }
  __syncthreads();

  const int r = threadIdx.x;
  const bool slot = r < k;
  const unsigned long long id_mask = (1ull << idx_bits) - 1;
  const int64_t id = slot ? static_cast<int64_t>(id_mask - (sh.scratch[r] & id_mask)) : 0;
  const float x = slot ? load_float(row_ptr + id) : 0.f;
  float a = x;
  if (P.values_mode == kValuesProbs) {
    a = __expf(x * inv_t - lse_row);
  } else if (P.values_mode == kValuesTopkProbs) {
    const float top = load_float(row_ptr + (id_mask - (sh.scratch[0] & id_mask))) * inv_t;
    const float e = slot ? __expf(x * inv_t - top) : 0.f;
    a = e / block_sum1(e, sh.reduce);
  }
  if (!slot) a = 0.f;
  const float s = block_sum1(a, sh.reduce);

  const int64_t g = graph_of(P.row_graph, row, P.num_graphs);
  if (slot) {
    P.kept_ids[row * k + r] = id;
    P.kept_values[row * k + r] = g >= 0 ? a : 0.f;
    if (g >= 0) {
      const int64_t at = g * P.num_nodes + (P.nodes_mode == kNodesVocab ? id : r);
      P.touched[at] = true;
      if (P.scatter_kind == kScatterDegrees) {
        const float scale = P.row_counts ? 1.f / static_cast<float>(P.row_counts[g]) : 1.f;
        atomicAdd(P.scatter_out + at, a * s * scale);
      } else if (P.scatter_kind == kScatterSquares) {
        atomicAdd(P.scatter_out + at, a * a);
      }
    }
  }
}

// ---- per-row kernels over the kept entries (one warp per row) ----------------------------------------

struct KeptRows {
  const float* kept_values;  // (rows, k)
  const int64_t* kept_ids;   // (rows, k)
  const int64_t* row_graph;  // (rows,)
  int64_t rows;
  int k;
  int64_t num_graphs, num_nodes;
  int nodes_mode;
  const int* row_counts;  // mean: per-graph valid row counts; null otherwise
  const float* diag;      // cosine: D = sum_p a_p^2 per (graph, node); null otherwise
};

enum ContribKind { kContribDegrees = 0, kContribSquares = 1, kContribCosine = 2 };

// One row's kept slots, spread over the lanes of a warp: slot r = lane + 32 i.
struct WarpRow {
  float a[kMaxKPerLane];
  int64_t at[kMaxKPerLane];  // flat (graph, node) index
  int64_t g;

  __device__ __forceinline__ void load(const KeptRows& R, int64_t row) {
    const int lane = threadIdx.x % kWarp;
    g = graph_of(R.row_graph, row, R.num_graphs);
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      const bool slot = r < R.k && g >= 0;
      a[i] = slot ? R.kept_values[row * R.k + r] : 0.f;
      const int64_t node = R.nodes_mode == kNodesVocab ? (slot ? R.kept_ids[row * R.k + r] : 0) : r;
      at[i] = slot ? g * R.num_nodes + node : -1;
    }
  }
  // w = D^-1/2 of each slot's node (0 where D == 0), as the reference.
  __device__ __forceinline__ float cosine_weight(const KeptRows& R, int i) const {
    if (at[i] < 0) return 0.f;
    const float d = R.diag[at[i]];
    return d > 0.f ? rsqrtf(d) : 0.f;
  }
  __device__ __forceinline__ float sum(const float (&v)[kMaxKPerLane]) const {
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) t += v[i];
    return warp_sum(t);
  }
};

// Degree contributions of each kept slot: a*s/c (degrees), a^2 (cosine diagonal) or ã*s̃ (cosine degrees,
// ã = a w). Either scatter-added into atomic_out (G, num_nodes) or written to contrib_out (rows, k) with
// keys_out = flat (graph, node) index (LLONG_MAX for masked rows, so they sort last) for the deterministic
// reduction.
static __global__ void rows_contrib_kernel(KeptRows R, int kind, float* atomic_out, float* contrib_out,
                                    int64_t* keys_out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < R.rows;
       row += warps) {
    WarpRow w;
    w.load(R, row);
    if (kind == kContribCosine) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) w.a[i] *= w.cosine_weight(R, i);
    }
    const float s = w.sum(w.a);
    const float scale = (kind == kContribDegrees && R.row_counts && w.g >= 0)
                            ? 1.f / static_cast<float>(R.row_counts[w.g])
                            : 1.f;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      if (r >= R.k) break;
      const float c = kind == kContribSquares ? w.a[i] * w.a[i] : w.a[i] * s * scale;
      if (atomic_out) {
        if (w.at[i] >= 0) atomicAdd(atomic_out + w.at[i], c);
      } else {
        contrib_out[row * R.k + r] = c;
        if (keys_out) keys_out[row * R.k + r] = w.at[i] >= 0 ? w.at[i] : LLONG_MAX;
      }
    }
  }
}

// out[slot] = sum of contrib[order[i]] over the i with sorted_keys[i] == slot, one warp per slot, lanes
// strided and a fixed shuffle tree: the same bits on every run.
static __global__ void segment_sum_kernel(const int64_t* __restrict__ sorted_keys, const int64_t* __restrict__ order,
                                   int64_t entries, const float* __restrict__ contrib, int64_t slots,
                                   float* __restrict__ out) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t slot = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; slot < slots;
       slot += warps) {
    const int64_t lo = lower_bound(sorted_keys, entries, slot);
    const int64_t hi = lower_bound(sorted_keys, entries, slot + 1);
    float t = 0.f;
    for (int64_t i = lo + lane; i < hi; i += kWarp) t += contrib[order[i]];
    t = warp_sum(t);
    if (lane == 0) out[slot] = t;
  }
}

// ---- backward -------------------------------------------------------------------------------------------
//
// With γ = grad_degrees[g, node] per slot, s = Σ a, the gradient w.r.t. the node values is
//   mean/sum: ga_r = (γ_r s + Σ_r' a_r' γ_r') / c
//   cosine:   gã_r = γ_r s̃ + Σ_r' ã_r' γ_r' (ã = a w, w = D^-1/2); gw[g, n] = Σ gã a over the slots of n;
//             ga_r = w (gã_r - a_r gw[n] w²)   (through w = D^-1/2 and D = Σ a²).
// Then to the logits: logits: gx[id_r] = ga_r; topk_probs: gx[id_r] = a_r (ga_r - Σ ga a) / T;
// probs: gx_j = -p_j q / T for every j, q = Σ ga a, and gx[id_r] = a_r (ga_r - q) / T at the kept ids.

enum BackwardStage { kStageGrad = 0, kStageCosineGw = 1, kStageCosineGrad = 2 };

struct BackwardRows {
  KeptRows kept;
  const float* grad_degrees;  // (G, num_nodes)
  float* gw;                  // cosine: (G, num_nodes)
  int cosine;
  int values_mode;
  float inv_temperature;
  int64_t vocab;
};

// Stage kStageCosineGw scatters gw; kStageGrad / kStageCosineGrad write the logits gradient of the k-sparse
// modes into grad_logits (zero-filled beforehand) or, for probs, ga into grad_a (rows, k).
template <typename T>
static __global__ void degrees_backward_rows_kernel(BackwardRows B, int stage, T* grad_logits, float* grad_a) {
  const KeptRows& R = B.kept;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp; row < R.rows;
       row += warps) {
    WarpRow w;
    w.load(R, row);
    if (w.g < 0) {
      if (grad_a && stage != kStageCosineGw) {
        for (int r = lane; r < R.k; r += kWarp) grad_a[row * R.k + r] = 0.f;
      }
      continue;
    }
    float gamma[kMaxKPerLane], weight[kMaxKPerLane], v[kMaxKPerLane], ga[kMaxKPerLane];
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      gamma[i] = w.at[i] >= 0 ? B.grad_degrees[w.at[i]] : 0.f;
      weight[i] = B.cosine ? w.cosine_weight(R, i) : 1.f;
      v[i] = w.a[i] * weight[i];  // ã for cosine, a otherwise
    }
    float vg[kMaxKPerLane];
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) vg[i] = v[i] * gamma[i];
    const float s = w.sum(v), t = w.sum(vg);
    const float scale = (!B.cosine && R.row_counts) ? 1.f / static_cast<float>(R.row_counts[w.g]) : 1.f;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) ga[i] = (gamma[i] * s + t) * scale;
    if (stage == kStageCosineGw) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) {
        if (w.at[i] >= 0) atomicAdd(B.gw + w.at[i], ga[i] * w.a[i]);
      }
      continue;
    }
    if (stage == kStageCosineGrad) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) {
        const float gw = w.at[i] >= 0 ? B.gw[w.at[i]] : 0.f;
        ga[i] = weight[i] * (ga[i] - w.a[i] * gw * weight[i] * weight[i]);
      }
    }
    if (grad_a) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) {
        const int r = lane + kWarp * i;
        if (r < R.k) grad_a[row * R.k + r] = ga[i];
      }
      continue;
    }
    float q = 0.f;
    if (B.values_mode == kValuesTopkProbs) {
      float gaa[kMaxKPerLane];
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) gaa[i] = ga[i] * w.a[i];
      q = w.sum(gaa);
    }
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      if (r >= R.k) break;
      const float gx =
          B.values_mode == kValuesTopkProbs ? w.a[i] * (ga[i] - q) * B.inv_temperature : ga[i];
      store_float(grad_logits + row * B.vocab + R.kept_ids[row * R.k + r], gx);
    }
  }
}

constexpr int kDenseBlock = 256;

// values="probs": the dense softmax part of the logits gradient, one block per row, one write per logit
// (and one read of the logits to recompute p_j); masked rows get zeros.
template <typename T>
static __global__ void __launch_bounds__(kDenseBlock)
    probs_backward_kernel(const T* __restrict__ logits, const float* __restrict__ row_lse,
                          const int64_t* __restrict__ row_graph, int64_t num_graphs,
                          const float* __restrict__ kept_values, const int64_t* __restrict__ kept_ids,
                          const float* __restrict__ grad_a, int k, int64_t vocab, float inv_temperature,
                          T* __restrict__ grad_logits) {
  constexpr int kVec = Vec<T>::kVec;
  __shared__ float reduce[kDenseBlock / kWarp];
  const int64_t row = blockIdx.x;
  const bool valid = graph_of(row_graph, row, num_graphs) >= 0;
  const int r = threadIdx.x;
  const float a = (valid && r < k) ? kept_values[row * k + r] : 0.f;
  const float ga = (valid && r < k) ? grad_a[row * k + r] : 0.f;
  const float q = block_sum1(a * ga, reduce);
  const float lse = row_lse[row];
  const float coef = -q * inv_temperature;
  const T* x = logits + row * vocab;
  T* gx = grad_logits + row * vocab;
  auto dense = [&](uint32_t bits) {
    return valid ? coef * __expf(Elem<T>::to_float(bits) * inv_temperature - lse) : 0.f;
  };
  const int64_t head = misaligned_head(gx, vocab);
  // logits and grad rows share the alignment only when both bases do; otherwise go scalar.
  const bool vectors = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(gx)) & 15) == 0;
  const int64_t nvec = vectors ? (vocab - head) / kVec : 0;
  const int64_t body_end = vectors ? head + nvec * kVec : 0;
  for (int64_t j = threadIdx.x; j < (vectors ? head : vocab); j += blockDim.x) {
    store_float(gx + j, dense(Elem<T>::load_bits(x + j)));
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* gv = reinterpret_cast<uint4*>(gx + head);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 in = __ldcs(xv + i);
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = dense(Vec<T>::bits(in, j));
    __stcs(gv + i, pack_vec<T>(out));
  }
  for (int64_t j = body_end + threadIdx.x; vectors && j < vocab; j += blockDim.x) {
    store_float(gx + j, dense(Elem<T>::load_bits(x + j)));
  }
  __syncthreads();  // the kept ids below overwrite values written by other threads of the block
  if (valid && r < k) store_float(gx + kept_ids[row * k + r], a * (ga - q) * inv_temperature);
}

// ---- launchers (host) -------------------------------------------------------------------------------------

constexpr int kRowsBlock = 256;  // 8 rows (warps) per block in the warp-per-row kernels

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

inline unsigned warp_rows_grid(int64_t rows) { return grid_for(rows, kRowsBlock / kWarp); }

inline cudaError_t launch_rows_contrib(const KeptRows& R, int kind, float* atomic_out, float* contrib_out,
                                       int64_t* keys_out, cudaStream_t stream) {
  rows_contrib_kernel<<<warp_rows_grid(R.rows), kRowsBlock, 0, stream>>>(R, kind, atomic_out, contrib_out,
                                                                          keys_out);
  return cudaGetLastError();
}

inline cudaError_t launch_segment_sum(const int64_t* sorted_keys, const int64_t* order, int64_t entries,
                                      const float* contrib, int64_t slots, float* out, cudaStream_t stream) {
  segment_sum_kernel<<<warp_rows_grid(slots), kRowsBlock, 0, stream>>>(sorted_keys, order, entries, contrib,
                                                                        slots, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_degrees_backward_rows(const BackwardRows& B, int stage, T* grad_logits, float* grad_a,
                                         cudaStream_t stream) {
  degrees_backward_rows_kernel<T><<<warp_rows_grid(B.kept.rows), kRowsBlock, 0, stream>>>(B, stage, grad_logits,
                                                                                         grad_a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_probs_backward(const T* logits, const float* row_lse, const int64_t* row_graph,
                                  int64_t num_graphs, const float* kept_values, const int64_t* kept_ids,
                                  const float* grad_a, int k, int64_t rows, int64_t vocab,
                                  float inv_temperature, T* grad_logits, cudaStream_t stream) {
  probs_backward_kernel<T><<<static_cast<unsigned>(rows), kDenseBlock, 0, stream>>>(
      logits, row_lse, row_graph, num_graphs, kept_values, kept_ids, grad_a, k, vocab, inv_temperature,
      grad_logits);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
