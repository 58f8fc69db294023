// ULD's core for one pair of rows, exact and without a full sort (docs/math.md §7): the sorted L1
//   L = sum_r |p_r - q_r|,   p, q the descending orders of two lists of non-negative numbers, the shorter
//   list zero-padded,
// and its gradient with respect to the entries of p.
//
// Why no sort of whole rows: with s_r = sign(p_r - q_r), L = sum_r s_r (p_r - q_r), so every entry only needs
// the sign at its own rank. Entries are put into bins by the top bits of their IEEE bits (which order
// non-negative numbers like their values). Say a bin holds c_p entries of p and c_q of q, and P, Q entries of
// each list lie in higher bins: its p entries have the ranks [P, P + c_p), its q entries [Q, Q + c_q). When
// Q + c_q <= P, each of those ranks meets a smaller entry of the other list (or the padding): s = +1 for every
// entry of the bin; when P + c_p <= Q, s = -1. Only the entries of the remaining ("mixed") bins, where both
// lists' ranks overlap, are sorted and walked value by value with the counts above them. Two streaming passes
// over the lists plus a sort of the mixed entries: typically a few percent to a third of them (all of them only
// when p and q nearly coincide, e.g. a student equal to its teacher).
//
// Ties (the rule of the reference, infigw/reference/uld.py): equal entries of p share their ranks, and each gets
// the mean of the signs of those ranks -- the average of the gradients over every order of the tie, which is a
// subgradient and does not depend on ids; s_r = 0 where p_r = q_r exactly (d|u|/du = 0 at 0).
// A NaN or negative entry makes L and the whole gradient NaN.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace infigw {
namespace cpu {

// The IEEE bits of a non-negative number as an unsigned key that orders like the number (-0 maps to 0).
template <typename acc_t>
struct ProbKey;

template <>
struct ProbKey<float> {
  using type = uint32_t;
  static constexpr type kInfinity = 0x7f800000u;
};

template <>
struct ProbKey<double> {
  using type = uint64_t;
  static constexpr type kInfinity = 0x7ff0000000000000ull;
};

template <typename acc_t>
inline typename ProbKey<acc_t>::type prob_key(acc_t v) {
  typename ProbKey<acc_t>::type bits;
  std::memcpy(&bits, &v, sizeof bits);
  return v == acc_t(0) ? 0 : bits;  // NaN and negative numbers get keys above kInfinity
}

template <typename acc_t>
inline acc_t key_value(typename ProbKey<acc_t>::type key) {
  acc_t v;
  std::memcpy(&v, &key, sizeof v);
  return v;
}

// Sorts the n items at `items` by key_of(item), descending, and returns where the sorted items are: `items`
// itself, or `scratch` (grown to n). LSD radix sort with 11-bit digits over the low key_bits bits (stable,
// O(n) per pass); std::sort below kRadixMinItems, where the digit tables cost more than the sort.
constexpr size_t kRadixMinItems = 512;

template <typename T, typename KeyOf>
T* sort_descending(T* items, size_t n, std::vector<T>& scratch, int key_bits, KeyOf key_of) {
  if (n < kRadixMinItems) {
    std::sort(items, items + n, [&](const T& a, const T& b) { return key_of(a) > key_of(b); });
    return items;
  }
  constexpr int kDigitBits = 11;
  constexpr uint32_t kDigits = 1u << kDigitBits;
  if (scratch.size() < n) scratch.resize(n);
  T *from = items, *to = scratch.data();
  uint32_t offsets[kDigits];
  for (int shift = 0; shift < key_bits; shift += kDigitBits) {
    const auto digit = [&](const T& item) { return static_cast<uint32_t>((~key_of(item) >> shift) & (kDigits - 1)); };
    std::fill(offsets, offsets + kDigits, 0u);
    for (size_t i = 0; i < n; ++i) ++offsets[digit(from[i])];
    uint32_t total = 0;
    for (uint32_t& offset : offsets) total += std::exchange(offset, total);
    for (size_t i = 0; i < n; ++i) to[offsets[digit(from[i])]++] = from[i];
    std::swap(from, to);
  }
  return from;
}

// Reusable per-thread state of the computation.
//
// Bins: zero has a bin of its own (0); the other keys of a call, from the smallest nonzero key `base_` to the
// largest, are split into at most 2^kTableBits bins of 2^shift_ keys (`bin_of`), so however narrow or wide the
// range of the probabilities, the bins are as fine as the table allows. Measured on rows of 32000 and 32500
// entries, softmaxes of standard normal logits: 3.4% of the entries stay mixed (15% with 256 fixed bins per
// binade), and a table of 2^14 bins was fastest (2^12: more mixed entries to sort; 2^16: the table leaves L1/L2).
template <typename acc_t>
class SortedProbL1 {
 public:
  using key_t = typename ProbKey<acc_t>::type;
  static constexpr int kTableBits = 14;
  static constexpr int64_t kBins = (int64_t{1} << kTableBits) + 1;

