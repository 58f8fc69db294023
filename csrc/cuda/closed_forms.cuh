// The 1-D GW closed form (docs/math.md §4), forward and backward, one block per graph, with the formulas of
// csrc/formulas.h (the same code as the CPU kernels). Torch-free kernel bodies and launchers; the torch binding
// is closed_forms.cu. Reductions use fixed shuffle trees, so the results are deterministic; means and power
// sums are fp64.
#pragma once

#include <math_constants.h>

#include "common.cuh"

namespace infigw {
namespace cuda {

constexpr int kClosedBlock = 256;

// The n points of graph g: their means, whether one is NaN, and the power sums of both matchings (block-wide).
struct GwGraph {
  const float* x;
  const float* y;
  int64_t n;
  double mean_x, mean_y;
  bool has_nan;
  Gw1dSums sums;

  // False when a point is infinite or NaN: the cost is then +inf (NaN if a point is NaN) and no gradient flows.
  __device__ __forceinline__ bool finite() const { return isfinite(mean_x) && isfinite(mean_y); }
  __device__ __forceinline__ int64_t partner(int64_t i, int matching) const {
    return matching == kIdentity ? i : n - 1 - i;
  }
  __device__ __forceinline__ void centred(int64_t i, int matching, double& d, double& s) const {
    Gw1dSums::centred(x[i], y[partner(i, matching)], mean_x, mean_y, d, s);
  }
};

// `scratch` holds Gw1dSums::kCount * warps doubles. A length outside [0, width] is clamped, never followed.
__device__ __forceinline__ GwGraph gw_graph(const float* x, const float* y, const int64_t* lengths, int64_t g,
                                            int64_t width, double* scratch) {
  GwGraph G;
  const int64_t len = lengths[g];
  G.n = len < 0 ? 0 : (len > width ? width : len);
  G.x = x + g * width;
  G.y = y + g * width;
  double m[3] = {0.0, 0.0, 0.0};  // sum x, sum y, NaN points
  for (int64_t i = threadIdx.x; i < G.n; i += blockDim.x) {
    m[0] += G.x[i];
    m[1] += G.y[i];
    m[2] += (isnan(G.x[i]) || isnan(G.y[i])) ? 1.0 : 0.0;
  }
  block_sum<double, 3>(m, scratch);
  const double inv_n = G.n > 0 ? 1.0 / static_cast<double>(G.n) : 0.0;
  G.mean_x = m[0] * inv_n;
  G.mean_y = m[1] * inv_n;
  G.has_nan = m[2] > 0;
  Gw1dSums sums;
  if (G.finite()) {
    for (int64_t i = threadIdx.x; i < G.n; i += blockDim.x) {
#pragma unroll
      for (int matching = kIdentity; matching <= kAntiIdentity; ++matching) {
        double d, s;
        G.centred(i, matching, d, s);
        sums.add(matching, d, s);
      }
    }
  }
  block_sum<double, Gw1dSums::kCount>(sums.v, scratch);
  G.sums = sums;
  return G;
}

static __global__ void __launch_bounds__(kClosedBlock)
    gw1d_kernel(const float* __restrict__ x, const float* __restrict__ y, const int64_t* __restrict__ lengths,
                int64_t width, float* __restrict__ out) {
  __shared__ double scratch[Gw1dSums::kCount * (kClosedBlock / kWarp)];
  const GwGraph G = gw_graph(x, y, lengths, blockIdx.x, width, scratch);
  if (threadIdx.x != 0) return;
  const double nn = static_cast<double>(G.n);
  double result = 0.0;
  if (G.n > 0 && !G.finite()) result = G.has_nan ? CUDART_NAN : CUDART_INF;
  else if (G.n > 0) result = fmin(G.sums.cost(kIdentity, nn), G.sums.cost(kAntiIdentity, nn)) / (nn * nn);
  out[blockIdx.x] = static_cast<float>(result);
}

// grad_x, grad_y (G, width) through the chosen matching (identity on a tie); 0 beyond n, for n = 0 and for lists
// with a non-finite point.
static __global__ void __launch_bounds__(kClosedBlock)
    gw1d_backward_kernel(const float* __restrict__ grad, const float* __restrict__ x, const float* __restrict__ y,
                         const int64_t* __restrict__ lengths, int64_t width, float* __restrict__ grad_x,
                         float* __restrict__ grad_y) {
  __shared__ double scratch[Gw1dSums::kCount * (kClosedBlock / kWarp)];
  const int64_t g = blockIdx.x;
  const GwGraph G = gw_graph(x, y, lengths, g, width, scratch);
  const double nn = static_cast<double>(G.n);
  const int matching = G.sums.best(nn);
  const double scale = G.n > 0 && G.finite() ? static_cast<double>(grad[g]) / (nn * nn) : 0.0;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    if (i >= G.n) {  // beyond the points; the partner of a point i < n is written below
      grad_x[g * width + i] = 0.f;
      grad_y[g * width + i] = 0.f;
      continue;
    }
    double d = 0.0, s = 0.0;
    if (scale != 0.0) G.centred(i, matching, d, s);
    const double by_d = G.sums.grad_d(matching, nn, d, s), by_s = G.sums.grad_s(matching, nn, d, s);
    grad_x[g * width + i] = static_cast<float>(scale * (by_d + by_s));
    grad_y[g * width + G.partner(i, matching)] = static_cast<float>(scale * (by_s - by_d));
  }
}

inline cudaError_t launch_gw1d(const float* x, const float* y, const int64_t* lengths, int64_t graphs,
                               int64_t width, float* out, cudaStream_t stream) {
  gw1d_kernel<<<static_cast<unsigned>(graphs), kClosedBlock, 0, stream>>>(x, y, lengths, width, out);
  return cudaGetLastError();
}

inline cudaError_t launch_gw1d_backward(const float* grad, const float* x, const float* y, const int64_t* lengths,
                                        int64_t graphs, int64_t width, float* grad_x, float* grad_y,
                                        cudaStream_t stream) {
  gw1d_backward_kernel<<<static_cast<unsigned>(graphs), kClosedBlock, 0, stream>>>(grad, x, y, lengths, width,
                                                                                   grad_x, grad_y);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
