// CUDA kernels of infigw::sorted_gw1d and its backward (schemas in csrc/ops.cpp):
// thin bindings over closed_forms.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "bindings.h"
#include "closed_forms.cuh"

namespace infigw {
namespace cuda {
namespace {

using at::Tensor;

void check_lists(const Tensor& a, const char* name_a, const Tensor& b, const char* name_b) {
  TORCH_CHECK_VALUE(a.is_cuda(), name_a, " must be a CUDA tensor, got one on ", a.device());
  TORCH_CHECK_VALUE(a.dim() == 2, name_a, " must be 2-D (graphs, length), got shape ", a.sizes());
  check_f32(a, name_a, a, a.sizes());
  check_f32(b, name_b, a, a.sizes());
}

void check_grad(const Tensor& grad, const Tensor& like) { check_f32(grad, "grad", like, {like.size(0)}); }

void check_lengths(const Tensor& lengths, const Tensor& like) {
  check_cuda(lengths, "lengths", like);
  TORCH_CHECK_TYPE(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == like.size(0), "lengths must have shape (",
                    like.size(0), ",), got ", lengths.sizes());
}

Tensor sorted_gw1d_cuda(const Tensor& x_in, const Tensor& y_in, const Tensor& lengths_in) {
  check_lists(x_in, "x", y_in, "y");
  check_lengths(lengths_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), y = y_in.contiguous(), lengths = lengths_in.contiguous();
  Tensor out = at::empty({x.size(0)}, x.options());
  if (x.size(0) > 0) {
    check_launch(launch_gw1d(x.data_ptr<float>(), y.data_ptr<float>(), lengths.data_ptr<int64_t>(), x.size(0),
                             x.size(1), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  }
  return out;
}

std::tuple<Tensor, Tensor> sorted_gw1d_backward_cuda(const Tensor& grad_in, const Tensor& x_in, const Tensor& y_in,
                                                     const Tensor& lengths_in) {
  check_lists(x_in, "x", y_in, "y");
  check_grad(grad_in, x_in);
  check_lengths(lengths_in, x_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor grad = grad_in.contiguous(), x = x_in.contiguous(), y = y_in.contiguous();
  const Tensor lengths = lengths_in.contiguous();
  Tensor grad_x = at::empty_like(x), grad_y = at::empty_like(y);
  if (x.size(0) > 0) {
    check_launch(launch_gw1d_backward(grad.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(),
                                      lengths.data_ptr<int64_t>(), x.size(0), x.size(1), grad_x.data_ptr<float>(),
                                      grad_y.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  }
  return {grad_x, grad_y};
}

}  // namespace
}  // namespace cuda
}  // namespace infigw

TORCH_LIBRARY_IMPL(infigw, CUDA, m) {
  m.impl("sorted_gw1d", &infigw::cuda::sorted_gw1d_cuda);
  m.impl("sorted_gw1d_backward", &infigw::cuda::sorted_gw1d_backward_cuda);
}
