"""Language-model loss terms of the unlearning methods, computed from final hidden
states and the lm_head weight through the fused ops (the logits never exist unless the
backend is "eager", which is the baseline path: full logits, then the loss).

Conventions: a batch holds ``input_ids``, ``attention_mask``, ``labels`` (-100 outside
the answer) and whatever the model's forward needs (``pixel_values``...).  Causal
shift: hidden state t predicts token t + 1.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl
from unlearn_fast.ops.losses import npo, sequence_logprob
from unlearn_fast.ops.token_stats import token_stats

IGNORE = -100


class LMContext:
    """What a method needs of the model: hidden states, head, and the frozen reference.

    ``reference_hidden(batch)`` returns the original model's final hidden states (no
    grad); ``reference_head()`` its lm_head (weight, bias).  With LoRA both come from the
    same weights with the adapters disabled, so no second copy of the model exists."""

    def __init__(self, model, adapter, backend: str = "auto",
                 reference_hidden: Optional[Callable] = None, reference_head: Optional[Callable] = None):
        self.model = model
        self.adapter = adapter
        self.backend = backend
        self._reference_hidden = reference_hidden
        self._reference_head = reference_head

    def hidden(self, batch) -> torch.Tensor:
        return self.adapter.hidden_states(self.model, batch)

    def head(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.adapter.lm_head(self.model)

    def reference_hidden(self, batch) -> torch.Tensor:
        if self._reference_hidden is None:
            raise ValueError("this method needs the frozen reference model, but none was given")
        with torch.no_grad():
            return self._reference_hidden(batch)

    def reference_head(self):
        if self._reference_head is None:
            w, b = self.head()
            return w.detach(), (b.detach() if b is not None else None)
        return self._reference_head()


def _shift(hidden: torch.Tensor, labels: torch.Tensor):
    return hidden[:, :-1], labels[:, 1:]


def answer_logprobs(ctx: LMContext, batch, hidden: Optional[torch.Tensor] = None,
                    stats: Sequence[str] = ("logprob",)) -> Dict[str, torch.Tensor]:
    """Per-token statistics of the answer tokens (0 elsewhere), shape (B, T-1)."""
    hidden = ctx.hidden(batch) if hidden is None else hidden
    weight, bias = ctx.head()
    h, y = _shift(hidden, batch["labels"])
    return token_stats(h, weight, y, bias, stats=tuple(stats), backend=ctx.backend)


def cross_entropy(ctx: LMContext, batch) -> torch.Tensor:
    """Mean negative log-likelihood over the answer tokens of the batch (0 if none)."""
    lp = answer_logprobs(ctx, batch)["logprob"]
    kept = (batch["labels"][:, 1:] != IGNORE)
    return -(lp.sum()) / kept.sum().clamp(min=1)


def sequence_logps(ctx: LMContext, batch, reference: bool = False) -> torch.Tensor:
    """Sum of answer-token log-probs per sequence (B,)."""
    if reference:
        with torch.no_grad():
            hidden = ctx.reference_hidden(batch)
            weight, bias = ctx.reference_head()
            h, y = _shift(hidden, batch["labels"])
            lp = token_stats(h, weight, y, bias, backend=ctx.backend)["logprob"]
    else:
        lp = answer_logprobs(ctx, batch)["logprob"]
    return sequence_logprob(lp, batch["labels"][:, 1:] != IGNORE)


def npo_loss(ctx: LMContext, batch, beta: float) -> torch.Tensor:
    return npo(sequence_logps(ctx, batch), sequence_logps(ctx, batch, reference=True), beta=beta)


def reference_kl(ctx: LMContext, batch, token_mask: Optional[torch.Tensor] = None, vocab_mask=None,
                 forget_token_ids=None, form: str = "kl", reduction: str = "mean") -> torch.Tensor:
    """KL(reference || current) over positions (fused linear dual masked KL).

    ``token_mask`` is over the label positions (B, T); None means the answer tokens."""
    hidden = ctx.hidden(batch)
    teacher = ctx.reference_hidden(batch)
    weight, bias = ctx.head()
    t_weight, t_bias = ctx.reference_head()
    labels = batch["labels"]
    if token_mask is None:
        token_mask = labels != IGNORE
    # position t's distribution predicts token t+1: align the mask with the shifted labels
    mask = token_mask[:, 1:]
    return fused_linear_dual_masked_kl(hidden[:, :-1], weight, teacher[:, :-1], t_weight, mask, vocab_mask,
                                       forget_token_ids=forget_token_ids, form=form, reduction=reduction,
                                       student_bias=bias, teacher_bias=t_bias, backend=ctx.backend)
