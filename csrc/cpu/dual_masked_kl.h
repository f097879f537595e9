// Dual masked KL divergence: per-row CPU kernels on float rows (torch-free).
//
// For one position with student logits s and teacher logits t (length V),
// a = s / T, b = t / T, q = softmax(a), p = softmax(b), K_V the vocabulary mask:
//
//   KL row  = sum_v K_V p (log p - log q)
//   CE row  = -sum_v K_V p log q
//   d row / d a_j = q_j * S - K_V(j) * p_j,   S = sum_v K_V p
//
// Forward is one streaming pass over the row in blocks with online maxima: it keeps
//   sa = sum exp(a - ma), sb = sum exp(b - mb), Ks = sum K_V exp(b - mb),
//   W  = sum K_V exp(b - mb) ((b - mb) - (a - ma)),
//   E  = sum K_V exp(b - mb) (b - mb),
// rescaling them when a block raises a maximum.  Accumulating shifted differences
// keeps the terms small even for logits of +-1e4, where lse(a) - lse(b) and
// sum p (b - a) would otherwise cancel catastrophically in fp32.  Then
//   KL = W / sb + S (log sa - log sb),   sum K_V p log p = E / sb - S log sb,
//   CE = KL - sum K_V p log p.
// Backward recomputes p and q from the saved row statistics: one more pass, no
// stored probabilities.  The statistics keep each maximum and log-sum apart
// (lse = max + log_sum): at logits of 1e4 an fp32 lse is off by up to half an ulp
// (5e-4), which would become a 5e-4 relative error in every probability, whereas
// (x - max) is exact and log_sum is small.
//
// Both kernels are templates over the compute type F: float (the fast path for
// fp32/bf16/fp16 logits, fast_exp, vectorised) and double (float64 logits: std::exp and
// double accumulation, for gradcheck and float64 training loops).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd_math.h"

