"""Whole-task evaluation: what ``unlearn-fast run`` prints per method and what
``unlearn-fast eval`` writes per evaluation set.

Work is grouped so each kind of pass runs once over everything that needs it: one
batched generation over all prompts, one fused scoring pass over all sets that need
likelihood scores, one multiple-choice pass over all options of all questions.  Sets
larger than ``max_examples`` are subsampled at evenly spaced positions (deterministic).

:func:`evaluate_task` (LLaVA / Qwen2-VL; ``concept`` = the forgotten concept) returns:

    efficacy        % of answers on the concept's trained-on images that do not name it
    generality      the same on its held-out images
    specificity     % of other concepts' held-out images answered with their own name
    text_retention  % of the concept's text facts answered correctly (reference answer
                    contained in the generated one, :func:`.text.answer_correct`)
    fluency         perplexity of the model on the reference model's answers to the
                    concept's image prompts, concept-name tokens excluded (the dataset's
                    answers when no reference model is given)
    diversity       mean % unique whitespace tokens of the answers on the concept's images
    mia_auc         Min-K% (k = 0.4) membership AUC, trained-on vs held-out images of the
                    concept (0.5 = indistinguishable; see :mod:`.mia`)
    mia_auc_<s>     the same for every score s (loss, zlib, min_k_plus_plus, ...)
    rouge_l_text    mean ROUGE-L of the text-fact answers
    <set>_mc_accuracy   multiple-choice accuracy by option log-likelihood over the rows
                    that carry options, per set: forget_vqa, forget_text (the concept's facts),
                    holdout_vqa, retain_vqa, retain_text (MMUnlearner's four numbers)
    c_dis, privleak with a reference model (the original): SIU's C-Dis on the concept's
                    image rows; MUSE's PrivLeak of the Min-K% AUC against the reference's
    num_<set>       how many rows each set had after subsampling

Percentages are 0-100; NaN marks a metric whose set is empty.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from unlearn_fast.metrics import text as T
from unlearn_fast.metrics.choice import multiple_choice_accuracy
from unlearn_fast.metrics.generation import generate_answers
from unlearn_fast.metrics.mia import MIA_SCORES, mia_auc, mia_aucs, pair_auc, privleak
from unlearn_fast.metrics.scores import SCORE_NAMES, c_dis, fluency, sequence_scores

DEFAULT_MAX_EXAMPLES = 100


def subsample(rows: Sequence, n: Optional[int]) -> List:
    """At most ``n`` rows at evenly spaced positions (all of them when n is None)."""
    rows = list(rows)
    if n is None or len(rows) <= n:
        return rows
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"max_examples must be a positive int or None, got {n!r}")
    return [rows[(i * len(rows)) // n] for i in range(n)]


def _split(values: List, sizes: Dict[str, int]) -> Dict[str, List]:
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = values[start:start + size]
        start += size
    return out


def _concat(sets: Dict[str, List]) -> List:
    return [row for rows in sets.values() for row in rows]


def _with_options(rows) -> List:
    """The rows that are multiple-choice questions (two or more options)."""
    return [e for e in rows if len(getattr(e, "options", ()) or ()) >= 2]


def _name_token_ids(tokenizer, concept) -> List[int]:
    from unlearn_fast.data import name_token_ids

    return list(name_token_ids(tokenizer, concept.variants))


class _Runner:
    """Batched passes shared by the evaluate_* functions.  With a ``cache`` dict (shared
    between calls), rows already generated / scored by the same model are not redone:
    ``unlearn-fast eval`` computes the per-set report and the summary row from one set
    of passes."""

    def __init__(self, model, adapter, tokenizer, *, batch_size, max_new_tokens, k, backend, shard, progress_bar,
                 cache=None):
        self.model, self.adapter, self.tokenizer = model, adapter, tokenizer
        self.kw = dict(shard=shard, progress_bar=progress_bar)
        self.batch_size, self.max_new_tokens, self.k, self.backend = batch_size, max_new_tokens, k, backend
        self.cache = {} if cache is None else cache

    def _cached(self, kind: str, model, sets: Dict[str, List], compute) -> Dict[str, List]:
        """Per set, per row: the cached result of ``kind`` or a fresh one; ``compute``
        maps the list of missing rows to their results in one batched call."""
        sets = {k: v for k, v in sets.items() if v}
        key = lambda e: (kind, id(model), self.max_new_tokens, self.k, e.id)  # noqa: E731
        missing, seen = [], set()
        for e in _concat(sets):
            if key(e) not in self.cache and key(e) not in seen:
                seen.add(key(e))
                missing.append(e)
        if missing:
            for e, r in zip(missing, compute(missing)):
                self.cache[key(e)] = r
        return {name: [self.cache[key(e)] for e in rows] for name, rows in sets.items()}

    def answers(self, sets: Dict[str, List], model=None) -> Dict[str, List[str]]:
        model = model or self.model
        return self._cached("gen", model, sets, lambda rows: generate_answers(
            model, self.adapter, rows, tokenizer=self.tokenizer, batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens, **self.kw))

    def scores(self, sets: Dict[str, List], model=None) -> Dict[str, Dict[str, List[float]]]:
        model = model or self.model

        def compute(rows):
            sc = sequence_scores(model, self.adapter, rows, tokenizer=self.tokenizer, batch_size=self.batch_size,
                                 k=self.k, backend=self.backend, **self.kw)
            cols = {name: v.tolist() for name, v in sc.items()}
            return [{name: cols[name][i] for name in cols} for i in range(len(rows))]

        per_row = self._cached("score", model, sets, compute)
        return {name: {s: [r[s] for r in rows] for s in SCORE_NAMES} for name, rows in per_row.items()}

    def choices(self, sets: Dict[str, List]) -> Dict[str, float]:
        """Multiple-choice accuracy (%) per set, over its rows that carry options (sets
        without any are left out)."""
        sets = {k: _with_options(v) for k, v in sets.items()}
        per_row = self._cached("mc", self.model, sets, lambda rows: multiple_choice_accuracy(
            self.model, self.adapter, rows, tokenizer=self.tokenizer, batch_size=self.batch_size,
            backend=self.backend, **self.kw)["correct"])
        return {name: 100.0 * sum(part) / len(part) for name, part in per_row.items()}


def _mean(values: Sequence[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan


def evaluate_task(model, adapter, tokenizer, task, concept: str, *, reference_model=None, batch_size: int = 16,
                  max_new_tokens: int = 24, k: float = 0.4, max_examples: Optional[int] = DEFAULT_MAX_EXAMPLES,
                  backend: str = "auto", shard="auto", progress_bar=None, return_answers: bool = False,
                  cache: Optional[dict] = None) -> Dict:
    """The per-method row (module doc) for forgetting ``concept`` of ``task`` (an
    ``UnlearningTask``).  ``reference_model``: the original model (fluency's reference
    answers, C-Dis, PrivLeak).  ``return_answers``: also return the generated answers
    under "answers" (set name -> list).  ``cache``: a dict shared with other
    evaluate_* calls on the same model, so rows they already generated or scored are
    reused (keyed by example id)."""
    c = task.concept(concept)
    n = max_examples
    gen_sets = {
        "forget_vqa": subsample(task.forget_set(c.name, kind="vqa"), n),
        "holdout_vqa": subsample(task.holdout_set(c.name, kind="vqa"), n),
        "forget_text": subsample(task.text_facts(c.name), n),
        "specificity": subsample(task.specificity_set(c.name, kind="vqa"), n),
    }
    mc_sets = {
        "forget_vqa": gen_sets["forget_vqa"], "forget_text": gen_sets["forget_text"],
        "holdout_vqa": gen_sets["holdout_vqa"],
        "retain_vqa": subsample(task.retain_set(c.name, kind="vqa"), n),
        "retain_text": subsample(task.retain_set(c.name, kind="text"), n),
    }
    run = _Runner(model, adapter, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, k=k,
                  backend=backend, shard=shard, progress_bar=progress_bar, cache=cache)
    ans = run.answers(gen_sets)
    get = lambda name: ans.get(name, [])  # noqa: E731
    row: Dict[str, object] = {
        "efficacy": T.efficacy(get("forget_vqa"), c),
        "generality": T.efficacy(get("holdout_vqa"), c),
        "specificity": T.mentions_own_concept(get("specificity"),
                                              [task.concept(e.concept) for e in gen_sets["specificity"]]),
        "text_retention": T.accuracy(get("forget_text"), [e.answer for e in gen_sets["forget_text"]]),
        "rouge_l_text": T.mean_rouge(get("forget_text"), [e.answer for e in gen_sets["forget_text"]]),
        "diversity": T.diversity(get("forget_vqa") + get("holdout_vqa")),
    }
    # membership inference: trained-on vs held-out images of the concept (one scoring pass)
    score_sets = {"forget_vqa": gen_sets["forget_vqa"], "holdout_vqa": gen_sets["holdout_vqa"]}
    sc = run.scores(score_sets)
    if "forget_vqa" in sc and "holdout_vqa" in sc:
        aucs = mia_aucs(sc["forget_vqa"], sc["holdout_vqa"])
        row["mia_auc"] = aucs["mia_auc_min_k"]
        row.update(aucs)
    else:
        row["mia_auc"] = math.nan
    # fluency on the reference model's (or the dataset's) answers, name tokens excluded
    image_rows = gen_sets["forget_vqa"] + gen_sets["holdout_vqa"]
    name_ids = _name_token_ids(tokenizer, c)
    if image_rows:
        if reference_model is not None:
            ref_ans = run.answers({"img": image_rows}, model=reference_model).get("img", [])
        else:
            ref_ans = [e.answer for e in image_rows]
        row["fluency"] = fluency(model, adapter, image_rows, ref_ans, name_ids, tokenizer=tokenizer,
                                 batch_size=batch_size, backend=backend, **run.kw)
    else:
        row["fluency"] = math.nan
    if reference_model is not None:
        if gen_sets["forget_vqa"] and name_ids:
            row["c_dis"] = c_dis(model, reference_model, adapter, gen_sets["forget_vqa"], name_ids,
                                 tokenizer=tokenizer, batch_size=batch_size, backend=backend, **run.kw)
        ref_sc = run.scores(score_sets, model=reference_model)
        if "forget_vqa" in ref_sc and "holdout_vqa" in ref_sc and not math.isnan(row["mia_auc"]):
            ref_auc = mia_auc(ref_sc["forget_vqa"]["min_k"], ref_sc["holdout_vqa"]["min_k"])
            row["reference_mia_auc"] = ref_auc
            row["privleak"] = privleak(row["mia_auc"], ref_auc) if ref_auc > 0 else math.nan
    for name, acc in run.choices(mc_sets).items():
        row[f"{name}_mc_accuracy"] = acc
    for name, rows in {**gen_sets, **mc_sets}.items():
        row[f"num_{name}"] = len(rows)
    if return_answers:
        row["answers"] = ans
    return row


def evaluate_sets(model, adapter, tokenizer, sets: Dict[str, Sequence], *, task=None, concept: Optional[str] = None,
                  generate: bool = True, batch_size: int = 16, max_new_tokens: int = 24, k: float = 0.4,
                  max_examples: Optional[int] = DEFAULT_MAX_EXAMPLES, backend: str = "auto", shard="auto",
                  progress_bar=None, cache: Optional[dict] = None) -> Dict[str, Dict[str, float]]:
    """Metrics per evaluation set (name -> rows), for ``unlearn-fast eval``'s eval.json:

    * every set: "n" and the mean of every likelihood score (``SCORE_NAMES``: loss,
      probability, perplexity, zlib, min_k, min_k_plus_plus, exact_memorization,
      answer_logprob, num_tokens) from one fused pass over all sets;
    * sets with rows that carry options: "mc_accuracy" over those rows;
    * with ``generate``: "answer_accuracy" (reference contained), "rouge_l", "rouge1",
      "diversity", and with ``task`` + ``concept``: "efficacy" (% answers not naming
      the concept) and "names_own_concept" (% answers naming the row's own concept);
    * a pseudo-set "mia": ``mia_auc_<score><suffix>`` of "forget<suffix>" vs
      "holdout<suffix>" (or "test<suffix>", MLLMU-Bench's held-out split) rows, e.g.
      forget_vqa vs holdout_vqa, when both exist.
    """
    sets = {name: subsample(rows, max_examples) for name, rows in sets.items()}
    run = _Runner(model, adapter, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, k=k,
                  backend=backend, shard=shard, progress_bar=progress_bar, cache=cache)
    out: Dict[str, Dict[str, float]] = {name: {"n": len(rows)} for name, rows in sets.items()}
    sc = run.scores(sets)
    for name, scores in sc.items():
        for s in SCORE_NAMES:
            out[name][s] = _mean(scores[s])
    for name, acc in run.choices(sets).items():
        out[name]["mc_accuracy"] = acc
    if generate:
        ans = run.answers(sets)
        c = task.concept(concept) if (task is not None and concept) else None
        for name, answers in ans.items():
            refs = [e.answer for e in sets[name]]
            out[name].update(answer_accuracy=T.accuracy(answers, refs), rouge_l=T.mean_rouge(answers, refs),
                             rouge1=T.mean_rouge(answers, refs, "rouge1"), diversity=T.diversity(answers))
            if c is not None:
                out[name]["efficacy"] = T.efficacy(answers, c)
                out[name]["names_own_concept"] = T.mentions_own_concept(
                    answers, [task.concept(e.concept) if e.concept else "\x00" for e in sets[name]])
    mia = {}
    for fname in sc:
        if not fname.startswith("forget"):
            continue
        suffix = fname[len("forget"):]
        hname = next((h + suffix for h in ("holdout", "test") if h + suffix in sc), None)
        if hname is not None:
            for key, v in mia_aucs(sc[fname], sc[hname], MIA_SCORES).items():
                mia[key + suffix] = v
    if mia:
        out["mia"] = mia
    return out


# ------------------------------------------------------------------------------- CLIP
def _embed_pairs(model, adapter, tokenizer, images, captions, batch_size):
    from unlearn_fast.metrics._model import eval_mode, to_model

    img, txt = [], []
    with eval_mode(model):
        for s in range(0, len(images), batch_size):
            batch = to_model(adapter.collate_pairs(images[s:s + batch_size], captions[s:s + batch_size], tokenizer),
                             model)
            img.append(adapter.image_embeds(model, batch["pixel_values"]).float())
            txt.append(adapter.text_embeds(model, batch["input_ids"], batch["attention_mask"]).float())
    norm = lambda x: torch.nn.functional.normalize(torch.cat(x), dim=-1)  # noqa: E731
    return norm(img), norm(txt)


def _retrieval_accuracy(image_embeds: torch.Tensor, labels: List[str], names: List[str],
                        caption_embeds: torch.Tensor) -> float:
    """% of images whose most similar caption (one caption per concept) is their own."""
    if not labels:
        return math.nan
    pred = (image_embeds @ caption_embeds.t()).argmax(-1).tolist()
    return 100.0 * sum(names[p] == lab for p, lab in zip(pred, labels)) / len(labels)


def evaluate_pairs(model, adapter, tokenizer, task, concept: str, *, batch_size: int = 64,
                   max_examples: Optional[int] = None, chunks: Optional[int] = None) -> Dict[str, float]:
    """MultiDelete's evaluation of a dual encoder (CLIP) after deleting ``concept``'s
    image-caption pairs:

    * pair_auc: AUC separating deleted pairs (the concept's trained-on pairs) from
      retained pairs (the other concepts' trained-on pairs) by cosine matching score,
      retained = positives, averaged over retain chunks (:func:`.mia.pair_auc`); 1.0
      when every deleted pair looks less matched than every retained one;
    * retained_retrieval / forget_retrieval: % of retained (resp. deleted) images whose
      most similar caption among one caption per concept is their own;
    * forget_match / retain_match: mean matching scores.
    """
    c = task.concept(concept)
    f_imgs, f_caps, f_lab = task.image_caption_pairs(c.name)
    r_imgs, r_caps, r_lab = task.image_caption_pairs(exclude_concept=c.name)
    keep_f = subsample(range(len(f_imgs)), max_examples)
    keep_r = subsample(range(len(r_imgs)), max_examples)
    f_imgs, f_caps, f_lab = [f_imgs[i] for i in keep_f], [f_caps[i] for i in keep_f], [f_lab[i] for i in keep_f]
    r_imgs, r_caps, r_lab = [r_imgs[i] for i in keep_r], [r_caps[i] for i in keep_r], [r_lab[i] for i in keep_r]
    if not f_imgs or not r_imgs:
        raise ValueError(f"concept {c.name!r} needs trained-on image-caption pairs on both sides "
                         f"(deleted: {len(f_imgs)}, retained: {len(r_imgs)})")
    fi, ft = _embed_pairs(model, adapter, tokenizer, f_imgs, f_caps, batch_size)
    ri, rt = _embed_pairs(model, adapter, tokenizer, r_imgs, r_caps, batch_size)
    f_match = (fi * ft).sum(-1).tolist()
    r_match = (ri * rt).sum(-1).tolist()
    names = list(task.concepts)
    # one caption per concept (collate_pairs wants an image per caption; any will do)
    _, class_txt = _embed_pairs(model, adapter, tokenizer, [r_imgs[0]] * len(names),
                                [task.caption(n) for n in names], batch_size)
    return {
        "pair_auc": pair_auc(f_match, r_match, chunks=chunks),
        "retained_retrieval": _retrieval_accuracy(ri, r_lab, names, class_txt),
        "forget_retrieval": _retrieval_accuracy(fi, f_lab, names, class_txt),
        "forget_match": _mean(f_match),
        "retain_match": _mean(r_match),
        "num_forget_pairs": len(f_imgs),
        "num_retain_pairs": len(r_imgs),
    }
