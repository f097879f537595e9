"""Benchmark: the evaluation metric suite of one evaluation set.

Providers (op "eval_scores", mode "fwd"):
  per_metric_eager  open-unlearning style: probability, LOSS, ZLib, Min-K%, Min-K%++ and
                    exact memorisation, each with its own forward pass over the set and
                    full (B, T, V) logits + log_softmax (softmax too for Min-K%++);
                    the baseline of ``ratio_to_eager``
  one_pass_eager    ``sequence_scores(backend="eager")``: every score from one body pass,
                    the head and log_softmax on the answer positions only (eager math)
  fused             ``sequence_scores()``: one body pass, the fused token-statistics
                    kernel on the answer positions (no tokens x vocab tensor)
and (op "generation") batched greedy decoding vs one prompt at a time.

Models: the built-in tiny LLaVA (trained once and cached; ``--quick`` uses the same
architecture with random weights) and a wide-vocabulary variant (V = 151,936, Qwen2-VL's
vocabulary, random weights: a tiny model with a big head, where the head dominates).
Rows also carry ``max_rel_diff`` (fused vs per-metric eager scores, Min-K%++ apart: see run) as a sanity check.

On the CPU every provider runs with ONE intra-op thread (``threads=1`` in the shape):
the models are tiny (hidden size 64), so OpenMP barriers cost more than the work, and on
a shared 2-core machine two threads were 10-30x slower for every provider (measured).
"""
from __future__ import annotations

import gc
from typing import List

import torch

from unlearn_fast.bench.common import bench_device, bench_dtypes, dtype_str, shape_str
from unlearn_fast.bench.harness import peak_memory, tensor_peak_memory, time_fn

DESCRIPTION = "evaluation metrics: one fused pass per set vs one eager pass per metric; batched generation"
WIDE_VOCAB = 151936
OPEN_UNLEARNING_METRICS = ("probability", "loss", "zlib", "min_k", "min_k_plus_plus", "exact_memorization")
CONCEPT = "seven"


def auto_provider(op, shape, dtype, device):
    """sequence_scores() with its default backend is the "fused" provider (summary.md);
    generation has no backend choice."""
    return "fused" if op == "eval_scores" else None


def _examples(task, n: int) -> List:
    """n VQA rows around the concept: its trained-on and held-out images, then others."""
    rows = task.forget_set(CONCEPT, kind="vqa") + task.holdout_set(CONCEPT, kind="vqa") + \
        task.retain_set(CONCEPT, kind="vqa")
    return rows[:n]


def _models(quick: bool):
    """[(name, model, tokenizer, task)]: the built-in LLaVA and the wide-head variant."""
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.data import load_builtin_task
    from unlearn_fast.models.builtin import builtin_tokenizer, tiny_llava_config

    out = []
    if quick:
        task = load_builtin_task()
        tok = builtin_tokenizer(task)
        torch.manual_seed(0)
        out.append(("builtin-arch-random", LlavaForConditionalGeneration(tiny_llava_config(tok)).eval(), tok, task))
    else:
        from unlearn_fast.models import load_builtin_llava

        model, tok, task = load_builtin_llava()
        out.append(("builtin", model.eval(), tok, task))
    cfg = tiny_llava_config(tok)
    cfg.text_config.vocab_size = WIDE_VOCAB
    torch.manual_seed(0)
    out.append((f"wide-head-V{WIDE_VOCAB}", LlavaForConditionalGeneration(cfg).eval(), tok, task))
    return out


def _providers(model, adapter, tok, rows, batch_size):
    from unlearn_fast.metrics import reference, sequence_scores

    return {
        "per_metric_eager": lambda: reference.per_metric_scores(model, adapter, rows, tokenizer=tok,
                                                                batch_size=batch_size,
                                                                metrics=OPEN_UNLEARNING_METRICS),
        "one_pass_eager": lambda: sequence_scores(model, adapter, rows, tokenizer=tok, batch_size=batch_size,
                                                  backend="eager", shard=False),
        "fused": lambda: sequence_scores(model, adapter, rows, tokenizer=tok, batch_size=batch_size, shard=False),
    }


def _max_rel_diff(a: dict, b: dict, names) -> float:
    worst = 0.0
    for name in names:
        x, y = a[name].double(), b[name].double()
        worst = max(worst, float(((x - y).abs() / y.abs().clamp(min=1e-6)).max()))
    return worst