namespace uf {

// Per-row statistics saved for backward, in this order (kDmkStats values per row).
constexpr int kDmkStats = 5;
template <typename F>
struct DmkRowStatsT {
  F loss;      // KL or CE for the row (before the token mask)
  F max_a;     // max of s / T
  F logsum_a;  // log sum exp(s / T - max_a)
  F max_b;     // max of t / T
  F logsum_b;  // log sum exp(t / T - max_b)
  F kept;      // S = sum_v K_V p
};
using DmkRowStats = DmkRowStatsT<float>;

constexpr int64_t kDmkBlock = 2048;

// The exponential of the row kernels: the vectorisable polynomial in float, std::exp in double.
#pragma omp declare simd notinbranch
UF_ALWAYS_INLINE float dmk_exp(float x) { return fast_exp(x); }
inline double dmk_exp(double x) { return std::exp(x); }

// One pass over a row.  kGuard: a teacher -inf logit (p = 0) adds nothing (0 log 0 = 0)
// to w and e instead of 0 * -inf = NaN; see dmk_row_forward.
template <typename F, bool kGuard>
inline DmkRowStatsT<F> dmk_row_pass(const F* s, const F* t, const float* kv, int64_t V, F inv_t,
                                    bool cross_entropy) {
  const F neg_inf = -std::numeric_limits<F>::infinity();
  F ma = neg_inf, mb = neg_inf;
  F sa = 0, sb = 0, ks = 0, w = 0, e = 0;
  for (int64_t start = 0; start < V; start += kDmkBlock) {
    const int64_t n = std::min(kDmkBlock, V - start);
    const F* sblk = s + start;
    const F* tblk = t + start;
    F bma = neg_inf, bmb = neg_inf;
#pragma omp simd reduction(max : bma, bmb)
    for (int64_t i = 0; i < n; ++i) {
      bma = std::max(bma, sblk[i] * inv_t);
      bmb = std::max(bmb, tblk[i] * inv_t);
    }
    if (start == 0) {
      ma = bma;
      mb = bmb;
    } else {
      if (bma > ma) {  // d = (b - mb) - (a - ma) grows by the rise of ma
        sa *= dmk_exp(ma - bma);
        w += ks * (bma - ma);
        ma = bma;
      }
      if (bmb > mb) {  // every exp(b - mb) shrinks by r, d and (b - mb) fall by the rise
        const F rise = bmb - mb;
        const F r = dmk_exp(-rise);
        w = r * (w - ks * rise);
        e = r * (e - ks * rise);
        ks *= r;
        sb *= r;
        mb = bmb;
      }
    }
    F bsa = 0, bsb = 0, bks = 0, bw = 0, be = 0;
    if (kv != nullptr) {
      const float* kvblk = kv + start;
#pragma omp simd reduction(+ : bsa, bsb, bks, bw, be)
      for (int64_t i = 0; i < n; ++i) {
        const F da = sblk[i] * inv_t - ma;
        const F db = tblk[i] * inv_t - mb;
        const F ea = dmk_exp(da);
        const F eb = dmk_exp(db);
        const F keb = static_cast<F>(kvblk[i]) * eb;
        const F dbk = kGuard ? (keb > 0 ? db : F(0)) : db;
        bsa += ea;
        bsb += eb;
        bks += keb;
        bw += keb * (dbk - (kGuard ? (keb > 0 ? da : F(0)) : da));
        be += keb * dbk;
      }
    } else {
#pragma omp simd reduction(+ : bsa, bsb, bw, be)
      for (int64_t i = 0; i < n; ++i) {
        const F da = sblk[i] * inv_t - ma;
        const F db = tblk[i] * inv_t - mb;
        const F ea = dmk_exp(da);
        const F eb = dmk_exp(db);
        const F dbk = kGuard ? (eb > 0 ? db : F(0)) : db;
        bsa += ea;
        bsb += eb;
        bw += eb * (dbk - (kGuard ? (eb > 0 ? da : F(0)) : da));
        be += eb * dbk;
      }
      bks = bsb;
    }
    sa += bsa;
    sb += bsb;
    ks += bks;
    w += bw;
    e += be;
  }
  const F log_sa = std::log(sa), log_sb = std::log(sb);
  const F kept = ks / sb;
  const F kl = w / sb + kept * (log_sa - log_sb);
  DmkRowStatsT<F> out;
  out.loss = cross_entropy ? kl - (e / sb - kept * log_sb) : kl;
  out.max_a = ma;
  out.logsum_a = log_sa;
  out.max_b = mb;
  out.logsum_b = log_sb;
  out.kept = kept;
  return out;
}

// The row statistics; kv == nullptr means K_V = 1 everywhere.  The unguarded pass is the
// fast one; a row whose loss comes out NaN (a teacher -inf logit, or NaN input) is run
// again guarded, so ordinary rows pay nothing for the -inf rule.
template <typename F>
inline DmkRowStatsT<F> dmk_row_forward(const F* s, const F* t, const float* kv, int64_t V, F inv_t,
                                       bool cross_entropy) {
  const DmkRowStatsT<F> out = dmk_row_pass<F, false>(s, t, kv, V, inv_t, cross_entropy);
  return std::isnan(out.loss) ? dmk_row_pass<F, true>(s, t, kv, V, inv_t, cross_entropy) : out;
}

// g[v] = scale * (q_v * S - K_V(v) * p_v), scale = grad_row * K_S / T.
template <typename F>
inline void dmk_row_backward(const F* s, const F* t, const float* kv, int64_t V, F inv_t, F max_a, F logsum_a,
                             F max_b, F logsum_b, F kept, F scale, F* g) {
  if (kv != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const F q = dmk_exp((s[i] * inv_t - max_a) - logsum_a);
      const F p = dmk_exp((t[i] * inv_t - max_b) - logsum_b);
      g[i] = scale * (q * kept - static_cast<F>(kv[i]) * p);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const F q = dmk_exp((s[i] * inv_t - max_a) - logsum_a);
      const F p = dmk_exp((t[i] * inv_t - max_b) - logsum_b);
      g[i] = scale * (q * kept - p);
    }
  }
}

}  // namespace uf
