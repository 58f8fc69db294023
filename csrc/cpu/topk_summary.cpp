// CPU kernels of infigw::topk_summary and infigw::topk_summary_backward (schemas in csrc/ops.cpp, math in
// docs/math.md §2 and §7): everything the InfiGFusion objective needs from the student's logits in one read of
// each row, and its gradient in one write.
//
// Forward, rows in parallel, each valid row once while it is in cache: the top-k selection of topk_degrees
// (cpu/row_ops.h), the logsumexp at the loss temperature (and at 1 for the cross-entropy), the gold logit, and,
// for every teacher that pairs a teacher row with this row, the full-vocabulary ULD (cpu/uld_rows.h) on the
// student softmax it shares with the summary. Invalid rows are never read.
//
// Backward writes each gradient row once:
//   dL/dx_j = p_j (grad_lse + G_j - D) / T + grad_unit softmax(x)_j + grad_gold [j = gold] + grad_kept [j kept],
// p = softmax(x / T), G_j = sum_s grad_uld_s g_sj and D = sum_s grad_uld_s sum_i p_i g_si with g_s the ULD
// gradient of teacher s in the student probabilities: kept by the forward for one teacher (keep_signs), else
// recomputed from the saved logsumexps (cpu/uld_rows.h). Besides the gradient, at most the kept signs are (N, V).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <string>
#include <tuple>
#include <vector>

#include "cpu/uld_rows.h"
#include "kernels.h"

namespace infigw {
namespace cpu {
namespace {

using at::Tensor;
using Outputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The teachers of the fused ULD: S teachers and their (S, N) partners.
template <typename acc_t>
struct SummaryTeachers {
  std::vector<UldTeacher<acc_t>> teachers;
  const int64_t* partners;
  int64_t rows;