def run(args, recorder) -> None:
    device = bench_device(args)
    old = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(1)
    try:
        _run(args, recorder, device)
    finally:
        torch.set_num_threads(old)


def _run(args, recorder, device) -> None:
    from unlearn_fast.metrics import generate_answers
    from unlearn_fast.models import get_adapter

    quick = bool(getattr(args, "quick", False))
    reps = 2 if quick else 3
    gen_rows, gen_tokens = (4, 6) if quick else (16, 16)
    wanted = args.backends.split(",") if getattr(args, "backends", None) else None
    for name, model, tok, task in _models(quick):
        # the per-metric eager baseline is slow at V = 151,936 (~1 s per row on one loaded core)
        wide = name.startswith("wide")
        n_rows, batch_size = ((2, 2) if wide else (8, 8)) if quick else ((16, 16) if wide else (64, 16))
        for dtype in bench_dtypes(args, default=("float32",)):
            model = model.to(device=device, dtype=dtype)
            adapter = get_adapter(model)
            rows = _examples(task, n_rows)
            vocab = adapter.lm_head(model)[0].shape[0]
            batch = adapter.collate(rows[:batch_size], tok)
            shape = shape_str(model=name, N=len(rows), B=batch_size, T=batch["input_ids"].shape[1], V=vocab,
                              threads=torch.get_num_threads())
            ds = dtype_str(dtype)
            eager_med = eager_peak = eager_tensor_peak = eager_out = None
            for provider, fn in _providers(model, adapter, tok, rows, batch_size).items():
                if wanted is not None and provider not in wanted and provider != "per_metric_eager":
                    continue
                try:
                    out = fn()
                    times = time_fn(fn, device, warmup=0, reps=reps)
                    peak = peak_memory(fn, device)
                    # on the CPU also the tensor-level peak: the RSS reading of these few-MiB
                    # passes is largely malloc and Python overhead (harness.tensor_peak_memory)
                    tensor_peak = tensor_peak_memory(fn, device) if device == "cpu" else None
                except Exception as exc:  # e.g. out of memory: record and go on
                    recorder.failure("eval_scores", provider, "fwd", shape, ds, device, exc)
                    continue
                med = recorder.add_timing("eval_scores", provider, "fwd", shape, ds, device, times, peak_bytes=peak,
                                          eager_median=eager_med, eager_peak=eager_peak,
                                          tensor_peak_bytes=tensor_peak, eager_tensor_peak=eager_tensor_peak)
                recorder.add("eval_scores", provider, "fwd", shape, ds, device, "examples_per_s", len(rows) / med)
                if provider == "per_metric_eager":
                    eager_med, eager_peak, eager_tensor_peak, eager_out = med, peak, tensor_peak, out
                elif eager_out is not None:
                    # Min-K%++ apart: the eager formula sigma^2 = E[(log p)^2] - mu^2 (open-unlearning's,
                    # from the Min-K%++ code) cancels catastrophically in float32 at a wide vocabulary
                    # (~4e-3 relative error against float64 measured at V = 151,936, fused: ~8e-5)
                    others = [m for m in OPEN_UNLEARNING_METRICS if m != "min_k_plus_plus"]
                    recorder.add("eval_scores", provider, "fwd", shape, ds, device, "max_rel_diff",
                                 _max_rel_diff(out, eager_out, others))
                    recorder.add("eval_scores", provider, "fwd", shape, ds, device, "max_rel_diff_min_k_plus_plus",
                                 _max_rel_diff(out, eager_out, ["min_k_plus_plus"]))
                del out
                gc.collect()
            # generation: batched (left padding, KV cache) vs one prompt at a time
            if name.startswith("builtin"):
                prompts = rows[:gen_rows]
                gshape = shape_str(model=name, prompts=len(prompts), new_tokens=gen_tokens,
                                   threads=torch.get_num_threads())
                base = None
                for provider, bs in (("one_by_one", 1), ("batched_greedy", len(prompts))):
                    def gen(bs=bs):
                        return generate_answers(model, adapter, prompts, tokenizer=tok, batch_size=bs,
                                                max_new_tokens=gen_tokens, shard=False, progress_bar=False)
                    times = time_fn(gen, device, warmup=1, reps=reps)
                    med = recorder.add_timing("generation", provider, "greedy", gshape, ds, device, times,
                                              eager_median=base)
                    if base is None:
                        base = med
            gc.collect()
