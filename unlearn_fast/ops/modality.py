"""MultiDelete's modality-decoupling losses (Cheng & Amiri, ECCV 2024), fused.

M = the frozen reference (original) model, M^ = the student being unlearned.

modality_decoupling_loss
    L = w_md L_MD + w_multi L_multi + w_uni L_uni
    L_MD    = D(M^(I_f, T_f), M(I_f, T_perm))   deleted pairs -> look like mismatched pairs
    L_multi = D(M^(I_r, T_r), M(I_r, T_r))      multimodal retention
    L_uni   = D(M^(I_f),      M(I_f))           unimodal retention
    D = mean squared error over elements (the reference code's nn.MSELoss) or the mean
    cosine distance 1 - cos over embeddings.  One fused pass covers the three pairs.

similarity_matching_loss (the retrieval variant)
    S = A B^T / T   the student's image-to-text similarities on the forget pairs
    R = C D^T / T   the reference model's on shuffled pairs (D = T_perm's embeddings)
    form="mse":  ||S - R||_F^2 / (Bi Bt)  (= F.mse_loss(S, R)), computed without S or R
                 from D x D Gram matrices (``algorithm="gram"``):
                     ||A B^T - C D^T||^2 = <A^T A, B^T B> - 2 <A^T C, B^T D> + <C^T C, D^T D>
                     d/dA = 2 (A (B^T B) - C (B^T D)^T),  d/dB = 2 (B (A^T A) - D (A^T C)^T)
                 (divided by T^2 Bi Bt): O(Bi Bt D) time becomes O((Bi + Bt) D^2), memory
                 O((Bi + Bt) D + D^2).  For small batches (B < ~2.5 D) the Gram products cost
                 more than the B x B ones, and ``algorithm="blocked"`` streams row panels of
                 S - R instead; "auto" picks the cheaper one.  The t2i matrix is S^T, which has
                 the same MSE, so the three directions give the same value.
    form="kl":   row-wise KL(softmax(R_i) || softmax(S_i)) averaged over rows (i2t), over
                 columns (t2i, the rows of S^T), or the mean of both ("both").  Computed panel
                 by panel with an online softmax (running max / sum / shifted cross term),
                 never holding Bi x Bt; the gradient recomputes the panels.

Gradients flow to the student embeddings only (the reference's are constants).  Fused
backends accumulate in float32 whatever the input dtype; float64 runs on the eager backend.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from unlearn_fast import backends
from unlearn_fast.ops import _validation as V
from unlearn_fast.ops._common import KernelPair, cpu_ops, cuda_ops, register_first_order_autograd, resolve_for_inputs

OP_DECOUPLING = "modality_decoupling"
OP_SIMILARITY = "similarity_matching"
DISTANCES = ("mse", "cosine")
FORMS = ("mse", "kl")
DIRECTIONS = ("both", "i2t", "t2i")
REDUCTIONS = ("mean", "sum")
MSE_ALGORITHMS = ("auto", "gram", "blocked")
TERM_NAMES = ("md", "multi", "uni")

# Panels of the similarity matrices processed at once by the cpp and cuda backends:
# a batch whose Bi x Bt matrices have at most SINGLE_PANEL_ELEMENTS entries is one panel
# (64 MiB per float32 matrix: both directions' statistics are then complete after one pass,
# so the gradient is formed in the forward pass and nothing is recomputed); larger batches
# use panels of about PANEL_ELEMENTS entries (16 MiB), i.e. O(B) memory.
SINGLE_PANEL_ELEMENTS = 2**24
PANEL_ELEMENTS = 2**22
# backend="auto" on the CPU runs the eager reference for batches with Bi * Bt <= this (B <= 256):
# there the B x B matrices are no larger than the embeddings, the fused paths run the same
# GEMMs as eager and save nothing (measured fused / eager time 0.9 - 1.1 on CPU).
AUTO_EAGER_MAX_ELEMENTS = 2**16
# backend="auto" on the CPU runs modality_decoupling_loss's eager reference when no pair holds
# more than this many elements (e.g. B <= 1024 at D = 256): its three distances are a few
# elementwise passes, and below this size the fused pass's launch and reduction overhead is
# not repaid (bench multidelete --quick, CPU: fused / eager 0.75-0.94 at B = 256, D = 256;
# 0.99-1.3 at B = 1024).
AUTO_EAGER_DECOUPLING_ELEMENTS = 2**18
STATS_ROWS = 4  # (max_s, log_sum_s, max_r, log_sum_r) per row / column, structure-of-arrays


# ======================================================================================
# Derangement: T_perm
# ======================================================================================
def derangement(n: int, seed: Optional[int] = None, *, generator: Optional[torch.Generator] = None,
                device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """A permutation ``perm`` of range(n) with ``perm[i] != i`` for every i, drawn uniformly
    from all derangements of n items (int64 tensor).

    Rejection sampling: draw uniform permutations (``torch.randperm``) until one has no fixed
    point.  Conditioning a uniform distribution on an event keeps it uniform over that event,
    and about 1/e of all permutations are derangements, so ~2.7 draws are expected.  (Sattolo's
    algorithm would be one pass, but it only produces the (n-1)! single n-cycles, not the !n
    derangements: for n = 4 it never yields (0 1)(2 3).)

    Args:
        n: number of items, >= 2 (a single item cannot be moved).
        seed: makes the draw reproducible (a private generator seeded with it); None uses
            ``generator`` or torch's global generator.
        generator: a CPU ``torch.Generator`` (ignored when ``seed`` is given).
        device: where the result lives (drawn on the CPU, then moved).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be a Python int, got {type(n).__name__}")
    if n < 2:
        raise ValueError(f"n must be >= 2 to shuffle without fixed points, got {n}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be a Python int or None, got {type(seed).__name__}")
        generator = torch.Generator().manual_seed(seed)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    identity = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == identity).any()):
            return perm if device is None else perm.to(device)


