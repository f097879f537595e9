"""TEMPORARY: eager stand-ins for ops that other branches are landing
(fused_linear -> branch fusedlinear, modality -> branch modality; saliency has landed and
is imported directly).  Each name is the real op when importable; otherwise a
plain-PyTorch version with the same signature and semantics (the subset the methods
use).  Delete this file once main has both, and import the real ones where this module
is imported (methods/lm.py, methods/multidelete.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# ---------------------------------------------------------------- fused linear DMK
try:
    from unlearn_fast.ops.fused_linear import fused_linear_dual_masked_kl
except ModuleNotFoundError as _exc:
    if _exc.name != "unlearn_fast.ops.fused_linear":
        raise

    def fused_linear_dual_masked_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, token_mask=None,
                                    vocab_mask=None, *, forget_token_ids=None, form="kl", reduction="mean",
                                    temperature=1.0, student_bias=None, teacher_bias=None, chunk_size=None,
                                    backend="auto"):
        """Stand-in: materialises both logits, then the (fused) dual_masked_kl on them."""
        from unlearn_fast.ops.dual_masked_kl import dual_masked_kl

        s = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
        t = torch.nn.functional.linear(teacher_hidden, teacher_weight, teacher_bias)
        return dual_masked_kl(s, t.detach(), token_mask, vocab_mask, forget_token_ids=forget_token_ids, form=form,
                              reduction=reduction, temperature=temperature, backend=backend)

# ---------------------------------------------------------------- modality decoupling
try:
    from unlearn_fast.ops.modality import derangement, modality_decoupling_loss
except ModuleNotFoundError as _exc:
    if _exc.name != "unlearn_fast.ops.modality":
        raise

    def derangement(n: int, seed: Optional[int] = None, *, generator=None, device=None) -> torch.Tensor:
        if n < 2:
            raise ValueError(f"n must be >= 2 to shuffle without fixed points, got {n}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else generator
        while True:
            perm = torch.randperm(n, generator=gen)
            if not bool((perm == torch.arange(n)).any()):
                return perm.to(device) if device is not None else perm

    def modality_decoupling_loss(student_forget_fused, reference_shuffled_fused, student_retain_fused,
                                 reference_retain_fused, student_unimodal, reference_unimodal, *,
                                 weights: Sequence[float] = (1.0, 1.0, 1.0), distance: str = "mse",
                                 reduction: str = "mean", return_terms: bool = False, backend: str = "auto"):
        def d(s, r):
            r = r.detach()
            if s.numel() == 0:
                return s.new_zeros(())
            if distance == "cosine":
                return (1 - torch.nn.functional.cosine_similarity(s, r, dim=-1)).mean()
            return torch.nn.functional.mse_loss(s, r)

        terms = {"md": d(student_forget_fused, reference_shuffled_fused),
                 "multi": d(student_retain_fused, reference_retain_fused),
                 "uni": d(student_unimodal, reference_unimodal)}
        loss = weights[0] * terms["md"] + weights[1] * terms["multi"] + weights[2] * terms["uni"]
        return (loss, terms) if return_terms else loss
