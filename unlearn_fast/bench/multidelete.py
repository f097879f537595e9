"""Benchmark: MultiDelete's losses.  similarity_matching_loss (form="mse" and "kl",
direction="both") and modality_decoupling_loss, eager (materialises the B x B similarity
matrices: the baseline) vs torch.compile of eager vs the fused backends; fwd and fwd+bwd;
median time, IQR, peak memory, ratio to eager, and a floor.

Floors: the similarity losses are compute-bound, so their floor is the fewest flops any exact
algorithm needs at that shape (MSE: the cheaper of the Gram form, 12 B D^2 fwd / 20 B D^2
fwd+bwd, and the B x B products, 4 B^2 D / 8 B^2 D; KL: 4 B^2 D / 8 B^2 D) divided by the
measured float32 GEMM throughput.  The decoupling loss is memory-bound: bytes read and
written divided by the measured copy bandwidth.

Eager needs several B x B float32 matrices; shapes whose estimate exceeds the budget are not
run and are recorded as a row with metric "skipped_needs_bytes" (the estimate).
Environment knobs (the bench CLI has no per-suite flags):
    UF_BENCH_MULTIDELETE_BATCHES  comma-separated B values (default 256,1024,4096,8192,16384,32768)
    UF_BENCH_MULTIDELETE_DIMS     comma-separated D values (default 256,512,768)
    UF_BENCH_MULTIDELETE_FORMS    subset of mse,kl,decoupling (default all)
    UF_BENCH_EAGER_MAX_GIB        eager's budget in GiB (default: 4 on the CPU, 80% of free GPU memory)
"""
from __future__ import annotations

import gc
import os
import statistics
import time

import torch
import torch.nn.functional as F

from unlearn_fast.bench.common import bench_device, bench_dtypes, bench_providers, dtype_str, shape_str
from unlearn_fast.bench.harness import measured_bandwidth, peak_memory, synchronize, time_fn
from unlearn_fast.ops.modality import (OP_DECOUPLING, OP_SIMILARITY, choose_mse_algorithm, modality_decoupling_loss,
                                       similarity_matching_loss)

DESCRIPTION = "MultiDelete: similarity matching (MSE via Gram / blocked, KL online softmax) and decoupling, fwd and fwd+bwd"
BATCHES = (256, 1024, 4096, 8192, 16384, 32768)
DIMS = (256, 512, 768)
FORMS = ("mse", "kl", "decoupling")
QUICK_BATCHES = (256, 1024)
QUICK_DIMS = (256,)
KL_TEMPERATURE = 0.05  # unit embeddings, CLIP-like logits up to 20
# B x B float32 matrices eager holds at its peak (S, R, softmaxes of both directions, their
# gradients), measured roughly on the CPU; used only to decide what to skip.
EAGER_MATRICES = {("mse", "fwd"): 4, ("mse", "fwd+bwd"): 6, ("kl", "fwd"): 8, ("kl", "fwd+bwd"): 12}


def _env_ints(name, default):
    raw = os.environ.get(name)
    return tuple(int(v) for v in raw.split(",")) if raw else default


def auto_provider(op, shape, dtype, device):
    """What backend="auto" runs for this suite's ops (summary.md): the ops' own rule
    (``resolve_for_inputs``), with their CPU crossovers to eager for small batches."""
    from unlearn_fast.bench.plots import parse_shape
    from unlearn_fast.bench.summary import registry_auto
    from unlearn_fast.ops._common import resolve_for_inputs
    from unlearn_fast.ops.modality import AUTO_EAGER_DECOUPLING_ELEMENTS, AUTO_EAGER_MAX_ELEMENTS

    dims = parse_shape(shape)
    if op == "modality_decoupling":
        registry_op, n, d = OP_DECOUPLING, dims.get("N"), dims.get("D")
        small = isinstance(n, int) and isinstance(d, int) and n * d <= AUTO_EAGER_DECOUPLING_ELEMENTS
    elif op in ("similarity_mse", "similarity_kl"):
        registry_op, b = OP_SIMILARITY, dims.get("B")
        small = isinstance(b, int) and b * b <= AUTO_EAGER_MAX_ELEMENTS
    else:
        return None
    if registry_auto(registry_op, shape, dtype, device) is None:  # unavailable here
        return None
    return resolve_for_inputs(registry_op, "auto", device, getattr(torch, dtype), eager_faster_on_cpu=small)


