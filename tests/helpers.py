"""Shared test helpers (import as ``from helpers import ...``; tests/ is on sys.path)."""
import contextlib

import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (absolute norm when ref is 0)."""
    x = x.detach().double().cpu()
    ref = ref.detach().double().cpu()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff if denom == 0 else diff / denom


def _backends_for(op: str, names, device: str):
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401

    out = []
    for name in names:
        try:
            backends.resolve(op, name, device)
            out.append(name)
        except Exception:
            pass
    return out


def cpu_backends_for(op: str):
    """Fast backends that can run ``op`` on CPU tensors here (cpp; triton under the interpreter)."""
    return _backends_for(op, ("cpp", "triton"), "cpu")


def gpu_backends_for(op: str):
    """Fast backends that can run ``op`` on CUDA tensors here (cuda, triton)."""
    return _backends_for(op, ("cuda", "triton"), "cuda")


def run_on_gloo_ranks(fn, tmp_path, *args, world: int = 2, weights_only: bool = True):
    """Run ``fn(rank, *args)`` in ``world`` spawned processes forming one gloo process group
    (one intra-op thread each: compare with a single-process run under ``one_thread()``)
    and return what rank 0's call returned.  ``fn`` must be a module-level function."""
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "rank0_result.pt")
    mp.spawn(_gloo_rank, args=(world, str(tmp_path / "gloo_store"), out_path, fn, args), nprocs=world, join=True)
    return torch.load(out_path, weights_only=weights_only)


def _gloo_rank(rank, world, store, out_path, fn, args):
    import faulthandler
    import gc
    import os
    import sys

    import torch.distributed as dist

    faulthandler.enable()  # a native crash prints every thread's Python stack into the test log
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        if rank == 0:
            torch.save(result, out_path)
        del result
        gc.collect()  # FSDP modules caught in reference cycles still hold the process group
        dist.barrier()  # no rank tears the group down while another still communicates
    finally:
        dist.destroy_process_group()
    # A worker that passed leaves without interpreter finalisation.  CI once saw a rank abort
    # ("terminate called without an active exception", SIGABRT) after FSDP runs; CPython
    # ends native threads that want the GIL during finalisation with a forced unwind, which
    # std::terminate()s in a noexcept frame.  Nothing of the test's is left to run here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread, as the ``run_on_gloo_ranks`` workers have (same float sums)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
