// CPU kernels of the sorted closed forms (schemas in csrc/ops.cpp, math in shared/spec/GLD.md section 4):
// infigw::sorted_gw1d and its backward op, batched over lists (lists in parallel). The power sums are fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace infigw {
namespace cpu {
namespace {

void check_lists(const at::Tensor& f, const at::Tensor& g, const char* fname, const char* gname) {
  TORCH_CHECK_VALUE(f.device().is_cpu() && g.device().is_cpu(), fname, " and ", gname, " must be CPU tensors");
  TORCH_CHECK_VALUE(f.dim() == 2 && f.sizes() == g.sizes(), fname, " and ", gname,
                    " must both have shape (G, L), got ", f.sizes(), " and ", g.sizes());
  const bool floating = f.scalar_type() == at::kFloat || f.scalar_type() == at::kDouble;
  TORCH_CHECK_TYPE(f.scalar_type() == g.scalar_type() && floating, fname, " and ", gname,
                   " must both be float32 (or float64), got ", f.scalar_type(), " and ", g.scalar_type());
}

void check_grad(const at::Tensor& grad, int64_t lists) {
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == lists, "grad must have shape (", lists, ",), got ",
                    grad.sizes());
}

// Power sums of one pair of centred point lists u, v (n points each, v already in the matching's order).
struct PowerSums {
  double n, a1, a2, a3, a4, b1, b2, b3, b4, c11, c12, c21, c22;  // a: u, b: v, c_ij = sum u^i v^j

  // cost(u, v) = S4(u) + S4(v) - 2 X(u, v) of GLD.md section 4.
  double cost() const {
    const double s4u = 2 * n * a4 - 8 * a3 * a1 + 6 * a2 * a2;
    const double s4v = 2 * n * b4 - 8 * b3 * b1 + 6 * b2 * b2;
    const double cross = 2 * a2 * b2 + 2 * (n * c22 - 2 * b1 * c21 - 2 * a1 * c12 + 2 * c11 * c11);
    return s4u + s4v - 2 * cross;
  }
  // d cost / d u_i and d cost / d v_i at the point pair (u_i, v_i).
  double d_u(double u, double v) const {
    const double ds4 = 8 * n * u * u * u - 24 * u * u * a1 - 8 * a3 + 24 * a2 * u;
    const double dx = 4 * u * b2 + 4 * n * u * v * v - 8 * b1 * u * v - 4 * c12 - 4 * a1 * v * v + 8 * c11 * v;
    return ds4 - 2 * dx;
  }
  double d_v(double u, double v) const {
    const double ds4 = 8 * n * v * v * v - 24 * v * v * b1 - 8 * b3 + 24 * b2 * v;
    const double dx = 4 * v * a2 + 4 * n * v * u * u - 8 * a1 * u * v - 4 * c21 - 4 * b1 * u * u + 8 * c11 * u;
    return ds4 - 2 * dx;
  }
};

// Centred copies of the first n points of x and y, and the power sums of the identity (y_i with x_i) and the
// anti-identity (y_{n-1-i} with x_i) matchings.
template <typename scalar_t>
void gw1d_sums(const scalar_t* x, const scalar_t* y, int64_t n, std::vector<double>& u, std::vector<double>& v,
               PowerSums& identity, PowerSums& anti) {
  u.resize(n);
  v.resize(n);
  double mean_x = 0, mean_y = 0;
  for (int64_t i = 0; i < n; ++i) {
    mean_x += x[i];
    mean_y += y[i];
  }
  mean_x /= static_cast<double>(n);
  mean_y /= static_cast<double>(n);
  identity = PowerSums{static_cast<double>(n), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    u[i] = x[i] - mean_x;
    v[i] = y[i] - mean_y;
    const double u2 = u[i] * u[i], v2 = v[i] * v[i];
    identity.a1 += u[i];
    identity.a2 += u2;
    identity.a3 += u2 * u[i];
    identity.a4 += u2 * u2;
    identity.b1 += v[i];
    identity.b2 += v2;
    identity.b3 += v2 * v[i];
    identity.b4 += v2 * v2;
  }
  anti = identity;
  for (int64_t i = 0; i < n; ++i) {
    const double ui = u[i], vi = v[i], wi = v[n - 1 - i];
    identity.c11 += ui * vi;
    identity.c12 += ui * vi * vi;
    identity.c21 += ui * ui * vi;
    identity.c22 += ui * ui * vi * vi;
    anti.c11 += ui * wi;
    anti.c12 += ui * wi * wi;
    anti.c21 += ui * ui * wi;
    anti.c22 += ui * ui * wi * wi;
  }
}

void check_lengths(const at::Tensor& lengths, const at::Tensor& x) {
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == x.size(0), "lengths must have shape (", x.size(0),
                    ",), got ", lengths.sizes());
  TORCH_CHECK_VALUE(lengths.device().is_cpu(), "lengths must be a CPU tensor");
  if (lengths.numel() > 0) {
    const auto bounds = at::aminmax(lengths);
    TORCH_CHECK_VALUE(std::get<0>(bounds).item<int64_t>() >= 0 && std::get<1>(bounds).item<int64_t>() <= x.size(1),
                      "lengths must lie in [0, L=", x.size(1), "]");
  }
}

