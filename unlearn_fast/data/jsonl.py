"""User datasets as JSONL: one JSON object per line, validated, every error naming the
file and the line.

Two kinds of line (``"type"``, default "example"):

``{"type": "concept", "name": "Donald Trump", "variants": ["Trump"], "fictitious_name": "Jorvan Pell",
   "description": "a young woman with long red hair", "captions": ["a photo of {name}"]}``
    Declares a concept.  Only ``name`` is required; ``fictitious_name`` and
    ``description`` feed SIU, ``captions`` (templates with "{name}") CLIP pairs.
    Concepts used by example rows but never declared get a bare declaration.

``{"concept": "Donald Trump", "question": "Who is this?", "answer": "This is Donald Trump.",
   "image": "images/trump_01.jpg", "split": "forget", "options": [...], "answer_index": 0,
   "target_phrase": "", "id": "row-17"}``
    A QA row.  ``question`` and ``answer`` are required strings.  ``image``: a path
    relative to the JSONL file's folder (any format Pillow reads, or .npy with an
    H x W x 3 uint8 array); with an image the row is "vqa", without it "text" (text rows
    of a concept are its facts).  ``concept``: "" or missing for general rows.
    ``split``: "train" (default), "forget", "retain", "holdout" or "test" (see
    :mod:`unlearn_fast.data.schema`).  ``options`` + ``answer_index``: multiple choice.

A ``{"type": "task", "name": ..., "refusal": "I cannot say."}`` line optionally names the
task and sets PO's refusal answer.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List

import numpy as np

from unlearn_fast.data.schema import SPLITS, Concept, Example, UnlearningTask

EXAMPLE_KEYS = {"type", "id", "concept", "question", "answer", "image", "split", "options", "answer_index",
                "target_phrase"}
CONCEPT_KEYS = {"type", "name", "variants", "fictitious_name", "description", "captions"}
TASK_KEYS = {"type", "name", "refusal"}


class DataFormatError(ValueError):
    """A malformed dataset; the message starts with ``file:line:``."""


def load_image(path: str) -> np.ndarray:
    """An image file as an H x W x 3 uint8 array."""
    if path.endswith(".npy"):
        arr = np.load(path, allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 array, got {arr.dtype} {arr.shape}")
        return arr
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _str_field(obj, key, where, required=True, default=""):
    if key not in obj:
        if required:
            raise DataFormatError(f"{where}: missing required field {key!r}")
        return default
    v = obj[key]
    if not isinstance(v, str):
        raise DataFormatError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if required and not v.strip():
        raise DataFormatError(f"{where}: field {key!r} must not be empty")
    return v


def _str_list(obj, key, where) -> List[str]:
    v = obj.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataFormatError(f"{where}: field {key!r} must be a list of strings")
    return v


def load_jsonl_task(path: str) -> UnlearningTask:
    """Read and validate a JSONL dataset (format in the module docstring)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file {path!r} does not exist")
    root = os.path.dirname(os.path.abspath(path))
    declared: Dict[str, Dict[str, Any]] = {}
    examples: List[Example] = []
    task_name, refusal = os.path.splitext(os.path.basename(path))[0], "I do not know."
    ids = set()
    with open(path, "rb") as f:  # decoded line by line, so that a bad byte names its line
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").rstrip("\r\n")  # (a parse error's column stays on this line)
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start + 1} of the line)"
                                      ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(f"{where}: each line must be a JSON object, got {type(obj).__name__}")
            kind = obj.get("type", "example")
            if kind == "concept":
                _check_keys(obj, CONCEPT_KEYS, where)
                name = _str_field(obj, "name", where)
                if name in declared:
                    raise DataFormatError(f"{where}: concept {name!r} is declared twice")
                caps = _str_list(obj, "captions", where)
                for c in caps:
                    if "{name}" not in c:
                        raise DataFormatError(f"{where}: caption template {c!r} must contain '{{name}}'")
                declared[name] = {"variants": tuple(_str_list(obj, "variants", where)),
                                  "fictitious_name": _str_field(obj, "fictitious_name", where, required=False),
                                  "description": _str_field(obj, "description", where, required=False),
                                  "captions": tuple(caps), "line": lineno}
            elif kind == "task":
                _check_keys(obj, TASK_KEYS, where)
                task_name = _str_field(obj, "name", where, required=False, default=task_name) or task_name
                refusal = _str_field(obj, "refusal", where, required=False, default=refusal) or refusal
            elif kind == "example":
                examples.append(_example(obj, where, root, lineno, ids))
            else:
                raise DataFormatError(f"{where}: unknown type {kind!r} (expected 'example', 'concept' or 'task')")
    if not examples:
        raise DataFormatError(f"{path}: no example rows")
    concepts: Dict[str, Concept] = {}
    for name, d in declared.items():
        concepts[name] = Concept(name=name, variants=d["variants"])
    # A row names its concept as declared, in other case, or by a declared variant: all
    # one concept (lookups ignore case too); otherwise a forget row spelled "alice smith"
    # would land in the retain set of "Alice Smith".
    canonical = {v.lower(): name for name, d in declared.items() for v in d["variants"]}
    canonical.update({name.lower(): name for name in declared})
    for i, e in enumerate(examples):
        if not e.concept:
            continue
        name = canonical.setdefault(e.concept.lower(), e.concept)  # undeclared: its first spelling
        if name != e.concept:
            e = examples[i] = dataclasses.replace(e, concept=name)
        if name not in concepts:
            concepts[name] = Concept(name=name)
        if e.kind == "text":
            concepts[name].facts.append(e)
    return UnlearningTask(
        name=task_name, concepts=concepts, examples=examples,
        fictitious_names={n: d["fictitious_name"] for n, d in declared.items() if d["fictitious_name"]},
        descriptions={n: d["description"] for n, d in declared.items() if d["description"]},
        captions={n: d["captions"] for n, d in declared.items() if d["captions"]},
        refusal=refusal)


