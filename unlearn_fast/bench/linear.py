"""Benchmark: losses and statistics of a language-model head computed from hidden states,
eager (logits = hidden @ W.T, then the loss) vs torch.compile of eager vs the fused
backends (logits never materialised).

Ops (rows' ``op`` field):
  cross_entropy       linear CE.  eager = transformers' ForCausalLMLoss: logits upcast
                      to float32, F.cross_entropy(ignore_index=-100); fused =
                      unlearn_fast.cross_entropy; on CUDA also Liger-Kernel's fused
                      linear CE and cut-cross-entropy when installed (bench/peers.py).
  fused_linear_dmk    SIU's dual masked KL between the student head on student hidden
                      states and the teacher head on teacher hidden states (token mask,
                      3 forget ids).  eager = both logits, then dual_masked_kl's eager
                      reference (teacher logits under no_grad); fused =
                      fused_linear_dual_masked_kl.
  token_stats_mia     forward only: per-token log-prob, lse, entropy, mean/std of log p,
                      argmax/correct, then per sequence (256 tokens) the Min-K% and
                      Min-K%++ scores (k = 40%) and exact memorisation.  eager = the
                      open-unlearning way: every attack runs its own head pass (logits,
                      log_softmax, gather) and sorts per sequence -- LOSS, Min-K%, Min-K%++
                      (two passes: vocab log-probs and token log-probs), exact
                      memorisation; eager_1pass = the same metrics from one logits
                      tensor (a stronger baseline); fused = one token_stats call.
Modes: fwd (no grad), fwd+bwd (gradients w.r.t. hidden states and the head weight),
fwd+bwd_frozen (w.r.t. hidden states only: a frozen head, e.g. under LoRA).
Rows: median time, IQR, median CPU time of the process (all threads; steadier than wall
time on a shared machine), peak memory above the inputs (RSS on the CPU), the same
without the returned gradients (``peak_mem_beyond_grad_bytes``, what the issue's target
counts), ratios to eager (``mem_ratio_to_eager`` of the whole peaks, as in every suite;
``mem_beyond_grad_ratio_to_eager`` of the peaks without the gradients), and a GEMM floor (the head GEMMs eager needs at the measured
GEMM rate of this dtype; ``roofline_*`` rows).
"""
from __future__ import annotations

import gc
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from unlearn_fast.bench import peers
from unlearn_fast.bench.common import bench_device, bench_dtypes, bench_providers, dtype_str, shape_str
from unlearn_fast.bench.harness import check_fits_in_memory, peak_memory, synchronize, time_fn

DESCRIPTION = "head-level fused ops (linear CE, fused linear DMK, token stats + MIA): eager vs compile vs fused"
# head name -> (hidden H, vocabulary V): LLaVA-1.5-7B's and Qwen2-VL-7B's heads, and H=4096
# heads of wider vocabularies (the V axis of the plots at a fixed H)
HEADS = {"llava": (4096, 32000), "qwen2vl": (3584, 151936), "h4096-v65536": (4096, 65536),
         "h4096-v151936": (4096, 151936), "tiny": (256, 4099)}
# (head, tokens) cases of the full run on a GPU: tokens N at V=32000 (4 points), vocabularies V
# at N=2048 (3 points), and Qwen2-VL's real head
CASES = [("llava", 512), ("llava", 2048), ("llava", 4096), ("llava", 8192), ("h4096-v65536", 2048),
         ("h4096-v151936", 2048), ("qwen2vl", 512), ("qwen2vl", 2048)]
