"""The language-model unlearning methods: one small class each, sharing the training
loop (:mod:`.trainer`) and the fused loss terms (:mod:`.lm`).

    ga           -CE(D_f)
    graddiff     -CE(D_f) + w_r CE(D_r)
    ga_kl        -CE(D_f) + w_kl KL(orig || cur) on D_r's answer tokens        (TOFU's "KL")
    kl_min       -CE(D_f) + w_kl KL(orig || cur) on every attended token of D_r (MMUnlearner's KL_Min)
    npo          -(2/beta) mean log sigmoid(-beta (log pi(y|x) - log pi_ref(y|x))) on D_f + w_r CE(D_r)
    po           CE(refusal answers to D_f's questions) + w_r CE(D_r)
    siu          w_ce CE(multifaceted rows) + w_dmk DMK(orig, cur), K_S = 0 on the target-phrase
                 tokens, K_V = 0 on the concept name's token ids (SPEC.md section 1)
    mmunlearner  Fisher of D_f and of the preserve sets (vision modules: retain VQA; language
                 modules: retain VQA + text QA incl. the concept's facts), saliency mask
                 m = 1[(F_f + eps) / (F_p + eps) >= tau]; every k steps one ascent step on a D_f
                 batch with the gradient clipped, then masked (or m * g / (F_p + lam), "geometry");
                 every step one descent step on a D_r batch.

D_f = the concept's trained-on image rows, D_r = the other concepts' rows (image and text).
KL(orig || cur) is the fused dual masked KL with K_V = 1.  Every term goes through the
fused ops with the context's backend ("eager" = the logits-materialising baseline).

Hyperparameters: each method has ``DEFAULTS`` (tuned on the built-in digits task, see the
README); any of them can be overridden (``unlearn-fast run --set key=value``).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from unlearn_fast.data.schema import Example, UnlearningTask
from unlearn_fast.methods.lm import LMContext, answer_mask, attended_mask
from unlearn_fast.methods.trainer import SCHEDULES, BatchStream, Trainer

SIU_PRESETS = {
    # ours: KL form, mean over the kept answer positions, K_S on the answer tokens
    "default": dict(ce_weight=1.0, dmk_weight=1.0, form="kl", reduction="mean", dmk_positions="answer"),
    # the released code: CE 0.9 / DMK 0.75, cross-entropy form, Z = kept positions x V,
    # KL over every attended position (our reading of its masks, without its misalignment)
    "reference": dict(ce_weight=0.9, dmk_weight=0.75, form="cross_entropy", reduction="siu", dmk_positions="all"),
}


@dataclass
class MethodData:
    """The row sets a method trains on, turned into batch streams on demand."""

    task: UnlearningTask
    concept: str
    collate: Callable[[List[Example]], dict]
    batch_size: int = 8
    seed: int = 0
    name_token_ids: List[int] = field(default_factory=list)
    device: Optional[torch.device] = None  # batches are moved here (the model's device)
    _streams: Dict[str, BatchStream] = field(default_factory=dict)

    def collate_to_device(self, rows: List[Example]) -> dict:
        batch = self.collate(rows)
        if self.device is None or self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def rows(self, which: str) -> List[Example]:
        t, c = self.task, self.concept
        if which == "forget":
            return t.forget_set(c, kind="vqa")
        if which == "retain":
            return t.retain_set(c)
        if which == "retain_vqa":
            return t.retain_set(c, kind="vqa")
        if which == "retain_text":  # every trained-on text row, the concept's facts included
            return t.retain_text(c)
        if which == "preserve_language":
            return t.retain_set(c, kind="vqa") + t.retain_text(c)
        if which == "siu":
            from unlearn_fast.data.siu import build_siu_examples

            return build_siu_examples(t, c, seed=self.seed)
        if which == "refusal":
            import dataclasses

            return [dataclasses.replace(e, answer=t.refusal, options=(), answer_index=None, target_phrase="")
                    for e in t.forget_set(c, kind="vqa")]
        if which == "siu_image":  # SIU's one training image under each question (efficacy)
            return [r for r in self.rows("siu") if r.target_phrase and r.target_phrase != r.answer]
        raise KeyError(which)

    def stream(self, which: str, batch_size: Optional[int] = None) -> BatchStream:
        key = f"{which}:{batch_size}"
        if key not in self._streams:
            self._streams[key] = BatchStream(self.rows(which), batch_size or self.batch_size, self.collate_to_device,
                                             seed=self.seed + zlib.crc32(which.encode()) % 1000, name=which)
        return self._streams[key]


class Method:
    """Base class.  ``DEFAULTS``: hyperparameters (lr, steps, batch_size, lora rank ...)."""

    name = "base"
    needs_reference = False
    DEFAULTS: Dict[str, object] = {}
    DATA: Tuple[str, ...] = ()  # the MethodData row sets it trains on (checked up front)

    def __init__(self, ctx: LMContext, data: MethodData, **hp):
        unknown = set(hp) - set(self.DEFAULTS) - set(COMMON_DEFAULTS)
        if unknown:
            raise ValueError(f"{self.name}: unknown hyperparameter(s) {sorted(unknown)}; "
                             f"known: {sorted(set(self.DEFAULTS) | set(COMMON_DEFAULTS))}")
        self.ctx, self.data = ctx, data
        self.hp = {**COMMON_DEFAULTS, **self.DEFAULTS, **hp}
        check_hyperparameters(self.name, self.hp)
        if self.needs_reference and ctx.reference is None:
            raise ValueError(f"{self.name} needs the frozen reference model")

    def prepare(self, trainer: Trainer) -> None:
        """One-off work before the first step (e.g. Fisher information); resumed runs call
        it again (it must be deterministic)."""

    def losses(self, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(self, trainer: Trainer, step: int) -> Dict[str, float]:
        return trainer.update(self.losses)

    def batch(self, which: str, i: int) -> dict:
        return self.data.stream(which)(i)


# hyperparameters every method takes (the run CLI reads them)
COMMON_DEFAULTS: Dict[str, object] = dict(lr=1e-4, steps=20, batch_size=8, lora=0, lora_where="language",
                                          schedule="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                                          grad_accum=1)


def check_hyperparameters(method: str, hp: Dict[str, object]) -> None:
    """Check one method's merged hyperparameters (defaults + overrides) before anything
    is built or written; raises ValueError naming the bad one.  The run command calls it
    for every selected method up front, and each method's constructor calls it again."""
    def bad(key, what):
        raise ValueError(f"{method}: {key} must be {what}, got {hp[key]!r}")

    def number(key, *, integer=False, minimum=None, above=None, optional=False):
        v = hp.get(key)
        if v is None and optional:
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(key, "an integer" if integer else "a finite number")
        if integer and not float(v).is_integer():
            bad(key, "an integer")
        if minimum is not None and v < minimum:
            bad(key, f">= {minimum}")
        if above is not None and v <= above:
            bad(key, f"> {above}")

    def choice(key, options):
        if hp.get(key) not in options:
            bad(key, "one of " + ", ".join(repr(o) for o in options))

    number("lr", minimum=0)
    number("steps", integer=True, minimum=1)
    number("batch_size", integer=True, minimum=1)
    number("lora", integer=True, minimum=0)
    number("warmup_steps", integer=True, minimum=0)
    number("weight_decay", minimum=0)
    number("grad_accum", integer=True, minimum=1)
    if hp.get("max_grad_norm") not in (None, 0, False):  # 0 / None: no clipping
        number("max_grad_norm", above=0)
    choice("schedule", SCHEDULES)
    choice("lora_where", ("language", "vision", "all"))
    if method == "siu":
        choice("preset", tuple(SIU_PRESETS))
        choice("form", (None, "kl", "cross_entropy"))
        choice("reduction", (None, "mean", "sum", "siu"))
        choice("dmk_positions", (None, "answer", "all"))
        number("augment_shift", integer=True, minimum=0)
    elif method == "mmunlearner":
        choice("mode", ("mask", "geometry"))
        number("eps", minimum=0)
        number("lam", above=0)
        number("fisher_batches", integer=True, minimum=1)
        f = hp.get("mask_fraction")
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1):
            bad("mask_fraction", "None or in (0, 1]")
        if hp.get("forget_every") != "ratio":
            number("forget_every", integer=True, minimum=1)
    elif method == "multidelete":
        from unlearn_fast.methods.multidelete import ARCHS
        from unlearn_fast.ops.modality import DISTANCES

        choice("arch", ARCHS)
        choice("unimodal", ("image", "image+text"))
        choice("distance", DISTANCES)
    # every other numeric hyperparameter (weights, beta, threshold ...): a finite number
    checked = {"lr", "steps", "batch_size", "lora", "warmup_steps", "weight_decay", "grad_accum", "max_grad_norm",
               "augment_shift", "eps", "lam", "fisher_batches", "mask_fraction", "forget_every"}
    for key, value in hp.items():
        if key not in checked and (key.endswith("_weight") or key in ("beta", "threshold")):
            number(key, optional=key.endswith("_weight"))


