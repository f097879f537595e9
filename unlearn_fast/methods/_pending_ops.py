"""TEMPORARY: eager stand-ins for ops that other branches are landing
(fused_linear -> branch fusedlinear, saliency -> branch saliency, modality -> branch
modality).  Each name is the real op when importable; otherwise a plain-PyTorch version
with the same signature and semantics (the subset the methods use).  Delete this file
once main has all three, and import the real ones where this module is imported.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

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

# ---------------------------------------------------------------- saliency
try:
    from unlearn_fast.saliency import (FisherAccumulator, mmunlearner_mask, mmunlearner_preserve_fisher,
                                       transform_gradients_)
except ModuleNotFoundError as _exc:
    if _exc.name != "unlearn_fast.saliency":
        raise

    class FisherAccumulator:  # type: ignore[no-redef]
        def __init__(self, params, *, backend: str = "auto", dtype=torch.float32):
            named = list(params)
            self.names = [n for n, _ in named]
            self.params = [p for _, p in named]
            self.fisher = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in self.params]
            self.num_batches = 0

        def accumulate(self, grads=None, scale: float = 1.0):
            grads = [p.grad for p in self.params] if grads is None else grads
            with torch.no_grad():
                for f, g in zip(self.fisher, grads):
                    if g is not None:
                        f.add_(g.float().square(), alpha=scale)
            self.num_batches += 1
            return self

        def mean(self) -> List[torch.Tensor]:
            if self.num_batches == 0:
                raise RuntimeError("FisherAccumulator.mean(): nothing accumulated yet")
            return [f / self.num_batches for f in self.fisher]

    def _pick(named_params, is_vision, fv, fl):
        return [a if is_vision(n) else b for (n, _), a, b in zip(named_params, fv, fl)]

    def mmunlearner_preserve_fisher(named_params, preserve_fisher_vision, preserve_fisher_language, is_vision):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        return _pick(named, is_vision, list(preserve_fisher_vision), list(preserve_fisher_language))

    def mmunlearner_mask(named_params, forget_fisher, preserve_fisher_vision, preserve_fisher_language, is_vision,
                         threshold: float = 1.0, eps: float = 1e-15, **_):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        preserve = _pick(named, is_vision, list(preserve_fisher_vision), list(preserve_fisher_language))
        return [((ff + eps) / (fp + eps)) >= threshold for ff, fp in zip(forget_fisher, preserve)]

    def transform_gradients_(grads, mask=None, mode: str = "mask", preserve_fisher=None, lam: float = 1.0,
                             project_out=None, max_norm: Optional[float] = None, *, backend: str = "auto"):
        with torch.no_grad():
            if max_norm is not None:
                total = torch.sqrt(sum(g.float().square().sum() for g in grads))
                coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
                for g in grads:
                    g.mul_(coef.to(g.dtype))
            for i, g in enumerate(grads):
                if mask is not None:
                    g.mul_(mask[i].to(g.dtype))
                if mode == "geometry":
                    g.div_((preserve_fisher[i] + lam).to(g.dtype))
        return None

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
