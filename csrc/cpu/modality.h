// MultiDelete's modality-decoupling losses: per-row CPU kernels on float rows (torch-free).
//
// 1. Embedding distances (modality_decoupling_loss), one row = one embedding of D floats:
//      squared error   sum_d (s_d - r_d)^2                  grad  2 (s - r)
//      cosine          1 - s.r / (max(|s|, eps) max(|r|, eps))
//                      grad  -(r / (ns nr) - [|s| > eps] cos s / ns^2),  ns = max(|s|, eps)
//    (torch.nn.functional.cosine_similarity's clamping; below eps the norm is the constant eps).
//
// 2. Row-wise KL between softmaxed similarity rows (similarity_matching_loss, form="kl"):
//    for a row of student logits s and reference logits r (already divided by T),
//      KL(softmax(r) || softmax(s)) = W / sr + log ss - log sr,
//      ss = sum e^(s - ms),  sr = sum e^(r - mr),  W = sum e^(r - mr) ((r - mr) - (s - ms)).
//    Accumulating the shifted difference (r - mr) - (s - ms) keeps every term small, so
//    nothing cancels even when lse(s) and lse(r) are large (as in dual_masked_kl.h).  The
//    i2t direction sees whole rows of a panel at once (sim_kl_row); the t2i direction sees
//    each column in pieces, one panel at a time, so its state (ms, ss, mr, sr, W) is merged
//    online (sim_kl_merge), exactly like flash-attention's running max and sum.
//    Statistics kept for the gradient: (max, log sum) of s and of r, apart (see
//    dual_masked_kl.h on why max and log-sum are not folded into one lse).
//    d KL_row / d s_j = q_j - p_j with q = softmax(s), p = softmax(r).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu/simd_math.h"

namespace uf {

constexpr float kCosineEps = 1e-8f;  // torch.nn.functional.cosine_similarity's default

// ---------------------------------------------------------------------------------------
// Embedding distances
// ---------------------------------------------------------------------------------------
inline float sq_diff_row(const float* s, const float* r, int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) {
    const float e = s[i] - r[i];
    acc += e * e;
  }
  return acc;
}

struct CosineTerms {
  float dot, ns, nr;  // s.r and the clamped norms max(|s|, eps), max(|r|, eps)
  bool s_clamped;     // |s| <= eps: its norm is the constant eps
};

inline CosineTerms cosine_terms(const float* s, const float* r, int64_t d) {
  float dot = 0.f, ss = 0.f, rr = 0.f;
#pragma omp simd reduction(+ : dot, ss, rr)
  for (int64_t i = 0; i < d; ++i) {
    dot += s[i] * r[i];
    ss += s[i] * s[i];
    rr += r[i] * r[i];
  }
  const float ns = std::sqrt(ss), nr = std::sqrt(rr);
  return {dot, std::max(ns, kCosineEps), std::max(nr, kCosineEps), !(ns > kCosineEps)};
}

inline float cosine_distance_row(const float* s, const float* r, int64_t d) {
  const CosineTerms t = cosine_terms(s, r, d);
  return 1.f - t.dot / (t.ns * t.nr);
}

// g = go * d(sum (s - r)^2)/ds
inline void sq_diff_row_grad(const float* s, const float* r, int64_t d, float go, float* g) {
  const float two_go = 2.f * go;
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) g[i] = two_go * (s[i] - r[i]);
}

// g = go * d(1 - cos(s, r))/ds
inline void cosine_distance_row_grad(const float* s, const float* r, int64_t d, float go, float* g) {
  const CosineTerms t = cosine_terms(s, r, d);
  const float inv = 1.f / (t.ns * t.nr);
  const float cos = t.dot * inv;
  const float a = -go * inv;                                       // on r
  const float b = t.s_clamped ? 0.f : go * cos / (t.ns * t.ns);    // on s
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) g[i] = a * r[i] + b * s[i];
}

// ---------------------------------------------------------------------------------------
// Softmax-pair statistics for the similarity KL
// ---------------------------------------------------------------------------------------
struct SimRowResult {
  float kl, max_s, log_sum_s, max_r, log_sum_r;
};

// A whole row of n >= 1 logits.
inline SimRowResult sim_kl_row(const float* s, const float* r, int64_t n) {
  float ms = -std::numeric_limits<float>::infinity(), mr = ms;
#pragma omp simd reduction(max : ms, mr)
  for (int64_t j = 0; j < n; ++j) {
    ms = std::max(ms, s[j]);
    mr = std::max(mr, r[j]);
  }
  float ss = 0.f, sr = 0.f, w = 0.f;
#pragma omp simd reduction(+ : ss, sr, w)
  for (int64_t j = 0; j < n; ++j) {
    const float ds = s[j] - ms, dr = r[j] - mr;
    const float er = fast_exp(dr);
    ss += fast_exp(ds);
    sr += er;
    w += er * (dr - ds);
  }
  const float lss = std::log(ss), lsr = std::log(sr);
  return {w / sr + lss - lsr, ms, lss, mr, lsr};
}

// Column states in structure-of-arrays form (five arrays of `count` floats) so the
// per-column updates vectorise.  An empty state has ss = sr = 0 (and maxima -inf).
struct ColumnStates {
  float* ms;
  float* ss;
  float* mr;
  float* sr;
  float* w;
};

