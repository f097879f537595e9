"""pytest-benchmark suite: weight-saliency ops on a 7B-shaped list of linear weights
(32 layers x q, k, v, o, gate, up, down, dimensions scaled), the papers' per-parameter
loops (eager) vs torch._foreach vs the fused backends.

    pytest benchmarks/bench_saliency.py                                   # CPU: eager, foreach, cpp
    pytest benchmarks/bench_saliency.py --benchmark-group-by=group -k "fisher or transform"
    UF_BENCH_DIMS=816x2200 pytest benchmarks/bench_saliency.py            # 257M weights (the bench suite's full size)

On a GPU machine the providers are eager, foreach, cuda and triton.  Each result's
extra_info holds the roofline floor (bytes the fused algorithm moves at the measured
streaming bandwidth) and, with UF_BENCH_PEAK=1, the peak memory above the inputs (bytes;
RSS on the CPU) and its fraction of the weights' size.  Peak memory is off by default on
the CPU: the RSS sampler switches glibc to mmap for every allocation over 64 KiB, which
slows the eager loops' temporaries in every later timing of the process.  The issue's
full table (times first, then memory) comes from ``unlearn-fast bench saliency``.
"""
import math
import os

import pytest
import torch

from unlearn_fast import backends
from unlearn_fast import saliency as S
from unlearn_fast.bench import saliency as B
from unlearn_fast.bench.harness import peak_memory, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN, INTER = (int(x) for x in os.environ.get("UF_BENCH_DIMS", "%dx%d" % B.QUICK_DIMS).split("x"))
SHAPES = B.model_shapes(HIDDEN, INTER)
NUMEL = sum(math.prod(s) for s in SHAPES)
PEAK = DEVICE == "cuda" or os.environ.get("UF_BENCH_PEAK", "0") not in ("", "0")


def _fused():
    out = []
    for name in (("cuda", "triton") if DEVICE == "cuda" else ("cpp",)):
        try:
            backends.resolve("saliency", name, DEVICE)
            out.append(name)
        except Exception:  # not built / not available here: not benchmarked
            pass
    return out


FUSED = _fused()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def data(request):
    gen = torch.Generator().manual_seed(0)
    dt = request.param

    def randn(scale=1.0):
        return [(torch.randn(s, generator=gen) * scale).to(device=DEVICE, dtype=dt) for s in SHAPES]

    dense = [(torch.rand(s, generator=gen) > 0.5).to(DEVICE) for s in SHAPES]
    return {"dtype": dt, "grads": randn(), "retain": randn(), "scores": randn(1e-3),
            "fisher": [torch.zeros(s, device=DEVICE) for s in SHAPES],
            "preserve": [torch.rand(s, generator=gen).to(DEVICE) for s in SHAPES],
            "float_masks": [m.to(dt) for m in dense], "bits": S.BitMask.from_dense(dense)}


def _run(benchmark, op, provider, data, fn, floor_bytes):
    def step():
        out = fn()
        synchronize(DEVICE)
        return out

    dt = str(data["dtype"]).replace("torch.", "")
    benchmark.group = f"saliency {op} weights={NUMEL} {dt} {DEVICE}"
    if PEAK:
        peak = peak_memory(step, DEVICE)
        benchmark.extra_info["peak_mem_bytes"] = peak
        benchmark.extra_info["peak_mem_fraction_of_weights"] = peak / (NUMEL * data["dtype"].itemsize)
    benchmark.extra_info["roofline_floor_s"] = floor_bytes / B.stream_bandwidth(DEVICE)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["eager", "foreach"] + FUSED)
def test_fisher_accumulate(benchmark, data, provider):
    g, f = data["grads"], data["fisher"]
    if provider == "eager":
        fn = lambda: B.paper_fisher(f, g, 0.125)  # noqa: E731
    elif provider == "foreach":
        fn = lambda: B.foreach_fisher(f, g, 0.125)  # noqa: E731
    else:
        acc = S.FisherAccumulator(g, backend=provider)
        fn = lambda: acc.accumulate(g, 0.125)  # noqa: E731
    _run(benchmark, "fisher_accumulate", provider, data, fn, NUMEL * (data["dtype"].itemsize + 8))


