// csrc/cpu/modality.h against double-precision scalar references of the definitions:
// embedding distances and their gradients, the row KL of two softmaxed similarity rows,
// the online column states folded panel by panel (any split of the rows must give the
// whole column's result), and the gradient rows of the row / column KL terms.
#include <algorithm>
#include <vector>

#include "cpu/modality.h"
#include "harness.h"

namespace {

std::vector<float> randn(std::mt19937_64& rng, size_t n, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(normal(rng));
  return x;
}

struct SoftmaxRef {
  double max, log_sum;
  std::vector<double> p;
};

SoftmaxRef softmax_ref(const std::vector<double>& x) {
  SoftmaxRef r{};
  r.max = *std::max_element(x.begin(), x.end());
  double s = 0;
  for (double v : x) s += std::exp(v - r.max);
  r.log_sum = std::log(s);
  for (double v : x) r.p.push_back(std::exp((v - r.max) - r.log_sum));
  return r;
}

// KL(softmax(r) || softmax(s)) in double
double kl_ref(const std::vector<double>& s, const std::vector<double>& r) {
  const SoftmaxRef q = softmax_ref(s), p = softmax_ref(r);
  double kl = 0;
  for (size_t j = 0; j < s.size(); ++j) {
    const double log_q = (s[j] - q.max) - q.log_sum, log_p = (r[j] - p.max) - p.log_sum;
    kl += p.p[j] * (log_p - log_q);
  }
  return kl;
}

std::vector<double> to_double(const float* x, size_t n) { return std::vector<double>(x, x + n); }

}  // namespace

UF_TEST(squared_error_row_and_gradient) {
  std::mt19937_64 rng(uf_test::seed());
  for (size_t d : {1, 7, 37, 768}) {
    auto s = randn(rng, d, 1.0), r = randn(rng, d, 1.0);
    double ref = 0;
    for (size_t i = 0; i < d; ++i) ref += (double(s[i]) - r[i]) * (double(s[i]) - r[i]);
    UF_CHECK_NEAR(uf::sq_diff_row(s.data(), r.data(), d), ref, 1e-5 * (1 + ref));
    std::vector<float> g(d);
    uf::sq_diff_row_grad(s.data(), r.data(), d, -0.7f, g.data());
    for (size_t i = 0; i < d; ++i) UF_CHECK_NEAR(g[i], -0.7 * 2 * (double(s[i]) - r[i]), 1e-5);
  }
}

UF_TEST(cosine_distance_row_and_gradient) {
  std::mt19937_64 rng(uf_test::seed() + 1);
  for (size_t d : {2, 19, 512}) {
    auto s = randn(rng, d, 1.0), r = randn(rng, d, 1.0);
    double dot = 0, ss = 0, rr = 0;
    for (size_t i = 0; i < d; ++i) {
      dot += double(s[i]) * r[i];
      ss += double(s[i]) * s[i];
      rr += double(r[i]) * r[i];
    }
    const double ns = std::sqrt(ss), nr = std::sqrt(rr), cos = dot / (ns * nr);
    UF_CHECK_NEAR(uf::cosine_distance_row(s.data(), r.data(), d), 1 - cos, 1e-5);
    std::vector<float> g(d);
    uf::cosine_distance_row_grad(s.data(), r.data(), d, 1.3f, g.data());
    for (size_t i = 0; i < d; ++i) {
      const double ref = -1.3 * (r[i] / (ns * nr) - cos * s[i] / ss);  // d(1 - cos)/ds
      UF_CHECK_NEAR(g[i], ref, 1e-5 * (1 + std::fabs(ref)));
    }
  }
  // a zero embedding: its norm is the constant eps (torch's clamp), the distance is 1
  std::vector<float> zero(5, 0.f), r = randn(rng, 5, 1.0), g(5);
  UF_CHECK_NEAR(uf::cosine_distance_row(zero.data(), r.data(), 5), 1.0, 1e-6);
  uf::cosine_distance_row_grad(zero.data(), r.data(), 5, 1.f, g.data());
  double nr = 0;
  for (float v : r) nr += double(v) * v;
  nr = std::sqrt(nr);
  for (size_t i = 0; i < 5; ++i) UF_CHECK_NEAR(g[i] / (-r[i] / (1e-8 * nr)), 1.0, 1e-5);
}

UF_TEST(kl_row_matches_reference_including_large_logits) {
  std::mt19937_64 rng(uf_test::seed() + 2);
  for (double scale : {1.0, 30.0, 1000.0}) {
    for (size_t n : {1, 3, 129, 1000}) {
      auto s = randn(rng, n, scale), r = randn(rng, n, scale);
      const uf::SimRowResult res = uf::sim_kl_row(s.data(), r.data(), n);
      const auto sd = to_double(s.data(), n), rd = to_double(r.data(), n);
      const double ref = kl_ref(sd, rd);
      UF_CHECK_NEAR(res.kl, ref, 1e-4 * (1 + std::fabs(ref)));
      const SoftmaxRef q = softmax_ref(sd), p = softmax_ref(rd);
      UF_CHECK_NEAR(res.max_s, q.max, 0);
      UF_CHECK_NEAR(res.max_r, p.max, 0);
      UF_CHECK_NEAR(res.log_sum_s, q.log_sum, 1e-5 * (1 + q.log_sum));
      UF_CHECK_NEAR(res.log_sum_r, p.log_sum, 1e-5 * (1 + p.log_sum));
    }
  }
}

