"""The language-model loss terms of the unlearning methods, from final hidden states and
the lm_head through the fused ops (the (tokens x vocab) logits never exist unless the
backend is "eager", the baseline: full logits, then the loss).

A batch (``ModelAdapter.collate``) holds input_ids, attention_mask, labels (-100 outside
the answer), target_phrase_mask and the model's image inputs.  Causal shift: the hidden
state at position t predicts token t + 1, so per-token masks over the batch positions
are shifted by one (``mask[:, 1:]``) to line up with the predictions ``hidden[:, :-1]``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from unlearn_fast.metrics.distributed import world
from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl
from unlearn_fast.ops.dual_masked_kl import build_vocab_mask
from unlearn_fast.ops.losses import cross_entropy, sequence_logprob
from unlearn_fast.ops.token_stats import token_stats

IGNORE_INDEX = -100


def _world_size() -> int:
    return world()[1]


def global_counts(count: torch.Tensor) -> torch.Tensor:
    """This rank's count(s) summed over the ranks (float32; the counts in one process)."""
    count = count.detach().to(torch.float32)
    if _world_size() > 1:
        count = count.clone()
        torch.distributed.all_reduce(count)
    return count


def global_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, where under torch.distributed both are this rank's share: the
    count is summed over ranks and the result scaled by the world size, so that after
    the trainer averages gradients over ranks the loss (and its gradient) equal the
    single-process mean over the whole global batch.  0 when nothing is counted."""
    world = _world_size()
    count = global_counts(count)
    if world > 1:
        return total * world / count.clamp(min=1.0)
    return total / count.clamp(min=1.0)


class LMContext:
    """The model being unlearned, its adapter, the frozen reference and the backend.

    ``reference`` is a :class:`unlearn_fast.models.Reference` (LoRA: the same module with
    adapters disabled, no copy) or None for methods that need none.
    """

    def __init__(self, model, adapter, *, backend: str = "auto", reference=None):
        self.model, self.adapter, self.backend, self.reference = model, adapter, backend, reference

    # -- forward passes -----------------------------------------------------------------
    def hidden(self, batch) -> torch.Tensor:
        return self.adapter.hidden_states(self.model, batch)

    def head(self):
        return self.adapter.lm_head(self.model)

    def reference_hidden_and_head(self, batch):
        """(hidden, weight, bias) of the frozen original model, without autograd."""
        if self.reference is None:
            raise ValueError("this loss needs the frozen reference model, but the method was built without one")
        with self.reference.active() as ref:
            hidden = self.adapter.hidden_states(ref, batch)
            w, b = self.adapter.lm_head(ref)
        return hidden.detach(), w.detach(), (b.detach() if b is not None else None)

    # -- loss terms -------------------------------------------------------------------------
    def ce(self, batch, hidden: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean NLL over the answer tokens of the (global) batch (0 when there are none)."""
        hidden = self.hidden(batch) if hidden is None else hidden
        w, b = self.head()
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        y = batch["labels"][:, 1:].reshape(-1)
        total = cross_entropy(h, w, y, b, reduction="sum", backend=self.backend)
        return global_mean(total, (y != IGNORE_INDEX).sum())

    def token_logprobs(self, batch, hidden: Optional[torch.Tensor] = None, *, reference: bool = False
                       ) -> torch.Tensor:
        """(B, T-1) log-probs of the answer tokens (0 elsewhere); reference=True: the
        original model's (no autograd)."""
        if reference:
            hidden, w, b = self.reference_hidden_and_head(batch)
        else:
            hidden = self.hidden(batch) if hidden is None else hidden
            w, b = self.head()
        B, T, H = hidden.shape
        y = batch["labels"][:, 1:]
        lp = token_stats(hidden[:, :-1].reshape(-1, H), w, y.reshape(-1), b, stats=("logprob",),
                         backend=self.backend)["logprob"]
        return lp.reshape(B, T - 1)

    def sequence_logps(self, batch, hidden: Optional[torch.Tensor] = None, *, reference: bool = False
                       ) -> torch.Tensor:
        """(B,) log pi(y|x): the sum of the answer tokens' log-probs."""
        lp = self.token_logprobs(batch, hidden, reference=reference)
        return sequence_logprob(lp, batch["labels"][:, 1:] != IGNORE_INDEX)

    @staticmethod
    def mean_over_sequences(values: torch.Tensor) -> torch.Tensor:
        """Mean of per-sequence values over the (global) batch."""
        return global_mean(values.sum(), torch.tensor(values.shape[0], device=values.device))

    def dual_masked_kl(self, batch, token_mask: torch.Tensor, hidden: Optional[torch.Tensor] = None, *,
                       vocab_mask: Optional[torch.Tensor] = None, form: str = "kl", reduction: str = "mean",
                       temperature: float = 1.0) -> torch.Tensor:
        """KL(original || current) of the next-token distributions at the batch positions
        where ``token_mask`` (B, T, over the predicted tokens' positions) is True, with
        K_V = ``vocab_mask``; fused from both models' hidden states and heads."""
        if reduction not in ("mean", "siu", "sum"):
            raise ValueError(f"reduction must be 'mean', 'siu' or 'sum', got {reduction!r}")
        hidden = self.hidden(batch) if hidden is None else hidden
        w, b = self.head()
        t_hidden, t_w, t_b = self.reference_hidden_and_head(batch)
        mask = token_mask[:, 1:]
        total = fused_linear_dual_masked_kl(hidden[:, :-1], w, t_hidden[:, :-1], t_w, mask, vocab_mask,
                                            form=form, reduction="sum", temperature=temperature,
                                            student_bias=b, teacher_bias=t_b, backend=self.backend)
        if reduction == "sum":  # times the world size: the trainer averages gradients over ranks
            return total * _world_size()
        # "mean": over the kept positions; "siu": also over the vocabulary (the reference
        # code's Z = kept positions x V)
        scale = w.shape[0] if reduction == "siu" else 1
        return global_mean(total, mask.sum()) / scale

    def vocab_mask(self, forget_token_ids: Sequence[int]) -> Optional[torch.Tensor]:
        """K_V as a float (V,) tensor with the given ids at 0 (None when there are none)."""
        if not forget_token_ids:
            return None
        w, _ = self.head()
        return build_vocab_mask(w.shape[0], forget_token_ids=list(forget_token_ids), device=w.device)


def answer_mask(batch) -> torch.Tensor:
    """(B, T) True at the answer tokens (labels != -100)."""
    return batch["labels"] != IGNORE_INDEX


def attended_mask(batch) -> torch.Tensor:
    """(B, T) True at every non-padding position."""
    return batch["attention_mask"].bool()


def describe_terms(terms: Dict[str, torch.Tensor]) -> Dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}
