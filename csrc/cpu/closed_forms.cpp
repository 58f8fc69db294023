// CPU kernels of the 1-D GW closed form (schemas in csrc/ops.cpp, math in docs/math.md §4 and the shared
// formulas of csrc/formulas.h): infigw::sorted_gw1d and its backward op, batched over lists (lists in
// parallel). The means and power sums are fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>

#include "formulas.h"
#include "kernels.h"
#include "op_checks.h"

namespace infigw {
namespace cpu {
namespace {

// The n points of one pair of lists, with their means and power sums.
template <typename scalar_t>
struct PointPair {
  const scalar_t* x;
  const scalar_t* y;
  int64_t n;
  double mean_x = 0, mean_y = 0;
  bool has_nan = false;
  Gw1dSums sums;

  PointPair(const scalar_t* x_, const scalar_t* y_, int64_t n_) : x(x_), y(y_), n(n_) {
    for (int64_t i = 0; i < n; ++i) {
      mean_x += x[i];
      mean_y += y[i];
      has_nan |= std::isnan(static_cast<double>(x[i])) || std::isnan(static_cast<double>(y[i]));
    }
    mean_x /= static_cast<double>(n);
    mean_y /= static_cast<double>(n);
    if (!finite()) return;
    for (int64_t i = 0; i < n; ++i) {
      for (int matching : {kIdentity, kAntiIdentity}) {
        double d, s;
        centred(i, matching, d, s);
        sums.add(matching, d, s);
      }
    }
  }
  // False when a point is infinite or NaN: the cost is then +inf (NaN if a point is NaN) and no gradient flows.
  bool finite() const { return std::isfinite(mean_x) && std::isfinite(mean_y); }
  int64_t partner(int64_t i, int matching) const { return matching == kIdentity ? i : n - 1 - i; }
  void centred(int64_t i, int matching, double& d, double& s) const {
    Gw1dSums::centred(x[i], y[partner(i, matching)], mean_x, mean_y, d, s);
  }
  double result() const {
    if (!finite()) return has_nan ? std::numeric_limits<double>::quiet_NaN() : INFINITY;
    const double nn = static_cast<double>(n);
    return std::min(sums.cost(kIdentity, nn), sums.cost(kAntiIdentity, nn)) / (nn * nn);
  }
};

}  // namespace

at::Tensor sorted_gw1d(const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& lengths_in, bool check_data) {
  (void)check_data;  // the CPU kernels always scan the lengths they follow
  check_point_lists(x_in, y_in, lengths_in, /*allow_fp64=*/true);
  check_index_range(lengths_in, "lengths", 0, x_in.size(1) + 1);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous(), lengths = lengths_in.contiguous();
  const int64_t lists = x.size(0), width = x.size(1);
  at::Tensor out = at::empty({lists}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "infigw_sorted_gw1d", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t* len = lengths.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, lists, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        o[i] = len[i] == 0 ? scalar_t(0)
                           : static_cast<scalar_t>(PointPair<scalar_t>(xp + i * width, yp + i * width, len[i]).result());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> sorted_gw1d_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& y_in, const at::Tensor& lengths_in,
                                                        bool check_data) {
  (void)check_data;
  check_point_lists(x_in, y_in, lengths_in, /*allow_fp64=*/true);
  check_point_grad(grad_in, x_in);
  check_index_range(lengths_in, "lengths", 0, x_in.size(1) + 1);
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
      for (int64_t i = b; i < e; ++i) {
        const int64_t n = len[i];
        if (n == 0) continue;
        const PointPair<scalar_t> pair(xp + i * width, yp + i * width, n);
        if (!pair.finite()) continue;
        // the gradient follows the chosen matching (identity on a tie)
        const double nn = static_cast<double>(n);
        const int matching = pair.sums.best(nn);
        const double scale = go[i] / (nn * nn);
        for (int64_t j = 0; j < n; ++j) {
          double d, s;
          pair.centred(j, matching, d, s);
          const double by_d = pair.sums.grad_d(matching, nn, d, s), by_s = pair.sums.grad_s(matching, nn, d, s);
          gx[i * width + j] = static_cast<scalar_t>(scale * (by_d + by_s));
          gy[i * width + pair.partner(j, matching)] = static_cast<scalar_t>(scale * (by_s - by_d));
        }
      }
    });
  });
  return {grad_x, grad_y};
}

}  // namespace cpu
}  // namespace infigw
