// Large CPU output buffers (gradients) kept mapped for reuse after their tensors die.
//
// Why: the kernels' big outputs are 2 MiB-aligned anonymous mappings advised for
// transparent huge pages (empty_for_full_write in common.h).  Returning such a mapping to the
// OS and mapping a fresh one next step costs page faults, and on virtual machines with free
// page reporting (virtio-balloon; the project's 2-vCPU VM reports every free 2 MiB block to
// the host) those faults also make the host back the memory again: the 32 MiB gradient of a
// DMK backward took 40-50 ms to back in some processes and runs, against a 9 ms kernel.  A
// training loop frees and re-requests the same sizes every step, so freed mappings are kept
// (up to a byte limit) and handed out again: a reused buffer has no page faults at all.
//
// The cache holds memory no tensor uses, as torch's CUDA caching allocator does; it is
// bounded by the limit (default 1 GiB, env UNLEARN_FAST_CPU_CACHE_MB, or set_limit); a
// buffer larger than a quarter of the limit is never kept (with the default, none above
// 256 MiB); the least recently freed mappings go first, and empty() unmaps everything.
// Python: unlearn_fast.cpu_buffer_cache_info / empty_cpu_buffer_cache /
// set_cpu_buffer_cache_limit.
#pragma once

#include <cstddef>
#include <cstdint>

namespace uf {
namespace buffer_cache {

struct Mapping {
  void* base = nullptr;  // what mmap returned
  size_t len = 0;        // the mapping's length
};

struct Stats {
  int64_t cached_bytes, cached_buffers, limit_bytes, hits, misses;
};

// A cached mapping of exactly `len` bytes (the caller rounds lengths, so one size of tensor
// always asks for one length), or {nullptr, 0} when none is cached.
Mapping take(size_t len);
// Keep `m` for reuse, or unmap it when it is larger than a quarter of the limit; evicts the
// least recently freed mappings to make room.
void give(Mapping m);
void empty();
void set_limit(int64_t bytes);
Stats stats();

}  // namespace buffer_cache
}  // namespace uf
