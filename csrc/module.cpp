// The Python module unlearn_fast._C.  Ops register themselves with torch.library
// (TORCH_LIBRARY_FRAGMENT(unlearn_fast_cpu, ...)) in their own files; importing
// this module loads them.  Here: build information for `unlearn-fast info`.
#include <torch/extension.h>

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
}
