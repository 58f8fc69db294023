// CPU kernels of infigw::topk_degrees and infigw::topk_degrees_backward (schemas in csrc/ops.cpp, math in
// shared/spec/GLD.md sections 2, 3 and 6).
//
// Forward, one pass over each valid row (rows in parallel): a partial top-k selection that keeps a small
// sorted buffer (k <= kBufferMaxK) or a nth_element pass (larger k), then (probs) the row logsumexp while the
// row is still in cache, then the value transform. The degrees are then reduced per graph, each graph on one
// thread in row order, so the result is deterministic for any thread count. Masked rows are never read.
//
// Backward: the gradient w.r.t. every kept value (N x k, per graph) and then one row-parallel pass that
// writes the logits gradient directly: k entries per row for logits/topk_probs, the dense softmax row for
// probs. No (N, V) temporary besides the gradient itself.
//
// Accumulation is in fp32 for fp32/fp16/bf16 logits; fp64 logits (used by gradcheck) compute and return fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu/graph_rows.h"
#include "cpu/row_ops.h"

namespace infigw {
namespace cpu {
namespace {

constexpr int64_t kLogits = 0, kProbs = 1, kTopkProbs = 2;
constexpr int64_t kVocab = 0;
constexpr int64_t kMean = 0, kCosine = 2;

// Node values a_p from the kept logits (in place), as transform_values of the reference.
template <typename acc_t>
void transform_row(acc_t* vals, int64_t k, int64_t values_mode, acc_t temperature, acc_t lse) {
  if (values_mode == kProbs) {
    for (int64_t r = 0; r < k; ++r) vals[r] = std::exp(vals[r] / temperature - lse);
  } else if (values_mode == kTopkProbs) {
    const acc_t shift = vals[0] / temperature;  // the largest kept value (NaN propagates)
    acc_t sum = 0;
    for (int64_t r = 0; r < k; ++r) {
      vals[r] = std::exp(vals[r] / temperature - shift);
      sum += vals[r];
    }
    for (int64_t r = 0; r < k; ++r) vals[r] /= sum;
  }
}

inline int64_t node_of(int64_t nodes_mode, const int64_t* ids, int64_t r) { return nodes_mode == kVocab ? ids[r] : r; }

// Cosine weights w_n = D_n^(-1/2) (0 where D_n = 0) of one graph into `weight` (num_nodes entries),
// D_n = sum of a^2 over the graph's kept slots at node n.
template <typename acc_t>
void cosine_weights(const GraphRows& groups, int64_t g, const acc_t* kept, const int64_t* ids, int64_t k,
                    int64_t nodes_mode, std::vector<acc_t>& weight) {
  std::fill(weight.begin(), weight.end(), acc_t(0));
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    for (int64_t r = 0; r < k; ++r) {
      const acc_t a = kept[p * k + r];
      weight[node_of(nodes_mode, ids + p * k, r)] += a * a;
    }
  }
  for (acc_t& w : weight) w = w > 0 ? acc_t(1) / std::sqrt(w) : acc_t(0);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& logits, const GraphRows& groups, const int64_t* row_graph, int64_t num_graphs, int64_t k,
    int64_t values_mode, double temperature_d, int64_t nodes_mode, int64_t norm_mode) {
  using acc_t = acc_type<scalar_t>;
  const at::ScalarType acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  const int64_t num_nodes = nodes_mode == kVocab ? vocab : k;
  const acc_t temperature = static_cast<acc_t>(temperature_d);

  at::Tensor kept_values = at::zeros({rows, k}, logits.options().dtype(acc_dtype));
  at::Tensor kept_ids = at::zeros({rows, k}, logits.options().dtype(at::kLong));
  at::Tensor row_lse = at::zeros({values_mode == kProbs ? rows : 0}, logits.options().dtype(acc_dtype));
  const scalar_t* x = logits.data_ptr<scalar_t>();
  acc_t* kept = kept_values.data_ptr<acc_t>();
  int64_t* ids = kept_ids.data_ptr<int64_t>();
  acc_t* lse = row_lse.data_ptr<acc_t>();

  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / vocab), [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> scratch;
    std::vector<float> buffer;
    for (int64_t p = begin; p < end; ++p) {
      if (row_graph[p] < 0) continue;
      const scalar_t* row = x + p * vocab;
      select_row(row, vocab, k, kept + p * k, ids + p * k, scratch);
      if (values_mode == kProbs) lse[p] = row_logsumexp(row, vocab, kept[p * k], temperature, buffer);
      transform_row(kept + p * k, k, values_mode, temperature, values_mode == kProbs ? lse[p] : acc_t(0));
    }
  });

