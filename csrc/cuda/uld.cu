// CUDA kernels of infigw::uld_full and infigw::uld_full_backward (schemas in csrc/ops.cpp). Thin binding: argument
// checks, the scratch of one chunk of rows, and the launches of the torch-free kernels in uld.cuh.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>

#include "bindings.h"
#include "kernels.h"
#include "uld.cuh"

namespace infigw {
namespace cuda {
namespace {

using at::Tensor;

// Scratch of a chunk of rows: about 24 bytes per vocabulary entry of both rows (backward: 4 more per student
// entry). Chunks hold it near kChunkBytes, and CUB's int offsets below 2^31.
constexpr int64_t kChunkBytes = int64_t(1) << 30;

struct Inputs {
  Tensor student, teacher, partner;
};

// Teacher rows as the kernels read them: logits in the student's dtype, or float32 probabilities.
Inputs check_inputs(const Tensor& student, const Tensor& teacher, const Tensor& partner, double temperature,
                    bool teacher_probs) {
  check_cuda_logits(student, "student");
  check_cuda(teacher, "teacher", student);
  TORCH_CHECK_TYPE(at::isFloatingType(teacher.scalar_type()), "teacher must be floating point, got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(1) >= 1 && teacher.size(1) < (int64_t{1} << 31),
                    "teacher must have shape (M, V_t) with 1 <= V_t < 2^31, got ", teacher.sizes());
  check_cuda(partner, "partner", student);
  TORCH_CHECK_TYPE(partner.scalar_type() == at::kLong, "partner must be int64, got ", partner.scalar_type());
  TORCH_CHECK_VALUE(partner.dim() == 1 && partner.size(0) == student.size(0), "partner must have shape (",
                    student.size(0), ",), got ", partner.sizes());
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, "temperature must be a positive finite number, got ",
                    temperature);
  const at::ScalarType teacher_dtype = teacher_probs ? at::kFloat : student.scalar_type();
  return {student.contiguous(), teacher.to(teacher_dtype).contiguous(), partner.contiguous()};
}

// The scratch tensors of one chunk and the kernels' view of them.
struct Chunk {
  Tensor signs, above, mixed_p_keys, mixed_p_ids, mixed_q_keys, sorted_p_keys, sorted_p_ids, sorted_q_keys,
      offsets, decided, invalid, mixed_signs, dot, sort_temp;
  UldChunk view;

  Chunk(const Inputs& in, int64_t rows, bool backward, float inv_temperature, bool teacher_probs, Tensor& student_lse,
        Tensor& teacher_lse, cudaStream_t stream) {
    const int64_t vocab = in.student.size(1), teacher_vocab = in.teacher.size(1);
    const auto u32 = in.student.options().dtype(at::kInt), f32 = in.student.options().dtype(at::kFloat);
    signs = at::empty({rows, kUldBins}, in.student.options().dtype(at::kChar));
    above = at::empty({rows, 2, kUldBins}, u32);
    mixed_p_keys = at::empty({rows * vocab}, u32);
    mixed_p_ids = at::empty({rows * vocab}, u32);
    mixed_q_keys = at::empty({rows * teacher_vocab}, u32);
    sorted_p_keys = at::empty_like(mixed_p_keys);
    sorted_p_ids = at::empty_like(mixed_p_ids);
    sorted_q_keys = at::empty_like(mixed_q_keys);
    offsets = at::empty({4, rows}, u32);
    decided = at::empty({2, rows}, f32);
    invalid = at::empty({rows}, u32);
    mixed_signs = backward ? at::empty({rows, vocab}, f32) : Tensor();
    dot = backward ? at::empty({rows}, f32) : Tensor();
    UldChunk& C = view;
    C.row_begin = 0;
    C.rows = rows;
    C.vocab = vocab;
    C.teacher_vocab = teacher_vocab;
    C.teacher_rows = in.teacher.size(0);
    C.partner = in.partner.data_ptr<int64_t>();
    C.teacher = in.teacher.data_ptr();
    C.teacher_probs = teacher_probs;
    C.inv_temperature = inv_temperature;
    C.compute_lse = !backward;
    C.student_lse = student_lse.data_ptr<float>();
    C.teacher_lse = teacher_lse.data_ptr<float>();
    C.signs = signs.data_ptr<int8_t>();
    C.above = above.data_ptr<int>();
    C.mixed_p_keys = reinterpret_cast<uint32_t*>(mixed_p_keys.data_ptr<int>());
    C.mixed_p_ids = reinterpret_cast<uint32_t*>(mixed_p_ids.data_ptr<int>());
    C.mixed_q_keys = reinterpret_cast<uint32_t*>(mixed_q_keys.data_ptr<int>());
    C.sorted_p_keys = reinterpret_cast<uint32_t*>(sorted_p_keys.data_ptr<int>());
    C.sorted_p_ids = reinterpret_cast<uint32_t*>(sorted_p_ids.data_ptr<int>());
    C.sorted_q_keys = reinterpret_cast<uint32_t*>(sorted_q_keys.data_ptr<int>());
    int* offset = offsets.data_ptr<int>();
    C.begin_p = offset;
    C.end_p = offset + rows;
    C.begin_q = offset + 2 * rows;
    C.end_q = offset + 3 * rows;
    C.decided_p = decided.data_ptr<float>();
    C.decided_q = C.decided_p + rows;
    C.invalid = invalid.data_ptr<int>();
    C.mixed_signs = backward ? mixed_signs.data_ptr<float>() : nullptr;
    size_t bytes = 0;
    check_launch(launch_uld_sort(nullptr, bytes, C, stream));
    sort_temp = at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 1))}, in.student.options().dtype(at::kByte));
  }
};