at::Tensor sorted_gw1d_cpu(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& lengths_in) {
  check_lists(x_in, y_in, "x", "y");
  check_lengths(lengths_in, x_in);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t lists = x.size(0), width = x.size(1);
  at::Tensor out = at::empty({lists}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "infigw_sorted_gw1d", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, lists, 1, [&](int64_t b, int64_t e) {
      std::vector<double> u, v;
      PowerSums identity, anti;
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = len[i];
        if (n == 0) {
          o[i] = 0;
          continue;
        }
        gw1d_sums(xp + i * width, yp + i * width, n, u, v, identity, anti);
        const double best = std::min(identity.cost(), anti.cost());
        o[i] = static_cast<scalar_t>(best / (static_cast<double>(n) * n));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sorted_gw1d_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                            const at::Tensor& y_in, const at::Tensor& lengths_in) {
  check_lists(x_in, y_in, "x", "y");
  check_lengths(lengths_in, x_in);
  check_grad(grad_in, x_in.size(0));
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), lengths = lengths_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  const int64_t lists = x.size(0), width = x.size(1);
  at::Tensor grad_x = at::zeros_like(x), grad_y = at::zeros_like(y);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "infigw_sorted_gw1d_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    const double* go = grad.data_ptr<double>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    at::parallel_for(0, lists, 1, [&](int64_t b, int64_t e) {
      std::vector<double> u, v;
      PowerSums identity, anti;
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = len[i];
        if (n == 0) continue;
        gw1d_sums(xp + i * width, yp + i * width, n, u, v, identity, anti);
        // The result follows the chosen matching (identity on a tie); the cost is translation invariant, so the
        // gradient w.r.t. the centred points is the gradient w.r.t. x and y.
        const bool use_identity = identity.cost() <= anti.cost();
        const PowerSums& sums = use_identity ? identity : anti;
        const double scale = go[i] / (static_cast<double>(n) * n);
        for (int64_t j = 0; j < n; ++j) {
          const int64_t partner = use_identity ? j : n - 1 - j;  // y index matched with x_j
          gx[i * width + j] = static_cast<scalar_t>(scale * sums.d_u(u[j], v[partner]));
          gy[i * width + partner] = static_cast<scalar_t>(scale * sums.d_v(u[j], v[partner]));
        }
      }
    });
  });
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace cpu
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CPU, m) {
  m.impl("sorted_gw1d", &infigw::cpu::sorted_gw1d_cpu);
  m.impl("sorted_gw1d_backward", &infigw::cpu::sorted_gw1d_backward_cpu);
}
