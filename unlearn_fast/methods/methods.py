"""The unlearning methods: one small class each, sharing ``Trainer`` (trainer.py) and
the fused loss terms (lm.py).  A method gets an ``LMContext`` (model, adapter, backend,
reference) and a ``MethodData`` (lists of collated batches), and supplies
``step_losses(i) -> {"loss": total, <term>: value, ...}``.

Formulas (SPEC.md):
  ga         -CE(D_f)
  graddiff   -CE(D_f) + CE(D_r)
  ga_kl      -CE(D_f) + KL(orig || cur) on D_r's answer tokens          (TOFU's "KL")
  kl_min     -CE(D_f) + KL(orig || cur) on every attended token of D_r  (MMUnlearner's KL_Min)
  npo        -(2/b) mean log sigmoid(-b (log pi(y|x) - log pi_ref(y|x))) on D_f  + CE(D_r)
  po         CE(refusal answers to D_f questions) + CE(D_r)
  siu        w_ce CE(multifaceted data) + w_dmk DMK(orig, cur; K_S = 0 on target phrases,
             K_V = 0 on the concept name's token ids)
  mmunlearner  every k steps an ascent step on D_f with gradients clipped then masked by
             the saliency map m = 1[(F_f + eps) / (F_p + eps) >= tau] (vision modules: preserve
             = retain VQA; language modules: retain VQA + text QA); every step descent on D_r.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from unlearn_fast.methods import lm
from unlearn_fast.methods.lm import LMContext


@dataclass
class MethodData:
    forget: List[dict] = field(default_factory=list)          # image QA on the forgotten concept
    retain: List[dict] = field(default_factory=list)          # other concepts (image QA) + text QA
    retain_vqa: List[dict] = field(default_factory=list)      # MMUnlearner's vision preserve set
    retain_text: List[dict] = field(default_factory=list)     # text-only QA incl. the concept's facts
    siu: List[dict] = field(default_factory=list)             # SIU multifaceted batches (with token_mask)
    refusal: List[dict] = field(default_factory=list)         # D_f questions with refusal answers (PO)
    forget_token_ids: List[int] = field(default_factory=list)  # the concept name's token ids (K_V)


def _cycle(batches: List[dict], i: int, what: str) -> dict:
    if not batches:
        raise ValueError(f"this method needs {what} batches, but the data has none")
    return batches[i % len(batches)]


class Method:
    name = "base"
    needs_reference = False

    def __init__(self, ctx: LMContext, data: MethodData, **hp):
        self.ctx, self.data, self.hp = ctx, data, hp

    def prepare(self) -> None:
        """One-off work before training (e.g. Fisher information)."""

    def step_losses(self, i: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    grad_hook = None


class GA(Method):
    name = "ga"

    def step_losses(self, i):
        ce_f = lm.cross_entropy(self.ctx, _cycle(self.data.forget, i, "forget"))
        return {"loss": -ce_f, "forget_ce": ce_f}


class GradDiff(Method):
    name = "graddiff"

    def step_losses(self, i):
        ce_f = lm.cross_entropy(self.ctx, _cycle(self.data.forget, i, "forget"))
        ce_r = lm.cross_entropy(self.ctx, _cycle(self.data.retain, i, "retain"))
        return {"loss": -ce_f + self.hp.get("retain_weight", 1.0) * ce_r, "forget_ce": ce_f, "retain_ce": ce_r}


class GAKL(Method):
    name = "ga_kl"
    needs_reference = True
    all_tokens = False

    def step_losses(self, i):
        ce_f = lm.cross_entropy(self.ctx, _cycle(self.data.forget, i, "forget"))
        batch_r = _cycle(self.data.retain, i, "retain")
        mask = batch_r["attention_mask"].bool() if self.all_tokens else None
        kl = lm.reference_kl(self.ctx, batch_r, token_mask=mask)
        return {"loss": -ce_f + self.hp.get("kl_weight", 1.0) * kl, "forget_ce": ce_f, "retain_kl": kl}


class KLMin(GAKL):
    name = "kl_min"
    all_tokens = True


class NPO(Method):
    name = "npo"
    needs_reference = True

    def step_losses(self, i):
        beta = self.hp.get("beta", 0.1)
        npo = lm.npo_loss(self.ctx, _cycle(self.data.forget, i, "forget"), beta)
        ce_r = lm.cross_entropy(self.ctx, _cycle(self.data.retain, i, "retain"))
        return {"loss": npo + self.hp.get("retain_weight", 1.0) * ce_r, "npo": npo, "retain_ce": ce_r}


class PO(Method):
    name = "po"

    def step_losses(self, i):
        ce_refuse = lm.cross_entropy(self.ctx, _cycle(self.data.refusal, i, "refusal"))
        ce_r = lm.cross_entropy(self.ctx, _cycle(self.data.retain, i, "retain"))
        return {"loss": ce_refuse + self.hp.get("retain_weight", 1.0) * ce_r, "refusal_ce": ce_refuse,
                "retain_ce": ce_r}


# SIU presets: (CE weight, DMK weight, form, reduction)
SIU_PRESETS = {
    "default": (1.0, 1.0, "kl", "mean"),
    "reference": (0.9, 0.75, "cross_entropy", "siu"),  # the released code's weights and normalisation
}


class SIU(Method):
    name = "siu"
    needs_reference = True

    def __init__(self, ctx, data, **hp):
        super().__init__(ctx, data, **hp)
        preset = SIU_PRESETS[hp.get("preset", "default")]
        self.ce_weight = hp.get("ce_weight", preset[0])
        self.dmk_weight = hp.get("dmk_weight", preset[1])
        self.form = hp.get("form", preset[2])
        self.reduction = hp.get("reduction", preset[3])
        if not data.forget_token_ids:
            raise ValueError("SIU needs the concept name's token ids (K_V) in MethodData.forget_token_ids")

    def step_losses(self, i):
        batch = _cycle(self.data.siu, i, "SIU multifaceted")
        ce = lm.cross_entropy(self.ctx, batch)
        # K_S: every attended position except the target-phrase tokens
        token_mask = batch["attention_mask"].bool() & batch["token_mask"].bool()
        dmk = lm.reference_kl(self.ctx, batch, token_mask=token_mask, forget_token_ids=self.data.forget_token_ids,
                              form=self.form, reduction=self.reduction)
        return {"loss": self.ce_weight * ce + self.dmk_weight * dmk, "ce": ce, "dmk": dmk}


class MMUnlearner(Method):
    name = "mmunlearner"

    def __init__(self, ctx, data, **hp):
        super().__init__(ctx, data, **hp)
        self.mode = hp.get("mode", "mask")  # or "geometry" (SFR-on)
        self.threshold = hp.get("threshold", 1.0)
        self.max_norm = hp.get("max_grad_norm", 1.0)
        self.every = max(1, int(hp.get("forget_every", 1)))
        self.fisher_batches = int(hp.get("fisher_batches", 8))
        self.mask = None
        self.preserve_fisher = None

    def _fisher(self, params, batch_lists):
        from unlearn_fast.saliency import FisherAccumulator

        acc = FisherAccumulator(params)
        n = 0
        for batches in batch_lists:
            for batch in batches[: self.fisher_batches]:
                self.ctx.model.zero_grad(set_to_none=True)
                lm.cross_entropy(self.ctx, batch).backward()
                acc.accumulate([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
                n += 1
        self.ctx.model.zero_grad(set_to_none=True)
        if n == 0:
            raise ValueError("MMUnlearner needs forget and preserve batches to estimate the Fisher information")
        return acc.mean()

    def prepare(self):
        from unlearn_fast.saliency import ratio_mask

        named = [(n, p) for n, p in self.ctx.model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        vision = self.ctx.adapter.is_vision_parameter
        forget_f = self._fisher(params, [self.data.forget])
        # preserve Fisher: vision modules see retain VQA only; language modules also text QA
        pres_vqa = self._fisher(params, [self.data.retain_vqa or self.data.retain])
        pres_all = self._fisher(params, [self.data.retain_vqa or self.data.retain, self.data.retain_text])
        preserve = [pv if vision(n) else pa for (n, _), pv, pa in zip(named, pres_vqa, pres_all)]
        self.mask = ratio_mask(forget_f, preserve, threshold=self.threshold)
        self.preserve_fisher = preserve
        self.params = params

    def step_losses(self, i):
        from unlearn_fast.saliency import transform_gradients_

        terms = {}
        if i % self.every == 0:
            ce_f = lm.cross_entropy(self.ctx, _cycle(self.data.forget, i, "forget"))
            (-ce_f).backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, g in zip(self.params, grads):
                p.grad = g
            transform_gradients_(grads, self.mask, mode=self.mode,
                                 preserve_fisher=self.preserve_fisher if self.mode == "geometry" else None,
                                 max_norm=self.max_norm)
            terms["forget_ce"] = ce_f.detach()
        ce_r = lm.cross_entropy(self.ctx, _cycle(self.data.retain, i, "retain"))
        terms["retain_ce"] = ce_r
        terms["loss"] = ce_r
        return terms


LM_METHODS = {cls.name: cls for cls in (SIU, MMUnlearner, GA, GAKL, GradDiff, KLMin, NPO, PO)}