  SortedProbL1() : count_p_(kBins, 0), count_q_(kBins, 0), sign_(kBins, 0) {}

  // L of p (np entries) and q (nq entries); with `grad`, also dL/dp_j (the mean sign of its ranks) into
  // grad[0, np). Returns NaN (and a NaN gradient) when an entry is NaN or negative.
  acc_t operator()(const acc_t* p, int64_t np, const acc_t* q, int64_t nq, acc_t* grad) {
    key_t low = std::numeric_limits<key_t>::max(), high = 0;
    key_range(p, np, low, high);
    key_range(q, nq, low, high);
    if (high > ProbKey<acc_t>::kInfinity) {
      if (grad) std::fill(grad, grad + np, std::numeric_limits<acc_t>::quiet_NaN());
      return std::numeric_limits<acc_t>::quiet_NaN();
    }
    base_ = low;
    shift_ = 0;
    while (high > low && ((high - low) >> shift_) >= (key_t{1} << kTableBits)) ++shift_;
    high_bin_ = high == 0 ? 0 : bin_of(high);
    count(p, np, count_p_.data());
    count(q, nq, count_q_.data());
    classify_bins();
    // entries of decided bins add s * value (p) or -s * value (q); those of mixed bins are collected
    double loss = decide(p, np, grad, mixed_p_, count_mixed_p_) -
                  decide(q, nq, static_cast<acc_t*>(nullptr), mixed_q_, count_mixed_q_);
    loss += resolve_mixed(grad);
    std::fill(count_p_.begin(), count_p_.begin() + high_bin_ + 1, 0u);
    std::fill(count_q_.begin(), count_q_.begin() + high_bin_ + 1, 0u);
    return static_cast<acc_t>(loss);
  }

 private:
  struct MixedBin {
    int64_t bin, above_p, above_q;
  };
  using Indexed = std::pair<key_t, int64_t>;

  int64_t bin_of(key_t key) const { return key == 0 ? 0 : static_cast<int64_t>((key - base_) >> shift_) + 1; }

  // The smallest nonzero key and the largest key (above kInfinity: NaN or a negative number).
  static void key_range(const acc_t* v, int64_t n, key_t& low, key_t& high) {
    for (int64_t j = 0; j < n; ++j) {  // vectorises
      const key_t key = prob_key(v[j]);
      low = std::min(low, key == 0 ? low : key);
      high = std::max(high, key);
    }
  }

  void count(const acc_t* v, int64_t n, uint32_t* counts) const {
    for (int64_t j = 0; j < n; ++j) ++counts[bin_of(prob_key(v[j]))];
  }

  // Signs of the bins from the highest down (0 = mixed), and the counts above each mixed bin.
  void classify_bins() {
    mixed_bins_.clear();
    int64_t above_p = 0, above_q = 0;
    for (int64_t bin = high_bin_; bin >= 0; --bin) {
      const int64_t cp = count_p_[bin], cq = count_q_[bin];
      if (above_q + cq <= above_p) {
        sign_[bin] = 1;
      } else if (above_p + cp <= above_q) {
        sign_[bin] = -1;
      } else {
        sign_[bin] = 0;
        mixed_bins_.push_back({bin, above_p, above_q});
      }
      above_p += cp;
      above_q += cq;
    }
  }

