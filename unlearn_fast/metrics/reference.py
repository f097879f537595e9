"""The per-metric eager evaluation, written the way open-unlearning's metrics are: every
metric runs its own forward pass over the evaluation set, takes the full logits
(B, T, V), and applies ``log_softmax`` / ``softmax`` over the whole vocabulary at every
position (prompt and image tokens included).

It is the benchmark baseline ("per_metric_eager") and, run on a float64 model, the test
oracle of :func:`unlearn_fast.metrics.sequence_scores`.  Same definitions as
``unlearn_fast.metrics.scores`` (see its module doc), straightforward code.
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from unlearn_fast.metrics._model import eval_mode, forward_inputs, to_model

IGNORE_INDEX = -100


def _shifted(model, adapter, batch):
    batch = to_model(batch, model)
    logits = model(**forward_inputs(model, batch, adapter)).logits
    return logits[:, :-1, :], batch["labels"][:, 1:].to(logits.device)


def _token_logprobs(logits, labels):
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    safe = labels.clamp(min=0)
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1), labels != IGNORE_INDEX


def loss_per_example(model, adapter, batch, answers) -> List[float]:
    logits, labels = _shifted(model, adapter, batch)
    nll = F.cross_entropy(logits.transpose(1, 2).float() if logits.dtype != torch.float64 else logits.transpose(1, 2),
                          labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = labels != IGNORE_INDEX
    return (nll.sum(-1) / mask.sum(-1)).tolist()


def probability_per_example(model, adapter, batch, answers) -> List[float]:
    return [math.exp(-x) for x in loss_per_example(model, adapter, batch, answers)]


def perplexity_per_example(model, adapter, batch, answers) -> List[float]:
    return [math.exp(x) for x in loss_per_example(model, adapter, batch, answers)]


def answer_logprob_per_example(model, adapter, batch, answers) -> List[float]:
    lp, mask = _token_logprobs(*_shifted(model, adapter, batch))
    return [float(lp[i][mask[i]].sum()) for i in range(lp.shape[0])]


def zlib_per_example(model, adapter, batch, answers) -> List[float]:
    losses = loss_per_example(model, adapter, batch, answers)
    return [loss / len(zlib.compress(a.encode("utf-8"))) for loss, a in zip(losses, answers)]


def exact_memorization_per_example(model, adapter, batch, answers) -> List[float]:
    logits, labels = _shifted(model, adapter, batch)
    preds = logits.argmax(-1)
    mask = labels != IGNORE_INDEX
    return [float((preds[i][mask[i]] == labels[i][mask[i]]).float().mean()) for i in range(labels.shape[0])]


def _lowest_k(values: np.ndarray, k: float) -> float:
    num = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:num]))


def min_k_per_example(model, adapter, batch, answers, k: float = 0.4) -> List[float]:
    lp, mask = _token_logprobs(*_shifted(model, adapter, batch))
    return [_lowest_k(lp[i][mask[i]].double().cpu().numpy(), k) for i in range(lp.shape[0])]


def min_k_plus_plus_per_example(model, adapter, batch, answers, k: float = 0.4) -> List[float]:
    logits, labels = _shifted(model, adapter, batch)
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    logp = F.log_softmax(logits, dim=-1)
    p = F.softmax(logits, dim=-1)
    mu = (p * logp).sum(-1)
    sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    z = torch.where(sigma > 0, (tok - mu) / torch.where(sigma > 0, sigma, torch.ones_like(sigma)),
                    torch.zeros_like(sigma))
    mask = labels != IGNORE_INDEX
    return [_lowest_k(z[i][mask[i]].double().cpu().numpy(), k) for i in range(z.shape[0])]


METRICS: Dict[str, Callable] = {
    "answer_logprob": answer_logprob_per_example,
    "loss": loss_per_example,
    "probability": probability_per_example,
    "perplexity": perplexity_per_example,
    "zlib": zlib_per_example,
    "min_k": min_k_per_example,
    "min_k_plus_plus": min_k_plus_plus_per_example,
    "exact_memorization": exact_memorization_per_example,
}


def per_metric_scores(model, adapter, examples: Sequence, *, tokenizer, batch_size: int = 8, k: float = 0.4,
                      metrics: Sequence[str] = tuple(METRICS)) -> Dict[str, torch.Tensor]:
    """Every metric in ``metrics`` with its own pass over ``examples`` (in order, fixed
    batches); dict name -> (N,) float64 tensor, like ``sequence_scores``."""
    examples = list(examples)
    out = {}
    with eval_mode(model):
        for name in metrics:
            fn = METRICS[name]
            vals: List[float] = []
            for s in range(0, len(examples), batch_size):
                chunk = examples[s:s + batch_size]
                batch = adapter.collate(chunk, tokenizer, with_answer=True, padding_side="right")
                answers = [e.answer for e in chunk]
                if name in ("min_k", "min_k_plus_plus"):
                    vals += fn(model, adapter, batch, answers, k=k)
                else:
                    vals += fn(model, adapter, batch, answers)
            out[name] = torch.tensor(vals, dtype=torch.float64)
    return out
