// CPU kernels of infigw::topk_degrees and infigw::topk_degrees_backward (schemas in csrc/ops.cpp, math in
// docs/math.md §2, §3 and §6).
//
// Forward, one pass over each valid row (rows in parallel): a partial top-k selection that keeps a small
// sorted buffer (k <= kBufferMaxK) or a nth_element pass (larger k); for the probability values the logsumexp
// (of the whole row for probs, while it is still in cache; of the k kept entries for topk_probs) and
// a_p = exp(x / T - lse). The degrees are then reduced per graph, each graph on one thread in row order, so the
// result is deterministic for any thread count. They accumulate in fp64: a contribution a_r s_p of finite fp32
// logits can exceed fp32 (|logits| above ~1e19) but never fp64, so no degree becomes inf - inf = NaN; the fp32
// result is then at most +-inf. Masked rows are never read.
//
// Backward: the gradient w.r.t. every kept value (N x k, per graph) and then one row-parallel pass that
// writes the logits gradient directly: k entries per row for logits/topk_probs, the dense softmax row for
// probs. No (N, V) temporary besides the gradient itself.
//
// Accumulation is in fp32 for fp32/fp16/bf16 logits; fp64 logits (used by gradcheck) compute and return fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/rows_by_graph.h"
#include "formulas.h"
#include "kernels.h"
#include "op_checks.h"

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace infigw {
namespace cpu {
namespace {

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
INFIGW_SIMD_CLONES float sum_exp(const float* x, int64_t n, float temperature, float shift) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += exp_nonpositive(x[j] / temperature - shift);
  return sum;
}

// out_j = scale * exp(x_j / T - shift), shift >= max_j x_j / T.
INFIGW_SIMD_CLONES void scaled_exp(const float* x, int64_t n, float temperature, float shift, float scale,
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

// logsumexp(x / T) over the k kept entries in rank order (their maximum first), for topk_probs.
template <typename acc_t>
acc_t kept_logsumexp(const acc_t* kept, int64_t k, acc_t temperature) {
  const acc_t shift = kept[0] / temperature;  // NaN propagates; all -inf gives NaN, as log_softmax does
  acc_t sum = 0;
  for (int64_t r = 0; r < k; ++r) sum += std::exp(kept[r] / temperature - shift);
  return shift + std::log(sum);
}

// log a_p of a kept logit x for the probability values: the one expression of forward and backward, so both
// see the same bits.
template <typename acc_t>
inline acc_t log_value(acc_t x, acc_t temperature, acc_t lse) {
  return x / temperature - lse;
}

// A fresh (N, V) gradient is faulted in 4 KiB pages on first touch, which costs several times more than
// writing it (measured 455 ms vs 94 ms for 4096 x 32000 fp32 on the 2-core CI VM). Asking for transparent
// huge pages before the first touch removes most of that wherever THP is in "madvise" or "always" mode.
void advise_huge_pages(void* data, size_t bytes) {
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

// The kept slots of all rows: values a (N, k), their logs for the probability values under the cosine norm
// (else null), ids (N, k) and how a slot maps to a node.
template <typename acc_t>
struct KeptSlots {
  const acc_t* values;
  const acc_t* logs;
  const int64_t* ids;
  int64_t k;
  int nodes_mode;

  int64_t node(int64_t p, int64_t r) const { return nodes_mode == kNodesVocab ? ids[p * k + r] : r; }
  acc_t value(int64_t p, int64_t r) const { return values[p * k + r]; }
  acc_t log(int64_t p, int64_t r) const { return logs ? logs[p * k + r] : acc_t(0); }
};

// The cosine normalisation of one graph (csrc/formulas.h): per node, the largest scale key M and Q^-1/2.
template <typename acc_t>
struct CosineScale {
  std::vector<acc_t> node_max, inv_sqrt_q;
  bool log_domain = false;

  CosineScale(int64_t num_nodes, bool log_domain) : node_max(num_nodes), inv_sqrt_q(num_nodes), log_domain(log_domain) {}

  void build(const RowsByGraph& groups, int64_t g, const KeptSlots<acc_t>& slots) {
    std::fill(node_max.begin(), node_max.end(), log_domain ? -INFINITY : acc_t(0));
    std::fill(inv_sqrt_q.begin(), inv_sqrt_q.end(), acc_t(0));
    for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
      const int64_t p = groups.rows[i];
      for (int64_t r = 0; r < slots.k; ++r) {
        const acc_t key = cosine_key(slots.value(p, r), slots.log(p, r), log_domain);
        acc_t& m = node_max[slots.node(p, r)];
        if (std::isnan(key) || key > m) m = key;  // NaN sticks
      }
    }
    for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
      const int64_t p = groups.rows[i];
      for (int64_t r = 0; r < slots.k; ++r) {
        const acc_t u = unit(slots, p, r);
        inv_sqrt_q[slots.node(p, r)] += u * u;  // Q, until the next loop
      }
    }
    for (acc_t& q : inv_sqrt_q) q = inv_sqrt_or_zero(q);
  }
  acc_t unit(const KeptSlots<acc_t>& slots, int64_t p, int64_t r) const {
    return cosine_unit(slots.value(p, r), slots.log(p, r), node_max[slots.node(p, r)], log_domain);
  }
  // The normalised node value b of a slot.
  acc_t normalised(const KeptSlots<acc_t>& slots, int64_t p, int64_t r) const {
    return unit(slots, p, r) * inv_sqrt_q[slots.node(p, r)];
  }
};

// The node value a slot contributes with: b under the cosine norm, else a itself.
template <typename acc_t>
inline acc_t contributed(const KeptSlots<acc_t>& slots, const CosineScale<acc_t>* cosine, int64_t p, int64_t r) {
  return cosine ? cosine->normalised(slots, p, r) : slots.value(p, r);
}

// Degrees d[n] = (1/c) sum_p b_r s_p of graph g into `deg` (fp64), and the touched nodes.
template <typename acc_t>
void degrees_of_graph(const RowsByGraph& groups, int64_t g, const KeptSlots<acc_t>& slots,
                      const CosineScale<acc_t>* cosine, bool mean, std::vector<double>& deg, bool* touch,
                      std::vector<double>& b) {
  std::fill(deg.begin(), deg.end(), 0.0);
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    double s = 0;
    for (int64_t r = 0; r < slots.k; ++r) {
      b[r] = contributed(slots, cosine, p, r);
      s += b[r];
    }
    for (int64_t r = 0; r < slots.k; ++r) {
      const int64_t n = slots.node(p, r);
      deg[n] += b[r] * s;
      touch[n] = true;
    }
  }
  if (mean && groups.count(g) > 0) {
    const double c = static_cast<double>(groups.count(g));
    for (double& d : deg) d /= c;
  }
}

// The probability values of one kept row in place: a_r = exp(x_r / T - lse), their logs into `logs` (if given).
template <typename acc_t>
void transform_row(acc_t* vals, int64_t k, acc_t temperature, acc_t lse, acc_t* logs) {
  for (int64_t r = 0; r < k; ++r) {
    const acc_t la = log_value(vals[r], temperature, lse);
    if (logs) logs[r] = la;
    vals[r] = std::exp(la);
  }
}

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename scalar_t>
Outputs forward_impl(const at::Tensor& logits, const RowsByGraph& groups, const int64_t* row_graph, int64_t num_graphs,
                     int64_t k, const Options& options, double temperature_d) {
  using acc_t = acc_type<scalar_t>;
  const at::ScalarType acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t num_nodes = options.nodes == kNodesVocab ? vocab : k;
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const bool probability = options.probability_values(), cosine = options.graph_norm == kNormCosine;

  at::Tensor kept_values = at::zeros({rows, k}, logits.options().dtype(acc_dtype));
  at::Tensor kept_ids = at::zeros({rows, k}, logits.options().dtype(at::kLong));
  at::Tensor row_lse = at::zeros({probability ? rows : 0}, logits.options().dtype(acc_dtype));
  const scalar_t* x = logits.data_ptr<scalar_t>();
  acc_t* kept = kept_values.data_ptr<acc_t>();
  int64_t* ids = kept_ids.data_ptr<int64_t>();
  acc_t* lse = row_lse.data_ptr<acc_t>();
  // cosine with probability values scales by log a (csrc/formulas.h)
  std::vector<acc_t> kept_log(probability && cosine ? rows * k : 0);

  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / vocab), [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> scratch;
    std::vector<float> buffer;
    for (int64_t p = begin; p < end; ++p) {
      if (row_graph[p] < 0) continue;
      const scalar_t* row = x + p * vocab;
      acc_t* vals = kept + p * k;
      select_row(row, vocab, k, vals, ids + p * k, scratch);
      if (!probability) continue;
      lse[p] = options.values == kValuesProbs ? row_logsumexp(row, vocab, vals[0], temperature, buffer)
                                              : kept_logsumexp(vals, k, temperature);
      transform_row(vals, k, temperature, lse[p], kept_log.empty() ? nullptr : kept_log.data() + p * k);
    }
  });

  const KeptSlots<acc_t> slots{kept, kept_log.empty() ? nullptr : kept_log.data(), ids, k, options.nodes};
  at::Tensor degrees = at::empty({num_graphs, num_nodes}, logits.options().dtype(acc_dtype));
  at::Tensor touched = at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kBool));
  acc_t* deg_all = degrees.data_ptr<acc_t>();
  bool* touched_all = touched.data_ptr<bool>();
  at::parallel_for(0, num_graphs, 1, [&](int64_t g0, int64_t g1) {
    std::vector<double> deg(num_nodes), b(k);
    std::unique_ptr<CosineScale<acc_t>> scale;
    if (cosine) scale.reset(new CosineScale<acc_t>(num_nodes, probability));
    for (int64_t g = g0; g < g1; ++g) {
      if (scale) scale->build(groups, g, slots);
      degrees_of_graph(groups, g, slots, scale.get(), options.graph_norm == kNormMean, deg,
                       touched_all + g * num_nodes, b);
      std::transform(deg.begin(), deg.end(), deg_all + g * num_nodes, [](double d) { return static_cast<acc_t>(d); });
    }
  });
  return {degrees, touched, kept_values, kept_ids, row_lse};
}

}  // namespace

