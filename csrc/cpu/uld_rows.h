// The rows of ULD on the CPU (docs/math.md §7), shared by uld.cpp and the fused summary of topk_summary.cpp:
// the distribution of a row -- softmax(x / T) of logits, or a teacher row of probabilities taken as given --
// as acc_t, its logsumexp, ULD and its gradient for one pair of rows, and the argument checks of the teachers
// and their partners.
//
// Signs: the forward of a call that will be differentiated may keep dL/dp of every row ("signs", one (N, V)
// buffer in the accumulation dtype) and sum_j p_j dL/dp_j; backward then needs only p, recomputed from the
// logsumexp in one exp pass, instead of both distributions and the sorted L1 again. Without them (inference,
// several teachers in the fused summary) backward recomputes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/row_ops.h"
#include "cpu/sorted_prob_l1.h"
#include "op_checks.h"

namespace infigw {
namespace cpu {

// body(state, row) for every row of [0, rows), the rows handed out one at a time to the threads of
// at::parallel_for, each with its own state = make_state(): a thread whose rows cost more (ULD's cost varies with
// how many entries stay mixed) or that the OS preempts (a shared machine) does not hold the others up, as a
// static split of the rows would.
template <typename MakeState, typename Body>
void for_each_row(int64_t rows, MakeState make_state, Body body) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(rows, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t r = next.fetch_add(1); r < rows; r = next.fetch_add(1)) body(state, r);
  });
}

// max_j row_j, NaN when the row holds a NaN (as the first kept value of select_row).
template <typename scalar_t, typename acc_t>
acc_t row_max(const scalar_t* row, int64_t n) {
  acc_t high = -std::numeric_limits<acc_t>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const acc_t v = static_cast<acc_t>(row[j]);
    high = v > high ? v : high;
    nan |= v != v;
  }
  return nan ? std::numeric_limits<acc_t>::quiet_NaN() : high;
}

// out_j = exp(x_j / T - lse): the one expression of every forward and backward pass, so that a student and a
// teacher with equal logits get bitwise equal distributions (and ULD exactly 0 with a zero gradient).
template <typename scalar_t, typename acc_t>
void softmax_from_lse(const scalar_t* row, int64_t n, acc_t temperature, acc_t lse, acc_t* out,
                      std::vector<float>& buffer) {
  if constexpr (std::is_same<acc_t, double>::value) {
    for (int64_t j = 0; j < n; ++j) out[j] = std::exp(static_cast<double>(row[j]) / temperature - lse);
  } else {
    scaled_exp(as_float_row(row, n, buffer), n, temperature, lse, 1.0f, out);
  }
}

// One teacher of ULD: (M, width) logits, or probabilities with `probs`.
template <typename acc_t>
struct UldTeacher {
  const at::Tensor* tensor;
  bool probs;

  int64_t width() const { return tensor->size(1); }

  // The distribution of teacher row `row` into out[0, width); for logits `lse` is computed (compute_lse) or
  // given. Probabilities leave `lse` untouched.
  void distribution(int64_t row, acc_t temperature, bool compute_lse, acc_t& lse, acc_t* out,
                    std::vector<float>& buffer) const {
    const int64_t n = width();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensor->scalar_type(), "infigw_uld_teacher", [&] {
      const scalar_t* y = tensor->data_ptr<scalar_t>() + row * n;
      if (probs) {
        for (int64_t j = 0; j < n; ++j) out[j] = static_cast<acc_t>(y[j]);
        return;
      }
      if (compute_lse) lse = row_logsumexp(y, n, row_max<scalar_t, acc_t>(y, n), temperature, buffer);
      softmax_from_lse(y, n, temperature, lse, out, buffer);
    });
  }
};

// Per-thread scratch of the ULD rows.
template <typename acc_t>
struct UldScratch {
  SortedProbL1<acc_t> sorted_l1;
  std::vector<acc_t> p, q, g;
  std::vector<float> buffer;
};

// ULD of one student row p (np entries) against teacher row `teacher_row` (its distribution into scratch.q, its
// logsumexp computed into or read from `teacher_lse`). With `g`, also dL/dp into g[0, np) and sum_j p_j g_j into
// *dot: the student gradient of ULD is then dL/dx_j = p_j (g_j - dot) / T.
template <typename acc_t>
acc_t uld_row(UldScratch<acc_t>& scratch, const acc_t* p, int64_t np, const UldTeacher<acc_t>& teacher,
              int64_t teacher_row, acc_t temperature, bool compute_lse, acc_t& teacher_lse, acc_t* g, acc_t* dot) {
  scratch.q.resize(teacher.width());
  teacher.distribution(teacher_row, temperature, compute_lse, teacher_lse, scratch.q.data(), scratch.buffer);
  const acc_t loss = scratch.sorted_l1(p, np, scratch.q.data(), teacher.width(), g);
  if (g) {
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < np; ++j) sum += static_cast<double>(p[j]) * g[j];
    *dot = static_cast<acc_t>(sum);
  }
  return loss;
}

inline void check_teacher(const at::Tensor& teacher, const std::string& name) {
  TORCH_CHECK_VALUE(teacher.device().is_cpu(), name, " must be a CPU tensor, got ", teacher.device());
  TORCH_CHECK_TYPE(at::isFloatingType(teacher.scalar_type()), name, " must be floating point, got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.dim() == 2 && teacher.size(1) >= 1, name, " must have shape (M, V_t) with V_t >= 1, got ",
                    teacher.sizes());
}

// partner (N,) int64 with every entry in [-1, rows of the teacher): the teacher row of each student row.
inline void check_partner(const at::Tensor& partner, int64_t rows, int64_t teacher_rows, const std::string& name) {
  TORCH_CHECK_TYPE(partner.scalar_type() == at::kLong, name, " must be int64, got ", partner.scalar_type());
  TORCH_CHECK_VALUE(partner.device().is_cpu(), name, " must be a CPU tensor, got ", partner.device());
  TORCH_CHECK_VALUE(partner.dim() == 1 && partner.size(0) == rows, name, " must have shape (", rows, ",), got ",
                    partner.sizes());
  const at::Tensor flat = partner.contiguous();
  const int64_t* index = flat.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK_VALUE(index[r] >= -1 && index[r] < teacher_rows, name, " entries must lie in [-1, ", teacher_rows,
                      ") (-1: no partner), got ", index[r], " at row ", r);
}

}  // namespace cpu
}  // namespace infigw
