"""``unlearn-fast profile OP``: a torch.profiler trace of one fused op as a Chrome trace
file, a per-kernel time table, and on CUDA the ncu command line that profiles the same op
in detail.

Ops and the sizes that apply to each:

  dmk                   dual masked KL on (N, V) logits, fwd+bwd            --tokens --vocab
  cross_entropy         linear CE from hidden states, fwd+bwd (dh, dW)      --tokens --vocab --hidden
  token_stats           per-token log-probs from hidden states, fwd+bwd     --tokens --vocab --hidden
  token_stats_mia       every token statistic (MIA extras), no grad         --tokens --vocab --hidden
  fused_linear_dmk      fused linear dual masked KL, fwd+bwd (dh)           --tokens --vocab --hidden
  saliency              Fisher accumulate + transform_gradients_ (clip, bit mask) on a
                        LLaMA-style list of linear weights                 --hidden --layers
  topk_mask             SalUn's global top-5% mask of the same list         --hidden --layers
  similarity_matching   MultiDelete's similarity loss, fwd+bwd              --batch --dim --form
  modality_decoupling   MultiDelete's decoupling loss (3 pairs), fwd+bwd    --batch --dim

Small sizes for smoke tests: ``--tokens 64 --vocab 512 --hidden 64 --layers 1 --batch 64
--dim 32 --steps 1``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable, Dict, Tuple

import torch

from unlearn_fast.bench.common import DTYPES
from unlearn_fast.bench.harness import write_atomic_text

TOPK_FRACTION = 0.05


def _randn(*shape, dtype, device, scale=1.0, grad=False):
    t = (torch.randn(*shape, device=device) * scale).to(dtype)
    return t.requires_grad_() if grad else t


# --------------------------------------------------------------------------- cases: fn(args, dtype, device, backend)
def _dmk_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast import dual_masked_kl

    s = _randn(a.tokens, a.vocab, dtype=dtype, device=device, grad=True)
    t = _randn(a.tokens, a.vocab, dtype=dtype, device=device)
    return lambda: torch.autograd.grad(dual_masked_kl(s, t, forget_token_ids=[1, 2], backend=backend), s)


def _head(a, dtype, device, grad_w=False):
    h = _randn(a.tokens, a.hidden, dtype=dtype, device=device, grad=True)
    w = _randn(a.vocab, a.hidden, dtype=dtype, device=device, scale=2.0 / a.hidden ** 0.5, grad=grad_w)
    y = torch.randint(0, a.vocab, (a.tokens,), device=device)
    y[: a.tokens // 8] = -100  # a prompt: ignored positions
    return h, w, y


def _cross_entropy_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.losses import cross_entropy

    h, w, y = _head(a, dtype, device, grad_w=True)
    return lambda: torch.autograd.grad(cross_entropy(h, w, y, backend=backend), (h, w))


def _token_stats_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.token_stats import token_stats

    h, w, y = _head(a, dtype, device, grad_w=True)
    return lambda: torch.autograd.grad(token_stats(h, w, y.clamp(min=0), backend=backend)["logprob"].sum(), (h, w))


def _token_stats_mia_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.token_stats import token_stats

    h, w, y = _head(a, dtype, device)
    stats = ("logprob", "lse", "entropy", "mean_logp", "std_logp", "argmax", "correct")

    def run():
        with torch.no_grad():
            return token_stats(h.detach(), w, y, stats=stats, backend=backend)

    return run


def _fused_linear_dmk_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl

    hs, w, _ = _head(a, dtype, device)
    ht = _randn(a.tokens, a.hidden, dtype=dtype, device=device)
    return lambda: torch.autograd.grad(fused_linear_dual_masked_kl(hs, w, ht, w, backend=backend), hs)


def _weight_list(a, dtype, device, scale=1.0):
    from unlearn_fast.bench.saliency import model_shapes

    shapes = model_shapes(a.hidden, int(a.hidden * 2.6875), a.layers)  # LLaMA's 11008 / 4096
    return [_randn(*s, dtype=dtype, device=device, scale=scale) for s in shapes]


def _saliency_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast import saliency as S

    grads = _weight_list(a, dtype, device)
    fisher = S.FisherAccumulator(grads, backend=backend)
    mask = S.BitMask.from_dense([torch.rand(g.shape, device=device) > 0.5 for g in grads])

    def run():
        fisher.accumulate(grads, scale=0.125)
        return S.transform_gradients_(grads, mask, max_norm=1.0, backend=backend)

    return run


def _topk_mask_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast import saliency as S

    scores = _weight_list(a, dtype, device, scale=1e-3)
    return lambda: S.topk_mask(scores, TOPK_FRACTION, backend=backend)


def _unit_rows(a, dtype, device, grad=False):
    x = torch.nn.functional.normalize(torch.randn(a.batch, a.dim, device=device), dim=-1).to(dtype)
    return x.requires_grad_() if grad else x


def _similarity_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.modality import similarity_matching_loss

    si, st = _unit_rows(a, dtype, device, True), _unit_rows(a, dtype, device, True)
    ri, rt = _unit_rows(a, dtype, device), _unit_rows(a, dtype, device)
    temperature = 0.05 if a.form == "kl" else 1.0
    return lambda: torch.autograd.grad(similarity_matching_loss(si, st, ri, rt, form=a.form, temperature=temperature,
                                                                backend=backend), (si, st))


def _decoupling_case(a, dtype, device, backend) -> Callable[[], object]:
    from unlearn_fast.ops.modality import modality_decoupling_loss

    xs = [_unit_rows(a, dtype, device, grad=(i % 2 == 0)) for i in range(6)]
    return lambda: torch.autograd.grad(modality_decoupling_loss(*xs, backend=backend), xs[0::2])


CASES: Dict[str, Tuple[Callable, str]] = {
    "dmk": (_dmk_case, "dual masked KL on (N, V) logits, fwd+bwd"),
    "cross_entropy": (_cross_entropy_case, "linear cross-entropy from hidden states, fwd+bwd"),
    "token_stats": (_token_stats_case, "fused linear token log-probs, fwd+bwd"),
    "token_stats_mia": (_token_stats_mia_case, "every token statistic (MIA extras), no grad"),
    "fused_linear_dmk": (_fused_linear_dmk_case, "fused linear dual masked KL, fwd+bwd"),
    "saliency": (_saliency_case, "Fisher accumulate + transform_gradients_ with a bit mask"),
    "topk_mask": (_topk_mask_case, "SalUn's global top-k mask"),
    "similarity_matching": (_similarity_case, "MultiDelete similarity matching loss, fwd+bwd"),
    "modality_decoupling": (_decoupling_case, "MultiDelete decoupling loss, fwd+bwd"),
}
# the sizes each op reads (for the printed case and the ncu command line)
SIZE_ARGS = {
    "dmk": ("tokens", "vocab"),
    "cross_entropy": ("tokens", "vocab", "hidden"),
    "token_stats": ("tokens", "vocab", "hidden"),
    "token_stats_mia": ("tokens", "vocab", "hidden"),
    "fused_linear_dmk": ("tokens", "vocab", "hidden"),
    "saliency": ("hidden", "layers"),
    "topk_mask": ("hidden", "layers"),
    "similarity_matching": ("batch", "dim", "form"),
    "modality_decoupling": ("batch", "dim"),
}


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.epilog = __doc__[__doc__.index("Ops and the sizes"):]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("op", choices=sorted(CASES), help="which op to profile (sizes per op: see below)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens N (head ops, dmk)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V (head ops, dmk)")
    parser.add_argument("--hidden", type=int, default=512,
                        help="hidden size H of the head ops; the saliency model's hidden size (MLP: 2.6875 H)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the saliency/topk weight list")
    parser.add_argument("--batch", type=int, default=1024, help="batch B of the MultiDelete losses")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D of the MultiDelete losses")
    parser.add_argument("--form", default="mse", choices=("mse", "kl"), help="similarity_matching form")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="input dtype (default float32)")
    parser.add_argument("--backend", default="auto", help="auto, eager, cpp, triton or cuda (default auto)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=3, help="profiled calls after one warm-up (default 3)")
    parser.add_argument("--out", default="runs/profile", help="folder for the Chrome trace and the kernel table")


def _size_argv(args) -> list:
    out = []
    for name in SIZE_ARGS[args.op]:
        out += [f"--{name}", str(getattr(args, name))]
    return out


def main(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("tokens", "vocab", "hidden", "layers", "batch", "dim", "steps"):
        if getattr(args, name) < 1:
            print(f"unlearn-fast profile: --{name} must be at least 1", file=sys.stderr)
            return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"unlearn-fast profile: --out {args.out!r} exists and is not a folder", file=sys.stderr)
        return 2
    make, desc = CASES[args.op]
    try:
        fn = make(args, DTYPES[args.dtype], device, args.backend)
    except ModuleNotFoundError as exc:
        print(f"unlearn-fast profile: op {args.op!r} is not available in this build ({exc})", file=sys.stderr)
        return 2
    print(f"profile {args.op}: {desc}; {' '.join(_size_argv(args))} --dtype {args.dtype} "
          f"--backend {args.backend} on {device}, {args.steps} step(s)", flush=True)
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
    table = prof.key_averages().table(sort_by=sort_key, row_limit=15)
    table_path = os.path.join(args.out, f"{args.op}_{args.backend}_{device}.table.txt")
    write_atomic_text(table_path, table + "\n")
    print(table)
    print(f"Chrome trace: {trace}  (open in chrome://tracing or https://ui.perfetto.dev); table: {table_path}")
    if device == "cuda":
        argv = ["unlearn-fast", "profile", args.op, *_size_argv(args), "--dtype", args.dtype,
                "--backend", args.backend, "--steps", "1"]
        print("Nsight Compute, every kernel of one step:\n  ncu --set full --target-processes all -o "
              f"{shlex.quote(os.path.join(args.out, args.op))} " + " ".join(shlex.quote(a) for a in argv))
    return 0