// Fold the rows of an (n x m) panel into column states in chunks of `step` rows: every
// split must give the KL of whole columns (the t2i direction of the similarity loss).
UF_TEST(column_states_any_row_split_gives_whole_column_kl) {
  std::mt19937_64 rng(uf_test::seed() + 3);
  const int64_t n = 53, m = 37;
  for (double scale : {1.0, 20.0, 500.0}) {
    auto s = randn(rng, n * m, scale), r = randn(rng, n * m, scale);
    for (int64_t step : {1, 5, 16, 53}) {
      std::vector<float> buf(5 * m), scratch(5 * m);
      uf::ColumnStates st{buf.data(), buf.data() + m, buf.data() + 2 * m, buf.data() + 3 * m, buf.data() + 4 * m};
      uf::column_states_init(st, m);
      for (int64_t i0 = 0; i0 < n; i0 += step) {
        const int64_t rows = std::min(step, n - i0);
        // two column chunks, as the parallel loop splits them
        uf::sim_kl_columns_update(s.data() + i0 * m, r.data() + i0 * m, rows, m, 0, 20, st, scratch.data());
        uf::sim_kl_columns_update(s.data() + i0 * m, r.data() + i0 * m, rows, m, 20, m, st, scratch.data());
      }
      for (int64_t j = 0; j < m; ++j) {
        std::vector<double> sc(n), rc(n);
        for (int64_t i = 0; i < n; ++i) {
          sc[i] = s[i * m + j];
          rc[i] = r[i * m + j];
        }
        const double ref = kl_ref(sc, rc);
        const double kl = st.w[j] / st.sr[j] + std::log(st.ss[j]) - std::log(st.sr[j]);
        UF_CHECK_NEAR(kl, ref, 2e-4 * (1 + std::fabs(ref)));
        UF_CHECK_NEAR(st.ms[j], softmax_ref(sc).max, 0);
        UF_CHECK_NEAR(std::log(st.sr[j]), softmax_ref(rc).log_sum, 1e-5 * (1 + softmax_ref(rc).log_sum));
      }
    }
  }
}

// G_ij = g_row (q_ij - p_ij) + g_col (q'_ij - p'_ij) from the saved (max, log-sum) statistics.
UF_TEST(gradient_rows_of_row_and_column_terms) {
  std::mt19937_64 rng(uf_test::seed() + 4);
  const int64_t n = 9, m = 23;
  auto s = randn(rng, n * m, 3.0), r = randn(rng, n * m, 3.0);
  std::vector<float> row_stats(4 * n), col_stats(4 * m);
  std::vector<SoftmaxRef> qr(n), pr(n), qc(m), pc(m);
  for (int64_t i = 0; i < n; ++i) {
    qr[i] = softmax_ref(to_double(s.data() + i * m, m));
    pr[i] = softmax_ref(to_double(r.data() + i * m, m));
    row_stats[i] = static_cast<float>(qr[i].max);
    row_stats[n + i] = static_cast<float>(qr[i].log_sum);
    row_stats[2 * n + i] = static_cast<float>(pr[i].max);
    row_stats[3 * n + i] = static_cast<float>(pr[i].log_sum);
  }
  for (int64_t j = 0; j < m; ++j) {
    std::vector<double> sc(n), rc(n);
    for (int64_t i = 0; i < n; ++i) {
      sc[i] = s[i * m + j];
      rc[i] = r[i * m + j];
    }
    qc[j] = softmax_ref(sc);
    pc[j] = softmax_ref(rc);
    col_stats[j] = static_cast<float>(qc[j].max);
    col_stats[m + j] = static_cast<float>(qc[j].log_sum);
    col_stats[2 * m + j] = static_cast<float>(pc[j].max);
    col_stats[3 * m + j] = static_cast<float>(pc[j].log_sum);
  }
  const float g_row = 0.37f, g_col = -1.9f;
  for (int mode = 0; mode < 4; ++mode) {  // both, rows only, columns only, neither
    const bool rows = mode == 0 || mode == 1, cols = mode == 0 || mode == 2;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<float> g(s.begin() + i * m, s.begin() + (i + 1) * m);
      uf::sim_kl_grad_row(g.data(), r.data() + i * m, m, rows ? row_stats.data() + i : nullptr, n, g_row,
                          cols ? col_stats.data() : nullptr, m, g_col);
      for (int64_t j = 0; j < m; ++j) {
        double ref = 0;
        if (rows) ref += g_row * (qr[i].p[j] - pr[i].p[j]);
        if (cols) ref += g_col * (qc[j].p[i] - pc[j].p[i]);
        UF_CHECK_NEAR(g[j], ref, 2e-6);
      }
    }
  }
}
