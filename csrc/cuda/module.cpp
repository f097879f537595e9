// The Python module unlearn_fast._C_cuda.  The CUDA ops register themselves with
// torch.library (TORCH_LIBRARY_FRAGMENT(unlearn_fast_cuda, ...)) in their own files
// (csrc/cuda/*.cpp, kernels in kernels/*.cu); importing this module loads them.  Here:
// build information for `unlearn-fast info`.
#include <cuda_runtime.h>
#include <torch/extension.h>

#include "build_info.cuh"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "unlearn_fast CUDA kernels";
  m.def("build_info", []() {
    pybind11::dict d;
    d["cuda_toolkit"] = uf_cuda::toolkit_version();
    int runtime = 0, driver = 0, devices = 0;
    d["cuda_runtime"] = cudaRuntimeGetVersion(&runtime) == cudaSuccess ? runtime : -1;
    d["cuda_driver"] = cudaDriverGetVersion(&driver) == cudaSuccess ? driver : -1;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) {
      devices = 0;
      cudaGetLastError();  // clear the sticky "no device" error
    }
    d["device_count"] = devices;
    d["archs"] = uf_cuda::compiled_archs();
    return d;
  });
}