  SummaryTeachers(const std::vector<Tensor>& tensors, const std::vector<bool>& probs, const Tensor& partners_,
                  int64_t rows_)
      : partners(partners_.data_ptr<int64_t>()), rows(rows_) {
    for (size_t s = 0; s < tensors.size(); ++s) teachers.push_back({&tensors[s], probs[s]});
  }
  int64_t partner(size_t s, int64_t r) const { return partners[s * rows + r]; }
  bool any_partner(int64_t r) const {
    for (size_t s = 0; s < teachers.size(); ++s)
      if (partner(s, r) >= 0) return true;
    return false;
  }
};

std::vector<bool> as_vector(const c10::List<bool>& flags) {
  std::vector<bool> out;
  for (const bool flag : flags) out.push_back(flag);
  return out;
}

// Per-thread scratch of the summary rows.
template <typename acc_t>
struct RowScratch : UldScratch<acc_t> {
  std::vector<std::pair<acc_t, int64_t>> selection;       // select_row's buffer (large k)
  std::vector<acc_t> combined, unit_probs, row_grad;      // backward: sum_s w_s g_s, softmax(x), a 16-bit row
};

struct Checked {
  Tensor logits, valid, gold, partners;
  std::vector<Tensor> teachers;
};

Checked check_inputs(const Tensor& logits, const Tensor& row_valid, int64_t k, double temperature,
                     const c10::optional<Tensor>& gold, at::TensorList teachers, const Tensor& partners,
                     const c10::List<bool>& teacher_probs) {
  TORCH_CHECK_VALUE(logits.device().is_cpu(), "logits must be a CPU tensor, got ", logits.device());
  check_logits(logits, /*allow_fp64=*/true);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab, "k must lie in [1, V=", vocab, "], got ", k);
  check_temperature(temperature);
  TORCH_CHECK_TYPE(row_valid.scalar_type() == at::kBool, "row_valid must be bool, got ", row_valid.scalar_type());
  TORCH_CHECK_VALUE(row_valid.dim() == 1 && row_valid.size(0) == rows && row_valid.device().is_cpu(),
                    "row_valid must be a CPU tensor of shape (", rows, ",), got ", row_valid.sizes());
  Checked out{logits.contiguous(), row_valid.contiguous(), Tensor(), Tensor(), {}};
  const bool* valid = out.valid.data_ptr<bool>();
  if (gold.has_value() && gold->defined()) {
    TORCH_CHECK_TYPE(gold->scalar_type() == at::kLong, "gold must be int64, got ", gold->scalar_type());
    TORCH_CHECK_VALUE(gold->dim() == 1 && gold->size(0) == rows && gold->device().is_cpu(),
                      "gold must be a CPU tensor of shape (", rows, ",), got ", gold->sizes());
    out.gold = gold->contiguous();
    const int64_t* id = out.gold.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK_VALUE(!valid[r] || (id[r] >= 0 && id[r] < vocab), "gold ids must lie in [0, ", vocab,
                        ") on valid rows, got ", id[r], " at row ", r);
  }
  const int64_t num = static_cast<int64_t>(teachers.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(teacher_probs.size()) == num, "teacher_probs must have one entry per teacher (",
                    num, "), got ", teacher_probs.size());
  TORCH_CHECK_TYPE(partners.scalar_type() == at::kLong, "partners must be int64, got ", partners.scalar_type());
  TORCH_CHECK_VALUE(partners.dim() == 2 && partners.size(0) == num && partners.size(1) == rows,
                    "partners must have shape (", num, ", ", rows, "), got ", partners.sizes());
  out.partners = partners.contiguous();
  for (int64_t s = 0; s < num; ++s) {
    const std::string name = "teachers[" + std::to_string(s) + "]";
    check_teacher(teachers[s], name);
    out.teachers.push_back(teachers[s].contiguous());
    const Tensor partner = out.partners[s];
    check_partner(partner, rows, teachers[s].size(0), "partners[" + std::to_string(s) + "]");
    const int64_t* index = partner.data_ptr<int64_t>();
    for (int64_t r = 0; r < rows; ++r)
      TORCH_CHECK_VALUE(valid[r] || index[r] < 0, "partners[", s, "] must be -1 on invalid rows, got ", index[r],
                        " at row ", r);
  }
  return out;
}

template <typename scalar_t>
Outputs forward_impl(const Checked& in, int64_t k, double temperature_d, bool unit_lse,
                     const std::vector<bool>& teacher_probs, bool keep_signs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = in.logits.size(0), vocab = in.logits.size(1);
  const int64_t num = static_cast<int64_t>(in.teachers.size());
  const auto acc = in.logits.options().dtype(std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat);
  const bool with_gold = in.gold.defined();
  Tensor kept = at::zeros({rows, k}, acc), ids = at::zeros({rows, k}, in.logits.options().dtype(at::kLong));
  Tensor lse = at::zeros({rows}, acc), unit = at::zeros({unit_lse ? rows : 0}, acc);
  Tensor gold_logit = at::zeros({with_gold ? rows : 0}, acc);
  Tensor uld = at::zeros({num, rows}, acc), teacher_lse = at::zeros({num, rows}, acc);
  // the ULD signs of one teacher (cpu/uld_rows.h); several teachers recompute theirs in backward
  keep_signs = keep_signs && num == 1;
  Tensor signs = at::empty({keep_signs ? rows : 0, vocab}, acc), uld_dot = at::zeros({keep_signs ? 1 : 0, rows}, acc);
  if (keep_signs) advise_huge_pages(signs.data_ptr(), signs.nbytes());
  acc_t *sign_rows = signs.data_ptr<acc_t>(), *dots = uld_dot.data_ptr<acc_t>();
  const scalar_t* x = in.logits.data_ptr<scalar_t>();
  const bool* valid = in.valid.data_ptr<bool>();
  const int64_t* gold = with_gold ? in.gold.data_ptr<int64_t>() : nullptr;
  acc_t *kept_out = kept.data_ptr<acc_t>(), *lse_out = lse.data_ptr<acc_t>(), *unit_out = unit.data_ptr<acc_t>();
  acc_t *gold_out = gold_logit.data_ptr<acc_t>(), *uld_out = uld.data_ptr<acc_t>();
  acc_t* tlse_out = teacher_lse.data_ptr<acc_t>();
  int64_t* ids_out = ids.data_ptr<int64_t>();
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const SummaryTeachers<acc_t> teachers(in.teachers, teacher_probs, in.partners, rows);
  for_each_row(rows, [] { return RowScratch<acc_t>(); }, [&](RowScratch<acc_t>& scratch, int64_t r) {
    if (keep_signs && !(valid[r] && teachers.any_partner(r)))
      std::fill(sign_rows + r * vocab, sign_rows + (r + 1) * vocab, acc_t(0));
    if (!valid[r]) return;
    const scalar_t* row = x + r * vocab;
    select_row(row, vocab, k, kept_out + r * k, ids_out + r * k, scratch.selection);
    const acc_t high = kept_out[r * k];  // the row's maximum (NaN when it holds one)
    lse_out[r] = row_logsumexp(row, vocab, high, temperature, scratch.buffer);
    if (unit_lse) unit_out[r] = row_logsumexp(row, vocab, high, acc_t(1), scratch.buffer);
    if (gold) gold_out[r] = static_cast<acc_t>(row[gold[r]]);
    if (!teachers.any_partner(r)) return;
    scratch.p.resize(vocab);
    softmax_from_lse(row, vocab, temperature, lse_out[r], scratch.p.data(), scratch.buffer);
    for (int64_t s = 0; s < num; ++s) {
      const int64_t partner = teachers.partner(s, r);
      if (partner < 0) continue;
      uld_out[s * rows + r] = uld_row(scratch, scratch.p.data(), vocab, teachers.teachers[s], partner, temperature,
                                      true, tlse_out[s * rows + r], keep_signs ? sign_rows + r * vocab : nullptr,
                                      keep_signs ? dots + r : nullptr);
    }
  });
  return {kept, ids, lse, unit, gold_logit, uld, teacher_lse, signs, uld_dot};
}

}  // namespace

Outputs topk_summary(const Tensor& logits, const Tensor& row_valid, int64_t k, double temperature,
                     const c10::optional<Tensor>& gold, bool unit_lse, at::TensorList teachers, const Tensor& partners,
                     const c10::List<bool>& teacher_probs, bool keep_signs) {
  const Checked in = check_inputs(logits, row_valid, k, temperature, gold, teachers, partners, teacher_probs);
  const std::vector<bool> probs = as_vector(teacher_probs);
  Outputs out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "infigw_topk_summary", [&] {
    out = forward_impl<scalar_t>(in, k, temperature, unit_lse, probs, keep_signs);
  });
  return out;
}