  at::Tensor degrees = at::zeros({num_graphs, num_nodes}, logits.options().dtype(acc_dtype));
  at::Tensor touched = at::zeros({num_graphs, num_nodes}, logits.options().dtype(at::kBool));
  acc_t* deg_all = degrees.data_ptr<acc_t>();
  bool* touched_all = touched.data_ptr<bool>();
  at::parallel_for(0, num_graphs, 1, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> weight(norm_mode == kCosine ? num_nodes : 0);
    std::vector<acc_t> a(k);
    for (int64_t g = g0; g < g1; ++g) {
      acc_t* deg = deg_all + g * num_nodes;
      bool* touch = touched_all + g * num_nodes;
      if (norm_mode == kCosine) cosine_weights(groups, g, kept, ids, k, nodes_mode, weight);
      for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
        const int64_t p = groups.rows[i];
        acc_t s = 0;
        for (int64_t r = 0; r < k; ++r) {
          a[r] = kept[p * k + r];
          if (norm_mode == kCosine) a[r] *= weight[node_of(nodes_mode, ids + p * k, r)];
          s += a[r];
        }
        for (int64_t r = 0; r < k; ++r) {
          const int64_t n = node_of(nodes_mode, ids + p * k, r);
          deg[n] += a[r] * s;
          touch[n] = true;
        }
      }
      if (norm_mode == kMean && groups.count(g) > 0) {
        const acc_t c = static_cast<acc_t>(groups.count(g));
        for (int64_t n = 0; n < num_nodes; ++n) deg[n] /= c;
      }
    }
  });
  return {degrees, touched, kept_values, kept_ids, row_lse};
}

void check_forward_args(const at::Tensor& logits, int64_t k, int64_t values_mode, double temperature) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK_TYPE(at::isFloatingType(logits.scalar_type()), "logits must be float32, float16 or bfloat16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits must have shape (N, V), got ", logits.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= logits.size(1), "k must lie in [1, V=", logits.size(1), "], got ", k);
  TORCH_CHECK_VALUE(values_mode >= 0 && values_mode <= 2,
                    "values_mode must be 0 (logits), 1 (probs) or 2 (topk_probs), got ", values_mode);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature), "temperature must be a positive finite number, got ",
                    temperature);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_degrees_cpu(
    const at::Tensor& logits, const at::Tensor& row_graph, int64_t num_graphs, int64_t k, int64_t values_mode,
    double temperature, int64_t nodes_mode, int64_t norm_mode, bool deterministic) {
  (void)deterministic;  // the CPU kernels are always deterministic
  check_forward_args(logits, k, values_mode, temperature);
  check_modes(nodes_mode, norm_mode);
  check_row_graph(row_graph, logits.size(0), num_graphs);
  const at::Tensor x = logits.contiguous();
  const at::Tensor graph_of = row_graph.contiguous();
  const GraphRows groups = group_rows(graph_of, num_graphs);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_topk_degrees", [&] {
    out = forward_impl<scalar_t>(x, groups, graph_of.data_ptr<int64_t>(), num_graphs, k, values_mode, temperature,
                                 nodes_mode, norm_mode);
  });
  return out;
}

