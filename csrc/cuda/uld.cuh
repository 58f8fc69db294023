// Full-vocabulary ULD on the GPU (docs/math.md §7): the exact sorted L1 of softmax(x / T) against the partner
// teacher row, and its gradient. Torch-free kernel bodies and launchers; the torch binding is uld.cu.
//
// The algorithm of csrc/cpu/sorted_prob_l1.h, in four steps over a chunk of student rows (one block per row):
//   1. uld_bins_kernel: the logsumexps (one online pass per row, unless given), a histogram of the IEEE bits of
//      both rows' probabilities in shared memory (kUldBins bins), each bin's sign from the counts above it (+1
//      or -1 where the student's and the teacher's ranks in the bin do not overlap, 0 = mixed), and a second
//      pass that sums s * value over the entries of decided bins and appends the entries of mixed bins to the
//      row's segment of a scratch buffer (keys, and ids for the student);
//   2. launch_uld_sort: CUB's segmented radix sort of the mixed entries of every row, descending;
//   3. uld_resolve_kernel: each mixed entry finds, by binary search in both sorted segments, how many entries
//      of each list lie above its value and at it, hence the mean sign of its ranks (the tie rule); the first
//      entry of each value adds its share of the loss; the student's signs go to a dense scratch row;
//   4. uld_grad_kernel (backward): dL/dx_j = g p_j (s_j - sum_i p_i s_i) / T, s_j from the bin table or the
//      scratch row.
// No host synchronisation: segment sizes stay on the device (CUB takes begin and end offsets); the binding
// processes the rows in chunks so that the scratch stays bounded (no (N, V) temporary beyond one per tensor).
#pragma once

#include <cub/device/device_segmented_radix_sort.cuh>

#include "common.cuh"

namespace infigw {
namespace cuda {

constexpr int kUldBlock = 512;
// Bins of the IEEE bits of a non-negative float: 16 per binade (4 mantissa bits), 4081 up to +inf, two counts
// each in 32 KB of shared memory.
constexpr int kUldBinShift = 19;
constexpr uint32_t kUldInfinityKey = 0x7f800000u;
constexpr int kUldBins = static_cast<int>(kUldInfinityKey >> kUldBinShift) + 1;
constexpr int kUldKeyBits = 31;  // keys of non-negative floats have the sign bit 0

// One chunk of rows of a ULD call. Row-indexed arrays of the call are global (index row_begin + r); the scratch
// arrays hold one segment per chunk row (index r), `vocab` (student) or `teacher_vocab` entries each.
struct UldChunk {
  int64_t row_begin, rows;
  int64_t vocab, teacher_vocab, teacher_rows;
  const int64_t* partner;   // (N,); entries outside [0, teacher_rows) count as -1 (the binding's callers check)
  const void* teacher;      // (M, teacher_vocab): logits of the student's type, or float probabilities
  bool teacher_probs;
  float inv_temperature;
  bool compute_lse;         // forward: compute the logsumexps; backward: read them
  float* student_lse;       // (N,)
  float* teacher_lse;       // (N,)
  int8_t* signs;            // (rows, kUldBins)
  int* above;               // (rows, 2, kUldBins): entries of the student / teacher in higher bins
  uint32_t* mixed_p_keys;   // (rows, vocab), sorted into sorted_p_keys / sorted_p_ids
  uint32_t* mixed_p_ids;
  uint32_t* mixed_q_keys;   // (rows, teacher_vocab), sorted into sorted_q_keys
  uint32_t* sorted_p_keys;
  uint32_t* sorted_p_ids;
  uint32_t* sorted_q_keys;
  int* begin_p;             // (rows,) segment offsets for CUB
  int* end_p;
  int* begin_q;
  int* end_q;
  float* decided_p;         // (rows,) sum of s * p over the student's decided entries
  float* decided_q;         // (rows,) sum of s * q over the teacher's decided entries
  int* invalid;             // (rows,) 1 when a probability is NaN
  float* mixed_signs;       // (rows, vocab) backward: the mean sign of each mixed student entry, else null
};

// The teacher row of a student row, or -1 (also for an index out of range: no kernel reads out of bounds).
__device__ __forceinline__ int64_t uld_partner(const UldChunk& C, int64_t row) {
  const int64_t partner = C.partner[row];
  return partner >= 0 && partner < C.teacher_rows ? partner : -1;
}

__device__ __forceinline__ uint32_t uld_key(float p) {
  const uint32_t bits = __float_as_uint(p);
  return p == 0.0f ? 0u : bits;  // -0 -> 0; NaN (and negative numbers) above kUldInfinityKey
}

template <typename T>
__device__ __forceinline__ float teacher_value(const UldChunk& C, int64_t row, int64_t j) {
  if (C.teacher_probs) return static_cast<const float*>(C.teacher)[row * C.teacher_vocab + j];
  return load_float(static_cast<const T*>(C.teacher) + row * C.teacher_vocab + j);
}

// max and sum of exp(x * s - max) of (m, s) pairs.
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float high = fmaxf(m, m2);
  if (high == -INFINITY) return;
  s = (m == -INFINITY ? 0.0f : s * __expf(m - high)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - high));
  m = high;
}