@pytest.mark.parametrize("provider", ["eager", "foreach"] + FUSED)
def test_transform_mask_clip(benchmark, data, provider):
    g = data["grads"]
    if provider == "eager":
        fn = lambda: B.paper_transform_mask_clip(g, data["float_masks"])  # noqa: E731
    elif provider == "foreach":
        fn = lambda: B.foreach_transform_mask_clip(g, data["float_masks"])  # noqa: E731
    else:
        fn = lambda: S.transform_gradients_(g, data["bits"], max_norm=B.MAX_NORM, backend=provider)  # noqa: E731
    _run(benchmark, "transform_mask_clip", provider, data, fn, NUMEL * (3 * data["dtype"].itemsize + 1 / 8))


@pytest.mark.parametrize("provider", ["eager"] + FUSED)
def test_transform_geometry_projection(benchmark, data, provider):
    g, r, fp = data["grads"], data["retain"], data["preserve"]
    if provider == "eager":
        fn = lambda: B.paper_transform_geometry(g, data["float_masks"], fp, r)  # noqa: E731
    else:
        fn = lambda: S.transform_gradients_(g, data["bits"], mode="geometry", preserve_fisher=fp,  # noqa: E731
                                            lam=B.LAM, project_out=r, max_norm=B.MAX_NORM, backend=provider)
    es = data["dtype"].itemsize
    _run(benchmark, "transform_geometry_proj", provider, data, fn, NUMEL * (2 * (2 * es + 4 + 1 / 8) + es))


@pytest.mark.parametrize("provider", ["eager"] + FUSED)
def test_ratio_mask(benchmark, data, provider):
    if data["dtype"] != torch.float32:
        pytest.skip("Fishers are float32")
    ff, fp = data["preserve"], [f + 0.5 for f in data["preserve"]]
    fn = (lambda: B.paper_ratio(ff, fp)) if provider == "eager" else \
        (lambda: S.ratio_mask(ff, fp, backend=provider))
    out = fn()
    benchmark.extra_info["mask_bytes"] = (sum(m.numel() * m.element_size() for m in out) if provider == "eager"
                                          else out.nbytes)
    _run(benchmark, "ratio_mask", provider, data, fn, NUMEL * (8 + 1 / 8))


@pytest.mark.parametrize("provider", ["eager"] + FUSED)
def test_topk_threshold(benchmark, data, provider):
    s = data["scores"]
    k = int(math.floor(B.TOPK_FRACTION * NUMEL + 0.5))
    fn = (lambda: B.cat_kthvalue(s, k)) if provider == "eager" else \
        (lambda: S.topk_threshold(s, k=k, backend=provider))
    _run(benchmark, "topk_threshold", provider, data, fn, NUMEL * data["dtype"].itemsize)


@pytest.mark.parametrize("provider", ["eager"] + FUSED)
def test_topk_mask(benchmark, data, provider):
    s = data["scores"]
    k = int(math.floor(B.TOPK_FRACTION * NUMEL + 0.5))
    fn = (lambda: B.salun_topk_masks(s, k)) if provider == "eager" else \
        (lambda: S.topk_mask(s, B.TOPK_FRACTION, backend=provider))
    _run(benchmark, "topk_mask", provider, data, fn, NUMEL * data["dtype"].itemsize + NUMEL / 8)


@pytest.mark.parametrize("provider", ["eager"] + FUSED)
def test_salun_reset(benchmark, data, provider):
    p, o = data["grads"], data["retain"]
    fn = (lambda: B.paper_reset(p, o, data["float_masks"])) if provider == "eager" else \
        (lambda: S.reset_unmasked_(p, o, data["bits"], backend=provider))
    _run(benchmark, "salun_reset", provider, data, fn, NUMEL * (3 * data["dtype"].itemsize + 1 / 8))
