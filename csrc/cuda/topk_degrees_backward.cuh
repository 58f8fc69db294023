// The backward of the fused top-k -> degrees op (docs/math.md §6): the gradient w.r.t. the kept slots (one
// warp per row), then w.r.t. the logits. Torch-free kernel bodies and launchers; the torch binding is
// topk_degrees.cu.
//
// With gd = grad_degrees[g, node] per slot and s = sum of the row's node values, the gradient of a slot's
// node value is gb_r = (gd_r s + sum_r' gd_r' b_r') / c (c only for the mean norm; s and the sum in fp64 like the
// forward's terms). Under the cosine norm b = u Q^-1/2 and the gradient reaching the slot is
// cosine_input_grad(gb, b, z) of csrc/formulas.h with z = sum of gb b over the node's slots (a first pass).
// What a slot passes on is g = dL/da for values="logits" and g = dL/d(log a) for the probability values
// (bounded however small a is). Then to the logits: logits: gx[id_r] = g_r; topk_probs: gx[id_r] =
// (g_r - a_r q) / T with q = sum g; probs: gx_j = -p_j q / T for every j, and (g_r - a_r q) / T at the kept ids.
#pragma once

#include "kept_rows.cuh"

namespace infigw {
namespace cuda {

enum BackwardStage { kStageCosineZ = 0, kStageGrad = 1 };

struct BackwardRows {
  KeptRows kept;
  const float* grad_degrees;  // (G, num_nodes)
  double* z;                  // cosine: (G, num_nodes) sums of gb b per node
  int values_mode;
  float inv_temperature;
};

// kStageCosineZ scatters z; kStageGrad writes the logits gradient of the k-sparse modes into grad_logits
// (zero-filled beforehand) or, for probs, g into grad_log_a (rows, k).
template <typename T>
static __global__ void degrees_backward_rows_kernel(BackwardRows B, int stage, T* grad_logits, float* grad_log_a) {
  const KeptRows& R = B.kept;
  const bool cosine = R.node_max != nullptr;
  const int lane = threadIdx.x % kWarp;
  for (int64_t row = first_warp_row(); row < R.rows; row += warp_row_stride()) {
    WarpRow w;
    w.load(R, row);
    if (w.g < 0) {
      if (grad_log_a && stage == kStageGrad) {
        for (int r = lane; r < R.k; r += kWarp) grad_log_a[row * R.k + r] = 0.f;
      }
      continue;
    }
    float gamma[kMaxKPerLane], b[kMaxKPerLane], g[kMaxKPerLane];
    double wide_b[kMaxKPerLane], gamma_b[kMaxKPerLane];
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      gamma[i] = w.at[i] >= 0 ? B.grad_degrees[w.at[i]] : 0.f;
      b[i] = w.contributed(R, i);
      wide_b[i] = b[i];
      gamma_b[i] = static_cast<double>(gamma[i]) * b[i];
    }
    const double s = w.sum(wide_b), t = w.sum(gamma_b);
    const double inv_c = (!cosine && R.row_counts) ? 1.0 / static_cast<double>(R.row_counts[w.g]) : 1.0;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) g[i] = static_cast<float>((gamma[i] * s + t) * inv_c);  // gb
    if (stage == kStageCosineZ) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) {
        if (w.at[i] >= 0) atomicAdd(B.z + w.at[i], static_cast<double>(g[i]) * b[i]);
      }
      continue;
    }
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      if (cosine) {
        g[i] = w.at[i] < 0 ? 0.f
                           : cosine_input_grad(g[i], b[i], static_cast<float>(B.z[w.at[i]]), R.inv_sqrt_q[w.at[i]],
                                               R.node_max[w.at[i]], R.kept_logs != nullptr);
      } else if (B.values_mode != kValuesLogits) {
        g[i] *= w.a[i];
      }
    }
    if (grad_log_a) {
#pragma unroll
      for (int i = 0; i < kMaxKPerLane; ++i) {
        const int r = lane + kWarp * i;
        if (r < R.k) grad_log_a[row * R.k + r] = g[i];
      }
      continue;
    }
    const float q = B.values_mode == kValuesTopkProbs ? w.sum(g) : 0.f;
