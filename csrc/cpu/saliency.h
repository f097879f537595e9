// Saliency ops: per-chunk CPU kernels over flat parameter tensors (torch-free).
//
// Every op works on a list of tensors ("multi-tensor"): the binding (csrc/saliency.cpp)
// cuts the whole list into chunks of kChunk elements (a multiple of 32, so a chunk
// covers whole words of a packed mask) and runs these kernels on the chunks in parallel.
//
// Packed masks: one bit per element, 32 elements per uint32 word, element i of a tensor
// is bit (i % 32) of word (i / 32) of that tensor's words (little-endian bit order, so
// the words read as bytes are numpy.packbits(..., bitorder="little")).  Bits past the
// end of a tensor are 0.
//
// Keys for top-|score| selection: the float32 bit pattern of |x| read as an unsigned
// integer (31 bits, sign cleared).  For non-negative floats the key order is the value
// order; NaN keys are above +inf (as torch.topk ranks NaN above every number).
// bfloat16 / float16 scores are widened to float32 exactly first.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu/simd_math.h"

namespace uf {
namespace saliency {

constexpr int64_t kChunk = int64_t(1) << 16;  // elements per parallel work item (2048 words)

// Storage types: float, or the raw bits of bfloat16 / float16.
struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal: value = man * 2^-24, exact in float
    float f = static_cast<float>(man) * 5.9604644775390625e-8f;
    std::memcpy(&bits, &f, 4);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// float -> float16 bits, round to nearest even (overflow -> inf, NaN stays NaN).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return sign | 0x7e00u;  // NaN
  if (ax >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or 0
    // value / 2^-24 rounded to an integer (nearest even) is the subnormal mantissa
    float af;
    std::memcpy(&af, &ax, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(af * 16777216.0f));
  }
  uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u);  // round mantissa to 10 bits
  return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
}

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const BF16* p, int64_t i) { return bf16_bits_to_float(p[i].bits); }
inline float load(const F16* p, int64_t i) { return half_bits_to_float(p[i].bits); }
inline void store(float* p, int64_t i, float v) { p[i] = v; }
// float -> bfloat16 bits, round to nearest even, NaN kept quiet; branch-free so that
// store loops vectorise (simd_math.h's float_to_bf16_bits returns early for NaN).
inline uint16_t bf16_round(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (b >> 16) | 0x40u;
  return static_cast<uint16_t>((b & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
inline void store(BF16* p, int64_t i, float v) { p[i].bits = bf16_round(v); }
inline void store(F16* p, int64_t i, float v) { p[i].bits = float_to_half_bits(v); }

inline uint32_t abs_key(float v) {
  uint32_t k;
  std::memcpy(&k, &v, 4);
  return k & 0x7fffffffu;
}

// ---------------------------------------------------------------------------------
// Fisher accumulation: f[i] += scale * g[i]^2 (float32 state, g in its own dtype).
// ---------------------------------------------------------------------------------
template <typename G>
inline void fisher_accumulate(float* f, const G* g, int64_t n, float scale) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x = load(g, i);
    f[i] += scale * (x * x);
  }
}

// ---------------------------------------------------------------------------------
// Ratio mask: bit = ((ff + eps) / (fp + eps) >= threshold), all in float32 (the same
// roundings as the eager float32 formula, so the bits match it exactly).
// n elements starting at a word boundary; writes ceil(n / 32) words.
// ---------------------------------------------------------------------------------
inline void ratio_mask(const float* ff, const float* fp, int64_t n, float threshold, float eps, uint32_t* words) {
  const int64_t full = n / 32;
  for (int64_t w = 0; w < full; ++w) {
    const float* a = ff + 32 * w;
    const float* b = fp + 32 * w;
    uint32_t bits = 0;
#pragma omp simd reduction(| : bits)
    for (int j = 0; j < 32; ++j) {
      const float r = (a[j] + eps) / (b[j] + eps);
      bits |= static_cast<uint32_t>(r >= threshold) << j;
    }
    words[w] = bits;
  }
  const int64_t tail = n - 32 * full;
  if (tail > 0) {
    uint32_t bits = 0;
    for (int64_t j = 0; j < tail; ++j) {
      const float r = (ff[32 * full + j] + eps) / (fp[32 * full + j] + eps);
      bits |= static_cast<uint32_t>(r >= threshold) << j;
    }
    words[full] = bits;
  }
}

// ---------------------------------------------------------------------------------
// Histogram of key digits: among elements whose key >> prefix_shift == prefix, count
// digit (key >> shift) & (2^bits - 1).  prefix_shift = 31 selects every element.
// Four interleaved sub-histograms break the store-to-load dependency when neighbours
// fall in the same bin (they usually do: parameters of one layer share an exponent);
// hist4 holds 4 << bits uint32 counters (small enough for L1; the caller flushes them
// to 64-bit totals long before they could overflow) and is summed by the caller.
// ---------------------------------------------------------------------------------
template <typename S>
inline void abs_histogram(const S* x, int64_t n, int shift, int bits, int prefix_shift, uint32_t prefix,
                          uint32_t* hist4) {
  const uint32_t digit_mask = (uint32_t(1) << bits) - 1u;
  const int64_t stride = int64_t(1) << bits;
  if (prefix_shift >= 31) {
    // digits of 256 elements at a time with vector code, then the scalar increments
    constexpr int kBlock = 256;
    uint32_t digit[kBlock];
    for (int64_t b = 0; b < n; b += kBlock) {
      const int m = n - b < kBlock ? static_cast<int>(n - b) : kBlock;
#pragma omp simd
      for (int j = 0; j < m; ++j) digit[j] = (abs_key(load(x, b + j)) >> shift) & digit_mask;
      int j = 0;
      for (; j + 4 <= m; j += 4) {
        hist4[digit[j]]++;
        hist4[stride + digit[j + 1]]++;
        hist4[2 * stride + digit[j + 2]]++;
        hist4[3 * stride + digit[j + 3]]++;
      }
      for (; j < m; ++j) hist4[digit[j]]++;
    }
    return;
  }
  // Later digits count only the elements under the chosen prefix (a small fraction):
  // find them 32 at a time with a vectorised compare, then visit the set bits.
  int u = 0;
  const int64_t full = n / 32;
  for (int64_t w = 0; w <= full; ++w) {
    const int64_t base = 32 * w;
    uint32_t hits = 0;
    if (w < full) {
#pragma omp simd reduction(| : hits)
      for (int j = 0; j < 32; ++j) {
        hits |= static_cast<uint32_t>((abs_key(load(x, base + j)) >> prefix_shift) == prefix) << j;
      }
    } else {
      for (int j = 0; j < n - base; ++j) {
        hits |= static_cast<uint32_t>((abs_key(load(x, base + j)) >> prefix_shift) == prefix) << j;
      }
    }
    while (hits) {
      const int j = __builtin_ctz(hits);
      hits &= hits - 1;
      hist4[u * stride + ((abs_key(load(x, base + j)) >> shift) & digit_mask)]++;
      u = (u + 1) & 3;
    }
  }
}

template <typename S>
inline int64_t count_equal(const S* x, int64_t n, uint32_t key) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < n; ++i) c += abs_key(load(x, i)) == key;
  return c;
}