def _eager_budget(device: str) -> float:
    raw = os.environ.get("UF_BENCH_EAGER_MAX_GIB")
    if raw:
        return float(raw) * 2**30
    if device.startswith("cuda"):
        return 0.8 * torch.cuda.mem_get_info()[0]
    return 4.0 * 2**30


_GEMM_RATE = {}


def measured_gemm_flops(device: str) -> float:
    """float32 GEMM throughput (flop/s) of a 2048 x 512 x 2048 product, measured once."""
    if device not in _GEMM_RATE:
        a = torch.randn(2048, 512, device=device)
        b = torch.randn(2048, 512, device=device)
        times = time_fn(lambda: a @ b.t(), device, warmup=2, reps=7)
        _GEMM_RATE[device] = 2 * 2048 * 2048 * 512 / statistics.median(times)
    return _GEMM_RATE[device]


def _similarity_min_flops(form: str, mode: str, b: int, d: int) -> float:
    square = 4 * b * b * d if mode == "fwd" else 8 * b * b * d
    if form == "kl":
        return square
    gram = 12 * b * d * d if mode == "fwd" else 20 * b * d * d
    return min(square, gram)


def _similarity_fn(provider: str, form: str):
    kw = dict(form=form, temperature=KL_TEMPERATURE if form == "kl" else 1.0)
    if provider == "compile":
        return torch.compile(lambda a, b, c, d: similarity_matching_loss(a, b, c, d, backend="eager", **kw),
                             dynamic=False)
    return lambda a, b, c, d: similarity_matching_loss(a, b, c, d, backend=provider, **kw)


def _decoupling_fn(provider: str):
    if provider == "compile":
        return torch.compile(lambda *t: modality_decoupling_loss(*t, backend="eager"), dynamic=False)
    return lambda *t: modality_decoupling_loss(*t, backend=provider)


def _step(fn, inputs, students, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        def step():
            return torch.autograd.grad(fn(*inputs), students)
    return step


def _measure_side_by_side(recorder, op, mode, shape, dtype, device, steps, reps, floor, bd_bytes):
    """Time the providers' steps interleaved (one call of each per round), so load changes on a
    shared machine hit every provider alike; each provider's second call (after a warm-up
    call, where torch.compile compiles) gives its peak memory.  `reps` rounds (fewer, at
    least 2, once they pass 60 s; up to 4 * reps while a round takes under 50 ms per
    provider, as short calls are noisier).  Rows: the harness's standard ones plus peak
    memory in units of one (B, D) float32 tensor."""
    peaks, times = {}, {}
    for provider, step in list(steps.items()):
        try:
            step()  # warm-up outside the measurement (torch.compile compiles here)
            synchronize(device)
            peaks[provider] = peak_memory(step, device)
            synchronize(device)
            times[provider] = []
        except Exception as exc:  # e.g. out of memory: record and go on
            recorder.failure(op, provider, mode, shape, dtype, device, exc)
            steps.pop(provider)
    rounds, start = 0, time.perf_counter()
    max_rounds = 4 * reps if reps > 2 else reps  # --quick: exactly reps rounds
    while steps and rounds < max_rounds:
        for provider, step in steps.items():
            t0 = time.perf_counter()
            step()
            synchronize(device)
            times[provider].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        slow = elapsed / rounds > 0.05 * len(steps)
        if (rounds >= reps and slow) or (rounds >= 2 and elapsed > 60.0):
            break
    eager = None
    for provider in steps:
        med = recorder.add_timing(op, provider, mode, shape, dtype, device, times[provider],
                                  peak_bytes=peaks[provider], eager_median=eager[0] if eager else None,
                                  eager_peak=eager[1] if eager else None, floor_seconds=floor)
        # the memory target is O(B D + D^2): peak in units of one (B, D) float32 tensor
        recorder.add(op, provider, mode, shape, dtype, device, "peak_mem_in_BxD_tensors", peaks[provider] / bd_bytes)
        if provider == "eager":
            eager = (med, peaks[provider])


def _run_similarity(args, recorder, device, providers, batches, dims, forms, reps, budget, gemm_rate):
    gen = torch.Generator().manual_seed(0)
    for form in forms:
        op = f"similarity_{form}"
        for b in batches:
            for d in dims:
                for dtype in bench_dtypes(args, default=("float32",)):
                    shape = shape_str(B=b, D=d)
                    if form == "mse":
                        shape += f",algo={choose_mse_algorithm(b, b, d)}"
                    xs = [F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device=device, dtype=dtype)
                          for _ in range(4)]
                    students = (xs[0].requires_grad_(), xs[1].requires_grad_())
                    for mode in ("fwd", "fwd+bwd"):
                        steps = {}
                        for provider in providers:
                            if provider in ("eager", "compile"):
                                need = EAGER_MATRICES[(form, mode)] * 4 * b * b
                                if need > budget:
                                    recorder.add(op, provider, mode, shape, dtype_str(dtype), device,
                                                 "skipped_needs_bytes", need)
                                    print(f"{op:>24} {provider:>16} {mode:>8} {shape:>24}  skipped: needs ~"
                                          f"{need / 2**30:.1f} GiB for its {b} x {b} matrices", flush=True)
                                    continue
                            steps[provider] = _step(_similarity_fn(provider, form), xs, students, mode)
                        floor = _similarity_min_flops(form, mode, b, d) / gemm_rate
                        _measure_side_by_side(recorder, op, mode, shape, dtype_str(dtype), device, steps, reps,
                                              floor, 4 * b * d)
                        gc.collect()
                    del xs, students
                    gc.collect()


