"""Native sources outside the Python build: nvcc compiles every kernels/*.cu for sm_80
and sm_90a (no GPU needed), and CMake builds and runs the C++ unit tests of the
torch-free CPU cores (tests/cpp/*.cpp) through ctest."""
import os
import pathlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNELS = sorted((ROOT / "kernels").glob("*.cu"))
# The flags of setup.py's CUDAExtension and of CMakeLists.txt's cuda_compile_check.
NVCC_FLAGS = ["-std=c++17", "-O3", "--use_fast_math", "-lineinfo", "-gencode=arch=compute_80,code=sm_80",
              "-gencode=arch=compute_90a,code=sm_90a"]


def _nvcc():
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found (no CUDA toolkit): kernels/*.cu compile check skipped")
def test_nvcc_compiles_every_kernel(tmp_path):
    assert KERNELS, "no kernels/*.cu found"
    nvcc = _nvcc()

    def compile_one(cu):
        res = _run([nvcc, *NVCC_FLAGS, "-I", str(ROOT / "kernels"), "-c", str(cu), "-o", str(tmp_path / f"{cu.stem}.o")],
                   timeout=600)
        return cu.name, res

    with ThreadPoolExecutor(max_workers=max(1, min(len(KERNELS), os.cpu_count() or 1))) as pool:
        results = list(pool.map(compile_one, KERNELS))
    failed = [f"{name}:\n{res.stderr[-4000:]}" for name, res in results if res.returncode != 0]
    assert not failed, "nvcc failed on:\n" + "\n".join(failed)
    for name, _ in results:
        assert (tmp_path / name.replace(".cu", ".o")).stat().st_size > 0


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None, reason="cmake/ctest not installed")
def test_cmake_builds_and_runs_cpp_unit_tests(tmp_path):
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *generator],
        ["cmake", "--build", str(build), "--target", "cpp_tests", "-j", str(max(1, os.cpu_count() or 1))],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for cmd in steps:
        res = _run(cmd, timeout=600)
        assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    cpp_tests = sorted(p.stem for p in (ROOT / "tests" / "cpp").glob("test_*.cpp"))
    assert cpp_tests and f"out of {len(cpp_tests)}" in res.stdout, res.stdout
