// A tiny test harness for the torch-free C++ cores (no dependencies): each test file
// defines UF_TEST(name) { ... } blocks using UF_CHECK / UF_CHECK_NEAR and includes this
// header once; main() runs every test and returns non-zero on any failure.  Inputs are
// random with a fresh seed per run, printed on failure; UF_SEED=<n> reproduces a run.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace uf_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

inline uint64_t& seed() {
  static uint64_t s = [] {
    const char* env = std::getenv("UF_SEED");
    return env != nullptr ? std::strtoull(env, nullptr, 10) : static_cast<uint64_t>(std::random_device{}());
  }();
  return s;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "%s:%d: FAILED %s (UF_SEED=%llu)\n", file, line, what.c_str(),
               static_cast<unsigned long long>(seed()));
}

}  // namespace uf_test

#define UF_CONCAT_(a, b) a##b
#define UF_CONCAT(a, b) UF_CONCAT_(a, b)
#define UF_TEST(name)                                                              \
  static void name();                                                              \
  static uf_test::Register UF_CONCAT(uf_register_, name)(#name, name);            \
  static void name()

#define UF_CHECK(cond)                                                                       \
  do {                                                                                       \
    if (!(cond)) uf_test::fail(__FILE__, __LINE__, "UF_CHECK(" #cond ")");                   \
  } while (0)

// |actual - expected| <= tol (and neither is NaN).
#define UF_CHECK_NEAR(actual, expected, tol)                                                           \
  do {                                                                                                 \
    const double uf_a_ = static_cast<double>(actual), uf_e_ = static_cast<double>(expected);          \
    const double uf_t_ = static_cast<double>(tol);                                                     \
    if (!(std::fabs(uf_a_ - uf_e_) <= uf_t_)) {                                                        \
      char uf_buf_[256];                                                                               \
      std::snprintf(uf_buf_, sizeof uf_buf_, "%s = %.9g, expected %s = %.9g (tol %.3g)", #actual, uf_a_, \
                    #expected, uf_e_, uf_t_);                                                          \
      uf_test::fail(__FILE__, __LINE__, uf_buf_);                                                      \
    }                                                                                                  \
  } while (0)

int main() {
  std::printf("seed %llu\n", static_cast<unsigned long long>(uf_test::seed()));
  for (const auto& c : uf_test::registry()) {
    const int before = uf_test::failures();
    c.fn();
    std::printf("%-48s %s\n", c.name, uf_test::failures() == before ? "ok" : "FAILED");
  }
  if (uf_test::failures() != 0) {
    std::printf("%d check(s) failed\n", uf_test::failures());
    return 1;
  }
  return 0;
}
