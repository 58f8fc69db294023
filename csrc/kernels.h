// The entry points of the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels, one signature per op (the
// schema of csrc/ops.cpp, which registers them per device).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <tuple>

namespace infigw {

using TopkDegreesFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& logits, const at::Tensor& row_graph, int64_t num_graphs, int64_t k, const std::string& values,
    double temperature, const std::string& nodes, const std::string& graph_norm, bool deterministic, bool check_data);
using TopkDegreesBackwardFn = at::Tensor(const at::Tensor& grad_degrees, const at::Tensor& logits,
                                         const at::Tensor& row_graph, const at::Tensor& kept_values,
                                         const at::Tensor& kept_ids, const at::Tensor& row_lse, int64_t num_graphs,
                                         const std::string& values, double temperature, const std::string& nodes,
                                         const std::string& graph_norm, bool check_data);
using SortedGw1dFn = at::Tensor(const at::Tensor& x, const at::Tensor& y, const at::Tensor& lengths, bool check_data);
using SortedGw1dBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& grad, const at::Tensor& x,
                                                                const at::Tensor& y, const at::Tensor& lengths,
                                                                bool check_data);

namespace cpu {
TopkDegreesFn topk_degrees;
TopkDegreesBackwardFn topk_degrees_backward;
SortedGw1dFn sorted_gw1d;
SortedGw1dBackwardFn sorted_gw1d_backward;
}  // namespace cpu

namespace cuda {
TopkDegreesFn topk_degrees;
TopkDegreesBackwardFn topk_degrees_backward;
SortedGw1dFn sorted_gw1d;
SortedGw1dBackwardFn sorted_gw1d_backward;
}  // namespace cuda

}  // namespace infigw
