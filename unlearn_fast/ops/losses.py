"""Sequence losses of the GA / NPO family, built on :mod:`unlearn_fast.ops.token_stats`.

Fused path: from hidden states and the head weight (``cross_entropy``,
``gradient_ascent``), never materialising the logits; logits path:
``cross_entropy_from_logits``, ``gradient_ascent_from_logits``.  Token log-probs for
preference losses come from ``token_stats(...)["logprob"]`` and
:func:`sequence_logprob`.

Reductions (stated once, used everywhere):
  * token losses: "none" -> per token, shaped like ``targets``, 0 at ignored positions
    (times the token weight); "sum" -> sum over answer tokens; "mean" -> weighted mean
    over answer tokens, sum_t w_t nll_t / sum_t w_t (w_t = 1 without ``token_weights``),
    and 0 (not NaN) when no token is kept.
  * sequence losses (npo, simnpo): "none" -> per sequence; "sum"; "mean" over sequences
    (0 for an empty batch).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_fast.ops import _validation as V
from unlearn_fast.ops._common import REDUCTIONS
from unlearn_fast.ops.token_stats import linear_logprob_sum, token_stats, token_stats_from_logits


def _token_weights(token_weights, targets: torch.Tensor, ignore_index: int, dtype) -> torch.Tensor:
    kept = (targets != ignore_index).to(dtype)
    if token_weights is None:
        return kept
    V.check_tensor(token_weights, "token_weights")
    if tuple(token_weights.shape) != tuple(targets.shape):
        raise ValueError(f"token_weights must have shape {tuple(targets.shape)} (like targets), "
                         f"got {tuple(token_weights.shape)}")
    if token_weights.device != targets.device:
        raise ValueError(f"token_weights is on {token_weights.device} but targets is on {targets.device}")
    if token_weights.is_complex():
        raise TypeError(f"token_weights must be real, got {token_weights.dtype}")
    return token_weights.to(dtype) * kept


def _safe_mean(total: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    # denom == 0 only when nothing is kept, where total is 0 too: 0 / 1, no NaN in
    # either the value or the gradient, no host sync.
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def _reduce_tokens(nll: torch.Tensor, targets: torch.Tensor, token_weights, ignore_index: int, reduction: str):
    w = _token_weights(token_weights, targets, ignore_index, nll.dtype)
    per_token = nll * w
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    return _safe_mean(total, w.sum())


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  bias: Optional[torch.Tensor] = None, *, token_weights: Optional[torch.Tensor] = None,
                  ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                  backend: str = "auto") -> torch.Tensor:
    """Cross-entropy -log p(target) of ``logits = hidden @ weight.T (+ bias)``, fused
    (the logits are never materialised).  Shapes as in :func:`token_stats`; optional
    per-token ``token_weights`` shaped like ``targets``.  Reductions: see the module doc
    ("mean" = weighted mean over answer tokens, 0 when none)."""
    V.check_choice(reduction, "reduction", REDUCTIONS)
    if reduction != "none" and not (isinstance(token_weights, torch.Tensor) and token_weights.requires_grad):
        # a fixed weighted sum of the tokens' log-probs: its gradients are formed in the
        # fused forward (the logits are computed once)
        V.check_tensor(targets, "targets")
        w = _token_weights(token_weights, targets, ignore_index,
                           torch.float64 if hidden.dtype == torch.float64 else torch.float32)
        total = -linear_logprob_sum(hidden, weight, targets, bias, w, ignore_index=ignore_index,
                                    chunk_size=chunk_size, backend=backend)
        return total if reduction == "sum" else _safe_mean(total, w.sum().to(total.dtype))
    lp = token_stats(hidden, weight, targets, bias, ignore_index=ignore_index, stats=("logprob",),
                     chunk_size=chunk_size, backend=backend)["logprob"]
    return _reduce_tokens(-lp, targets, token_weights, ignore_index, reduction)


def cross_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor, *,
                              token_weights: Optional[torch.Tensor] = None, ignore_index: int = -100,
                              reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """:func:`cross_entropy` on logits (..., V) with targets (...)."""
    V.check_choice(reduction, "reduction", REDUCTIONS)
    lp = token_stats_from_logits(logits, targets, ignore_index=ignore_index, stats=("logprob",),
                                 backend=backend)["logprob"]
    return _reduce_tokens(-lp, targets, token_weights, ignore_index, reduction)


def gradient_ascent(hidden, weight, targets, bias=None, **kwargs) -> torch.Tensor:
    """Gradient ascent on the forget set: -:func:`cross_entropy` (same arguments)."""
    return -cross_entropy(hidden, weight, targets, bias, **kwargs)


def gradient_ascent_from_logits(logits, targets, **kwargs) -> torch.Tensor:
    """-:func:`cross_entropy_from_logits` (same arguments)."""
    return -cross_entropy_from_logits(logits, targets, **kwargs)


def sequence_logprob(token_logprobs: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                     normalize: bool = False) -> torch.Tensor:
    """Sequence log-prob log pi(y|x) = sum of the answer tokens' log-probs, per sequence.

    Args:
        token_logprobs: (B, T) per-token log-probs (e.g. ``token_stats(...)["logprob"]``,
            which is already 0 at ignored positions).
        mask: optional (B, T) bool / 0-1 mask of answer tokens (None: every position).
        normalize: divide by the number of answer tokens |y| (length-normalised, SimNPO's
            (1/|y|) log pi(y|x)); a sequence with no answer token gives 0.
    Returns:
        (B,) tensor in the input's dtype.
    """
    V.check_tensor(token_logprobs, "token_logprobs", floating=True, dims=(2,))
    if mask is None:
        m = torch.ones_like(token_logprobs)
    else:
        m = V.mask_as_float(mask, "mask", token_logprobs.shape, token_logprobs.device).to(token_logprobs.dtype)
    total = (token_logprobs * m).sum(-1)
    if not normalize:
        return total
    return _safe_mean(total, m.sum(-1))


def _check_seq(x, name: str) -> torch.Tensor:
    V.check_tensor(x, name, floating=True, dims=(1,))
    return x


def _reduce_seq(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / max(losses.numel(), 1)


def npo(policy_logps: torch.Tensor, reference_logps: torch.Tensor, *, beta: float = 0.1,
        reduction: str = "mean") -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024):

        L = -(2 / beta) * log sigmoid(-beta * (log pi_theta(y|x) - log pi_ref(y|x)))

    on sequence-level log-probs (sums over the answer tokens, :func:`sequence_logprob`),
    one value per sequence, then reduced over sequences ("mean" by default).  The
    reference log-probs are a constant (detached).
    """
    _check_seq(policy_logps, "policy_logps")
    _check_seq(reference_logps, "reference_logps")
    V.check_same(policy_logps, reference_logps, "policy_logps", "reference_logps", dtype=False)
    beta = V.check_positive(beta, "beta")
    V.check_choice(reduction, "reduction", REDUCTIONS)
    log_ratio = policy_logps - reference_logps.detach().to(policy_logps.dtype)
    return _reduce_seq(-(2.0 / beta) * F.logsigmoid(-beta * log_ratio), reduction)


