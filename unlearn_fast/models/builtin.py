"""The built-in base models, trained once on the built-in digits task and cached.

* ``load_builtin_clip()``: a tiny ``CLIPModel`` (2-layer ViT on 8x8 px / 2x2 patches,
  2-layer text encoder) trained contrastively on image-caption pairs ("a handwritten
  digit seven"); about 15 s on one core.
* ``load_builtin_llava()``: a tiny ``LlavaForConditionalGeneration`` whose vision tower
  is the built-in CLIP's (frozen, as LLaVA-1.5 keeps its CLIP frozen) -> 16 image
  tokens, a 2-layer Llama; it learns to name digits from images ("This is seven.") and
  to answer the text facts ("What is seven plus one?" -> "Eight."); about a minute on
  one core.  Measured: 99.6% of the trained-on images named right, 92.6% of the
  held-out ones, 100% of the text facts.

Both use the byte-level BPE tokenizer built over the task's text.  They are cached under
``$UNLEARN_FAST_CACHE`` (default ``~/.cache/unlearn_fast``) as ``save_pretrained``
folders (config.json + model.safetensors + tokenizer files + train_info.json); a file
lock makes concurrent first calls train once.  The folder name carries a recipe
version: changing the recipe retrains.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Optional, Tuple

import numpy as np
import torch

from unlearn_fast.data.digits import load_builtin_task
from unlearn_fast.data.schema import UnlearningTask
from unlearn_fast.data.tokenizer import IMAGE, build_tokenizer, token_id

LLAVA_DIR = "builtin-llava-digits-v2"
CLIP_DIR = "builtin-clip-digits-v2"


def cache_dir(path: Optional[str] = None) -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "unlearn_fast")
    return path or os.environ.get("UNLEARN_FAST_CACHE") or default


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def builtin_tokenizer(task: UnlearningTask):
    return build_tokenizer(task.all_texts() + ["USER:", "ASSISTANT:", "\n"])


def tiny_llava_config(tokenizer, *, text_hidden: int = 64, text_layers: int = 2, vision_hidden: int = 48,
                      vision_layers: int = 2, image_size: int = 8, patch_size: int = 2,
                      vocab_size: Optional[int] = None):
    """A small LLaVA config over ``tokenizer`` (``vocab_size``: a wider head than the
    tokenizer, e.g. 32000 for benchmarks; the extra ids are never produced by it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                              intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                              num_attention_heads=4, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=max(vocab_size or 0, len(tokenizer)), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
                       num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=token_id(tokenizer, IMAGE),
                       projector_hidden_act="gelu", vision_feature_select_strategy="default",
                       vision_feature_layer=-1, tie_word_embeddings=False)


