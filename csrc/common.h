// Shared helpers for the torch bindings of the CPU kernels.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "buffer_cache.h"
#include "cpu/simd_math.h"

namespace uf {

// Load row [0, n) of src (any of fp32/bf16/fp16) as float.  Returns a pointer to the
// row itself for fp32 (no copy) or to `buf` filled with the converted values.
template <typename T>
inline const float* row_as_float(const T* src, int64_t n, float* buf);

template <>
inline const float* row_as_float<float>(const float* src, int64_t, float*) {
  return src;
}

template <>
inline const float* row_as_float<c10::BFloat16>(const c10::BFloat16* src, int64_t n, float* buf) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) buf[i] = bf16_bits_to_float(bits[i]);
  return buf;
}

template <>
inline const float* row_as_float<c10::Half>(const c10::Half* src, int64_t n, float* buf) {
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(src[i]);
  return buf;
}

// Store a float row into dst of type T (round to nearest even).
template <typename T>
inline void store_row(const float* src, int64_t n, T* dst);

template <>
inline void store_row<float>(const float* src, int64_t n, float* dst) {
  if (src != dst) std::copy(src, src + n, dst);
}

template <>
inline void store_row<c10::BFloat16>(const float* src, int64_t n, c10::BFloat16* dst) {
  uint16_t* bits = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) bits[i] = float_to_bf16_bits(src[i]);
}

template <>
inline void store_row<c10::Half>(const float* src, int64_t n, c10::Half* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// float64 rows are used as they are (the double kernels compute in double).
inline const double* row_as_float(const double* src, int64_t, double*) { return src; }
inline void store_row(const double* src, int64_t n, double* dst) {
  if (src != dst) std::copy(src, src + n, dst);
}

// An uninitialised CPU tensor for a large output that the caller writes in full right
// away (a gradient, or a chunk buffer that a GEMM overwrites).  Fresh memory costs one
// page fault per 4 KiB page on first touch; on the benchmark VM that is ~400 ms for a
// 250 MB gradient, more than computing it.
// Above 8 MiB the buffer is 2 MiB-aligned anonymous memory advised for transparent huge
// pages (MADV_HUGEPAGE, honoured when THP is "madvise" or "always"): 512x fewer faults.
// When the tensor dies its mapping goes to the buffer cache (buffer_cache.h), and the
// next request of the same length reuses it with no faults at all: on VMs that report
// free memory to the host even huge-page faults are slow.  The same resident memory as
// at::empty (where THP is off the advice is ignored and the buffer has ordinary pages);
// at::empty when mmap fails or off Linux.  The tensor owns the mapping (from_blob with a
// deleter), so it cannot be resized in place.  Taking and releasing the buffer are
// reported to torch.profiler's memory profiling, as torch's own CPU allocator reports its
// blocks, so tensor-level peaks (bench/harness.py) include it and leave the cache out.
inline at::Tensor empty_for_full_write(at::IntArrayRef sizes, const at::TensorOptions& options) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  int64_t numel = 1;
  for (int64_t d : sizes) numel *= d;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (options.device().is_cpu() && nbytes >= (size_t(8) << 20)) {
    const size_t len = (nbytes + kHuge - 1) / kHuge * kHuge + kHuge;  // room to align
    const auto align = [](void* base) {
      return (reinterpret_cast<uintptr_t>(base) + kHuge - 1) & ~(uintptr_t(kHuge) - 1);
    };
    buffer_cache::Mapping m = buffer_cache::take(len);
    if (m.base == nullptr) {
      void* base = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (base != MAP_FAILED) {
        m = buffer_cache::Mapping{base, len};
        madvise(reinterpret_cast<void*>(align(base)), len - (align(base) - reinterpret_cast<uintptr_t>(base)),
                MADV_HUGEPAGE);
      }
    }
    if (m.base != nullptr) {
      void* data = reinterpret_cast<void*>(align(m.base));
      const auto bytes = static_cast<int64_t>(nbytes);
      c10::reportMemoryUsageToProfiler(data, bytes, 0, 0, c10::Device(c10::kCPU));
      return at::from_blob(
          data, sizes,
          [m, bytes](void* ptr) {
            c10::reportMemoryUsageToProfiler(ptr, -bytes, 0, 0, c10::Device(c10::kCPU));
            buffer_cache::give(m);
          },
          options);
    }
  }
#endif
  return at::empty(sizes, options);
}

#define UF_DISPATCH_FLOAT(dtype, NAME, ...)                                                   \
  [&] {                                                                                       \
    switch (dtype) {                                                                          \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                      \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }          \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                   \
      default: TORCH_CHECK(false, NAME, ": unsupported dtype ", dtype, " (float32/bfloat16/float16)"); \
    }                                                                                         \
  }()

// Optional float mask as a raw pointer (nullptr when absent).
inline const float* optional_mask_ptr(const std::optional<at::Tensor>& mask, int64_t expected,
                                      const char* name) {
  if (!mask.has_value() || !mask->defined()) return nullptr;
  TORCH_CHECK(mask->scalar_type() == at::kFloat && mask->is_contiguous() && mask->numel() == expected,
              name, ": expected a contiguous float32 tensor of ", expected, " elements");
  return mask->data_ptr<float>();
}

}  // namespace uf
