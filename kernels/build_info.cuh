// Build facts of the CUDA kernels (torch-free), reported by unlearn_fast._C_cuda.build_info().
#pragma once

namespace uf_cuda {

// The virtual architectures nvcc compiled kernels/ for, e.g. "800,900" (__CUDA_ARCH_LIST__).
const char* compiled_archs();

// The CUDA toolkit version nvcc had (CUDART_VERSION, e.g. 12040).
int toolkit_version();

}  // namespace uf_cuda
