// Token statistics: per-row CPU kernels on float logit rows (torch-free).
//
// For one position with logits z (length V), p = softmax(z), target t:
//
//   logprob = z_t - lse,                    lse = log sum_v exp(z_v)
//   entropy = -sum_v p_v log p_v            (so E_p[log p] = -entropy)
//   std     = sqrt(E_p[(log p)^2] - E_p[log p]^2)   (Min-K%++'s sigma)
//   argmax  = first index of the largest logit
//
// Forward is two passes over the row (it is in cache: the callers hand over one row
// of a logits chunk at a time): pass 1 finds the maximum m and its first index,
// pass 2 accumulates with d = z - m <= 0
//   s = sum e^d,  A1 = sum e^d d,  A2 = sum e^d d^2
// so E_p[log p] = A1/s - log s and Var_p[log p] = Var_p[d] = A2/s - (A1/s)^2 (the
// log s shift cancels).  All sums in float32 with `omp simd` reductions.
//
// Backward (g may alias z): d logprob / d z_v = 1[v == t] - p_v, times the incoming gradient; p is
// recomputed from the saved (m, log s) (no stored probabilities); the true-class term
// go * (1 - p_t) is formed in float32 before any rounding.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd_math.h"

namespace uf {

struct TokenRowStats {
  float logprob;
  float max;    // m: lse = m + log_s, kept apart so the backward's (z - m) - log_s stays
  float log_s;  //    exact for logits of magnitude 1e4 (m + log_s rounds to ~1e-3 there)
  float entropy;
  float std_logp;
  int64_t argmax;
};

// target < 0 means "ignored": every statistic is 0 (argmax 0).  The caller maps
// ignore_index to -1 and has validated the range; an out-of-range target gives NaN.
inline TokenRowStats token_row_forward(const float* z, int64_t V, int64_t target) {
  TokenRowStats out{0.f, 0.f, 0.f, 0.f, 0.f, 0};
  if (target < 0) return out;
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < V; ++i) m = std::max(m, z[i]);
  int64_t arg = 0;
  for (int64_t i = 0; i < V; ++i) {
    if (z[i] == m) {
      arg = i;
      break;
    }
  }
  float s = 0.f, a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : s, a1, a2)
  for (int64_t i = 0; i < V; ++i) {
    const float d = z[i] - m;
    const float e = fast_exp(d);
    const float ed = e * d;
    s += e;
    a1 += ed;
    a2 += ed * d;
  }
  const float log_s = std::log(s);
  const float mean_d = a1 / s;
  const float var = std::max(0.f, a2 / s - mean_d * mean_d);
  out.max = m;
  out.log_s = log_s;
  out.logprob = target < V ? (z[target] - m) - log_s : std::numeric_limits<float>::quiet_NaN();
  out.entropy = log_s - mean_d;
  out.std_logp = std::sqrt(var);
  out.argmax = arg;
  return out;
}

// g[v] = go * (1[v == target] - exp((z_v - m) - log_s)); target < 0 or go == 0 -> zeros.
inline void token_row_backward(const float* z, int64_t V, int64_t target, float m, float log_s, float go, float* g) {
  if (target < 0 || target >= V || go == 0.f) {
    std::fill(g, g + V, 0.f);
    return;
  }
  // Read the true-class logit first: g may alias z (in-place on a float32 chunk).
  const float pt = std::exp((z[target] - m) - log_s);
  const float neg_go = -go;
#pragma omp simd
  for (int64_t i = 0; i < V; ++i) g[i] = neg_go * fast_exp((z[i] - m) - log_s);
  g[target] = go * (1.f - pt);
}

}  // namespace uf
