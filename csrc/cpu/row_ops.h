// Row helpers shared by the CPU kernels (topk_degrees.cpp, topk_summary.cpp, uld.cpp): the top-k selection of one
// row with the contract's tie rule, the vectorised exp / logsumexp / softmax of a row, and the huge-page hint for
// fresh (N, V) gradients. Accumulation is in fp32 for fp32/fp16/bf16 rows, fp64 for fp64 rows (gradcheck).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace infigw {
namespace cpu {

// Above this k, insertion into a sorted buffer costs more than nth_element over the row.
constexpr int64_t kBufferMaxK = 128;
// Elements checked against the running k-th value at once; a block without a candidate is skipped whole.
constexpr int64_t kScanBlock = 64;
// Row-parallel loops hand each thread at least this many logits (one row is usually far more).
constexpr int64_t kGrainElements = 16384;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// True when a value v met later in the row (so with a larger id) ranks before u: NaN ranks above every
// number, and equal values keep the earlier (smaller) id first.
template <typename acc_t>
inline bool beats(acc_t v, acc_t u) {
  return std::isnan(v) ? !std::isnan(u) : v > u;
}

// Full rank order (value descending with NaN first, then id ascending).
template <typename acc_t>
inline bool ranks_before(const std::pair<acc_t, int64_t>& a, const std::pair<acc_t, int64_t>& b) {
  const bool na = std::isnan(a.first), nb = std::isnan(b.first);
  if (na != nb) return na;
  if (!na && a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

// Offers (v, j) to the rank-ordered buffer of `count` <= k entries; j exceeds every id already held.
template <typename acc_t>
inline void offer(acc_t* vals, int64_t* ids, int64_t& count, int64_t k, acc_t v, int64_t j) {
  int64_t pos;
  if (count < k) {
    pos = count++;
  } else {
    if (!beats(v, vals[k - 1])) return;
    pos = k - 1;
  }
  while (pos > 0 && beats(v, vals[pos - 1])) {
    vals[pos] = vals[pos - 1];
    ids[pos] = ids[pos - 1];
    --pos;
  }
  vals[pos] = v;
  ids[pos] = j;
}

// Top-k of one row in rank order into vals/ids (k entries).
template <typename scalar_t, typename acc_t>
void select_row(const scalar_t* x, int64_t vocab, int64_t k, acc_t* vals, int64_t* ids,
                std::vector<std::pair<acc_t, int64_t>>& scratch) {
  if (k > kBufferMaxK) {
    scratch.resize(vocab);
    for (int64_t j = 0; j < vocab; ++j) scratch[j] = {static_cast<acc_t>(x[j]), j};
    auto cmp = ranks_before<acc_t>;
    if (k < vocab) std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), cmp);
    std::sort(scratch.begin(), scratch.begin() + k, cmp);
    for (int64_t r = 0; r < k; ++r) {
      vals[r] = scratch[r].first;
      ids[r] = scratch[r].second;
    }
    return;
  }
  int64_t count = 0;
  for (int64_t j = 0; j < k; ++j) offer(vals, ids, count, k, static_cast<acc_t>(x[j]), j);
  for (int64_t start = k; start < vocab; start += kScanBlock) {
    const int64_t end = std::min(vocab, start + kScanBlock);
    const acc_t threshold = vals[k - 1];
    int candidate = 0;  // any element not <= the k-th value (NaN included); vectorises
    for (int64_t j = start; j < end; ++j) candidate |= !(static_cast<acc_t>(x[j]) <= threshold);
    if (!candidate) continue;
    for (int64_t j = start; j < end; ++j) offer(vals, ids, count, k, static_cast<acc_t>(x[j]), j);
  }
}

// Full-row softmax work (probs): exp over every logit, twice per training step, is the most expensive part
// of that mode. A polynomial exp the compiler vectorises (AVX2 clone chosen at load time where the CPU has it)
// replaces a scalar std::exp per element; fp64 rows (gradcheck) keep std::exp.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define INFIGW_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define INFIGW_SIMD_CLONES
#endif
#if defined(__GNUC__) && !defined(__clang__)
// GCC does not if-convert the clamp below under its default -ftrapping-math; nothing here reads FP exceptions.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

// exp(z) for z <= 0 (Cephes expf: z = n ln2 + r, degree-6 polynomial in r, relative error about 2e-7);
// z <= -88 gives 0 (expf underflows there too); NaN propagates.
inline float exp_nonpositive(float z) {
  z = z < -88.0f ? -88.0f : z;
  const float n = (z * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest integer
  const float r = (z - n * 0.693359375f) + n * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e = poly * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;  // 2^n; 0 for n = -127
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return e * two_n;
}

// sum_j exp(x_j / T - shift), shift >= max_j x_j / T.
static INFIGW_SIMD_CLONES float sum_exp(const float* x, int64_t n, float temperature, float shift) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_nonpositive(x[j] / temperature - shift);
  return sum;
}

// out_j = scale * exp(x_j / T - shift), shift >= max_j x_j / T.
static INFIGW_SIMD_CLONES void scaled_exp(const float* x, int64_t n, float temperature, float shift, float scale,
                                   float* out) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) out[j] = scale * exp_nonpositive(x[j] / temperature - shift);
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

