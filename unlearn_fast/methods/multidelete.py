"""MultiDelete (Cheng & Amiri, ECCV 2024) on a CLIP-architecture dual encoder (this
module) or on LLaVA with the last token's hidden state as the fused representation
(:mod:`.multidelete_llava`); ``run_multidelete`` picks the variant by the model's class.

    L = w_md  D( M(I_f, T_perm), M^(I_f, T_f) )    deleted pairs -> look like mismatched pairs
      + w_multi D( M(I_r, T_r),  M^(I_r, T_r) )    multimodal knowledge of retained pairs kept
      + w_uni D( M(I_f),         M^(I_f) )         unimodal (image) embeddings kept

M = the frozen original, M^ = the model being unlearned, D = MSE (the reference code),
computed by the fused ``modality_decoupling_loss``.  CLIP has no fusion encoder, so the
fused image-text representation here is the element-wise product of the normalised
image and text embeddings: its sum is CLIP's matching score (cosine similarity), so
"looks like a mismatched pair" is exactly what the pair AUC measures.

T_perm: the forget batch's captions under a derangement (no caption stays with its
image).  When captions repeat (the built-in task has one caption per concept), a
deranged caption can still be the image's own text; those slots take a caption of
another concept instead, so every (I_f, T_perm) pair is truly mismatched.

``unimodal="image"`` (default) keeps the image embeddings of the forget images;
"image+text" also keeps their caption embeddings (then the two terms pull against each
other on a dual encoder, where the fused representation is a function of both).
"""
from __future__ import annotations

import copy
import os
from typing import Dict, List, Optional

import numpy as np
import torch

from unlearn_fast.ops.modality import TERM_NAMES, derangement, modality_decoupling_loss
from unlearn_fast.methods.lm import global_counts
from unlearn_fast.methods.methods import COMMON_DEFAULTS, check_hyperparameters
from unlearn_fast.methods.trainer import BatchStream, Trainer, dist_info, rank_share, seed_everything, trim_log
from unlearn_fast.models.adapters import (CLIPAdapter, LlavaAdapter, Qwen2VLAdapter, UnsupportedModelError,
                                          get_adapter)
from unlearn_fast.models.lora import Reference, merged_copy

ARCHS = ("auto", "clip", "llava")


def model_arch(adapter) -> str:
    """"clip" for a dual encoder, "llava" for a decoder vision-language model (LLaVA;
    Qwen2-VL runs the same code)."""
    if isinstance(adapter, CLIPAdapter):
        return "clip"
    if isinstance(adapter, (LlavaAdapter, Qwen2VLAdapter)):
        return "llava"
    raise UnsupportedModelError(f"multidelete runs on a CLIPModel or a LLaVA / Qwen2-VL model, not {adapter.model_class}")


