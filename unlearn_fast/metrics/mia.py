"""Membership inference and pair-separation AUCs.

Convention: ``mia_auc(forget, holdout)`` is the probability that a forget example looks
MORE like a training member than a holdout example (ties count one half), i.e. the ROC
AUC of the attack "member if the score says so" with forget = positives.  For every
score the direction is fixed in ``MEMBER_DIRECTION`` (+1: higher means member, e.g.
Min-K% log-prob; -1: lower means member, e.g. LOSS).  Reading it:

* ~1.0: the forget set is still recognisably memorised (not unlearned);
* ~0.5: forget and holdout are indistinguishable (the goal: what a model never trained
  on the forget set gives);
* <0.5: the forget set now looks *less* familiar than unseen data (over-unlearning, which
  also leaks membership).

``privleak(auc, reference_auc)`` is MUSE's relative score
(auc - reference_auc) / reference_auc x 100 against a reference model (ideally one
retrained without the forget set; the original model gives "how much of the original
leak is left"): 0 is ideal, positive under-unlearned, negative over-unlearned.

``pair_auc`` (MultiDelete): the AUC separating deleted pairs D_f from retained pairs D_r
by the model's image-text matching score, with D_r = positives (a successfully deleted
pair looks unmatched, so a perfect deletion gives 1.0), averaged over chunks of D_r.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Sequence

import numpy as np

# score name -> +1 if a higher value means "member", -1 if a lower value does
MEMBER_DIRECTION = {
    "answer_logprob": +1,
    "probability": +1,
    "min_k": +1,
    "min_k_plus_plus": +1,
    "exact_memorization": +1,
    "loss": -1,
    "zlib": -1,
    "perplexity": -1,
}
MIA_SCORES = ("loss", "zlib", "min_k", "min_k_plus_plus", "probability", "exact_memorization")


def _as_scores(x, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence of numbers") from exc
    if arr.size == 0:
        raise ValueError(f"{name} is empty; an AUC needs at least one score on each side")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values (e.g. examples without answer tokens)")
    return arr


def roc_auc(positive_scores, negative_scores) -> float:
    """P(positive > negative) + 0.5 P(tie): the ROC AUC of ``score > threshold`` for the
    positives (sklearn.metrics.roc_auc_score with labels 1/0)."""
    from sklearn.metrics import roc_auc_score

    pos = _as_scores(positive_scores, "positive_scores")
    neg = _as_scores(negative_scores, "negative_scores")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


def mia_auc(forget_scores, holdout_scores, *, higher_is_member: bool = True) -> float:
    """Membership-inference AUC, forget (members) vs holdout (non-members); see the module
    doc.  ``higher_is_member``: the score's direction (``MEMBER_DIRECTION``)."""
    if not isinstance(higher_is_member, bool):
        raise TypeError("higher_is_member must be a bool")
    f = _as_scores(forget_scores, "forget_scores")
    h = _as_scores(holdout_scores, "holdout_scores")
    return roc_auc(f, h) if higher_is_member else roc_auc(-f, -h)


def mia_aucs(forget: Mapping[str, Sequence[float]], holdout: Mapping[str, Sequence[float]],
             scores: Sequence[str] = MIA_SCORES) -> Dict[str, float]:
    """``{"mia_auc_<score>": AUC}`` for every score present in both dicts (per-example
    score lists, e.g. from :func:`unlearn_fast.metrics.sequence_scores`)."""
    out = {}
    for s in scores:
        if s not in MEMBER_DIRECTION:
            raise ValueError(f"unknown score {s!r}; expected names from {tuple(MEMBER_DIRECTION)}")
        if s in forget and s in holdout:
            out[f"mia_auc_{s}"] = mia_auc(forget[s], holdout[s], higher_is_member=MEMBER_DIRECTION[s] > 0)
    return out


def privleak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak: (auc - reference_auc) / reference_auc x 100 (0 is ideal)."""
    for v, n in ((auc, "auc"), (reference_auc, "reference_auc")):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
            raise ValueError(f"{n} must be a number in [0, 1], got {v!r}")
    if reference_auc == 0:
        raise ValueError("reference_auc is 0; the relative score is undefined")
    return (auc - reference_auc) / reference_auc * 100.0


def pair_auc(forget_match_scores, retain_match_scores, *, chunks: Optional[int] = None) -> float:
    """MultiDelete's deletion AUC: retained pairs (positives) vs deleted pairs by matching
    score (e.g. cosine similarity of image and caption embeddings), averaged over
    ``chunks`` contiguous chunks of the retained scores (default: as many chunks of about
    ``len(forget)`` pairs as fit, at least 1), so a large D_r does not swamp D_f."""
    f = _as_scores(forget_match_scores, "forget_match_scores")
    r = _as_scores(retain_match_scores, "retain_match_scores")
    if chunks is None:
        chunks = max(1, r.size // f.size)
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be a positive int or None, got {chunks!r}")
    if chunks > r.size:
        raise ValueError(f"chunks={chunks} exceeds the number of retained scores ({r.size})")
    return float(np.mean([roc_auc(part, f) for part in np.array_split(r, chunks)]))
