"""Benchmark: end-to-end unlearning steps on a LLaVA-architecture model with the real head
and embedding shapes of LLaVA-1.5-7B (H = 4096, V = 32000) and Qwen2-VL-7B (H = 3584,
V = 151936) but two decoder layers, so it fits a 24 GiB CPU machine: one optimiser step of
SIU (LoRA, CE + dual masked KL), NPO (sequence log-ratios + CE) and GA+KL, with every loss
on the eager backend (full logits: the papers' code) vs the fused backend, measured side
by side: step time, trained tokens per second and peak memory.  Provider "auto" is the
default a user gets (backend="auto": each op routes its own inputs); "cpp"/"cuda"/"triton"
force that backend on every op.

NPO and GA+KL fine-tune every weight at the LLaVA shape; at the Qwen shape they train LoRA
adapters (r = 8) like SIU: full fine-tuning of its 1.1 B embedding and head weights with
AdamW and a frozen reference copy needs ~27 GB.  The model has random weights (speed and
memory do not depend on them); batches are the built-in task's rows.
"""
from __future__ import annotations

import gc

import torch

from unlearn_fast.bench.common import bench_device, shape_str
from unlearn_fast.bench.harness import peak_memory, time_fn

DESCRIPTION = "end-to-end unlearning step (SIU, NPO, GA+KL) on a wide-vocabulary LLaVA: eager vs fused losses"
# head name -> shape; "lora": rank forced on every method (0: each method's preset)
HEADS = {"llava": dict(V=32000, H=4096, B=8, lora=0), "qwen2vl": dict(V=151936, H=3584, B=4, lora=8)}
QUICK_SHAPES = [dict(V=8192, H=64, B=4, lora=0)]
METHODS = ("siu", "npo", "ga_kl")


def add_arguments(parser) -> None:
    parser.add_argument("--e2e-heads", default="llava,qwen2vl",
                        help="comma-separated head shapes for the e2e suite: llava (H=4096, V=32000), "
                             "qwen2vl (H=3584, V=151936)")
    parser.add_argument("--e2e-methods", default=",".join(METHODS),
                        help=f"comma-separated methods for the e2e suite (default {','.join(METHODS)})")


def auto_provider(op, shape, dtype, device):
    """The e2e rows of provider "auto" run every loss with backend="auto" (each op's own
    routing, e.g. NPO's per-token log-probs with a trainable head on the CPU go eager)."""
    return "auto" if op.startswith("e2e_") else None


def fused_providers(device: str):
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401

    out = []
    for name in ("cpp", "cuda", "triton"):
        if device == "cpu" and name == "triton":
            continue
        try:
            backends.resolve("token_stats", name, device)
            out.append(name)
        except Exception:
            pass
    return out


def make_step(method_name: str, model, tokenizer, task, backend: str, batch_size: int, lora: int = 0):
    """A callable running one full optimiser step (forward, losses, backward, AdamW)."""
    from unlearn_fast.methods.runner import build_lm_method
    from unlearn_fast.methods.trainer import TrainConfig, Trainer

    overrides = {"batch_size": batch_size, **({"lora": lora} if lora else {})}
    method, m, ctx, hp = build_lm_method(method_name, model, tokenizer, task, "seven", backend=backend,
                                         overrides=overrides)
    trainer = Trainer(m, TrainConfig(steps=10 ** 6, lr=1e-5, progress=False))
    method.prepare(trainer)
    # every step reuses batch 0 of each stream (collated once, cached on the device): the
    # step, not the data pipeline, is timed

    def step():
        trainer.update(lambda i: method.losses(0))

    return step, m


class TrainedTokenCounter:
    """Counts the attended tokens of the forwards of ``module`` (the model without its head,
    which the losses call) that build a graph -- the trained ones; reference forwards run
    under no_grad -- for tokens per second."""

    def __init__(self, module):
        self.count = 0
        self._handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if torch.is_grad_enabled() and mask is not None:
            self.count += int(mask.sum())

    def close(self):
        self._handle.remove()


def run(args, recorder) -> None:
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.data import load_builtin_task
    from unlearn_fast.models.adapters import get_adapter
    from unlearn_fast.models.builtin import builtin_tokenizer, tiny_llava_config

    device = bench_device(args)
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        names = [n for n in getattr(args, "e2e_heads", "llava,qwen2vl").split(",") if n]
        unknown = [n for n in names if n not in HEADS]
        if unknown:
            raise ValueError(f"--e2e-heads: unknown {unknown}; choose from {sorted(HEADS)}")
        shapes = [HEADS[n] for n in names]
    methods = [m for m in getattr(args, "e2e_methods", ",".join(METHODS)).split(",") if m]
    if [m for m in methods if m not in METHODS]:
        raise ValueError(f"--e2e-methods: unknown {[m for m in methods if m not in METHODS]}; choose from {METHODS}")
    reps = 3
    threads = torch.get_num_threads()  # bench --threads (one with --quick on the CPU)
    task = load_builtin_task()
    tok = builtin_tokenizer(task)
    # "auto": what a user's run gets by default (each op routed on its own inputs)
    providers = ["eager"] + fused_providers(device) + ["auto"]
    wanted = args.backends.split(",") if getattr(args, "backends", None) else None
    if wanted:
        providers = [p for p in providers if p in wanted or p == "eager"]
    for sh in shapes:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(tiny_llava_config(tok, text_hidden=sh["H"], text_layers=2,
                                                                vocab_size=sh["V"])).to(device).eval()
        dims = dict(V=sh["V"], H=sh["H"], B=sh["B"], **({"lora": sh["lora"]} if sh["lora"] else {}))
        shape = shape_str(**dims, threads=threads) if device == "cpu" else shape_str(**dims)
        for name in methods:
            eager_med = eager_peak = None
            for provider in providers:
                try:
                    step, trained = make_step(name, model, tok, task, provider, sh["B"], sh["lora"])
                    counter = TrainedTokenCounter(get_adapter(trained).base_model(trained))
                    step()  # warm-up, and the number of trained tokens in one step
                    tokens = counter.count
                    counter.close()
                    times = time_fn(step, device, warmup=0, reps=reps, max_seconds=60)
                    peak = peak_memory(step, device)
                except Exception as exc:  # e.g. out of memory: record and go on
                    recorder.failure(f"e2e_{name}", provider, "step", shape, "float32", device, exc)
                    step = trained = None  # free the failed copy before the next one
                    gc.collect()
                    continue
                med = recorder.add_timing(f"e2e_{name}", provider, "step", shape, "float32", device, times,
                                          peak_bytes=peak, eager_median=eager_med, eager_peak=eager_peak)
                recorder.add(f"e2e_{name}", provider, "step", shape, "float32", device, "tokens_per_s", tokens / med)
                if provider == "eager":
                    eager_med, eager_peak = med, peak
                del step, trained
                gc.collect()
        del model
        gc.collect()