// ---------------------------------------------------------------------------------
// Top-k mask: bit = key > T, or key == T and (first + i) < tie_limit (ties are kept in
// element order up to the limit the driver computed).  n elements from element `first`
// of the tensor (a word boundary); writes ceil(n / 32) words.
// ---------------------------------------------------------------------------------
template <typename S>
inline void topk_mask(const S* x, int64_t n, int64_t first, uint32_t key, int64_t tie_limit, uint32_t* words) {
  const int64_t nwords = (n + 31) / 32;
  for (int64_t w = 0; w < nwords; ++w) {
    const int64_t base = 32 * w;
    const int64_t m = n - base < 32 ? n - base : 32;
    uint32_t gt = 0, eq = 0;
    if (m == 32) {
#pragma omp simd reduction(| : gt, eq)
      for (int j = 0; j < 32; ++j) {
        const uint32_t k = abs_key(load(x, base + j));
        gt |= static_cast<uint32_t>(k > key) << j;
        eq |= static_cast<uint32_t>(k == key) << j;
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        const uint32_t k = abs_key(load(x, base + j));
        gt |= static_cast<uint32_t>(k > key) << j;
        eq |= static_cast<uint32_t>(k == key) << j;
      }
    }
    // ties are kept at element indices below tie_limit: the low `allowed` bits of the word
    const int64_t allowed = tie_limit - (first + base);
    const uint32_t low = allowed >= 32 ? ~0u : (allowed <= 0 ? 0u : ((uint32_t(1) << allowed) - 1u));
    words[w] = gt | (eq & low);
  }
}

