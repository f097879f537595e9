"""pytest-benchmark suite: SIU's dual masked KL, eager (the reference formulation) vs
torch.compile of eager vs the fused backends, forward and forward+backward.

    pytest benchmarks/bench_dmk.py                              # CPU: eager, compile, cpp
    pytest benchmarks/bench_dmk.py --benchmark-group-by=param:mode,param:dtype
    UF_BENCH_SHAPE=2048x32000 pytest benchmarks/bench_dmk.py -k "cpp or eager"

On a GPU machine the providers are eager, compile, cuda and triton.  Each result's
extra_info holds the peak memory above the inputs (bytes; RSS on the CPU) and the
roofline floor (both logit tensors read once, the gradient written once, at the
measured copy bandwidth).  The issue's full table comes from ``unlearn-fast bench dmk``.
"""
import os

import pytest
import torch

from unlearn_fast import backends
from unlearn_fast.bench.harness import measured_bandwidth, peak_memory, synchronize
from unlearn_fast.ops.dual_masked_kl import dual_masked_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, V = (int(x) for x in os.environ.get("UF_BENCH_SHAPE", "512x32000").split("x"))
FORGET_IDS = [1, 7, 42]


def _providers():
    out = ["eager", "compile"]
    for name in (("cuda", "triton") if DEVICE == "cuda" else ("cpp",)):
        try:
            backends.resolve("dual_masked_kl", name, DEVICE)
            out.append(name)
        except Exception:  # not built / not available here: not benchmarked
            pass
    return out


_COMPILED = {}


def _loss_fn(provider):
    if provider == "compile":
        if "compile" not in _COMPILED:
            def eager(s, t, ks):
                return dual_masked_kl(s, t, ks, forget_token_ids=FORGET_IDS, backend="eager")
            _COMPILED["compile"] = torch.compile(eager, dynamic=False)
        return _COMPILED["compile"]
    return lambda s, t, ks: dual_masked_kl(s, t, ks, forget_token_ids=FORGET_IDS, backend=provider)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def inputs(request):
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=gen).to(device=DEVICE, dtype=request.param).requires_grad_()
    t = torch.randn(N, V, generator=gen).to(device=DEVICE, dtype=request.param)
    ks = (torch.rand(N, generator=gen) > 0.2).to(DEVICE)
    return s, t, ks


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", _providers())
def test_dual_masked_kl(benchmark, inputs, provider, mode):
    s, t, ks = inputs
    fn = _loss_fn(provider)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(s, t, ks)
        else:
            out = torch.autograd.grad(fn(s, t, ks), s)[0]
        synchronize(DEVICE)
        return out

    benchmark.group = f"dual_masked_kl {mode} N={N} V={V} {str(s.dtype).replace('torch.', '')} {DEVICE}"
    benchmark.extra_info["peak_mem_bytes"] = peak_memory(step, DEVICE)  # also the warm-up (compiles)
    grad_bytes = s.numel() * s.element_size()
    nbytes = 2 * grad_bytes + (3 * grad_bytes if mode == "fwd+bwd" else 0)
    benchmark.extra_info["roofline_floor_s"] = nbytes / measured_bandwidth(DEVICE)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