// d loss / d a for every kept slot of the valid rows of graph g, into grad_kept (N x k).
// mean/sum:  d[n_r] += a_r s / c         ->  ga_r = (gd[n_r] s + sum_r' gd[n_r'] a_r') / c
// cosine:    with b = a w[n], d[n_r] += b_r S (S = sum b)  ->  gb_r = gd[n_r] S + sum_r' gd[n_r'] b_r',
//            and through w_n = D_n^(-1/2), D_n = sum a^2:  ga_r = gb_r w_n - w_n^3 a_r H_n,
//            H_n = sum over the graph's slots at n of gb * a.
template <typename acc_t>
void kept_gradients_of_graph(const GraphRows& groups, int64_t g, const acc_t* gd, const acc_t* kept,
                             const int64_t* ids, int64_t k, int64_t nodes_mode, int64_t norm_mode, acc_t* grad_kept,
                             std::vector<acc_t>& weight, std::vector<acc_t>& h) {
  const bool cosine = norm_mode == kCosine;
  if (cosine) {
    cosine_weights(groups, g, kept, ids, k, nodes_mode, weight);
    std::fill(h.begin(), h.end(), acc_t(0));
  }
  const int64_t rows_of_graph = std::max<int64_t>(1, groups.count(g));
  const acc_t inv_c = norm_mode == kMean ? acc_t(1) / static_cast<acc_t>(rows_of_graph) : acc_t(1);
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    const int64_t* id = ids + p * k;
    const acc_t* a = kept + p * k;
    acc_t* ga = grad_kept + p * k;
    acc_t s = 0, t = 0;
    for (int64_t r = 0; r < k; ++r) {
      const int64_t n = node_of(nodes_mode, id, r);
      const acc_t b = cosine ? a[r] * weight[n] : a[r];
      s += b;
      t += gd[n] * b;
    }
    for (int64_t r = 0; r < k; ++r) {
      const int64_t n = node_of(nodes_mode, id, r);
      ga[r] = (gd[n] * s + t) * inv_c;
      if (cosine) h[n] += ga[r] * a[r];
    }
  }
  if (!cosine) return;
  for (int64_t i = groups.start[g]; i < groups.start[g + 1]; ++i) {
    const int64_t p = groups.rows[i];
    for (int64_t r = 0; r < k; ++r) {
      const int64_t n = node_of(nodes_mode, ids + p * k, r);
      const acc_t w = weight[n];
      grad_kept[p * k + r] = grad_kept[p * k + r] * w - w * w * w * kept[p * k + r] * h[n];
    }
  }
}

template <typename scalar_t>
at::Tensor backward_impl(const at::Tensor& grad_degrees, const at::Tensor& logits, const GraphRows& groups,
                         const int64_t* row_graph, const at::Tensor& kept_values, const at::Tensor& kept_ids,
                         const at::Tensor& row_lse, int64_t num_graphs, int64_t values_mode, double temperature_d,
                         int64_t nodes_mode, int64_t norm_mode) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = logits.size(0), vocab = logits.size(1), k = kept_ids.size(1);
  const int64_t num_nodes = grad_degrees.size(1);
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const acc_t* gd_all = grad_degrees.data_ptr<acc_t>();
  const acc_t* kept = kept_values.data_ptr<acc_t>();
  const int64_t* ids = kept_ids.data_ptr<int64_t>();

  std::vector<acc_t> grad_kept(static_cast<size_t>(rows * k), acc_t(0));
  at::parallel_for(0, num_graphs, 1, [&](int64_t g0, int64_t g1) {
    std::vector<acc_t> weight(norm_mode == kCosine ? num_nodes : 0), h(weight.size());
    for (int64_t g = g0; g < g1; ++g)
      kept_gradients_of_graph(groups, g, gd_all + g * num_nodes, kept, ids, k, nodes_mode, norm_mode,
                              grad_kept.data(), weight, h);
  });

  at::Tensor grad_logits = at::empty({rows, vocab}, logits.options());
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  scalar_t* out = grad_logits.data_ptr<scalar_t>();
  // softmax (full row for probs, kept entries for topk_probs): dz_j = P_j (ga_j [j kept] - sum_r ga_r a_r)
  std::vector<acc_t> dot(values_mode == kLogits ? 0 : rows, acc_t(0));
  for (size_t p = 0; p < dot.size(); ++p)
    for (int64_t r = 0; r < k; ++r) dot[p] += grad_kept[p * k + r] * kept[p * k + r];
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const acc_t* lse = values_mode == kProbs ? row_lse.data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / vocab), [&](int64_t begin, int64_t end) {
    std::vector<float> in, out_row;
    for (int64_t p = begin; p < end; ++p) {
      scalar_t* dst = out + p * vocab;
      if (row_graph[p] < 0) {
        std::fill(dst, dst + vocab, scalar_t(0));
        continue;
      }
      if (values_mode == kProbs)  // the dense part -P_j dot / T
        scaled_softmax_row(x + p * vocab, vocab, temperature, lse[p], -dot[p] / temperature, dst, in, out_row);
      else
        std::fill(dst, dst + vocab, scalar_t(0));
      const acc_t* a = kept + p * k;
      const acc_t* ga = grad_kept.data() + p * k;
      const int64_t* id = ids + p * k;
      for (int64_t r = 0; r < k; ++r)
        dst[id[r]] = static_cast<scalar_t>(values_mode == kLogits ? ga[r] : a[r] * (ga[r] - dot[p]) / temperature);
    }
  });
  return grad_logits;
}

