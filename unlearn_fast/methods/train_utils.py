"""Small loss helpers shared by the base-model training and the methods."""
from __future__ import annotations

import torch

from unlearn_fast.ops.losses import cross_entropy

IGNORE_INDEX = -100


def answer_cross_entropy(model, adapter, batch, backend: str = "auto") -> torch.Tensor:
    """Mean NLL of the answer tokens (labels != -100), fused from the hidden states and
    the lm_head (the logits are never materialised unless backend="eager")."""
    hidden = adapter.hidden_states(model, batch)
    weight, bias = adapter.lm_head(model)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = batch["labels"][:, 1:].reshape(-1)
    return cross_entropy(h, weight, y, bias, backend=backend)