class GA(Method):
    name = "ga"
    DATA = ("forget",)
    DEFAULTS = dict(lr=5e-5, steps=10)

    def losses(self, i):
        ce_f = self.ctx.ce(self.batch("forget", i))
        return {"loss": -ce_f, "forget_ce": ce_f}


class GradDiff(Method):
    name = "graddiff"
    DATA = ("forget", "retain")
    DEFAULTS = dict(lr=5e-5, steps=20, retain_weight=1.0)

    def losses(self, i):
        ce_f = self.ctx.ce(self.batch("forget", i))
        ce_r = self.ctx.ce(self.batch("retain", i))
        return {"loss": -ce_f + self.hp["retain_weight"] * ce_r, "forget_ce": ce_f, "retain_ce": ce_r}


class GAKL(Method):
    """-CE(D_f) + KL(orig || cur) on D_r, the KL over the answer tokens (TOFU)."""

    name = "ga_kl"
    DATA = ("forget", "retain")
    needs_reference = True
    DEFAULTS = dict(lr=5e-5, steps=20, kl_weight=1.0)
    all_positions = False

    def losses(self, i):
        ce_f = self.ctx.ce(self.batch("forget", i))
        b = self.batch("retain", i)
        mask = attended_mask(b) if self.all_positions else answer_mask(b)
        kl = self.ctx.dual_masked_kl(b, mask)
        return {"loss": -ce_f + self.hp["kl_weight"] * kl, "forget_ce": ce_f, "retain_kl": kl}


