// fast_exp accuracy and the bf16 <-> fp32 conversions of csrc/cpu/simd_math.h.
#include <cstring>
#include <limits>

#include "cpu/simd_math.h"
#include "harness.h"

UF_TEST(fast_exp_relative_error_within_2_ulp) {
  // A grid of 2^21 points over [-87, 88], plus small magnitudes around 0.
  double worst = 0.0;
  float worst_x = 0.f;
  std::vector<float> xs;
  const int kGrid = 1 << 21;
  for (int i = 0; i <= kGrid; ++i) xs.push_back(-87.0f + 175.0f * static_cast<float>(i) / kGrid);
  for (float m = 1e-30f; m < 1.f; m *= 1.7f) {
    xs.push_back(m);
    xs.push_back(-m);
  }
  for (float x : xs) {
    const double ref = std::exp(static_cast<double>(x));
    const double rel = std::fabs(static_cast<double>(uf::fast_exp(x)) - ref) / ref;
    if (rel > worst) {
      worst = rel;
      worst_x = x;
    }
  }
  if (!(worst <= 2.0 * std::numeric_limits<float>::epsilon())) {
    std::fprintf(stderr, "fast_exp worst relative error %.3g at x = %.9g\n", worst, worst_x);
  }
  UF_CHECK(worst <= 2.0 * std::numeric_limits<float>::epsilon());
}

UF_TEST(fast_exp_random_inputs_and_exact_points) {
  std::mt19937_64 rng(uf_test::seed());
  std::uniform_real_distribution<float> dist(-87.0f, 88.0f);
  for (int i = 0; i < 200000; ++i) {
    const float x = dist(rng);
    const double ref = std::exp(static_cast<double>(x));
    UF_CHECK_NEAR(uf::fast_exp(x) / ref, 1.0, 2.0 * std::numeric_limits<float>::epsilon());
  }
  UF_CHECK(uf::fast_exp(0.0f) == 1.0f);
  UF_CHECK_NEAR(uf::fast_exp(1.0f), 2.718281828459045, 3e-7 * 2.72);
}

UF_TEST(fast_exp_underflow_and_overflow_are_finite_or_zero) {
  UF_CHECK(uf::fast_exp(-88.0f) == 0.0f);
  UF_CHECK(uf::fast_exp(-1e4f) == 0.0f);
  UF_CHECK(uf::fast_exp(-std::numeric_limits<float>::infinity()) == 0.0f);
  UF_CHECK(std::isfinite(uf::fast_exp(88.3f)));
  UF_CHECK(std::isfinite(uf::fast_exp(1e4f)));  // clamped: softmax sums never see inf
}

UF_TEST(bf16_round_trip_of_every_bf16_value) {
  int mismatches = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = uf::bf16_bits_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      mismatches += std::isnan(uf::bf16_bits_to_float(uf::float_to_bf16_bits(f))) ? 0 : 1;
      continue;
    }
    mismatches += uf::float_to_bf16_bits(f) == h ? 0 : 1;
  }
  UF_CHECK(mismatches == 0);
}

UF_TEST(bf16_rounds_to_nearest_even) {
  std::mt19937_64 rng(uf_test::seed() + 1);
  std::uniform_int_distribution<uint32_t> bits_dist;
  for (int i = 0; i < 200000; ++i) {
    uint32_t bits = bits_dist(rng);
    float f;
    std::memcpy(&f, &bits, sizeof f);
    if (!std::isfinite(f)) continue;
    const uint16_t h = uf::float_to_bf16_bits(f);
    // The two bf16 neighbours of f; the result is the nearer, ties to the even one.
    const uint16_t lo = static_cast<uint16_t>(bits >> 16);
    const float flo = uf::bf16_bits_to_float(lo);
    const float fhi = uf::bf16_bits_to_float(static_cast<uint16_t>(lo + 1));
    // Past the largest bf16 the upper neighbour is inf; round as if it were 2^128.
    const double hi = std::isfinite(fhi) ? static_cast<double>(fhi) : std::copysign(std::ldexp(1.0, 128), f);
    const double dlo = std::fabs(static_cast<double>(f) - flo), dhi = std::fabs(hi - f);
    uint16_t expected = dlo < dhi ? lo : static_cast<uint16_t>(lo + 1);
    if (dlo == dhi) expected = (lo & 1u) == 0 ? lo : static_cast<uint16_t>(lo + 1);
    if (h != expected) {
      std::fprintf(stderr, "f = %.9g (bits %08x): got bf16 %04x, expected %04x\n", f, bits, h, expected);
      UF_CHECK(h == expected);
      break;
    }
  }
  float nan = std::numeric_limits<float>::quiet_NaN();
  UF_CHECK(std::isnan(uf::bf16_bits_to_float(uf::float_to_bf16_bits(nan))));
}