def shuffle_without_fixed_points(x: torch.Tensor, seed: Optional[int] = None, *,
                                 generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(x[perm], perm)`` with ``perm = derangement(len(x), seed)``: every row of ``x`` moves
    (MultiDelete's T_perm: the forget captions shuffled within the batch)."""
    V.check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (the batch)")
    perm = derangement(x.shape[0], seed, generator=generator, device=x.device)
    return x[perm], perm


# ======================================================================================
# Eager references (the "eager" backend, the benchmark baseline and, in float64, the oracle)
# ======================================================================================
def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def reference_distance(student: torch.Tensor, reference: torch.Tensor, distance: str, reduction: str) -> torch.Tensor:
    """D(student, reference) as the reference code writes it (nn.MSELoss / 1 - cosine)."""
    reference = reference.detach()
    if student.numel() == 0:  # mean over nothing: 0, not NaN
        return student.sum().to(_out_dtype(student))
    if distance == "mse":
        out = F.mse_loss(student, reference, reduction=reduction)
    else:
        dist = 1.0 - F.cosine_similarity(student, reference, dim=-1)
        out = dist.mean() if reduction == "mean" else dist.sum()
    return out.to(_out_dtype(student))


def reference_decoupling_terms(pairs, distance: str, reduction: str) -> torch.Tensor:
    """The three unweighted terms (L_MD, L_multi, L_uni) as a (3,) tensor."""
    return torch.stack([reference_distance(s, r, distance, reduction) for s, r in pairs])


def reference_similarity(a, b, c, d, form: str, inv_temperature: float, direction: str, reduction: str):
    """Materialises both Bi x Bt similarity matrices, as the papers' code does."""
    sim = (a @ b.t()) * inv_temperature  # student i2t similarities
    ref = ((c @ d.t()) * inv_temperature).detach()

    def match(s, r):
        if form == "mse":
            return F.mse_loss(s, r, reduction=reduction)
        return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(r, dim=1), log_target=True,
                        reduction="batchmean" if reduction == "mean" else "sum")

    if direction == "i2t":
        out = match(sim, ref)
    elif direction == "t2i":
        out = match(sim.t(), ref.t())
    else:
        out = 0.5 * (match(sim, ref) + match(sim.t(), ref.t()))
    return out.to(_out_dtype(a))


# ======================================================================================
# Custom ops.  One entry per fused computation; the backend name is an argument.  Kernels
# return float32 sums / gradients; the Python side applies means, weights and dtypes.
# ======================================================================================
def _impl(op: str, backend: str):
    return backends.implementations(op)[backend]


def _empty_f32(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


# ---- modality decoupling: three (student, reference) pairs in one pass --------------------
@torch.library.custom_op("unlearn_fast::modality_decoupling_fwd", mutates_args=())
def _md_fwd(s0: torch.Tensor, r0: torch.Tensor, s1: torch.Tensor, r1: torch.Tensor, s2: torch.Tensor,
            r2: torch.Tensor, cosine: bool, scales: List[float], weights: List[float], backend: str) -> torch.Tensor:
    """(4,) float32: the three terms  scales[k] * (sum over elements of (s - r)^2, or over rows of
    1 - cos)  and their weighted sum  sum_k weights[k] * term_k."""
    return _impl(OP_DECOUPLING, backend).forward(s0, r0, s1, r1, s2, r2, cosine, scales, weights)


@_md_fwd.register_fake
def _(s0, r0, s1, r1, s2, r2, cosine, scales, weights, backend):
    return s0.new_empty((4,), dtype=torch.float32)


@torch.library.custom_op("unlearn_fast::modality_decoupling_bwd", mutates_args=())
def _md_bwd(grad: torch.Tensor, s0: torch.Tensor, r0: torch.Tensor, s1: torch.Tensor, r1: torch.Tensor,
            s2: torch.Tensor, r2: torch.Tensor, cosine: bool, scales: List[float], weights: List[float], need0: bool,
            need1: bool, need2: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. s0, s1, s2 of  grad . forward  (input dtype; (0,) when not needed): pair k's
    rows are scaled by (grad[k] + weights[k] grad[3]) scales[k]."""
    return _impl(OP_DECOUPLING, backend).backward(grad, s0, r0, s1, r1, s2, r2, cosine, scales, weights, need0,
                                                  need1, need2)


@_md_bwd.register_fake
def _(grad, s0, r0, s1, r1, s2, r2, cosine, scales, weights, need0, need1, need2, backend):
    return tuple(torch.empty_like(s) if need else s.new_empty((0,))
                 for s, need in ((s0, need0), (s1, need1), (s2, need2)))


def _md_setup(ctx, inputs, output):
    s0, r0, s1, r1, s2, r2, cosine, scales, weights, backend = inputs
    ctx.save_for_backward(s0, r0, s1, r1, s2, r2)
    ctx.args = (cosine, scales, weights, backend)


def _md_backward(ctx, grad):
    s0, r0, s1, r1, s2, r2 = ctx.saved_tensors
    cosine, scales, weights, backend = ctx.args
    need = ctx.needs_input_grad
    if grad is None or not (need[0] or need[2] or need[4]):
        return (None,) * 10
    g0, g1, g2 = _md_bwd(grad.to(torch.float32).contiguous(), s0, r0, s1, r1, s2, r2, cosine, scales, weights,
                         bool(need[0]), bool(need[2]), bool(need[4]), backend)
    return (g0 if need[0] else None, None, g1 if need[2] else None, None, g2 if need[4] else None) + (None,) * 5


register_first_order_autograd(_md_fwd, _md_backward, _md_setup)


# ---- similarity KL: online softmax over panels -------------------------------------------
@torch.library.custom_op("unlearn_fast::similarity_kl_fwd", mutates_args=())
def _kl_fwd(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, inv_temperature: float,
            w_row: float, w_col: float, block_rows: int, grad_in_forward: bool, backend: str
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """loss = w_row sum_i KL(row i) + w_col sum_j KL(column j) of S = a b^T / T vs R = c d^T / T.

    Returns (loss () float32, row stats (4, Bi), column stats (4, Bt), grad_a, grad_b); the
    gradients of ``loss`` (float32) only when ``grad_in_forward``, else (0,) tensors."""
    return _impl(OP_SIMILARITY, backend).kl_forward(a, b, c, d, inv_temperature, w_row, w_col, block_rows,
                                                    grad_in_forward)


@_kl_fwd.register_fake
def _(a, b, c, d, inv_temperature, w_row, w_col, block_rows, grad_in_forward, backend):
    f32 = dict(dtype=torch.float32)
    ga = a.new_empty(a.shape, **f32) if grad_in_forward else _empty_f32(a)
    gb = b.new_empty(b.shape, **f32) if grad_in_forward else _empty_f32(b)
    return (a.new_empty((), **f32), a.new_empty((STATS_ROWS, a.shape[0]), **f32),
            a.new_empty((STATS_ROWS, b.shape[0]), **f32), ga, gb)


@torch.library.custom_op("unlearn_fast::similarity_kl_bwd", mutates_args=())
def _kl_bwd(grad_loss: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
            row_stats: torch.Tensor, col_stats: torch.Tensor, inv_temperature: float, w_row: float, w_col: float,
            block_rows: int, need_a: bool, need_b: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float32 gradients of grad_loss * loss w.r.t. a and b, recomputing the panels."""
    return _impl(OP_SIMILARITY, backend).kl_backward(grad_loss, a, b, c, d, row_stats, col_stats, inv_temperature,
                                                     w_row, w_col, block_rows, need_a, need_b)


@_kl_bwd.register_fake
def _(grad_loss, a, b, c, d, row_stats, col_stats, inv_temperature, w_row, w_col, block_rows, need_a, need_b,
      backend):
    return (a.new_empty(a.shape, dtype=torch.float32) if need_a else _empty_f32(a),
            b.new_empty(b.shape, dtype=torch.float32) if need_b else _empty_f32(b))


def _kl_setup(ctx, inputs, output):
    a, b, c, d, inv_temperature, w_row, w_col, block_rows, grad_in_forward, backend = inputs
    _loss, row_stats, col_stats, ga, gb = output
    ctx.mark_non_differentiable(row_stats, col_stats, ga, gb)
    ctx.save_for_backward(a, b, c, d, row_stats, col_stats, ga, gb)
    ctx.args = (inv_temperature, w_row, w_col, block_rows, grad_in_forward, backend)


def _kl_backward(ctx, grad_loss, *_unused):
    a, b, c, d, row_stats, col_stats, ga, gb = ctx.saved_tensors
    inv_temperature, w_row, w_col, block_rows, grad_in_forward, backend = ctx.args
    need_a, need_b = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if grad_loss is None or not (need_a or need_b):
        return (None,) * 10
    g = grad_loss.to(torch.float32)
    if not grad_in_forward:
        ga, gb = _kl_bwd(g.contiguous(), a, b, c, d, row_stats, col_stats, inv_temperature, w_row, w_col,
                         block_rows, need_a, need_b, backend)
        g = None
    return (_scaled(ga, g, a) if need_a else None, _scaled(gb, g, b) if need_b else None) + (None,) * 8


def _scaled(grad: torch.Tensor, g: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """grad (float32) times the incoming scalar gradient g (None: already applied), in like's dtype."""
    if g is not None:
        grad = grad * g
    return grad.to(like.dtype)


register_first_order_autograd(_kl_fwd, _kl_backward, _kl_setup)


# ---- similarity MSE, blocked: panels of E = a b^T - c d^T --------------------------------
@torch.library.custom_op("unlearn_fast::similarity_sqdiff_fwd", mutates_args=())
def _sq_fwd(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor, block_rows: int, want_grad: bool,
            backend: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||a b^T - c d^T||_F^2, its float32 gradients w.r.t. a and b when want_grad else (0,))."""
    return _impl(OP_SIMILARITY, backend).sq_forward(a, b, c, d, block_rows, want_grad)


@_sq_fwd.register_fake
def _(a, b, c, d, block_rows, want_grad, backend):
    f32 = dict(dtype=torch.float32)
    return (a.new_empty((), **f32), a.new_empty(a.shape, **f32) if want_grad else _empty_f32(a),
            b.new_empty(b.shape, **f32) if want_grad else _empty_f32(b))


def _sq_setup(ctx, inputs, output):
    a, b = inputs[0], inputs[1]
    _sumsq, ga, gb = output
    ctx.mark_non_differentiable(ga, gb)
    ctx.save_for_backward(ga, gb)
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.want_grad = inputs[5]


def _sq_backward(ctx, grad_sumsq, *_unused):
    ga, gb = ctx.saved_tensors
    if grad_sumsq is None or not ctx.want_grad:
        return (None,) * 7
    g = grad_sumsq.to(torch.float32)
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return ((ga * g).to(ctx.dtypes[0]) if need_a else None, (gb * g).to(ctx.dtypes[1]) if need_b else None,
            None, None, None, None, None)


register_first_order_autograd(_sq_fwd, _sq_backward, _sq_setup)


# ---- similarity MSE, Gram identity ---------------------------------------------------------
@torch.library.custom_op("unlearn_fast::similarity_gram_fwd", mutates_args=())
def _gram_fwd(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
              backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(||a b^T - c d^T||_F^2 from D x D Grams, the Grams (4, D, D) = [a^T a, b^T b, a^T c, b^T d])."""
    return _impl(OP_SIMILARITY, backend).gram_forward(a, b, c, d)


@_gram_fwd.register_fake
def _(a, b, c, d, backend):
    dim = a.shape[1]
    return a.new_empty((), dtype=torch.float32), a.new_empty((4, dim, dim), dtype=torch.float32)


@torch.library.custom_op("unlearn_fast::similarity_gram_bwd", mutates_args=())
def _gram_bwd(grad_sumsq: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor,
              grams: torch.Tensor, need_a: bool, need_b: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _impl(OP_SIMILARITY, backend).gram_backward(grad_sumsq, a, b, c, d, grams, need_a, need_b)


@_gram_bwd.register_fake
def _(grad_sumsq, a, b, c, d, grams, need_a, need_b, backend):
    return (a.new_empty(a.shape, dtype=torch.float32) if need_a else _empty_f32(a),
            b.new_empty(b.shape, dtype=torch.float32) if need_b else _empty_f32(b))


def _gram_setup(ctx, inputs, output):
    a, b, c, d, backend = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(a, b, c, d, output[1])
    ctx.backend = backend


def _gram_backward_autograd(ctx, grad_sumsq, _grad_grams):
    a, b, c, d, grams = ctx.saved_tensors
    need_a, need_b = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
    if grad_sumsq is None or not (need_a or need_b):
        return (None,) * 5
    ga, gb = _gram_bwd(grad_sumsq.to(torch.float32).contiguous(), a, b, c, d, grams, need_a, need_b, ctx.backend)
    return (ga.to(a.dtype) if need_a else None, gb.to(b.dtype) if need_b else None, None, None, None)


register_first_order_autograd(_gram_fwd, _gram_backward_autograd, _gram_setup)


# ======================================================================================
# Backend registrations
# ======================================================================================
class SimilarityKernels:
    """A backend's entry points for the similarity losses."""

    def __init__(self, kl_forward, kl_backward, sq_forward, gram_forward, gram_backward):
        self.kl_forward, self.kl_backward = kl_forward, kl_backward
        self.sq_forward = sq_forward
        self.gram_forward, self.gram_backward = gram_forward, gram_backward


def _native_similarity(ops):
    return SimilarityKernels(
        kl_forward=lambda *a: ops().similarity_kl_fwd(*a),
        kl_backward=lambda *a: ops().similarity_kl_bwd(*a),
        sq_forward=lambda *a: ops().similarity_sqdiff_fwd(*a),
        gram_forward=lambda *a: ops().similarity_gram_fwd(*a),
        gram_backward=lambda *a: ops().similarity_gram_bwd(*a),
    )


def _triton():
    from unlearn_fast.triton import modality as mod  # lazily: triton is optional

    return mod


backends.register(OP_DECOUPLING, "eager")(reference_decoupling_terms)
backends.register(OP_SIMILARITY, "eager")(reference_similarity)
for _name, _ops in (("cpp", cpu_ops), ("cuda", cuda_ops)):
    backends.register(OP_DECOUPLING, _name)(KernelPair(
        forward=(lambda ops: lambda *a: ops().modality_decoupling_fwd(*a))(_ops),
        backward=(lambda ops: lambda *a: ops().modality_decoupling_bwd(*a))(_ops),
    ))
    backends.register(OP_SIMILARITY, _name)(_native_similarity(_ops))
backends.register(OP_DECOUPLING, "triton")(KernelPair(
    forward=lambda *a: _triton().decoupling_forward(*a),
    backward=lambda *a: _triton().decoupling_backward(*a),
))
backends.register(OP_SIMILARITY, "triton")(SimilarityKernels(
    kl_forward=lambda *a: _triton().kl_forward(*a),
    kl_backward=lambda *a: _triton().kl_backward(*a),
    sq_forward=lambda *a: _triton().sq_forward(*a),
    gram_forward=lambda *a: _triton().gram_forward(*a),
    gram_backward=lambda *a: _triton().gram_backward(*a),
))


# ======================================================================================
# Public API
# ======================================================================================
def _check_weights(weights) -> Tuple[float, float, float]:
    try:
        values = tuple(weights)
    except TypeError as exc:
        raise TypeError("weights must be a sequence of three numbers (w_md, w_multi, w_uni)") from exc
    if len(values) != 3:
        raise ValueError(f"weights must have three entries (w_md, w_multi, w_uni), got {len(values)}")
    out = []
    for v in values:
        if isinstance(v, torch.Tensor) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"weights must be Python numbers, got {type(v).__name__}")
        if not math.isfinite(v):
            raise ValueError(f"weights must be finite, got {v}")
        out.append(float(v))
    return tuple(out)


_PAIR_NAMES = (("student_forget_fused", "reference_shuffled_fused"),
               ("student_retain_fused", "reference_retain_fused"),
               ("student_unimodal", "reference_unimodal"))


def modality_decoupling_loss(student_forget_fused: torch.Tensor, reference_shuffled_fused: torch.Tensor,
                             student_retain_fused: torch.Tensor, reference_retain_fused: torch.Tensor,
                             student_unimodal: torch.Tensor, reference_unimodal: torch.Tensor, *,
                             weights: Sequence[float] = (1.0, 1.0, 1.0), distance: str = "mse",
                             reduction: str = "mean", return_terms: bool = False, backend: str = "auto"):
    """MultiDelete's loss  w_md L_MD + w_multi L_multi + w_uni L_uni  in one fused pass.

    Args:
        student_forget_fused: (..., D) fused image-text embeddings of the student on the forget
            pairs (I_f, T_f).
        reference_shuffled_fused: same shape: the frozen reference model on (I_f, T_perm),
            T_perm from :func:`derangement` / :func:`shuffle_without_fixed_points`.
        student_retain_fused, reference_retain_fused: (..., D2): both models on retained pairs.
        student_unimodal, reference_unimodal: (..., D3): both models' unimodal (image or text)
            embeddings of the forget data.  Concatenate image and text embeddings along the
            batch to retain both.
        weights: (w_md, w_multi, w_uni), Python numbers (the paper: unit weights).
        distance: "mse" (the reference code: mean over all elements of (s - r)^2) or "cosine"
            (mean over embeddings of 1 - cos(s, r), with torch's eps = 1e-8 clamping of norms).
        reduction: "mean" (as above) or "sum" (sum over elements / embeddings).  A pair with
            no embeddings contributes 0.
        return_terms: also return the unweighted terms.
        backend: "auto", "eager", "cpp", "triton" or "cuda".  On the CPU "auto" runs float32
            eager when no tensor has more than 2^18 elements (AUTO_EAGER_DECOUPLING_ELEMENTS),
            where the fused pass is not faster (bf16/fp16 always run fused: float32 math).

    All six tensors share one dtype (float32/bfloat16/float16/float64) and device; each
    student/reference pair shares its shape.  Gradients flow to the student tensors only.

    Returns:
        The loss (float32; float64 for float64 input), or ``(loss, {"md": L_MD, "multi":
        L_multi, "uni": L_uni})`` with ``return_terms=True``.
    """
    tensors = (student_forget_fused, reference_shuffled_fused, student_retain_fused, reference_retain_fused,
               student_unimodal, reference_unimodal)
    for (sname, rname), k in zip(_PAIR_NAMES, range(0, 6, 2)):
        s, r = tensors[k], tensors[k + 1]
        V.check_tensor(s, sname, floating=True)
        V.check_tensor(r, rname, floating=True)
        if s.dim() < 1 or s.shape[-1] == 0:
            raise ValueError(f"{sname} must have shape (..., D) with D >= 1, got {tuple(s.shape)}")
        V.check_same(s, r, sname, rname)
        V.check_same(s, student_forget_fused, sname, "student_forget_fused", shape=False)
    w = _check_weights(weights)
    V.check_choice(distance, "distance", DISTANCES)
    V.check_choice(reduction, "reduction", REDUCTIONS)
    if not isinstance(return_terms, bool):
        raise TypeError(f"return_terms must be a bool, got {type(return_terms).__name__}")

    small = max(t.numel() for t in tensors) <= AUTO_EAGER_DECOUPLING_ELEMENTS
    name = resolve_for_inputs(OP_DECOUPLING, backend, student_forget_fused.device, student_forget_fused.dtype,
                              eager_faster_on_cpu=small)
    pairs = [(tensors[k], tensors[k + 1]) for k in range(0, 6, 2)]
    if name == "eager":
        terms = reference_decoupling_terms(pairs, distance, reduction)
        total = w[0] * terms[0] + w[1] * terms[1] + w[2] * terms[2]
    else:  # one fused pass returns (L_MD, L_multi, L_uni, weighted total)
        flat = []
        for s, r in pairs:
            flat += [s.reshape(-1, s.shape[-1]).contiguous(), r.detach().reshape(-1, r.shape[-1]).contiguous()]
        scales = [1.0] * 3
        if reduction == "mean":
            # elements (mse) or embeddings (cosine) per pair; an empty pair divides 0 by 1
            scales = [1.0 / max(1, s.numel() if distance == "mse" else s.numel() // s.shape[-1]) for s, _ in pairs]
        out = _md_fwd(*flat, distance == "cosine", scales, list(w), name)
        terms, total = out[:3], out[3]
    if return_terms:
        return total, {n: terms[i] for i, n in enumerate(TERM_NAMES)}
    return total


def default_block_rows(rows: int, cols: int) -> int:
    """Rows per panel of the fused similarity kernels (cpp, cuda): all rows when the
    rows x cols matrices have at most SINGLE_PANEL_ELEMENTS entries, else about
    PANEL_ELEMENTS / cols (a multiple of 16, at least 16)."""
    if rows * cols <= SINGLE_PANEL_ELEMENTS:
        return max(1, rows)
    r = max(16, (PANEL_ELEMENTS // max(cols, 1)) // 16 * 16)
    return min(r, rows)


def choose_mse_algorithm(rows: int, cols: int, dim: int) -> str:
    """"gram" when the D x D Gram products take fewer flops than the rows x cols ones.

    Forward + backward, the Gram path costs ~10 D^2 (Bi + Bt) flops (six Grams, four
    (B x D) x (D x D) products); the blocked path ~8 Bi Bt D (two panel products and two
    gradient products).  For Bi = Bt = B that is B > 2.5 D."""
    return "gram" if 5 * dim * (rows + cols) < 4 * rows * cols else "blocked"


def similarity_matching_loss(student_image: torch.Tensor, student_text: torch.Tensor,
                             reference_image: torch.Tensor, reference_text_shuffled: torch.Tensor, *,
                             form: str = "mse", temperature: float = 1.0, direction: str = "both",
                             reduction: str = "mean", algorithm: str = "auto", block_rows: Optional[int] = None,
                             backend: str = "auto") -> torch.Tensor:
    """Match the student's similarity matrices on forget pairs to the reference's on shuffled pairs.

    S = student_image @ student_text^T / T (Bi x Bt, image-to-text; S^T is text-to-image),
    R = reference_image @ reference_text_shuffled^T / T.  Neither is materialised by the
    fused backends.

    Args:
        student_image: (Bi, D) student image embeddings of the forget pairs (I_f).
        student_text: (Bt, D) student text embeddings of their captions (T_f).
        reference_image: (Bi, D) the reference model's image embeddings (constant).
        reference_text_shuffled: (Bt, D) the reference model's text embeddings of T_perm
            (constant), e.g. ``reference_text[derangement(Bt, seed)]``.
        form: "mse": mean over the Bi x Bt entries of (S - R)^2, i.e. ||S - R||_F^2 / (Bi Bt)
            (F.mse_loss(S, R)); "kl": KL(softmax(R_row) || softmax(S_row)) per row.
        temperature: T > 0 divides both similarity matrices (pass your model's temperature,
            e.g. 1 / CLIP's logit_scale, with normalised embeddings).
        direction: "i2t" (rows of S), "t2i" (rows of S^T) or "both" (the mean of the two).  For
            form="mse" the three are equal (S^T has the same entries as S).
        reduction: "mean" (over the rows of each direction for "kl"; over entries for "mse") or
            "sum".
        algorithm: form="mse" only: "gram" (Gram identity, O((Bi + Bt) D^2) time),
            "blocked" (row panels of S - R, O(Bi Bt D) time, O(block) memory) or "auto"
            (the one with fewer flops, :func:`choose_mse_algorithm`).  Both are exact; the Gram
            form loses relative precision when ||S - R|| << ||S|| (it subtracts Frobenius
            products of size ~||S||^2; float32 relative error ~1e-7 ||S||^2 / ||S - R||^2).
        block_rows: rows of S per panel for the cpp/cuda backends (default
            :func:`default_block_rows`); the triton backend tiles by itself.
        backend: "auto", "eager" (materialises S and R: the baseline), "cpp", "triton", "cuda".
            On the CPU "auto" runs float32 eager when Bi * Bt <= 65536 (B <= 256), where the
            fused path does the same GEMMs and saves nothing (bf16/fp16 always run fused:
            float32 math).

    Returns:
        A float32 scalar (float64 for float64 input).  Gradients flow to student_image and
        student_text only.

    Memory: the cpp/cuda backends hold two float32 panels of at most block_rows x Bt (the
    whole matrices when Bi Bt <= 2^24, else ~16 MiB each), O(B) statistics and the Grams
    (4 D^2); nothing of size Bi x Bt beyond that.  When a student requires grad and the
    statistics are complete after the forward pass (one panel, or a single direction), they
    form the gradient during the forward pass, as a fused linear cross-entropy does, and keep
    it (Bi x D + Bt x D floats) until backward; otherwise backward recomputes the panels.
    """
    names = ("student_image", "student_text", "reference_image", "reference_text_shuffled")
    a, b, c, d = student_image, student_text, reference_image, reference_text_shuffled
    for x, n in zip((a, b, c, d), names):
        V.check_tensor(x, n, floating=True, dims=(2,))
    V.check_same(a, c, names[0], names[2])
    V.check_same(b, d, names[1], names[3])
    V.check_same(a, b, names[0], names[1], shape=False)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"student_image has embedding size {a.shape[1]} but student_text has {b.shape[1]}; "
                         "they must match")
    if a.shape[1] == 0:
        raise ValueError("embeddings must have at least one dimension (D >= 1)")
    V.check_choice(form, "form", FORMS)
    V.check_choice(direction, "direction", DIRECTIONS)
    V.check_choice(reduction, "reduction", REDUCTIONS)
    V.check_choice(algorithm, "algorithm", MSE_ALGORITHMS)
    if algorithm != "auto" and form != "mse":
        raise ValueError(f"algorithm={algorithm!r} applies to form='mse' only")
    inv_t = 1.0 / V.check_positive(temperature, "temperature")
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1):
        raise ValueError(f"block_rows must be a positive int or None, got {block_rows!r}")

    bi, bt, dim = a.shape[0], b.shape[0], a.shape[1]
    # tiny batches: nothing to save (see AUTO_EAGER_MAX_ELEMENTS)
    name = resolve_for_inputs(OP_SIMILARITY, backend, a.device, a.dtype,
                              eager_faster_on_cpu=bi * bt <= AUTO_EAGER_MAX_ELEMENTS)
    if bi == 0 or bt == 0:  # nothing to match: 0, with zero gradients
        return (a.sum() + b.sum()).to(_out_dtype(a)) * 0.0
    if name == "eager":
        return reference_similarity(a, b, c, d, form, inv_t, direction, reduction)

    want_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    a, b = a.contiguous(), b.contiguous()
    c, d = c.detach().contiguous(), d.detach().contiguous()
    if form == "mse":
        scale = inv_t * inv_t / (bi * bt) if reduction == "mean" else inv_t * inv_t
        algo = choose_mse_algorithm(bi, bt, dim) if algorithm == "auto" else algorithm
        if algo == "gram":
            sumsq = _gram_fwd(a, b, c, d, name)[0]
        else:
            rows = block_rows or default_block_rows(bi, bt)
            sumsq = _sq_fwd(a, b, c, d, rows, want_grad, name)[0]
        return sumsq * scale

    # form == "kl": rows of S are the i2t direction, columns the t2i direction.
    half = 0.5 if direction == "both" else 1.0
    w_row = half / bi if reduction == "mean" else half
    w_col = half / bt if reduction == "mean" else half
    if direction == "t2i":  # the rows of S^T = b a^T: swap roles, rows only
        a, b, c, d = b, a, d, c
        w_row, w_col = w_col, 0.0
    elif direction == "i2t":
        w_col = 0.0
    rows = block_rows or default_block_rows(a.shape[0], b.shape[0])
    # Complete statistics in the forward pass (one panel, or rows only) let the cpp and cuda
    # backends form the gradient there and skip the recomputation in backward.
    grad_in_forward = want_grad and name in ("cpp", "cuda") and (w_col == 0.0 or rows >= a.shape[0])
    return _kl_fwd(a, b, c, d, inv_t, w_row, w_col, rows, grad_in_forward, name)[0]


class ModalityDecouplingLoss(nn.Module):
    """``nn.Module`` form of :func:`modality_decoupling_loss`."""

    def __init__(self, *, weights: Sequence[float] = (1.0, 1.0, 1.0), distance: str = "mse",
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.weights = _check_weights(weights)
        V.check_choice(distance, "distance", DISTANCES)
        V.check_choice(reduction, "reduction", REDUCTIONS)
        self.distance, self.reduction, self.backend = distance, reduction, backend

    def forward(self, student_forget_fused, reference_shuffled_fused, student_retain_fused, reference_retain_fused,
                student_unimodal, reference_unimodal, return_terms: bool = False):
        return modality_decoupling_loss(student_forget_fused, reference_shuffled_fused, student_retain_fused,
                                        reference_retain_fused, student_unimodal, reference_unimodal,
                                        weights=self.weights, distance=self.distance, reduction=self.reduction,
                                        return_terms=return_terms, backend=self.backend)

    def extra_repr(self) -> str:
        return f"weights={self.weights}, distance={self.distance!r}, reduction={self.reduction!r}, backend={self.backend!r}"


class SimilarityMatchingLoss(nn.Module):
    """``nn.Module`` form of :func:`similarity_matching_loss`."""

    def __init__(self, *, form: str = "mse", temperature: float = 1.0, direction: str = "both",
                 reduction: str = "mean", algorithm: str = "auto", backend: str = "auto"):
        super().__init__()
        V.check_choice(form, "form", FORMS)
        V.check_choice(direction, "direction", DIRECTIONS)
        V.check_choice(reduction, "reduction", REDUCTIONS)
        V.check_choice(algorithm, "algorithm", MSE_ALGORITHMS)
        V.check_positive(temperature, "temperature")
        self.form, self.temperature, self.direction = form, temperature, direction
        self.reduction, self.algorithm, self.backend = reduction, algorithm, backend

    def forward(self, student_image, student_text, reference_image, reference_text_shuffled):
        return similarity_matching_loss(student_image, student_text, reference_image, reference_text_shuffled,
                                        form=self.form, temperature=self.temperature, direction=self.direction,
                                        reduction=self.reduction, algorithm=self.algorithm, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, temperature={self.temperature}, direction={self.direction!r}, "
                f"reduction={self.reduction!r}, algorithm={self.algorithm!r}, backend={self.backend!r}")
