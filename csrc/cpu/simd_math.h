// Vectorisable scalar math for the CPU kernels (torch-free; also used by ctest).
//
// std::exp does not vectorise under GCC without -ffast-math, and the row kernels
// spend most of their time in exp.  fast_exp is the Cephes single-precision
// polynomial (max relative error ~2 ulp on [-87, 88]) written with only
// operations GCC's vectoriser understands, so `#pragma omp simd` loops calling it
// compile to AVX2/AVX-512 code.  Inputs below -87.3 return 0 (true values are
// denormal and irrelevant for softmax sums).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define UF_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define UF_ALWAYS_INLINE inline
#endif

namespace uf {

// Always inlined: in a large caller GCC may otherwise stop inlining, and a vectorised
// loop then calls the SIMD clone through the PLT, or falls back to a scalar loop.
#pragma omp declare simd notinbranch
UF_ALWAYS_INLINE float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kC1 = 0.693359375f;
  const float kC2 = -2.12194440e-4f;
  const bool underflow = x < -87.3f;
  x = x > 88.3f ? 88.3f : x;
  x = x < -87.3f ? -87.3f : x;
  float fx = std::floor(x * kLog2e + 0.5f);
  float r = x - fx * kC1 - fx * kC2;
  float r2 = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r2 + r + 1.0f;
  int32_t n = static_cast<int32_t>(fx) + 127;
  int32_t bits = n << 23;
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof(float));
  return underflow ? 0.0f : y * pow2n;
}

// bf16 <-> fp32 by bit manipulation (round to nearest even), vectorisable.
inline float bf16_bits_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(float));
  return f;
}

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(float));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

}  // namespace uf
