// The torch-free saliency kernels of csrc/cpu/saliency.h against scalar references:
// half / bfloat16 conversions, packed-mask layout (odd lengths, tails), ratio and top-k
// mask bits (tie limits), radix histograms (both paths), the gradient transform, the
// reset and popcount.
#include <bitset>
#include <cstring>
#include <limits>

#include "cpu/saliency.h"
#include "harness.h"

using namespace uf::saliency;

namespace {

float bits_to_float(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

bool bit_of(const std::vector<uint32_t>& words, int64_t i) { return (words[i >> 5] >> (i & 31)) & 1u; }

std::vector<float> random_floats(std::mt19937_64& rng, int64_t n, float scale = 1.f) {
  std::normal_distribution<float> dist(0.f, scale);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

}  // namespace

UF_TEST(half_conversions_round_trip_and_round_to_nearest_even) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = half_bits_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      UF_CHECK(((h >> 10) & 0x1f) == 0x1f && (h & 0x3ff) != 0);
      UF_CHECK(std::isnan(half_bits_to_float(float_to_half_bits(f))));
      continue;
    }
    UF_CHECK(float_to_half_bits(f) == h);  // every half is exact in float
  }
  // a float between two neighbouring halves goes to the nearer one (the even one on a tie)
  std::mt19937_64 rng(uf_test::seed());
  std::uniform_int_distribution<uint32_t> pick(0, 0x7bff);  // finite positive halves below the largest
  for (int i = 0; i < 100000; ++i) {
    const uint16_t lo = static_cast<uint16_t>(pick(rng));
    const double a = half_bits_to_float(lo), b = half_bits_to_float(static_cast<uint16_t>(lo + 1));
    const double t = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    const float x = static_cast<float>(a + t * (b - a));
    const uint16_t h = float_to_half_bits(x);
    const double da = std::fabs(x - a), db = std::fabs(x - b);
    const uint16_t want = da < db ? lo : (db < da ? lo + 1 : ((lo & 1) ? lo + 1 : lo));
    UF_CHECK(h == want);
    UF_CHECK(float_to_half_bits(-x) == (want | 0x8000));
  }
  UF_CHECK(float_to_half_bits(65520.f) == 0x7c00);  // rounds to inf
  UF_CHECK(float_to_half_bits(65519.f) == 0x7bff);
}

UF_TEST(bf16_round_matches_round_to_nearest_even) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = bits_to_float(h << 16);
    if (std::isnan(f)) {
      UF_CHECK(std::isnan(bits_to_float(uint32_t(bf16_round(f)) << 16)));
    } else {
      UF_CHECK(bf16_round(f) == h);
    }
  }
  std::mt19937_64 rng(uf_test::seed());
  for (int i = 0; i < 200000; ++i) {
    const uint32_t b = static_cast<uint32_t>(rng());
    const float x = bits_to_float(b);
    if (std::isnan(x) || std::isinf(x)) continue;
    UF_CHECK(bf16_round(x) == uf::float_to_bf16_bits(x));  // the scalar reference in simd_math.h
  }
}

UF_TEST(fisher_accumulate_all_dtypes) {
  std::mt19937_64 rng(uf_test::seed());
  const int64_t n = 1001;
  auto g = random_floats(rng, n, 3.f);
  std::vector<BF16> gb(n);
  std::vector<F16> gh(n);
  for (int64_t i = 0; i < n; ++i) {
    gb[i].bits = bf16_round(g[i]);
    gh[i].bits = float_to_half_bits(g[i]);
  }
  std::vector<float> f32(n, 1.f), fb(n, 1.f), fh(n, 1.f);
  fisher_accumulate(f32.data(), g.data(), n, 0.25f);
  fisher_accumulate(fb.data(), gb.data(), n, 0.25f);
  fisher_accumulate(fh.data(), gh.data(), n, 0.25f);
  for (int64_t i = 0; i < n; ++i) {
    const double xb = load(gb.data(), i), xh = load(gh.data(), i);
    UF_CHECK_NEAR(f32[i], 1.0 + 0.25 * double(g[i]) * g[i], 1e-6 * (1.0 + g[i] * g[i]));
    UF_CHECK_NEAR(fb[i], 1.0 + 0.25 * xb * xb, 1e-6 * (1.0 + xb * xb));
    UF_CHECK_NEAR(fh[i], 1.0 + 0.25 * xh * xh, 1e-6 * (1.0 + xh * xh));
  }
}