def simnpo(policy_logps: torch.Tensor, lengths: Optional[torch.Tensor] = None, *, beta: float = 2.5,
           delta: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised:

        L = -(2 / beta) * log sigmoid(-(beta / |y|) * log pi_theta(y|x) - delta)

    ``policy_logps``: (B,) sequence log-probs; with ``lengths`` (B,) (|y|, answer tokens)
    they are divided by the lengths here (a length of 0 counts as 1), without it they
    must already be length-normalised (``sequence_logprob(..., normalize=True)``).
    Reduced over sequences ("mean" by default).
    """
    _check_seq(policy_logps, "policy_logps")
    beta = V.check_positive(beta, "beta")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a Python number, got {type(delta).__name__}")
    V.check_choice(reduction, "reduction", REDUCTIONS)
    avg = policy_logps
    if lengths is not None:
        V.check_tensor(lengths, "lengths")
        if tuple(lengths.shape) != tuple(policy_logps.shape):
            raise ValueError(f"lengths must have shape {tuple(policy_logps.shape)}, got {tuple(lengths.shape)}")
        if lengths.device != policy_logps.device:
            raise ValueError(f"lengths is on {lengths.device} but policy_logps is on {policy_logps.device}")
        avg = _safe_mean(policy_logps, lengths.to(policy_logps.dtype))
    return _reduce_seq(-(2.0 / beta) * F.logsigmoid(-beta * avg - float(delta)), reduction)


# --------------------------------------------------------------------------------------
# nn.Modules
# --------------------------------------------------------------------------------------
class LinearCrossEntropyLoss(nn.Module):
    """Fused head + cross-entropy: ``forward(hidden, weight, targets, bias=None, token_weights=None)``.
    ``negate=True`` gives gradient ascent (-CE)."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", chunk_size: Optional[int] = None,
                 negate: bool = False, backend: str = "auto"):
        super().__init__()
        V.check_choice(reduction, "reduction", REDUCTIONS)
        self.ignore_index, self.reduction, self.chunk_size = ignore_index, reduction, chunk_size
        self.negate, self.backend = negate, backend

    def forward(self, hidden, weight, targets, bias=None, token_weights=None):
        loss = cross_entropy(hidden, weight, targets, bias, token_weights=token_weights,
                             ignore_index=self.ignore_index, reduction=self.reduction,
                             chunk_size=self.chunk_size, backend=self.backend)
        return -loss if self.negate else loss

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, negate={self.negate}, backend={self.backend!r}"


