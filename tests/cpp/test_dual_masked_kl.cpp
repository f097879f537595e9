// dmk_row_forward / dmk_row_backward (csrc/cpu/dual_masked_kl.h), float and double
// kernels, against a two-pass double-precision scalar reference of the SPEC formulas.
#include <algorithm>
#include <vector>

#include "cpu/dual_masked_kl.h"
#include "harness.h"

namespace {

struct Reference {
  double kl, ce, max_a, logsum_a, max_b, logsum_b, kept;
  std::vector<double> grad;  // d row / d s (scale 1)
};

// Straight from the definitions, in double: p = softmax(t/T), q = softmax(s/T),
// KL = sum K_V p (log p - log q), CE = -sum K_V p log q, d/ds_j = (q_j S - K_V(j) p_j) / T.
template <typename F>
Reference reference(const std::vector<F>& s, const std::vector<F>& t, const float* kv, F inv_t_f) {
  const size_t V = s.size();
  const double inv_t = static_cast<double>(inv_t_f);
  std::vector<double> a(V), b(V);
  for (size_t i = 0; i < V; ++i) {
    a[i] = static_cast<double>(s[i]) * inv_t;
    b[i] = static_cast<double>(t[i]) * inv_t;
  }
  Reference r{};
  r.max_a = *std::max_element(a.begin(), a.end());
  r.max_b = *std::max_element(b.begin(), b.end());
  double sa = 0, sb = 0;
  for (size_t i = 0; i < V; ++i) {
    sa += std::exp(a[i] - r.max_a);
    sb += std::exp(b[i] - r.max_b);
  }
  r.logsum_a = std::log(sa);
  r.logsum_b = std::log(sb);
  r.grad.resize(V);
  for (size_t i = 0; i < V; ++i) {
    const double log_q = (a[i] - r.max_a) - r.logsum_a, log_p = (b[i] - r.max_b) - r.logsum_b;
    const double k = kv != nullptr ? kv[i] : 1.0;
    const double p = std::exp(log_p);
    r.kl += k * p * (log_p - log_q);
    r.ce -= k * p * log_q;
    r.kept += k * p;
  }
  for (size_t i = 0; i < V; ++i) {
    const double q = std::exp((a[i] - r.max_a) - r.logsum_a), p = std::exp((b[i] - r.max_b) - r.logsum_b);
    const double k = kv != nullptr ? kv[i] : 1.0;
    r.grad[i] = (q * r.kept - k * p) * inv_t;
  }
  return r;
}

enum class Kind { kNormal, kPeaked, kExtreme, kRamp };

template <typename F>
std::vector<F> logits(std::mt19937_64& rng, size_t V, Kind kind, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::uniform_int_distribution<int> sign(-1, 1);
  std::vector<F> x(V);
  for (size_t i = 0; i < V; ++i) {
    double v = normal(rng);
    if (kind == Kind::kExtreme) v += 1e4 * sign(rng);
    if (kind == Kind::kRamp) v += 60.0 * static_cast<double>(i) / static_cast<double>(V);  // maxima rise per block
    x[i] = static_cast<F>(v);
  }
  if (kind == Kind::kPeaked) x[rng() % V] = static_cast<F>(40.0);
  return x;
}

double rel_l2(const std::vector<double>& ref, const std::vector<double>& got) {
  double num = 0, den = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    num += (got[i] - ref[i]) * (got[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// tol_loss: absolute loss error allowed per unit of max(1, |loss|, |logits / T| scale).
template <typename F>
void check_rows(size_t V, Kind kind, bool with_mask, double temperature, double tol_loss, double tol_grad) {
  std::mt19937_64 rng(uf_test::seed() + V * 7 + static_cast<int>(kind));
  const std::vector<F> s = logits<F>(rng, V, kind, 3.0), t = logits<F>(rng, V, kind, 2.0);
  std::vector<float> kv(V);
  std::bernoulli_distribution keep(0.8);
  for (auto& k : kv) k = keep(rng) ? 1.f : 0.f;
  const float* kvp = with_mask ? kv.data() : nullptr;
  const F inv_t = static_cast<F>(1.0 / temperature);
  const Reference ref = reference(s, t, kvp, inv_t);
  const double logit_scale = std::max({1.0, std::fabs(ref.max_a), std::fabs(ref.max_b)});
  for (bool ce : {false, true}) {
    const uf::DmkRowStatsT<F> st = uf::dmk_row_forward<F>(s.data(), t.data(), kvp, static_cast<int64_t>(V), inv_t, ce);
    const double expected = ce ? ref.ce : ref.kl;
    UF_CHECK_NEAR(st.loss, expected, tol_loss * std::max(logit_scale, std::fabs(expected)));
    // The maxima are the largest logits / T rounded to F; max + log-sum is the lse to
    // within the log-sum's own rounding (what every recomputed log-probability inherits).
    const double max_tol = sizeof(F) == 4 ? 1e-7 * logit_scale : 0.0;
    UF_CHECK_NEAR(st.max_a, ref.max_a, max_tol);
    UF_CHECK_NEAR(st.max_b, ref.max_b, max_tol);
    UF_CHECK_NEAR((double(st.max_a) - ref.max_a) + (double(st.logsum_a) - ref.logsum_a), 0.0,
                  tol_loss * std::max(1.0, ref.logsum_a));
    UF_CHECK_NEAR((double(st.max_b) - ref.max_b) + (double(st.logsum_b) - ref.logsum_b), 0.0,
                  tol_loss * std::max(1.0, ref.logsum_b));
    UF_CHECK_NEAR(st.kept, ref.kept, tol_loss);
    if (!ce) {  // the gradient is the same for both forms
      const F scale = static_cast<F>(-0.75) * inv_t;  // grad_output * K_S / T with grad_output != 1
      std::vector<F> g(V, static_cast<F>(12345));      // poisoned
      uf::dmk_row_backward<F>(s.data(), t.data(), kvp, static_cast<int64_t>(V), inv_t, st.max_a, st.logsum_a,
                              st.max_b, st.logsum_b, st.kept, scale, g.data());
      std::vector<double> got(V), want(V);
      for (size_t i = 0; i < V; ++i) {
        got[i] = static_cast<double>(g[i]);
        want[i] = -0.75 * ref.grad[i];
      }
      const double err = rel_l2(want, got);
      UF_CHECK(err <= tol_grad);
      if (err > tol_grad) std::fprintf(stderr, "  V=%zu kind=%d mask=%d: gradient rel err %.3g\n", V,
                                       static_cast<int>(kind), with_mask, err);
    }
  }
}

}  // namespace

UF_TEST(float_rows_match_double_reference) {
  for (size_t V : {1, 7, 1271, 2047, 2048, 2049, 5000, 32000}) {
    for (bool mask : {false, true}) check_rows<float>(V, Kind::kNormal, mask, 1.3, 2e-6, 5e-6);
  }
}

UF_TEST(float_rows_peaked_and_rising_maxima) {
  for (size_t V : {3001, 9000}) {
    check_rows<float>(V, Kind::kPeaked, true, 1.0, 2e-6, 1e-5);
    check_rows<float>(V, Kind::kRamp, true, 0.7, 2e-6, 1e-5);
  }
}

UF_TEST(float_rows_extreme_logits) {
  for (size_t V : {2047, 6000}) {
    check_rows<float>(V, Kind::kExtreme, true, 1.0, 1e-6, 1e-5);
    check_rows<float>(V, Kind::kExtreme, false, 1.0, 1e-6, 1e-5);
  }
}

UF_TEST(float_small_kl_between_close_rows_at_1e4_does_not_cancel) {
  // Student = teacher + 0.01 noise at logits near +-1e4: KL ~ 5e-5, while a naive fp32
  // lse(a) - lse(b) or sum p (b - a) carries absolute errors ~ ulp(1e4) ~ 1e-3.  What
  // remains is the fp32 rounding of the log-sums (~7.4 here, ulp 5e-7).
  std::mt19937_64 rng(uf_test::seed() + 5);
  const size_t V = 5000;
  const std::vector<float> t = logits<float>(rng, V, Kind::kExtreme, 1.0);
  std::normal_distribution<double> noise(0.0, 0.01);
  std::vector<float> s(V);
  for (size_t i = 0; i < V; ++i) s[i] = static_cast<float>(t[i] + noise(rng));
  const Reference ref = reference(s, t, nullptr, 1.0f);
  const uf::DmkRowStats st = uf::dmk_row_forward<float>(s.data(), t.data(), nullptr, V, 1.f, false);
  UF_CHECK(ref.kl > 1e-6 && ref.kl < 1e-3);
  UF_CHECK_NEAR(st.loss, ref.kl, 1e-6);
}

UF_TEST(double_rows_match_reference_to_double_precision) {
  for (size_t V : {1, 257, 2049, 7000}) {
    check_rows<double>(V, Kind::kNormal, true, 1.3, 1e-13, 1e-12);
    check_rows<double>(V, Kind::kExtreme, false, 1.0, 1e-13, 1e-12);
    check_rows<double>(V, Kind::kRamp, true, 0.9, 1e-13, 1e-12);
  }
}

UF_TEST(all_masked_vocabulary_gives_zero_loss_and_q_gradient_zero) {
  std::mt19937_64 rng(uf_test::seed() + 99);
  const size_t V = 3000;
  const std::vector<float> s = logits<float>(rng, V, Kind::kNormal, 1.0), t = logits<float>(rng, V, Kind::kNormal, 1.0);
  const std::vector<float> kv(V, 0.f);
  const uf::DmkRowStats st = uf::dmk_row_forward<float>(s.data(), t.data(), kv.data(), V, 1.f, false);
  UF_CHECK(st.loss == 0.f && st.kept == 0.f);
  std::vector<float> g(V, 1.f);
  uf::dmk_row_backward<float>(s.data(), t.data(), kv.data(), V, 1.f, st.max_a, st.logsum_a, st.max_b, st.logsum_b,
                              st.kept, 1.f, g.data());
  UF_CHECK(std::all_of(g.begin(), g.end(), [](float x) { return x == 0.f; }));
}
