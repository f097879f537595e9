"""Build script for unlearn_fast.

Native parts:
  * ``unlearn_fast._C``       C++ CPU kernels (OpenMP + SIMD), always built unless
                              ``UNLEARN_FAST_NO_NATIVE=1``.
  * ``unlearn_fast._C_cuda``  CUDA kernels (kernels/*.cu) and their bindings
                              (csrc/cuda/*.cpp), built when torch is a CUDA build and
                              nvcc is found (``UNLEARN_FAST_NO_CUDA=1`` skips it).

torch must already be installed, and the build must see it: install with
``pip install --no-build-isolation .`` so pip does not fetch a second torch into an
isolated build environment.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvcc_version(nvcc: str):
    """(major, minor) of ``nvcc``, or None if it cannot be read."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _default_gencode_flags(nvcc: str):
    """Cubins for A100 (sm_80) and H100 (sm_90a, needs CUDA >= 12), plus compute_90 PTX
    that the driver JIT-compiles on newer GPUs.  TORCH_CUDA_ARCH_LIST overrides these."""
    flags = ["-gencode=arch=compute_80,code=sm_80"]
    version = _nvcc_version(nvcc)
    if version is not None and version >= (12, 0):
        flags += ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=compute_90"]
    else:
        flags += ["-gencode=arch=compute_80,code=compute_80"]
    return flags


def _native_extensions():
    if _env_flag("UNLEARN_FAST_NO_NATIVE"):
        print("unlearn_fast: UNLEARN_FAST_NO_NATIVE set, skipping native builds "
              "(eager and triton backends only)")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        sys.exit("unlearn_fast: torch must be installed before building the native "
                 "extension. Run `pip install torch` first and install this package with "
                 "`pip install --no-build-isolation .` (or set UNLEARN_FAST_NO_NATIVE=1).")

    portable = _env_flag("UNLEARN_FAST_PORTABLE")
    # -fno-trapping-math lets GCC inline floor() as a vector instruction, which
    # vectorises fast_exp (csrc/cpu/simd_math.h); it changes no results.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno", "-fno-trapping-math"]
    # The extension is built on the machine that runs it; -march=native lets the
    # compiler vectorise the row loops for the local SIMD width.  A portable build
    # (wheels for other machines) targets x86-64-v2 instead.
    if os.uname().machine in ("x86_64", "AMD64"):
        cxx_flags.append("-march=x86-64-v2" if portable else "-march=native")
    include_dirs = [os.path.join(ROOT, "csrc")]
    cpu_sources = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    exts = [CppExtension("unlearn_fast._C", cpu_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])]

    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else None)
    want_cuda = torch.version.cuda is not None and nvcc and os.path.exists(nvcc)
    if _env_flag("UNLEARN_FAST_NO_CUDA"):
        want_cuda = False
    if want_cuda:
        cuda_sources = sorted(
            os.path.relpath(p, ROOT)
            for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")) + glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        if not archs:  # torch adds no -gencode of its own when the flags carry one
            nvcc_flags += _default_gencode_flags(nvcc)
        exts.append(CUDAExtension("unlearn_fast._C_cuda", cuda_sources,
                                  include_dirs=include_dirs + [os.path.join(ROOT, "kernels")],
                                  extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": nvcc_flags}))
    else:
        print("unlearn_fast: CUDA extension not built (torch.version.cuda=%s, nvcc=%s)"
              % (torch.version.cuda, nvcc))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _native_extensions()

setup(
    name="unlearn_fast",
    version="0.1.0",
    description="Fused kernels and end-to-end methods for machine unlearning of multimodal models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["unlearn_fast", "unlearn_fast.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "peft",
        "accelerate",
        "scikit-learn",
        "pyarrow",  # MLLMU-Bench parquet loader (unlearn_fast.data.loaders_public)
        "matplotlib",
        "tqdm",
        "pybind11",
        "ninja",
    ],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark", "triton; platform_system=='Linux'"],
    },
    entry_points={"console_scripts": ["unlearn-fast=unlearn_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
