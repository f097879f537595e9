// token_row_forward / token_row_backward (csrc/cpu/token_stats.h) against a double
// scalar reference: log-prob, lse pieces, entropy, std of log p, argmax, gradient.
#include <algorithm>
#include <vector>

#include "cpu/token_stats.h"
#include "harness.h"

namespace {

std::vector<float> random_logits(std::mt19937_64& rng, size_t V, double scale, double offset) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> z(V);
  for (auto& x : z) x = static_cast<float>(normal(rng) + offset);
  return z;
}

void check_row(size_t V, double scale, double offset, int64_t target) {
  std::mt19937_64 rng(uf_test::seed() + V + static_cast<uint64_t>(offset));
  const std::vector<float> z = random_logits(rng, V, scale, offset);
  double m = z[0];
  size_t arg = 0;
  for (size_t i = 1; i < V; ++i) {
    if (z[i] > m) {
      m = z[i];
      arg = i;
    }
  }
  double s = 0;
  for (float x : z) s += std::exp(x - m);
  const double lse = m + std::log(s);
  double mean_logp = 0, mean_logp2 = 0;
  for (float x : z) {
    const double lp = x - lse, p = std::exp(lp);
    mean_logp += p * lp;
    mean_logp2 += p * lp * lp;
  }
  const double stdv = std::sqrt(std::max(0.0, mean_logp2 - mean_logp * mean_logp));
  const uf::TokenRowStats st = uf::token_row_forward(z.data(), static_cast<int64_t>(V), target);
  const double mag = std::max(1.0, std::fabs(m));
  UF_CHECK_NEAR(st.logprob, z[target] - lse, 2e-6 * mag);
  UF_CHECK_NEAR(st.max + st.log_s, lse, 2e-6 * mag);
  UF_CHECK(st.max == static_cast<float>(m));
  UF_CHECK_NEAR(st.entropy, -mean_logp, 2e-5 * std::max(1.0, -mean_logp));
  UF_CHECK_NEAR(st.std_logp, stdv, 2e-4 * std::max(1.0, stdv));
  UF_CHECK(st.argmax == static_cast<int64_t>(arg));

  const float go = -1.7f;
  std::vector<float> g(V, 12345.f);  // poisoned
  uf::token_row_backward(z.data(), static_cast<int64_t>(V), target, st.max, st.log_s, go, g.data());
  // Per entry: each p carries the fp32 rounding of (z - m) - log s (|log p| * eps
  // relative), and the target's 1 - p_t cancels to within eps when p_t -> 1 (as in eager
  // fp32), so: |g - want| <= 1e-5 |want| + 3e-7 |go|.
  int bad = 0;
  for (size_t i = 0; i < V; ++i) {
    const double want = go * ((static_cast<int64_t>(i) == target ? 1.0 : 0.0) - std::exp(z[i] - lse));
    const double err = std::fabs(g[i] - want);
    if (!(err <= 1e-5 * std::fabs(want) + 3e-7 * std::fabs(go))) {
      if (bad++ == 0) std::fprintf(stderr, "  V=%zu scale=%g: g[%zu] = %.9g, expected %.9g\n", V, scale, i, g[i], want);
    }
  }
  UF_CHECK(bad == 0);
}

}  // namespace

UF_TEST(token_rows_match_double_reference) {
  for (size_t V : {1, 5, 1271, 32000}) {
    check_row(V, 2.0, 0.0, static_cast<int64_t>(V / 2));
    check_row(V, 8.0, 0.0, 0);
  }
}

UF_TEST(token_rows_with_large_offset_logits) {
  // (z - m) - log s stays exact for logits near 1e4, where m + log s would round.
  check_row(3000, 1.0, 1e4, 17);
  check_row(3000, 1.0, -1e4, 2999);
}

UF_TEST(ignored_rows_give_zeros) {
  std::mt19937_64 rng(uf_test::seed());
  const std::vector<float> z = random_logits(rng, 100, 1.0, 0.0);
  const uf::TokenRowStats st = uf::token_row_forward(z.data(), 100, -1);
  UF_CHECK(st.logprob == 0.f && st.max == 0.f && st.log_s == 0.f && st.argmax == 0);
  std::vector<float> g(100, 1.f);
  uf::token_row_backward(z.data(), 100, -1, 0.f, 0.f, 1.f, g.data());
  UF_CHECK(std::all_of(g.begin(), g.end(), [](float x) { return x == 0.f; }));
}

UF_TEST(first_argmax_on_ties) {
  std::vector<float> z(50, 0.f);
  z[7] = z[31] = 3.f;
  UF_CHECK(uf::token_row_forward(z.data(), 50, 0).argmax == 7);
}