# The full run on the CPU: the same lines at 1/32 of the tokens, float32, fwd and fwd+bwd, no
# torch.compile (compiling 30 graphs alone takes longer): a 2-core machine does the GPU list's
# head GEMMs at ~50-100 GFLOP/s, hours for the list above, ~6-12 minutes for this one.
# --heads/--tokens/--modes/--dtypes/--backends ask for more.
CPU_CASES = [("llava", 64), ("llava", 128), ("llava", 256), ("h4096-v65536", 64), ("h4096-v151936", 64)]
CPU_MODES = ("fwd", "fwd+bwd")
# --quick: float32 only, fwd and fwd+bwd, no torch.compile (its compile time alone is minutes)
QUICK_CASES = [("tiny", 512)]
OPS = ("cross_entropy", "fused_linear_dmk", "token_stats_mia")
MODES = ("fwd", "fwd+bwd", "fwd+bwd_frozen")
SEQ_LEN = 256
PROMPT_LEN = 32  # ignored positions at the start of every sequence
MINK = 0.4
FORGET_IDS = [1, 7, 42]
IGNORE = -100
# The eager providers' peak above their inputs and returned gradients, in (N, V) float32
# logits tensors: the most measured on the CPU at N = 64-4096 (benchmarks/results).  A CPU
# case whose estimate does not fit in the available memory is skipped and recorded as
# failed (harness.check_fits_in_memory): fused linear DMK's eager fwd+bwd at N = 4096 of
# Qwen2-VL's head (~28 GiB) was killed by the OOM killer on a 24 GiB machine, run and all.
EAGER_LOGITS_COPIES = {("cross_entropy", "fwd"): 2, ("cross_entropy", "fwd+bwd"): 4,
                       ("cross_entropy", "fwd+bwd_frozen"): 3, ("fused_linear_dmk", "fwd"): 10,
                       ("fused_linear_dmk", "fwd+bwd"): 12, ("fused_linear_dmk", "fwd+bwd_frozen"): 9,
                       ("token_stats_mia", "fwd"): 9}
LOGITS_MATERIALISING = ("eager", "eager_1pass", "compile")
ALL_STATS = ("logprob", "lse", "entropy", "mean_logp", "std_logp", "argmax", "correct")


def add_arguments(parser) -> None:
    parser.add_argument("--ops", default=None, help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--heads", default=None,
                        help=f"comma-separated heads of {','.join(h for h in HEADS if h != 'tiny')} "
                             "(default: those of the device's case list)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts N (default per head)")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 3; 5 with --quick)")


def _csv(value, default):
    return tuple(value.split(",")) if value else tuple(default)


def auto_provider(op, shape, dtype, device):
    """What backend="auto" runs for this suite's ops (summary.md)."""
    registry_op = {"cross_entropy": "token_stats", "token_stats_mia": "token_stats",
                   "fused_linear_dmk": "fused_linear_dual_masked_kl"}.get(op)
    if registry_op is None:
        return None
    from unlearn_fast.bench.summary import registry_auto

    return registry_auto(registry_op, shape, dtype, device)


# --------------------------------------------------------------------------- inputs
def _inputs(head: str, n: int, dtype, device, gen):
    hdim, vocab = HEADS[head]
    scale = 2.0 / hdim ** 0.5  # logits of std ~2: realistic peakedness
    w = (torch.randn(vocab, hdim, generator=gen) * scale).to(device=device, dtype=dtype)
    h = torch.randn(n, hdim, generator=gen).to(device=device, dtype=dtype)
    ht = (h.float() + 0.3 * torch.randn(n, hdim, generator=gen).to(device)).to(dtype)  # teacher: nearby states
    targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
    pos = torch.arange(n, device=device) % SEQ_LEN
    targets[pos < PROMPT_LEN] = IGNORE
    token_mask = (torch.rand(n, generator=gen) > 0.2).to(device)
    return dict(h=h, ht=ht, w=w, targets=targets, token_mask=token_mask)


# --------------------------------------------------------------------------- eager references
def _eager_ce(h, w, targets):
    return F.cross_entropy((h @ w.t()).float(), targets, ignore_index=IGNORE)


def _eager_dmk(h, w, ht, wt, token_mask):
    from unlearn_fast.ops.dual_masked_kl import dual_masked_kl

    with torch.no_grad():
        teacher = ht @ wt.t()
    return dual_masked_kl(h @ w.t(), teacher, token_mask, forget_token_ids=FORGET_IDS, backend="eager")


def _per_sequence(values: torch.Tensor, valid: torch.Tensor) -> List[torch.Tensor]:
    """The valid values of each SEQ_LEN-token sequence (the last one may be shorter: the
    CPU cases have N < SEQ_LEN)."""
    return [values[i:i + SEQ_LEN][valid[i:i + SEQ_LEN]] for i in range(0, values.shape[0], SEQ_LEN)]


