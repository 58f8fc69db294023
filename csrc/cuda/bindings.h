// What the torch bindings of the CUDA kernels (csrc/cuda/*.cu) share beyond the argument checks of
// csrc/op_checks.h: CUDA-only checks, launch errors, and the dtype dispatch of the logits.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "op_checks.h"

namespace infigw {
namespace cuda {

inline void check_launch(cudaError_t err) { C10_CUDA_CHECK(err); }

inline void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  check_same_device(t, name, like);
}

// Logits the CUDA kernels take: float32, float16 or bfloat16 on a CUDA device, with fewer than 2^31 columns.
inline void check_cuda_logits(const at::Tensor& logits, const char* name = "logits") {
  TORCH_CHECK_VALUE(logits.is_cuda(), name, " must be a CUDA tensor, got one on ", logits.device());
  check_logits(logits, /*allow_fp64=*/false, name);
  TORCH_CHECK_VALUE(logits.size(1) < (int64_t{1} << 31), name, " must have fewer than 2^31 columns, got ",
                    logits.size(1));
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
