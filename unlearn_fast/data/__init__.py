"""Data for unlearning: the schema (:mod:`.schema`), the built-in digits task
(:func:`load_builtin_task`), SIU's multifaceted rows (:func:`build_siu_examples`), user
JSONL datasets (:func:`load_jsonl_task`, format in :mod:`.jsonl`) and the byte-level BPE
tokenizer (:func:`build_tokenizer`).  ``load_task("builtin" | path)`` picks one."""
from __future__ import annotations

import os

from unlearn_fast.data.digits import load_builtin_task
from unlearn_fast.data.jsonl import DataFormatError, load_jsonl_task, write_jsonl_task
from unlearn_fast.data.schema import Concept, Example, UnlearningTask
from unlearn_fast.data.siu import build_siu_examples
from unlearn_fast.data.tokenizer import build_tokenizer, name_token_ids

__all__ = ["Example", "Concept", "UnlearningTask", "load_builtin_task", "load_jsonl_task", "write_jsonl_task",
           "DataFormatError", "build_siu_examples", "build_tokenizer", "name_token_ids", "load_task"]


def load_task(spec: str) -> UnlearningTask:
    """``"builtin"`` -> the digits task; a ``.jsonl`` path -> :func:`load_jsonl_task`."""
    if spec == "builtin":
        return load_builtin_task()
    if os.path.isdir(spec):
        raise ValueError(f"--data {spec!r} is a folder; give a .jsonl file (see unlearn_fast.data.jsonl) or 'builtin'")
    if not os.path.exists(spec):
        raise FileNotFoundError(f"dataset {spec!r} does not exist (expected 'builtin' or a .jsonl file)")
    return load_jsonl_task(spec)