def _min_k(scores: List[torch.Tensor]) -> torch.Tensor:
    """-mean of the lowest k% scores per sequence (a sort per sequence)."""
    out = []
    for s in scores:
        k = max(1, int(s.numel() * MINK))
        out.append(-torch.sort(s.float()).values[:k].mean())
    return torch.stack(out)


def _token_logprobs(h, w, targets):  # open-unlearning tokenwise_logprobs: one head pass
    logp = torch.log_softmax(h @ w.t(), dim=-1)
    return logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)


def _eager_mia(h, w, targets) -> Dict[str, torch.Tensor]:
    """Every attack on its own head pass, as open-unlearning's evaluators do."""
    valid = targets != IGNORE
    res = {}
    lp = _token_logprobs(h, w, targets)  # LOSS attack
    res["loss"] = torch.stack([-s.float().mean() for s in _per_sequence(lp, valid)])
    lp = _token_logprobs(h, w, targets)  # Min-K%
    res["min_k"] = _min_k(_per_sequence(lp, valid))
    logits = h @ w.t()  # Min-K%++: vocab log-probs ...
    vocab_logp = torch.log_softmax(logits, dim=-1)
    res["lse"] = torch.logsumexp(logits, dim=-1)  # (our extra stat, not an OU attack: no head pass of its own)
    del logits
    lp = _token_logprobs(h, w, targets)  # ... and token log-probs (a second pass)
    probs = vocab_logp.exp()
    mu = (probs * vocab_logp).sum(-1)
    sigma = (probs * vocab_logp.square()).sum(-1) - mu.square()
    res["min_k_pp"] = _min_k(_per_sequence((lp - mu) / sigma.clamp_min(1e-6).sqrt(), valid))
    res["entropy"] = -mu
    res["std_logp"] = sigma.clamp_min(0).sqrt()
    argmax = (h @ w.t()).argmax(-1)  # exact memorisation
    res["exact_mem"] = torch.stack([c.float().mean() for c in _per_sequence(argmax == targets, valid)])
    return res


def _eager_mia_1pass(h, w, targets) -> Dict[str, torch.Tensor]:
    """The same metrics from one logits tensor."""
    valid = targets != IGNORE
    logits = h @ w.t()
    vocab_logp = torch.log_softmax(logits, dim=-1)
    lp = vocab_logp.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1)
    probs = vocab_logp.exp()
    mu = (probs * vocab_logp).sum(-1)
    sigma = (probs * vocab_logp.square()).sum(-1) - mu.square()
    seq_lp = _per_sequence(lp, valid)
    return dict(loss=torch.stack([-s.float().mean() for s in seq_lp]), min_k=_min_k(seq_lp),
                min_k_pp=_min_k(_per_sequence((lp - mu) / sigma.clamp_min(1e-6).sqrt(), valid)), entropy=-mu,
                std_logp=sigma.clamp_min(0).sqrt(), lse=torch.logsumexp(logits, dim=-1),
                exact_mem=torch.stack([c.float().mean() for c in _per_sequence(logits.argmax(-1) == targets, valid)]))


def _fused_mia(h, w, targets, backend) -> Dict[str, torch.Tensor]:
    from unlearn_fast.ops.token_stats import token_stats

    valid = targets != IGNORE
    st = token_stats(h, w, targets, stats=ALL_STATS, backend=backend)
    lp = st["logprob"]
    seq_lp = _per_sequence(lp, valid)
    scores = (lp - st["mean_logp"]) / st["std_logp"].clamp_min(1e-3)
    return dict(loss=torch.stack([-s.mean() for s in seq_lp]), min_k=_min_k(seq_lp),
                min_k_pp=_min_k(_per_sequence(scores, valid)), entropy=st["entropy"], std_logp=st["std_logp"],
                lse=st["lse"], exact_mem=torch.stack([c.float().mean()
                                                      for c in _per_sequence(st["correct"], valid)]))


