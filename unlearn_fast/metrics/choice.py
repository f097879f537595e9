"""Multiple-choice accuracy by option log-likelihood (MLLMU-Bench's classification task
without generation): every option of every question becomes one candidate answer to the
question's prompt (image + text, or text only), ALL candidates are scored in one
batched pass of fused answer log-probs, and a question counts as correct when its
correct option has the highest score.

Score of an option: the mean log-prob of its answer tokens (``normalize="mean"``, the
default: options of different lengths compete fairly) or the sum (``"sum"``, lm-eval's
"acc").  Ties go to the first option (argmax), so a model that scores every option the
same is right only when the correct option comes first.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Dict, List, Sequence

import torch

from unlearn_fast.metrics._model import eval_mode, example_length, length_sorted_batches, progress, to_model
from unlearn_fast.metrics.distributed import sharded_map
from unlearn_fast.metrics.scores import _scatter, answer_token_stats


def _candidates(examples) -> List[tuple]:
    out = []
    for qi, ex in enumerate(examples):
        options = tuple(getattr(ex, "options", ()) or ())
        if len(options) < 2:
            raise ValueError(f"example {getattr(ex, 'id', qi)!r} has {len(options)} option(s); multiple choice needs "
                             f"at least 2 (and answer_index)")
        ai = getattr(ex, "answer_index", None)
        if ai is None or not 0 <= ai < len(options):
            raise ValueError(f"example {getattr(ex, 'id', qi)!r}: answer_index {ai!r} does not index its options")
        for oi, opt in enumerate(options):
            out.append((qi, oi, replace(ex, answer=opt, options=(), answer_index=None, target_phrase="")))
    return out


def option_logprobs(model, adapter, examples, *, tokenizer, batch_size: int = 16, backend: str = "auto",
                    shard="auto", progress_bar=None) -> List[List[tuple]]:
    """Per question, per option: (sum of answer-token log-probs, number of answer tokens)."""
    examples = list(examples)
    cands = _candidates(examples)

    def score(local: List[tuple]) -> List[tuple]:
        out: List = [None] * len(local)
        rows = [c[2] for c in local]
        batches = length_sorted_batches(rows, [example_length(e) for e in rows], batch_size)
        with eval_mode(model):
            for idx in progress(batches, len(batches), "choices", progress_bar):
                batch = to_model(adapter.collate([rows[i] for i in idx], tokenizer, with_answer=True,
                                                 padding_side="right"), model)
                mask, st = answer_token_stats(model, adapter, batch, stats=("logprob",), backend=backend)
                lp = _scatter(mask, st["logprob"].double())
                for j, i in enumerate(idx):
                    out[i] = (float(lp[j].sum()), int(mask[j].sum()))
        return out

    scored = sharded_map(score, cands, shard)
    per_q: List[List[tuple]] = [[] for _ in examples]
    for (qi, _oi, _), s in zip(cands, scored):
        per_q[qi].append(s)
    return per_q


def multiple_choice_accuracy(model, adapter, examples: Sequence, *, tokenizer, normalize: str = "mean",
                             batch_size: int = 16, backend: str = "auto", shard="auto",
                             progress_bar=None) -> Dict[str, object]:
    """Accuracy (%) of picking the correct option by log-likelihood, over all examples and
    split into image+text ("vqa" rows) and text-only ("text" rows).

    Returns a dict: "accuracy", "image_text_accuracy", "text_only_accuracy" (NaN when
    the split is empty), "num_questions", "predicted_index" (list), "correct" (list).
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize must be 'mean' or 'sum', got {normalize!r}")
    examples = list(examples)
    per_q = option_logprobs(model, adapter, examples, tokenizer=tokenizer, batch_size=batch_size, backend=backend,
                            shard=shard, progress_bar=progress_bar)
    preds, correct = [], []
    for ex, opts in zip(examples, per_q):
        vals = [s / max(n, 1) if normalize == "mean" else s for s, n in opts]
        p = int(torch.tensor(vals).argmax())
        preds.append(p)
        correct.append(p == ex.answer_index)

    def pct(sel):
        sel = list(sel)
        return 100.0 * sum(sel) / len(sel) if sel else math.nan

    return {
        "accuracy": pct(correct),
        "image_text_accuracy": pct(c for c, e in zip(correct, examples) if e.kind == "vqa"),
        "text_only_accuracy": pct(c for c, e in zip(correct, examples) if e.kind == "text"),
        "num_questions": len(examples),
        "predicted_index": preds,
        "correct": correct,
    }