  // sum_j s_j v_j over the entries of decided bins (s_j the sign of their bin, also written to `grad` where
  // given); the entries of mixed bins go to mixed[0, count) (their keys, with the index for the p list). Branch-free,
  // with four partial sums so that the additions do not wait on each other.
  template <typename Mixed>
  double decide(const acc_t* v, int64_t n, acc_t* grad, std::vector<Mixed>& mixed, size_t& count) const {
    if (mixed.size() < static_cast<size_t>(n)) mixed.resize(n);
    Mixed* out = mixed.data();
    size_t kept = 0;
    double sums[4] = {0, 0, 0, 0};
    const auto step = [&](int64_t j, double& sum) {
      const key_t key = prob_key(v[j]);
      const int8_t s = sign_[bin_of(key)];
      sum += s * static_cast<double>(v[j]);
      if (grad) grad[j] = s;
      if constexpr (std::is_same<Mixed, Indexed>::value)
        out[kept] = {key, j};
      else
        out[kept] = key;
      kept += s == 0;
    };
    const int64_t bulk = n - n % 4;
    int64_t j = 0;
    for (; j < bulk; j += 4) {
      step(j, sums[0]);
      step(j + 1, sums[1]);
      step(j + 2, sums[2]);
      step(j + 3, sums[3]);
    }
    for (; j < n; ++j) step(j, sums[0]);
    count = kept;
    return (sums[0] + sums[1]) + (sums[2] + sums[3]);
  }

  // The exact contribution of the mixed bins' entries, walking their distinct values downwards; writes the
  // gradient of their p entries.
  double resolve_mixed(acc_t* grad) {
    constexpr int kKeyBits = 8 * sizeof(key_t) - 1;  // keys of non-negative numbers: the sign bit is 0
    const Indexed* mixed_p = sort_descending(mixed_p_.data(), count_mixed_p_, sorted_scratch_p_, kKeyBits,
                                             [](const Indexed& item) { return item.first; });
    const key_t* mixed_q = sort_descending(mixed_q_.data(), count_mixed_q_, sorted_scratch_q_, kKeyBits,
                                           [](key_t key) { return key; });
    double loss = 0;
    size_t ip = 0, iq = 0;
    for (const MixedBin& mixed : mixed_bins_) {
      int64_t above_p = mixed.above_p, above_q = mixed.above_q;
      const auto in_bin = [&](key_t key) { return bin_of(key) == mixed.bin; };
      while (true) {
        const bool more_p = ip < count_mixed_p_ && in_bin(mixed_p[ip].first);
        const bool more_q = iq < count_mixed_q_ && in_bin(mixed_q[iq]);
        if (!more_p && !more_q) break;
        const key_t key = std::max(more_p ? mixed_p[ip].first : key_t(0), more_q ? mixed_q[iq] : key_t(0));
        const size_t p_begin = ip;
        while (ip < count_mixed_p_ && mixed_p[ip].first == key) ++ip;
        const size_t q_begin = iq;
        while (iq < count_mixed_q_ && mixed_q[iq] == key) ++iq;
        const int64_t cp = static_cast<int64_t>(ip - p_begin), cq = static_cast<int64_t>(iq - q_begin);
        // ranks [above_p, above_p + cp) of p against [above_q, above_q + cq) of q, all at this value
        const int64_t equal = std::max<int64_t>(0, std::min(above_p + cp, above_q + cq) - std::max(above_p, above_q));
        const int64_t p_below = std::clamp<int64_t>(above_q - above_p, 0, cp);  // ranks meeting a larger q
        const int64_t q_below = std::clamp<int64_t>(above_p - above_q, 0, cq);  // ranks meeting a larger p
        const int64_t p_sign_sum = (cp - p_below - equal) - p_below;
        const int64_t q_sign_sum = q_below - (cq - q_below - equal);
        loss += (p_sign_sum - q_sign_sum) * static_cast<double>(key_value<acc_t>(key));
        if (grad && cp > 0) {
          const acc_t mean_sign = static_cast<acc_t>(p_sign_sum) / static_cast<acc_t>(cp);
          for (size_t i = p_begin; i < ip; ++i) grad[mixed_p[i].second] = mean_sign;
        }
        above_p += cp;
        above_q += cq;
      }
    }
    return loss;
  }

  std::vector<uint32_t> count_p_, count_q_;
  std::vector<int8_t> sign_;
  key_t base_ = 0;
  int shift_ = 0;
  int64_t high_bin_ = 0;
  std::vector<MixedBin> mixed_bins_;
  std::vector<Indexed> mixed_p_, sorted_scratch_p_;  // storage grown to the longest list seen
  std::vector<key_t> mixed_q_, sorted_scratch_q_;
  size_t count_mixed_p_ = 0, count_mixed_q_ = 0;
};

}  // namespace cpu
}  // namespace infigw
