"""Metrics on generated text: concept mentions (efficacy / generality), diversity,
ROUGE-1/2/L, answer correctness.  Pure Python; no model involved.

Conventions (stated once, used everywhere):

* A concept is *mentioned* when any of its spellings (name + variants) occurs in the
  text case-insensitively and on word boundaries: "seven" is found in "Seven." and in
  "it's seven-ish" but not in "seventeen"; whitespace inside a multi-word name matches
  any run of whitespace ("Donald  Trump").
* Efficacy / generality = % of answers that do NOT mention the concept (0-100).
* Diversity = mean over answers of (# unique whitespace tokens / # whitespace tokens)
  x 100; an empty answer counts 0 (a model that answers nothing is not diverse).
* ROUGE follows Google's ``rouge_score`` package (the one MLLMU-Bench uses):
  lower-case, every run of characters outside [a-z0-9] is a separator, F-measure of
  n-gram overlap (ROUGE-N) or of the longest common subsequence (ROUGE-L); 0 when either
  side has no token.  ``rouge_score``'s optional Porter stemmer is not built in: pass
  ``stemmer=`` (e.g. ``nltk.stem.PorterStemmer().stem``) to apply one to tokens longer
  than 3 characters, as ``rouge_score(use_stemmer=True)`` does.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def _check_texts(texts, name: str) -> List[str]:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a sequence of strings, not a single string")
    try:
        out = list(texts)
    except TypeError as exc:
        raise TypeError(f"{name} must be a sequence of strings") from exc
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"{name}[{i}] must be a string, got {type(t).__name__}")
    return out


def _spellings(concept) -> Tuple[str, ...]:
    """Name spellings of ``concept``: a string, a sequence of strings, or an object with
    ``name`` and ``variants`` (the data schema's ``Concept``)."""
    if isinstance(concept, str):
        names = (concept,)
    elif hasattr(concept, "name"):
        names = (concept.name,) + tuple(getattr(concept, "variants", ()) or ())
    else:
        try:
            names = tuple(concept)
        except TypeError as exc:
            raise TypeError("concept must be a name, a sequence of names, or a Concept (name, variants)") from exc
    names = tuple(n.strip() for n in names if isinstance(n, str) and n.strip())
    if not names:
        raise ValueError(f"concept has no non-empty name spelling: {concept!r}")
    return names


@lru_cache(maxsize=256)
def _mention_regex(spellings: Tuple[str, ...]) -> "re.Pattern[str]":
    # Longest first so "Donald Trump" wins over "Donald" (only matters for spans, not truth).
    parts = sorted({r"\s+".join(re.escape(w) for w in s.split()) for s in spellings}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def mentions(text: str, concept) -> bool:
    """Whether ``text`` names ``concept`` (any spelling; case-insensitive; word boundaries)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    return _mention_regex(_spellings(concept)).search(text) is not None


def efficacy(answers: Sequence[str], concept) -> float:
    """% of ``answers`` that do not mention ``concept`` (SIU's efficacy on the forget image;
    on held-out images of the concept the same number is its *generality*).  NaN for no
    answers."""
    answers = _check_texts(answers, "answers")
    if not answers:
        return float("nan")
    pattern = _mention_regex(_spellings(concept))
    return 100.0 * sum(pattern.search(a) is None for a in answers) / len(answers)


generality = efficacy  # the same measure on held-out images of the concept


def diversity(answers: Sequence[str]) -> float:
    """Mean % of unique whitespace tokens per answer (SIU's diversity); NaN for no answers."""
    answers = _check_texts(answers, "answers")
    if not answers:
        return float("nan")
    total = 0.0
    for a in answers:
        toks = a.split()
        total += 100.0 * len(set(toks)) / len(toks) if toks else 0.0
    return total / len(answers)


def tokenize(text: str, stemmer: Optional[Callable[[str], str]] = None) -> List[str]:
    """``rouge_score``'s default tokenisation: lower-case, split on non-[a-z0-9]."""
    toks = [t for t in _NON_ALNUM.split(text.lower()) if t]
    if stemmer is not None:
        toks = [stemmer(t) if len(t) > 3 else t for t in toks]
    return toks


@dataclass(frozen=True)
class Rouge:
    precision: float
    recall: float
    fmeasure: float


def _prf(overlap: int, n_pred: int, n_ref: int) -> Rouge:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return Rouge(p, r, f)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a) len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str, *, stemmer: Optional[Callable[[str], str]] = None,
            full: bool = False) -> Union[float, Rouge]:
    """ROUGE-L F-measure of ``prediction`` against ``reference`` (``full=True``: precision,
    recall and F-measure).  Symmetric tokenisation as in ``rouge_score``."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("rouge_l takes two strings (prediction, reference)")
    p, r = tokenize(prediction, stemmer), tokenize(reference, stemmer)
    score = _prf(lcs_length(p, r), len(p), len(r))
    return score if full else score.fmeasure


def rouge_n(prediction: str, reference: str, n: int = 1, *, stemmer: Optional[Callable[[str], str]] = None,
            full: bool = False) -> Union[float, Rouge]:
    """ROUGE-N F-measure (clipped n-gram overlap), as ``rouge_score``'s "rouge1"/"rouge2"."""
    if not isinstance(prediction, str) or not isinstance(reference, str):
        raise TypeError("rouge_n takes two strings (prediction, reference)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    p, r = tokenize(prediction, stemmer), tokenize(reference, stemmer)
    grams = lambda toks: Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))  # noqa: E731
    gp, gr = grams(p), grams(r)
    overlap = sum((gp & gr).values())
    score = _prf(overlap, sum(gp.values()), sum(gr.values()))
    return score if full else score.fmeasure


