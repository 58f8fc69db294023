// The per-element formulas that the CPU and the CUDA kernels share, written once (host and device): the cosine
// normalisation of the node values with its gradient (docs/math.md §3, §6) and the 1-D GW closed form from
// power sums with its gradient (docs/math.md §4). Torch-free, like contract.h. A is float or double (the CPU
// kernels compute in double for fp64 inputs, which gradcheck uses).
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define INFIGW_HD __host__ __device__ __forceinline__
#else
#define INFIGW_HD inline
#endif

namespace infigw {

INFIGW_HD float exp_of(float x) { return expf(x); }
INFIGW_HD double exp_of(double x) { return exp(x); }
INFIGW_HD float abs_of(float x) { return fabsf(x); }
INFIGW_HD double abs_of(double x) { return fabs(x); }
INFIGW_HD float sqrt_of(float x) { return sqrtf(x); }
INFIGW_HD double sqrt_of(double x) { return sqrt(x); }

// ---- cosine normalisation --------------------------------------------------------------------------------
//
// graph_norm="cosine" divides G_ij by sqrt(G_ii G_jj); its degrees are those of the "sum" graph built from
// b = a D^-1/2 with D_n = sum of a^2 over the graph's slots at node n. D^-1/2 alone overflows fp32 for kept
// probabilities below ~1e-19 (and D for |logits| above ~1e19), so no kernel forms it. Per node n, M_n is the
// largest scale key of its slots: |a| for values="logits", log a for the probability values (kept
// probabilities underflow fp32 long before their logarithms do). Then
//   u = a / M_n   or   u = exp(log a - M_n),    Q_n = sum of u^2 over the node's slots (>= 1),    b = u Q_n^-1/2,
// so |u| <= 1 and |b| <= 1. M_n is only a scale: b does not depend on it.

// The scale key of one slot.
template <typename A>
INFIGW_HD A cosine_key(A a, A log_a, bool log_domain) {
  return log_domain ? log_a : abs_of(a);
}

// u of one slot given its node's largest key (0 for a node without scale: all its values 0, or all -inf logs;
// NaN propagates).
template <typename A>
INFIGW_HD A cosine_unit(A a, A log_a, A node_max, bool log_domain) {
  if (log_domain) return node_max == -INFINITY ? A(0) : exp_of(log_a - node_max);
  return node_max == A(0) ? A(0) : a / node_max;
}

// Q^-1/2, and 0 for Q = 0 (a node whose slots are all 0).
template <typename A>
INFIGW_HD A inv_sqrt_or_zero(A q) {
  return q > A(0) ? A(1) / sqrt_of(q) : A(0);
}

// The gradient that reaches a slot through b = u Q^-1/2, given gb = dL/db of the slot and z = sum over the
// node's slots of gb b: dL/da = (gb - b z) Q^-1/2 / M (values="logits") or, for the probability values,
// dL/d(log a) = a dL/da = b (gb - b z), which stays bounded however small a is.
template <typename A>
INFIGW_HD A cosine_input_grad(A gb, A b, A z, A rq, A node_max, bool log_domain) {
  const A g = gb - b * z;
  if (log_domain) return b * g;
  return node_max == A(0) ? A(0) : (g * rq) / node_max;
}

// ---- 1-D GW closed form --------------------------------------------------------------------------------
//
// For one matching of n points x_i with partners y_p(i) (identity p(i) = i, or anti-identity p(i) = n-1-i), the
// cost sum_{i,j} ((x_i - x_j)^2 - (y_p(i) - y_p(j))^2)^2 factors term by term into (d_i - d_j)^2 (s_i - s_j)^2
// with d = x - y_p, s = x + y_p. It is translation invariant in d and in s, so both are centred (fp64); with
// sum d = sum s = 0 the power-sum expansion keeps only non-negative terms:
//   cost = 2 (sum d^2)(sum s^2) + 2 n sum d^2 s^2 + 4 (sum d s)^2,
// exactly 0 when x = y and never negative: none of the cancellation of the S4(x) + S4(y) - 2 X(x, y) form.
enum Matching : int { kIdentity = 0, kAntiIdentity = 1 };  // y_i or y_{n-1-i} paired with x_i

struct Gw1dSums {
  // Per matching: sum d^2, sum s^2, sum d^2 s^2, sum d s, sum d s^2, sum d^2 s.
  enum { kDD, kSS, kDDSS, kDS, kDSS, kDDS, kPerMatching };
  static constexpr int kCount = 2 * kPerMatching;  // identity sums, then anti-identity sums
  double v[kCount] = {};

  // The centred d and s of the pair (x_i, y_p) given the means of x and y over the n points.
  INFIGW_HD static void centred(double x, double y, double mean_x, double mean_y, double& d, double& s) {
    d = (x - y) - (mean_x - mean_y);
    s = (x + y) - (mean_x + mean_y);
  }
  INFIGW_HD void add(int matching, double d, double s) {
    double* m = v + matching * kPerMatching;
    const double dd = d * d, ss = s * s;
    m[kDD] += dd;
    m[kSS] += ss;
    m[kDDSS] += dd * ss;
    m[kDS] += d * s;
    m[kDSS] += d * ss;
    m[kDDS] += dd * s;
  }
  INFIGW_HD double cost(int matching, double n) const {
    const double* m = v + matching * kPerMatching;
    return 2 * m[kDD] * m[kSS] + 2 * n * m[kDDSS] + 4 * m[kDS] * m[kDS];
  }
  // The cheaper matching; identity on a tie.
  INFIGW_HD int best(double n) const { return cost(kIdentity, n) <= cost(kAntiIdentity, n) ? kIdentity : kAntiIdentity; }
  // d cost / d d_i and d cost / d s_i at the centred pair (d, s). The cost is translation invariant, so this is
  // also its gradient before centring; then d/dx_i = grad_d + grad_s and d/dy_p(i) = grad_s - grad_d.
  INFIGW_HD double grad_d(int matching, double n, double d, double s) const {
    const double* m = v + matching * kPerMatching;
    return 4 * d * m[kSS] + 4 * n * d * s * s + 8 * m[kDS] * s - 4 * m[kDSS];
  }
  INFIGW_HD double grad_s(int matching, double n, double d, double s) const {
    const double* m = v + matching * kPerMatching;
    return 4 * s * m[kDD] + 4 * n * d * d * s + 8 * m[kDS] * d - 4 * m[kDDS];
  }
};

}  // namespace infigw
