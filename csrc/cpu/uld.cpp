// CPU kernels of infigw::uld_full and infigw::uld_full_backward (schemas in csrc/ops.cpp, math in docs/math.md
// §7): full-vocabulary ULD of each student row against its partner teacher row, and its gradient.
//
// Forward, rows in parallel: the student's logsumexp and softmax, the teacher's (or its given probabilities),
// then the exact sorted L1 of cpu/sorted_prob_l1.h, which needs no sort of whole rows. Unpaired rows (partner
// -1) are never read. With keep_signs (a call that will be differentiated) the forward also keeps dL/dp of every
// row (cpu/uld_rows.h): backward then recomputes only the student's softmax; without, it recomputes both
// distributions from the saved logsumexps -- with the forward's expression, so both passes see the same bits --
// and the sorted L1. Each gradient row is written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <tuple>

#include "cpu/uld_rows.h"
#include "kernels.h"

namespace infigw {
namespace cpu {
namespace {

using at::Tensor;

void check_student(const Tensor& student) {
  TORCH_CHECK_VALUE(student.device().is_cpu(), "student must be a CPU tensor, got ", student.device());
  check_logits(student, /*allow_fp64=*/true, "student");
}

using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename scalar_t>
Outputs forward_impl(const Tensor& student, const Tensor& teacher, const int64_t* partner, double temperature_d,
                     bool teacher_probs, bool keep_signs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto acc = student.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
  Tensor loss = at::zeros({rows}, acc), student_lse = at::zeros({rows}, acc), teacher_lse = at::zeros({rows}, acc);
  Tensor signs = at::empty({keep_signs ? rows : 0, vocab}, acc), dot = at::zeros({keep_signs ? rows : 0}, acc);
  if (keep_signs) advise_huge_pages(signs.data_ptr(), signs.nbytes());
  const scalar_t* x = student.data_ptr<scalar_t>();
  acc_t *out = loss.data_ptr<acc_t>(), *lse_s = student_lse.data_ptr<acc_t>(), *lse_t = teacher_lse.data_ptr<acc_t>();
  acc_t *sign_rows = signs.data_ptr<acc_t>(), *dots = dot.data_ptr<acc_t>();
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const UldTeacher<acc_t> rows_of_teacher{&teacher, teacher_probs};
  for_each_row(rows, [] { return UldScratch<acc_t>(); }, [&](UldScratch<acc_t>& scratch, int64_t r) {
    if (partner[r] < 0) {
      if (keep_signs) std::fill(sign_rows + r * vocab, sign_rows + (r + 1) * vocab, acc_t(0));
      return;
    }
    const scalar_t* row = x + r * vocab;
    scratch.p.resize(vocab);
    lse_s[r] = row_logsumexp(row, vocab, row_max<scalar_t, acc_t>(row, vocab), temperature, scratch.buffer);
    softmax_from_lse(row, vocab, temperature, lse_s[r], scratch.p.data(), scratch.buffer);
    out[r] = uld_row(scratch, scratch.p.data(), vocab, rows_of_teacher, partner[r], temperature, true, lse_t[r],
                     keep_signs ? sign_rows + r * vocab : nullptr, keep_signs ? dots + r : nullptr);
  });
  return {loss, student_lse, teacher_lse, signs, dot};
}

}  // namespace

Outputs uld_full(const Tensor& student, const Tensor& teacher, const Tensor& partner, double temperature,
                 bool teacher_probs, bool keep_signs) {
  check_student(student);
  check_teacher(teacher, "teacher");
  check_partner(partner, student.size(0), teacher.size(0), "partner");
  check_temperature(temperature);
  const Tensor x = student.contiguous(), y = teacher.contiguous(), pairs = partner.contiguous();
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_uld_full", [&] {
    out = forward_impl<scalar_t>(x, y, pairs.data_ptr<int64_t>(), temperature, teacher_probs, keep_signs);
  });
  return out;
}