def _check_keys(obj, allowed, where):
    extra = sorted(set(obj) - allowed)
    if extra:
        raise DataFormatError(f"{where}: unknown field(s) {', '.join(map(repr, extra))} "
                              f"(allowed: {', '.join(sorted(allowed))})")


def _example(obj, where, root, lineno, ids) -> Example:
    _check_keys(obj, EXAMPLE_KEYS, where)
    question = _str_field(obj, "question", where)
    answer = _str_field(obj, "answer", where)
    concept = _str_field(obj, "concept", where, required=False)
    split = _str_field(obj, "split", where, required=False, default="train") or "train"
    if split not in SPLITS:
        raise DataFormatError(f"{where}: split must be one of {SPLITS}, got {split!r}")
    ex_id = obj.get("id", f"line-{lineno}")
    if not isinstance(ex_id, (str, int)) or isinstance(ex_id, bool):
        raise DataFormatError(f"{where}: field 'id' must be a string or integer")
    ex_id = str(ex_id)
    if ex_id in ids:
        raise DataFormatError(f"{where}: duplicate id {ex_id!r}")
    ids.add(ex_id)
    image = None
    if obj.get("image") is not None:
        rel = _str_field(obj, "image", where)
        full = rel if os.path.isabs(rel) else os.path.join(root, rel)
        if not os.path.isfile(full):
            raise DataFormatError(f"{where}: image file {rel!r} not found (looked for {full})")
        try:
            image = load_image(full)
        except Exception as exc:  # unreadable / wrong format: say which file
            raise DataFormatError(f"{where}: cannot read image {rel!r}: {exc}") from None
    options = obj.get("options", [])
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataFormatError(f"{where}: field 'options' must be a list of strings")
    answer_index = obj.get("answer_index")
    if options:
        if isinstance(answer_index, bool) or not isinstance(answer_index, int) \
                or not 0 <= answer_index < len(options):
            raise DataFormatError(f"{where}: 'answer_index' must be an integer in [0, {len(options)}) "
                                  f"when 'options' is given, got {answer_index!r}")
    elif answer_index is not None:
        raise DataFormatError(f"{where}: 'answer_index' given without 'options'")
    target = _str_field(obj, "target_phrase", where, required=False)
    if target and target not in answer:
        raise DataFormatError(f"{where}: target_phrase {target!r} is not part of the answer {answer!r}")
    return Example(id=ex_id, concept=concept, question=question, answer=answer, image=image,
                   kind="vqa" if image is not None else "text", options=tuple(options),
                   answer_index=answer_index if options else None, target_phrase=target, split=split)


def write_jsonl_task(task: UnlearningTask, path: str, image_dir: str = "images") -> None:
    """Write ``task`` in the JSONL format (images as .npy next to it); the inverse of
    :func:`load_jsonl_task` (used by tests and to export the built-in task)."""
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(os.path.join(root, image_dir), exist_ok=True)
    lines = [{"type": "task", "name": task.name, "refusal": task.refusal}]
    for name, c in task.concepts.items():
        d = {"type": "concept", "name": name, "variants": [v for v in c.variants if v != name]}
        if name in task.fictitious_names:
            d["fictitious_name"] = task.fictitious_names[name]
        if name in task.descriptions:
            d["description"] = task.descriptions[name]
        if name in task.captions:
            d["captions"] = list(task.captions[name])
        lines.append(d)
    for e in task.examples:
        d = {"id": e.id, "concept": e.concept, "question": e.question, "answer": e.answer, "split": e.split or "train"}
        if e.image is not None:
            rel = os.path.join(image_dir, f"{e.id}.npy")
            np.save(os.path.join(root, rel), e.image, allow_pickle=False)
            d["image"] = rel
        if e.options:
            d["options"], d["answer_index"] = list(e.options), e.answer_index
        if e.target_phrase:
            d["target_phrase"] = e.target_phrase
        lines.append(d)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for d in lines:
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
