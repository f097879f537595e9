"""SIU's Dual Masked KL computed from hidden states and the head weights, fused: the
student and teacher logits (tokens x vocab) are never materialised.

    student logits s = student_hidden @ student_weight.T (+ student_bias)
    teacher logits t = teacher_hidden @ teacher_weight.T (+ teacher_bias)
    loss = dual_masked_kl(s, t, token_mask, vocab_mask, ...)     (same semantics and options)

The teacher side is a constant (no gradient); ``teacher_weight`` may be the very tensor
``student_weight`` is (a frozen head shared under LoRA).  Gradients flow to
``student_hidden``, and to ``student_weight`` / ``student_bias`` only if they require grad
(a frozen head skips that work).

How the fused backends compute it (cpp, cuda, triton):

* Tokens are processed ``chunk_size`` at a time.  Per chunk, the student and teacher
  logits go through BLAS / cuBLAS into two reused (chunk, V) buffers in the input dtype,
  then one row pass (the dual_masked_kl row kernels, float32 math) gives each row's loss
  and five statistics (two maxima, two log-sums, S = sum K_V p).
* When a gradient is needed the same pass turns the student buffer into the gradient
  rows g = K_S (q S - K_V p) / T (formed in float32, stored in the input dtype) while the
  logits are at hand, and the chunk's hidden gradient g @ W_s is computed right away.
  That is the Jacobian of each row's loss w.r.t. its own hidden state, so the backward
  only scales row r by grad_output[r]: exact for any grad_output (reduction="none"
  included), and the logits are never recomputed.
* The weight (and bias) gradient sums over rows.  For reduction "sum"/"mean"/"siu" the
  loss is a scalar multiple of the row sum, so it is accumulated in the forward too
  (float32 accumulator; ``g^T @ h`` per chunk) and scaled in the backward.  For
  reduction="none" with an arbitrary grad_output the backward recomputes each chunk's
  logits and accumulates ``(grad_output * g)^T @ h`` (exact, never pre-scaled).
* So a forward+backward costs the GEMMs of the eager code -- 2 for the logits, 1 for the
  hidden gradient, 1 more for a trainable head -- plus row passes that read each logits
  chunk once or twice.  Only reduction="none" with a trainable head costs more: its
  backward recomputes both logits chunks (2 extra GEMMs).
* Chunks whose tokens are all masked (K_S = 0) are skipped without a GEMM on the CPU;
  the CUDA/triton loops process every chunk (skipping would need a host sync).

Chunk size (``default_chunk_size``): the two float32 (chunk, V) logits buffers within
128 MiB, rounded down to a multiple of 8, but at least 256 rows (thin GEMMs run far below
the BLAS peak) and balanced over the tokens (see ``_linear_head.default_chunk_size``): 520
tokens at V = 32,000, 256 at V = 151,936 (a few hundred tokens there are still split in
three: 512 run as 3 x 176).  Extra memory beyond
inputs and returned gradients: those buffers, the saved statistics (20 bytes a token),
the per-row hidden gradient (N x H, the size of the returned one), and for a trainable
bfloat16/float16 head the float32 (V, H) weight-gradient accumulator (a float32 head
accumulates into the returned gradient itself).  Pass ``chunk_size`` to trade memory
for fewer, larger GEMMs.

float64 inputs run on the eager backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from unlearn_fast import backends
from unlearn_fast.ops import _validation as V
from unlearn_fast.ops import dual_masked_kl as dmk
from unlearn_fast.ops._common import (KernelPair, cpu_ops, cuda_ops, reduce_rows, reduce_total,
                                      register_first_order_autograd, resolve_for_inputs)
from unlearn_fast.ops._linear_head import (add_bias_grad, add_weight_grad, chunk_logits, refuse_second_backward,
                                          scaled)
from unlearn_fast.ops._linear_head import default_chunk_size as _default_chunk_size

OP = "fused_linear_dual_masked_kl"


def default_chunk_size(vocab_size: int, num_tokens: Optional[int] = None) -> int:
    """Tokens per chunk: two float32 (chunk, V) buffers (student and teacher logits)
    within 128 MiB, at least 256 rows, balanced over ``num_tokens`` (see
    ``_linear_head.default_chunk_size``): 520 at V = 32,000 and 256 at V = 151,936 without
    num_tokens."""
    return _default_chunk_size(vocab_size, 2, num_tokens)


# --------------------------------------------------------------------------------------
# Eager reference: full logits, then dual_masked_kl's eager formulation.  The "eager"
# backend, the benchmark baseline and (in float64) the test oracle.
# --------------------------------------------------------------------------------------
def reference_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
                     token_mask, vocab_mask, inv_temperature: float, cross_entropy: bool) -> torch.Tensor:
    """Per-row losses (N,) with ordinary autograd; the teacher side is detached."""
    student = chunk_logits(student_hidden, student_weight, student_bias)
    with torch.no_grad():
        teacher = chunk_logits(teacher_hidden, teacher_weight, teacher_bias)
    return dmk.reference_rows(student, teacher, token_mask, vocab_mask, inv_temperature, cross_entropy)


# --------------------------------------------------------------------------------------
# Chunk loops in Python over a backend's dual_masked_kl row kernels (the triton backend
# runs these; cpp and cuda run the same loops in C++).  GEMMs through torch.matmul.
#   rows.forward(student, teacher, token_mask, vocab_mask, inv_t, cross_entropy) -> (loss (n,), stats (n, 5))
#   rows.backward(grad_rows, student, teacher, token_mask, vocab_mask, stats, inv_t) -> grad (n, V), input dtype
# --------------------------------------------------------------------------------------
def _slice(mask: Optional[torch.Tensor], c0: int, n: int) -> Optional[torch.Tensor]:
    return None if mask is None else mask[c0:c0 + n]


def chunked_forward(rows: KernelPair, sh, sw, th, tw, sb, tb, ks, kv, inv_t: float, cross_entropy: bool,
                    chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    n_tok, hdim = sh.shape
    vocab = sw.shape[0]
    f32 = dict(dtype=torch.float32, device=sh.device)
    loss = torch.empty(n_tok, **f32)
    stats = torch.empty((n_tok, dmk.STATS_PER_ROW), **f32)
    gh = torch.empty_like(sh) if grad_hidden else sh.new_empty((0,))
    gw = torch.zeros((vocab, hdim), **f32) if grad_weight else torch.empty(0, **f32)
    gb = torch.zeros(vocab, **f32) if grad_bias else torch.empty(0, **f32)
    c = max(1, min(chunk_size, n_tok))
    sbuf, tbuf = sh.new_empty((c, vocab)), sh.new_empty((c, vocab))
    ones = torch.ones(c, **f32)  # the forward's gradient rows are those of the plain row sum
    for c0 in range(0, n_tok, c):
        n = min(c, n_tok - c0)
        hc = sh[c0:c0 + n]
        s = chunk_logits(hc, sw, sb, out=sbuf[:n])
        t = chunk_logits(th[c0:c0 + n], tw, tb, out=tbuf[:n])
        ksc = _slice(ks, c0, n)
        loss[c0:c0 + n], stats[c0:c0 + n] = rows.forward(s, t, ksc, kv, inv_t, cross_entropy)
        if grad_hidden or grad_weight or grad_bias:
            g = rows.backward(ones[:n], s, t, ksc, kv, stats[c0:c0 + n], inv_t)
            if grad_hidden:
                torch.matmul(g, sw, out=gh[c0:c0 + n])
            if grad_weight:
                add_weight_grad(gw, g, hc)
            if grad_bias:
                add_bias_grad(gb, g)
    return loss, stats, gh, gw.to(sw.dtype) if grad_weight else gw, gb.to(sw.dtype) if grad_bias else gb


def chunked_backward(rows: KernelPair, grad_rows, sh, sw, th, tw, sb, tb, ks, kv, stats, inv_t: float,
                     chunk_size: int, grad_weight: bool, grad_bias: bool):
    n_tok, hdim = sh.shape
    vocab = sw.shape[0]
    f32 = dict(dtype=torch.float32, device=sh.device)
    gw = torch.zeros((vocab, hdim), **f32) if grad_weight else torch.empty(0, **f32)
    gb = torch.zeros(vocab, **f32) if grad_bias else torch.empty(0, **f32)
    if grad_weight or grad_bias:
        c = max(1, min(chunk_size, n_tok))
        sbuf, tbuf = sh.new_empty((c, vocab)), sh.new_empty((c, vocab))
        for c0 in range(0, n_tok, c):
            n = min(c, n_tok - c0)
            hc = sh[c0:c0 + n]
            s = chunk_logits(hc, sw, sb, out=sbuf[:n])
            t = chunk_logits(th[c0:c0 + n], tw, tb, out=tbuf[:n])
            g = rows.backward(grad_rows[c0:c0 + n], s, t, _slice(ks, c0, n), kv, stats[c0:c0 + n], inv_t)
            if grad_weight:
                add_weight_grad(gw, g, hc)
            if grad_bias:
                add_bias_grad(gb, g)
    return gw.to(sw.dtype) if grad_weight else gw, gb.to(sw.dtype) if grad_bias else gb


# --------------------------------------------------------------------------------------
# Custom ops (backend name as an argument), fake kernels, autograd.
#
# fwd -> (rows (N,), total (), stats (N, 5), grad_hidden (N, H) | (0,), grad_weight (V, H) | (0,),
#         grad_bias (V,) | (0,)).  With summed=True the loss is `total` (rows is not
# differentiable) and grad_weight/grad_bias, when asked for, are those of `total`;
# with summed=False the loss is `rows` and the weight gradient is recomputed in bwd.
# --------------------------------------------------------------------------------------
@torch.library.custom_op("unlearn_fast::fused_linear_dmk_fwd", mutates_args=())
def _fl_fwd(student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor,
            teacher_weight: torch.Tensor, student_bias: Optional[torch.Tensor], teacher_bias: Optional[torch.Tensor],
            token_mask: Optional[torch.Tensor], vocab_mask: Optional[torch.Tensor], inv_temperature: float,
            cross_entropy: bool, chunk_size: int, grad_hidden: bool, grad_weight: bool, grad_bias: bool,
            summed: bool, backend: str
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = backends.implementations(OP)[backend]
    rows, stats, gh, gw, gb = impl.forward(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                           student_bias, teacher_bias, token_mask, vocab_mask, inv_temperature,
                                           cross_entropy, chunk_size, grad_hidden, grad_weight, grad_bias)
    return rows, rows.sum(), stats, gh, gw, gb


@_fl_fwd.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, token_mask,
      vocab_mask, inv_temperature, cross_entropy, chunk_size, grad_hidden, grad_weight, grad_bias, summed, backend):
    n = student_hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    empty = student_hidden.new_empty((0,), **f32)
    return (student_hidden.new_empty((n,), **f32), student_hidden.new_empty((), **f32),
            student_hidden.new_empty((n, dmk.STATS_PER_ROW), **f32),
            torch.empty_like(student_hidden) if grad_hidden else student_hidden.new_empty((0,)),
            torch.empty_like(student_weight) if grad_weight else empty.clone(),
            torch.empty_like(student_bias) if grad_bias else empty.clone())


@torch.library.custom_op("unlearn_fast::fused_linear_dmk_bwd", mutates_args=())
def _fl_bwd(grad_rows: torch.Tensor, student_hidden: torch.Tensor, student_weight: torch.Tensor,
            teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, student_bias: Optional[torch.Tensor],
            teacher_bias: Optional[torch.Tensor], token_mask: Optional[torch.Tensor],
            vocab_mask: Optional[torch.Tensor], stats: torch.Tensor, inv_temperature: float, chunk_size: int,
            grad_weight: bool, grad_bias: bool, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    impl = backends.implementations(OP)[backend]
    return impl.backward(grad_rows, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                         teacher_bias, token_mask, vocab_mask, stats, inv_temperature, chunk_size, grad_weight,
                         grad_bias)


@_fl_bwd.register_fake
def _(grad_rows, student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
      token_mask, vocab_mask, stats, inv_temperature, chunk_size, grad_weight, grad_bias, backend):
    empty = student_hidden.new_empty((0,), dtype=torch.float32)
    return (torch.empty_like(student_weight) if grad_weight else empty,
            torch.empty_like(student_bias) if grad_bias else empty.clone())


_N_FWD_INPUTS = 16


def _fl_setup(ctx, inputs, output):
    (sh, sw, th, tw, sb, tb, ks, kv, inv_t, _ce, chunk_size, _gh, _gw, _gb, summed, backend) = inputs
    rows, total, stats, gh, gw, gb = output
    ctx.save_for_backward(sh, sw, th, tw, sb, tb, ks, kv, stats, gh, gw, gb)
    ctx.inv_t, ctx.chunk_size, ctx.summed, ctx.backend = inv_t, chunk_size, summed, backend
    ctx.has_bias = sb is not None
    ctx.mark_non_differentiable(rows if summed else total, stats, gh, gw, gb)
    # no zero-filled (V, H) stand-in for the weight-gradient output's missing grad: the
    # backward gets None for outputs nothing depended on
    ctx.set_materialize_grads(False)


def _fl_backward(ctx, g_rows, g_total, _g_stats, _g_gh, _g_gw, _g_gb):
    out = [None] * _N_FWD_INPUTS
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = ctx.has_bias and ctx.needs_input_grad[4]
    if ctx.summed and (need_w or need_b):
        refuse_second_backward(ctx, "fused_linear_dual_masked_kl")
    sh, sw, th, tw, sb, tb, ks, kv, stats, gh, gw, gb = ctx.saved_tensors
    if ctx.summed:
        if g_total is None:
            return tuple(out)
        scale = g_total.to(torch.float32)
        out[0] = scaled(gh, scale) if need_h else None
        out[1] = scaled(gw, scale, ctx) if need_w else None
        out[4] = scaled(gb, scale, ctx) if need_b else None
        return tuple(out)
    if g_rows is None:
        return tuple(out)
    grad_rows = g_rows.to(torch.float32).contiguous()
    if need_h:
        out[0] = (gh * grad_rows[:, None]).to(gh.dtype)  # per-row Jacobian x grad_output: exact
    if need_w or need_b:
        gw_new, gb_new = _fl_bwd(grad_rows, sh, sw, th, tw, sb, tb, ks, kv, stats, ctx.inv_t, ctx.chunk_size,
                                 bool(need_w), bool(need_b), ctx.backend)
        out[1] = gw_new if need_w else None
        out[4] = gb_new if need_b else None
    return tuple(out)


register_first_order_autograd(_fl_fwd, _fl_backward, _fl_setup)


# --------------------------------------------------------------------------------------
# Backend registrations
# --------------------------------------------------------------------------------------
backends.register(OP, "eager")(reference_linear)
backends.register(OP, "cpp")(KernelPair(
    forward=lambda *a: cpu_ops().fused_linear_dmk_fwd(*a),
    backward=lambda *a: cpu_ops().fused_linear_dmk_bwd(*a),
))
backends.register(OP, "cuda")(KernelPair(
    forward=lambda *a: cuda_ops().fused_linear_dmk_fwd(*a),
    backward=lambda *a: cuda_ops().fused_linear_dmk_bwd(*a),
))


def _triton_rows() -> KernelPair:
    return backends.implementations(dmk.OP)["triton"]  # imports unlearn_fast.triton.dual_masked_kl lazily


backends.register(OP, "triton")(KernelPair(
    forward=lambda *a: chunked_forward(_triton_rows(), *a),
    backward=lambda *a: chunked_backward(_triton_rows(), *a),
))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_bias(bias, name: str, weight: torch.Tensor, weight_name: str) -> None:
    if bias is None:
        return
    V.check_tensor(bias, name, floating=True, dims=(1,))
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{name} must have shape ({weight.shape[0]},) (the vocabulary of {weight_name}), "
                         f"got {tuple(bias.shape)}")
    V.check_same(bias, weight, name, weight_name, shape=False)


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def fused_linear_dual_masked_kl(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                token_mask: Optional[torch.Tensor] = None, vocab_mask: Optional[torch.Tensor] = None,
                                *, forget_token_ids: Union[None, Sequence[int], torch.Tensor] = None,
                                form: str = "kl", reduction: str = "mean", temperature: float = 1.0,
                                student_bias: Optional[torch.Tensor] = None,
                                teacher_bias: Optional[torch.Tensor] = None, chunk_size: Optional[int] = None,
                                backend: str = "auto") -> torch.Tensor:
    """:func:`~unlearn_fast.dual_masked_kl` of the logits ``student_hidden @ student_weight.T``
    and ``teacher_hidden @ teacher_weight.T`` (plus biases) without materialising them.

    Args:
        student_hidden: (..., H) hidden states of the model being unlearned (float32,
            bfloat16, float16 or float64).  Non-contiguous views such as
            ``hidden[:, :-1]`` are accepted (copied once to contiguous rows).
        student_weight: (V, H) student head (lm_head).  Receives a gradient only if it
            requires grad.
        teacher_hidden: (..., H) hidden states of the frozen original model, same shape,
            dtype and device.  Constant (no gradient).
        teacher_weight: (V, H) teacher head; may be the same tensor as ``student_weight``
            (a frozen head shared under LoRA).  Constant.
        token_mask, vocab_mask, forget_token_ids, form, reduction, temperature: as in
            :func:`~unlearn_fast.dual_masked_kl` (K_S over the leading shape (...), K_V
            over V; reductions "none", "sum", "mean", "siu").
        student_bias, teacher_bias: optional (V,) head biases (the student's receives a
            gradient if it requires grad).
        chunk_size: tokens per chunk for the fused backends (default
            :func:`default_chunk_size`: 520 tokens at V = 32,000, 256 at V = 151,936).
        backend: "auto", "eager" (full logits, then the eager reference), "cpp", "triton",
            "cuda".

    Returns:
        float32 (float64 for float64 inputs): a scalar, or shape (...) for
        reduction="none" (0 at masked positions).
    """
    V.check_tensor(student_hidden, "student_hidden", floating=True)
    V.check_tensor(student_weight, "student_weight", floating=True, dims=(2,))
    V.check_tensor(teacher_hidden, "teacher_hidden", floating=True)
    V.check_tensor(teacher_weight, "teacher_weight", floating=True, dims=(2,))
    if student_hidden.dim() < 1:
        raise ValueError(f"student_hidden must have shape (..., H), got {tuple(student_hidden.shape)}")
    vocab, hdim = student_weight.shape
    if vocab == 0:
        raise ValueError("student_weight must have at least one vocabulary row")
    if student_hidden.shape[-1] != hdim:
        raise ValueError(f"student_hidden has hidden size {student_hidden.shape[-1]} but student_weight has shape "
                         f"{tuple(student_weight.shape)} (expected (V, {student_hidden.shape[-1]}))")
    V.check_same(student_weight, student_hidden, "student_weight", "student_hidden", shape=False)
    V.check_same(teacher_hidden, student_hidden, "teacher_hidden", "student_hidden")
    V.check_same(teacher_weight, student_weight, "teacher_weight", "student_weight")
    _check_bias(student_bias, "student_bias", student_weight, "student_weight")
    _check_bias(teacher_bias, "teacher_bias", teacher_weight, "teacher_weight")
    V.check_choice(form, "form", dmk.FORMS)
    V.check_choice(reduction, "reduction", dmk.DMK_REDUCTIONS)
    inv_temperature = 1.0 / V.check_positive(temperature, "temperature")
    _check_chunk_size(chunk_size)

    device = student_hidden.device
    lead_shape = student_hidden.shape[:-1]
    ks = V.mask_as_float(token_mask, "token_mask", lead_shape, device).reshape(-1) if token_mask is not None else None
    kv = dmk.build_vocab_mask(vocab, vocab_mask, forget_token_ids, device)
    cross_entropy = form == "cross_entropy"
    sh = student_hidden.reshape(-1, hdim)
    th = teacher_hidden.detach().reshape(-1, hdim)
    tw = teacher_weight.detach()
    tb = None if teacher_bias is None else teacher_bias.detach()

    name = resolve_for_inputs(OP, backend, device, student_hidden.dtype)
    if name == "eager":
        rows = reference_linear(sh, student_weight, th, tw, student_bias, tb, ks, kv, inv_temperature, cross_entropy)
        return reduce_rows(rows, ks, reduction, lead_shape, siu_denominator_scale=vocab)

    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, num_tokens=sh.shape[0])
    grad_on = torch.is_grad_enabled()
    summed = reduction != "none"
    grad_hidden = grad_on and student_hidden.requires_grad
    grad_weight = summed and grad_on and student_weight.requires_grad
    grad_bias = summed and grad_on and student_bias is not None and student_bias.requires_grad
    rows, total, *_ = _fl_fwd(sh.contiguous(), student_weight.contiguous(), th.contiguous(), tw.contiguous(),
                              None if student_bias is None else student_bias.contiguous(),
                              None if tb is None else tb.contiguous(), ks, kv, inv_temperature, cross_entropy,
                              chunk_size, grad_hidden, grad_weight, grad_bias, summed, name)
    if not summed:
        return rows.reshape(lead_shape)
    return reduce_total(total, ks, rows.shape[0], reduction, siu_denominator_scale=vocab)


class FusedLinearDualMaskedKLDivLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_dual_masked_kl` (same options).

    Example::

        loss_fn = FusedLinearDualMaskedKLDivLoss(forget_token_ids=name_ids)
        loss = loss_fn(hidden[:, :-1], lm_head.weight, ref_hidden[:, :-1], lm_head.weight,
                       token_mask=~target_phrase[:, 1:])
    """

    def __init__(self, *, forget_token_ids=None, vocab_mask: Optional[torch.Tensor] = None, form: str = "kl",
                 reduction: str = "mean", temperature: float = 1.0, chunk_size: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__()
        V.check_choice(form, "form", dmk.FORMS)
        V.check_choice(reduction, "reduction", dmk.DMK_REDUCTIONS)
        V.check_positive(temperature, "temperature")
        _check_chunk_size(chunk_size)
        self.forget_token_ids = forget_token_ids
        self.vocab_mask = vocab_mask
        self.form, self.reduction, self.temperature = form, reduction, temperature
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, token_mask=None,
                vocab_mask=None, student_bias=None, teacher_bias=None):
        return fused_linear_dual_masked_kl(
            student_hidden, student_weight, teacher_hidden, teacher_weight, token_mask,
            vocab_mask if vocab_mask is not None else self.vocab_mask, forget_token_ids=self.forget_token_ids,
            form=self.form, reduction=self.reduction, temperature=self.temperature, student_bias=student_bias,
            teacher_bias=teacher_bias, chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"form={self.form!r}, reduction={self.reduction!r}, temperature={self.temperature}, "
                f"chunk_size={self.chunk_size}, backend={self.backend!r}")
