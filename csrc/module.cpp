// The Python module unlearn_fast._C.  Ops register themselves with torch.library
// (TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, ...)) in their own files; importing
// this module loads them.  Here: build information for `unlearn-fast info`, and the
// controls of the CPU output-buffer cache (buffer_cache.h).
#include <torch/extension.h>

#include "buffer_cache.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_fast C++ CPU kernels";
  m.def("build_info", []() {
    pybind11::dict d;
#ifdef _OPENMP
    d["openmp"] = true;
    d["openmp_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["openmp_threads"] = 1;
#endif
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#elif defined(__SSE4_2__)
    d["simd"] = "sse4.2";
#else
    d["simd"] = "baseline";
#endif
    d["compiler"] = __VERSION__;
    return d;
  });
  m.def("buffer_cache_stats", []() {
    const uf::buffer_cache::Stats st = uf::buffer_cache::stats();
    pybind11::dict d;
    d["cached_bytes"] = st.cached_bytes;
    d["cached_buffers"] = st.cached_buffers;
    d["limit_bytes"] = st.limit_bytes;
    d["hits"] = st.hits;
    d["misses"] = st.misses;
    return d;
  });
  m.def("buffer_cache_empty", []() { uf::buffer_cache::empty(); });
  m.def("buffer_cache_set_limit", [](int64_t bytes) { uf::buffer_cache::set_limit(bytes); });
}
