"""``unlearn-fast eval``: evaluate one or more models on forget / retain / holdout sets.

    unlearn-fast eval --model builtin --data builtin --concept seven --out runs/eval
    unlearn-fast eval --model runs/siu/model --model runs/ga/model --reference-model builtin \\
                      --data builtin --concept seven --out runs/eval
    unlearn-fast eval --data path/to/MLLMU-Bench --model PATH --out DIR      # parquet splits
    unlearn-fast eval --results runs/a/eval.json --results runs/run/results.json --out DIR  # plots only

Writes DIR/eval.json (see :mod:`unlearn_fast.metrics.report`), prints the table and
draws the plots (per-metric bars across models / methods, before vs after).

Evaluation sets: with ``--concept C`` the task's sets around C (forget_vqa: C's
trained-on images; forget_text: C's text facts; holdout_vqa: C's held-out images;
retain_vqa / retain_text: the other concepts' trained-on rows; specificity: the other
concepts' held-out images) plus the per-method summary row (``evaluate_task``); without
a concept one set per split and kind present in the data ("forget_vqa", "test_text", ...).

Models: ``builtin`` (the tiny LLaVA), ``builtin-clip``, or a folder saved with
``save_pretrained`` (a full model, or a peft adapter whose base model is loadable).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List, Optional, Tuple


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], help="builtin | builtin-clip | PATH (repeatable)")
    p.add_argument("--label", action="append", default=[], help="a name per --model (default: from the path)")
    p.add_argument("--data", default="builtin",
                   help="builtin | FILE.jsonl | MLLMU-Bench parquet file/folder | MMUBench-style image folder")
    p.add_argument("--concept", default=None, help="the forgotten concept (enables the summary row)")
    p.add_argument("--reference-model", default=None,
                   help="the original model (fluency reference answers, C-Dis, PrivLeak); builtin | PATH")
    p.add_argument("--out", required=True, help="output folder (eval.json, plots)")
    p.add_argument("--results", action="append", default=[],
                   help="an existing eval.json / results.json to include in the table and plots (repeatable)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per generation / scoring batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="greedy answer length limit (default 24)")
    p.add_argument("--max-examples", type=int, default=100,
                   help="rows per set, evenly subsampled (0: all; default 100)")
    p.add_argument("--k", type=float, default=0.4, help="Min-K%% fraction (default 0.4)")
    p.add_argument("--backend", default="auto", help="token_stats backend: auto, eager, cpp, triton, cuda")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-generate", action="store_true", help="skip generation-based metrics")
    p.add_argument("--no-plot", action="store_true", help="write eval.json only, no plots")
    p.add_argument("--before", default=None, help="label of the 'before' model in before_after.png")


BUILTIN_MODELS = ("builtin", "builtin-llava", "builtin-clip")


def check_model_spec(spec: str, flag: str = "--model") -> None:
    """Raise a clear error unless ``spec`` names a built-in model or a saved model folder
    (config.json, or a peft adapter_config.json).  Cheap: run on every spec before any
    model is loaded, so a typo in the last --model does not surface after the others ran."""
    if spec in BUILTIN_MODELS:
        return
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"{flag} {spec!r}: not {', '.join(map(repr, BUILTIN_MODELS))} or a model folder")
    if any(os.path.exists(os.path.join(spec, f)) for f in ("config.json", "adapter_config.json")):
        return
    hint = "save the model with save_pretrained"
    if os.path.isdir(os.path.join(spec, "model")):
        hint = f"did you mean {os.path.join(spec, 'model')!r}?"
    elif os.path.isdir(os.path.join(spec, "checkpoint")):
        hint = "this is a training run's folder: run it with --save-model to write a model folder"
    raise FileNotFoundError(f"{flag} {spec!r}: no config.json or adapter_config.json ({hint})")


def load_model(spec: str, device: str) -> Tuple[object, object, Optional[object]]:
    """(model, tokenizer, builtin task or None) for --model / --reference-model."""
    if spec in ("builtin", "builtin-llava"):
        from unlearn_fast.models import load_builtin_llava

        model, tok, task = load_builtin_llava()
        return model.to(device), tok, task
    if spec == "builtin-clip":
        from unlearn_fast.models import load_builtin_clip

        model, tok, task = load_builtin_clip()
        return model.to(device), tok, task
    check_model_spec(spec)
    import transformers
    from transformers import AutoTokenizer

    if os.path.exists(os.path.join(spec, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base_spec = PeftConfig.from_pretrained(spec).base_model_name_or_path
        base, tok, task = load_model(base_spec, device)
        from unlearn_fast.models.lora import quiet_peft_wrapping

        with quiet_peft_wrapping():
            return PeftModel.from_pretrained(base, spec).to(device).eval(), tok, task
    cfg_path = os.path.join(spec, "config.json")
    with open(cfg_path) as f:
        archs = json.load(f).get("architectures") or []
    cls = next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), None)
    if cls is None:
        raise ValueError(f"--model {spec!r}: config.json names no transformers class ({archs})")
    model = cls.from_pretrained(spec).to(device).eval()
    return model, AutoTokenizer.from_pretrained(spec), None


def load_data(spec: str, builtin_task=None):
    if spec == "builtin":
        if builtin_task is not None:
            return builtin_task
        from unlearn_fast.data import load_builtin_task

        return load_builtin_task()
    if spec.endswith(".jsonl"):
        from unlearn_fast.data import load_task

        return load_task(spec)
    from unlearn_fast.data.loaders_public import load_public

    return load_public(spec)


def default_sets(task, concept: Optional[str]) -> Dict[str, List]:
    if concept:
        c = task.concept(concept).name
        return {"forget_vqa": task.forget_set(c, kind="vqa"), "forget_text": task.text_facts(c),
                "holdout_vqa": task.holdout_set(c, kind="vqa"), "retain_vqa": task.retain_set(c, kind="vqa"),
                "retain_text": task.retain_set(c, kind="text"), "specificity": task.specificity_set(c, kind="vqa")}
    sets: Dict[str, List] = {}
    for e in task.examples:
        sets.setdefault(f"{e.split or 'all'}_{e.kind}", []).append(e)
    return sets


def _label(spec: str, used: set) -> str:
    base = spec if spec.startswith("builtin") else os.path.basename(os.path.normpath(spec)) or spec
    if base in ("model", "final", "checkpoint"):
        base = os.path.basename(os.path.dirname(os.path.normpath(spec))) or base
    label, i = base, 2
    while label in used:
        label, i = f"{base}-{i}", i + 1
    return label


def main(args) -> int:
    from unlearn_fast.models import UnsupportedModelError

    try:
        return _main(args)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as exc:
        # bad input: one clear line, no traceback; eval.json is only ever written whole
        print(f"unlearn-fast eval: error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    import torch

    from unlearn_fast.metrics import report

    if not args.model and not args.results:
        print("unlearn-fast eval: give at least one --model (or --results to re-plot)", file=sys.stderr)
        return 2
    if args.label and len(args.label) != len(args.model):
        print(f"unlearn-fast eval: {len(args.label)} --label for {len(args.model)} --model", file=sys.stderr)
        return 2
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            print(f"unlearn-fast eval: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    max_examples = None if args.max_examples == 0 else args.max_examples
    models: Dict[str, dict] = {}
    for path in args.results:  # fail fast on a bad results file, before any model work
        models.update(report.load_results(path))
    for spec in args.model:  # and on a bad model path
        check_model_spec(spec)
    if args.reference_model:
        check_model_spec(args.reference_model, "--reference-model")
    labels, used = [], set(models)  # every row keeps its own label: nothing is overwritten
    for i, spec in enumerate(args.model):
        label = args.label[i] if args.label else _label(spec, used)
        if label in used:
            raise ValueError(f"--label {label!r} is given twice or names a model of --results; labels must be unique")
        used.add(label)
        labels.append(label)
    if args.before is not None and not args.no_plot and args.before not in used:
        raise ValueError(f"--before {args.before!r} is not one of the models {sorted(used)}")
    config = {k: v for k, v in vars(args).items() if k != "func"}
    reference = None
    if args.reference_model:
        reference = load_model(args.reference_model, device)[0]
    task = None
    for spec, label in zip(args.model, labels):
        t0 = time.perf_counter()
        model, tokenizer, builtin_task = load_model(spec, device)
        if task is None:
            task = load_data(args.data, builtin_task)
            if args.concept:
                task.concept(args.concept)  # fails fast on an unknown concept
        entry = {"model": spec}
        entry.update(_evaluate_one(model, tokenizer, task, args, reference, max_examples))
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        models[label] = entry
        print(f"[eval] {label}: {entry['seconds']:.1f} s", file=sys.stderr, flush=True)
        # write after every model: an interrupted multi-model run keeps what it finished
        report.write_report(args.out, report.make_report(models, config))
    path = report.write_report(args.out, report.make_report(models, config))
    print(report.format_table(models))
    print(f"wrote {path}")
    if not args.no_plot:
        for p in report.plot_report(models, args.out, before=args.before):
            print(f"wrote {p}")
    return 0


def _evaluate_one(model, tokenizer, task, args, reference, max_examples) -> dict:
    from unlearn_fast.metrics.evaluate import evaluate_pairs, evaluate_sets, evaluate_task
    from unlearn_fast.models import get_adapter

    adapter = get_adapter(model)
    if getattr(adapter, "family", "") == "clip":
        if not args.concept:
            raise ValueError("a CLIP model is evaluated on deleting a concept's pairs: give --concept")
        return {"summary": evaluate_pairs(model, adapter, tokenizer, task, args.concept, max_examples=max_examples)}
    common = dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, k=args.k,
                  max_examples=max_examples, backend=args.backend, progress_bar=None, cache={})
    out = {"sets": evaluate_sets(model, adapter, tokenizer, default_sets(task, args.concept), task=task,
                                 concept=args.concept, generate=not args.no_generate, **common)}
    if args.concept and not args.no_generate:
        out["summary"] = evaluate_task(model, adapter, tokenizer, task, args.concept, reference_model=reference,
                                       **common)
    return out