// logsumexp(row * inv_temperature) over a row by the whole block (online, one read); NaN when the row has one.
template <typename Load>
__device__ float block_logsumexp(Load load, int64_t n, float inv_temperature, float* scratch) {
  float m = -INFINITY, s = 0.0f;
  bool nan = false;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const float z = load(j) * inv_temperature;
    nan |= z != z;
    if (z > m) {  // one exp per entry: the sum is rescaled only when the maximum grows
      s = (m == -INFINITY ? 0.0f : s * __expf(m - z)) + 1.0f;
      m = z;
    } else if (z != -INFINITY) {
      s += __expf(z - m);
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) {
    const float m2 = __shfl_xor_sync(kFullMask, m, offset), s2 = __shfl_xor_sync(kFullMask, s, offset);
    merge_lse(m, s, m2, s2);
  }
  const int warps = blockDim.x / kWarp;
  __syncthreads();
  if (threadIdx.x % kWarp == 0) {
    scratch[threadIdx.x / kWarp] = m;
    scratch[warps + threadIdx.x / kWarp] = s;
  }
  const int any_nan = __syncthreads_or(nan);
  float total_m = -INFINITY, total_s = 0.0f;
  for (int w = 0; w < warps; ++w) merge_lse(total_m, total_s, scratch[w], scratch[warps + w]);
  __syncthreads();
  if (any_nan) return NAN;
  return total_m + __logf(total_s);  // -inf for a row of -inf (then every probability is NaN, as in torch)
}

// counts[bin] += 1 for one entry per lane (bin = kUldBins: none); lanes with the same bin add once, so that the
// shared atomics do not serialise on the few bins that hold most entries. Called by whole warps.
__device__ __forceinline__ void count_bin(uint32_t* counts, int bin) {
  const unsigned peers = __match_any_sync(kFullMask, bin);
  if (bin < kUldBins && static_cast<int>(threadIdx.x % kWarp) == __ffs(peers) - 1) atomicAdd(&counts[bin], __popc(peers));
}

// A slot in the row's mixed segment for each lane that appends (else -1): one shared atomic per warp. Called by
// whole warps.
__device__ __forceinline__ int append_slot(bool append, int* count) {
  const unsigned ballot = __ballot_sync(kFullMask, append);
  if (ballot == 0) return -1;
  const int lane = threadIdx.x % kWarp, leader = __ffs(ballot) - 1;
  int base = 0;
  if (lane == leader) base = atomicAdd(count, __popc(ballot));
  base = __shfl_sync(kFullMask, base, leader);
  return append ? base + __popc(ballot & ((1u << lane) - 1u)) : -1;
}

// Histogram of one list's keys into counts (whole tiles of the block, so that every lane reaches the warp
// collectives); true when an entry is NaN or negative. Called by the whole block.
template <typename Value>
__device__ bool count_entries(Value value_of, int64_t n, uint32_t* counts) {
  bool invalid = false;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const uint32_t key = j < n ? uld_key(value_of(j)) : 0u;
    const bool bad = j < n && key > kUldInfinityKey;
    invalid |= bad;
    count_bin(counts, j < n && !bad ? static_cast<int>(key >> kUldBinShift) : kUldBins);
  }
  return invalid;
}

// sum of s * value over one list's entries in decided bins (s the bin's sign); the entries of mixed bins are
// appended to the row's segment (keys, and ids where given), in any order. Called by the whole block.
template <typename Value>
__device__ float decide_entries(Value value_of, int64_t n, const int8_t* sign, int* count, uint32_t* keys,
                                uint32_t* ids) {
  float sum = 0.0f;
  for (int64_t base = 0; base < n; base += blockDim.x) {
    const int64_t j = base + threadIdx.x;
    const float value = j < n ? value_of(j) : 0.0f;
    const uint32_t key = uld_key(value);
    const int s = j < n ? sign[key >> kUldBinShift] : 1;
    sum += s * value;
    const int slot = append_slot(s == 0, count);
    if (slot >= 0) {
      keys[slot] = key;
      if (ids) ids[slot] = static_cast<uint32_t>(j);
    }
  }
  return sum;
}

