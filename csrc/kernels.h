// The entry points of the CPU (csrc/cpu/*.cpp) and CUDA (csrc/cuda/*.cu) kernels, one signature per op (the
// schema of csrc/ops.cpp, which registers them per device).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

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
using UldFullFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& partner, double temperature,
    bool teacher_probs, bool keep_signs);
using UldFullBackwardFn = at::Tensor(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& partner, const at::Tensor& student_lse,
                                     const at::Tensor& teacher_lse, const at::Tensor& signs, const at::Tensor& dot,
                                     double temperature, bool teacher_probs);
using TopkSummaryFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor>(
    const at::Tensor& logits, const at::Tensor& row_valid, int64_t k, double temperature,
    const c10::optional<at::Tensor>& gold, bool unit_lse, at::TensorList teachers, const at::Tensor& partners,
    const c10::List<bool>& teacher_probs, bool keep_signs);
using TopkSummaryBackwardFn = at::Tensor(
    const at::Tensor& grad_kept, const at::Tensor& grad_lse, const at::Tensor& grad_unit, const at::Tensor& grad_gold,
    const at::Tensor& grad_uld, const at::Tensor& logits, const at::Tensor& row_valid, const at::Tensor& ids,
    const at::Tensor& lse, const at::Tensor& unit, const c10::optional<at::Tensor>& gold, double temperature,
    at::TensorList teachers, const at::Tensor& partners, const c10::List<bool>& teacher_probs,
    const at::Tensor& teacher_lse, const at::Tensor& signs, const at::Tensor& uld_dot);

namespace cpu {
TopkDegreesFn topk_degrees;
TopkDegreesBackwardFn topk_degrees_backward;
SortedGw1dFn sorted_gw1d;
SortedGw1dBackwardFn sorted_gw1d_backward;
UldFullFn uld_full;
UldFullBackwardFn uld_full_backward;
TopkSummaryFn topk_summary;  // the GPU summary is Triton's (infigw/triton/topk_summary.py)
TopkSummaryBackwardFn topk_summary_backward;
}  // namespace cpu

namespace cuda {
TopkDegreesFn topk_degrees;
TopkDegreesBackwardFn topk_degrees_backward;
SortedGw1dFn sorted_gw1d;
SortedGw1dBackwardFn sorted_gw1d_backward;
UldFullFn uld_full;
UldFullBackwardFn uld_full_backward;
}  // namespace cuda

}  // namespace infigw