#pragma unroll
    for (int i = 0; i < kMaxKPerLane; ++i) {
      const int r = lane + kWarp * i;
      if (r >= R.k || w.at[i] < 0) continue;
      const float gx = B.values_mode == kValuesTopkProbs ? (g[i] - w.a[i] * q) * B.inv_temperature : g[i];
      store_float(grad_logits + row * R.vocab + R.kept_ids[row * R.k + r], gx);
    }
  }
}

constexpr int kDenseBlock = 256;

// values="probs": the dense softmax part of the logits gradient, one block per row, one write per logit
// (and one read of the logits to recompute p_j); masked rows get zeros.
template <typename T>
static __global__ void __launch_bounds__(kDenseBlock)
    probs_backward_kernel(const T* __restrict__ logits, const float* __restrict__ row_lse,
                          const int64_t* __restrict__ row_graph, int64_t num_graphs,
                          const float* __restrict__ kept_values, const int64_t* __restrict__ kept_ids,
                          const float* __restrict__ grad_log_a, int k, int64_t vocab, float inv_temperature,
                          T* __restrict__ grad_logits) {
  constexpr int kVec = Vec<T>::kVec;
  __shared__ float reduce[kDenseBlock / kWarp];
  const int64_t row = blockIdx.x;
  const bool valid = graph_of(row_graph, row, num_graphs) >= 0;
  const int r = threadIdx.x;
  const bool slot = valid && r < k;
  const float a = slot ? kept_values[row * k + r] : 0.f;
  const float g = slot ? grad_log_a[row * k + r] : 0.f;
  const float q = block_sum1(g, reduce);
  const float lse = row_lse[row];
  const float coef = -q * inv_temperature;
  const T* x = logits + row * vocab;
  T* gx = grad_logits + row * vocab;
  auto dense = [&](uint32_t bits) {
    return valid ? coef * __expf(Elem<T>::to_float(bits) * inv_temperature - lse) : 0.f;
  };
  const int64_t head = misaligned_head(gx, vocab);
  // logits and grad rows share the alignment only when both bases do; otherwise go scalar.
  const bool vectors = ((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(gx)) & 15) == 0;
  const int64_t nvec = vectors ? (vocab - head) / kVec : 0;
  const int64_t body_end = vectors ? head + nvec * kVec : 0;
  for (int64_t j = threadIdx.x; j < (vectors ? head : vocab); j += blockDim.x) {
    store_float(gx + j, dense(Elem<T>::load_bits(x + j)));
  }
  const uint4* xv = reinterpret_cast<const uint4*>(x + head);
  uint4* gv = reinterpret_cast<uint4*>(gx + head);
  for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
    const uint4 in = __ldcs(xv + i);
    float out[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = dense(Vec<T>::bits(in, j));
    __stcs(gv + i, pack_vec<T>(out));
  }
  for (int64_t j = body_end + threadIdx.x; vectors && j < vocab; j += blockDim.x) {
    store_float(gx + j, dense(Elem<T>::load_bits(x + j)));
  }
  __syncthreads();  // the kept ids below overwrite values written by other threads of the block
  const int64_t id = slot ? kept_ids[row * k + r] : -1;
  if (id >= 0 && id < vocab) store_float(gx + id, (g - a * q) * inv_temperature);  // an out-of-range id is skipped
}

// ---- launchers (host) -------------------------------------------------------------------------------------

template <typename T>
cudaError_t launch_degrees_backward_rows(const BackwardRows& B, int stage, T* grad_logits, float* grad_log_a,
                                         cudaStream_t stream) {
  degrees_backward_rows_kernel<T><<<warp_rows_grid(B.kept.rows), kRowsBlock, 0, stream>>>(B, stage, grad_logits,
                                                                                         grad_log_a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_probs_backward(const T* logits, const float* row_lse, const int64_t* row_graph,
                                  int64_t num_graphs, const float* kept_values, const int64_t* kept_ids,
                                  const float* grad_log_a, int k, int64_t rows, int64_t vocab,
                                  float inv_temperature, T* grad_logits, cudaStream_t stream) {
  probs_backward_kernel<T><<<static_cast<unsigned>(rows), kDenseBlock, 0, stream>>>(
      logits, row_lse, row_graph, num_graphs, kept_values, kept_ids, grad_log_a, k, vocab, inv_temperature,
      grad_logits);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace infigw
