"""Model adapters: where a transformers vision-language model keeps what the unlearning
methods need (final hidden states, lm_head, vision vs language modules), and how to turn
:class:`~unlearn_fast.data.Example` rows into a batch with the image tokens ALREADY
expanded, so labels, target-phrase masks and token masks are aligned with ``input_ids``
(SIU's reference code builds its masks before expansion and misaligns them).

Prompt format (one turn)::

    <s>USER: <image tokens>\\n{question} ASSISTANT: {answer}</s>     (VQA)
    <s>USER: {question} ASSISTANT: {answer}</s>                    (text only)

``labels`` are -100 everywhere except the answer tokens and the closing ``</s>``;
position t of the hidden states predicts token t + 1 (the usual causal shift is done by
the loss code, not here).

Supported: ``LlavaForConditionalGeneration``, ``Qwen2VLForConditionalGeneration`` (and
``Qwen2_5_VLForConditionalGeneration``), ``CLIPModel``, and peft-wrapped versions of them
(``get_adapter`` looks through the wrapper; parameter names may carry peft's prefixes).
"""
from __future__ import annotations

import inspect
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from unlearn_fast.data.schema import Example
from unlearn_fast.data.tokenizer import IMAGE, VISION_END, VISION_START, token_id

IGNORE_INDEX = -100
# CLIP's image normalisation (used by LLaVA-1.5 and the built-in models)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor's normalisation


class UnsupportedModelError(TypeError):
    """The model class has no adapter, or lacks something a method needs (an lm_head)."""


