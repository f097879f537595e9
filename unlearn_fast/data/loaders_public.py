"""Loaders for the public multimodal-unlearning benchmark formats, returning the shared
schema (:class:`~unlearn_fast.data.schema.UnlearningTask`).

MLLMU-Bench (Liu et al. 2024, parquet files of the Hugging Face dataset MLLMMU/MLLMU-Bench)
    One row per fictitious profile, columns:
      ``ID`` (str); ``image`` ({"bytes", "path"}; the Test_Set has ``images``, a list of
      them); ``biography``; ``question`` / ``answer`` (one VQA pair, optional);
      ``Classification_Task``: {"Image_Textual_Questions": [...], "Pure_Text_Questions":
      [...]}, each item {"Question", "Options": {"A": ..., "D": ...}, "Correct_Answer":
      "A".."D"}; ``Mask_Task``: [{"Question" (with "__"), "Ground_Truth", "Type":
      "Image_Textual" | "Pure_Text"}]; ``Generation_Task``: [{"Question",
      "Ground_Truth", "Type"}].
    Each profile becomes a concept (named by a ``name`` / ``Name`` column, by ``names=``
    {ID: name}, or else by its ID) and every question a row: "vqa" with the profile
    image for Image_Textual items, "text" for Pure_Text ones.  Classification items keep
    their options (scored by option log-likelihood); Mask items ask to fill "[Blank]".
    The split comes from the file / folder name (forget_5 -> "forget", retain_95 ->
    "retain", Test_Set -> "test", anything else -> "train") or from ``sources`` given as
    {split: path}.

MMUBench-style folders (SIU, Li et al. 2024)
    ``root/<concept>/*.jpg|png|...``: one folder of images per concept (folder name =
    concept name, "_" read as a space).  Optional ``root/concepts.json``: {concept:
    {"variants": [...]}}; optional ``root/<concept>/facts.jsonl``: {"question",
    "answer"} lines (text facts to keep).  Per concept the first ``train_images``
    images (sorted by file name; SIU trains on ONE) are split "train", the rest
    "holdout".  Every image is a "vqa" row ``question`` -> ``answer_template``, with
    multiple-choice options naming the concept and up to three others.
"""
from __future__ import annotations

import io
import json
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from unlearn_fast.data.schema import Concept, Example, UnlearningTask

MLLMU_TASKS = ("classification", "mask", "generation", "vqa")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
LETTERS = "ABCDEFGH"


class PublicFormatError(ValueError):
    """A file does not follow the format it was loaded as (the message names it)."""


# ------------------------------------------------------------------------------ images
def decode_image(data, where: str) -> np.ndarray:
    """Image bytes / a {"bytes", "path"} struct / a path -> H x W x 3 uint8 array."""
    from PIL import Image

    if isinstance(data, dict):
        if data.get("bytes"):
            data = data["bytes"]
        elif data.get("path") and os.path.exists(data["path"]):
            data = data["path"]
        else:
            raise PublicFormatError(f"{where}: image struct has neither bytes nor an existing path")
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
        # a writable copy (torch.from_numpy warns on a read-only view)
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:  # PIL raises several types for unreadable data
        raise PublicFormatError(f"{where}: cannot decode the image ({exc})") from exc


# --------------------------------------------------------------------------- MLLMU-Bench
def infer_split(name: str) -> str:
    """forget_5 -> "forget", retain_95 / Retain_Set -> "retain", Test_Set -> "test",
    anything else (Full_Set, ft_Data, ...) -> "train"."""
    low = os.path.basename(os.path.normpath(name)).lower()
    for key in ("forget", "retain", "test"):
        if key in low:
            return key
    return "train"


def _parquet_files(path: str) -> List[str]:
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if files:
            return files
        raise PublicFormatError(f"{path}: no .parquet file in this folder")
    raise FileNotFoundError(f"{path} does not exist")


def read_parquet_rows(path: str) -> List[dict]:
    """Rows (dicts) of a parquet file, or of every .parquet file in a folder, in order."""
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is an install requirement
        raise ImportError("reading MLLMU-Bench parquet files needs pyarrow (`pip install pyarrow`)") from exc
    rows = []
    for f in _parquet_files(path):
        try:
            rows += pq.read_table(f).to_pylist()
        except Exception as exc:
            raise PublicFormatError(f"{f}: not a readable parquet file ({exc})") from exc
    return rows


def _options(opts, where: str) -> Tuple[Tuple[str, ...], List[str]]:
    if isinstance(opts, dict):
        letters = [k for k in LETTERS if opts.get(k) is not None]
        return tuple(str(opts[k]) for k in letters), letters
    if isinstance(opts, (list, tuple)):
        return tuple(str(o) for o in opts), list(LETTERS[:len(opts)])
    raise PublicFormatError(f"{where}: Options must be a {{letter: text}} struct or a list, got {type(opts).__name__}")