# --------------------------------------------------------------------------- one case
def _loss_fn(op: str, provider: str, compiled: Dict) -> Callable:
    """fn(x) -> loss (or the MIA dict) for one provider."""
    from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl
    from unlearn_fast.ops.losses import cross_entropy

    if op == "cross_entropy":
        if peers.is_peer(provider):
            peer = peers.linear_ce_fn(provider)
            return lambda x: peer(x["h"], x["w"], x["targets"])
        eager = lambda x: _eager_ce(x["h"], x["w"], x["targets"])  # noqa: E731
        fused = lambda x: cross_entropy(x["h"], x["w"], x["targets"], backend=provider)  # noqa: E731
    elif op == "fused_linear_dmk":
        eager = lambda x: _eager_dmk(x["h"], x["w"], x["ht"], x["wt"], x["token_mask"])  # noqa: E731
        fused = lambda x: fused_linear_dual_masked_kl(  # noqa: E731
            x["h"], x["w"], x["ht"], x["wt"], x["token_mask"], forget_token_ids=FORGET_IDS, backend=provider)
    else:
        if provider == "eager_1pass":
            return lambda x: _eager_mia_1pass(x["h"], x["w"], x["targets"])
        eager = lambda x: _eager_mia(x["h"], x["w"], x["targets"])  # noqa: E731
        fused = lambda x: _fused_mia(x["h"], x["w"], x["targets"], provider)  # noqa: E731
    if provider == "eager":
        return eager
    if provider == "compile":
        key = (op, "compile")
        if key not in compiled:
            compiled[key] = torch.compile(eager, dynamic=False)
        return compiled[key]
    return fused


def _gemm_rate(dtype, device, hdim, vocab, rows: int = 512) -> float:
    """FLOP/s of one (rows, H) x (H, V) head GEMM in ``dtype``: the better of the two
    orientations (hidden @ W^T and W @ hidden^T; the CPU chunk loops use the second, by
    vocabulary slabs, csrc/linear_chunk.h), best of 3 each."""
    a = torch.randn(rows, hdim, device=device).to(dtype)
    b = torch.randn(vocab, hdim, device=device).to(dtype)
    best = float("inf")
    for product in (lambda: a @ b.t(), lambda: b @ a.t()):
        for _ in range(3):
            synchronize(device)
            t0 = time.perf_counter()
            product()
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * rows * hdim * vocab / best


def _gemm_count(op: str, mode: str) -> int:
    """Head GEMMs the eager code needs (per token block): the floor of any implementation
    that forms the logits."""
    fwd = {"cross_entropy": 1, "fused_linear_dmk": 2, "token_stats_mia": 1}[op]
    if mode == "fwd":
        return fwd
    return fwd + 1 + (1 if mode == "fwd+bwd" else 0)


def run(args, recorder) -> None:
    device = bench_device(args)
    ops = _csv(getattr(args, "ops", None), OPS)
    on_cpu = device == "cpu"
    modes = _csv(getattr(args, "modes", None), MODES[:2] if args.quick else CPU_MODES if on_cpu else MODES)
    if args.quick:
        cases = QUICK_CASES
    else:
        full = CPU_CASES if on_cpu else CASES
        heads = _csv(getattr(args, "heads", None), dict.fromkeys(hd for hd, _ in full))
        unknown = [hd for hd in heads if hd not in HEADS]
        if unknown:
            raise ValueError(f"--heads: unknown {unknown}; choose from {sorted(HEADS)}")
        tokens = getattr(args, "tokens", None)
        if tokens:
            cases = [(hd, int(n)) for hd in heads for n in tokens.split(",")]
        else:
            cases = [(hd, n) for hd, n in full if hd in heads]
    reps = getattr(args, "reps", None) or (5 if args.quick else 3)
    dtypes = bench_dtypes(args, default=("float32",) if args.quick or on_cpu else ("float32", "bfloat16"))
    gen = torch.Generator().manual_seed(0)
    compiled: Dict = {}
    for head, n in cases:
        hdim, vocab = HEADS[head]
        for dtype in dtypes:
            rows = min(512, n)  # the CPU cases' 64 tokens: a 512-row probe would cost more than the case
            rate = _gemm_rate(dtype, device, hdim, vocab, rows)
            recorder.add("gemm", "aten", "fwd", shape_str(M=rows, H=hdim, V=vocab), dtype_str(dtype), device,
                         "gemm_flops_per_s", rate)
            x = _inputs(head, n, dtype, device, gen)
            shape = shape_str(N=n, H=hdim, V=vocab)
            for op in ops:
                providers = bench_providers(args, "token_stats" if op != "fused_linear_dmk" else
                                            "fused_linear_dual_masked_kl", device)
                if (args.quick or on_cpu) and not getattr(args, "backends", None):
                    providers = [p for p in providers if p != "compile"]
                if op == "token_stats_mia":
                    providers = providers[:1] + ["eager_1pass"] + providers[1:]
                providers += peers.bench_peers(args, op, device)  # cross_entropy on CUDA: Liger, CCE
                for mode in modes:
                    if op == "token_stats_mia" and mode != "fwd":
                        continue  # the MIA extras carry no gradient
                    _run_case(recorder, op, mode, providers, x, shape, dtype, device, reps, compiled,
                              floor=_gemm_count(op, mode) * 2 * n * hdim * vocab / rate)
            del x
            gc.collect()


