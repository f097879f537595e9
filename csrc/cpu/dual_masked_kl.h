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
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd_math.h"

namespace uf {

// Per-row statistics saved for backward, in this order (kDmkStats floats per row).
constexpr int kDmkStats = 5;
struct DmkRowStats {
  float loss;     // KL or CE for the row (before the token mask)
  float max_a;    // max of s / T
  float logsum_a; // log sum exp(s / T - max_a)
  float max_b;    // max of t / T
  float logsum_b; // log sum exp(t / T - max_b)
  float kept;     // S = sum_v K_V p
};

constexpr int64_t kDmkBlock = 2048;

// kv == nullptr means K_V = 1 everywhere.
inline DmkRowStats dmk_row_forward(const float* s, const float* t, const float* kv, int64_t V,
                                   float inv_t, bool cross_entropy) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float ma = neg_inf, mb = neg_inf;
  float sa = 0.f, sb = 0.f, ks = 0.f, w = 0.f, e = 0.f;
  for (int64_t start = 0; start < V; start += kDmkBlock) {
    const int64_t n = std::min(kDmkBlock, V - start);
    const float* sblk = s + start;
    const float* tblk = t + start;
    float bma = neg_inf, bmb = neg_inf;
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
        sa *= fast_exp(ma - bma);
        w += ks * (bma - ma);
        ma = bma;
      }
      if (bmb > mb) {  // every exp(b - mb) shrinks by r, d and (b - mb) fall by the rise
        const float rise = bmb - mb;
        const float r = fast_exp(-rise);
        w = r * (w - ks * rise);
        e = r * (e - ks * rise);
        ks *= r;
        sb *= r;
        mb = bmb;
      }
    }
    float bsa = 0.f, bsb = 0.f, bks = 0.f, bw = 0.f, be = 0.f;
    if (kv != nullptr) {
      const float* kvblk = kv + start;
#pragma omp simd reduction(+ : bsa, bsb, bks, bw, be)
      for (int64_t i = 0; i < n; ++i) {
        const float da = sblk[i] * inv_t - ma;
        const float db = tblk[i] * inv_t - mb;
        const float ea = fast_exp(da);
        const float eb = fast_exp(db);
        const float keb = kvblk[i] * eb;
        bsa += ea;
        bsb += eb;
        bks += keb;
        bw += keb * (db - da);
        be += keb * db;
      }
    } else {
#pragma omp simd reduction(+ : bsa, bsb, bw, be)
      for (int64_t i = 0; i < n; ++i) {
        const float da = sblk[i] * inv_t - ma;
        const float db = tblk[i] * inv_t - mb;
        const float ea = fast_exp(da);
        const float eb = fast_exp(db);
        bsa += ea;
        bsb += eb;
        bw += eb * (db - da);
        be += eb * db;
      }
      bks = bsb;
    }
    sa += bsa;
    sb += bsb;
    ks += bks;
    w += bw;
    e += be;
  }
  const float log_sa = std::log(sa), log_sb = std::log(sb);
  const float kept = ks / sb;
  const float kl = w / sb + kept * (log_sa - log_sb);
  DmkRowStats out;
  out.loss = cross_entropy ? kl - (e / sb - kept * log_sb) : kl;
  out.max_a = ma;
  out.logsum_a = log_sa;
  out.max_b = mb;
  out.logsum_b = log_sb;
  out.kept = kept;
  return out;
}

// g[v] = scale * (q_v * S - K_V(v) * p_v), scale = grad_row * K_S / T.
inline void dmk_row_backward(const float* s, const float* t, const float* kv, int64_t V, float inv_t,
                             float max_a, float logsum_a, float max_b, float logsum_b, float kept, float scale,
                             float* g) {
  if (kv != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float q = fast_exp((s[i] * inv_t - max_a) - logsum_a);
      const float p = fast_exp((t[i] * inv_t - max_b) - logsum_b);
      g[i] = scale * (q * kept - kv[i] * p);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < V; ++i) {
      const float q = fast_exp((s[i] * inv_t - max_a) - logsum_a);
      const float p = fast_exp((t[i] * inv_t - max_b) - logsum_b);
      g[i] = scale * (q * kept - p);
    }
  }
}

}  // namespace uf