def _kind(item_type: str, where: str) -> str:
    t = (item_type or "").lower()
    if t.startswith("image"):
        return "vqa"
    if t.startswith("pure") or t.startswith("text"):
        return "text"
    raise PublicFormatError(f"{where}: Type must be 'Image_Textual' or 'Pure_Text', got {item_type!r}")


def mllmu_examples(row: dict, split: str, *, source: str = "<rows>", row_index: int = 0,
                   tasks: Sequence[str] = MLLMU_TASKS, name: Optional[str] = None
                   ) -> Tuple[Concept, List[Example]]:
    """One MLLMU-Bench profile row -> (its concept, its examples)."""
    where = f"{source} row {row_index}"
    for t in tasks:
        if t not in MLLMU_TASKS:
            raise ValueError(f"tasks: unknown MLLMU task {t!r}; expected names from {MLLMU_TASKS}")
    if not isinstance(row, dict) or "ID" not in row:
        raise PublicFormatError(f"{where}: missing the ID column")
    pid = str(row["ID"])
    concept = str(name or row.get("name") or row.get("Name") or pid)
    where = f"{where} (ID {pid})"
    image_data = row.get("image")
    if image_data is None and row.get("images"):
        image_data = row["images"][0]  # the Test_Set's first view of the person
    image = decode_image(image_data, where) if image_data is not None else None

    examples: List[Example] = []

    def add(kind: str, tag: str, question: str, answer: str, **kw):
        if kind == "vqa" and image is None:
            raise PublicFormatError(f"{where}: an Image_Textual item needs the row's image")
        examples.append(Example(id=f"{pid}-{tag}", concept=concept, question=str(question), answer=str(answer),
                                image=image if kind == "vqa" else None, kind=kind, split=split, **kw))

    if "vqa" in tasks and row.get("question") and row.get("answer"):
        add("vqa", "vqa", row["question"], row["answer"])
    if "classification" in tasks and row.get("Classification_Task"):
        ct = row["Classification_Task"]
        for key, kind in (("Image_Textual_Questions", "vqa"), ("Pure_Text_Questions", "text")):
            for j, item in enumerate(ct.get(key) or []):
                w = f"{where} Classification_Task.{key}[{j}]"
                try:
                    options, letters = _options(item["Options"], w)
                    correct = str(item["Correct_Answer"]).strip().upper()[:1]
                    q = item["Question"]
                except KeyError as exc:
                    raise PublicFormatError(f"{w}: missing field {exc}") from exc
                if correct not in letters:
                    raise PublicFormatError(f"{w}: Correct_Answer {item['Correct_Answer']!r} is not one of {letters}")
                ai = letters.index(correct)
                add(kind, f"cls-{kind}-{j}", q, options[ai], options=options, answer_index=ai)
    for task_name, column in (("mask", "Mask_Task"), ("generation", "Generation_Task")):
        if task_name not in tasks:
            continue
        for j, item in enumerate(row.get(column) or []):
            w = f"{where} {column}[{j}]"
            try:
                q, gt, kind = item["Question"], item["Ground_Truth"], _kind(item.get("Type", ""), w)
            except KeyError as exc:
                raise PublicFormatError(f"{w}: missing field {exc}") from exc
            if task_name == "mask":
                q = str(q).replace("__", "[Blank]") + " Fill in the [Blank]."
            add(kind, f"{task_name}-{j}", q, gt)
    facts = [e for e in examples if e.kind == "text"]
    return Concept(name=concept, variants=(), facts=facts), examples


def load_mllmu_bench(sources: Union[str, Mapping[str, str]], *, tasks: Sequence[str] = MLLMU_TASKS,
                     names: Optional[Mapping[str, str]] = None, name: str = "mllmu-bench") -> UnlearningTask:
    """An :class:`UnlearningTask` from MLLMU-Bench parquet data.

    ``sources``: a parquet file, a folder of parquet files (one split, from its name),
    a dataset root whose sub-folders are splits (forget_5/, retain_95/, Test_Set/ ...),
    or a mapping {split: file or folder}.  ``names``: {ID: person name} (otherwise the
    ``name`` column, or the ID).  A profile present in several splits is one concept.
    """
    if isinstance(sources, str):
        if os.path.isdir(sources) and not any(f.endswith(".parquet") for f in os.listdir(sources)):
            subs = sorted(d for d in os.listdir(sources) if os.path.isdir(os.path.join(sources, d)))
            mapping = {os.path.join(sources, d): infer_split(d) for d in subs
                       if any(f.endswith(".parquet") for f in os.listdir(os.path.join(sources, d)))}
            if not mapping:
                raise PublicFormatError(f"{sources}: no .parquet file here or in its sub-folders")
        else:
            mapping = {sources: infer_split(sources)}
    elif isinstance(sources, Mapping):
        mapping = {path: split for split, path in sources.items()}
    else:
        raise TypeError("sources must be a path or a {split: path} mapping")
    concepts: Dict[str, Concept] = {}
    examples: List[Example] = []
    names = dict(names or {})
    for path, split in mapping.items():
        for i, row in enumerate(read_parquet_rows(path)):
            c, ex = mllmu_examples(row, split, source=path, row_index=i, tasks=tasks,
                                   name=names.get(str(row.get("ID"))))
            if c.name in concepts:
                concepts[c.name].facts.extend(c.facts)
            else:
                concepts[c.name] = c
            # ids stay unique when a profile appears in several splits
            for e in ex:
                e.id = f"{split}-{e.id}"
            examples += ex
    if not examples:
        raise PublicFormatError(f"no question found in {list(mapping)} (tasks={tuple(tasks)})")
    return UnlearningTask(name=name, concepts=concepts, examples=examples)