// The row as fp32: itself for fp32 logits, else converted into `buffer`.
template <typename scalar_t>
const float* as_float_row(const scalar_t* row, int64_t n, std::vector<float>& buffer) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    return row;
  } else {
    buffer.resize(n);
    for (int64_t j = 0; j < n; ++j) buffer[j] = static_cast<float>(row[j]);
    return buffer.data();
  }
}

// logsumexp(x / T) over the row given its maximum (the first kept value), as torch.logsumexp computes it.
template <typename scalar_t, typename acc_t>
acc_t row_logsumexp(const scalar_t* row, int64_t vocab, acc_t max_value, acc_t temperature,
                    std::vector<float>& buffer) {
  const acc_t shift = max_value / temperature;
  if (!std::isfinite(shift)) return shift;  // NaN, or an infinite maximum (as torch.logsumexp)
  acc_t sum = 0;
  if constexpr (std::is_same<acc_t, double>::value) {
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(static_cast<acc_t>(row[j]) / temperature - shift);
  } else {
    sum = sum_exp(as_float_row(row, vocab, buffer), vocab, temperature, shift);
  }
  return shift + std::log(sum);
}

// dst_j = scale * exp(x_j / T - lse) over the row (the dense part of the probs gradient).
template <typename scalar_t, typename acc_t>
void scaled_softmax_row(const scalar_t* row, int64_t vocab, acc_t temperature, acc_t lse, acc_t scale, scalar_t* dst,
                        std::vector<float>& in, std::vector<float>& out) {
  if constexpr (std::is_same<acc_t, double>::value) {
    for (int64_t j = 0; j < vocab; ++j) dst[j] = scale * std::exp(row[j] / temperature - lse);
  } else if constexpr (std::is_same<scalar_t, float>::value) {
    scaled_exp(row, vocab, temperature, lse, scale, dst);
  } else {
    out.resize(vocab);
    scaled_exp(as_float_row(row, vocab, in), vocab, temperature, lse, scale, out.data());
    for (int64_t j = 0; j < vocab; ++j) dst[j] = static_cast<scalar_t>(out[j]);
  }
}

// A fresh (N, V) gradient is faulted in 4 KiB pages on first touch, which costs several times more than
// writing it (measured 455 ms vs 94 ms for 4096 x 32000 fp32 on the 2-core CI VM). Asking for transparent
// huge pages before the first touch removes most of that wherever THP is in "madvise" or "always" mode.
inline void advise_huge_pages(void* data, size_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace cpu
}  // namespace infigw
