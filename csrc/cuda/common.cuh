// Device helpers shared by the infigw CUDA kernels. Torch-free (CUDA headers only) so that every kernel
// body compiles with a bare `nvcc -c` (tests/test_cuda_compile.py); the torch bindings are the *.cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "contract.h"
#include "formulas.h"

namespace infigw {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarp = 32;
// A row's kept set lives in one block (one slot per thread) or in one warp's registers (this many per lane).
constexpr int kMaxKPerLane = kCudaMaxK / kWarp;

// ---- element types: raw bits, order-preserving keys, conversions ------------------------------------

// Raw<T>::bits(x) are the storage bits of x; key(bits) maps them to an unsigned integer whose order is the
// contract's value order: -0 equals +0 (so they tie and the smaller id wins, as in the reference) and every
// NaN maps to the largest key (NaN ranks above every number).
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kKeyBits = 32;
  __device__ __forceinline__ static uint32_t key(uint32_t u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0xffffffffu;  // NaN
    if (u == 0x80000000u) u = 0;                                // -0 -> +0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  // Inverse of key() (up to the -0 and NaN canonicalisation), as a float.
  __device__ __forceinline__ static float from_key(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
  }
  __device__ __forceinline__ static float to_float(uint32_t u) { return __uint_as_float(u); }
  __device__ __forceinline__ static uint32_t load_bits(const float* p) {
    return __float_as_uint(*p);
  }
  __device__ __forceinline__ static uint32_t bits_of(float v) { return __float_as_uint(v); }
};

// The 16-bit formats share their keys; they differ in where infinity lies and in how their bits widen to fp32.
template <typename T, uint32_t kInfBits>
struct Elem16 {
  static constexpr int kKeyBits = 16;
  __device__ __forceinline__ static uint32_t key(uint32_t u) {
    if ((u & 0x7fffu) > kInfBits) return 0xffffu;  // NaN
    if (u == 0x8000u) u = 0;                       // -0 -> +0
    return (u & 0x8000u) ? (~u & 0xffffu) : (u | 0x8000u);
  }
  // Inverse of key() (up to the -0 and NaN canonicalisation), as raw bits.
  __device__ __forceinline__ static uint32_t bits_of_key(uint32_t k) {
    k &= 0xffffu;
    return (k & 0x8000u) ? (k & 0x7fffu) : (~k & 0xffffu);
  }
  __device__ __forceinline__ static uint32_t load_bits(const T* p) {
    return *reinterpret_cast<const unsigned short*>(p);
  }
};

template <>
struct Elem<__half> : Elem16<__half, 0x7c00u> {
  __device__ __forceinline__ static float to_float(uint32_t u) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(u)));
  }
  __device__ __forceinline__ static float from_key(uint32_t k) { return to_float(bits_of_key(k)); }
  __device__ __forceinline__ static uint32_t bits_of(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Elem<__nv_bfloat16> : Elem16<__nv_bfloat16, 0x7f80u> {
  __device__ __forceinline__ static float to_float(uint32_t u) { return __uint_as_float(u << 16); }
  __device__ __forceinline__ static float from_key(uint32_t k) { return to_float(bits_of_key(k)); }
  __device__ __forceinline__ static uint32_t bits_of(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

// 16-byte vectors: kVec elements per uint4, element j's bits extracted from the little-endian words.
template <typename T>
struct Vec {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  __device__ __forceinline__ static uint32_t bits(const uint4& v, int j) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    if (sizeof(T) == 4) return w[j];
    return (w[j >> 1] >> (16 * (j & 1))) & 0xffffu;
  }
};

template <typename T>
__device__ __forceinline__ float load_float(const T* p) {
  return Elem<T>::to_float(Elem<T>::load_bits(p));
}

template <typename T>
__device__ __forceinline__ void store_float(T* p, float v) {
  if (sizeof(T) == 4) *reinterpret_cast<uint32_t*>(p) = Elem<T>::bits_of(v);
  else *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(Elem<T>::bits_of(v));
}

// Packs kVec floats, rounded to T, into one 16-byte vector.
template <typename T>
__device__ __forceinline__ uint4 pack_vec(const float* v) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < Vec<T>::kVec; ++j) {
    if (sizeof(T) == 4) w[j] = Elem<T>::bits_of(v[j]);
    else w[j >> 1] |= Elem<T>::bits_of(v[j]) << (16 * (j & 1));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Elements of row `row` before the first 16-byte aligned address (the row is then read as uint4 from there).
template <typename T>
__device__ __forceinline__ int64_t misaligned_head(const T* row, int64_t length) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(row);
  const int64_t head = static_cast<int64_t>(((16 - (address & 15)) & 15) / sizeof(T));
  return head < length ? head : length;
}

// ---- deterministic reductions (fixed shuffle trees, so every run gives the same bits) ----------------

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over the block of NV values per thread; every thread gets the totals. `scratch` holds
// NV * (blockDim.x / 32) values of A; blockDim.x is a multiple of 32. Ends with a barrier-safe state.
template <typename A, int NV>
__device__ __forceinline__ void block_sum(A (&v)[NV], A* scratch) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) scratch[i * warps + warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    A total = 0;
    for (int w = 0; w < warps; ++w) total += scratch[i * warps + w];
    v[i] = total;
  }
}

template <typename A>
__device__ __forceinline__ A block_sum1(A v, A* scratch) {
  A values[1] = {v};
  block_sum<A, 1>(values, scratch);
  return values[0];
}

// ---- small utilities --------------------------------------------------------------------------------

// atomicMax for floats of either sign on a buffer initialised to 0 or -inf: non-negative floats order like their
// bits as signed ints, negative ones in reverse of their bits as unsigned ints. Order-free, so deterministic.
__device__ __forceinline__ void atomic_max_float(float* address, float v) {
  if (v >= 0.f) atomicMax(reinterpret_cast<int*>(address), __float_as_int(v));
  else atomicMin(reinterpret_cast<unsigned int*>(address), __float_as_uint(v));
}

// First position in sorted[0, n) whose value is >= key.
__device__ __forceinline__ int64_t lower_bound(const int64_t* sorted, int64_t n, int64_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (sorted[mid] < key) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Graph of a row, or -1 when the row is masked (row_graph < 0). Rows with an out-of-range graph index are
// treated as masked so that no kernel writes out of bounds; the Python layer rejects such input.
__device__ __forceinline__ int64_t graph_of(const int64_t* row_graph, int64_t row, int64_t num_graphs) {
  const int64_t g = row_graph[row];
  return (g >= 0 && g < num_graphs) ? g : -1;
}

// Grid for `work` items of `per_block` each, capped for grid-stride loops.
inline unsigned grid_for(int64_t work, int per_block, int64_t cap = 65535LL * 32) {
  int64_t blocks = (work + per_block - 1) / per_block;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

// counts[g] += 1 for every valid row of graph g (counts zeroed by the caller): c_g of the mean norm.
static __global__ void count_rows_kernel(const int64_t* __restrict__ row_graph, int64_t rows, int64_t num_graphs,
                                         int* __restrict__ counts) {
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; row < rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t g = graph_of(row_graph, row, num_graphs);
    if (g >= 0) atomicAdd(counts + g, 1);
  }
}

inline cudaError_t launch_count_rows(const int64_t* row_graph, int64_t rows, int64_t num_graphs, int* counts,
                                     cudaStream_t stream) {
  constexpr int kBlock = 256;
  count_rows_kernel<<<grid_for(rows, kBlock), kBlock, 0, stream>>>(row_graph, rows, num_graphs, counts);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
