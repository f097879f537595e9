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

// s = sum e^d, a1 = sum e^d d, a2 = sum e^d d^2 of a row whose maximum is m, where a -inf
// logit adds nothing (0 log 0 = 0, not e d = 0 * -inf = NaN).  token_row_forward's own loop
// skips that select and reruns a row here only when its sums come out NaN, so ordinary
// rows pay nothing for it.
inline void token_row_sums_guarded(const float* z, int64_t V, float m, float& s_out, float& a1_out,
                                   float& a2_out) {
  float s = 0.f, a1 = 0.f, a2 = 0.f;
#pragma omp simd reduction(+ : s, a1, a2)
  for (int64_t i = 0; i < V; ++i) {
    const float raw = z[i] - m;
    const float e = fast_exp(raw);
    const float d = e > 0.f ? raw : 0.f;
    const float ed = e * d;
    s += e;
    a1 += ed;
    a2 += ed * d;
  }
  s_out = s;
  a1_out = a1;
  a2_out = a2;
}

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
  if (std::isnan(a1 + a2)) token_row_sums_guarded(z, V, m, s, a1, a2);  // a row with -inf logits
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


// ---- Vocabulary-blocked ("column") kernels ------------------------------------------
// The head GEMM of a vocabulary block [v0, v0 + vb) and a chunk of n tokens comes out of
// BLAS vocabulary-major, as a (vb, n) slab z[v * n + r] (token r, vocabulary id v0 + v).
// These kernels walk such a slab one vocabulary row at a time, vectorised across the
// tokens, and keep each token's statistics as running sums with an online maximum (as
// dual_masked_kl.h does along a row), so a token's logits never exist all at once: only
// one (vb, n) slab.  Every kernel works on the token range [r0, r1) of the slab (callers
// split the tokens between threads); the per-token arrays are indexed by r.
//
// Running state of token r, with m its largest logit so far and d = z - m <= 0:
//   s = sum e^d,  a1 = sum e^d d,  a2 = sum e^d d^2   (as token_row_forward)
//   s_excl = the same sum as s without the target's term (so 1 - p_t = s_excl / s with
//            no cancellation when p_t -> 1),  zt = the target's logit,  arg = argmax.
struct TokenColumnState {
  float* m;
  float* s;
  float* a1;
  float* a2;
  float* s_excl;
  float* zt;
  int64_t* arg;
};

// Raise each token's maximum to the block's (m_old keeps the previous maxima).
inline void token_columns_raise_max(const float* z, int64_t vb, int64_t n, int64_t v0, int64_t r0, int64_t r1,
                                    TokenColumnState st, float* m_old) {
  for (int64_t r = r0; r < r1; ++r) m_old[r] = st.m[r];
  for (int64_t v = 0; v < vb; ++v) {
    const float* zr = z + v * n;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      const bool up = zr[r] > st.m[r];  // strictly: the first index of the maximum wins
      st.m[r] = up ? zr[r] : st.m[r];
      st.arg[r] = up ? v0 + v : st.arg[r];
    }
  }
}

// Rescale the running sums to the raised maxima.  With delta = m_old - m_new < 0 and
// f = e^delta, a term e^d d^k becomes f e^d (d + delta)^k:
//   s <- f s,  a1 <- f (a1 + delta s),  a2 <- f (a2 + 2 delta a1 + delta^2 s)
// (term by term a1, delta <= 0 and s, a2 >= 0, so nothing cancels).  factor[r] gets f (1
// if the maximum stayed, 0 on the first block), for sums the caller keeps outside the
// state; returns whether any token's factor is not 1.
inline bool token_columns_rescale(const float* m_old, int64_t r0, int64_t r1, TokenColumnState st, float* factor) {
  bool any = false;
  for (int64_t r = r0; r < r1; ++r) {
    factor[r] = 1.f;
    if (st.m[r] == m_old[r]) continue;
    any = true;
    if (m_old[r] == -std::numeric_limits<float>::infinity()) {  // first block: nothing to keep
      factor[r] = 0.f;
      st.s[r] = st.a1[r] = st.a2[r] = st.s_excl[r] = 0.f;
      continue;
    }
    const float delta = m_old[r] - st.m[r];
    const float f = std::exp(delta);
    st.a2[r] = f * (st.a2[r] + 2.f * delta * st.a1[r] + delta * delta * st.s[r]);
    st.a1[r] = f * (st.a1[r] + delta * st.s[r]);
    st.s[r] *= f;
    st.s_excl[r] *= f;
    factor[r] = f;
  }
  return any;
}

