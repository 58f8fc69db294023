// CUDA kernels of infigw::sorted_gw1d and its backward (schemas in csrc/ops.cpp): thin bindings over
// closed_forms.cuh. The lengths are scanned only with check_data=true (a host sync); the kernels clamp them.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "bindings.h"
#include "closed_forms.cuh"
#include "kernels.h"

namespace infigw {
namespace cuda {
namespace {

using at::Tensor;

void check_lists(const Tensor& x, const Tensor& y, const Tensor& lengths, bool check_data) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got one on ", x.device());
  check_point_lists(x, y, lengths, /*allow_fp64=*/false);
  if (check_data) check_index_range(lengths, "lengths", 0, x.size(1) + 1);
}

}  // namespace

Tensor sorted_gw1d(const Tensor& x_in, const Tensor& y_in, const Tensor& lengths_in, bool check_data) {
  check_lists(x_in, y_in, lengths_in, check_data);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), lengths = lengths_in.contiguous();
  Tensor out = at::empty({x.size(0)}, x.options());
  if (x.size(0) > 0) {
    check_launch(launch_gw1d(x.data_ptr<float>(), y.data_ptr<float>(), lengths.data_ptr<int64_t>(), x.size(0),
                             x.size(1), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  }
  return out;
}

std::tuple<Tensor, Tensor> sorted_gw1d_backward(const Tensor& grad_in, const Tensor& x_in, const Tensor& y_in,
                                                const Tensor& lengths_in, bool check_data) {
  check_lists(x_in, y_in, lengths_in, check_data);
  check_point_grad(grad_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor grad = grad_in.to(at::kFloat).contiguous(), x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  Tensor grad_x = at::empty_like(x), grad_y = at::empty_like(y);
  if (x.size(0) > 0) {
    check_launch(launch_gw1d_backward(grad.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(),
                                      lengths.data_ptr<int64_t>(), x.size(0), x.size(1), grad_x.data_ptr<float>(),
                                      grad_y.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  }
  return {grad_x, grad_y};
}

}  // namespace cuda
}  // namespace infigw
