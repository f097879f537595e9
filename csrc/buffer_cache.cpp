// The process-wide cache of freed output mappings (see buffer_cache.h for why).
#include "buffer_cache.h"

#include <cstdio>
#include <cstdlib>
#include <deque>
#include <iterator>
#include <mutex>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace uf {
namespace buffer_cache {
namespace {

// A buffer is kept only if it is at most 1/kMaxShareOfLimit of the limit.  While a buffer is
// cached it is resident memory no tensor uses, and it counts in the process's peak for the
// rest of a training step: a 0.5 GB (V, H) weight gradient cached mid-step raised an
// end-to-end step's peak by that much.  The buffers whose faults hurt most per step (DMK
// gradients, decoupling gradients, the <= 128 MiB chunk buffers) are well below it.
constexpr int64_t kMaxShareOfLimit = 4;

int64_t default_limit() {
  const char* env = std::getenv("UNLEARN_FAST_CPU_CACHE_MB");
  if (env != nullptr && *env != '\0') {
    char* end = nullptr;
    const long long mb = std::strtoll(env, &end, 10);
    if (end != env && *end == '\0' && mb >= 0) return static_cast<int64_t>(mb) << 20;
    std::fprintf(stderr, "unlearn_fast: ignoring UNLEARN_FAST_CPU_CACHE_MB=%s (expected a whole number of MiB >= 0); "
                         "the CPU buffer cache keeps its default limit of 1024 MiB\n", env);
  }
  return int64_t(1) << 30;
}

void unmap(const Mapping& m) {
#ifdef __linux__
  munmap(m.base, m.len);
#endif
}

struct Cache {
  std::mutex mu;
  std::deque<Mapping> idle;  // least recently freed first
  int64_t cached = 0, limit = default_limit(), hits = 0, misses = 0;

  // Unmap the least recently freed mappings until `cached` + `incoming` fits the limit.
  void evict_for(int64_t incoming) {
    while (!idle.empty() && cached + incoming > limit) {
      unmap(idle.front());
      cached -= static_cast<int64_t>(idle.front().len);
      idle.pop_front();
    }
  }
};

// Never destroyed: tensors freed during interpreter shutdown may still call give().
Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

}  // namespace

Mapping take(size_t len) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto it = c.idle.rbegin(); it != c.idle.rend(); ++it) {  // most recently freed first
    if (it->len == len) {
      const Mapping m = *it;
      c.idle.erase(std::next(it).base());
      c.cached -= static_cast<int64_t>(len);
      ++c.hits;
      return m;
    }
  }
  ++c.misses;
  return Mapping{};
}

void give(Mapping m) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  const auto len = static_cast<int64_t>(m.len);
  if (len > c.limit / kMaxShareOfLimit) {
    unmap(m);
    return;
  }
  c.evict_for(len);
  c.idle.push_back(m);
  c.cached += len;
}

void empty() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (const Mapping& m : c.idle) unmap(m);
  c.idle.clear();
  c.cached = 0;
}

void set_limit(int64_t bytes) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.limit = bytes < 0 ? 0 : bytes;
  c.evict_for(0);
}

Stats stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return Stats{c.cached, static_cast<int64_t>(c.idle.size()), c.limit, c.hits, c.misses};
}

}  // namespace buffer_cache
}  // namespace uf