UF_TEST(ratio_mask_bits_and_tails) {
  std::mt19937_64 rng(uf_test::seed());
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (int64_t n : {0, 1, 31, 32, 33, 1000, 4099}) {
    std::vector<float> a(n), b(n);
    for (int64_t i = 0; i < n; ++i) {
      a[i] = u(rng);
      b[i] = (i % 5 == 0) ? a[i] : u(rng);  // exact ratio 1 on every fifth
      if (i % 7 == 0) a[i] = b[i] = 0.f;      // eps / eps = 1
    }
    std::vector<uint32_t> words((n + 31) / 32, 0xdeadbeefu);
    ratio_mask(a.data(), b.data(), n, 1.f, 1e-15f, words.data());
    for (int64_t i = 0; i < n; ++i) UF_CHECK(bit_of(words, i) == ((a[i] + 1e-15f) / (b[i] + 1e-15f) >= 1.f));
    if (n % 32) UF_CHECK((words.back() >> (n % 32)) == 0u);  // bits past the end are 0
  }
}

UF_TEST(topk_mask_tie_limit_and_offsets) {
  std::mt19937_64 rng(uf_test::seed());
  std::uniform_int_distribution<int> small(-3, 3);
  const int64_t n = 1000;
  std::vector<float> x(n);
  for (auto& v : x) v = static_cast<float>(small(rng));  // heavy ties
  const uint32_t key = abs_key(2.f);
  for (int64_t first : {int64_t(0), int64_t(64), int64_t(4096)}) {
    for (int64_t limit : {int64_t(0), first + 5, first + 31, first + 32, first + 517, first + n, int64_t(1) << 40}) {
      std::vector<uint32_t> words((n + 31) / 32, 0xffffffffu);
      topk_mask(x.data(), n, first, key, limit, words.data());
      for (int64_t i = 0; i < n; ++i) {
        const float a = std::fabs(x[i]);
        UF_CHECK(bit_of(words, i) == (a > 2.f || (a == 2.f && first + i < limit)));
      }
      UF_CHECK((words.back() >> (n % 32)) == 0u);
    }
  }
}

UF_TEST(histograms_and_counts_match_a_scalar_reference) {
  std::mt19937_64 rng(uf_test::seed());
  const int64_t n = 5003;
  auto x = random_floats(rng, n, 1e-3f);
  x[7] = -x[8];
  const int shift = 20, bits = 11;
  std::vector<uint32_t> h4(4 << bits, 0);
  abs_histogram(x.data(), n, shift, bits, 31, 0u, h4.data());
  std::vector<int64_t> ref(1 << bits, 0);
  for (float v : x) ref[(abs_key(v) >> shift) & ((1u << bits) - 1)]++;
  int64_t top = 0;
  for (int d = 0; d < (1 << bits); ++d) {
    const int64_t got = int64_t(h4[d]) + h4[(1 << bits) + d] + h4[(2 << bits) + d] + h4[(3 << bits) + d];
    UF_CHECK(got == ref[d]);
    if (ref[d] > ref[top]) top = d;
  }
  // the next digit under the fullest bin's prefix
  std::vector<uint32_t> g4(4 << bits, 0);
  abs_histogram(x.data(), n, 9, bits, shift, static_cast<uint32_t>(top), g4.data());
  std::vector<int64_t> ref2(1 << bits, 0);
  for (float v : x) {
    if ((abs_key(v) >> shift) == static_cast<uint32_t>(top)) ref2[(abs_key(v) >> 9) & ((1u << bits) - 1)]++;
  }
  for (int d = 0; d < (1 << bits); ++d) {
    UF_CHECK(int64_t(g4[d]) + g4[(1 << bits) + d] + g4[(2 << bits) + d] + g4[(3 << bits) + d] == ref2[d]);
  }
  int64_t eq = 0;
  for (float v : x) eq += abs_key(v) == abs_key(x[8]);
  UF_CHECK(count_equal(x.data(), n, abs_key(x[8])) == eq);
  UF_CHECK(eq >= 2);
}

