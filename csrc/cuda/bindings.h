// Argument checks and dtype dispatch shared by the torch bindings of the CUDA kernels (csrc/cuda/*.cu).
// Errors surface in Python as ValueError (TORCH_CHECK_VALUE) or TypeError (TORCH_CHECK_TYPE).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <vector>

#include "common.cuh"

namespace infigw {
namespace cuda {

inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

inline void check_logits(const at::Tensor& logits, const char* name) {
  TORCH_CHECK_VALUE(logits.is_cuda(), name, " must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK_VALUE(logits.dim() == 2, name, " must be 2-D (rows, vocab), got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, name,
                   " must be float32, float16 or bfloat16 for the CUDA kernels, got ", dtype);
  TORCH_CHECK_VALUE(logits.size(1) >= 1 && logits.size(1) < (int64_t{1} << 31), name,
                    " must have a vocabulary size in [1, 2^31), got ", logits.size(1));
}

inline void check_row_graph(const at::Tensor& row_graph, const at::Tensor& logits, int64_t rows) {
  check_cuda(row_graph, "row_graph", logits);
  TORCH_CHECK_TYPE(row_graph.scalar_type() == at::kLong, "row_graph must be int64, got ", row_graph.scalar_type());
  TORCH_CHECK_VALUE(row_graph.dim() == 1 && row_graph.size(0) == rows, "row_graph must have shape (", rows,
                    ",), got ", row_graph.sizes());
}

inline void check_modes(int64_t num_graphs, int64_t values_mode, double temperature, int64_t nodes_mode,
                        int64_t norm_mode) {
  TORCH_CHECK_VALUE(num_graphs >= 0, "num_graphs must be >= 0, got ", num_graphs);
  TORCH_CHECK_VALUE(values_mode >= kValuesLogits && values_mode <= kValuesTopkProbs,
                    "values_mode must be 0 (logits), 1 (probs) or 2 (topk_probs), got ", values_mode);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a positive number, got ",
                    temperature);
  TORCH_CHECK_VALUE(nodes_mode == kNodesVocab || nodes_mode == kNodesRank,
                    "nodes_mode must be 0 (vocab) or 1 (rank), got ", nodes_mode);
  TORCH_CHECK_VALUE(norm_mode >= kNormMean && norm_mode <= kNormCosine,
                    "norm_mode must be 0 (mean), 1 (sum) or 2 (cosine), got ", norm_mode);
}

inline void check_f32(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef shape) {
  check_cuda(t, name, like);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

inline void check_kept(const at::Tensor& kept_values, const at::Tensor& kept_ids, const at::Tensor& like,
                       int64_t rows) {
  TORCH_CHECK_VALUE(kept_values.dim() == 2 && kept_values.size(0) == rows,
                    "kept_values must have shape (", rows, ", k), got ", kept_values.sizes());
  check_f32(kept_values, "kept_values", like, kept_values.sizes());
  check_cuda(kept_ids, "kept_ids", like);
  TORCH_CHECK_TYPE(kept_ids.scalar_type() == at::kLong, "kept_ids must be int64, got ", kept_ids.scalar_type());
  TORCH_CHECK_VALUE(kept_ids.sizes() == kept_values.sizes(), "kept_ids must have the shape of kept_values ",
                    kept_values.sizes(), ", got ", kept_ids.sizes());
}

// Calls fn(const T* data) with T the CUDA element type of the float32/float16/bfloat16 tensor.
template <typename Fn>
void dispatch_logits(const at::Tensor& logits, Fn&& fn) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      fn(static_cast<const float*>(logits.data_ptr()));
      break;
    case at::kHalf:
      fn(static_cast<const __half*>(logits.data_ptr()));
      break;
    case at::kBFloat16:
      fn(static_cast<const __nv_bfloat16*>(logits.data_ptr()));
      break;
    default:
      TORCH_CHECK_TYPE(false, "logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

}  // namespace cuda
}  // namespace infigw