class KLMin(GAKL):
    """MMUnlearner's KL_Min baseline: the KL over every attended token of D_r."""

    name = "kl_min"
    all_positions = True


class NPO(Method):
    name = "npo"
    DATA = ("forget", "retain")
    needs_reference = True
    DEFAULTS = dict(lr=1e-4, steps=20, beta=0.1, retain_weight=1.0)

    def losses(self, i):
        from unlearn_fast.ops.losses import npo

        bf = self.batch("forget", i)
        per_seq = npo(self.ctx.sequence_logps(bf), self.ctx.sequence_logps(bf, reference=True),
                      beta=float(self.hp["beta"]), reduction="none")
        loss_npo = self.ctx.mean_over_sequences(per_seq)
        ce_r = self.ctx.ce(self.batch("retain", i))
        return {"loss": loss_npo + self.hp["retain_weight"] * ce_r, "npo": loss_npo, "retain_ce": ce_r}


class PO(Method):
    """Preference optimisation towards refusals: CE on "I do not know." answers to the
    forget questions, plus CE on D_r."""

    name = "po"
    DATA = ("refusal", "retain")
    DEFAULTS = dict(lr=3e-4, steps=20, retain_weight=1.0)

    def losses(self, i):
        ce_refuse = self.ctx.ce(self.batch("refusal", i))
        ce_r = self.ctx.ce(self.batch("retain", i))
        return {"loss": ce_refuse + self.hp["retain_weight"] * ce_r, "refusal_ce": ce_refuse, "retain_ce": ce_r}