def _run_decoupling(args, recorder, device, providers, batches, dims, reps, bandwidth):
    gen = torch.Generator().manual_seed(1)
    op = "modality_decoupling"
    for b in batches:
        for d in dims:
            for dtype in bench_dtypes(args, default=("float32",)):
                xs = [torch.randn(b, d, generator=gen).to(device=device, dtype=dtype) for _ in range(6)]
                students = tuple(xs[k].requires_grad_() for k in (0, 2, 4))
                shape = shape_str(pairs=3, N=b, D=d)
                elem = xs[0].element_size()
                for mode in ("fwd", "fwd+bwd"):
                    nbytes = 6 * b * d * elem + (9 * b * d * elem if mode == "fwd+bwd" else 0)
                    steps = {p: _step(_decoupling_fn(p), xs, students, mode) for p in providers}
                    _measure_side_by_side(recorder, op, mode, shape, dtype_str(dtype), device, steps, reps,
                                          nbytes / bandwidth, 4 * b * d)
                del xs, students
                gc.collect()


def run(args, recorder) -> None:
    device = bench_device(args)
    batches = QUICK_BATCHES if args.quick else _env_ints("UF_BENCH_MULTIDELETE_BATCHES", BATCHES)
    dims = QUICK_DIMS if args.quick else _env_ints("UF_BENCH_MULTIDELETE_DIMS", DIMS)
    forms = tuple(os.environ.get("UF_BENCH_MULTIDELETE_FORMS", ",".join(FORMS)).split(","))
    bad = [f for f in forms if f not in FORMS]
    if bad:
        raise ValueError(f"UF_BENCH_MULTIDELETE_FORMS: unknown {bad}; choose from {FORMS}")
    reps = 5  # --quick too: short calls, and eager needs a few to warm its heap
    budget = _eager_budget(device)
    bandwidth = measured_bandwidth(device)
    gemm_rate = measured_gemm_flops(device)
    recorder.add("bandwidth", "copy", "copy", "256MiB", "float32", device, "bandwidth_gbps", bandwidth / 1e9)
    recorder.add("gemm", "mm", "fwd", "M=2048,N=2048,K=512", "float32", device, "gflops", gemm_rate / 1e9)
    print(f"  eager budget {budget / 2**30:.1f} GiB; GEMM {gemm_rate / 1e9:.0f} GFLOP/s; "
          f"copy {bandwidth / 1e9:.1f} GB/s", flush=True)
    def providers(op):
        names = bench_providers(args, op, device)
        # torch.compile's first compilation alone takes longer than --quick may
        return [p for p in names if not (args.quick and p == "compile")]

    sim_forms = [f for f in forms if f in ("mse", "kl")]
    if sim_forms:
        _run_similarity(args, recorder, device, providers(OP_SIMILARITY), batches, dims, sim_forms, reps, budget,
                        gemm_rate)
    if "decoupling" in forms:
        _run_decoupling(args, recorder, device, providers(OP_DECOUPLING), batches, dims, reps, bandwidth)