at::Tensor topk_degrees_backward_cpu(const at::Tensor& grad_degrees, const at::Tensor& logits,
                                     const at::Tensor& row_graph, const at::Tensor& kept_values,
                                     const at::Tensor& kept_ids, const at::Tensor& row_lse, int64_t num_graphs,
                                     int64_t values_mode, double temperature, int64_t nodes_mode, int64_t norm_mode) {
  check_modes(nodes_mode, norm_mode);
  const int64_t k = kept_ids.dim() == 2 ? kept_ids.size(1) : 0;
  check_forward_args(logits, k, values_mode, temperature);
  const int64_t rows = logits.size(0);
  check_row_graph(row_graph, rows, num_graphs);
  const at::ScalarType acc_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t num_nodes = nodes_mode == kVocab ? logits.size(1) : k;
  TORCH_CHECK_VALUE(grad_degrees.dim() == 2 && grad_degrees.size(0) == num_graphs && grad_degrees.size(1) == num_nodes,
                    "grad_degrees must have shape (", num_graphs, ", ", num_nodes, "), got ", grad_degrees.sizes());
  TORCH_CHECK_VALUE(kept_values.sizes() == kept_ids.sizes() && kept_ids.size(0) == rows,
                    "kept_values and kept_ids must both have shape (", rows, ", k), got ", kept_values.sizes(), " and ",
                    kept_ids.sizes());
  TORCH_CHECK_TYPE(kept_values.scalar_type() == acc_dtype && kept_ids.scalar_type() == at::kLong,
                   "kept_values must be ", acc_dtype, " and kept_ids int64, got ", kept_values.scalar_type(), " and ",
                   kept_ids.scalar_type());
  if (values_mode == kProbs)
    TORCH_CHECK_VALUE(row_lse.dim() == 1 && row_lse.size(0) == rows && row_lse.scalar_type() == acc_dtype,
                      "row_lse must have shape (", rows, ",) and dtype ", acc_dtype, " for values_mode=probs, got ",
                      row_lse.sizes(), " ", row_lse.scalar_type());
  const at::Tensor graph_of = row_graph.contiguous();
  const GraphRows groups = group_rows(graph_of, num_graphs);
  const at::Tensor gd = grad_degrees.to(acc_dtype).contiguous();
  const at::Tensor x = logits.contiguous();
  const at::Tensor kv = kept_values.contiguous();
  const at::Tensor ki = kept_ids.contiguous();
  const at::Tensor lse = row_lse.contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_topk_degrees_backward", [&] {
    out = backward_impl<scalar_t>(gd, x, groups, graph_of.data_ptr<int64_t>(), kv, ki, lse, num_graphs, values_mode,
                                  temperature, nodes_mode, norm_mode);
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CPU, m) {
  m.impl("topk_degrees", &infigw::cpu::topk_degrees_cpu);
  m.impl("topk_degrees_backward", &infigw::cpu::topk_degrees_backward_cpu);
}