def fused_pair(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """CLIP's fused pair representation: normalised image * normalised text (D,)."""
    return torch.nn.functional.normalize(image_embeds, dim=-1) * torch.nn.functional.normalize(text_embeds, dim=-1)


def check_pair_data(task, concept: str) -> None:
    """Raise ValueError unless ``task`` has the image-caption pairs MultiDelete trains on
    for ``concept`` (the run command calls it up front, before anything is written)."""
    name = task.concept(concept).name
    if len(task.image_caption_pairs(name)[0]) < 2:
        raise ValueError(f"multidelete needs at least 2 image-caption pairs of {name!r} to delete")


class MultiDelete:
    name = "multidelete"
    needs_reference = True
    # arch: "auto" (by the model's class), "clip" or "llava" (a decoder VLM, see
    # :mod:`.multidelete_llava`); the run command uses it to pick the built-in model
    DEFAULTS = dict(lr=1e-4, steps=30, batch_size=32, md_weight=1.0, multi_weight=1.0, uni_weight=1.0,
                    distance="mse", unimodal="image", arch="auto")

    def __init__(self, model, adapter: CLIPAdapter, tokenizer, task, concept: str, reference: Reference, *,
                 backend: str = "auto", seed: int = 0, **hp):
        unknown = set(hp) - set(self.DEFAULTS) - set(COMMON_DEFAULTS)
        if unknown:
            raise ValueError(f"multidelete: unknown hyperparameter(s) {sorted(unknown)}")
        self.hp = {**COMMON_DEFAULTS, **self.DEFAULTS, **hp}
        check_hyperparameters("multidelete", self.hp)
        self.model, self.adapter, self.tokenizer, self.reference, self.backend = model, adapter, tokenizer, reference, \
            backend
        self.seed = seed
        c = task.concept(concept)
        self.task, self.concept = task, c.name
        check_pair_data(task, c.name)
        f_imgs, f_caps, _ = task.image_caption_pairs(c.name)
        r_imgs, r_caps, _ = task.image_caption_pairs(exclude_concept=c.name)
        self.other_captions = sorted(set(r_caps))
        bs = int(self.hp["batch_size"])
        self.forget = BatchStream(list(zip(f_imgs, f_caps)), bs, lambda rows: rows, seed=seed, name="forget pairs")
        self.retain = BatchStream(list(zip(r_imgs, r_caps)), bs, lambda rows: rows, seed=seed + 1,
                                  name="retain pairs")

    def _embed(self, model, images, captions):
        batch = self.adapter.collate_pairs(images, captions, self.tokenizer)
        dev = next(model.parameters()).device
        batch = {k: v.to(dev) for k, v in batch.items()}
        return (self.adapter.image_embeds(model, batch["pixel_values"]),
                self.adapter.text_embeds(model, batch["input_ids"], batch["attention_mask"]))

    def mismatched_captions(self, captions: List[str], i: int) -> List[str]:
        perm = derangement(len(captions), seed=self.seed * 100003 + i).tolist()
        rng = np.random.default_rng([self.seed, i])
        out = []
        for j, p in enumerate(perm):
            cap = captions[p]
            if cap == captions[j]:  # same text: not a mismatch, take another concept's caption
                cap = self.other_captions[int(rng.integers(len(self.other_captions)))]
            out.append(cap)
        return out

    def mismatched_share(self, i: int) -> List[str]:
        """This rank's share of forget batch ``i``'s mismatched captions.  They are drawn
        over the whole global batch, so every process count pairs the same images with
        the same captions (all of them in one process)."""
        captions = [self.forget.rows[k][1] for k in self.forget.global_indices(i)]
        return rank_share(self.mismatched_captions(captions, i))

    def decoupling_loss(self, student_forget, reference_shuffled, student_retain, reference_retain,
                        student_uni, reference_uni) -> Dict[str, torch.Tensor]:
        """The weighted loss and its terms (detached references).  Under torch.distributed
        each term is this rank's share of the global batch's mean, scaled as
        ``lm.global_mean``: after the trainer averages gradients over ranks, the update is
        the one-process update whatever the shares' sizes."""
        weights = [float(self.hp["md_weight"]), float(self.hp["multi_weight"]), float(self.hp["uni_weight"])]
        distance = str(self.hp["distance"])
        pairs = (student_forget, reference_shuffled.detach(), student_retain, reference_retain.detach(),
                 student_uni, reference_uni.detach())
        world_size = dist_info()[1]
        if world_size == 1:
            loss, terms = modality_decoupling_loss(*pairs, weights=weights, distance=distance, return_terms=True,
                                                   backend=self.backend)
            return {"loss": loss, **terms}
        # the mean's denominators: elements (mse) or embeddings (cosine) of each term, all ranks'
        # (on the embeddings' device: nccl reduces CUDA tensors only; the weights are Python
        # numbers, hence one small host read a step, only under torch.distributed)
        local = [s.numel() if distance == "mse" else s.numel() // s.shape[-1] for s in pairs[::2]]
        counts = global_counts(torch.tensor(local, device=student_forget.device))
        scales = (world_size / counts.clamp(min=1.0)).tolist()
        loss, sums = modality_decoupling_loss(*pairs, weights=[w * c for w, c in zip(weights, scales)],
                                              distance=distance, reduction="sum", return_terms=True,
                                              backend=self.backend)
        return {"loss": loss, **{name: sums[name] * c for name, c in zip(TERM_NAMES, scales)}}

    def losses(self, i: int) -> Dict[str, torch.Tensor]:
        f = self.forget(i)
        r = self.retain(i)
        f_imgs, f_caps = [x for x, _ in f], [c for _, c in f]
        r_imgs, r_caps = [x for x, _ in r], [c for _, c in r]
        s_fi, s_ft = self._embed(self.model, f_imgs, f_caps)
        s_ri, s_rt = self._embed(self.model, r_imgs, r_caps)
        with self.reference.active() as ref:
            m_fi, m_fperm = self._embed(ref, f_imgs, self.mismatched_share(i))
            m_ri, m_rt = self._embed(ref, r_imgs, r_caps)
            if self.hp["unimodal"] == "image+text":
                _, m_ft = self._embed(ref, f_imgs, f_caps)  # text embeddings of T_f (the images pair them up)
        student_uni, reference_uni = s_fi, m_fi
        if self.hp["unimodal"] == "image+text":
            student_uni, reference_uni = torch.cat([s_fi, s_ft]), torch.cat([m_fi, m_ft])
        return self.decoupling_loss(fused_pair(s_fi, s_ft), fused_pair(m_fi, m_fperm), fused_pair(s_ri, s_rt),
                                    fused_pair(m_ri, m_rt), student_uni, reference_uni)

    def prepare(self, trainer: Trainer) -> None:
        pass

    def train_step(self, trainer: Trainer, step: int) -> Dict[str, float]:
        return trainer.update(self.losses)


def run_multidelete(base_model, tokenizer, task, concept: str, *, backend: str = "auto",
                    overrides: Optional[Dict] = None, seed: int = 0, out_dir: Optional[str] = None,
                    progress: bool = True, mixed_precision: str = "no", checkpoint_every: int = 0,
                    steps: Optional[int] = None):
    from unlearn_fast.methods.runner import RunResult, _train_config

    overrides = dict(overrides or {})
    if steps is not None:
        overrides["steps"] = int(steps)
    adapter = get_adapter(base_model)
    arch = model_arch(adapter)
    wanted = str(overrides.get("arch", "auto"))
    if wanted not in ARCHS:
        raise ValueError(f"multidelete: arch must be one of {ARCHS}, got {wanted!r}")
    if wanted != "auto" and wanted != arch:
        raise UnsupportedModelError(f"multidelete: arch={wanted!r} but the model is a {adapter.model_class}")
    seed_everything(seed)
    model = copy.deepcopy(base_model)
    model.requires_grad_(True)
    lora = int(overrides.get("lora", 0))
    if arch == "clip":
        if lora:
            raise ValueError("multidelete trains the full CLIP model (lora is not supported here)")
        cls = MultiDelete
    else:
        from unlearn_fast.methods.multidelete_llava import LlavaMultiDelete
        from unlearn_fast.models.lora import apply_lora

        if lora:
            model = apply_lora(model, r=lora, where=str(overrides.get("lora_where", "language")))
        cls = LlavaMultiDelete
    method = cls(model, get_adapter(model), tokenizer, task, concept, Reference(model), backend=backend, seed=seed,
                 **overrides)
    cfg = _train_config(method.hp, progress=progress, mixed_precision=mixed_precision, seed=seed,
                        checkpoint_every=checkpoint_every)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    trainer = Trainer(model, cfg, out_dir=out_dir, name="multidelete")
    resumed = trainer.step if trainer.try_resume() else 0
    log_path = os.path.join(out_dir, "log.jsonl") if out_dir else None
    trim_log(log_path, resumed)
    history = trainer.train(method.train_step, log_path=log_path)
    return RunResult(merged_copy(model).eval(), history, resumed, method.hp)
