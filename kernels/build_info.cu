// Build facts of the CUDA kernels (see build_info.cuh).  nvcc defines
// __CUDA_ARCH_LIST__ in every compilation phase of a .cu file, host code included.
#include <cuda_runtime.h>

#include "build_info.cuh"

#define UF_STRINGIFY_(...) #__VA_ARGS__
#define UF_STRINGIFY(...) UF_STRINGIFY_(__VA_ARGS__)

namespace uf_cuda {

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return UF_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int toolkit_version() { return CUDART_VERSION; }

}  // namespace uf_cuda