// Add the block's terms (with the maxima already raised) and record the target logits.
// With `weights`, the slab is overwritten with e^(z - m) for every entry but the target's
// (0 there): the softmax weights of the block, for the hidden-state gradient's GEMM.
// targets are mapped (-1: ignored, V: out of range).
inline void token_columns_accumulate(float* z, int64_t vb, int64_t n, int64_t v0, int64_t r0, int64_t r1,
                                     const int64_t* targets, TokenColumnState st, bool weights) {
  for (int64_t v = 0; v < vb; ++v) {
    float* zr = z + v * n;
    const int64_t id = v0 + v;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      const float zv = zr[r];
      const float d = zv - st.m[r];
      // a -inf logit adds nothing (not 0 * -inf = NaN to a1, a2), nor does a block of
      // them that leaves the maximum at -inf (d = NaN)
      const float e = d > -87.3f ? fast_exp(d) : 0.f;
      const float dk = e > 0.f ? d : 0.f;  // (d itself is -inf or NaN where e = 0)
      const float ed = e * dk;
      const bool is_target = targets[r] == id;
      const float e_excl = is_target ? 0.f : e;
      st.s[r] += e;
      st.a1[r] += ed;
      st.a2[r] += ed * dk;
      st.s_excl[r] += e_excl;
      st.zt[r] = is_target ? zv : st.zt[r];
      if (weights) zr[r] = e_excl;
    }
  }
}

// Final statistics of token r (same conventions as token_row_forward).
inline TokenRowStats token_column_finish(TokenColumnState st, int64_t r, int64_t target, int64_t V) {
  TokenRowStats out{0.f, 0.f, 0.f, 0.f, 0.f, 0};
  if (target < 0) return out;
  const float log_s = std::log(st.s[r]);
  const float mean_d = st.a1[r] / st.s[r];
  const float var = std::max(0.f, st.a2[r] / st.s[r] - mean_d * mean_d);
  out.max = st.m[r];
  out.log_s = log_s;
  out.logprob = target < V ? (st.zt[r] - st.m[r]) - log_s : std::numeric_limits<float>::quiet_NaN();
  out.entropy = log_s - mean_d;
  out.std_logp = std::sqrt(var);
  out.argmax = st.arg[r];
  return out;
}

// Gradient slab for known statistics: g[v * n + r] = go_r (1[v0 + v == t_r] - p_rv), in
// place over the logits slab (float32 math).  The true-class term go (1 - p_t) uses
// std::exp (not the polynomial), as token_row_backward does, since it cancels when
// p_t -> 1.  st4 holds each token's [max, log_s, ...] (4 floats); tokens that are
// ignored, out of range or have go == 0 get zeros.  scratch: two floats per token.
inline void token_columns_gradient(float* z, int64_t vb, int64_t n, int64_t v0, int64_t r0, int64_t r1,
                                   const int64_t* targets, int64_t V, const float* st4, const float* go,
                                   float* scratch) {
  float* coeff = scratch;           // 0 marks the tokens whose column is zero
  float* true_term = scratch + n;   // go (1 - p_t) of the tokens whose target is in the block
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = targets[r];
    coeff[r] = (t < 0 || t >= V) ? 0.f : go[r];
    if (coeff[r] != 0.f && t >= v0 && t < v0 + vb) {
      true_term[r] = coeff[r] * (1.f - std::exp((z[(t - v0) * n + r] - st4[4 * r]) - st4[4 * r + 1]));
    }
  }
  for (int64_t v = 0; v < vb; ++v) {
    float* zr = z + v * n;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) {
      const float c = coeff[r];
      const float g = -c * fast_exp((zr[r] - st4[4 * r]) - st4[4 * r + 1]);
      zr[r] = c == 0.f ? 0.f : g;
    }
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = targets[r];
    if (coeff[r] != 0.f && t >= v0 && t < v0 + vb) z[(t - v0) * n + r] = true_term[r];
  }
}

}  // namespace uf
