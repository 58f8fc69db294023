// The single pass of the top-k selecting kernel over one row (csrc/cuda/topk_degrees.cuh): a threshold filter
// that appends candidates to a shared-memory buffer, and a block radix select that compacts the buffer to the
// top k. Torch-free, like every .cuh here.
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
  // Room for one tile's worth of new candidates on top of up to 4 * kCudaMaxK held ones: compaction runs only
  // once more than 1024 candidates have piled up, so even k = 256 compacts every few tiles, not every tile.
  // 79 KB of shared memory per block for 16-bit logits (two blocks fit an A100 or H100 SM), 46 KB for fp32.
  static constexpr int kCapacity = kElems + 4 * kCudaMaxK;
  static constexpr size_t kSmemBytes = kCapacity * sizeof(unsigned long long);
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

// ---- the candidate buffer ------------------------------------------------------------------------------

// Shared memory of the selecting kernel besides the candidate buffer itself.
struct TopkShared {
  SelectShared select;
  unsigned long long scratch[kTopkBlock];  // per-thread seeds, then the selected set, then rank order
  int count;                               // candidates in the buffer
  unsigned int threshold;                  // an element may be in the top k only if its key > threshold
  float reduce[2 * (kTopkBlock / kWarp)];
  double reduce64[kTopkBlock / kWarp];
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

}  // namespace cuda
}  // namespace infigw