def mean_rouge(predictions: Sequence[str], references: Sequence[str], kind: str = "rougeL",
               **kwargs) -> float:
    """Mean F-measure over pairs; ``kind`` in rouge1, rouge2, rougeL.  NaN for no pairs."""
    predictions = _check_texts(predictions, "predictions")
    references = _check_texts(references, "references")
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    fns = {"rouge1": lambda a, b: rouge_n(a, b, 1, **kwargs), "rouge2": lambda a, b: rouge_n(a, b, 2, **kwargs),
           "rougeL": lambda a, b: rouge_l(a, b, **kwargs)}
    if kind not in fns:
        raise ValueError(f"kind must be one of {tuple(fns)}, got {kind!r}")
    if not predictions:
        return float("nan")
    return sum(fns[kind](a, b) for a, b in zip(predictions, references)) / len(predictions)


def normalize_answer(text: str) -> str:
    """Lower-case, alphanumeric tokens joined by single spaces (for containment checks)."""
    return " ".join(tokenize(text))


def answer_correct(prediction: str, reference: str) -> bool:
    """True when the normalised reference occurs in the normalised prediction on token
    boundaries (MLLMU-Bench's cloze check, ``ground_truth.lower() in answer.lower()``,
    made boundary-aware so "eight" is not found in "eighteen").  An empty reference is
    never matched."""
    ref = normalize_answer(reference)
    if not ref:
        return False
    return f" {ref} " in f" {normalize_answer(prediction)} "


def accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """% of predictions that contain their reference (:func:`answer_correct`); NaN for none."""
    predictions = _check_texts(predictions, "predictions")
    references = _check_texts(references, "references")
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        return float("nan")
    return 100.0 * sum(answer_correct(p, r) for p, r in zip(predictions, references)) / len(predictions)


def mentions_own_concept(predictions: Sequence[str], concepts: Iterable) -> float:
    """% of predictions that name their own concept (recognition accuracy: specificity on
    other concepts' images).  ``concepts[i]`` is the concept of prediction i."""
    predictions = _check_texts(predictions, "predictions")
    concepts = list(concepts)
    if len(predictions) != len(concepts):
        raise ValueError(f"predictions ({len(predictions)}) and concepts ({len(concepts)}) differ in length")
    if not predictions:
        return float("nan")
    return 100.0 * sum(mentions(p, c) for p, c in zip(predictions, concepts)) / len(predictions)