namespace {

template <typename scalar_t>
Tensor backward_impl(const Tensor& grad, const Tensor& student, const Tensor& teacher, const int64_t* partner,
                     const Tensor& student_lse, const Tensor& teacher_lse, const Tensor& signs, const Tensor& dot,
                     double temperature_d, bool teacher_probs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = student.size(0), vocab = student.size(1);
  const bool kept = signs.numel() > 0;
  Tensor grad_student = at::empty({rows, vocab}, student.options());
  advise_huge_pages(grad_student.data_ptr(), grad_student.nbytes());
  const scalar_t* x = student.data_ptr<scalar_t>();
  scalar_t* dx = grad_student.data_ptr<scalar_t>();
  const acc_t *grad_loss = grad.data_ptr<acc_t>(), *lse_s = student_lse.data_ptr<acc_t>();
  const acc_t *sign_rows = kept ? signs.data_ptr<acc_t>() : nullptr, *dots = kept ? dot.data_ptr<acc_t>() : nullptr;
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const UldTeacher<acc_t> rows_of_teacher{&teacher, teacher_probs};
  for_each_row(rows, [] { return UldScratch<acc_t>(); }, [&](UldScratch<acc_t>& scratch, int64_t r) {
    scalar_t* dst = dx + r * vocab;
    if (partner[r] < 0) {
      std::fill(dst, dst + vocab, scalar_t(0));
      return;
    }
    scratch.p.resize(vocab);
    acc_t* p = scratch.p.data();
    softmax_from_lse(x + r * vocab, vocab, temperature, lse_s[r], p, scratch.buffer);
    acc_t total = kept ? dots[r] : acc_t(0);
    if (!kept) {
      scratch.g.resize(vocab);
      acc_t lse_t = teacher_lse.data_ptr<acc_t>()[r];
      uld_row(scratch, p, vocab, rows_of_teacher, partner[r], temperature, false, lse_t, scratch.g.data(), &total);
    }
    const acc_t* g = kept ? sign_rows + r * vocab : scratch.g.data();
    const acc_t scale = grad_loss[r] / temperature;
    for (int64_t j = 0; j < vocab; ++j) dst[j] = static_cast<scalar_t>(scale * p[j] * (g[j] - total));
  });
  return grad_student;
}

}  // namespace

Tensor uld_full_backward(const Tensor& grad, const Tensor& student, const Tensor& teacher, const Tensor& partner,
                         const Tensor& student_lse, const Tensor& teacher_lse, const Tensor& signs, const Tensor& dot,
                         double temperature, bool teacher_probs) {
  check_student(student);
  check_teacher(teacher, "teacher");
  const int64_t rows = student.size(0), vocab = student.size(1);
  check_partner(partner, rows, teacher.size(0), "partner");
  check_temperature(temperature);
  const at::ScalarType acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& [tensor, name] : {std::pair<const Tensor&, const char*>{grad, "grad"},
                                     {student_lse, "student_lse"}, {teacher_lse, "teacher_lse"}})
    TORCH_CHECK_VALUE(tensor.dim() == 1 && tensor.size(0) == rows && tensor.device().is_cpu(), name,
                      " must be a CPU tensor of shape (", rows, ",), got ", tensor.sizes(), " on ", tensor.device());
  const bool kept = signs.numel() > 0;
  TORCH_CHECK_VALUE(!kept || (signs.sizes() == at::IntArrayRef({rows, vocab}) && dot.sizes() == at::IntArrayRef({rows})),
                    "signs and dot must be empty or have shapes (", rows, ", ", vocab, ") and (", rows, ",), got ",
                    signs.sizes(), " and ", dot.sizes());
  const Tensor x = student.contiguous(), y = teacher.contiguous(), pairs = partner.contiguous();
  const Tensor g = grad.to(acc).contiguous(), ls = student_lse.to(acc).contiguous(), lt = teacher_lse.to(acc).contiguous();
  const Tensor kept_signs = signs.to(acc).contiguous(), kept_dot = dot.to(acc).contiguous();
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "infigw_uld_full_backward", [&] {
    out = backward_impl<scalar_t>(g, x, y, pairs.data_ptr<int64_t>(), ls, lt, kept_signs, kept_dot, temperature,
                                  teacher_probs);
  });
  return out;
}

}  // namespace cpu
}  // namespace infigw
