"""Benchmark: SIU's dual masked KL, eager (the reference formulation) vs torch.compile of
eager vs the fused backends, and on CUDA Liger-Kernel's KL/JSD on the unmasked KL when
installed (bench/peers.py); forward and forward+backward; time, peak memory, ratio to
eager, and the roofline floor (fwd: both logit tensors read once; fwd+bwd: the backward
reads both again and writes the gradient)."""
from __future__ import annotations

import gc

import torch

from unlearn_fast.bench import peers
from unlearn_fast.bench.common import bench_device, bench_dtypes, bench_providers, dtype_str, shape_str
from unlearn_fast.bench.harness import measured_bandwidth, peak_memory, time_fn
from unlearn_fast.ops.dual_masked_kl import dual_masked_kl

DESCRIPTION = "dual masked KL (SIU): eager vs compile vs fused, fwd and fwd+bwd"
# Tokens N at LLaVA-1.5's vocabulary, then vocabularies V at N=512 up to Qwen2-VL's: three
# points on each line of the plots (bench/plots.py); 226M logits in all, as many as the two
# shapes this list had before (2048 x 32000 and 1024 x 151936), so the full run takes as long
SHAPES = [(512, 32000), (1024, 32000), (2048, 32000), (512, 65536), (512, 151936)]
QUICK_SHAPES = [(256, 4099), (512, 4099), (256, 8191)]  # two short lines, vs N and vs V


def _loss_fn(provider: str, forget_ids):
    """(provider name for the rows, fn(student, teacher, token_mask) -> loss)."""
    if provider == "compile":
        def eager(s, t, ks):
            return dual_masked_kl(s, t, ks, forget_token_ids=forget_ids, backend="eager")
        return provider, torch.compile(eager, dynamic=False)
    if peers.is_peer(provider):  # unmasked KL: the closest computation a peer offers
        name, kl = peers.kl_loss_fn(provider)
        return name, lambda s, t, ks: kl(s, t)
    return provider, lambda s, t, ks: dual_masked_kl(s, t, ks, forget_token_ids=forget_ids, backend=provider)


def run(args, recorder) -> None:
    device = bench_device(args)
    providers = bench_providers(args, "dual_masked_kl", device) + peers.bench_peers(args, "dual_masked_kl", device)
    wanted = (getattr(args, "backends", None) or "").split(",")
    if args.quick and "compile" in providers and "compile" not in wanted:
        # compiling four graphs takes longer than the rest of a quick run together
        providers.remove("compile")
        print("  (--quick: torch.compile provider skipped; add --backends eager,compile,... to include it)")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    reps = 5  # --quick too: eager's first calls after a memory measurement regrow its heap
    bandwidth = measured_bandwidth(device)
    recorder.add("bandwidth", "copy", "copy", "256MiB", "float32", device, "bandwidth_gbps", bandwidth / 1e9)
    gen = torch.Generator().manual_seed(0)
    for n, v in shapes:
        for dtype in bench_dtypes(args):
            s = torch.randn(n, v, generator=gen).to(device=device, dtype=dtype).requires_grad_()
            t = torch.randn(n, v, generator=gen).to(device=device, dtype=dtype)
            ks = (torch.rand(n, generator=gen) > 0.2).to(device)
            forget_ids = [1, 7, 42]
            shape = shape_str(N=n, V=v)
            grad_bytes = s.numel() * s.element_size()
            for mode in ("fwd", "fwd+bwd"):
                nbytes = 2 * s.numel() * s.element_size() + (3 * grad_bytes if mode == "fwd+bwd" else 0)
                floor = nbytes / bandwidth
                eager_med = eager_peak = None
                for provider in providers:
                    try:
                        label, fn = _loss_fn(provider, forget_ids)
                    except Exception as exc:  # a peer's API changed: record and go on
                        print(f"  {provider} unavailable: {type(exc).__name__}: {exc}")
                        continue
                    if mode == "fwd":
                        def step():
                            with torch.no_grad():
                                return fn(s, t, ks)
                    else:
                        def step():
                            out = fn(s, t, ks)
                            return torch.autograd.grad(out, s)[0]
                    try:
                        times = time_fn(step, device, warmup=1, reps=reps)
                        peak = peak_memory(step, device)
                    except Exception as exc:  # e.g. out of memory: record and go on
                        recorder.failure("dual_masked_kl", label, mode, shape, dtype_str(dtype), device, exc)
                        continue
                    med = recorder.add_timing("dual_masked_kl", label, mode, shape, dtype_str(dtype), device,
                                              times, peak_bytes=peak, eager_median=eager_med,
                                              eager_peak=eager_peak, floor_seconds=floor)
                    if mode == "fwd+bwd":
                        # what the memory target counts: beyond inputs and the returned gradient
                        recorder.add("dual_masked_kl", label, mode, shape, dtype_str(dtype), device,
                                     "peak_mem_beyond_grad_bytes", max(0, peak - grad_bytes))
                    if provider == "eager":
                        eager_med, eager_peak = med, peak
                    gc.collect()
            s = t = None  # free before the next shape (the step closures hold these names)
            gc.collect()
