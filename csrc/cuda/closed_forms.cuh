// The 1-D GW closed form (GLD.md section 4), forward and backward, one block per graph. Torch-free kernel
// bodies and launchers; the torch binding is closed_forms.cu. Reductions use fixed shuffle trees, so the
// results are deterministic; gw1d accumulates its power sums in fp64.
#pragma once

#include "common.cuh"

namespace infigw {
namespace cuda {

constexpr int kClosedBlock = 256;

// ---- 1-D GW closed form ------------------------------------------------------------------------------------
//
// n points x[:n], y[:n], centred. S4(x) = 2n Σx⁴ - 8 Σx³ Σx + 6 (Σx²)²,
// X(x, y) = 2 Σx² Σy² + 2 (n Σx²y² - 2 Σy Σx²y - 2 Σx Σxy² + 2 (Σxy)²) with y paired to x by the identity
// (y_i) or the anti-identity (y_{n-1-i}); cost = S4(x) + S4(y) - 2 X; result min(cost_id, cost_anti) / n².

enum GwSum { kX1, kX2, kX3, kX4, kY1, kY2, kY3, kY4, kCross, kNumGwSums = kCross + 8 };
// Cross sums of one matching, at kCross + 4 * matching: Σx²y², Σx²y, Σxy², Σxy.
enum CrossSum { kXXYY, kXXY, kXYY, kXY };

struct GwGraph {
  int64_t n;
  double mx, my;           // means of x[:n], y[:n]
  double s[kNumGwSums];    // power sums of the centred points
  __device__ __forceinline__ double cost(int matching) const {
    const double nn = static_cast<double>(n);
    const double* c = s + kCross + 4 * matching;
    const double s4x = 2 * nn * s[kX4] - 8 * s[kX3] * s[kX1] + 6 * s[kX2] * s[kX2];
    const double s4y = 2 * nn * s[kY4] - 8 * s[kY3] * s[kY1] + 6 * s[kY2] * s[kY2];
    const double cross = 2 * s[kX2] * s[kY2] +
                         2 * (nn * c[kXXYY] - 2 * s[kY1] * c[kXXY] - 2 * s[kX1] * c[kXYY] + 2 * c[kXY] * c[kXY]);
    return s4x + s4y - 2 * cross;
  }
  // 0 = identity, 1 = anti-identity (identity on a tie, as the reference).
  __device__ __forceinline__ int best() const { return cost(0) <= cost(1) ? 0 : 1; }
};

// Block-wide: n, means and power sums of graph g. `scratch` holds kNumGwSums * warps doubles.
__device__ __forceinline__ GwGraph gw_graph(const float* x, const float* y, const int64_t* lengths, int64_t g,
                                            int64_t width, double* scratch) {
  GwGraph G;
  const int64_t len = lengths[g];
  G.n = len < 0 ? 0 : (len > width ? width : len);
  const float* xr = x + g * width;
  const float* yr = y + g * width;
  double m[2] = {0.0, 0.0};
  for (int64_t i = threadIdx.x; i < G.n; i += blockDim.x) {
    m[0] += xr[i];
    m[1] += yr[i];
  }
  block_sum<double, 2>(m, scratch);
  const double inv_n = G.n > 0 ? 1.0 / static_cast<double>(G.n) : 0.0;
  G.mx = m[0] * inv_n;
  G.my = m[1] * inv_n;
  double s[kNumGwSums];
#pragma unroll
  for (int j = 0; j < kNumGwSums; ++j) s[j] = 0.0;
  for (int64_t i = threadIdx.x; i < G.n; i += blockDim.x) {
    const double a = xr[i] - G.mx, b = yr[i] - G.my;
    const double a2 = a * a, b2 = b * b;
    s[kX1] += a; s[kX2] += a2; s[kX3] += a2 * a; s[kX4] += a2 * a2;
    s[kY1] += b; s[kY2] += b2; s[kY3] += b2 * b; s[kY4] += b2 * b2;
#pragma unroll
    for (int matching = 0; matching < 2; ++matching) {
      const double p = matching == 0 ? b : yr[G.n - 1 - i] - G.my;
      double* c = s + kCross + 4 * matching;
      c[kXXYY] += a2 * p * p; c[kXXY] += a2 * p; c[kXYY] += a * p * p; c[kXY] += a * p;
    }
  }
  block_sum<double, kNumGwSums>(s, scratch);
#pragma unroll
  for (int j = 0; j < kNumGwSums; ++j) G.s[j] = s[j];
  return G;
}

static __global__ void __launch_bounds__(kClosedBlock)
    gw1d_kernel(const float* __restrict__ x, const float* __restrict__ y, const int64_t* __restrict__ lengths,
                int64_t width, float* __restrict__ out) {
  __shared__ double scratch[kNumGwSums * (kClosedBlock / kWarp)];
  const GwGraph G = gw_graph(x, y, lengths, blockIdx.x, width, scratch);
  if (threadIdx.x == 0) {
    const double nn = static_cast<double>(G.n);
    out[blockIdx.x] = G.n > 0 ? static_cast<float>(G.cost(G.best()) / (nn * nn)) : 0.f;
  }
}

// Gradient of cost / n² w.r.t. the centred point i of x (`of_x`) or of y, whose partner in the chosen matching
// is p (centred): dS4/da - 2 dX/da.
__device__ __forceinline__ double gw_point_grad(const GwGraph& G, int matching, bool of_x, double a, double p) {
  const double nn = static_cast<double>(G.n);
  const double* c = G.s + kCross + 4 * matching;
  const double a1 = of_x ? G.s[kX1] : G.s[kY1], a2 = of_x ? G.s[kX2] : G.s[kY2];
  const double a3 = of_x ? G.s[kX3] : G.s[kY3];
  const double p1 = of_x ? G.s[kY1] : G.s[kX1], p2 = of_x ? G.s[kY2] : G.s[kX2];
  const double mixed = of_x ? c[kXYY] : c[kXXY];  // Σ a p² with a the differentiated cloud
  const double ds4 = 8 * nn * a * a * a - 24 * a * a * a1 - 8 * a3 + 24 * a2 * a;
  const double dx = 4 * a * p2 + 4 * nn * a * p * p - 8 * p1 * a * p - 4 * mixed - 4 * a1 * p * p + 8 * c[kXY] * p;
  return ds4 - 2 * dx;
}

// grad_x, grad_y (G, width): through the chosen matching and the centring (minus the mean over the n points);
// 0 beyond n and for n = 0.
static __global__ void __launch_bounds__(kClosedBlock)
    gw1d_backward_kernel(const float* __restrict__ grad, const float* __restrict__ x, const float* __restrict__ y,
                         const int64_t* __restrict__ lengths, int64_t width, float* __restrict__ grad_x,
                         float* __restrict__ grad_y) {
  __shared__ double scratch[kNumGwSums * (kClosedBlock / kWarp)];
  const int64_t g = blockIdx.x;
  const GwGraph G = gw_graph(x, y, lengths, g, width, scratch);
  const float* xr = x + g * width;
  const float* yr = y + g * width;
  const int matching = G.best();
  const double nn = static_cast<double>(G.n);
  const double scale = G.n > 0 ? static_cast<double>(grad[g]) / (nn * nn) : 0.0;
  auto centred_grads = [&](int64_t i, double& gx, double& gy) {
    const int64_t partner = matching == 0 ? i : G.n - 1 - i;
    const double a = xr[i] - G.mx, b = yr[i] - G.my;
    gx = scale * gw_point_grad(G, matching, true, a, yr[partner] - G.my);
    gy = scale * gw_point_grad(G, matching, false, b, xr[partner] - G.mx);
  };
  double mean[2] = {0.0, 0.0};
  for (int64_t i = threadIdx.x; i < G.n; i += blockDim.x) {
    double gx, gy;
    centred_grads(i, gx, gy);
    mean[0] += gx;
    mean[1] += gy;
  }
  block_sum<double, 2>(mean, scratch);
  const double inv_n = G.n > 0 ? 1.0 / nn : 0.0;
  for (int64_t i = threadIdx.x; i < width; i += blockDim.x) {
    double gx = 0.0, gy = 0.0;
    if (i < G.n) {
      centred_grads(i, gx, gy);
      gx -= mean[0] * inv_n;
      gy -= mean[1] * inv_n;
    }
    grad_x[g * width + i] = static_cast<float>(gx);
    grad_y[g * width + i] = static_cast<float>(gy);
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