namespace {

// The gradients of one backward call, as acc_t pointers (null where the output was not produced).
template <typename acc_t>
struct SummaryGrads {
  const acc_t *kept, *lse, *unit, *gold, *uld;
  const acc_t *row_lse, *row_unit, *teacher_lse;
  const acc_t *signs, *uld_dot;  // the forward's ULD signs of the one teacher, or null
  const int64_t* ids;
  const int64_t* gold_ids;
  int64_t k;
};

template <typename scalar_t>
Tensor backward_impl(const Checked& in, const SummaryGrads<acc_type<scalar_t>>& grads, double temperature_d,
                     const std::vector<bool>& teacher_probs) {
  using acc_t = acc_type<scalar_t>;
  const int64_t rows = in.logits.size(0), vocab = in.logits.size(1), k = grads.k;
  const int64_t num = static_cast<int64_t>(in.teachers.size());
  Tensor grad_logits = at::empty({rows, vocab}, in.logits.options());
  advise_huge_pages(grad_logits.data_ptr(), grad_logits.nbytes());
  const scalar_t* x = in.logits.data_ptr<scalar_t>();
  scalar_t* dx = grad_logits.data_ptr<scalar_t>();
  const bool* valid = in.valid.data_ptr<bool>();
  const acc_t temperature = static_cast<acc_t>(temperature_d);
  const SummaryTeachers<acc_t> teachers(in.teachers, teacher_probs, in.partners, rows);
  constexpr bool dst_as_acc = std::is_same<scalar_t, acc_t>::value;  // fp32/fp64 rows are built in place
  for_each_row(rows, [] { return RowScratch<acc_t>(); }, [&](RowScratch<acc_t>& scratch, int64_t r) {
    scalar_t* dst = dx + r * vocab;
    if (!valid[r]) {
      std::fill(dst, dst + vocab, scalar_t(0));
      return;
    }
    const scalar_t* row = x + r * vocab;
    acc_t* d = dst_as_acc ? reinterpret_cast<acc_t*>(dst) : (scratch.row_grad.resize(vocab), scratch.row_grad.data());
    scratch.p.resize(vocab);
    acc_t* p = scratch.p.data();
    softmax_from_lse(row, vocab, temperature, grads.row_lse[r], p, scratch.buffer);
    // Every dense term of softmax(x / T) shares p_j / T: grad_lse and the ULD terms sum_s w_s (g_sj - dot_s),
    // so d_j = p_j (base + weight * signs_j) / T with signs = the one teacher's kept signs, or sum_s w_s g_s.
    double base = grads.lse[r];
    const acc_t* signs = nullptr;
    acc_t weight = 1;
    for (int64_t s = 0; s < num; ++s) {
      const int64_t partner = teachers.partner(s, r);
      if (partner < 0) continue;
      const acc_t w = grads.uld[s * rows + r];
      if (grads.signs) {
        signs = grads.signs + r * vocab;
        weight = w;
        base -= static_cast<double>(w) * grads.uld_dot[r];
        continue;
      }
      scratch.g.resize(vocab);
      scratch.combined.resize(vocab);
      acc_t dot = 0, teacher_lse = grads.teacher_lse[s * rows + r];
      uld_row(scratch, p, vocab, teachers.teachers[s], partner, temperature, false, teacher_lse, scratch.g.data(), &dot);
      acc_t* combined = scratch.combined.data();
      for (int64_t j = 0; j < vocab; ++j) combined[j] = (signs ? combined[j] : acc_t(0)) + w * scratch.g[j];
      signs = combined;
      base -= static_cast<double>(w) * dot;
    }
    const acc_t shift = static_cast<acc_t>(base);
    if (signs) {
      for (int64_t j = 0; j < vocab; ++j) d[j] = p[j] * (shift + weight * signs[j]) / temperature;
    } else {
      for (int64_t j = 0; j < vocab; ++j) d[j] = p[j] * shift / temperature;
    }
    if (grads.unit) {  // the cross-entropy's softmax at temperature 1
      scratch.unit_probs.resize(vocab);
      softmax_from_lse(row, vocab, acc_t(1), grads.row_unit[r], scratch.unit_probs.data(), scratch.buffer);
      const acc_t w = grads.unit[r];
      for (int64_t j = 0; j < vocab; ++j) d[j] += w * scratch.unit_probs[j];
    }
    if (grads.gold) d[grads.gold_ids[r]] += grads.gold[r];
    for (int64_t i = 0; i < k; ++i) d[grads.ids[r * k + i]] += grads.kept[r * k + i];
    if (!dst_as_acc)
      for (int64_t j = 0; j < vocab; ++j) dst[j] = static_cast<scalar_t>(d[j]);
  });
  return grad_logits;
}

// grad (shape) in the accumulation dtype, or an undefined tensor when `shape` is empty (output not produced).
Tensor accumulation_grad(const Tensor& grad, at::IntArrayRef shape, at::ScalarType acc, const char* name) {
  TORCH_CHECK_VALUE(grad.sizes() == shape && grad.device().is_cpu(), name, " must be a CPU tensor of shape ", shape,
                    ", got ", grad.sizes(), " on ", grad.device());
  return grad.to(acc).contiguous();
}

}  // namespace