// Exclusive prefix sums of two ints over the block in thread order; every thread gets its own.
__device__ __forceinline__ void block_exclusive_scan2(int& a, int& b, int* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  int ia = a, ib = b;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset <<= 1) {
    const int ua = __shfl_up_sync(kFullMask, ia, offset), ub = __shfl_up_sync(kFullMask, ib, offset);
    if (lane >= offset) {
      ia += ua;
      ib += ub;
    }
  }
  __syncthreads();
  if (lane == kWarp - 1) {
    scratch[warp] = ia;
    scratch[warps + warp] = ib;
  }
  __syncthreads();
  int base_a = 0, base_b = 0;
  for (int w = 0; w < warp; ++w) {
    base_a += scratch[w];
    base_b += scratch[warps + w];
  }
  a = base_a + ia - a;
  b = base_b + ib - b;
  __syncthreads();
}

// ---- 1. bins, signs, decided sums and the mixed entries ------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kUldBlock) uld_bins_kernel(const T* __restrict__ student, UldChunk C) {
  __shared__ uint32_t count_p[kUldBins], count_q[kUldBins];
  __shared__ int8_t sign[kUldBins];
  __shared__ float reduce[2 * (kUldBlock / kWarp)];
  __shared__ int scan[2 * (kUldBlock / kWarp)];
  __shared__ int mixed_p, mixed_q;
  const int64_t r = blockIdx.x, row = C.row_begin + r;
  const int64_t partner = uld_partner(C, row);
  const int64_t base_p = r * C.vocab, base_q = r * C.teacher_vocab;
  if (partner < 0) {
    if (threadIdx.x == 0) {
      C.begin_p[r] = C.end_p[r] = static_cast<int>(base_p);
      C.begin_q[r] = C.end_q[r] = static_cast<int>(base_q);
      C.decided_p[r] = C.decided_q[r] = 0.0f;
      C.invalid[r] = 0;
    }
    return;
  }
  const T* x = student + row * C.vocab;
  const float inv_t = C.inv_temperature;
  if (C.compute_lse) {
    const float lse_s = block_logsumexp([&](int64_t j) { return load_float(x + j); }, C.vocab, inv_t, reduce);
    const float lse_t = C.teacher_probs ? 0.0f
        : block_logsumexp([&](int64_t j) { return teacher_value<T>(C, partner, j); }, C.teacher_vocab, inv_t, reduce);
    if (threadIdx.x == 0) {
      C.student_lse[row] = lse_s;
      C.teacher_lse[row] = lse_t;
    }
  }
  __syncthreads();  // the logsumexps written by thread 0 are read below
  const float student_lse = C.student_lse[row], teacher_lse = C.teacher_lse[row];
  const auto p_of = [&](int64_t j) { return __expf(load_float(x + j) * inv_t - student_lse); };
  const auto q_of = [&](int64_t j) {
    return C.teacher_probs ? teacher_value<T>(C, partner, j) : __expf(teacher_value<T>(C, partner, j) * inv_t - teacher_lse);
  };

  for (int b = threadIdx.x; b < kUldBins; b += blockDim.x) count_p[b] = count_q[b] = 0;
  if (threadIdx.x == 0) mixed_p = mixed_q = 0;
  __syncthreads();
  const bool nan = count_entries(p_of, C.vocab, count_p) | count_entries(q_of, C.teacher_vocab, count_q);
  const int any_nan = __syncthreads_or(nan);

  // Signs: thread t owns a run of bins counted from the top; the scan gives the entries above its run.
  const int per_thread = (kUldBins + blockDim.x - 1) / blockDim.x;
  const int top = kUldBins - 1 - static_cast<int>(threadIdx.x) * per_thread;
  int run_p = 0, run_q = 0;
  for (int i = 0; i < per_thread && top - i >= 0; ++i) {
    run_p += count_p[top - i];
    run_q += count_q[top - i];
  }
  int above_p = run_p, above_q = run_q;
  block_exclusive_scan2(above_p, above_q, scan);
  int* above = C.above + r * 2 * kUldBins;
  for (int i = 0; i < per_thread && top - i >= 0; ++i) {
    const int b = top - i;
    const int cp = count_p[b], cq = count_q[b];
    sign[b] = above_q + cq <= above_p ? 1 : (above_p + cp <= above_q ? -1 : 0);
    C.signs[r * kUldBins + b] = sign[b];
    above[b] = above_p;
    above[kUldBins + b] = above_q;
    above_p += cp;
    above_q += cq;
  }
  __syncthreads();

  // Decided entries add s * value; mixed ones go to the row's segments (any order: they are sorted next).
  float sum_p = 0.0f, sum_q = 0.0f;
  if (!any_nan) {
    sum_p = decide_entries(p_of, C.vocab, sign, &mixed_p, C.mixed_p_keys + base_p, C.mixed_p_ids + base_p);
    sum_q = decide_entries(q_of, C.teacher_vocab, sign, &mixed_q, C.mixed_q_keys + base_q, nullptr);
  }
  float sums[2] = {sum_p, sum_q};
  block_sum<float, 2>(sums, reduce);
  __syncthreads();  // the mixed counters are final
  if (threadIdx.x == 0) {
    C.begin_p[r] = static_cast<int>(base_p);
    C.end_p[r] = static_cast<int>(base_p) + mixed_p;
    C.begin_q[r] = static_cast<int>(base_q);
    C.end_q[r] = static_cast<int>(base_q) + mixed_q;
    C.decided_p[r] = sums[0];
    C.decided_q[r] = sums[1];
    C.invalid[r] = any_nan;
  }
}