def unwrap(model):
    """The transformers model inside a peft wrapper (the same object otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and _is_peft(model) else model


def _is_peft(model) -> bool:
    return type(model).__module__.startswith("peft.")


def _strip_peft(name: str) -> str:
    # peft: base_model.model.<hf name>, LoRA weights: ...<module>.lora_A.default.weight
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name


def images_to_tensor(images: Sequence[np.ndarray], size: Optional[Tuple[int, int]], mean=CLIP_MEAN, std=CLIP_STD,
                     dtype=torch.float32) -> torch.Tensor:
    """H x W x 3 uint8 images -> (N, 3, h, w) normalised floats, bilinearly resized to ``size``."""
    out = []
    for img in images:
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError("images must be H x W x 3 uint8 numpy arrays")
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)[None]
        if size is not None and tuple(x.shape[-2:]) != tuple(size):
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        out.append(x[0])
    x = torch.stack(out)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).to(dtype)


def _accepted_kwargs(fn, kwargs: Dict) -> Dict:
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        # **kwargs models: pass only what we know they use by name
        return {k: v for k, v in kwargs.items() if k in params or k in ("mm_token_type_ids",)}
    return {k: v for k, v in kwargs.items() if k in params}


class ModelAdapter:
    """Base class; see the module docstring.  Subclasses set ``VISION_PATTERN`` (a regex
    over parameter names, peft prefixes stripped) and implement the image parts."""

    family = "base"
    VISION_PATTERN = r"$^"
    FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, model):
        self.model_class = type(unwrap(model)).__name__
        self.config = unwrap(model).config

    # -- parameters -------------------------------------------------------------------
    def is_vision_parameter(self, name: str) -> bool:
        """True for the vision tower and the projector, False for the language model."""
        return re.search(self.VISION_PATTERN, _strip_peft(name)) is not None

    # -- language-model head ------------------------------------------------------------
    def lm_head(self, model) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        head = unwrap(model).get_output_embeddings()
        if head is None or not hasattr(head, "weight"):
            raise UnsupportedModelError(f"{self.model_class} has no lm_head (get_output_embeddings() is None); "
                                        f"the language-model methods need a model with a head")
        return head.weight, getattr(head, "bias", None)

    def base_model(self, model):
        """The module whose forward returns the final hidden states (after the final norm)."""
        inner = getattr(unwrap(model), "model", None)
        if inner is None:
            raise UnsupportedModelError(f"{self.model_class} has no .model backbone")
        return inner

    def forward_kwargs(self, model, batch: Dict) -> Dict:
        """The entries of ``batch`` that the model's forward takes."""
        kw = {k: batch[k] for k in self.FORWARD_KEYS if k in batch and batch[k] is not None}
        return _accepted_kwargs(unwrap(model).forward, kw)

    def hidden_states(self, model, batch: Dict) -> torch.Tensor:
        """(B, T, H) final hidden states, no logits computed."""
        inner = self.base_model(model)
        out = inner(**_accepted_kwargs(inner.forward, self.forward_kwargs(model, batch)), use_cache=False)
        return out.last_hidden_state

    def logits(self, model, batch: Dict) -> torch.Tensor:
        """Full logits (the eager baseline path and generation only)."""
        w, b = self.lm_head(model)
        h = self.hidden_states(model, batch)
        return torch.nn.functional.linear(h, w, b)

    # -- collate --------------------------------------------------------------------------
    def image_tokens(self, tokenizer, image: np.ndarray) -> List[int]:
        raise NotImplementedError

    def pixel_inputs(self, images: List[np.ndarray]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def _encode(self, tokenizer, text: str) -> List[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_example(self, ex: Example, tokenizer, with_answer: bool = True):
        """(ids, labels, target-phrase flags, image-token flags) of one example."""
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an eos token (it ends every answer)")
        # a BOS where the tokenizer has one (LLaVA's Llama); Qwen2-VL's tokenizer has none
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        if ex.image is not None:
            ids += self._encode(tokenizer, "USER:")
            img = self.image_tokens(tokenizer, ex.image)
            ids += img
            ids += self._encode(tokenizer, "\n" + ex.question + " ASSISTANT:")
        else:
            ids += self._encode(tokenizer, "USER: " + ex.question + " ASSISTANT:")
        n_prompt = len(ids)
        labels = [IGNORE_INDEX] * n_prompt
        target = [False] * n_prompt
        if with_answer:
            text = " " + ex.answer
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            lo = hi = -1
            if ex.target_phrase:
                lo = text.index(ex.target_phrase)
                hi = lo + len(ex.target_phrase)
            for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
                ids.append(tid)
                labels.append(tid)
                # a token belongs to the target phrase if its characters overlap it
                target.append(lo >= 0 and s < hi and e > lo)
            ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
            target.append(False)
        return ids, labels, target

    def collate(self, examples: Sequence[Example], tokenizer, *, with_answer: bool = True,
                padding_side: str = "right") -> Dict[str, torch.Tensor]:
        """A batch per the contract: input_ids, attention_mask, labels, target_phrase_mask,
        image_token_mask, pixel_values (+ model extras); image tokens expanded."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if not examples:
            raise ValueError("collate needs at least one example")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token")
        enc = [self.encode_example(e, tokenizer, with_answer) for e in examples]
        T = max(len(ids) for ids, _, _ in enc)
        B = len(examples)
        input_ids = torch.full((B, T), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        target = torch.zeros((B, T), dtype=torch.bool)
        for i, (ids, lab, tgt) in enumerate(enc):
            n = len(ids)
            sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
            input_ids[i, sl] = torch.tensor(ids)
            attention[i, sl] = 1
            labels[i, sl] = torch.tensor(lab)
            target[i, sl] = torch.tensor(tgt, dtype=torch.bool)
        batch = {"input_ids": input_ids, "attention_mask": attention, "labels": labels,
                 "target_phrase_mask": target}
        images = [e.image for e in examples if e.image is not None]
        batch["image_token_mask"] = input_ids == self.image_token_id(tokenizer)
        if images:
            batch.update(self.pixel_inputs(images))
        self.add_extras(batch, tokenizer)
        return batch

    def image_token_id(self, tokenizer) -> int:
        tid = getattr(self.config, "image_token_id", None)
        if tid is None:
            tid = getattr(self.config, "image_token_index", None)
        return int(tid) if tid is not None else token_id(tokenizer, IMAGE)

    def add_extras(self, batch, tokenizer) -> None:
        """Model-specific extra tensors (Qwen2-VL's mm_token_type_ids)."""


class LlavaAdapter(ModelAdapter):
    family = "llava"
    VISION_PATTERN = r"(^|\.)(vision_tower|multi_modal_projector)\."
    FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values")

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.image_size = int(vc.image_size)
        # A CLIP tower outputs a CLS token before the patches, a SigLIP tower (e.g.
        # llava-interleave) does not; the "default" feature strategy drops the first
        # output token, "full" keeps them all.
        siglip = getattr(vc, "model_type", "") == "siglip_vision_model"
        tokens = (self.image_size // int(vc.patch_size)) ** 2 + (0 if siglip else 1)
        if getattr(self.config, "vision_feature_select_strategy", "default") == "default":
            tokens -= 1
        self.num_image_tokens = tokens
        self.pixel_mean, self.pixel_std = (SIGLIP_MEAN, SIGLIP_STD) if siglip else (CLIP_MEAN, CLIP_STD)

    def image_tokens(self, tokenizer, image):
        return [self.image_token_id(tokenizer)] * self.num_image_tokens

    def pixel_inputs(self, images):
        return {"pixel_values": images_to_tensor(images, (self.image_size, self.image_size), self.pixel_mean,
                                                 self.pixel_std)}


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    VISION_PATTERN = r"(^|\.)visual\."
    FORWARD_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")

    def __init__(self, model):
        super().__init__(model)
        vc = self.config.vision_config
        self.patch = int(vc.patch_size)
        self.merge = int(vc.spatial_merge_size)
        self.temporal = int(vc.temporal_patch_size)

    def _grid(self, image) -> Tuple[int, int]:
        f = self.patch * self.merge
        h = max(f, int(round(image.shape[0] / f)) * f)
        w = max(f, int(round(image.shape[1] / f)) * f)
        return h // self.patch, w // self.patch

    def image_tokens(self, tokenizer, image):
        gh, gw = self._grid(image)
        n = gh * gw // (self.merge ** 2)
        start = getattr(self.config, "vision_start_token_id", None)
        end = getattr(self.config, "vision_end_token_id", None)
        start = int(start) if start is not None else token_id(tokenizer, VISION_START)
        end = int(end) if end is not None else token_id(tokenizer, VISION_END)
        return [start] + [self.image_token_id(tokenizer)] * n + [end]

    def pixel_inputs(self, images):
        # the layout of Qwen2VLImageProcessor.patchify: (gh/m, gw/m, m, m, C, T, p, p) flattened
        flat, grids = [], []
        p, m, t = self.patch, self.merge, self.temporal
        for img in images:
            gh, gw = self._grid(img)
            x = images_to_tensor([img], (gh * p, gw * p))[0]  # (C, H, W)
            c = x.shape[0]
            x = x.reshape(c, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
            x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)
            flat.append(x.reshape(gh * gw, c * t * p * p))
            grids.append((1, gh, gw))
        return {"pixel_values": torch.cat(flat), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}

    def add_extras(self, batch, tokenizer):
        batch["mm_token_type_ids"] = (batch["input_ids"] == self.image_token_id(tokenizer)).to(torch.int32)


class CLIPAdapter(ModelAdapter):
    """Dual encoder: embeddings, no lm_head (the language-model methods refuse it)."""

    family = "clip"
    VISION_PATTERN = r"(^|\.)(vision_model|visual_projection)\."

    def __init__(self, model):
        super().__init__(model)
        self.image_size = int(self.config.vision_config.image_size)

    def lm_head(self, model):
        raise UnsupportedModelError(f"{self.model_class} is a dual encoder without an lm_head; use it with "
                                    f"--method multidelete (the language-model methods need LLaVA or Qwen2-VL)")

    def hidden_states(self, model, batch):
        self.lm_head(model)

    def collate(self, examples, tokenizer, **kwargs):
        self.lm_head(None)

    def image_embeds(self, model, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, D), not normalised."""
        m = unwrap(model)
        return m.visual_projection(m.vision_model(pixel_values=pixel_values).pooler_output)

    def text_embeds(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projected text embeddings (B, D) pooled at the first ``</s>``, not normalised."""
        m = unwrap(model)
        return m.text_projection(m.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)

    def collate_pairs(self, images: Sequence[np.ndarray], captions: Sequence[str],
                      tokenizer) -> Dict[str, torch.Tensor]:
        if len(images) != len(captions):
            raise ValueError(f"got {len(images)} images but {len(captions)} captions")
        batch = self.collate_captions(captions, tokenizer)
        batch["pixel_values"] = images_to_tensor(list(images), (self.image_size, self.image_size))
        return batch

    def collate_captions(self, captions: Sequence[str], tokenizer) -> Dict[str, torch.Tensor]:
        eos = getattr(self.config.text_config, "eos_token_id", None)
        if eos is None or eos == 2:
            # OpenAI's CLIP configs carry the legacy eos_token_id = 2 while the tokenizer's
            # end-of-text is its largest id; CLIPTextModel then pools at argmax(input_ids),
            # i.e. at the tokenizer's end-of-text: end every caption with that
            eos = tokenizer.eos_token_id
        seqs = [[tokenizer.bos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"] + [eos]
                for c in captions]
        limit = int(self.config.text_config.max_position_embeddings)
        if max(len(s) for s in seqs) > limit:
            raise ValueError(f"a caption is longer than the text encoder's {limit} positions")
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), tokenizer.pad_token_id, dtype=torch.long)
        att = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            att[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": att}


_ADAPTERS = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLAdapter,
    "Qwen2_5_VLForConditionalGeneration": Qwen2VLAdapter,
    "CLIPModel": CLIPAdapter,
}


def get_adapter(model) -> ModelAdapter:
    """The adapter for ``model`` (peft wrappers looked through).  Raises
    :class:`UnsupportedModelError` for other classes, saying which are supported and, for
    a backbone without a head (e.g. ``LlavaModel``), that an lm_head is missing."""
    inner = unwrap(model)
    name = type(inner).__name__
    if name in _ADAPTERS:
        return _ADAPTERS[name](model)
    head = getattr(inner, "get_output_embeddings", lambda: None)()
    if head is None:
        raise UnsupportedModelError(f"{name} has no lm_head: the unlearning methods need a vision-language model "
                                    f"with a language-model head ({', '.join(_ADAPTERS)}) or a CLIPModel")
    raise UnsupportedModelError(f"no adapter for {name}; supported: {', '.join(_ADAPTERS)}")