// ---------------------------------------------------------------------------------
// Gradient transform.  With m the mask bit (1 without a mask), F the preserve Fisher
// (absent in "mask" mode), r the retain gradient (absent without projection):
//   t = m * g / (F + lam)            (geometry)   or   t = m * g   (mask)
//   reduce: sums[0] += g^2,  sums[1] += t * r,  sums[2] += r^2    (double accumulators)
//   apply:  g <- c * t - alpha * r                                  (one rounding to g's dtype)
// n elements from a word boundary; words points at the chunk's first word.
// ---------------------------------------------------------------------------------
// The elementwise kernels walk the data one mask word (32 elements) at a time: the
// inner 32-lane loop reads its bits as (word >> j) & 1, which vectorises (a variable
// shift per lane), where indexing words[i >> 5] per element does not.
template <bool kMask, bool kGeom, typename G>
inline float transformed(const G* g, const float* fisher, uint32_t word, int64_t i, int j, float lam) {
  float t = load(g, i);
  if (kGeom) t = t / (fisher[i] + lam);
  if (kMask) t = ((word >> j) & 1u) ? t : 0.0f;
  return t;
}

template <bool kMask, bool kGeom, bool kRetain, typename G>
inline void transform_reduce(const G* g, const uint32_t* words, const float* fisher, const G* retain, int64_t n,
                             float lam, double* sums) {
  // Lane-wise float accumulators (32 lanes, no horizontal add per word) over runs of
  // 1024 elements, then double across runs: accurate and vectorised.
  constexpr int64_t kRunWords = 32;
  const int64_t full = n / 32;
  double s0 = 0.0, s1 = 0.0, s2 = 0.0;
  for (int64_t w0 = 0; w0 < full; w0 += kRunWords) {
    const int64_t w1 = w0 + kRunWords < full ? w0 + kRunWords : full;
    float a0[32] = {0.f}, a1[32] = {0.f}, a2[32] = {0.f};
    for (int64_t w = w0; w < w1; ++w) {
      const uint32_t word = kMask ? words[w] : ~0u;
      const int64_t base = 32 * w;
#pragma omp simd
      for (int j = 0; j < 32; ++j) {
        const float x = load(g, base + j);
        a0[j] += x * x;
        if (kRetain) {
          const float r = load(retain, base + j);
          a1[j] += transformed<kMask, kGeom>(g, fisher, word, base + j, j, lam) * r;
          a2[j] += r * r;
        }
      }
    }
    float t0 = 0.f, t1 = 0.f, t2 = 0.f;
    for (int j = 0; j < 32; ++j) {
      t0 += a0[j];
      t1 += a1[j];
      t2 += a2[j];
    }
    s0 += t0;
    s1 += t1;
    s2 += t2;
  }
  for (int64_t i = 32 * full; i < n; ++i) {  // the last partial word
    const float x = load(g, i);
    s0 += x * x;
    if (kRetain) {
      const float r = load(retain, i);
      s1 += transformed<kMask, kGeom>(g, fisher, kMask ? words[full] : ~0u, i, static_cast<int>(i - 32 * full), lam) * r;
      s2 += r * r;
    }
  }
  sums[0] += s0;
  sums[1] += s1;
  sums[2] += s2;
}

template <bool kMask, bool kGeom, bool kRetain, typename G>
inline void transform_apply(G* g, const uint32_t* words, const float* fisher, const G* retain, int64_t n, float lam,
                            float clip, float alpha) {
  const int64_t full = n / 32;
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t word = kMask ? words[w] : ~0u;
    const int64_t base = 32 * w;
#pragma omp simd
    for (int j = 0; j < 32; ++j) {
      float t = clip * transformed<kMask, kGeom>(g, fisher, word, base + j, j, lam);
      if (kRetain) t -= alpha * load(retain, base + j);
      store(g, base + j, t);
    }
  }
  for (int64_t i = 32 * full; i < n; ++i) {
    float t = clip * transformed<kMask, kGeom>(g, fisher, kMask ? words[full] : ~0u, i, static_cast<int>(i - 32 * full), lam);
    if (kRetain) t -= alpha * load(retain, i);
    store(g, i, t);
  }
}

// SalUn reset: where the bit is 0, param <- original (bitwise copy; same dtype).
template <typename T>
inline void reset_unmasked(T* param, const T* original, const uint32_t* words, int64_t n) {
  const int64_t nwords = (n + 31) / 32;
  for (int64_t w = 0; w < nwords; ++w) {
    const uint32_t word = words[w];
    if (word == ~0u) continue;  // all kept: nothing to read or write
    const int64_t base = 32 * w;
    const int m = n - base < 32 ? static_cast<int>(n - base) : 32;
#pragma omp simd
    for (int j = 0; j < m; ++j) param[base + j] = ((word >> j) & 1u) ? param[base + j] : original[base + j];
  }
}

inline int64_t popcount(const uint32_t* words, int64_t n) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < n; ++i) c += __builtin_popcount(words[i]);
  return c;
}

}  // namespace saliency
}  // namespace uf
