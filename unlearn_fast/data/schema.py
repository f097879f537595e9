"""The data schema shared by the methods, the models' collate functions and the metrics.

``Example``  one question/answer row, with an image (VQA) or without (text QA).
``Concept``  a thing to forget: its name, the spellings that count as mentions, and the
             textual facts about it (text QA rows the model should keep knowing).
``UnlearningTask``  concepts + rows, with the selection helpers every method and metric
             uses (see its docstring for exactly which rows each returns).

Splits: ``"train"`` rows are the ones the base model learned (for the forgotten concept
they are the forget set, for the others the retain set), ``"holdout"`` rows were never
trained on (generality, specificity, membership inference).  User data may also say
``"forget"`` / ``"retain"`` / ``"test"`` explicitly: "forget" and "retain" count as
trained-on rows, "test" as held out.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

KINDS = ("vqa", "text")
TRAINED_SPLITS = ("train", "forget", "retain")
HELDOUT_SPLITS = ("holdout", "test")
SPLITS = TRAINED_SPLITS + HELDOUT_SPLITS


@dataclass
class Example:
    """One QA row.

    ``image``: H x W x 3 uint8 array (None for text rows).  ``options`` (multiple choice,
    MLLMU style) are full candidate answers; the correct one is ``options[answer_index]``.
    ``target_phrase``: the substring of ``answer`` whose tokens get K_S = 0 in SIU's dual
    masked KL (the new name / new description); "" when none.
    """

    id: str
    concept: str
    question: str
    answer: str
    image: Optional[np.ndarray] = field(default=None, repr=False)
    kind: str = "vqa"
    options: Tuple[str, ...] = ()
    answer_index: Optional[int] = None
    target_phrase: str = ""
    split: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"example {self.id!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "vqa" and self.image is None:
            raise ValueError(f"example {self.id!r}: a 'vqa' row needs an image")
        if self.kind == "text" and self.image is not None:
            raise ValueError(f"example {self.id!r}: a 'text' row must not carry an image")
        if self.image is not None:
            img = self.image
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"example {self.id!r}: image must be an H x W x 3 uint8 numpy array, got "
                                 f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}")
        self.options = tuple(self.options)
        if self.options:
            if self.answer_index is None or not 0 <= self.answer_index < len(self.options):
                raise ValueError(f"example {self.id!r}: answer_index must index options (0..{len(self.options) - 1}),"
                                 f" got {self.answer_index!r}")
        elif self.answer_index is not None:
            raise ValueError(f"example {self.id!r}: answer_index given without options")
        if self.target_phrase and self.target_phrase not in self.answer:
            raise ValueError(f"example {self.id!r}: target_phrase {self.target_phrase!r} is not a substring of "
                             f"the answer {self.answer!r}")


@dataclass
class Concept:
    name: str
    variants: Tuple[str, ...] = ()
    facts: List[Example] = field(default_factory=list)

    def __post_init__(self):
        self.variants = tuple(dict.fromkeys((self.name,) + tuple(self.variants)))

    def mentioned_in(self, text: str) -> bool:
        """True if any variant occurs in ``text`` as a whole word (case-insensitive)."""
        return any(re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", text, flags=re.IGNORECASE)
                   for v in self.variants)


@dataclass
class UnlearningTask:
    """Concepts and rows, plus the selections the methods and metrics use.

    Helpers (``concept`` is a concept name, matched case-insensitively; ``kind`` is
    "vqa", "text" or None for both):

    * ``forget_set(concept, kind="vqa")``: the concept's trained-on rows (the forget set).
    * ``holdout_set(concept, kind="vqa")``: the concept's held-out rows (generality, MIA).
    * ``retain_set(concept, kind=None)``: trained-on rows of every other concept and the
      general rows (concept ""): what the model must keep.
    * ``text_facts(concept)``: the concept's text QA (textual knowledge to keep).
    * ``retain_text(concept)``: every trained-on text row, the concept's own facts
      included (MMUnlearner's language preserve set).
    * ``specificity_set(concept, kind="vqa")``: held-out rows of the other concepts
      (general rows have no concept to name and are left out).
    * ``select(concept=None, kind=None, splits=None)``: the general filter behind them.

    ``fictitious_names`` / ``descriptions`` (concept -> text) feed SIU's multifaceted
    data (a new name, a description that contradicts the concept's look);
    ``captions`` (concept -> caption templates with "{name}") give CLIP pairs;
    ``refusal`` is the answer PO trains on.
    """

    name: str
    concepts: Dict[str, Concept]
    examples: List[Example]
    fictitious_names: Dict[str, str] = field(default_factory=dict)
    descriptions: Dict[str, str] = field(default_factory=dict)
    captions: Dict[str, Tuple[str, ...]] = field(default_factory=dict)
    refusal: str = "I do not know."

    # -- lookup -----------------------------------------------------------------------
    def concept(self, name: str) -> Concept:
        if not isinstance(name, str):
            raise TypeError(f"concept must be a string, got {type(name).__name__}")
        if name in self.concepts:
            return self.concepts[name]
        for key, c in self.concepts.items():
            if key.lower() == name.lower() or name.lower() in (v.lower() for v in c.variants):
                return c
        raise ValueError(f"concept {name!r} is not in task {self.name!r}; "
                         f"available: {', '.join(sorted(self.concepts))}")

    def select(self, concept: Optional[str] = None, kind: Optional[str] = None,
               splits: Optional[Sequence[str]] = None, exclude_concept: Optional[str] = None) -> List[Example]:
        rows = self.examples
        if concept is not None:
            c = self.concept(concept).name
            rows = [e for e in rows if e.concept == c]
        if exclude_concept is not None:
            c = self.concept(exclude_concept).name
            rows = [e for e in rows if e.concept != c]
        if kind is not None:
            rows = [e for e in rows if e.kind == kind]
        if splits is not None:
            rows = [e for e in rows if e.split in splits]
        return list(rows)

    def forget_set(self, concept: str, kind: Optional[str] = "vqa") -> List[Example]:
        return self.select(concept, kind, TRAINED_SPLITS)

    def holdout_set(self, concept: str, kind: Optional[str] = "vqa") -> List[Example]:
        return self.select(concept, kind, HELDOUT_SPLITS)

    def retain_set(self, concept: str, kind: Optional[str] = None) -> List[Example]:
        return self.select(None, kind, TRAINED_SPLITS, exclude_concept=concept)

    def text_facts(self, concept: str) -> List[Example]:
        return list(self.concept(concept).facts)

    def retain_text(self, concept: str) -> List[Example]:
        self.concept(concept)
        return self.select(None, "text", TRAINED_SPLITS)

    def specificity_set(self, concept: str, kind: Optional[str] = "vqa") -> List[Example]:
        # general rows (concept "") have no concept of their own to name: not counted
        return [e for e in self.select(None, kind, HELDOUT_SPLITS, exclude_concept=concept) if e.concept]

    def image_caption_pairs(self, concept: Optional[str] = None, splits: Sequence[str] = TRAINED_SPLITS,
                            exclude_concept: Optional[str] = None) -> Tuple[List[np.ndarray], List[str], List[str]]:
        """(images, captions, concept names) of the VQA rows: one caption per image (the
        concept's first caption template; see ``captions``).  General rows (concept "")
        have no caption and are left out."""
        rows = [e for e in self.select(concept, "vqa", splits, exclude_concept=exclude_concept) if e.concept]
        caps = [self.caption(e.concept) for e in rows]
        return [e.image for e in rows], caps, [e.concept for e in rows]

    def caption(self, concept: str, which: int = 0) -> str:
        c = self.concept(concept).name
        templates = self.captions.get(c) or ("a picture of {name}",)
        return templates[which % len(templates)].format(name=c)

    def all_texts(self) -> List[str]:
        """Every string of the task (for building a tokenizer over it)."""
        out = []
        for e in self.examples:
            out += [e.question, e.answer, *e.options]
        for c in self.concepts.values():
            out += list(c.variants)
            out += [self.caption(c.name, i) for i in range(len(self.captions.get(c.name, ())) or 1)]
        out += list(self.fictitious_names.values()) + list(self.descriptions.values()) + [self.refusal]
        return out
