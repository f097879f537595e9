"""Shared test helpers (import as ``from helpers import ...``; tests/ is on sys.path)."""
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute norm when ref is 0)."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def cpu_backends_for(op: str):
    """Fast backends that can run ``op`` on CPU tensors here (cpp; triton under the interpreter)."""
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401

    out = []
    for name in ("cpp", "triton"):
        try:
            backends.resolve(op, name, "cpu")
            out.append(name)
        except Exception:
            pass
    return out


def gpu_backends_for(op: str):
    """Fast backends that can run ``op`` on CUDA tensors here (cuda, triton)."""
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401

    out = []
    for name in ("cuda", "triton"):
        try:
            backends.resolve(op, name, "cuda")
            out.append(name)
        except Exception:
            pass
    return out


def compile_triton_for_gpu(script: str, tmp_path) -> str:
    """Run ``script`` (which compiles Triton kernels to cubins and prints " ok" per kernel) in a
    subprocess with the interpreter off (TRITON_INTERPRET=1 patches this process); skips when
    triton has no NVIDIA backend.  Returns the script's stdout."""
    import os
    import pathlib
    import subprocess
    import sys

    import pytest

    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"triton has no NVIDIA backend here ({exc})")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res.stdout
