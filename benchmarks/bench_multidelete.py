"""pytest-benchmark: MultiDelete's losses, eager (materialises the B x B similarity matrices)
vs the fused backends, forward + backward, float32.

    python -m pytest benchmarks/bench_multidelete.py --benchmark-only
    python -m pytest benchmarks/bench_multidelete.py --benchmark-only -m "not slow"   # skip B = 16384

Peak memory above the inputs (RSS on the CPU, the allocator's peak on CUDA) is stored in each
benchmark's extra_info["peak_mem_bytes"].  Eager is skipped where its B x B matrices would
not fit (``pytest.skip`` with the estimate).  The full sweep (B up to 32768, D = 256/512/768,
fwd and fwd+bwd, ratios, floors) is ``unlearn-fast bench multidelete``.
"""
import gc
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import backends
from unlearn_fast.ops.modality import OP_DECOUPLING, OP_SIMILARITY

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM = 512
EAGER_BUDGET = float(os.environ.get("UF_BENCH_EAGER_MAX_GIB", "4")) * 2**30
EAGER_MATRICES = {"mse": 6, "kl": 12}  # B x B float32 matrices eager holds in fwd+bwd (estimate)


def _providers(op):
    out = ["eager"]
    for name in ("cpp", "cuda", "triton"):
        if DEVICE == "cpu" and name == "triton":
            continue  # the interpreter is not a benchmark
        try:
            backends.resolve(op, name, DEVICE)
            out.append(name)
        except Exception:
            pass
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_memory(fn) -> int:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    base = peak = _rss()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(2e-4)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = fn()
    del out
    peak = max(peak, _rss())
    stop.set()
    thread.join()
    return peak - base


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _run(benchmark, fn):
    benchmark.extra_info["peak_mem_bytes"] = _peak_memory(fn)

    def step():
        out = fn()
        _sync()
        return out

    benchmark.pedantic(step, rounds=3, warmup_rounds=0)


BATCHES = [256, 1024, 4096, pytest.param(16384, marks=pytest.mark.slow)]


@pytest.mark.parametrize("provider", _providers(OP_SIMILARITY))
@pytest.mark.parametrize("form", ["mse", "kl"])
@pytest.mark.parametrize("batch", BATCHES)
def test_similarity_matching_fwd_bwd(benchmark, provider, form, batch):
    if provider == "eager" and EAGER_MATRICES[form] * 4 * batch * batch > EAGER_BUDGET:
        pytest.skip(f"eager needs ~{EAGER_MATRICES[form] * 4 * batch * batch / 2**30:.1f} GiB for its "
                    f"{batch} x {batch} matrices")
    gen = torch.Generator().manual_seed(0)
    xs = [F.normalize(torch.randn(batch, DIM, generator=gen), dim=-1).to(DEVICE) for _ in range(4)]
    xs[0].requires_grad_()
    xs[1].requires_grad_()
    temperature = 0.05 if form == "kl" else 1.0

    def fn():
        loss = uf.similarity_matching_loss(*xs, form=form, temperature=temperature, backend=provider)
        return torch.autograd.grad(loss, xs[:2])

    benchmark.group = f"similarity_{form} B={batch} D={DIM}"
    _run(benchmark, fn)


@pytest.mark.parametrize("provider", _providers(OP_DECOUPLING))
@pytest.mark.parametrize("distance", ["mse", "cosine"])
@pytest.mark.parametrize("batch", [1024, 32768])
def test_modality_decoupling_fwd_bwd(benchmark, provider, distance, batch):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, 768, generator=gen).to(DEVICE) for _ in range(6)]
    students = [xs[k].requires_grad_() for k in (0, 2, 4)]

    def fn():
        return torch.autograd.grad(uf.modality_decoupling_loss(*xs, distance=distance, backend=provider), students)

    benchmark.group = f"modality_decoupling {distance} N={batch} D=768"
    _run(benchmark, fn)
