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

namespace {

// Run the column kernels over a (V, n) vocabulary-major matrix in blocks of vb rows, as
// csrc/token_stats.cpp does slab by slab; returns each token's statistics.
std::vector<uf::TokenRowStats> column_forward(const std::vector<float>& zt, int64_t V, int64_t n, int64_t vb,
                                              const std::vector<int64_t>& targets, std::vector<float>* s_excl_out) {
  std::vector<float> m(n, -std::numeric_limits<float>::infinity()), s(n, 0.f), a1(n, 0.f), a2(n, 0.f),
      s_excl(n, 0.f), zt_(n, 0.f), m_old(n), factor(n);
  std::vector<int64_t> arg(n, 0);
  uf::TokenColumnState st{m.data(), s.data(), a1.data(), a2.data(), s_excl.data(), zt_.data(), arg.data()};
  for (int64_t v0 = 0; v0 < V; v0 += vb) {
    const int64_t b = std::min(vb, V - v0);
    std::vector<float> slab(zt.begin() + v0 * n, zt.begin() + (v0 + b) * n);
    uf::token_columns_raise_max(slab.data(), b, n, v0, 0, n, st, m_old.data());
    uf::token_columns_rescale(m_old.data(), 0, n, st, factor.data());
    uf::token_columns_accumulate(slab.data(), b, n, v0, 0, n, targets.data(), st, true);
  }
  std::vector<uf::TokenRowStats> out;
  for (int64_t r = 0; r < n; ++r) out.push_back(uf::token_column_finish(st, r, targets[r], V));
  if (s_excl_out != nullptr) {
    for (int64_t r = 0; r < n; ++r) s_excl_out->push_back(s_excl[r] / s[r]);  // 1 - p_t
  }
  return out;
}

}  // namespace

UF_TEST(column_blocks_match_row_kernels) {
  // Blocks of 7 and 64 rows over V = 300 (a partial last block); logits rising with the
  // id so every block raises the maxima; a tie across blocks; one nearly certain token.
  std::mt19937_64 rng(uf_test::seed() + 7);
  const int64_t V = 300, n = 9;
  std::vector<float> zt(V * n);  // vocabulary-major: zt[v * n + r]
  std::normal_distribution<double> normal(0.0, 2.0);
  for (int64_t v = 0; v < V; ++v) {
    for (int64_t r = 0; r < n; ++r) zt[v * n + r] = static_cast<float>(normal(rng) + 0.02 * v + (r == 3 ? 1e4 : 0.0));
  }
  for (int64_t v = 0; v < V; ++v) zt[v * n + 1] = 0.f;
  zt[10 * n + 1] = zt[200 * n + 1] = 5.f;  // tie: argmax 10
  zt[77 * n + 2] = 80.f;                   // p_t ~ 1 for target 77
  std::vector<int64_t> targets = {5, 250, 77, 299, -1, 0, 150, 64, 300 /* out of range */};
  for (int64_t vb : {7, 64}) {
    std::vector<float> one_minus_pt;
    const auto cols = column_forward(zt, V, n, vb, targets, &one_minus_pt);
    for (int64_t r = 0; r < n; ++r) {
      std::vector<float> row(V);
      for (int64_t v = 0; v < V; ++v) row[v] = zt[v * n + r];
      const int64_t t = targets[r];
      const uf::TokenRowStats want = uf::token_row_forward(row.data(), V, t);
      const uf::TokenRowStats got = cols[r];
      const double mag = std::max(1.0, std::fabs(static_cast<double>(want.max)));
      if (t >= 0 && t < V) UF_CHECK_NEAR(got.logprob, want.logprob, 1e-5 * mag);
      if (t >= V) UF_CHECK(std::isnan(got.logprob));
      UF_CHECK(got.max == want.max);
      UF_CHECK_NEAR(got.log_s, want.log_s, 1e-5);
      UF_CHECK_NEAR(got.entropy, want.entropy, 1e-4 * std::max(1.f, want.entropy));
      UF_CHECK_NEAR(got.std_logp, want.std_logp, 1e-3 * std::max(1.f, want.std_logp));
      UF_CHECK(got.argmax == want.argmax);
    }
    UF_CHECK(cols[1].argmax == 10);
    // 1 - p_t of the nearly certain token, without cancellation: the double value
    double s = 0, st = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double e = std::exp(static_cast<double>(zt[v * n + 2]) - 80.0);
      s += e;
      if (v != 77) st += e;
    }
    UF_CHECK_NEAR(one_minus_pt[2], st / s, 1e-5 * st / s);
  }
}

UF_TEST(column_gradient_matches_row_backward) {
  std::mt19937_64 rng(uf_test::seed() + 11);
  const int64_t V = 130, n = 5, vb = 32;
  std::vector<float> zt(V * n);
  std::normal_distribution<double> normal(0.0, 3.0);
  for (auto& x : zt) x = static_cast<float>(normal(rng));
  const std::vector<int64_t> targets = {3, 129, -1, 64, 31};
  const std::vector<float> go = {1.5f, -0.7f, 2.f, 0.f, 1.f};
  std::vector<float> st4(4 * n, 0.f);
  std::vector<std::vector<float>> rows(n, std::vector<float>(V));
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t v = 0; v < V; ++v) rows[r][v] = zt[v * n + r];
    const uf::TokenRowStats s = uf::token_row_forward(rows[r].data(), V, targets[r]);
    st4[4 * r] = s.max;
    st4[4 * r + 1] = s.log_s;
  }
  std::vector<float> g = zt, scratch(2 * n);
  for (int64_t v0 = 0; v0 < V; v0 += vb) {
    uf::token_columns_gradient(g.data() + v0 * n, std::min(vb, V - v0), n, v0, 0, n, targets.data(), V, st4.data(),
                               go.data(), scratch.data());
  }
  for (int64_t r = 0; r < n; ++r) {
    std::vector<float> want(V);
    uf::token_row_backward(rows[r].data(), V, targets[r], st4[4 * r], st4[4 * r + 1], go[r], want.data());
    for (int64_t v = 0; v < V; ++v) UF_CHECK_NEAR(g[v * n + r], want[v], 1e-6 * std::max(1.f, std::fabs(want[v])));
  }
}
