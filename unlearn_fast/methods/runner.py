"""Build and run one unlearning method on a model: a private copy of the model (the
input is never modified), optional LoRA, the frozen reference, the batch streams, the
trainer (resuming from ``out_dir/checkpoint`` when present), then the unlearned model.

``run_lm_method`` covers the language-model methods (:data:`LM_METHODS`),
``run_multidelete`` the CLIP one; ``measure_step_seconds`` times a few steps of a method
on a throwaway copy (the fused-vs-eager throughput the run command prints).
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from unlearn_fast.data.tokenizer import name_token_ids
from unlearn_fast.methods.lm import LMContext
from unlearn_fast.methods.methods import COMMON_DEFAULTS, LM_METHODS, MethodData
from unlearn_fast.methods.trainer import TrainConfig, Trainer, median_step_seconds, seed_everything, trim_log
from unlearn_fast.models.adapters import get_adapter
from unlearn_fast.models.lora import Reference, apply_lora, merged_copy

ALL_METHODS = ("siu", "mmunlearner", "multidelete", "ga", "ga_kl", "graddiff", "kl_min", "npo", "po")


def method_defaults(name: str) -> Dict[str, object]:
    if name == "multidelete":
        from unlearn_fast.methods.multidelete import MultiDelete

        return {**COMMON_DEFAULTS, **MultiDelete.DEFAULTS}
    if name not in LM_METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(ALL_METHODS)} or 'all'")
    return {**COMMON_DEFAULTS, **LM_METHODS[name].DEFAULTS}


@dataclass
class RunResult:
    model: torch.nn.Module          # the unlearned model (LoRA merged into a plain copy; FSDP: see ``sharded``)
    history: List[Dict[str, float]]
    resumed_from: int               # the step a checkpoint resumed from (0: fresh)
    hp: Dict[str, object]
    # FSDP: ``model`` is the trained model itself, still sharded (and with LoRA unmerged):
    # evaluate it on every rank (the metrics shard the examples in lockstep) and save it
    # with save_unlearned_model; ``plain`` builds an empty unsharded copy of its architecture
    sharded: bool = False
    plain: Optional[Callable[[], torch.nn.Module]] = None


def save_unlearned_model(res: RunResult, path: str, tokenizer=None) -> None:
    """``save_pretrained`` the unlearned model (LoRA merged) to ``path`` on rank 0.  Under
    FSDP a collective (every rank calls it): the full weights are gathered to rank 0's
    CPU memory only, never to every rank."""
    from unlearn_fast.methods.trainer import dist_info

    rank = dist_info()[0]
    model = res.model
    if res.sharded:
        from unlearn_fast.methods import fsdp as fsdp_mod

        state = fsdp_mod.full_state_on_rank0(res.model)
        if rank == 0:
            model = merged_copy(fsdp_mod.unsharded_copy(res.plain(), state))
    if rank != 0:
        return
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def _train_config(hp, *, progress: bool, mixed_precision: str, seed: int, checkpoint_every: int,
                  fsdp: bool = False) -> TrainConfig:
    return TrainConfig(steps=int(hp["steps"]), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]),
                       warmup_steps=int(hp["warmup_steps"]), schedule=str(hp["schedule"]),
                       max_grad_norm=float(hp["max_grad_norm"]) if hp["max_grad_norm"] else None,
                       mixed_precision=mixed_precision, seed=seed, checkpoint_every=checkpoint_every,
                       progress=progress, grad_accum=int(hp.get("grad_accum", 1)), fsdp=fsdp)


def build_lm_method(name: str, base_model, tokenizer, task, concept: str, *, backend: str = "auto",
                    overrides: Optional[Dict] = None, seed: int = 0):
    """(method, model, ctx, hp): a fresh copy of ``base_model`` ready to train."""
    overrides = dict(overrides or {})
    hp = {**method_defaults(name), **overrides}
    cls = LM_METHODS[name]
    seed_everything(seed)
    model = copy.deepcopy(base_model)
    model.requires_grad_(True)
    if int(hp["lora"]):
        model = apply_lora(model, r=int(hp["lora"]), where=str(hp["lora_where"]))
    adapter = get_adapter(model)
    adapter.lm_head(model)  # a clear error now for a model without a head
    reference = Reference(model) if cls.needs_reference else None
    ctx = LMContext(model, adapter, backend=backend, reference=reference)
    c = task.concept(concept)
    data = MethodData(task, c.name, functools.partial(adapter.collate, tokenizer=tokenizer),
                      batch_size=int(hp["batch_size"]), seed=seed,
                      name_token_ids=name_token_ids(tokenizer, c.variants),
                      device=next(model.parameters()).device)
    method = cls(ctx, data, **overrides)
    return method, model, ctx, method.hp


def run_lm_method(name: str, base_model, tokenizer, task, concept: str, *, backend: str = "auto",
                  overrides: Optional[Dict] = None, seed: int = 0, out_dir: Optional[str] = None,
                  progress: bool = True, mixed_precision: str = "no", checkpoint_every: int = 0,
                  steps: Optional[int] = None, fsdp: bool = False) -> RunResult:
    """Unlearn ``concept`` with method ``name``; ``out_dir`` holds the checkpoint and the
    JSONL log (an existing checkpoint there is resumed).  ``fsdp``: shard the model (and
    a separate reference) with FSDP2 across the process group (:mod:`.fsdp`)."""
    overrides = dict(overrides or {})
    if steps is not None:
        overrides["steps"] = int(steps)
    method, model, ctx, hp = build_lm_method(name, base_model, tokenizer, task, concept, backend=backend,
                                             overrides=overrides, seed=seed)
    cfg = _train_config(hp, progress=progress, mixed_precision=mixed_precision, seed=seed,
                        checkpoint_every=checkpoint_every, fsdp=fsdp)
    if fsdp:
        from unlearn_fast.methods import fsdp as fsdp_mod

        why = fsdp_mod.check_supported(name, cfg)
        if why:
            raise ValueError(f"--fsdp: {why}")
        fsdp_mod.shard_model(model, ctx.adapter)
        if ctx.reference is not None and not ctx.reference.shared:
            fsdp_mod.shard_model(ctx.reference.model, ctx.adapter)  # the frozen copy, sharded the same way
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    trainer = Trainer(model, cfg, out_dir=out_dir, name=name)
    method.prepare(trainer)  # on the original weights, before any resumed state
    resumed = trainer.step if trainer.try_resume() else 0
    log_path = os.path.join(out_dir, "log.jsonl") if out_dir else None
    trim_log(log_path, resumed)
    history = trainer.train(method.train_step, log_path=log_path)
    if fsdp:  # no gather: the sharded model is evaluated as it is (see RunResult)
        def plain():
            if int(hp["lora"]):
                return apply_lora(copy.deepcopy(base_model), r=int(hp["lora"]), where=str(hp["lora_where"]))
            return base_model

        return RunResult(model.eval(), history, resumed, hp, sharded=True, plain=plain)
    return RunResult(merged_copy(model).eval(), history, resumed, hp)


def measure_step_seconds(name: str, base_model, tokenizer, task, concept: str, *, backend: str, steps: int = 3,
                         overrides: Optional[Dict] = None, seed: int = 0, mixed_precision: str = "no") -> float:
    """Median seconds per optimiser step of ``name`` with ``backend`` over ``steps``
    steps (after one warm-up step) on a throwaway copy of the model, in the training
    run's ``mixed_precision``."""
    overrides = {**(overrides or {}), "steps": steps + 1}
    if name == "multidelete":
        from unlearn_fast.methods.multidelete import run_multidelete

        res = run_multidelete(base_model, tokenizer, task, concept, backend=backend, overrides=overrides, seed=seed,
                              progress=False, mixed_precision=mixed_precision)
        return median_step_seconds(res.history)
    res = run_lm_method(name, base_model, tokenizer, task, concept, backend=backend, overrides=overrides, seed=seed,
                        progress=False, mixed_precision=mixed_precision)
    return median_step_seconds(res.history)