Outputs topk_degrees(const at::Tensor& logits, const at::Tensor& row_graph, int64_t num_graphs, int64_t k,
                     const std::string& values, double temperature, const std::string& nodes,
                     const std::string& graph_norm, bool deterministic, bool check_data) {
  (void)deterministic;  // the CPU kernels are always deterministic
  (void)check_data;     // and always scan the indices they follow (cheap on CPU)
  const Options options = parse_options(values, nodes, graph_norm);
  check_logits(logits, /*allow_fp64=*/true);
  check_row_graph(row_graph, logits, num_graphs);
  check_k(k, logits.size(1), logits.size(1), "k");
  check_temperature(temperature);
  check_index_range(row_graph, "row_graph", -1, num_graphs);
  const at::Tensor x = logits.contiguous();
  const at::Tensor graph_of = row_graph.contiguous();
  const RowsByGraph groups = group_rows(graph_of, num_graphs);
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_topk_degrees", [&] {
    out = forward_impl<scalar_t>(x, groups, graph_of.data_ptr<int64_t>(), num_graphs, k, options, temperature);
  });
  return out;
}

namespace {

// The gradient w.r.t. the kept slots of graph g into grad_kept (N x k): dL/da for values="logits", dL/d(log a)
// for the probability values (bounded where a is tiny; the logits gradient below needs only that).
//   mean/sum: d[n_r] += a_r s / c        ->  dL/da_r = (gd[n_r] s + sum_r' gd[n_r'] a_r') / c
//   cosine:   d[n_r] += b_r S (S = sum b) ->  gb_r = gd[n_r] S + sum_r' gd[n_r'] b_r', then through b = u Q^-1/2
//             with z_n = sum over the graph's slots at n of gb b (cosine_input_grad of csrc/formulas.h).
template <typename acc_t>
void kept_gradients_of_graph(const RowsByGraph& groups, int64_t g, const acc_t* gd, const KeptSlots<acc_t>& slots,
                             const Options& options, const CosineScale<acc_t>* cosine, std::vector<acc_t>& z,
                             acc_t* grad_kept) {
  const bool probability = options.probability_values();
  const double inv_c =
      options.graph_norm == kNormMean ? 1.0 / static_cast<double>(std::max<int64_t>(1, groups.count(g))) : 1.0;
  if (cosine) std::fill(z.begin(), z.end(), acc_t(0));
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    double s = 0, t = 0;  // fp64 like the forward's terms: s of huge logits may exceed fp32
    for (int64_t r = 0; r < slots.k; ++r) {
      const acc_t b = contributed(slots, cosine, p, r);
      s += b;
      t += gd[slots.node(p, r)] * static_cast<double>(b);
    }
    for (int64_t r = 0; r < slots.k; ++r) {
      const int64_t n = slots.node(p, r);
      const acc_t gb = static_cast<acc_t>((gd[n] * s + t) * inv_c);
      if (cosine) {
        grad_kept[p * slots.k + r] = gb;
        z[n] += gb * cosine->normalised(slots, p, r);
      } else {
        grad_kept[p * slots.k + r] = probability ? slots.value(p, r) * gb : gb;
      }
    }
  }
  if (!cosine) return;
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    for (int64_t r = 0; r < slots.k; ++r) {
      const int64_t n = slots.node(p, r);
      acc_t& grad = grad_kept[p * slots.k + r];
      grad = cosine_input_grad(grad, cosine->normalised(slots, p, r), z[n], cosine->inv_sqrt_q[n],
                               cosine->node_max[n], cosine->log_domain);
    }
  }
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& grad_degrees, const at::Tensor& logits, const RowsByGraph& groups,
                         const int64_t* row_graph, const at::Tensor& kept_values, const at::Tensor& kept_ids,
                         const at::Tensor& row_lse, int64_t num_graphs, const Options& options, double temperature_d) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1), k = kept_ids.size(1);
  const int64_t num_nodes = grad_degrees.size(1);
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const bool probability = options.probability_values(), cosine = options.graph_norm == kNormCosine;
  const acc_t* gd_all = grad_degrees.data_ptr<acc_t>();
  const acc_t* kept = kept_values.data_ptr<acc_t>();
  const int64_t* ids = kept_ids.data_ptr<int64_t>();
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const acc_t* lse = probability ? row_lse.data_ptr<acc_t>() : nullptr;

  // log a of every valid slot, recomputed from the logits as the forward computed it (cosine, probability values)
  std::vector<acc_t> kept_log(probability && cosine ? rows * k : 0);
  if (!kept_log.empty()) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / k), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (row_graph[p] < 0) continue;
        for (int64_t r = 0; r < k; ++r)
          kept_log[p * k + r] = log_value(static_cast<acc_t>(x[p * vocab + ids[p * k + r]]), temperature, lse[p]);
      }
    });
  }
  const KeptSlots<acc_t> slots{kept, kept_log.empty() ? nullptr : kept_log.data(), ids, k, options.nodes};
  std::vector<acc_t> grad_kept(static_cast<size_t>(rows * k), acc_t(0));
  at::parallel_for(0, num_graphs, 1, [&](int64_t g0, int64_t g1) {
    std::unique_ptr<CosineScale<acc_t>> scale;
    std::vector<acc_t> z(cosine ? num_nodes : 0);
    if (cosine) scale.reset(new CosineScale<acc_t>(num_nodes, probability));
    for (int64_t g = g0; g < g1; ++g) {
      if (scale) scale->build(groups, g, slots);
      kept_gradients_of_graph(groups, g, gd_all + g * num_nodes, slots, options, scale.get(), z, grad_kept.data());
    }
  });

  at::Tensor grad_logits = at::empty({rows, vocab}, logits.options());
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  scalar_t* out = grad_logits.data_ptr<scalar_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> in, out_row;
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* dst = out + p * vocab;
      const acc_t* g = grad_kept.data() + p * k;
      // through the softmax (full row for probs, kept entries for topk_probs), from g = dL/d(log a):
      // dz_j = (g_j [j kept] - P_j sum_r g_r) / T
      acc_t total = 0;
      for (int64_t r = 0; probability && r < k; ++r) total += g[r];
      if (row_graph[p] >= 0 && options.values == kValuesProbs)  // the dense part -P_j total / T
        scaled_softmax_row(x + p * vocab, vocab, temperature, lse[p], -total / temperature, dst, in, out_row);
      else
        std::fill(dst, dst + vocab, scalar_t(0));
      if (row_graph[p] < 0) continue;
      const acc_t* a = kept + p * k;
      const int64_t* id = ids + p * k;
      for (int64_t r = 0; r < k; ++r)
        dst[id[r]] = static_cast<scalar_t>(probability ? (g[r] - a[r] * total) / temperature : g[r]);
    }
  });
  return grad_logits;
}

}  // namespace