UF_TEST(transform_matches_the_formula) {
  std::mt19937_64 rng(uf_test::seed());
  const int64_t n = 2085;  // 65 words + a 5-element tail
  auto g = random_floats(rng, n), r = random_floats(rng, n);
  std::vector<float> fisher(n);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto& v : fisher) v = u(rng);
  std::vector<uint32_t> words((n + 31) / 32);
  for (auto& w : words) w = static_cast<uint32_t>(rng());
  words.back() &= (1u << (n % 32)) - 1u;
  const float lam = 0.3f, clip = 0.7f, alpha = -0.2f;
  double sums[3] = {0, 0, 0};
  transform_reduce<true, true, true>(g.data(), words.data(), fisher.data(), r.data(), n, lam, sums);
  double s0 = 0, s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double t = bit_of(words, i) ? g[i] / (double(fisher[i]) + lam) : 0.0;
    s0 += double(g[i]) * g[i];
    s1 += t * r[i];
    s2 += double(r[i]) * r[i];
  }
  UF_CHECK_NEAR(sums[0], s0, 1e-5 * s0);
  UF_CHECK_NEAR(sums[1], s1, 1e-5 * (std::fabs(s1) + 1.0));
  UF_CHECK_NEAR(sums[2], s2, 1e-5 * s2);
  auto out = g;
  transform_apply<true, true, true>(out.data(), words.data(), fisher.data(), r.data(), n, lam, clip, alpha);
  for (int64_t i = 0; i < n; ++i) {
    const double t = bit_of(words, i) ? g[i] / (double(fisher[i]) + lam) : 0.0;
    UF_CHECK_NEAR(out[i], clip * t - alpha * r[i], 1e-6 * (1.0 + std::fabs(clip * t - alpha * r[i])));
  }
  // bfloat16 gradients, mask only: one rounding of m * c * g
  std::vector<BF16> gb(n);
  for (int64_t i = 0; i < n; ++i) gb[i].bits = bf16_round(g[i]);
  auto gb0 = gb;
  transform_apply<true, false, false>(gb.data(), words.data(), nullptr, static_cast<const BF16*>(nullptr), n, lam,
                                      clip, 0.f);
  for (int64_t i = 0; i < n; ++i) {
    const float want = bit_of(words, i) ? clip * load(gb0.data(), i) : 0.f;
    UF_CHECK(gb[i].bits == bf16_round(want));
  }
}

UF_TEST(reset_and_popcount) {
  std::mt19937_64 rng(uf_test::seed());
  const int64_t n = 777;
  std::vector<uint16_t> p(n), o(n);
  for (int64_t i = 0; i < n; ++i) {
    p[i] = static_cast<uint16_t>(rng());
    o[i] = static_cast<uint16_t>(rng());
  }
  std::vector<uint32_t> words((n + 31) / 32);
  for (auto& w : words) w = static_cast<uint32_t>(rng());
  words[3] = ~0u;  // an all-kept word is skipped
  words.back() &= (1u << (n % 32)) - 1u;
  auto p0 = p;
  reset_unmasked(p.data(), o.data(), words.data(), n);
  int64_t ones = 0;
  for (int64_t i = 0; i < n; ++i) {
    UF_CHECK(p[i] == (bit_of(words, i) ? p0[i] : o[i]));
    ones += bit_of(words, i);
  }
  int64_t bits = 0;
  for (uint32_t w : words) bits += std::bitset<32>(w).count();
  UF_CHECK(bits == ones);
  UF_CHECK(popcount(words.data(), static_cast<int64_t>(words.size())) == ones);
}