def _run_case(recorder, op, mode, providers, x, shape, dtype, device, reps, compiled, floor) -> None:
    trainable = mode == "fwd+bwd"
    w = x["w"].detach().requires_grad_(trainable)
    # fused_linear_dmk: a trainable student head has a separate frozen teacher head; a
    # frozen one is shared by student and teacher (LoRA)
    wt = x["w"].detach().clone() if trainable else w
    h = x["h"].detach().requires_grad_(mode != "fwd")
    inputs = dict(x, h=h, w=w, wt=wt)
    grad_bytes = (h.numel() * h.element_size() + (w.numel() * w.element_size() if trainable else 0)
                  if mode != "fwd" else 0)
    eager_med = eager_peak = eager_full_peak = None
    for provider in providers:
        try:
            fn = _loss_fn(op, provider, compiled)
        except Exception as exc:  # a peer's API changed: record and go on
            print(f"  {op} {provider} unavailable: {type(exc).__name__}: {exc}")
            continue
        cpu_times: List[float] = []

        def step():
            c0 = time.process_time()
            if mode == "fwd":
                with torch.no_grad():
                    out = fn(inputs)
            else:
                out = torch.autograd.grad(fn(inputs), [h, w] if trainable else [h])
            synchronize(device)
            cpu_times.append(time.process_time() - c0)
            return out

        try:
            if provider in LOGITS_MATERIALISING:
                n, vocab = h.shape[0], w.shape[0]
                check_fits_in_memory(EAGER_LOGITS_COPIES[op, mode] * n * vocab * 4 + grad_bytes, device,
                                     f"{op} {provider} {mode} at N={n}, V={vocab}")
            times = time_fn(step, device, warmup=1, reps=reps, max_seconds=120.0)
            cpu_times = cpu_times[1:1 + len(times)]  # the timed calls: no warm-up, no memory call
            peak = peak_memory(step, device)
        except Exception as exc:  # e.g. out of memory: record and go on
            recorder.failure(op, provider, mode, shape, dtype_str(dtype), device, exc)
            continue
        beyond = max(0, peak - grad_bytes)
        med = recorder.add_timing(op, provider, mode, shape, dtype_str(dtype), device, times, peak_bytes=peak,
                                  eager_median=eager_med, eager_peak=eager_full_peak, floor_seconds=floor)
        recorder.add(op, provider, mode, shape, dtype_str(dtype), device, "peak_mem_beyond_grad_bytes", beyond)
        # CPU seconds of this process (all threads): steadier than wall time on a shared machine
        recorder.add(op, provider, mode, shape, dtype_str(dtype), device, "cpu_time_median_s",
                     statistics.median(cpu_times))
        if eager_peak:  # (mem_ratio_to_eager, as in every suite, compares the whole peaks)
            recorder.add(op, provider, mode, shape, dtype_str(dtype), device, "mem_beyond_grad_ratio_to_eager",
                         beyond / eager_peak)
        if provider == "eager":
            eager_med, eager_peak, eager_full_peak = med, beyond, peak
        gc.collect()
