"""The one training loop every unlearning method shares.

A method implements ``train_step(trainer, step) -> dict of floats`` and usually just
calls ``trainer.update(losses)``: one optimiser update of ``losses(micro) -> {"loss":
total, <term>: value, ...}`` accumulated over ``grad_accum`` micro-batches.  The loop
does the rest: seeding, AdamW over the trainable parameters, warmup + constant / linear /
cosine schedule, gradient accumulation, bf16 autocast, clipping (or a method's own
gradient transform), DDP gradient averaging, checkpoint/resume (safetensors for the
weights, ``torch.load(weights_only=True)`` for the optimiser; torch.distributed.checkpoint
shards under FSDP), a tqdm progress bar and a
JSONL log with every loss term of every step.

Batches are a pure function of the step index (see ``BatchStream``), so a resumed run
sees exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from unlearn_fast.metrics.distributed import world

SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class TrainConfig:
    steps: int = 6
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "constant"
    grad_accum: int = 1
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "no"  # or "bf16"
    seed: int = 0
    checkpoint_every: int = 0  # 0: no intermediate checkpoints
    progress: bool = True
    fsdp: bool = False  # the model is FSDP2-sharded (see methods/fsdp.py): no DDP averaging of its shards

    def validate(self) -> "TrainConfig":
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
        if not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"grad_accum must be a positive integer, got {self.grad_accum!r}")
        return self


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# (rank, world size) of torch.distributed, (0, 1) when not initialised
dist_info = world


def rank_share(items: Sequence) -> list:
    """This rank's share of a global batch's items: every world-th, from the rank."""
    rank, world = dist_info()
    return list(items[rank::world])


class BatchStream:
    """Collated batches of a fixed row list, a pure function of the index: epoch e visits
    the rows in a permutation seeded by (seed, e).  Under torch.distributed each rank
    collates its share (rows rank::world) of the global batch.  Collated batches are
    cached (the sets are small; collate is the costly part)."""

    def __init__(self, rows: Sequence, batch_size: int, collate: Callable, *, seed: int = 0, name: str = "data",
                 shuffle: bool = True):
        if not rows:
            raise ValueError(f"the {name} set is empty")
        self.rows, self.collate, self.name, self.seed, self.shuffle = list(rows), collate, name, seed, shuffle
        self.batch_size = max(1, min(int(batch_size), len(self.rows)))
        self.per_epoch = max(1, len(self.rows) // self.batch_size)
        self._cache: Dict[int, dict] = {}

    def global_indices(self, i: int) -> List[int]:
        """The rows of global batch ``i`` (every rank's), in the order the ranks' shares
        are dealt from: rank r's share is ``global_indices(i)[r::world]``."""
        epoch, j = divmod(int(i), self.per_epoch)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        else:
            order = np.arange(len(self.rows))
        idx = order[j * self.batch_size:(j + 1) * self.batch_size].tolist()
        if dist_info()[1] == 1:
            return idx
        # image rows first (stable): every rank's share holds an image whenever the global
        # batch has >= world of them, so under FSDP the vision encoder (a collective) runs
        # on every rank or on none; fewer images than ranks still mismatch (see fsdp.py)
        return sorted(idx, key=lambda k: getattr(self.rows[k], "image", None) is None)

    def indices(self, i: int) -> List[int]:
        """This rank's rows of batch ``i`` (all of them in one process)."""
        return rank_share(self.global_indices(i))

    def __call__(self, i: int) -> dict:
        key = int(i) % (self.per_epoch * (1 << 20))
        if key not in self._cache:
            idx = self.indices(i)
            if not idx:
                raise ValueError(f"the {self.name} batch {i} is empty on this rank (batch size {self.batch_size} is "
                                 f"smaller than the number of processes)")
            if len(self._cache) > 256:
                self._cache.clear()
            self._cache[key] = self.collate([self.rows[k] for k in idx])
        return self._cache[key]


class Trainer:
    """Optimiser, schedule, accumulation, clipping, checkpoints, logging (module doc)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *, out_dir: Optional[str] = None,
                 name: str = "method", ddp_model: Optional[torch.nn.Module] = None):
        self.cfg = cfg.validate()
        self.model = model
        self.ddp_model = ddp_model
        self.out_dir, self.name = out_dir, name
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise ValueError("the model has no trainable parameters (all requires_grad=False)")
        self.params = [p for _, p in self.named_params]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.history: List[Dict[str, float]] = []

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        rest = max(1, cfg.steps - cfg.warmup_steps)
        frac = min(1.0, max(0.0, (step - cfg.warmup_steps) / rest))
        if cfg.schedule == "linear":
            return 1.0 - frac
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * frac))
        return 1.0

    # -- one optimiser update ----------------------------------------------------------
    def autocast(self):
        if self.cfg.mixed_precision == "bf16":
            return torch.autocast(device_type=self.params[0].device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _sync_grads(self) -> None:
        """Average gradients over ranks (what DDP does; done explicitly so methods that
        take several backward passes per step, or transform gradients, stay exact)."""
        rank, world = dist_info()
        if world == 1:
            return
        from unlearn_fast.methods.fsdp import is_sharded

        for p in self.params:
            if is_sharded(p):
                continue  # FSDP already reduce-scattered (averaged) this shard's gradient
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
            p.grad.div_(world)

    @staticmethod
    def _average_terms(acc: Dict[str, float]) -> Dict[str, float]:
        """The logged terms averaged over ranks (each rank's value is its share of the
        global mean times the world size, see ``lm.global_mean``)."""
        rank, world = dist_info()
        if world == 1 or not acc:
            return acc
        keys = sorted(acc)
        t = torch.tensor([acc[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / world for k, v in zip(keys, t.tolist())}

    def update(self, losses: Callable[[int], Dict[str, torch.Tensor]],
               grad_transform: Optional[Callable[[List[torch.Tensor]], None]] = None) -> Dict[str, float]:
        """One optimiser step on ``losses(micro)["loss"]`` accumulated over
        ``grad_accum`` micro-batches (micro = step * grad_accum + k).  Gradients are
        averaged over ranks, then ``grad_transform(grads)`` (in place) or clipping to
        ``max_grad_norm``.  Returns the mean of every term."""
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        acc: Dict[str, float] = {}
        for k in range(cfg.grad_accum):
            with self.autocast():
                terms = losses(self.step * cfg.grad_accum + k)
            loss = terms["loss"] / cfg.grad_accum
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"{self.name}: non-finite loss at step {self.step}: "
                                         + ", ".join(f"{n}={float(v):.4g}" for n, v in terms.items()))
            if loss.requires_grad:
                loss.backward()
            for n, v in terms.items():
                acc[n] = acc.get(n, 0.0) + float(v.detach()) / cfg.grad_accum
        self._sync_grads()
        acc = self._average_terms(acc)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, grads):
            p.grad = g
        if grad_transform is not None:
            grad_transform(grads)
        elif cfg.max_grad_norm and cfg.fsdp:
            from unlearn_fast.methods.fsdp import clip_grad_norm_

            acc["grad_norm"] = clip_grad_norm_(self.params, cfg.max_grad_norm)
        elif cfg.max_grad_norm:
            acc["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm))
        self.optimizer.step()
        return acc

    # -- the loop ----------------------------------------------------------------------
    def train(self, train_step: Callable[["Trainer", int], Dict[str, float]], *, log_path: Optional[str] = None
              ) -> List[Dict[str, float]]:
        from tqdm.auto import tqdm

        cfg = self.cfg
        rank, _ = dist_info()
        self.model.train()
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.name, disable=not cfg.progress or rank != 0,
                   leave=False, dynamic_ncols=True)
        log = open(log_path, "a") if (log_path and rank == 0) else None
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
                terms = train_step(self, self.step)
                self.scheduler.step()
                self.step += 1
                terms.update(step=self.step, lr=lr, step_seconds=time.perf_counter() - t0)
                self.history.append(terms)
                if log:
                    log.write(json.dumps(terms) + "\n")
                    log.flush()
                bar.set_postfix({k: f"{v:.3g}" for k, v in terms.items() if k not in ("step", "lr", "step_seconds")},
                                refresh=False)
                bar.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            if log:
                log.close()
        self.model.eval()
        return self.history

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint_dir(self) -> Optional[str]:
        return os.path.join(self.out_dir, "checkpoint") if self.out_dir else None

    def save_checkpoint(self) -> None:
        """Trainable weights, optimiser, schedule, step, history and RNG state, written
        to a temporary folder and renamed into place by rank 0 (never half-written: an
        interrupted save leaves the previous checkpoint).  Plain / DDP: rank 0 writes
        safetensors + torch.save.  FSDP: every rank writes its shards of the weights and
        optimiser state with torch.distributed.checkpoint (the folder must be on a file
        system every rank sees); the small trainer state is rank 0's, as under DDP."""
        from safetensors.torch import save_file

        d = self.checkpoint_dir()
        rank = dist_info()[0]
        if d is None or (rank != 0 and not self.cfg.fsdp):
            return
        from unlearn_fast.methods.fsdp import barrier, save_sharded

        tmp = d + ".tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        small = {"scheduler": self.scheduler.state_dict(), "torch_rng": torch.get_rng_state()}
        if self.cfg.fsdp:
            barrier()  # tmp exists before anyone writes into it
            save_sharded(self.model, self.optimizer, os.path.join(tmp, "sharded"))
        else:
            save_file({n: p.detach().contiguous().cpu() for n, p in self.named_params},
                      os.path.join(tmp, "trainable.safetensors"))
            small["optimizer"] = self.optimizer.state_dict()
        if rank == 0:
            torch.save(small, os.path.join(tmp, "optimizer.pt"))
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump({"step": self.step, "config": asdict(self.cfg), "history": self.history}, f)
        if self.cfg.fsdp:
            barrier()  # every shard is written
        if rank == 0:
            old = d + ".old"
            if os.path.exists(d):
                shutil.rmtree(old, ignore_errors=True)
                os.replace(d, old)
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        if self.cfg.fsdp:
            barrier()  # no rank runs ahead (e.g. to a resume) before the rename

    def _complete_checkpoint(self) -> Optional[str]:
        """The checkpoint folder to resume from: ``checkpoint``, or ``checkpoint.old`` when
        a save was interrupted between its two renames."""
        d = self.checkpoint_dir()
        if d is None:
            return None
        for cand in (d, d + ".old"):
            if os.path.exists(os.path.join(cand, "state.json")):
                return cand
        return None

    def try_resume(self) -> bool:
        """Load the checkpoint in out_dir if there is one; True if it did (under FSDP a
        collective: every rank calls it)."""
        from safetensors.torch import load_file

        d = self._complete_checkpoint()
        if self.cfg.fsdp:
            from unlearn_fast.methods.fsdp import barrier

            barrier()  # every rank sees the same folder (rank 0 may have just renamed it)
        if d is None:
            return False
        with open(os.path.join(d, "state.json")) as f:
            state = json.load(f)
        sharded = os.path.isdir(os.path.join(d, "sharded"))
        if sharded != self.cfg.fsdp:
            kind = "an FSDP (sharded)" if sharded else "a non-FSDP"
            raise ValueError(f"{d} holds {kind} checkpoint; resume it with{'' if sharded else 'out'} --fsdp, or use "
                             f"a fresh --out folder")
        opt = torch.load(os.path.join(d, "optimizer.pt"), weights_only=True)
        if sharded:
            from unlearn_fast.methods.fsdp import load_sharded

            load_sharded(self.model, self.optimizer, os.path.join(d, "sharded"))
        else:
            weights = load_file(os.path.join(d, "trainable.safetensors"))
            names = [n for n, _ in self.named_params]
            if set(weights) != set(names):
                raise ValueError(f"the checkpoint in {d} does not match this model's trainable parameters "
                                 f"(missing {sorted(set(names) - set(weights))[:3]}, "
                                 f"unexpected {sorted(set(weights) - set(names))[:3]}); use a fresh --out folder")
            with torch.no_grad():
                for n, p in self.named_params:
                    p.copy_(weights[n].to(p.device, p.dtype))
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        torch.set_rng_state(opt["torch_rng"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        return True


def trim_log(path: Optional[str], keep_through_step: int) -> None:
    """Keep only the log lines of steps <= ``keep_through_step`` (a resumed run re-runs
    the steps after its checkpoint; a fresh run starts an empty log)."""
    if not path or not os.path.exists(path) or dist_info()[0] != 0:
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if int(json.loads(line).get("step", 0)) <= keep_through_step:
                    kept.append(line)
            except (ValueError, AttributeError):
                continue
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def median_step_seconds(history: Sequence[Dict[str, float]], skip_first: int = 1) -> float:
    vals = [h["step_seconds"] for h in history[skip_first:]] or [h["step_seconds"] for h in history]
    return float(np.median(vals)) if vals else math.nan
