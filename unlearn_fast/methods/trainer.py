"""The one training loop every unlearning method shares.

A method supplies ``step_losses(step) -> dict[str, Tensor]`` (the loss terms of one
micro-batch, including ``"loss"``, the total to minimise); the loop does the rest:
seeding, AdamW over the trainable parameters, a warmup + constant/linear schedule,
gradient accumulation, bf16 autocast, clipping (or a method's own gradient hook),
checkpoint/resume (safetensors for weights, ``torch.load(weights_only=True)`` for the
optimizer), a tqdm progress bar, and a JSONL log of every loss term.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from unlearn_fast.bench.harness import write_atomic_json


@dataclass
class TrainConfig:
    steps: int = 6
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"  # or "linear" (decay to 0)
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "no"  # "bf16" for autocast
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    progress: bool = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def trainable_named_parameters(model: torch.nn.Module) -> List:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    return params


class Trainer:
    """Runs ``cfg.steps`` optimiser steps of ``step_losses``.

    ``grad_hook(params)`` (optional) transforms gradients in place after backward and
    before the optimiser step; when given, it replaces plain clipping (MMUnlearner clips
    and masks inside its hook)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, out_dir: Optional[str] = None,
                 name: str = "method"):
        self.model = model
        self.cfg = cfg
        self.out_dir = out_dir
        self.name = name
        self.named_params = trainable_named_parameters(model)
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.step = 0
        self.history: List[Dict[str, float]] = []

    def _lr_lambda(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "linear":
            rest = max(1, cfg.steps - cfg.warmup_steps)
            return max(0.0, 1.0 - (step - cfg.warmup_steps) / rest)
        return 1.0

    # -- checkpoints -------------------------------------------------------------------
    def _ckpt_dir(self) -> Optional[str]:
        return os.path.join(self.out_dir, "checkpoint") if self.out_dir else None

    def save_checkpoint(self) -> None:
        from safetensors.torch import save_file

        d = self._ckpt_dir()
        if d is None:
            return
        tmp = d + ".tmp"
        os.makedirs(tmp, exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in self.named_params},
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   os.path.join(tmp, "optimizer.pt"))
        write_atomic_json(os.path.join(tmp, "state.json"),
                          {"step": self.step, "config": asdict(self.cfg), "history": self.history,
                           "rng": {"torch": torch.get_rng_state().tolist()}})
        if os.path.exists(d):
            old = d + ".old"
            os.replace(d, old)
            os.replace(tmp, d)
            _rmtree(old)
        else:
            os.replace(tmp, d)

    def try_resume(self) -> bool:
        """Load the checkpoint in out_dir if there is one; True if resumed."""
        from safetensors.torch import load_file

        d = self._ckpt_dir()
        if d is None or not os.path.exists(os.path.join(d, "state.json")):
            return False
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        weights = load_file(os.path.join(d, "trainable.safetensors"))
        names = {n for n, _ in self.named_params}
        if set(weights) != names:
            raise ValueError(f"checkpoint in {d} does not match the model's trainable parameters "
                             f"(missing {sorted(names - set(weights))[:3]}, extra {sorted(set(weights) - names)[:3]})")
        with torch.no_grad():
            for n, p in self.named_params:
                p.copy_(weights[n].to(p.device, p.dtype))
        opt = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self.step = int(state["step"])
        self.history = state["history"]
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        return True

    # -- the loop ----------------------------------------------------------------------
    def autocast(self):
        if self.cfg.mixed_precision == "bf16":
            dev = self.params[0].device.type
            return torch.autocast(device_type=dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self, step_losses: Callable[[int], Dict[str, torch.Tensor]],
              grad_hook: Optional[Callable[[List[torch.Tensor]], None]] = None,
              log_path: Optional[str] = None) -> List[Dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not cfg.progress, leave=False)
        log = open(log_path, "a") if log_path else None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                self.optimizer.zero_grad(set_to_none=True)
                terms_acc: Dict[str, float] = {}
                for micro in range(cfg.grad_accum):
                    with self.autocast():
                        terms = step_losses(self.step * cfg.grad_accum + micro)
                    loss = terms["loss"] / cfg.grad_accum
                    if not torch.isfinite(loss.detach()):
                        raise FloatingPointError(f"{self.name}: non-finite loss at step {self.step}: "
                                                 + ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items()))
                    if loss.requires_grad:
                        loss.backward()
                    for k, v in terms.items():
                        terms_acc[k] = terms_acc.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
                grads = [p.grad for p in self.params if p.grad is not None]
                if grad_hook is not None:
                    grad_hook(self.params)
                elif cfg.max_grad_norm:
                    terms_acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
                if grads:
                    self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                terms_acc["step"] = self.step
                terms_acc["lr"] = self.scheduler.get_last_lr()[0]
                terms_acc["step_seconds"] = time.perf_counter() - t0
                self.history.append(terms_acc)
                if log:
                    log.write(json.dumps(terms_acc) + "\n")
                    log.flush()
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms_acc.items() if k not in ("step", "lr", "step_seconds")})
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log:
                log.close()
        return self.history


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def mean_step_seconds(history: List[Dict[str, float]], skip_first: int = 1) -> float:
    vals = [h["step_seconds"] for h in history[skip_first:]] or [h["step_seconds"] for h in history]
    return float(np.median(vals)) if vals else math.nan