// ---- 2. the segmented sort -------------------------------------------------------------------------------

// Sorts every row's mixed entries (descending keys; the student's with their ids) into sorted_*. With
// temp = null only sets temp_bytes, the temporary storage CUB needs.
inline cudaError_t launch_uld_sort(void* temp, size_t& temp_bytes, const UldChunk& C, cudaStream_t stream) {
  const int rows = static_cast<int>(C.rows);
  const int items_p = static_cast<int>(C.rows * C.vocab), items_q = static_cast<int>(C.rows * C.teacher_vocab);
  size_t bytes_p = 0, bytes_q = 0;
  // storage = null: CUB only sets the sizes
  const auto sort = [&](void* storage) {
    const cudaError_t err = cub::DeviceSegmentedRadixSort::SortPairsDescending(
        storage, bytes_p, C.mixed_p_keys, C.sorted_p_keys, C.mixed_p_ids, C.sorted_p_ids, items_p, rows, C.begin_p,
        C.end_p, 0, kUldKeyBits, stream);
    if (err != cudaSuccess) return err;
    return cub::DeviceSegmentedRadixSort::SortKeysDescending(storage, bytes_q, C.mixed_q_keys, C.sorted_q_keys,
                                                             items_q, rows, C.begin_q, C.end_q, 0, kUldKeyBits, stream);
  };
  const cudaError_t err = sort(nullptr);
  if (err != cudaSuccess || temp != nullptr) return err == cudaSuccess ? sort(temp) : err;
  temp_bytes = bytes_p > bytes_q ? bytes_p : bytes_q;
  return cudaSuccess;
}

// ---- 3. the mixed entries ----------------------------------------------------------------------------------