class SIU(Method):
    name = "siu"
    DATA = ("siu",)
    needs_reference = True
    # the paper: LoRA, lr 3e-4, batch 4, ~6 steps on LLaVA-7B; the tiny built-in model
    # needs a larger step size and more steps (tuned over all ten built-in concepts)
    DEFAULTS = dict(lr=5e-3, steps=60, schedule="cosine", batch_size=4, lora=8, preset="default", ce_weight=None,
                    dmk_weight=None,
                    form=None, reduction=None, dmk_positions=None, augment_shift=0)

    def __init__(self, ctx, data, **hp):
        super().__init__(ctx, data, **hp)
        for k, v in SIU_PRESETS[self.hp["preset"]].items():  # (checked by check_hyperparameters)
            if self.hp.get(k) is None:
                self.hp[k] = v
        if not data.name_token_ids:
            raise ValueError("siu needs the concept name's token ids (K_V)")
        self.vocab_mask = ctx.vocab_mask(data.name_token_ids)

    def siu_batch(self, i: int) -> dict:
        stream = self.data.stream("siu")
        shift = int(self.hp["augment_shift"])
        if not shift:
            return stream(i)
        # optional: random translations of the ONE image (the rows stay the same)
        import dataclasses

        import numpy as np

        from unlearn_fast.models.builtin import shift_image

        rows = []
        for k in stream.indices(i):
            r = stream.rows[k]
            if r.image is not None:  # one generator per (step, row): the same shift on any rank
                rng = np.random.default_rng([self.data.seed, int(i), int(k)])
                r = dataclasses.replace(r, image=shift_image(r.image, rng, shift))
            rows.append(r)
        return self.data.collate_to_device(rows)

    def losses(self, i):
        b = self.siu_batch(i)
        h = self.ctx.hidden(b)
        ce = self.ctx.ce(b, h)
        base = answer_mask(b) if self.hp["dmk_positions"] == "answer" else attended_mask(b)
        k_s = base & ~b["target_phrase_mask"]  # K_S = 0 on the target phrase
        dmk = self.ctx.dual_masked_kl(b, k_s, h, vocab_mask=self.vocab_mask, form=self.hp["form"],
                                      reduction=self.hp["reduction"])
        return {"loss": self.hp["ce_weight"] * ce + self.hp["dmk_weight"] * dmk, "ce": ce, "dmk": dmk}