class CrossEntropyLoss(nn.Module):
    """Cross-entropy on logits: ``forward(logits, targets, token_weights=None)``;
    ``negate=True`` gives gradient ascent."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", negate: bool = False,
                 backend: str = "auto"):
        super().__init__()
        V.check_choice(reduction, "reduction", REDUCTIONS)
        self.ignore_index, self.reduction, self.negate, self.backend = ignore_index, reduction, negate, backend

    def forward(self, logits, targets, token_weights=None):
        loss = cross_entropy_from_logits(logits, targets, token_weights=token_weights,
                                         ignore_index=self.ignore_index, reduction=self.reduction,
                                         backend=self.backend)
        return -loss if self.negate else loss


class GradientAscentLoss(LinearCrossEntropyLoss):
    """-CE from hidden states and the head weight (see :class:`LinearCrossEntropyLoss`)."""

    def __init__(self, **kwargs):
        kwargs["negate"] = True
        super().__init__(**kwargs)


class NPOLoss(nn.Module):
    """:func:`npo` as a module: ``forward(policy_logps, reference_logps)``."""

    def __init__(self, beta: float = 0.1, reduction: str = "mean"):
        super().__init__()
        self.beta = V.check_positive(beta, "beta")
        V.check_choice(reduction, "reduction", REDUCTIONS)
        self.reduction = reduction

    def forward(self, policy_logps, reference_logps):
        return npo(policy_logps, reference_logps, beta=self.beta, reduction=self.reduction)


class SimNPOLoss(nn.Module):
    """:func:`simnpo` as a module: ``forward(policy_logps, lengths=None)``."""

    def __init__(self, beta: float = 2.5, delta: float = 0.0, reduction: str = "mean"):
        super().__init__()
        self.beta = V.check_positive(beta, "beta")
        V.check_choice(reduction, "reduction", REDUCTIONS)
        self.delta, self.reduction = float(delta), reduction

    def forward(self, policy_logps, lengths=None):
        return simnpo(policy_logps, lengths, beta=self.beta, delta=self.delta, reduction=self.reduction)
