"""SIU's multifaceted fine-tuning data, built from ONE image of the concept (Li et al.,
NeurIPS 2024, SPEC.md section 1):

1. aligning with an unseen concept: image + each "who is this"-style question -> the
   answer with the concept's name replaced by a fictitious new name (target phrase:
   the new name);
2. assigning a new visual description: image + "Is <name> in this picture?" ->
   "No. The picture shows <a description contradicting the concept's look>." (target
   phrase: the whole answer);
3. decoupling factual knowledge: text only, the concept's own facts (no target phrase:
   the model keeps knowing them as text);
4. preserving non-targeted knowledge: text only QA about other concepts.
"""
from __future__ import annotations

import re
from typing import List, Optional

import numpy as np

from unlearn_fast.data.schema import TRAINED_SPLITS, Example, UnlearningTask

DEFAULT_QUESTIONS = ("Who is this?", "What is shown in this picture?")


def replace_name(text: str, variants, new_name: str) -> Optional[str]:
    """``text`` with every whole-word mention of a variant replaced, or None if none occurs."""
    pattern = r"(?<!\w)(" + "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True)) + r")(?!\w)"
    out, n = re.subn(pattern, new_name, text, flags=re.IGNORECASE)
    return out if n else None


def representative_image(rows: List[Example], size: int = 32) -> Example:
    """The row whose image is closest (L2, greyscale, resized to ``size`` x ``size``) to
    the mean image of ``rows``: a typical picture of the concept, as a benchmark would
    pick a clear photo.  Model-free and uses only the given (trained-on) rows."""
    import torch

    imgs = []
    for r in rows:
        x = torch.from_numpy(np.ascontiguousarray(r.image)).float().mean(-1)[None, None] / 255.0
        imgs.append(torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                                    antialias=True)[0, 0])
    stack = torch.stack(imgs)
    d = (stack - stack.mean(0)).flatten(1).norm(dim=1)
    return rows[int(d.argmin())]


def build_siu_examples(task: UnlearningTask, concept: str, image_example: Optional[Example] = None, *,
                       new_name: Optional[str] = None, description: Optional[str] = None,
                       other_facts: int = 12, seed: int = 0) -> List[Example]:
    """The four kinds of SIU rows for ``concept`` from one image.

    ``image_example``: the single forget image (default: the concept's most typical
    trained-on image, :func:`representative_image`).  ``new_name`` / ``description`` default to the task's
    ``fictitious_names`` / ``descriptions`` for the concept (a ValueError says so when
    the task has none).  ``other_facts``: how many text rows of other concepts (kind 4).
    """
    c = task.concept(concept)
    if image_example is None:
        rows = task.forget_set(c.name, kind="vqa")
        if not rows:
            raise ValueError(f"concept {c.name!r} has no image rows to unlearn from (split train/forget)")
        image_example = representative_image(rows)
    if image_example.image is None:
        raise ValueError("SIU needs an image example (kind 'vqa'), got a text row")
    new_name = new_name or task.fictitious_names.get(c.name)
    description = description or task.descriptions.get(c.name)
    if not new_name:
        raise ValueError(f"SIU needs a fictitious new name for {c.name!r}: give new_name= or a "
                         f"'fictitious_name' in the data")
    if not description:
        raise ValueError(f"SIU needs a contradicting description for {c.name!r}: give description= or a "
                         f"'description' in the data")
    img = image_example.image
    questions = list(dict.fromkeys(e.question for e in task.forget_set(c.name, kind="vqa"))) or list(DEFAULT_QUESTIONS)
    out: List[Example] = []
    for i, q in enumerate(questions):
        answer = replace_name(image_example.answer, c.variants, new_name) or f"This is {new_name}."
        out.append(Example(id=f"siu-align-{i}", concept=c.name, question=q, answer=answer, image=img, kind="vqa",
                           target_phrase=new_name, split="forget"))
    desc_answer = f"No. The picture shows {description}."
    out.append(Example(id="siu-describe", concept=c.name, question=f"Is {c.name} in this picture?",
                       answer=desc_answer, image=img, kind="vqa", target_phrase=desc_answer, split="forget"))
    for i, fact in enumerate(f for f in c.facts if f.split in TRAINED_SPLITS):  # held-out facts: never trained on
        out.append(Example(id=f"siu-fact-{i}", concept=c.name, question=fact.question, answer=fact.answer,
                           kind="text", split="retain"))
    others = [e for e in task.retain_text(c.name) if e.concept != c.name]
    rng = np.random.default_rng(seed)
    for i, j in enumerate(rng.permutation(len(others))[:other_facts]):
        e = others[int(j)]
        out.append(Example(id=f"siu-other-{i}", concept=e.concept, question=e.question, answer=e.answer,
                           kind="text", split="retain"))
    return out
