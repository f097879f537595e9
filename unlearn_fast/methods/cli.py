"""``unlearn-fast run``: unlearning methods end to end.

    unlearn-fast run --method siu|mmunlearner|multidelete|ga|ga_kl|graddiff|kl_min|npo|po|all
                     --model builtin|PATH --data builtin|PATH.jsonl --concept NAME
                     [--backend auto|eager|cpp|triton|cuda] [--steps N] --out DIR
                     [--set key=value ...] [--lora R] [--seed S] [--device cpu|cuda]

For each method: train on a private copy of the model (the input model is never
written), evaluate (``unlearn_fast.metrics.evaluate_task`` / ``evaluate_pairs``), time a
few steps with the fused backend and with eager in the same run, and write

    DIR/run.json               the run's settings (a rerun with other settings refuses DIR)
    DIR/base.json              the original model's evaluation (the "before" row)
    DIR/<method>/log.jsonl     every loss term of every step
    DIR/<method>/checkpoint/   the latest checkpoint (an interrupted run resumes from it)
    DIR/<method>/result.json   the method's row once it is finished (a rerun reuses it)
    DIR/results.json           one object per method (+ "base"), percentages 0-100
    DIR/results.png            the plot

MultiDelete runs on CLIP (the built-in CLIP for ``--model builtin``) or, with a LLaVA /
Qwen2-VL folder or ``--set multidelete.arch=llava``, on the decoder model with the last
token's hidden state as the fused representation (``methods.multidelete_llava``).

Everything is validated before DIR is touched; files are written atomically.  Under
``torchrun`` / ``accelerate launch`` every rank trains on its share of each batch
(gradients averaged, the losses' means taken over the global batch) and evaluates its
share of the rows; rank 0 writes the files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional

from unlearn_fast.methods.runner import ALL_METHODS

LM_KEYS = ("efficacy", "generality", "specificity", "text_retention", "fluency", "diversity", "mia_auc")
PAIR_KEYS = ("pair_auc", "retained_retrieval")
SETTINGS_KEYS = ("model", "data", "concept", "backend", "seed", "steps", "set", "lora", "mixed_precision",
                 "eval_max_examples", "max_new_tokens")


class RunError(Exception):
    """Bad input: printed as one clear line, exit status 2."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=list(ALL_METHODS) + ["all"],
                   help="the unlearning method, or 'all' to compare every method on one concept")
    p.add_argument("--model", default="builtin",
                   help="'builtin' (the cached tiny LLaVA / CLIP trained on the digits task) or a save_pretrained "
                        "folder of a LlavaForConditionalGeneration, Qwen2-VL or CLIPModel (never written to)")
    p.add_argument("--data", default="builtin",
                   help="'builtin' (digits) or a JSONL dataset (see unlearn_fast.data.jsonl)")
    p.add_argument("--concept", default=None, help="the concept to forget (default for the built-in data: seven)")
    p.add_argument("--backend", default="auto", choices=["auto", "eager", "cpp", "triton", "cuda"],
                   help="backend of the fused losses ('eager' = the logits-materialising baseline)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (default: each method's preset)")
    p.add_argument("--out", required=True, help="output folder (created; an interrupted run in it resumes)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="hyperparameter override, e.g. lr=1e-3 or siu.preset=reference (repeatable); "
                        "multidelete.arch=clip|llava|auto picks MultiDelete's model: auto (default) = the built-in "
                        "CLIP for --model builtin, else the --model folder's class; llava = on the LLaVA (the "
                        "last token's hidden state as the fused representation)")
    p.add_argument("--lora", type=int, default=None,
                   help="LoRA rank for the language-model methods and MultiDelete on LLaVA (0: full fine-tuning; "
                        "default: each method's preset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data order, LoRA init and sampling (default 0)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:K (default: cuda when available; under torchrun, cuda is cuda:$LOCAL_RANK)")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                   help="bf16: autocast the training and throughput steps (default: no)")
    p.add_argument("--eval-max-examples", type=int, default=200,
                   help="rows per evaluation set (evenly subsampled; 0: all; default 200)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="greedy answer length limit in the evaluation (default 24)")
    p.add_argument("--throughput-steps", type=int, default=3,
                   help="steps timed with the fused backend and with eager (0: skip; default 3)")
    p.add_argument("--checkpoint-every", type=int, default=10,
                   help="checkpoint period in steps (0: none; default 10); a run shorter than one period writes none")
    p.add_argument("--save-model", action="store_true", help="also save each unlearned model to DIR/<method>/model")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice; 1 is much faster for the tiny built-in "
                        "models on a busy machine)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun / accelerate launch: shard the model (and a separate frozen reference) with "
                        "FSDP2 instead of replicating it (every language-model method, not multidelete): sharded "
                        "checkpoints (torch.distributed.checkpoint), evaluation on the sharded model, --save-model "
                        "gathers the weights to rank 0 only")
    p.add_argument("--restart", action="store_true", help="discard earlier results in DIR instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------------------
# validation (before anything is written)
# --------------------------------------------------------------------------------------
def _parse_sets(items: List[str]) -> Dict[str, Dict[str, object]]:
    """{"*": {...}, "siu": {...}}: overrides for every method / for one method."""
    out: Dict[str, Dict[str, object]] = {}
    for item in items:
        if "=" not in item:
            raise RunError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        scope, _, name = key.rpartition(".")
        scope = scope or "*"
        if scope != "*" and scope not in ALL_METHODS:
            raise RunError(f"--set {item!r}: unknown method {scope!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string (e.g. preset=reference)
        out.setdefault(scope, {})[name] = parsed
    return out


def _overrides(method: str, sets, args) -> Dict[str, object]:
    from unlearn_fast.methods.runner import method_defaults

    ov = {**sets.get("*", {}), **sets.get(method, {})}
    if args.lora is not None and method != "multidelete":
        ov["lora"] = args.lora
    if args.steps is not None:
        ov["steps"] = args.steps
    known = method_defaults(method)
    unknown = sorted(set(ov) - set(known))
    if unknown and method in sets and set(unknown) & set(sets[method]):
        raise RunError(f"--set: {method} has no hyperparameter(s) {unknown}; known: {', '.join(sorted(known))}")
    # a global --set key only applies to the methods that have it
    return {k: v for k, v in ov.items() if k in known}


def _check_paths(args) -> None:
    if args.model != "builtin":
        if not os.path.isdir(args.model):
            raise RunError(f"--model {args.model!r}: no such folder (expected 'builtin' or a save_pretrained folder)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise RunError(f"--model {args.model!r}: no config.json in it (expected a save_pretrained folder)")
        out, model = os.path.realpath(args.out), os.path.realpath(args.model)
        if out == model or out.startswith(model + os.sep) or model.startswith(out + os.sep):
            raise RunError(f"--out {args.out!r} overlaps the input model folder {args.model!r}; the input model is "
                           f"never written to: choose another --out")
    if args.data != "builtin" and not os.path.isfile(args.data):
        raise RunError(f"--data {args.data!r}: no such file (expected 'builtin' or a .jsonl dataset)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise RunError(f"--out {args.out!r} exists and is not a folder")
    if getattr(args, "fsdp", False) and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise RunError("--fsdp shards the model across processes: run under torchrun / accelerate launch with 2 or "
                       "more processes")
    for flag, value, least in (("--steps", args.steps, 1), ("--eval-max-examples", args.eval_max_examples, 0),
                               ("--max-new-tokens", args.max_new_tokens, 1),
                               ("--throughput-steps", args.throughput_steps, 0),
                               ("--checkpoint-every", args.checkpoint_every, 0), ("--threads", args.threads, 1),
                               ("--lora", args.lora, 0)):
        if value is not None and value < least:
            raise RunError(f"{flag} must be >= {least}, got {value}")


def load_model(spec: str, want: str, device: str):
    """(model, tokenizer, task or None) for 'builtin' (want: 'lm' or 'clip') or a folder."""
    from unlearn_fast.models.adapters import UnsupportedModelError, get_adapter

    if spec == "builtin":
        from unlearn_fast.models import load_builtin_clip, load_builtin_llava

        model, tok, task = (load_builtin_clip if want == "clip" else load_builtin_llava)()
        return model.to(device), tok, task
    import transformers

    with open(os.path.join(spec, "config.json")) as f:
        cfg = json.load(f)
    classes = {"llava": "LlavaForConditionalGeneration", "qwen2_vl": "Qwen2VLForConditionalGeneration",
               "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "clip": "CLIPModel"}
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    if mtype not in classes:
        raise UnsupportedModelError(f"--model {spec!r}: model_type {mtype!r} is not supported "
                                    f"(supported: {', '.join(classes)})")
    if mtype != "clip" and archs and not any(a.endswith(("ForConditionalGeneration", "ForCausalLM")) for a in archs):
        raise UnsupportedModelError(f"--model {spec!r} is a {archs[0]}, which has no lm_head; the language-model "
                                    f"methods need e.g. {classes[mtype]}")
    cls = getattr(transformers, classes[mtype])
    model, info = cls.from_pretrained(spec, output_loading_info=True)
    if mtype != "clip" and any("lm_head" in k for k in info.get("missing_keys", [])):
        raise UnsupportedModelError(f"--model {spec!r}: the checkpoint has no lm_head weights")
    tok = transformers.AutoTokenizer.from_pretrained(spec)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # only pads; labels and masks ignore padding
    get_adapter(model)
    model.eval()
    return model.to(device), tok, None


# --------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------
def _write_json(path: str, obj) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        json.dump(_clean(obj), f, indent=1)
    os.replace(tmp, path)


def _clean(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def resolve_device(requested: Optional[str], cuda_devices: int, env=os.environ) -> str:
    """--device (cpu, cuda or cuda:K; default cuda when there is one).  Under torchrun /
    accelerate launch a bare "cuda" is this process's GPU, cuda:$LOCAL_RANK: left as
    "cuda", every rank of a node would train on cuda:0."""
    device = requested or ("cuda" if cuda_devices > 0 else "cpu")
    if device not in ("cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise RunError(f"--device must be cpu, cuda or cuda:K, got {device!r}")
    if device == "cpu":
        return device
    if cuda_devices == 0:
        raise RunError(f"--device {device}: no CUDA GPU is available")
    if device == "cuda" and int(env.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
    if device.startswith("cuda:") and int(device[5:]) >= cuda_devices:
        raise RunError(f"--device {device}: this machine has {cuda_devices} CUDA GPU(s)"
                       + (" (is --nproc-per-node above the GPU count?)" if "LOCAL_RANK" in env else ""))
    return device


def _init_distributed(device: str):
    """(rank, world size, whether this call created the process group)."""
    import torch

    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        created = True
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), created
    return 0, 1, created


def _end_distributed() -> None:
    """Tear down the process group this run created, while the interpreter is fully alive:
    models still holding it (FSDP modules in reference cycles) are collected first, so no
    communication thread is left to meet interpreter shutdown."""
    import gc

    import torch

    gc.collect()
    torch.distributed.destroy_process_group()


def main(args) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        try:
            plan = _prepare(args)
        except (RunError, ValueError, TypeError, FileNotFoundError) as exc:
            # bad input: one clear line, nothing written
            print(f"unlearn-fast run: error: {exc}", file=sys.stderr)
            return 2
        return _execute(args, plan)
    finally:
        torch.set_num_threads(threads)  # --threads applies to this run only


def _prepare(args) -> dict:
    """Validate every input and load the models; raises before anything is written."""
    import torch

    from unlearn_fast.data import load_task
    from unlearn_fast.methods.methods import check_hyperparameters, check_method_data
    from unlearn_fast.methods.multidelete import check_pair_data
    from unlearn_fast.methods.runner import method_defaults

    _check_paths(args)
    sets = _parse_sets(args.set)
    methods = list(ALL_METHODS) if args.method == "all" else [args.method]
    overrides = {m: _overrides(m, sets, args) for m in methods}
    for m in methods:  # values too (types, ranges, choices), before anything is loaded or written
        check_hyperparameters(m, {**method_defaults(m), **overrides[m]})
    unsharded = [m for m in methods if m == "multidelete"]
    if getattr(args, "fsdp", False) and unsharded:
        raise RunError(f"--fsdp: {', '.join(unsharded)} do(es) not run sharded yet (leave out --fsdp for DDP, or "
                       f"pick another --method)")
    for key in sets.get("*", {}):
        if not any(key in overrides[m] for m in methods):
            raise RunError(f"--set {key}=...: no selected method has a hyperparameter {key!r}")
    device = resolve_device(args.device, torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if device.startswith("cuda:"):
        torch.cuda.set_device(device)  # NCCL and bare .cuda() calls use the current device
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task(args.data) if args.data != "builtin" else None  # validates user data now
    if args.concept is None and args.data != "builtin":
        raise RunError("--concept is required with --data PATH")
    if task is not None:
        task.concept(args.concept)  # a clear error listing the concepts, before loading models

    # MultiDelete's model: "clip" or "llava" (the decoder VLM the other methods use)
    md_arch = str(overrides["multidelete"].get("arch", "auto")) if "multidelete" in methods else None
    if md_arch not in (None, "auto", "clip", "llava"):
        raise RunError(f"--set multidelete.arch={md_arch}: expected auto, clip or llava")
    lm = clip = None
    if args.model == "builtin":
        md_arch = "clip" if md_arch == "auto" else md_arch
        if any(m != "multidelete" for m in methods) or md_arch == "llava":
            lm = load_model("builtin", "lm", device)
        if md_arch == "clip":
            clip = load_model("builtin", "clip", device)
    else:
        from unlearn_fast.models.adapters import CLIPAdapter, get_adapter

        loaded = load_model(args.model, "any", device)
        if isinstance(get_adapter(loaded[0]), CLIPAdapter):
            clip = loaded
            if args.method != "all" and args.method != "multidelete":
                raise RunError(f"--method {args.method} needs a vision-language model with an lm_head; "
                               f"--model {args.model!r} is a CLIPModel (use --method multidelete)")
            if md_arch == "llava":
                raise RunError(f"--set multidelete.arch=llava, but --model {args.model!r} is a CLIPModel")
            methods = [m for m in methods if m == "multidelete"]
            md_arch = "clip" if md_arch else None
        else:
            lm = loaded
            if md_arch == "clip":
                raise RunError(f"--set multidelete.arch=clip, but --model {args.model!r} is "
                               f"{type(loaded[0]).__name__} (MultiDelete runs on it with arch=llava or auto)")
            md_arch = "llava" if md_arch else None
    if md_arch == "llava" and args.lora is not None:
        overrides["multidelete"]["lora"] = args.lora
    if task is None:  # --data builtin: the built-in model's task, or for a model folder the built-in task
        task = (lm or clip)[2] or load_task("builtin")
    concept = task.concept(args.concept or "seven").name
    for m in methods:  # the rows each method trains on, before any model is copied
        if m == "multidelete":
            check_pair_data(task, concept)
        else:
            check_method_data(m, task, concept, args.seed)
    settings = {k: getattr(args, k) for k in SETTINGS_KEYS}
    settings["concept"] = concept
    run_file = os.path.join(args.out, "run.json")
    if os.path.exists(run_file) and not args.restart:
        prev = _read_json(run_file)
        diff = sorted(k for k in SETTINGS_KEYS if prev.get("settings", {}).get(k) != _clean(settings).get(k))
        if diff:
            raise RunError(f"--out {args.out!r} holds a run with other settings ({', '.join(diff)} differ); "
                           f"use another --out or --restart")
    if args.save_model and not args.restart:  # a finished method is reused, not trained again
        for m in methods:
            mdir = os.path.join(args.out, m)
            if os.path.exists(os.path.join(mdir, "result.json")) and not os.path.isdir(os.path.join(mdir, "model")):
                raise RunError(f"--save-model: {m} finished earlier in {args.out!r} without --save-model and its "
                               f"weights were not kept; use --restart (or another --out) to train it again")
    return dict(methods=methods, overrides=overrides, device=device, task=task, concept=concept, lm=lm, clip=clip,
                settings=settings, md_arch=md_arch)


def _execute(args, plan) -> int:
    rank, world, created_group = _init_distributed(plan["device"])
    try:
        return _execute_ranks(args, plan, rank, world)
    finally:
        if created_group:
            _end_distributed()


def _execute_ranks(args, plan, rank: int, world: int) -> int:
    methods, task, concept, device = plan["methods"], plan["task"], plan["concept"], plan["device"]
    lm, clip = plan["lm"], plan["clip"]
    out = args.out
    if rank == 0:
        if args.restart and os.path.isdir(out):
            import shutil

            for name in list(ALL_METHODS) + ["base.json", "results.json", "results.png", "run.json"]:
                path = os.path.join(out, name)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                elif os.path.exists(path):
                    os.remove(path)
        os.makedirs(out, exist_ok=True)
        _write_json(os.path.join(out, "run.json"), {"settings": plan["settings"], "methods": methods})
    if world > 1:  # the other ranks look at the folder only after rank 0 has cleaned it (--restart)
        import torch.distributed as dist

        dist.barrier()

    rows: Dict[str, dict] = {}
    md_on_lm = plan["md_arch"] == "llava"
    base_rows = _base_rows(args, out, task, concept, lm if any(m != "multidelete" for m in methods) else None,
                           clip, rank, lm_pairs=lm if md_on_lm else None)
    for m in methods:
        loaded = clip if m == "multidelete" and not md_on_lm else lm
        rows[m] = _run_one(m, args, out, task, concept, loaded, plan["overrides"][m], base_rows, rank, device)
    if rank == 0:
        results = {"concept": concept, "data": args.data, "model": args.model, "backend": args.backend,
                   "base": base_rows, "methods": [rows[m] for m in methods]}
        _write_json(os.path.join(out, "results.json"), results)
        plot = _plot(out, rows, base_rows)
        print(format_results(rows, base_rows, concept))
        print(f"wrote {os.path.join(out, 'results.json')}" + (f" and {plot}" if plot else ""))
    return 0


def _evaluate(model, tokenizer, task, concept, args, reference=None, pairs: bool = False) -> dict:
    """The language-model metrics, or MultiDelete's pair metrics (CLIP always; a LLaVA
    with ``pairs``)."""
    from unlearn_fast.metrics import evaluate_pairs, evaluate_task
    from unlearn_fast.models.adapters import CLIPAdapter, get_adapter

    adapter = get_adapter(model)
    if isinstance(adapter, CLIPAdapter):
        return evaluate_pairs(model, adapter, tokenizer, task, concept, max_examples=args.eval_max_examples or None)
    if pairs:
        from unlearn_fast.methods.multidelete_llava import evaluate_llava_pairs

        return evaluate_llava_pairs(model, adapter, tokenizer, task, concept, reference_model=reference,
                                    max_examples=args.eval_max_examples or None, backend=args.backend)
    return evaluate_task(model, adapter, tokenizer, task, concept, reference_model=reference,
                         max_examples=args.eval_max_examples or None, max_new_tokens=args.max_new_tokens,
                         backend=args.backend, progress_bar=False)


def _base_rows(args, out, task, concept, lm, clip, rank, lm_pairs=None) -> Dict[str, dict]:
    """The original models' rows: "lm" (language-model metrics), "clip" (MultiDelete's
    pair metrics on CLIP), "lm_pairs" (the pair metrics on the LLaVA).  Rows an earlier
    run in ``out`` evaluated are reused; the ones this run's methods need and it lacks
    are evaluated and added."""
    path = os.path.join(out, "base.json")
    rows = _read_json(path) if os.path.exists(path) else {}
    # the base row's fluency is measured like the methods' rows: on the original model's
    # own answers (reference = itself), not on the dataset's answers
    wanted = {"lm": lambda: _evaluate(lm[0], lm[1], task, concept, args, reference=lm[0]),
              "clip": lambda: _evaluate(clip[0], clip[1], task, concept, args),
              "lm_pairs": lambda: _evaluate(lm_pairs[0], lm_pairs[1], task, concept, args, pairs=True)}
    needed = [k for k, loaded in (("lm", lm), ("clip", clip), ("lm_pairs", lm_pairs))
              if loaded is not None and k not in rows]
    if not needed:
        return rows
    t0 = time.perf_counter()
    for key in needed:
        rows[key] = _clean(wanted[key]())
    if rank == 0:
        _write_json(path, rows)
        print(f"[run] evaluated the original model(s) in {time.perf_counter() - t0:.1f}s", flush=True)
    return rows


def _run_one(method, args, out, task, concept, loaded, overrides, base_rows, rank, device) -> dict:
    from unlearn_fast.methods.multidelete import run_multidelete
    from unlearn_fast.methods.runner import run_lm_method

    mdir = os.path.join(out, method)
    done = os.path.join(mdir, "result.json")
    if os.path.exists(done):
        print(f"[run] {method}: finished earlier, reusing {done}", flush=True)
        return _read_json(done)
    model, tokenizer, _ = loaded
    run = run_multidelete if method == "multidelete" else functools_partial(run_lm_method, method)
    extra = {}
    if getattr(args, "fsdp", False):
        extra = {"fsdp": True}
    t0 = time.perf_counter()
    res = run(model, tokenizer, task, concept, backend=args.backend, overrides=overrides, seed=args.seed,
              out_dir=mdir, progress=not args.no_progress, mixed_precision=args.mixed_precision,
              **{"checkpoint_every": args.checkpoint_every, **extra})
    train_s = time.perf_counter() - t0
    # a resumed run's training time: the steps its checkpoint logged plus this process's
    # part (the earlier process's model loading is not counted: nothing recorded it)
    earlier_s = sum(float(h.get("step_seconds", 0.0)) for h in res.history[:res.resumed_from])
    if res.resumed_from:
        print(f"[run] {method}: resumed from step {res.resumed_from} ({earlier_s:.1f}s of steps before)",
              flush=True)
    t1 = time.perf_counter()
    pairs = method == "multidelete"
    row = _evaluate(res.model, tokenizer, task, concept, args, reference=model, pairs=pairs)
    if method == "siu":
        row = {**row, **_siu_efficacy(res.model, tokenizer, task, concept, args.seed, row, args.max_new_tokens)}
    eval_s = time.perf_counter() - t1
    row = {"method": method, **{k: row.get(k, math.nan) for k in LM_KEYS + PAIR_KEYS}, **row,
           "train_seconds": earlier_s + train_s, "eval_seconds": eval_s, "wall_seconds": earlier_s + train_s + eval_s,
           "steps": res.hp["steps"], "resumed_from_step": res.resumed_from, "train_seconds_before_resume": earlier_s,
           "hyperparameters": {k: v for k, v in res.hp.items()}}
    base = base_rows.get(_base_key(method, model), {})
    if method != "multidelete" and base:
        row["specificity_drop"] = _sub(base.get("specificity"), row.get("specificity"))
        row["text_retention_vs_base"] = _ratio(row.get("text_retention"), base.get("text_retention"))
        row["forget_vqa_mc_drop"] = _sub(base.get("forget_vqa_mc_accuracy"), row.get("forget_vqa_mc_accuracy"))
        row["forget_text_mc_vs_base"] = _ratio(row.get("forget_text_mc_accuracy"),
                                               base.get("forget_text_mc_accuracy"))
    elif base:
        row["retained_retrieval_drop"] = _sub(base.get("retained_retrieval"), row.get("retained_retrieval"))
    if args.throughput_steps > 0:
        row.update(_throughput(method, model, tokenizer, task, concept, args, overrides, device))
    if args.save_model:  # every rank calls it: under FSDP it gathers the weights to rank 0
        from unlearn_fast.methods.runner import save_unlearned_model

        save_unlearned_model(res, os.path.join(mdir, "model"), tokenizer)
    row = _clean(row)
    if rank == 0:
        _write_json(done, row)
    return row


def _base_key(method: str, model) -> str:
    from unlearn_fast.models.adapters import CLIPAdapter, get_adapter

    if method != "multidelete":
        return "lm"
    return "clip" if isinstance(get_adapter(model), CLIPAdapter) else "lm_pairs"


def _siu_efficacy(model, tokenizer, task, concept, seed, row, max_new_tokens: int) -> dict:
    """SIU's efficacy is measured on its ONE training image (asked every question of
    the concept's image rows), as in the paper; the evaluation engine's number over all
    the concept's trained-on images is kept as efficacy_forget_set."""
    from unlearn_fast.methods.methods import MethodData
    from unlearn_fast.metrics.generation import generate_answers
    from unlearn_fast.metrics.text import efficacy
    from unlearn_fast.models.adapters import get_adapter

    rows = MethodData(task, concept, collate=None, seed=seed).rows("siu_image")
    answers = generate_answers(model, get_adapter(model), rows, tokenizer=tokenizer, max_new_tokens=max_new_tokens,
                               progress_bar=False)
    from unlearn_fast.data.siu import representative_image

    return {"efficacy": efficacy(answers, task.concept(concept)), "efficacy_forget_set": row.get("efficacy"),
            "siu_training_image": representative_image(task.forget_set(concept, kind="vqa")).id}


def functools_partial(fn, name):
    import functools

    return functools.partial(fn, name)


def _sub(a, b):
    return a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else math.nan


def _ratio(a, b):
    return 100.0 * a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else math.nan


def _throughput(method, model, tokenizer, task, concept, args, overrides, device) -> dict:
    """Median step time of the fused backend and of eager, measured here, one after the other."""
    from unlearn_fast import backends
    from unlearn_fast.methods.runner import measure_step_seconds

    fused = args.backend if args.backend != "eager" else "auto"
    op = "modality_decoupling" if method == "multidelete" else "token_stats"
    try:
        fused_name = backends.resolve(op, fused, device)
    except Exception:  # the op is not registered on this branch: report the request
        fused_name = fused
    n = args.throughput_steps
    eager_s = measure_step_seconds(method, model, tokenizer, task, concept, backend="eager", steps=n,
                                   overrides=overrides, seed=args.seed, mixed_precision=args.mixed_precision)
    fused_s = measure_step_seconds(method, model, tokenizer, task, concept, backend=fused, steps=n,
                                   overrides=overrides, seed=args.seed, mixed_precision=args.mixed_precision)
    return {"fused_backend": fused_name, "step_seconds_fused": fused_s, "step_seconds_eager": eager_s,
            "speedup_vs_eager": eager_s / fused_s if fused_s > 0 else math.nan}


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def _f(v, nd=1):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def format_results(rows: Dict[str, dict], base_rows: Dict[str, dict], concept: str) -> str:
    cols = [("efficacy", "effic%"), ("generality", "gener%"), ("specificity", "spec%"), ("text_retention", "text%"),
            ("fluency", "fluency"), ("diversity", "divers%"), ("mia_auc", "MIA-AUC"),
            ("forget_vqa_mc_accuracy", "fVQA-MC%"), ("forget_text_mc_accuracy", "fQA-MC%"),
            ("pair_auc", "pairAUC"), ("retained_retrieval", "retr%"), ("wall_seconds", "wall s"),
            ("step_seconds_fused", "step fused"), ("step_seconds_eager", "step eager"), ("speedup_vs_eager", "x eager")]
    digits = {"mia_auc": 3, "pair_auc": 3, "fluency": 2, "step_seconds_fused": 3, "step_seconds_eager": 3,
              "speedup_vs_eager": 2}
    name_w = 13
    lines = [f"unlearning {concept!r}", f"{'method':<{name_w}}" + "".join(f"{h:>11}" for _, h in cols)]
    table = []
    if "lm" in base_rows:
        table.append(("original", base_rows["lm"]))
    if "clip" in base_rows:
        table.append(("original-clip", base_rows["clip"]))
    if "lm_pairs" in base_rows:
        table.append(("orig-pairs", base_rows["lm_pairs"]))
    table += list(rows.items())
    for name, r in table:
        lines.append(f"{name:<{name_w}}" + "".join(f"{_f(r.get(k), digits.get(k, 1)):>11}" for k, _ in cols))
    return "\n".join(lines)


def _plot(out: str, rows: Dict[str, dict], base_rows: Dict[str, dict]) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metrics = ["efficacy", "generality", "specificity", "text_retention", "forget_vqa_mc_accuracy",
               "forget_text_mc_accuracy"]
    names = [("original", base_rows.get("lm", {}))] + [(m, r) for m, r in rows.items() if m != "multidelete"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    width = 0.8 / max(len(names), 1)
    for j, (n, r) in enumerate(names):
        vals = [r.get(k) if isinstance(r.get(k), (int, float)) else 0 for k in metrics]
        ax.bar([i + j * width for i in range(len(metrics))], vals, width, label=n)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(metrics))])
    # arrows: the direction a successful unlearning moves each metric (forget-set text-only
    # MC has none: MMUnlearner keeps it, the text-side baselines lower it)
    ax.set_xticklabels(["efficacy ↑", "generality ↑", "specificity ↑", "text\nretention ↑", "forget\nVQA MC ↓",
                        "forget\nQA MC"], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title("language-model methods")
    # below the axes: inside, the legend would hide bars that reach 100 %
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax = axes[1]
    md = rows.get("multidelete")
    if md:
        b = base_rows.get("clip") or base_rows.get("lm_pairs") or {}
        ax.bar([0, 1], [b.get("pair_auc") or 0, md.get("pair_auc") or 0], color=["gray", "C0"])
        ax.bar([3, 4], [(b.get("retained_retrieval") or 0) / 100, (md.get("retained_retrieval") or 0) / 100],
               color=["gray", "C1"])
        ax.set_xticks([0, 1, 3, 4])
        ax.set_xticklabels(["pair AUC\noriginal", "pair AUC\nMultiDelete", "retrieval\noriginal",
                            "retrieval\nMultiDelete"], fontsize=8)
        ax.set_title("MultiDelete (CLIP)" if "clip" in base_rows else "MultiDelete (LLaVA)")
    else:
        ax.axis("off")
    ax = axes[2]
    timed = [(m, r) for m, r in rows.items() if r.get("step_seconds_eager")]
    if timed:
        xs = range(len(timed))
        ax.bar([x - 0.2 for x in xs], [r["step_seconds_eager"] for _, r in timed], 0.4, label="eager")
        ax.bar([x + 0.2 for x in xs], [r["step_seconds_fused"] for _, r in timed], 0.4, label="fused")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([m for m, _ in timed], rotation=30, fontsize=8)
        ax.set_ylabel("seconds per step")
        ax.set_title("step time, measured in the same run")
        ax.legend(fontsize=8)
    else:
        ax.axis("off")
    fig.tight_layout()
    from unlearn_fast.bench.harness import write_atomic_figure

    try:
        return write_atomic_figure(fig, os.path.join(out, "results.png"))
    finally:
        plt.close(fig)