at::Tensor topk_degrees_backward(const at::Tensor& grad_degrees, const at::Tensor& logits,
                                 const at::Tensor& row_graph, const at::Tensor& kept_values, const at::Tensor& kept_ids,
                                 const at::Tensor& row_lse, int64_t num_graphs, const std::string& values,
                                 double temperature, const std::string& nodes, const std::string& graph_norm,
                                 bool check_data) {
  (void)check_data;  // the CPU kernels always scan the indices they follow
  const Options options = parse_options(values, nodes, graph_norm);
  check_logits(logits, /*allow_fp64=*/true);
  check_row_graph(row_graph, logits, num_graphs);
  check_temperature(temperature);
  const at::ScalarType acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  check_kept(kept_values, kept_ids, row_lse, logits, acc_dtype, options);
  const int64_t vocab = logits.size(1), k = kept_ids.size(1);
  check_k(k, vocab, vocab, "kept_ids.size(1) (k)");
  check_grad_degrees(grad_degrees, logits, num_graphs, options.nodes == kNodesVocab ? vocab : k);
  check_index_range(row_graph, "row_graph", -1, num_graphs);
  check_index_range(kept_ids, "kept_ids", 0, vocab);
  const at::Tensor graph_of = row_graph.contiguous();
  const RowsByGraph groups = group_rows(graph_of, num_graphs);
  const at::Tensor gd = grad_degrees.to(acc_dtype).contiguous();
  const at::Tensor x = logits.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_topk_degrees_backward", [&] {
    out = backward_impl<scalar_t>(gd, x, groups, graph_of.data_ptr<int64_t>(), kept_values.contiguous(),
                                  kept_ids.contiguous(), row_lse.contiguous(), num_graphs, options, temperature);
  });
  return out;
}

}  // namespace cpu
}  // namespace infigw
