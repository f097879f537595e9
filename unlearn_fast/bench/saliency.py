"""Benchmark: weight-saliency ops on a parameter list shaped like a 7B model's linear
layers (32 layers x {q, k, v, o, gate, up, down} = 224 tensors, the dimensions scaled
down to fit the machine), against the papers' per-parameter PyTorch loops.

Ops (rows ``op``):
  fisher_accumulate       F += scale * g^2                    eager loop / torch._foreach / fused
  ratio_mask              MMUnlearner's m = (F_f+eps)/(F_p+eps) >= 1: float masks (paper) / BitMask
  topk_threshold          k-th largest |score| of all weights: torch.cat + abs + kthvalue / radix
  topk_mask               SalUn's global top-k mask: cat + kthvalue + per-tensor compare / radix + BitMask
  transform_mask_clip     MMUnlearner: clip_grad_norm_ then g *= m (float masks) / fused two passes
  transform_geometry_proj SFR-on geometry g = m g / (F_p + lam), clip, projection off a retain gradient
  accumulate+transform    fisher_accumulate + transform_mask_clip (the issue's 5x target)
  salun_reset             theta <- m theta + (1 - m) theta_orig
Each row: median time, IQR, peak memory (RSS above the inputs on CPU; also as a fraction
of the weights' size), ratio to eager in the same run, and the roofline floor: the bytes the fused algorithm must move (its passes)
over a measured streaming bandwidth (``stream_bandwidth``: b += a on 512 MiB (128 with
--quick), 3 x 4 bytes per element; torch's copy_ under-reports it on CPUs that read the destination first).
For the top-k, the floor is one read of the scores (any selection needs it), so the
fraction shows what the radix passes cost.

Timing: the providers of one op run interleaved within each repetition (order rotated),
so that load changes on a shared machine hit them alike; all timings are taken before
any peak-memory measurement (the RSS sampler's malloc policy is scoped to the measurement,
see harness.MALLOC_POLICIES, so the order no longer matters; timing first keeps it so).  ``OMP_NUM_THREADS=1`` compares single-core throughput, free
of the OpenMP barrier stalls that oversubscribed machines inflict on the eager loops.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from unlearn_fast.bench.common import bench_device, bench_dtypes, dtype_str, shape_str
from unlearn_fast.bench.harness import _release_free_heap, peak_memory, synchronize, time_fn

DESCRIPTION = "saliency: Fisher accumulation, masks, global top-k, gradient transform vs per-parameter loops"

LAYERS = 32
# (hidden, intermediate): LLaMA-7B is (4096, 11008); full: /5 (257M weights, 1.03 GB per
# fp32 list), float32 and bfloat16; quick: ~10M weights, float32 (--dtypes to change).
FULL_DIMS = (816, 2200)
QUICK_DIMS = (160, 432)
MAX_NORM = 1.0
LAM = 1.0
EPS = 1e-15
TOPK_FRACTION = 0.05


def model_shapes(hidden: int, intermediate: int, layers: int = LAYERS) -> List[tuple]:
    """Shapes of a LLaMA-style decoder's linear weights (q, k, v, o, gate, up, down)."""
    per_layer = [(hidden, hidden)] * 4 + [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return per_layer * layers


OPS = ("fisher_accumulate", "transform_mask_clip", "transform_geometry_proj", "salun_reset", "ratio_mask",
       "topk_threshold", "topk_mask", "accumulate+transform")


def auto_provider(op, shape, dtype, device):
    """What backend="auto" runs for this suite's ops (summary.md): every one is the saliency op."""
    if op not in OPS:
        return None
    from unlearn_fast.bench.summary import registry_auto

    return registry_auto("saliency", shape, dtype, device)


_STREAM_BW: Dict[str, float] = {}


def stream_bandwidth(device: str, mib: int = 512) -> float:
    """Bytes/s of an in-place add over ``mib`` MiB per array (reads a and b, writes b);
    measured once per device."""
    if device not in _STREAM_BW:
        n = mib * 2**20 // 4
        a = torch.rand(n, device=device)
        b = torch.rand(n, device=device)
        times = time_fn(lambda: b.add_(a), device, warmup=2, reps=7)
        _STREAM_BW[device] = 3 * 4 * n / statistics.median(times)
        del a, b
    return _STREAM_BW[device]


# --------------------------------------------------------------------------------------
# Baselines: the papers' per-parameter code
# --------------------------------------------------------------------------------------
def paper_fisher(fisher, grads, scale):
    for f, g in zip(fisher, grads):  # MMUnlearner: fisher[n] += grad ** 2 / len(loader)
        f += g.float() ** 2 * scale


def foreach_fisher(fisher, grads, scale):
    g32 = grads if grads[0].dtype == torch.float32 else [g.float() for g in grads]
    torch._foreach_addcmul_(fisher, g32, g32, value=scale)


def paper_ratio(ff, fp):
    return [((a + EPS) / (b + EPS) >= 1.0).float() for a, b in zip(ff, fp)]  # float masks, as stored


def cat_kthvalue(scores, k):
    flat = torch.cat([s.reshape(-1) for s in scores]).abs_()
    return torch.kthvalue(flat, flat.numel() - k + 1).values  # the k-th largest


def salun_topk_masks(scores, k):
    kth = cat_kthvalue(scores, k)
    return [s.abs() >= kth for s in scores]  # SalUn keeps ties at the threshold


def paper_transform_mask_clip(grads, float_masks):
    norms = [torch.linalg.vector_norm(g, 2) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    for g, m in zip(grads, float_masks):
        g.mul_(m.to(g.dtype) if m.dtype != g.dtype else m)


def foreach_transform_mask_clip(grads, float_masks):
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    coef = torch.clamp(MAX_NORM / (total + 1e-6), max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    torch._foreach_mul_(grads, float_masks)


def paper_transform_geometry(grads, float_masks, preserve, retain):
    from unlearn_fast.ops.saliency import reference_transform_

    reference_transform_(grads, float_masks, preserve, LAM, retain, MAX_NORM)


def paper_reset(params, originals, float_masks):
    for p, o, m in zip(params, originals, float_masks):  # SalUn: p = m * p + (1 - m) * p0
        p.copy_(m * p + (1 - m) * o)


# --------------------------------------------------------------------------------------
def _providers(args, device) -> List[str]:
    from unlearn_fast import backends

    out = ["eager", "foreach"]
    for name in ("cpp", "cuda", "triton"):
        if device == "cpu" and name == "triton":
            continue  # the interpreter: correct, not fast
        try:
            backends.resolve("saliency", name, device)
            out.append(name)
        except Exception:
            continue
    wanted = getattr(args, "backends", None)  # --backends eager,foreach,cpp,...
    if wanted:
        keep = set(wanted.split(","))
        out = [p for p in out if p in keep or p == "eager"]
    return out


class Case:
    """One op measured for several providers: fns[provider]() runs it once."""

    def __init__(self, op: str, mode: str, floor_bytes: float, fns: Dict[str, Callable[[], object]],
                 output_bytes: Optional[Dict[str, int]] = None):
        self.op, self.mode, self.floor_bytes, self.fns, self.output_bytes = op, mode, floor_bytes, fns, output_bytes


def _sections(S, shapes, device, dtype, providers, gen):
    """Yield the Cases of one dtype, section by section (each section's data is freed
    before the next is built)."""
    n = sum(math.prod(s) for s in shapes)
    es = torch.tensor([], dtype=dtype).element_size()
    fused = [p for p in providers if p not in ("eager", "foreach")]

    def randn(scale=1.0):
        return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]

    def rand():
        return [torch.rand(s, generator=gen).to(device) for s in shapes]

    grads = randn()
    fisher = [torch.zeros(s, device=device) for s in shapes]
    fns = {"eager": lambda: paper_fisher(fisher, grads, 0.125), "foreach": lambda: foreach_fisher(fisher, grads, 0.125)}
    for p in fused:
        fns[p] = (lambda a: lambda: a.accumulate(grads, 0.125))(S.FisherAccumulator(grads, backend=p))
    yield Case("fisher_accumulate", "F+=s*g^2", n * (es + 8), fns)
    fisher = fns = None  # rebinding, not del: the closures above hold these names

    dense = [torch.rand(s, generator=gen).to(device) > 0.5 for s in shapes]
    float_masks = [m.to(dtype) for m in dense]  # the papers keep float masks
    bits = S.BitMask.from_dense(dense)
    del dense
    fns = {"eager": lambda: paper_transform_mask_clip(grads, float_masks),
           "foreach": lambda: foreach_transform_mask_clip(grads, float_masks)}
    for p in fused:
        fns[p] = (lambda be: lambda: S.transform_gradients_(grads, bits, max_norm=MAX_NORM, backend=be))(p)
    yield Case("transform_mask_clip", "clip,mask", n * (3 * es + 1 / 8), fns)

    preserve, retain = rand(), randn()
    fns = {"eager": lambda: paper_transform_geometry(grads, float_masks, preserve, retain)}
    for p in fused:
        fns[p] = (lambda be: lambda: S.transform_gradients_(grads, bits, mode="geometry", preserve_fisher=preserve,
                                                             lam=LAM, project_out=retain, max_norm=MAX_NORM,
                                                             backend=be))(p)
    yield Case("transform_geometry_proj", "geom,clip,proj", n * (2 * (2 * es + 4 + 1 / 8) + es), fns)
    preserve = retain = fns = None

    originals = randn()
    fns = {"eager": lambda: paper_reset(grads, originals, float_masks)}
    for p in fused:
        fns[p] = (lambda be: lambda: S.reset_unmasked_(grads, originals, bits, backend=be))(p)
    yield Case("salun_reset", "reset", n * (3 * es + 1 / 8), fns)
    originals = float_masks = grads = bits = fns = None
    gc.collect()

    if dtype == torch.float32:  # Fishers are float32 whatever the model dtype
        ff, fp = rand(), rand()
        fns = {"eager": lambda: paper_ratio(ff, fp)}
        for p in fused:
            fns[p] = (lambda be: lambda: S.ratio_mask(ff, fp, backend=be))(p)
        # the papers' float32 masks vs the packed BitMask (whole words per tensor)
        mask_bytes = {p: 4 * n if p == "eager" else 4 * sum((math.prod(s) + 31) // 32 for s in shapes) for p in fns}
        yield Case("ratio_mask", "mask", n * (8 + 1 / 8), fns, mask_bytes)
        ff = fp = fns = None
        gc.collect()

    scores = randn(1e-3)
    k = int(math.floor(TOPK_FRACTION * n + 0.5))
    fns = {"eager": lambda: cat_kthvalue(scores, k)}
    for p in fused:
        fns[p] = (lambda be: lambda: S.topk_threshold(scores, k=k, backend=be))(p)
    yield Case("topk_threshold", "select", n * es, fns)
    fns = {"eager": lambda: salun_topk_masks(scores, k)}
    for p in fused:
        fns[p] = (lambda be: lambda: S.topk_mask(scores, TOPK_FRACTION, backend=be))(p)
    yield Case("topk_mask", "select+mask", n * es + n / 8, fns)
    scores = fns = None
    gc.collect()


def _interleaved_times(fns: Dict[str, Callable[[], object]], device: str, reps: int) -> Dict[str, List[float]]:
    """Wall times per provider, the providers interleaved within each repetition (and the
    order rotated) so that a load change on a shared machine hits all of them alike."""
    names = list(fns)
    for name in names:  # warm-up
        fns[name]()
        synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return times


def run(args, recorder) -> None:
    from unlearn_fast import saliency as S

    device = bench_device(args)
    providers = _providers(args, device)
    hidden, inter = QUICK_DIMS if args.quick else FULL_DIMS
    shapes = model_shapes(hidden, inter)
    n = sum(math.prod(s) for s in shapes)
    reps = 5  # --quick too: short calls, and eager needs a few to warm its heap
    mib = 128 if args.quick else 512  # both well above the last-level cache
    bandwidth = stream_bandwidth(device, mib)
    recorder.add("bandwidth", "stream_add", "b+=a", f"{mib}MiB", "float32", device, "bandwidth_gbps", bandwidth / 1e9)
    print(f"  {len(shapes)} tensors, {n / 1e6:.1f}M weights; streaming bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"providers {providers}", flush=True)
    shape = shape_str(tensors=len(shapes), weights=n, layers=LAYERS)
    dtypes = bench_dtypes(args, default=("float32",) if args.quick else ("float32", "bfloat16"))
    # Phase 1, times; phase 2, peak memory.  The RSS sampler switches glibc to mmap for
    # every allocation of 64 KiB or more only while it samples; timing first anyway keeps the
    # timings independent of that policy.
    for phase in ("time", "memory"):
        for dtype in dtypes:
            dt = dtype_str(dtype)
            weights_bytes = n * torch.tensor([], dtype=dtype).element_size()
            medians: Dict[tuple, float] = {}
            gen = torch.Generator().manual_seed(0)
            for case in _sections(S, shapes, device, dtype, providers, gen):
                fns = {p: f for p, f in case.fns.items() if p in providers}
                if phase == "time":
                    times = _interleaved_times(fns, device, reps)
                    eager_med = statistics.median(times["eager"])
                    for p, ts in times.items():
                        medians[(case.op, p)] = recorder.add_timing(
                            case.op, p, case.mode, shape, dt, device, ts,
                            eager_median=None if p == "eager" else eager_med,
                            floor_seconds=case.floor_bytes / bandwidth)
                else:
                    eager_peak = None
                    for p, fn in fns.items():
                        _release_free_memory()
                        peak = peak_memory(fn, device)
                        add = lambda m, v: recorder.add(case.op, p, case.mode, shape, dt, device, m, v)  # noqa: E731
                        add("peak_mem_bytes", peak)
                        add("peak_mem_fraction_of_weights", peak / weights_bytes)
                        if p == "eager":
                            eager_peak = peak
                        elif eager_peak:
                            add("mem_ratio_to_eager", peak / eager_peak)
                        note = ""
                        if case.output_bytes is not None:
                            out_bytes = case.output_bytes[p]
                            add("mask_bytes", out_bytes)
                            note = f"  mask {out_bytes / 2**20:8.1f} MiB"
                        print(f"{case.op:>24} {p:>16} {case.mode:>14} {dt:>9}  peak {peak / 2**20:9.1f} MiB "
                              f"({peak / weights_bytes:6.1%} of the weights){note}", flush=True)
                        gc.collect()
            if phase == "time":
                _accumulate_plus_transform(recorder, medians, providers, shape, dt, device)
            synchronize(device)


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc malloc_trim), so that memory the
    next measurement allocates shows up in the RSS instead of reusing resident pages."""
    gc.collect()
    _release_free_heap()


def _accumulate_plus_transform(recorder, medians, providers, shape, dt, device) -> None:
    """The issue's target: Fisher accumulation + the MMUnlearner transform, per provider."""
    ea, eb = medians.get(("fisher_accumulate", "eager")), medians.get(("transform_mask_clip", "eager"))
    for p in providers:
        a, b = medians.get(("fisher_accumulate", p)), medians.get(("transform_mask_clip", p))
        if not (a and b and ea and eb):
            continue
        recorder.add("accumulate+transform", p, "sum", shape, dt, device, "time_median_s", a + b)
        recorder.add("accumulate+transform", p, "sum", shape, dt, device, "ratio_to_eager", (ea + eb) / (a + b))
        print(f"{'accumulate+transform':>24} {p:>16} {'sum':>8} {'':>24} {dt:>9}  {(a + b) * 1e3:10.2f} ms  "
              f"x{(ea + eb) / (a + b):5.2f} vs eager", flush=True)