Tensor topk_summary_backward(const Tensor& grad_kept, const Tensor& grad_lse, const Tensor& grad_unit,
                             const Tensor& grad_gold, const Tensor& grad_uld, const Tensor& logits,
                             const Tensor& row_valid, const Tensor& ids, const Tensor& lse, const Tensor& unit,
                             const c10::optional<Tensor>& gold, double temperature, at::TensorList teachers,
                             const Tensor& partners, const c10::List<bool>& teacher_probs, const Tensor& teacher_lse,
                             const Tensor& signs, const Tensor& uld_dot) {
  const int64_t k = ids.dim() == 2 ? ids.size(1) : 0;
  const Checked in = check_inputs(logits, row_valid, std::max<int64_t>(k, 1), temperature, gold, teachers, partners,
                                  teacher_probs);
  const int64_t rows = logits.size(0), num = static_cast<int64_t>(teachers.size());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == rows && k >= 1 && ids.scalar_type() == at::kLong,
                    "ids must be an int64 tensor of shape (", rows, ", k), got ", ids.sizes(), " ", ids.scalar_type());
  const at::Tensor id = ids.contiguous();
  const int64_t* id_data = id.data_ptr<int64_t>();
  for (int64_t i = 0; i < id.numel(); ++i)
    TORCH_CHECK_VALUE(id_data[i] >= 0 && id_data[i] < logits.size(1), "ids must lie in [0, ", logits.size(1), "), got ",
                      id_data[i]);
  const at::ScalarType acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool with_unit = unit.numel() > 0, with_gold = in.gold.defined();
  const Tensor gk = accumulation_grad(grad_kept, {rows, k}, acc, "grad_kept");
  const Tensor gl = accumulation_grad(grad_lse, {rows}, acc, "grad_lse");
  const Tensor gu = accumulation_grad(grad_unit, {with_unit ? rows : 0}, acc, "grad_unit");
  const Tensor gg = accumulation_grad(grad_gold, {with_gold ? rows : 0}, acc, "grad_gold");
  const Tensor gs = accumulation_grad(grad_uld, {num, rows}, acc, "grad_uld");
  const Tensor row_lse = accumulation_grad(lse, {rows}, acc, "lse");
  const Tensor row_unit = accumulation_grad(unit, {with_unit ? rows : 0}, acc, "unit");
  const Tensor tl = accumulation_grad(teacher_lse, {num, rows}, acc, "teacher_lse");
  const bool kept = signs.numel() > 0;
  TORCH_CHECK_VALUE(!kept || num == 1, "signs are kept for one teacher only, got ", num, " teachers");
  const Tensor kept_signs = accumulation_grad(signs, {kept ? rows : 0, logits.size(1)}, acc, "signs");
  const Tensor kept_dot = accumulation_grad(uld_dot, {kept ? 1 : 0, rows}, acc, "uld_dot");
  const std::vector<bool> probs = as_vector(teacher_probs);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "infigw_topk_summary_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const SummaryGrads<acc_t> grads{gk.data_ptr<acc_t>(),
                                    gl.data_ptr<acc_t>(),
                                    with_unit ? gu.data_ptr<acc_t>() : nullptr,
                                    with_gold ? gg.data_ptr<acc_t>() : nullptr,
                                    gs.data_ptr<acc_t>(),
                                    row_lse.data_ptr<acc_t>(),
                                    with_unit ? row_unit.data_ptr<acc_t>() : nullptr,
                                    tl.data_ptr<acc_t>(),
                                    kept ? kept_signs.data_ptr<acc_t>() : nullptr,
                                    kept ? kept_dot.data_ptr<acc_t>() : nullptr,
                                    id_data,
                                    with_gold ? in.gold.data_ptr<int64_t>() : nullptr,
                                    k};
    out = backward_impl<scalar_t>(in, grads, temperature, probs);
  });
  return out;
}

}  // namespace cpu
}  // namespace infigw