// Entries of the descending keys[0, n) that are > key (the first index with keys[i] <= key).
__device__ __forceinline__ int count_above(const uint32_t* keys, int n, uint32_t key) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = lo + (hi - lo) / 2;
    if (keys[mid] > key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Entries of a list above `key` (its mixed segment of n sorted keys, and `above` = the list's entries in bins
// higher than the key's) and at `key`.
__device__ __forceinline__ void ranks_of(const uint32_t* keys, int n, const int* above, uint32_t key, int& higher,
                                         int& equal) {
  const int bin = static_cast<int>(key >> kUldBinShift);
  const int first = count_above(keys, n, key);
  // entries of the key's bin above it: the segment holds every entry of a mixed bin
  const int bin_start = count_above(keys, n, (static_cast<uint32_t>(bin + 1) << kUldBinShift) - 1u);
  higher = above[bin] + (first - bin_start);
  equal = (key == 0u ? n : count_above(keys, n, key - 1u)) - first;
}

// Sums of the signs of the ranks [a, a + ca) of one list, meeting ranks [b, b + cb) of the other at the same
// value (the other list larger before b, smaller from b + cb on).
__device__ __forceinline__ int sign_sum(int a, int ca, int b, int cb) {
  const int equal = max(0, min(a + ca, b + cb) - max(a, b));
  const int below = min(max(b - a, 0), ca);  // ranks meeting a larger entry of the other list
  return (ca - below - equal) - below;
}

// loss (N,) (forward, else null) or dot (rows,) = sum_j p_j s_j and the mixed signs (backward, else null).
__global__ void __launch_bounds__(kUldBlock) uld_resolve_kernel(UldChunk C, float* __restrict__ loss,
                                                                 float* __restrict__ dot) {
  __shared__ float reduce[2 * (kUldBlock / kWarp)];
  const int64_t r = blockIdx.x, row = C.row_begin + r;
  if (uld_partner(C, row) < 0) {
    if (threadIdx.x == 0) {
      if (loss) loss[row] = 0.0f;
      if (dot) dot[r] = 0.0f;
    }
    return;
  }
  const int n_p = C.end_p[r] - C.begin_p[r], n_q = C.end_q[r] - C.begin_q[r];
  const uint32_t* keys_p = C.sorted_p_keys + C.begin_p[r];
  const uint32_t* ids_p = C.sorted_p_ids + C.begin_p[r];
  const uint32_t* keys_q = C.sorted_q_keys + C.begin_q[r];
  const int* above_p = C.above + r * 2 * kUldBins;
  const int* above_q = above_p + kUldBins;
  float loss_part = 0.0f, dot_part = 0.0f;
  for (int i = threadIdx.x; i < n_p; i += blockDim.x) {
    const uint32_t key = keys_p[i];
    int a, ca, b, cb;
    ranks_of(keys_p, n_p, above_p, key, a, ca);
    ranks_of(keys_q, n_q, above_q, key, b, cb);
    const int s = sign_sum(a, ca, b, cb);
    const float value = __uint_as_float(key);
    if (i == count_above(keys_p, n_p, key)) loss_part += s * value;  // the first entry of its value
    const float mean_sign = static_cast<float>(s) / static_cast<float>(ca);
    dot_part += value * mean_sign;
    if (C.mixed_signs) C.mixed_signs[r * C.vocab + ids_p[i]] = mean_sign;
  }
  for (int i = threadIdx.x; i < n_q; i += blockDim.x) {
    const uint32_t key = keys_q[i];
    if (i != count_above(keys_q, n_q, key)) continue;
    int a, ca, b, cb;
    ranks_of(keys_q, n_q, above_q, key, b, cb);
    ranks_of(keys_p, n_p, above_p, key, a, ca);
    loss_part += sign_sum(b, cb, a, ca) * __uint_as_float(key);  // -(signs of p_r - q_r) * q
  }
  float sums[2] = {loss_part, dot_part};
  block_sum<float, 2>(sums, reduce);
  if (threadIdx.x == 0) {
    const bool invalid = C.invalid[r] != 0;
    if (loss) loss[row] = invalid ? NAN : (C.decided_p[r] - C.decided_q[r]) + sums[0];
    if (dot) dot[r] = invalid ? NAN : C.decided_p[r] + sums[1];
  }
}

// ---- 4. the gradient ---------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kUldBlock) uld_grad_kernel(const T* __restrict__ student, UldChunk C,
                                                              const float* __restrict__ grad,
                                                              const float* __restrict__ dot, T* __restrict__ out) {
  __shared__ int8_t sign[kUldBins];
  const int64_t r = blockIdx.x, row = C.row_begin + r;
  T* dst = out + row * C.vocab;
  if (uld_partner(C, row) < 0) {
    for (int64_t j = threadIdx.x; j < C.vocab; j += blockDim.x) store_float(dst + j, 0.0f);
    return;
  }
  for (int b = threadIdx.x; b < kUldBins; b += blockDim.x) sign[b] = C.signs[r * kUldBins + b];
  __syncthreads();
  const T* x = student + row * C.vocab;
  const float lse = C.student_lse[row], total = dot[r];
  const float scale = grad[row] * C.inv_temperature;
  for (int64_t j = threadIdx.x; j < C.vocab; j += blockDim.x) {
    const float p = __expf(load_float(x + j) * C.inv_temperature - lse);
    const uint32_t key = uld_key(p);
    float g;
    if (key > kUldInfinityKey) {
      g = NAN;
    } else {
      const int s = sign[key >> kUldBinShift];
      g = s != 0 ? static_cast<float>(s) : C.mixed_signs[r * C.vocab + j];
    }
    store_float(dst + j, scale * p * (g - total));
  }
}

// ---- launchers -------------------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_uld_bins(const T* student, const UldChunk& C, cudaStream_t stream) {
  uld_bins_kernel<T><<<static_cast<unsigned>(C.rows), kUldBlock, 0, stream>>>(student, C);
  return cudaGetLastError();
}

inline cudaError_t launch_uld_resolve(const UldChunk& C, float* loss, float* dot, cudaStream_t stream) {
  uld_resolve_kernel<<<static_cast<unsigned>(C.rows), kUldBlock, 0, stream>>>(C, loss, dot);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_uld_grad(const T* student, const UldChunk& C, const float* grad, const float* dot, T* out,
                            cudaStream_t stream) {
  uld_grad_kernel<T><<<static_cast<unsigned>(C.rows), kUldBlock, 0, stream>>>(student, C, grad, dot, out);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