def tiny_clip_config(tokenizer, *, hidden: int = 48, layers: int = 2, image_size: int = 8, patch_size: int = 2,
                     projection_dim: int = 32):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim)
    vision = dict(image_size=image_size, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def _save_atomic(model, tokenizer, target: str, info: dict) -> None:
    tmp = target + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, "train_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(tmp, target)


@contextlib.contextmanager
def _threads(n: int):
    """Tiny models: one intra-op thread is fastest (OpenMP barriers cost more than the
    work; 8x slower with 2 threads on a loaded 2-core machine, measured)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _log(msg: str, quiet: bool):
    if not quiet:
        print(f"[builtin] {msg}", flush=True)


# --------------------------------------------------------------------------------------
# LLaVA
# --------------------------------------------------------------------------------------
def shift_image(img: np.ndarray, rng, max_shift: int = 1) -> np.ndarray:
    """Augmentation: translate by up to ``max_shift`` pixels, zero fill."""
    dy, dx = (int(v) for v in rng.integers(-max_shift, max_shift + 1, size=2))
    out = np.zeros_like(img)
    h, w = img.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = img[max(-dy, 0):h + min(-dy, 0),
                                                                     max(-dx, 0):w + min(-dx, 0)]
    return out


def _augment(rows, rng):
    import dataclasses

    return [dataclasses.replace(e, image=shift_image(e.image, rng)) if e.image is not None and rng.random() < 0.5
            else e for e in rows]


def train_builtin_llava(task: UnlearningTask, tokenizer, *, steps: int = 500, batch_size: int = 32, lr: float = 3e-3,
                        text_repeats: int = 16, seed: int = 0, quiet: bool = False, augment: bool = False,
                        config_kwargs: Optional[dict] = None, vision_from=None):
    """Train the tiny LLaVA on the task's trained-on rows (VQA + text facts repeated)."""
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.methods.train_utils import answer_cross_entropy
    from unlearn_fast.models.adapters import get_adapter

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer, **(config_kwargs or {})))
    if vision_from is not None:
        # like LLaVA-1.5: a contrastively pre-trained CLIP vision encoder, kept frozen;
        # the projector and the language model learn
        model.model.vision_tower.load_state_dict(vision_from.vision_model.state_dict())
        model.model.vision_tower.requires_grad_(False)
    adapter = get_adapter(model)
    rows = task.select(kind="vqa", splits=("train", "forget", "retain")) + \
        task.select(kind="text", splits=("train", "forget", "retain")) * text_repeats
    rng = np.random.default_rng(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    order = rng.permutation(len(rows))
    pos = 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(rows)), 0
        picked = [rows[i] for i in order[pos:pos + batch_size]]
        batch = adapter.collate(_augment(picked, rng) if augment else picked, tokenizer)
        pos += batch_size
        loss = answer_cross_entropy(model, adapter, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"llava step {step}/{steps} loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f}s)", quiet)
    model.requires_grad_(True)
    model.eval()
    return model, {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": float(loss.detach())}


def load_builtin_llava(cache: Optional[str] = None, *, quiet: bool = False) -> Tuple[object, object, UnlearningTask]:
    """(model, tokenizer, task): the cached tiny LLaVA, trained on first use."""
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    root = cache_dir(cache)
    target = os.path.join(root, LLAVA_DIR)
    task = load_builtin_task()
    with _file_lock(os.path.join(root, LLAVA_DIR + ".lock")):
        if not os.path.exists(os.path.join(target, "train_info.json")):
            # the vision tower comes from the built-in CLIP (as LLaVA's from OpenAI CLIP)
            clip, tokenizer, _ = load_builtin_clip(cache, quiet=quiet)
            _log(f"training the built-in LLaVA (once; cached in {target})", quiet)
            with _threads(1):
                model, info = train_builtin_llava(task, tokenizer, quiet=quiet, vision_from=clip)
            _save_atomic(model, tokenizer, target, info)
    model = LlavaForConditionalGeneration.from_pretrained(target)
    model.eval()
    return model, PreTrainedTokenizerFast.from_pretrained(target), task


# --------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------
def clip_class_loss(model, adapter, tokenizer, task, images, concepts, template: int = 0,
                    temperature: float = 0.07) -> torch.Tensor:
    """Image -> caption cross-entropy over every concept's caption (classes, not in-batch
    pairs: with class captions in-batch negatives would be false negatives), plus caption
    -> image cross-entropy spread uniformly over the batch's images of that class."""
    names = list(task.concepts)
    caps = adapter.collate_captions([task.caption(n, template) for n in names], tokenizer)
    txt = torch.nn.functional.normalize(adapter.text_embeds(model, caps["input_ids"], caps["attention_mask"]), dim=-1)
    img = torch.nn.functional.normalize(adapter.image_embeds(model, images), dim=-1)
    logits = img @ txt.t() / temperature
    y = torch.tensor([names.index(c) for c in concepts])
    loss_i = torch.nn.functional.cross_entropy(logits, y)
    onehot = torch.nn.functional.one_hot(y, len(names)).float().t()  # (C, B)
    present = onehot.sum(1) > 0
    target = onehot[present] / onehot[present].sum(1, keepdim=True)
    loss_t = -(target * torch.log_softmax(logits.t()[present], dim=-1)).sum(-1).mean()
    return (loss_i + loss_t) / 2


def train_builtin_clip(task: UnlearningTask, tokenizer, *, steps: int = 400, batch_size: int = 64, lr: float = 3e-3,
                       seed: int = 0, quiet: bool = False, augment: bool = False):
    from transformers import CLIPModel

    from unlearn_fast.models.adapters import get_adapter, images_to_tensor

    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(tokenizer))
    adapter = get_adapter(model)
    imgs, _, concepts = task.image_caption_pairs()
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = rng.choice(len(imgs), size=batch_size, replace=False)
        picked = [shift_image(imgs[i], rng) if augment and rng.random() < 0.5 else imgs[i] for i in idx]
        pixels = images_to_tensor(picked, (adapter.image_size, adapter.image_size))
        loss = clip_class_loss(model, adapter, tokenizer, task, pixels, [concepts[i] for i in idx],
                               template=step % 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            _log(f"clip step {step}/{steps} loss {float(loss.detach()):.4f} ({time.perf_counter() - t0:.0f}s)", quiet)
    model.eval()
    return model, {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": float(loss.detach())}


def load_builtin_clip(cache: Optional[str] = None, *, quiet: bool = False):
    """(model, tokenizer, task): the cached tiny CLIP, trained on first use."""
    from transformers import CLIPModel, PreTrainedTokenizerFast

    root = cache_dir(cache)
    target = os.path.join(root, CLIP_DIR)
    task = load_builtin_task()
    with _file_lock(os.path.join(root, CLIP_DIR + ".lock")):
        if not os.path.exists(os.path.join(target, "train_info.json")):
            _log(f"training the built-in CLIP (once; cached in {target})", quiet)
            tokenizer = builtin_tokenizer(task)
            with _threads(1):
                model, info = train_builtin_clip(task, tokenizer, quiet=quiet)
            _save_atomic(model, tokenizer, target, info)
    model = CLIPModel.from_pretrained(target)
    model.eval()
    return model, PreTrainedTokenizerFast.from_pretrained(target), task
