"""Per-example likelihood scores from ONE forward pass per evaluation set.

Each batch goes through the model body once (``adapter.hidden_states``: final hidden
states, no logits); the answer positions only are fed to the fused
:func:`unlearn_fast.token_stats` with every extra statistic, so the (tokens x vocab)
logits never exist and the prompt / image tokens never touch the head.  From the
per-token log p(y_t), E_p[log p], std_p[log p] and argmax == y_t this module derives,
per example (answer tokens y_1..y_n, the positions where ``labels != -100``):

    answer_logprob      sum_t log p(y_t)                    (log pi(y|x))
    loss                -(1/n) sum_t log p(y_t)             (mean NLL; MIA "LOSS")
    probability         exp(-loss)                          (open-unlearning "probability")
    perplexity          exp(loss)
    zlib                loss / len(zlib.compress(answer UTF-8 bytes))   (Carlini et al.)
    min_k               mean of the floor(k n) (at least 1) lowest log p(y_t)   (Shi et al.)
    min_k_plus_plus     the same over (log p(y_t) - mu_t) / sigma_t, mu_t = E_p[log p],
                        sigma_t = std_p[log p]  (Zhang et al.; 0 where sigma_t = 0)
    exact_memorization  fraction of answer tokens with argmax = y_t
    num_tokens          n

These are the raw values; the membership direction of each (is a higher value more
"member"?) is ``unlearn_fast.metrics.mia.MEMBER_DIRECTION``.

Also here: :func:`fluency` (perplexity of a model on reference answers, with the
concept-name tokens left out) and :func:`c_dis` (SIU's C-Dis from one teacher pass and
one student pass).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from unlearn_fast.metrics._model import (eval_mode, example_length, length_sorted_batches, progress, to_model)
from unlearn_fast.metrics.distributed import sharded_map
from unlearn_fast.ops.token_stats import token_stats

IGNORE_INDEX = -100
SCORE_NAMES = ("answer_logprob", "loss", "probability", "perplexity", "zlib", "min_k", "min_k_plus_plus",
               "exact_memorization", "num_tokens")
_STATS = ("logprob", "mean_logp", "std_logp", "correct")


def zlib_length(text: str) -> int:
    """Bytes of the zlib-compressed UTF-8 text (the ZLib attack's entropy proxy)."""
    return len(zlib.compress(text.encode("utf-8")))


def _check_k(k) -> float:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
        raise ValueError(f"k must be a fraction in (0, 1], got {k!r}")
    return float(k)


def _lowest_k_mean(values: torch.Tensor, mask: torch.Tensor, k: float) -> torch.Tensor:
    """Per row: mean of the floor(k n) (at least 1) smallest values among the masked ones
    (n = masked count); NaN for rows with n = 0."""
    n = mask.sum(-1)
    ranked = torch.where(mask, values, torch.full_like(values, math.inf)).sort(dim=-1).values
    take = torch.clamp(torch.floor(k * n.to(values.dtype)), min=1)
    keep = torch.arange(values.shape[-1], device=values.device) < take.unsqueeze(-1)
    total = torch.where(keep & torch.isfinite(ranked), ranked, torch.zeros_like(ranked)).sum(-1)
    return torch.where(n > 0, total / take, torch.full_like(total, math.nan))


def scores_from_token_stats(logprob: torch.Tensor, mean_logp: torch.Tensor, std_logp: torch.Tensor,
                            correct: torch.Tensor, mask: torch.Tensor, *, k: float = 0.4,
                            zlib_lengths: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """The per-example scores (module doc) from per-token statistics shaped (B, T) and the
    (B, T) bool answer mask.  Returns (B,) float64 tensors; rows without answer tokens
    give NaN (num_tokens 0).  ``zlib_lengths`` (B,) enables "zlib"."""
    k = _check_k(k)
    m = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=m.device)
    f = lambda x: torch.where(m, x.to(torch.float64), zero)  # noqa: E731  (answer positions only)
    lp = f(logprob)
    n = m.sum(-1).to(torch.float64)
    nan = torch.full_like(n, math.nan)
    safe_n = torch.where(n > 0, n, torch.ones_like(n))
    total = lp.sum(-1)
    loss = torch.where(n > 0, -total / safe_n, nan)
    sigma = f(std_logp)
    z = torch.where(sigma > 0, (lp - f(mean_logp)) / torch.where(sigma > 0, sigma, torch.ones_like(sigma)),
                    torch.zeros_like(sigma))
    out = {
        "answer_logprob": torch.where(n > 0, total, nan),
        "loss": loss,
        "probability": torch.exp(-loss),
        "perplexity": torch.exp(loss),
        "min_k": _lowest_k_mean(lp, m, k),
        "min_k_plus_plus": _lowest_k_mean(z, m, k),
        "exact_memorization": torch.where(n > 0, f(correct.to(torch.float64)).sum(-1) / safe_n, nan),
        "num_tokens": n,
    }
    if zlib_lengths is not None:
        out["zlib"] = loss / zlib_lengths.to(device=loss.device, dtype=torch.float64)
    return out


def answer_token_stats(model, adapter, batch: dict, *, stats: Sequence[str] = _STATS, backend: str = "auto",
                       excluded_token_ids: Optional[torch.Tensor] = None,
                       gather_token_ids: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """One forward of the model body, then the fused head statistics at the answer
    positions only.  Returns the (B, T-1) bool mask of scored positions (position t
    predicts token t+1) and a dict of (N,) statistics at those positions, in mask order;
    with ``gather_token_ids`` (S,) also "gathered_logits" (N, S) float32, the logits of
    those few tokens.  ``excluded_token_ids``: target ids left out of the mask."""
    hidden = adapter.hidden_states(model, batch)
    labels = batch["labels"].to(hidden.device)
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(f"adapter.hidden_states gave shape {tuple(hidden.shape)}; expected (B, T, H) aligned "
                         f"with labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    if excluded_token_ids is not None and excluded_token_ids.numel():
        mask &= ~torch.isin(targets, excluded_token_ids.to(targets.device))
    h = hidden[:, :-1][mask]
    weight, bias = adapter.lm_head(model)
    out = token_stats(h, weight, targets[mask], bias, stats=tuple(stats), backend=backend)
    if gather_token_ids is not None:
        ids = gather_token_ids.to(weight.device)
        z = h @ weight[ids].t()
        if bias is not None:
            z = z + bias[ids]
        out["gathered_logits"] = z.float()
    return mask, out


def _scatter(mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=values.dtype, device=mask.device).masked_scatter_(mask, values)


def _collate(adapter, examples, tokenizer, **kw):
    if tokenizer is None:
        raise ValueError("tokenizer is required to collate examples")
    return adapter.collate(list(examples), tokenizer, **kw)


def _batch_scores(model, adapter, batch: dict, answers: Sequence[str], k: float, backend: str) -> List[dict]:
    batch = to_model(batch, model)
    mask, st = answer_token_stats(model, adapter, batch, backend=backend)
    zl = torch.tensor([zlib_length(a) for a in answers], dtype=torch.float64)
    sc = scores_from_token_stats(_scatter(mask, st["logprob"].double()), _scatter(mask, st["mean_logp"].double()),
                                 _scatter(mask, st["std_logp"].double()), _scatter(mask, st["correct"]), mask, k=k,
                                 zlib_lengths=zl.to(mask.device))
    cols = {name: sc[name].cpu().tolist() for name in SCORE_NAMES}
    return [{name: cols[name][i] for name in SCORE_NAMES} for i in range(len(answers))]


def sequence_scores(model, adapter, examples, *, tokenizer=None, batch_size: int = 8, k: float = 0.4,
                    backend: str = "auto", shard="auto", progress_bar=None) -> Dict[str, torch.Tensor]:
    """Per-example scores of one evaluation set (module doc) from one forward pass.

    Args:
        model, adapter: the model and its adapter (``unlearn_fast.models.get_adapter``).
        examples: a sequence of ``Example`` rows (collated here with the adapter, in
            length-sorted batches), or an iterable of batches already collated with
            answers (dicts with "labels"; then ZLib decodes the answer tokens with
            ``tokenizer``).
        k: the Min-K% fraction (0.4 = 40%).
        backend: the token_stats backend ("auto", "eager", "cpp", "triton", "cuda").
        shard: split the examples over the ranks of an initialised process group
            ("auto": when there is one with more than one rank); every rank gets all.
    Returns:
        dict score name -> (N,) float64 CPU tensor in the input order (``SCORE_NAMES``).
    Raises:
        ValueError if an example has no answer token (empty or truncated answer).
    """
    k = _check_k(k)
    items = list(examples)
    if items and isinstance(items[0], dict):
        rows = []
        with eval_mode(model):
            for batch in items:
                answers = _decode_answers(batch, tokenizer)
                rows += _batch_scores(model, adapter, batch, answers, k, backend)
        ids = [f"batch row {i}" for i in range(len(rows))]
    else:
        def score(local: List) -> List[dict]:
            out: List[Optional[dict]] = [None] * len(local)
            batches = length_sorted_batches(local, [example_length(e) for e in local], batch_size)
            with eval_mode(model):
                for idx in progress(batches, len(batches), "scores", progress_bar):
                    chunk = [local[i] for i in idx]
                    batch = _collate(adapter, chunk, tokenizer, with_answer=True, padding_side="right")
                    for i, row in zip(idx, _batch_scores(model, adapter, batch, [e.answer for e in chunk], k,
                                                         backend)):
                        out[i] = row
            return out

        rows = sharded_map(score, items, shard)
        ids = [getattr(e, "id", str(i)) for i, e in enumerate(items)]
    empty = [ids[i] for i, r in enumerate(rows) if r["num_tokens"] == 0]
    if empty:
        raise ValueError(f"{len(empty)} example(s) have no answer token after collation (empty or truncated "
                         f"answer): {empty[:5]}")
    return {name: torch.tensor([r[name] for r in rows], dtype=torch.float64) for name in SCORE_NAMES}


def _decode_answers(batch: dict, tokenizer) -> List[str]:
    if tokenizer is None:
        raise ValueError("scoring pre-collated batches needs tokenizer= (ZLib decodes the answer tokens)")
    labels = batch["labels"]
    return [tokenizer.decode([int(t) for t in row if int(t) != IGNORE_INDEX], skip_special_tokens=True).strip()
            for row in labels]


def _token_id_tensor(ids, name: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        t = ids.reshape(-1).to(torch.long)
    else:
        try:
            t = torch.tensor([int(i) for i in ids], dtype=torch.long)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"{name} must be a sequence of integer token ids") from exc
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{name} must hold non-negative token ids")
    return t


def fluency(model, adapter, examples, reference_answers: Sequence[str], excluded_token_ids, *, tokenizer=None,
            batch_size: int = 8, backend: str = "auto", shard="auto", progress_bar=None) -> float:
    """SIU's fluency: perplexity of ``model`` (the unlearned one) on the original model's
    answers, exp(total NLL / total tokens) over every answer token whose id is not in
    ``excluded_token_ids`` (the concept name's tokens), pooled over the set.  NaN when no
    token is left.  ``examples[i]``'s prompt is paired with ``reference_answers[i]``."""
    examples = list(examples)
    refs = list(reference_answers)
    if len(refs) != len(examples):
        raise ValueError(f"reference_answers ({len(refs)}) and examples ({len(examples)}) differ in length")
    if any(not isinstance(r, str) for r in refs):
        raise TypeError("reference_answers must be strings")
    excluded = _token_id_tensor(excluded_token_ids, "excluded_token_ids")
    # Answers that are empty after stripping have no token to score; they carry no weight.
    items = [replace(e, answer=r, target_phrase="", options=(), answer_index=None)
             for e, r in zip(examples, refs) if r.strip()]

    def nll(local: List) -> List[Tuple[float, int]]:
        out: List = [None] * len(local)
        batches = length_sorted_batches(local, [example_length(e) for e in local], batch_size)
        with eval_mode(model):
            for idx in progress(batches, len(batches), "fluency", progress_bar):
                batch = to_model(_collate(adapter, [local[i] for i in idx], tokenizer, with_answer=True,
                                          padding_side="right"), model)
                mask, st = answer_token_stats(model, adapter, batch, stats=("logprob",), backend=backend,
                                              excluded_token_ids=excluded)
                lp = _scatter(mask, st["logprob"].double())
                for j, i in enumerate(idx):
                    out[i] = (float(-lp[j].sum()), int(mask[j].sum()))
        return out

    rows = sharded_map(nll, items, shard)
    total, count = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return math.exp(total / count) if count else float("nan")


def c_dis(student, teacher, adapter, examples, concept_token_ids, *, tokenizer=None, batch_size: int = 8,
          backend: str = "auto", shard="auto", progress_bar=None) -> float:
    """SIU's C-Dis: the mean over answer positions t and concept tokens v of
    |p_t(v) (log p_t(v) - log q_t(v))|, p = teacher (original) and q = student
    (unlearned) next-token distributions.  One teacher pass and one student pass per
    batch; each gives log p_t(v) = z_v - lse from the fused head statistics plus the
    logits of the few concept tokens, so no (tokens x vocab) tensor is formed."""
    ids = _token_id_tensor(concept_token_ids, "concept_token_ids").unique()
    if ids.numel() == 0:
        raise ValueError("concept_token_ids is empty")
    examples = list(examples)

    def terms(local: List) -> List[Tuple[float, int]]:
        out: List = [None] * len(local)
        batches = length_sorted_batches(local, [example_length(e) for e in local], batch_size)
        with eval_mode(student, teacher):
            for idx in progress(batches, len(batches), "c-dis", progress_bar):
                cpu_batch = _collate(adapter, [local[i] for i in idx], tokenizer, with_answer=True,
                                     padding_side="right")
                logp = []
                for m in (teacher, student):
                    mask, st = answer_token_stats(m, adapter, to_model(cpu_batch, m), stats=("lse",),
                                                  backend=backend, gather_token_ids=ids)
                    logp.append(((st["gathered_logits"].double() - st["lse"].double().unsqueeze(-1)), mask))
                (lp_t, mask), (lp_s, _) = logp
                kl = (lp_t.exp() * (lp_t - lp_s.to(lp_t.device))).abs().sum(-1)  # (N,) summed over v
                per_row = _scatter(mask, kl)
                for j, i in enumerate(idx):
                    out[i] = (float(per_row[j].sum()), int(mask[j].sum()))
        return out

    rows = sharded_map(terms, examples, shard)
    total, count = sum(r[0] for r in rows), sum(r[1] for r in rows)
    return total / (count * ids.numel()) if count else float("nan")