int64_t chunk_rows(const Inputs& in, bool backward) {
  const int64_t vocab = in.student.size(1), teacher_vocab = in.teacher.size(1);
  const int64_t per_row = 16 * vocab + 8 * teacher_vocab + 12 * kUldBins + (backward ? 4 * vocab : 0);
  const int64_t by_memory = std::max<int64_t>(1, kChunkBytes / per_row);
  const int64_t by_offsets = std::numeric_limits<int>::max() / std::max(vocab, teacher_vocab);
  return std::max<int64_t>(1, std::min({in.student.size(0), by_memory, by_offsets}));
}

// Runs `step(chunk view, student data)` over the chunks of rows.
template <typename Step>
void for_each_chunk(const Inputs& in, bool backward, double temperature, bool teacher_probs, Tensor& student_lse,
                    Tensor& teacher_lse, cudaStream_t stream, Step step) {
  const int64_t rows = in.student.size(0);
  if (rows == 0) return;
  const int64_t per_chunk = chunk_rows(in, backward);
  Chunk chunk(in, per_chunk, backward, static_cast<float>(1.0 / temperature), teacher_probs, student_lse, teacher_lse,
              stream);
  for (int64_t begin = 0; begin < rows; begin += per_chunk) {
    UldChunk C = chunk.view;
    C.row_begin = begin;
    C.rows = std::min(per_chunk, rows - begin);
    dispatch_logits(in.student, [&](auto* data) { step(C, data, chunk); });
  }
}

}  // namespace

// keep_signs is ignored: signs of every row would cost an (N, V) fp32 buffer on the GPU; backward recomputes.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> uld_full(const Tensor& student_in, const Tensor& teacher_in,
                                                            const Tensor& partner_in, double temperature,
                                                            bool teacher_probs, bool keep_signs) {
  (void)keep_signs;
  const c10::cuda::CUDAGuard guard(student_in.device());
  const Inputs in = check_inputs(student_in, teacher_in, partner_in, temperature, teacher_probs);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto f32 = in.student.options().dtype(at::kFloat);
  Tensor loss = at::zeros({in.student.size(0)}, f32);
  Tensor student_lse = at::zeros({in.student.size(0)}, f32), teacher_lse = at::zeros({in.student.size(0)}, f32);
  for_each_chunk(in, false, temperature, teacher_probs, student_lse, teacher_lse, stream,
                 [&](const UldChunk& C, auto* data, Chunk& chunk) {
                   size_t bytes = chunk.sort_temp.numel();
                   check_launch(launch_uld_bins(data, C, stream));
                   check_launch(launch_uld_sort(chunk.sort_temp.data_ptr(), bytes, C, stream));
                   check_launch(launch_uld_resolve(C, loss.data_ptr<float>(), nullptr, stream));
                 });
  return {loss, student_lse, teacher_lse, at::empty({0, in.student.size(1)}, f32), at::empty({0}, f32)};
}


Tensor uld_full_backward(const Tensor& grad_in, const Tensor& student_in, const Tensor& teacher_in,
                         const Tensor& partner_in, const Tensor& student_lse_in, const Tensor& teacher_lse_in,
                         const Tensor& signs, const Tensor& dot, double temperature, bool teacher_probs) {
  TORCH_CHECK_VALUE(signs.numel() == 0 && dot.numel() == 0, "the CUDA kernels keep no signs: signs and dot must be "
                    "empty, got shapes ", signs.sizes(), " and ", dot.sizes());
  const c10::cuda::CUDAGuard guard(student_in.device());
  const Inputs in = check_inputs(student_in, teacher_in, partner_in, temperature, teacher_probs);
  const int64_t rows = in.student.size(0);
  for (const Tensor* t : {&grad_in, &student_lse_in, &teacher_lse_in}) check_cuda(*t, "grad and the logsumexps", in.student);
  TORCH_CHECK_VALUE(grad_in.numel() == rows && student_lse_in.numel() == rows && teacher_lse_in.numel() == rows,
                    "grad, student_lse and teacher_lse must have shape (", rows, ",)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Tensor grad = grad_in.to(at::kFloat).contiguous();
  Tensor student_lse = student_lse_in.to(at::kFloat).contiguous(), teacher_lse = teacher_lse_in.to(at::kFloat).contiguous();
  Tensor out = at::empty_like(in.student);
  for_each_chunk(in, true, temperature, teacher_probs, student_lse, teacher_lse, stream,
                 [&](const UldChunk& C, auto* data, Chunk& chunk) {
                   using T = std::remove_const_t<std::remove_pointer_t<decltype(data)>>;
                   size_t bytes = chunk.sort_temp.numel();
                   check_launch(launch_uld_bins(data, C, stream));
                   check_launch(launch_uld_sort(chunk.sort_temp.data_ptr(), bytes, C, stream));
                   check_launch(launch_uld_resolve(C, nullptr, chunk.dot.data_ptr<float>(), stream));
                   check_launch(launch_uld_grad(data, C, grad.data_ptr<float>(), chunk.dot.data_ptr<float>(),
                                                reinterpret_cast<T*>(out.data_ptr()), stream));
                 });
  return out;
}

}  // namespace cuda
}  // namespace infigw