# ------------------------------------------------------------------- MMUBench folders
def _concept_name(folder: str) -> str:
    return re.sub(r"\s+", " ", folder.replace("_", " ")).strip()


def _read_facts(path: str, concept: str) -> List[Example]:
    facts = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                q, a = obj["question"], obj["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise PublicFormatError(f"{path}:{line_no}: expected a JSON object with 'question' and 'answer' "
                                        f"({exc})") from exc
            facts.append(Example(id=f"{concept}-fact-{line_no}", concept=concept, question=str(q), answer=str(a),
                                 kind="text", split="train"))
    return facts


def load_mmubench_folder(root: str, *, train_images: int = 1, question: str = "Who is this?",
                         answer_template: str = "This is {name}.", num_options: int = 4, seed: int = 0,
                         name: Optional[str] = None) -> UnlearningTask:
    """An :class:`UnlearningTask` from a folder of image folders, one per concept (module
    doc).  ``train_images``: images per concept in split "train" (the rest "holdout")."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root} is not a folder")
    if isinstance(train_images, bool) or not isinstance(train_images, int) or train_images < 0:
        raise ValueError(f"train_images must be a non-negative int, got {train_images!r}")
    meta_path = os.path.join(root, "concepts.json")
    meta = {}
    if os.path.exists(meta_path):
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                raise ValueError("the top level must be an object {concept: {...}}")
        except (json.JSONDecodeError, ValueError) as exc:
            raise PublicFormatError(f"{meta_path}: {exc}") from exc
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    images_of = {}
    for d in folders:
        files = sorted(f for f in os.listdir(os.path.join(root, d)) if f.lower().endswith(IMAGE_EXTENSIONS))
        if files:
            images_of[d] = files
    if len(images_of) < 1:
        raise PublicFormatError(f"{root}: no concept folder with images ({', '.join(IMAGE_EXTENSIONS)})")
    names_by_folder = {d: _concept_name(d) for d in images_of}
    all_names = sorted(names_by_folder.values())
    rng = np.random.default_rng(seed)
    concepts: Dict[str, Concept] = {}
    examples: List[Example] = []
    for d, files in images_of.items():
        cname = names_by_folder[d]
        info = meta.get(cname, meta.get(d, {}))
        variants = tuple(info.get("variants", ())) if isinstance(info, dict) else ()
        facts_path = os.path.join(root, d, "facts.jsonl")
        facts = _read_facts(facts_path, cname) if os.path.exists(facts_path) else []
        concepts[cname] = Concept(name=cname, variants=variants, facts=facts)
        others = [n for n in all_names if n != cname]
        for j, f in enumerate(files):
            img = decode_image(os.path.join(root, d, f), os.path.join(root, d, f))
            answer = answer_template.format(name=cname)
            kw = {}
            k = min(num_options - 1, len(others))
            if k >= 1:
                wrong = [others[i] for i in rng.choice(len(others), size=k, replace=False)]
                opts = [answer] + [answer_template.format(name=w) for w in wrong]
                order = rng.permutation(len(opts))
                opts = [opts[i] for i in order]
                kw = dict(options=tuple(opts), answer_index=int(opts.index(answer)))
            examples.append(Example(id=f"{d}/{f}", concept=cname, question=question, answer=answer, image=img,
                                    kind="vqa", split="train" if j < train_images else "holdout", **kw))
        examples += facts
    return UnlearningTask(name=name or os.path.basename(os.path.normpath(root)), concepts=concepts,
                          examples=examples)


def load_public(spec: str, **kwargs) -> UnlearningTask:
    """MLLMU-Bench parquet (a .parquet file, or a folder holding parquet files or split
    sub-folders of them) or an MMUBench-style folder of image folders."""
    if spec.endswith(".parquet") or (os.path.isdir(spec) and _has_parquet(spec)):
        return load_mllmu_bench(spec, **kwargs)
    if os.path.isdir(spec):
        return load_mmubench_folder(spec, **kwargs)
    raise PublicFormatError(f"{spec}: neither a parquet file nor a folder")


def _has_parquet(root: str) -> bool:
    for dirpath, _dirs, files in _walk(root, depth=1):
        if any(f.endswith(".parquet") for f in files):
            return True
    return False


def _walk(root: str, depth: int) -> Iterable:
    base = root.rstrip(os.sep).count(os.sep)
    for dirpath, dirs, files in os.walk(root):
        yield dirpath, dirs, files
        if dirpath.count(os.sep) - base >= depth:
            dirs[:] = []
