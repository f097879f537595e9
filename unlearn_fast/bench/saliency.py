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
Each row: median time, IQR, peak memory (RSS above the inputs on CPU), ratio to eager in
the same run, and the roofline floor: the bytes the fused algorithm must move (its passes)
over a measured streaming bandwidth (``stream_bandwidth``: b += a on 512 MiB, 3 x 4 bytes
per element; torch's copy_ under-reports it on CPUs that read the destination first).
For the top-k, the floor is one read of the scores (any selection needs it), so the
fraction shows what the radix passes cost.
"""
from __future__ import annotations

import gc
import math
import statistics
from typing import Callable, Dict, List, Optional

import torch

from unlearn_fast.bench.common import bench_device, bench_dtypes, dtype_str, shape_str
from unlearn_fast.bench.harness import peak_memory, synchronize, time_fn

DESCRIPTION = "saliency: Fisher accumulation, masks, global top-k, gradient transform vs per-parameter loops"

LAYERS = 32
# (hidden, intermediate): LLaMA-7B is (4096, 11008); full: /5 (257M weights, 1.03 GB per
# fp32 list); quick: ~10M weights.
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


_STREAM_BW: Dict[str, float] = {}


def stream_bandwidth(device: str) -> float:
    """Bytes/s of an in-place add over 512 MiB (reads a and b, writes b)."""
    if device not in _STREAM_BW:
        n = 1 << 27
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


class _Runner:
    def __init__(self, args, recorder, device, shape, dtype):
        self.recorder, self.device, self.shape, self.dtype = recorder, device, shape, dtype
        self.reps = 2 if args.quick else 3
        self.eager: Dict[str, tuple] = {}
        self.medians: Dict[tuple, float] = {}

    def measure(self, op: str, provider: str, mode: str, fn: Callable[[], object], floor_bytes: Optional[float],
                bandwidth: float, memory: bool = True) -> Optional[float]:
        try:
            times = time_fn(fn, self.device, warmup=1, reps=self.reps)
            peak = peak_memory(fn, self.device) if memory else None
        except Exception as exc:  # e.g. out of memory: record and go on
            print(f"  {op} {provider} failed: {exc}")
            return None
        eager_med, eager_peak = self.eager.get(op, (None, None))
        med = self.recorder.add_timing(op, provider, mode, self.shape, dtype_str(self.dtype), self.device, times,
                                       peak_bytes=peak, eager_median=eager_med, eager_peak=eager_peak,
                                       floor_seconds=floor_bytes / bandwidth if floor_bytes else None)
        if provider == "eager":
            self.eager[op] = (med, peak)
        self.medians[(op, provider)] = med
        gc.collect()
        return peak

    def add(self, op, provider, mode, metric, value):
        self.recorder.add(op, provider, mode, self.shape, dtype_str(self.dtype), self.device, metric, value)


def run(args, recorder) -> None:
    from unlearn_fast import saliency as S

    device = bench_device(args)
    providers = _providers(args, device)
    hidden, inter = QUICK_DIMS if args.quick else FULL_DIMS
    shapes = model_shapes(hidden, inter)
    n = sum(math.prod(s) for s in shapes)
    bandwidth = stream_bandwidth(device)
    recorder.add("bandwidth", "stream_add", "b+=a", "512MiB", "float32", device, "bandwidth_gbps", bandwidth / 1e9)
    print(f"  {len(shapes)} tensors, {n / 1e6:.1f}M weights; streaming bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"providers {providers}", flush=True)
    gen = torch.Generator().manual_seed(0)

    def randn(dtype=torch.float32, scale=1.0):
        return [(torch.randn(s, generator=gen) * scale).to(device=device, dtype=dtype) for s in shapes]

    def rand():
        return [torch.rand(s, generator=gen).to(device) for s in shapes]

    for dtype in bench_dtypes(args, default=("float32", "bfloat16")):
        es = torch.tensor([], dtype=dtype).element_size()
        r = _Runner(args, recorder, device, shape_str(tensors=len(shapes), weights=n, layers=LAYERS), dtype)
        weights_bytes = n * es

        # ---- Fisher accumulation
        grads = randn(dtype)
        fisher = [torch.zeros(s, device=device) for s in shapes]
        acc = {}
        for p in providers:
            if p == "eager":
                fn = lambda: paper_fisher(fisher, grads, 0.125)  # noqa: E731
            elif p == "foreach":
                fn = lambda: foreach_fisher(fisher, grads, 0.125)  # noqa: E731
            else:
                acc[p] = S.FisherAccumulator(grads, backend=p)
                fn = (lambda a: lambda: a.accumulate(grads, 0.125))(acc[p])
            r.measure("fisher_accumulate", p, "F+=s*g^2", fn, n * (es + 8), bandwidth)
        del fisher, acc
        gc.collect()

        # ---- Gradient transforms (float masks for the baselines, a BitMask for ours)
        dense = [torch.rand(s, generator=gen).to(device) > 0.5 for s in shapes]
        float_masks = [m.to(dtype) for m in dense]
        bits = S.BitMask.from_dense(dense)
        del dense
        for p in providers:
            if p == "eager":
                fn = lambda: paper_transform_mask_clip(grads, float_masks)  # noqa: E731
            elif p == "foreach":
                fn = lambda: foreach_transform_mask_clip(grads, float_masks)  # noqa: E731
            else:
                fn = (lambda be: lambda: S.transform_gradients_(grads, bits, max_norm=MAX_NORM, backend=be))(p)
            r.measure("transform_mask_clip", p, "clip,mask", fn, n * (3 * es + 1 / 8), bandwidth)
        for p in providers:
            a, b = r.medians.get(("fisher_accumulate", p)), r.medians.get(("transform_mask_clip", p))
            ea, eb = r.medians.get(("fisher_accumulate", "eager")), r.medians.get(("transform_mask_clip", "eager"))
            if a and b and ea and eb:
                r.add("accumulate+transform", p, "sum", "time_median_s", a + b)
                r.add("accumulate+transform", p, "sum", "ratio_to_eager", (ea + eb) / (a + b))
                print(f"{'accumulate+transform':>24} {p:>16} {'sum':>8} {'':>24} {dtype_str(dtype):>9}  "
                      f"{(a + b) * 1e3:10.2f} ms  x{(ea + eb) / (a + b):5.2f} vs eager", flush=True)
        preserve = rand()
        retain = randn(dtype)
        for p in providers:
            if p == "foreach":
                continue
            if p == "eager":
                fn = lambda: paper_transform_geometry(grads, float_masks, preserve, retain)  # noqa: E731
            else:
                fn = (lambda be: lambda: S.transform_gradients_(
                    grads, bits, mode="geometry", preserve_fisher=preserve, lam=LAM, project_out=retain,
                    max_norm=MAX_NORM, backend=be))(p)
            r.measure("transform_geometry_proj", p, "geom,clip,proj", fn, n * (2 * (2 * es + 4 + 1 / 8) + es),
                      bandwidth)
        del preserve, retain

        # ---- SalUn reset
        originals = randn(dtype)
        for p in providers:
            if p == "foreach":
                continue
            if p == "eager":
                fn = lambda: paper_reset(grads, originals, float_masks)  # noqa: E731
            else:
                fn = (lambda be: lambda: S.reset_unmasked_(grads, originals, bits, backend=be))(p)
            r.measure("salun_reset", p, "reset", fn, n * (3 * es + 1 / 8), bandwidth)
        del originals, float_masks, grads, bits
        gc.collect()

        # ---- Masks: ratio (float32 Fishers), top-k over |scores| of this dtype
        if dtype == torch.float32:
            ff, fp = rand(), rand()
            for p in providers:
                if p == "foreach":
                    continue
                fn = (lambda: paper_ratio(ff, fp)) if p == "eager" else \
                    (lambda be: lambda: S.ratio_mask(ff, fp, backend=be))(p)
                r.measure("ratio_mask", p, "mask", fn, n * (8 + 1 / 8), bandwidth)
                out = fn()
                mask_bytes = sum(m.numel() * m.element_size() for m in out) if p == "eager" else out.nbytes
                r.add("ratio_mask", p, "mask", "mask_bytes", mask_bytes)
                print(f"{'':>24} mask memory {p:>8}: {mask_bytes / 2**20:9.1f} MiB", flush=True)
                del out
            del ff, fp
            gc.collect()

        scores = randn(dtype, scale=1e-3)
        k = int(math.floor(TOPK_FRACTION * n + 0.5))
        for p in providers:
            if p == "foreach":
                continue
            fn = (lambda: cat_kthvalue(scores, k)) if p == "eager" else \
                (lambda be: lambda: S.topk_threshold(scores, k=k, backend=be))(p)
            peak = r.measure("topk_threshold", p, "select", fn, n * es, bandwidth)
            if peak is not None:
                r.add("topk_threshold", p, "select", "peak_mem_fraction_of_weights", peak / weights_bytes)
        for p in providers:
            if p == "foreach":
                continue
            fn = (lambda: salun_topk_masks(scores, k)) if p == "eager" else \
                (lambda be: lambda: S.topk_mask(scores, TOPK_FRACTION, backend=be))(p)
            peak = r.measure("topk_mask", p, "select+mask", fn, n * es + n / 8, bandwidth)
            if peak is not None:
                r.add("topk_mask", p, "select+mask", "peak_mem_fraction_of_weights", peak / weights_bytes)
        del scores
        gc.collect()
        synchronize(device)