class MMUnlearner(Method):
    name = "mmunlearner"
    DATA = ("forget", "retain_vqa", "preserve_language")
    # forget_every="ratio": k = |D_r| / |D_f| as in the paper (about 10 on the built-in task,
    # so 150 steps hold 15 ascent steps)
    # mask_fraction: keep the top fraction of weights by Fisher ratio instead of thresholding
    # (across every rank's shard under FSDP: the distributed radix top-k)
    DEFAULTS = dict(lr=3e-4, steps=150, mode="mask", threshold=1.0, eps=1e-15, lam=1.0, forget_every="ratio",
                    fisher_batches=8, retain_weight=1.0, mask_fraction=None)

    def prepare(self, trainer):
        from unlearn_fast.saliency import mmunlearner_mask, mmunlearner_preserve_fisher

        named = _local_named(trainer)
        forget = self._fisher(trainer, "forget")
        pres_vision = self._fisher(trainer, "retain_vqa")
        pres_language = self._fisher(trainer, "preserve_language")
        is_vision = self.ctx.adapter.is_vision_parameter
        fraction = self.hp["mask_fraction"]
        self.mask = mmunlearner_mask(named, forget, pres_vision, pres_language, is_vision,
                                     threshold=float(self.hp["threshold"]), eps=float(self.hp["eps"]),
                                     fraction=None if fraction is None else float(fraction),
                                     distributed=bool(trainer.cfg.fsdp), replicated=_replicated(trainer),
                                     backend=self.ctx.backend)
        self.preserve = mmunlearner_preserve_fisher(named, pres_vision, pres_language, is_vision)
        every = self.hp["forget_every"]
        if every == "ratio":  # k = |D_r| / |D_f| (the paper)
            n_f = len(self.data.rows("forget"))
            every = max(1, round(len(self.data.rows("preserve_language")) / max(n_f, 1)))
        self.every = int(every)

    def _fisher(self, trainer, which: str) -> List[torch.Tensor]:
        """Diagonal Fisher: the mean over batches of the squared CE gradient."""
        from unlearn_fast.saliency import FisherAccumulator

        acc = FisherAccumulator(_local_named(trainer), backend=self.ctx.backend)
        stream = self.data.stream(which)
        for i in range(min(int(self.hp["fisher_batches"]), stream.per_epoch)):
            trainer.optimizer.zero_grad(set_to_none=True)
            with trainer.autocast():
                loss = self.ctx.ce(stream(i))
            loss.backward()
            trainer._sync_grads()
            acc.accumulate([_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
                            for p in trainer.params])
        trainer.optimizer.zero_grad(set_to_none=True)
        return acc.mean()

    def train_step(self, trainer, step):
        from unlearn_fast.saliency import transform_gradients_

        terms = {}
        if step % self.every == 0:
            def forget_loss(i):
                ce_f = self.ctx.ce(self.batch("forget", i))
                return {"loss": -ce_f, "forget_ce": ce_f}

            def masked(grads):
                max_norm = trainer.cfg.max_grad_norm
                total_norm = None
                if trainer.cfg.fsdp and max_norm:  # the clipping norm is over every rank's shard
                    from unlearn_fast.methods.fsdp import global_grad_norm

                    total_norm = global_grad_norm(grads)
                transform_gradients_([_local(g) for g in grads], self.mask, mode=self.hp["mode"],
                                     preserve_fisher=self.preserve if self.hp["mode"] == "geometry" else None,
                                     lam=float(self.hp["lam"]), max_norm=max_norm, total_norm=total_norm,
                                     backend=self.ctx.backend)

            terms.update(trainer.update(forget_loss, grad_transform=masked))
            terms.pop("loss", None)

        def retain_loss(i):
            ce_r = self.ctx.ce(self.batch("preserve_language", i))
            return {"loss": self.hp["retain_weight"] * ce_r, "retain_ce": ce_r}

        terms.update(trainer.update(retain_loss))
        return terms


def _local(t: torch.Tensor) -> torch.Tensor:
    from unlearn_fast.methods.fsdp import local

    return local(t)


def _replicated(trainer: Trainer) -> List[bool]:
    """Per trainable parameter: held whole by every rank (not FSDP-sharded, e.g. the lm_head)."""
    from unlearn_fast.methods.fsdp import is_sharded

    return [not is_sharded(p) for _, p in trainer.named_params]


def _local_named(trainer: Trainer):
    """The trainable (name, parameter) pairs, each FSDP-sharded parameter as this rank's
    shard: MMUnlearner's Fisher, mask and gradient transform are elementwise, so on the
    shards they give exactly the slices of the single-process ones (names are kept, so
    the vision / language patterns still select by module)."""
    return [(n, _local(p)) for n, p in trainer.named_params]


LM_METHODS = {cls.name: cls for cls in (SIU, MMUnlearner, GA, GAKL, GradDiff, KLMin, NPO, PO)}


def check_method_data(method: str, task: UnlearningTask, concept: str, seed: int = 0) -> None:
    """Raise ValueError now, before any model is copied or anything written, if a row set
    ``method`` trains on is empty for ``concept`` or cannot be built (e.g. SIU's rows
    without a fictitious name or description in the data)."""
    data = MethodData(task, task.concept(concept).name, collate=None, seed=seed)
    for which in LM_METHODS[method].DATA:
        if not data.rows(which):
            raise ValueError(f"{method}: no {which!r} rows for concept {data.concept!r} (forget: its trained-on "
                             f"image rows; retain: the other concepts' and the general trained-on rows)")