inline void column_states_init(ColumnStates st, int64_t count) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  std::fill(st.ms, st.ms + count, neg_inf);
  std::fill(st.mr, st.mr + count, neg_inf);
  std::fill(st.ss, st.ss + count, 0.f);
  std::fill(st.sr, st.sr + count, 0.f);
  std::fill(st.w, st.w + count, 0.f);
}

// Merge state b (bms, bss, bmr, bsr, bw) into a for one column.  Each W is relative to
// its own maxima; moving it to the new maxima (Ms, Mr) rescales it by e^(mr - Mr) and
// adds sr ((mr - Mr) - (ms - Ms)) to every shifted difference.
inline void sim_kl_merge(float& ms, float& ss, float& mr, float& sr, float& w, float bms, float bss, float bmr,
                         float bsr, float bw) {
  const float nms = std::max(ms, bms), nmr = std::max(mr, bmr);
  const float fa_s = fast_exp(ms - nms), fb_s = fast_exp(bms - nms);
  const float fa_r = fast_exp(mr - nmr), fb_r = fast_exp(bmr - nmr);
  // An empty side (sr == 0, maxima -inf) contributes nothing; its shift would be NaN.
  const float wa = sr > 0.f ? fa_r * (w + sr * ((mr - nmr) - (ms - nms))) : 0.f;
  const float wb = bsr > 0.f ? fb_r * (bw + bsr * ((bmr - nmr) - (bms - nms))) : 0.f;
  ss = (ss > 0.f ? fa_s * ss : 0.f) + (bss > 0.f ? fb_s * bss : 0.f);
  sr = (sr > 0.f ? fa_r * sr : 0.f) + (bsr > 0.f ? fb_r * bsr : 0.f);
  w = wa + wb;
  ms = nms;
  mr = nmr;
}

// Fold rows [0, n) of a row-major panel (leading dimension ld) into the states of columns
// [j0, j1).  `scratch` holds 5 * (j1 - j0) floats.
inline void sim_kl_columns_update(const float* s, const float* r, int64_t n, int64_t ld, int64_t j0, int64_t j1,
                                  ColumnStates st, float* scratch) {
  const int64_t m = j1 - j0;
  if (n <= 0 || m <= 0) return;
  float* bms = scratch;
  float* bmr = scratch + m;
  float* bss = scratch + 2 * m;
  float* bsr = scratch + 3 * m;
  float* bw = scratch + 4 * m;
  std::copy(s + j0, s + j1, bms);
  std::copy(r + j0, r + j1, bmr);
  for (int64_t i = 1; i < n; ++i) {
    const float* si = s + i * ld + j0;
    const float* ri = r + i * ld + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      bms[j] = std::max(bms[j], si[j]);
      bmr[j] = std::max(bmr[j], ri[j]);
    }
  }
  std::fill(bss, bss + 3 * m, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const float* si = s + i * ld + j0;
    const float* ri = r + i * ld + j0;
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const float ds = si[j] - bms[j], dr = ri[j] - bmr[j];
      const float er = fast_exp(dr);
      bss[j] += fast_exp(ds);
      bsr[j] += er;
      bw[j] += er * (dr - ds);
    }
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t c = j0 + j;
    sim_kl_merge(st.ms[c], st.ss[c], st.mr[c], st.sr[c], st.w[c], bms[j], bss[j], bmr[j], bsr[j], bw[j]);
  }
}

// Gradient of  g_row * sum_rows KL + g_col * sum_cols KL  with respect to the logits of one
// row i (written over s, which may be the panel row itself):
//   G_j = g_row (q_ij - p_ij) + g_col (q'_ij - p'_ij)
// q, p: softmax of s, r along the row (statistics `row`; no row term when row == nullptr);
// q', p': softmax along the columns.  Statistics are stored structure-of-arrays, (4, ld):
// max_s, log_sum_s, max_r, log_sum_r; `row` points at entry i of the row statistics (its
// four values lie ld_row apart), `col` at column 0 of the column statistics.
inline void sim_kl_grad_row(float* s, const float* r, int64_t n, const float* row, int64_t ld_row, float g_row,
                            const float* col, int64_t ld_col, float g_col) {
  const float* cms = col;
  const float* clss = col + ld_col;
  const float* cmr = col + 2 * ld_col;
  const float* clsr = col + 3 * ld_col;
  if (row != nullptr) {
    const float ms = row[0], lss = row[ld_row], mr = row[2 * ld_row], lsr = row[3 * ld_row];
    if (col != nullptr) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const float sj = s[j], rj = r[j];
        const float along_row = fast_exp((sj - ms) - lss) - fast_exp((rj - mr) - lsr);
        const float along_col = fast_exp((sj - cms[j]) - clss[j]) - fast_exp((rj - cmr[j]) - clsr[j]);
        s[j] = g_row * along_row + g_col * along_col;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) s[j] = g_row * (fast_exp((s[j] - ms) - lss) - fast_exp((r[j] - mr) - lsr));
    }
  } else if (col != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      s[j] = g_col * (fast_exp((s[j] - cms[j]) - clss[j]) - fast_exp((r[j] - cmr[j]) - clsr[j]));
  } else {
    std::fill(s, s + n, 0.f);
  }
}

inline float sq_sum_row(const float* e, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += e[j] * e[j];
  return acc;
}

}  // namespace uf
