"""``unlearn-fast profile OP``: a torch.profiler trace of one fused op (forward +
backward) as a Chrome trace file, a per-kernel time table, and on CUDA the ncu command
line that profiles the same op in detail."""
from __future__ import annotations

import os
import shlex
import sys
from typing import Callable, Dict, Tuple

import torch

from unlearn_fast.bench.common import DTYPES


def _dmk_case(n: int, v: int, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast import dual_masked_kl

    s = torch.randn(n, v, device=device, dtype=dtype, requires_grad=True)
    t = torch.randn(n, v, device=device, dtype=dtype)
    return lambda: torch.autograd.grad(dual_masked_kl(s, t, forget_token_ids=[1, 2], backend=backend), s)


def _token_stats_case(n: int, v: int, dtype, device, backend, hidden: int = 512) -> Callable[[], object]:
    from unlearn_fast.ops.token_stats import token_stats

    h = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
    w = (torch.randn(v, hidden, device=device, dtype=dtype) / hidden ** 0.5).requires_grad_()
    y = torch.randint(0, v, (n,), device=device)
    return lambda: torch.autograd.grad(token_stats(h, w, y, backend=backend)["logprob"].sum(), (h, w))


def _fused_linear_dmk_case(n: int, v: int, dtype, device, backend, hidden: int = 512) -> Callable[[], object]:
    from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl

    hs = torch.randn(n, hidden, device=device, dtype=dtype, requires_grad=True)
    ht = torch.randn(n, hidden, device=device, dtype=dtype)
    w = torch.randn(v, hidden, device=device, dtype=dtype) / hidden ** 0.5
    return lambda: torch.autograd.grad(fused_linear_dual_masked_kl(hs, w, ht, w, backend=backend), hs)


CASES: Dict[str, Tuple[Callable, str]] = {
    "dmk": (_dmk_case, "dual masked KL on (N, V) logits"),
    "token_stats": (_token_stats_case, "fused linear token log-probs (hidden 512)"),
    "fused_linear_dmk": (_fused_linear_dmk_case, "fused linear dual masked KL (hidden 512)"),
}


def add_arguments(parser) -> None:
    parser.add_argument("op", choices=sorted(CASES), help="which op to profile")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="runs/profile", help="folder for the Chrome trace")


def main(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    make, _desc = CASES[args.op]
    try:
        fn = make(args.tokens, args.vocab, DTYPES[args.dtype], device, args.backend)
    except ModuleNotFoundError as exc:
        print(f"unlearn-fast profile: op {args.op!r} is not available in this build ({exc})", file=sys.stderr)
        return 2
    fn()  # warm-up (and any lazy compilation) outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(args.steps):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    os.makedirs(args.out, exist_ok=True)
    trace = os.path.join(args.out, f"{args.op}_{args.backend}_{device}.trace.json")
    tmp = trace + ".tmp"
    prof.export_chrome_trace(tmp)
    os.replace(tmp, trace)
    sort_key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=15))
    print(f"Chrome trace: {trace}  (open in chrome://tracing or https://ui.perfetto.dev)")
    if device == "cuda":
        argv = ["unlearn-fast", "profile", args.op, "--tokens", str(args.tokens), "--vocab", str(args.vocab),
                "--dtype", args.dtype, "--backend", args.backend, "--steps", "1"]
        print("Nsight Compute, every kernel of one step:\n  ncu --set full --target-processes all -o "
              f"{shlex.quote(os.path.join(args.out, args.op))} " + " ".join(shlex.quote(a) for a in argv))
    return 0
