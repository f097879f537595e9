"""Per-token statistics of a language-model head, fused: one pass over the vocabulary
per token gives everything the unlearning losses and the membership-inference metrics
need, computed chunk by chunk from the hidden states and the head weight so the
(tokens x vocab) logits never exist.

For a token with logits z = W h (+ b), p = softmax(z) and target t:

    logprob  = log p_t = z_t - lse                  (differentiable)
    lse      = log sum_v exp z_v
    entropy  = -sum_v p_v log p_v
    mean_logp = E_p[log p] = -entropy               (Min-K%++'s mu)
    std_logp = sqrt(E_p[(log p)^2] - mean_logp^2)  (Min-K%++'s sigma)
    argmax   = first index of the largest logit;  correct = (argmax == t)

Positions whose target equals ``ignore_index`` give 0 (False for "correct") in every
statistic and no gradient.  Only "logprob" carries a gradient; the others are returned
detached.

Chunking (the fused backends): tokens are processed ``chunk_size`` at a time.

On the CPU the vocabulary is folded in blocks too (csrc/token_stats.cpp): each block's
logits, W[v0 : v0 + 4096] @ hidden[c]^T (+ b), come out of BLAS as one (4096, chunk)
slab, each token's statistics are running sums with an online maximum (as flash
attention keeps its softmax), and the next block overwrites the slab, so the largest
buffer is one slab (4 MiB at 256 tokens in float32, whatever V).  In bfloat16/float16
the GEMMs run in that dtype and each slab is converted to float32 for the statistics;
the forward's hidden gradient (below) is blocked in float32 only.  With a gradient:

  * grad_hidden is formed in the forward: the per-row Jacobian of logprob,
    W_t - sum_v p_v W_v, summed block by block with the same rescaling (1 - p_t taken as
    sum_{v != t} e^(z_v - m) / sum_v e^(z_v - m), so nothing cancels when p_t -> 1); the
    backward scales row r by grad_output[r] (exact for any grad_output);
  * the weight/bias gradients of per-token log-probs (e.g. NPO with a trainable head) are
    formed in the backward, which recomputes each block's slab with the saved statistics;
  * for a fixed weighted sum of the log-probs with a trainable head
    (:func:`linear_logprob_sum`, used by ``cross_entropy``), the forward forms
    grad_weight += g^T @ hidden[c] too, so the logits are computed once (three head GEMMs
    in all, as eager).  That needs each token's whole row at once (every entry of g
    depends on the token's final normaliser), so this case keeps a (chunk, V)
    buffer: blocking it would cost a fourth GEMM, and the GEMMs are nearly all of the
    time on the CPU.

The other cases (the triton and cuda backends; on the CPU a bfloat16/float16 forward that
forms the hidden gradient, and the trainable-head forward above) put a chunk's
logits, hidden[c] @ W^T (+ b), into one reused (chunk, V) buffer, then one fused row pass
computes the statistics in float32; with a gradient the same chunk is turned into its
gradient rows g = c_r (onehot - p) (float32 math, the true-class term included, stored in
the input dtype) while it is at hand, and grad_hidden = g @ W (and, for
:func:`linear_logprob_sum`, grad_weight and grad_bias) are formed there; otherwise the
backward recomputes each chunk's logits for the weight/bias gradients.

The default chunk size (``default_chunk_size``) keeps one float32 (chunk, V) buffer within
128 MiB, but never below 256 rows (thin GEMMs run far below the BLAS peak) and balanced
over the tokens: at most 1048 tokens a chunk at V = 32,000, 256 at V = 151,936 (where
512 tokens run as 3 x 176).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from unlearn_fast import backends
from unlearn_fast.ops import _validation as V
from unlearn_fast.ops._common import KernelPair, cpu_ops, cuda_ops, register_first_order_autograd, resolve_for_inputs
from unlearn_fast.ops._linear_head import (add_bias_grad, add_weight_grad, chunk_logits, refuse_second_backward,
                                          scaled)
from unlearn_fast.ops._linear_head import default_chunk_size as _default_chunk_size

OP = "token_stats"  # from hidden states and the head weight
OP_LOGITS = "token_stats_from_logits"
STATS = ("logprob", "lse", "entropy", "mean_logp", "std_logp", "argmax", "correct")
# backend="auto" on the CPU runs token_stats' eager reference for per-token log-probs with a
# trainable head when the logits would take at most this many bytes in float32.  There the
# fused path needs one more head GEMM than eager (its backward recomputes each chunk's logits
# for an arbitrary grad_output), the GEMMs are ~all of the time on the CPU, and the memory
# saved is small (bench e2e, NPO step with a full-fine-tuned LLaVA-1.5-size head, 41 MB of
# logits: fused 0.94x eager).
AUTO_EAGER_TRAINABLE_HEAD_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int, num_tokens: Optional[int] = None) -> int:
    """Tokens per chunk: one float32 (chunk, V) buffer within 128 MiB, at least 256 rows,
    balanced over ``num_tokens`` (see ``_linear_head.default_chunk_size``): 1048 at
    V = 32,000 and 256 at V = 151,936 without num_tokens."""
    return _default_chunk_size(vocab_size, 1, num_tokens)


# --------------------------------------------------------------------------------------
# Eager reference: full logits, log_softmax, gather.  The "eager" backend, the benchmark
# baseline and (in float64) the test oracle.  Returns the same 3-tuple as the kernels:
# (logprob (N,), row stats (N, 4) = [max, log_s, entropy, std_logp], argmax (N,)) with
# lse = max + log_s.  (The kernels keep max and log_s apart so that the backward's
# (z - max) - log_s is exact for logits of magnitude 1e4; the reference stores lse, 0.)
# --------------------------------------------------------------------------------------
def reference_rows(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                   extras: bool = True) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    # float32 math for bfloat16 / float16 logits, as the kernels (a bf16 log_softmax rounds
    # every log-prob to 8 bits, so `auto`'s eager trainable-head path would disagree with
    # the fused frozen-reference pass of the same model)
    logp = torch.log_softmax(logits, dim=-1, dtype=out_dtype)
    lp = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1).to(out_dtype) * valid.to(out_dtype)
    n = logits.shape[0]
    if not extras:
        return lp, logits.new_zeros((n, 4), dtype=out_dtype), torch.zeros_like(targets)
    with torch.no_grad():
        vf = valid.to(out_dtype)
        lpd = logp.detach().to(out_dtype)
        p = lpd.exp()
        # where p is 0 (a -inf logit) its log-prob adds nothing: 0 log 0 = 0, not 0 * -inf = NaN
        lpd = lpd.masked_fill(p == 0, 0.0)
        lse = torch.logsumexp(logits.detach().to(out_dtype), dim=-1) * vf
        mean = (p * lpd).sum(-1)
        std = (p * (lpd - mean.unsqueeze(-1)).square()).sum(-1).clamp_min(0).sqrt() * vf
        entropy = -mean * vf
        am = torch.where(valid, logits.detach().argmax(-1), torch.zeros_like(targets))
    return lp, torch.stack([lse, torch.zeros_like(lse), entropy, std], dim=-1), am


def reference_linear(hidden, weight, targets, bias, ignore_index, extras=True):
    return reference_rows(chunk_logits(hidden, weight, bias), targets, ignore_index, extras)


# --------------------------------------------------------------------------------------
# Generic chunk loops over a backend's row kernels (the triton backend uses them; the cpp
# and cuda backends run the same loops in C++).  GEMMs through torch.matmul.
#   row_forward(logits, targets, ignore_index) -> (logprob, row stats, argmax)
#   row_backward(grad, logits, targets, row_stats, ignore_index, out_dtype) -> (n, V) rows
# --------------------------------------------------------------------------------------
def chunked_linear_forward(row_forward: Callable, row_backward: Callable, hidden, weight, targets, bias,
                           ignore_index: int, chunk_size: int, row_weights: Optional[torch.Tensor],
                           grad_hidden: bool, grad_weight: bool, grad_bias: bool):
    n_tok, hdim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    lp, st = torch.empty(n_tok, **f32), torch.empty((n_tok, 4), **f32)
    am = torch.empty(n_tok, dtype=torch.long, device=hidden.device)
    gh = torch.empty_like(hidden) if grad_hidden else hidden.new_empty((0,))
    gw = torch.zeros((vocab, hdim), **f32) if grad_weight else torch.empty(0, **f32)
    gb = torch.zeros(vocab, **f32) if grad_bias else torch.empty(0, **f32)
    coeff = row_weights if row_weights is not None else torch.ones(n_tok, **f32)
    c = max(1, min(chunk_size, n_tok))
    buf = hidden.new_empty((c, vocab))
    for c0 in range(0, n_tok, c):
        n = min(c, n_tok - c0)
        hc, tc = hidden[c0:c0 + n], targets[c0:c0 + n]
        logits = chunk_logits(hc, weight, bias, out=buf[:n])
        a, b, m = row_forward(logits, tc, ignore_index)
        lp[c0:c0 + n], st[c0:c0 + n], am[c0:c0 + n] = a, b, m
        if grad_hidden or grad_weight or grad_bias:
            g = row_backward(coeff[c0:c0 + n], logits, tc, st[c0:c0 + n], ignore_index, hidden.dtype)
            if grad_hidden:
                torch.matmul(g, weight, out=gh[c0:c0 + n])
            if grad_weight:
                add_weight_grad(gw, g, hc)
            if grad_bias:
                add_bias_grad(gb, g)
    return lp, st, am, gh, gw.to(weight.dtype) if grad_weight else gw, gb.to(weight.dtype) if grad_bias else gb


def chunked_linear_backward(row_backward: Callable, grad, hidden, weight, targets, bias, row_stats,
                            ignore_index: int, chunk_size: int, need_grad_hidden: bool, need_grad_weight: bool,
                            need_grad_bias: bool):
    n_tok, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    gh = torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty((0,))
    gw = torch.zeros(weight.shape, **f32) if need_grad_weight else torch.empty(0, **f32)
    gb = torch.zeros(vocab, **f32) if need_grad_bias else torch.empty(0, **f32)
    c = max(1, min(chunk_size, n_tok))
    buf = hidden.new_empty((c, vocab))
    for c0 in range(0, n_tok, c):
        n = min(c, n_tok - c0)
        hc = hidden[c0:c0 + n]
        logits = chunk_logits(hc, weight, bias, out=buf[:n])
        g = row_backward(grad[c0:c0 + n], logits, targets[c0:c0 + n], row_stats[c0:c0 + n], ignore_index,
                         hidden.dtype)
        if need_grad_hidden:
            torch.matmul(g, weight, out=gh[c0:c0 + n])
        if need_grad_weight:
            add_weight_grad(gw, g, hc)
        if need_grad_bias:
            add_bias_grad(gb, g)
    return gh, gw.to(weight.dtype) if need_grad_weight else gw, gb.to(weight.dtype) if need_grad_bias else gb


# --------------------------------------------------------------------------------------
# Custom ops (backend name as an argument), fake kernels, autograd.
#
# linear fwd -> (logprob (N,), total (), row stats, argmax, grad_hidden, grad_weight,
# grad_bias).  Without row_weights the differentiable output is logprob: grad_hidden (if
# asked) is the per-row Jacobian, the weight/bias gradients are recomputed in bwd for the
# given grad_output.  With row_weights c (a constant) it is total = sum_r c_r logprob_r:
# grad_hidden/grad_weight/grad_bias (if asked) are that scalar's, formed in the forward.
# --------------------------------------------------------------------------------------
def _fake_stats(like: torch.Tensor, n: int):
    return (like.new_empty((n,), dtype=torch.float32), like.new_empty((n, 4), dtype=torch.float32),
            like.new_empty((n,), dtype=torch.long))


@torch.library.custom_op("unlearn_fast::token_stats_linear_fwd", mutates_args=())
def _linear_fwd(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: Optional[torch.Tensor],
                ignore_index: int, chunk_size: int, row_weights: Optional[torch.Tensor], grad_hidden: bool,
                grad_weight: bool, grad_bias: bool, backend: str
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           torch.Tensor]:
    lp, st, am, gh, gw, gb = backends.implementations(OP)[backend].forward(
        hidden, weight, targets, bias, ignore_index, chunk_size, row_weights, grad_hidden, grad_weight, grad_bias)
    total = (lp * row_weights).sum() if row_weights is not None else lp.sum()
    return lp, total, st, am, gh, gw, gb


@_linear_fwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, chunk_size, row_weights, grad_hidden, grad_weight, grad_bias,
      backend):
    lp, st, am = _fake_stats(hidden, hidden.shape[0])
    empty = hidden.new_empty((0,), dtype=torch.float32)
    return (lp, hidden.new_empty((), dtype=torch.float32), st, am,
            torch.empty_like(hidden) if grad_hidden else hidden.new_empty((0,)),
            torch.empty_like(weight) if grad_weight else empty.clone(),
            torch.empty_like(bias) if grad_bias else empty.clone())


@torch.library.custom_op("unlearn_fast::token_stats_linear_bwd", mutates_args=())
def _linear_bwd(grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor], row_stats: torch.Tensor, ignore_index: int, chunk_size: int,
                need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool, backend: str
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.implementations(OP)[backend].backward(grad, hidden, weight, targets, bias, row_stats,
                                                          ignore_index, chunk_size, need_grad_hidden,
                                                          need_grad_weight, need_grad_bias)


@_linear_bwd.register_fake
def _(grad, hidden, weight, targets, bias, row_stats, ignore_index, chunk_size, need_grad_hidden, need_grad_weight,
      need_grad_bias, backend):
    empty = hidden.new_empty((0,), dtype=torch.float32)
    return (torch.empty_like(hidden) if need_grad_hidden else hidden.new_empty((0,)),
            torch.empty_like(weight) if need_grad_weight else empty,
            torch.empty_like(bias) if (need_grad_bias and bias is not None) else empty.clone())


def _linear_setup(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, chunk_size, row_weights, _gh, _gw, _gb, backend = inputs
    lp, total, st, am, gh, gw, gb = output
    ctx.save_for_backward(hidden, weight, targets, bias, st, gh, gw, gb)
    ctx.ignore_index, ctx.chunk_size, ctx.backend = ignore_index, chunk_size, backend
    ctx.has_bias = bias is not None
    ctx.summed = row_weights is not None
    ctx.mark_non_differentiable(total if row_weights is None else lp, st, am, gh, gw, gb)
    # no zero-filled (V, H) stand-in for the weight-gradient output's missing grad: the
    # backward gets None for outputs nothing depended on
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, g_lp, g_total, _g_st, _g_am, _g_gh, _g_gw, _g_gb):
    out = [None] * 11
    need_gh = bool(ctx.needs_input_grad[0])
    need_gw = bool(ctx.needs_input_grad[1])
    need_gb = ctx.has_bias and bool(ctx.needs_input_grad[3])
    if ctx.summed and (need_gw or need_gb):
        refuse_second_backward(ctx, "token_stats")
    hidden, weight, targets, bias, row_stats, gh, gw, gb = ctx.saved_tensors
    if ctx.summed:
        if g_total is None:
            return tuple(out)
        scale = g_total.to(torch.float32)
        out[0] = scaled(gh, scale) if need_gh else None
        out[1] = scaled(gw, scale, ctx) if need_gw else None
        out[3] = scaled(gb, scale, ctx) if need_gb else None
        return tuple(out)
    if g_lp is None:
        return tuple(out)
    grad = g_lp.to(torch.float32).contiguous()
    if need_gh:
        out[0] = (gh * grad[:, None]).to(gh.dtype)  # per-row Jacobian x grad_output: exact
    if need_gw or need_gb:
        _, gw_new, gb_new = _linear_bwd(grad, hidden, weight, targets, bias, row_stats, ctx.ignore_index,
                                        ctx.chunk_size, False, need_gw, need_gb, ctx.backend)
        out[1] = gw_new if need_gw else None
        out[3] = gb_new if need_gb else None
    return tuple(out)


register_first_order_autograd(_linear_fwd, _linear_backward, _linear_setup)


@torch.library.custom_op("unlearn_fast::token_stats_rows_fwd", mutates_args=())
def _rows_fwd(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return backends.implementations(OP_LOGITS)[backend].forward(logits, targets, ignore_index)


@_rows_fwd.register_fake
def _(logits, targets, ignore_index, backend):
    return _fake_stats(logits, logits.shape[0])


@torch.library.custom_op("unlearn_fast::token_stats_rows_bwd", mutates_args=())
def _rows_bwd(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor,
              ignore_index: int, backend: str) -> torch.Tensor:
    return backends.implementations(OP_LOGITS)[backend].backward(grad, logits, targets, row_stats, ignore_index)


@_rows_bwd.register_fake
def _(grad, logits, targets, row_stats, ignore_index, backend):
    return torch.empty_like(logits)


def _rows_setup(ctx, inputs, output):
    logits, targets, ignore_index, backend = inputs
    ctx.save_for_backward(logits, targets, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend
    ctx.mark_non_differentiable(output[1], output[2])


def _rows_backward(ctx, g_lp, _g_st, _g_am):
    logits, targets, row_stats = ctx.saved_tensors
    if g_lp is None:
        return None, None, None, None
    g = _rows_bwd(g_lp.to(torch.float32).contiguous(), logits, targets, row_stats, ctx.ignore_index, ctx.backend)
    return g, None, None, None


register_first_order_autograd(_rows_fwd, _rows_backward, _rows_setup)


# --------------------------------------------------------------------------------------
# Backend registrations
# --------------------------------------------------------------------------------------
backends.register(OP, "eager")(reference_linear)
backends.register(OP_LOGITS, "eager")(reference_rows)
backends.register(OP, "cpp")(KernelPair(
    forward=lambda *a: cpu_ops().token_stats_linear_fwd(*a),
    backward=lambda *a: cpu_ops().token_stats_linear_bwd(*a),
))
backends.register(OP_LOGITS, "cpp")(KernelPair(
    forward=lambda *a: cpu_ops().token_stats_rows_fwd(*a),
    backward=lambda *a: cpu_ops().token_stats_rows_bwd(*a),
))
backends.register(OP, "cuda")(KernelPair(
    forward=lambda *a: cuda_ops().token_stats_linear_fwd(*a),
    backward=lambda *a: cuda_ops().token_stats_linear_bwd(*a),
))
backends.register(OP_LOGITS, "cuda")(KernelPair(
    forward=lambda *a: cuda_ops().token_stats_rows_fwd(*a),
    backward=lambda *a: cuda_ops().token_stats_rows_bwd(*a),
))


def _triton():
    from unlearn_fast.triton import token_stats as mod  # lazily: triton is optional

    return mod


backends.register(OP, "triton")(KernelPair(
    forward=lambda *a: chunked_linear_forward(_triton().rows_forward, _triton().rows_backward, *a),
    backward=lambda *a: chunked_linear_backward(_triton().rows_backward, *a),
))
backends.register(OP_LOGITS, "triton")(KernelPair(
    forward=lambda *a: _triton().rows_forward(*a),
    backward=lambda *a: _triton().rows_backward(*a),
))


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
def _check_stats(stats) -> Tuple[str, ...]:
    if isinstance(stats, str):
        stats = (stats,)
    try:
        stats = tuple(stats)
    except TypeError as exc:
        raise TypeError(f"stats must be a name or a sequence of names from {STATS}") from exc
    for s in stats:
        if s not in STATS:
            raise ValueError(f"stats: unknown statistic {s!r}; expected names from {STATS}")
    return stats


def _check_targets(targets, name: str, lead_shape, vocab: int, device, ignore_index: int) -> torch.Tensor:
    V.check_tensor(targets, name)
    if targets.dtype.is_floating_point or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"{name} must hold integer token ids (int64), got dtype {targets.dtype}")
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{name} must have shape {tuple(lead_shape)}, got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{name} is on {targets.device} but the inputs are on {device}")
    t = targets.reshape(-1).to(torch.long).contiguous()
    if t.numel() and not torch.compiler.is_compiling():
        bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
        if t.device.type == "cpu":
            if bool(bad.any()):
                first = int(t[bad][0])
                raise ValueError(f"{name} must lie in [0, {vocab}) (the vocabulary size) or equal ignore_index="
                                 f"{ignore_index}; found {first}")
        else:  # no host sync: the check runs on the device and fails the next sync
            torch._assert_async(~bad.any(), f"{name} must lie in [0, {vocab}) or equal ignore_index")
    return t


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    return value


def _assemble(out, t, ignore_index, stats, lead_shape) -> Dict[str, torch.Tensor]:
    lp, st, am = out
    st = st.detach()
    res = {}
    for s in stats:
        if s == "logprob":
            res[s] = lp.reshape(lead_shape)
        elif s == "lse":
            res[s] = (st[:, 0] + st[:, 1]).reshape(lead_shape)
        elif s == "entropy":
            res[s] = st[:, 2].reshape(lead_shape)
        elif s == "mean_logp":
            res[s] = (0.0 - st[:, 2]).reshape(lead_shape)
        elif s == "std_logp":
            res[s] = st[:, 3].reshape(lead_shape)
        elif s == "argmax":
            res[s] = am.reshape(lead_shape)
        elif s == "correct":
            res[s] = ((am == t) & (t != ignore_index)).reshape(lead_shape)
    return res


def token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                stats: Union[str, Sequence[str]] = ("logprob",), chunk_size: Optional[int] = None,
                backend: str = "auto") -> Dict[str, torch.Tensor]:
    """Per-token statistics of the head ``logits = hidden @ weight.T (+ bias)`` without
    materialising the logits.

    Args:
        hidden: (N, H) or (B, T, H) float32/bfloat16/float16/float64 hidden states.
        weight: (V, H) head weight (lm_head), same dtype and device.  Receives a gradient
            only if it requires grad (a frozen head skips that third of the work).
        targets: (N,) or (B, T) integer token ids in [0, V), or ``ignore_index``.
        bias: optional (V,) head bias, same dtype.
        ignore_index: target value marking positions to skip (0 in every statistic).
        stats: names from ``STATS``: "logprob" (differentiable w.r.t. hidden, weight and
            bias), and the no-grad extras "lse", "entropy", "mean_logp", "std_logp",
            "argmax" (int64), "correct" (bool: argmax == target).
        chunk_size: tokens per chunk for the fused backends (default
            :func:`default_chunk_size`: 1048 tokens at V = 32,000, 256 at V = 151,936).
        backend: "auto", "eager" (full logits, log_softmax, gather), "cpp", "triton", "cuda".
            On the CPU "auto" runs float32 eager when the head is trainable and the float32
            logits would take <= 256 MiB (AUTO_EAGER_TRAINABLE_HEAD_BYTES): there the fused
            path's extra head GEMM is not repaid.

    Returns:
        dict name -> tensor shaped like ``targets``; float32 (float64 for float64 input),
        accumulated in float32 by the fused backends whatever the input dtype.
    """
    stats = _check_stats(stats)
    t, lead_shape, chunk_size = _check_linear_inputs(hidden, weight, targets, bias, ignore_index, chunk_size)
    h2 = hidden.reshape(-1, weight.shape[1])
    # small logits, trainable head: see AUTO_EAGER_TRAINABLE_HEAD_BYTES
    small_trainable = (torch.is_grad_enabled() and weight.requires_grad
                       and 4 * h2.shape[0] * weight.shape[0] <= AUTO_EAGER_TRAINABLE_HEAD_BYTES)
    name = resolve_for_inputs(OP, backend, hidden.device, hidden.dtype, eager_faster_on_cpu=small_trainable)
    if name == "eager":
        extras = any(s != "logprob" for s in stats)
        out = reference_linear(h2, weight, t, bias, ignore_index, extras)
    else:
        # hidden gradient: the per-row Jacobian, formed in the forward (exact for any
        # grad_output); weight/bias gradients: recomputed in the backward
        grad_hidden = torch.is_grad_enabled() and hidden.requires_grad
        lp, _total, st, am, *_ = _linear_fwd(h2.contiguous(), weight.contiguous(), t, _contiguous(bias),
                                             ignore_index, chunk_size, None, grad_hidden, False, False, name)
        out = (lp, st, am)
    return _assemble(out, t, ignore_index, stats, lead_shape)


def linear_logprob_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: Optional[torch.Tensor], row_weights: torch.Tensor, *, ignore_index: int = -100,
                       chunk_size: Optional[int] = None, backend: str = "auto") -> torch.Tensor:
    """sum_r c_r log p(target_r) over the tokens, for a constant per-token weight c =
    ``row_weights`` (float, shaped like ``targets``; no gradient flows to it): the
    building block of the token losses (cross-entropy: c = token weight x answer mask).

    Being a fixed weighted sum, its gradients w.r.t. hidden, weight and bias are all
    formed in the fused forward while each logits chunk is at hand, and the backward only
    scales them by the scalar grad_output: the logits are computed once.  Differentiable
    w.r.t. hidden, weight (if it requires grad) and bias.  A float32 scalar (float64 for
    float64 input)."""
    t, lead_shape, chunk_size = _check_linear_inputs(hidden, weight, targets, bias, ignore_index, chunk_size)
    V.check_tensor(row_weights, "row_weights", floating=True)
    if tuple(row_weights.shape) != tuple(lead_shape) or row_weights.device != hidden.device:
        raise ValueError(f"row_weights must have shape {tuple(lead_shape)} on {hidden.device}, "
                         f"got {tuple(row_weights.shape)} on {row_weights.device}")
    name = resolve_for_inputs(OP, backend, hidden.device, hidden.dtype)
    h2 = hidden.reshape(-1, weight.shape[1])
    if name == "eager":
        lp = reference_linear(h2, weight, t, bias, ignore_index, extras=False)[0]
        return (lp * row_weights.detach().reshape(-1).to(lp.dtype)).sum()
    grad_on = torch.is_grad_enabled()
    c = row_weights.detach().reshape(-1).to(torch.float32).contiguous()
    return _linear_fwd(h2.contiguous(), weight.contiguous(), t, _contiguous(bias), ignore_index, chunk_size, c,
                       grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
                       grad_on and bias is not None and bias.requires_grad, name)[1]


def _contiguous(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.contiguous()


def _check_linear_inputs(hidden, weight, targets, bias, ignore_index, chunk_size):
    """Validate a head call; returns (flat int64 targets, leading shape, chunk size)."""
    V.check_tensor(hidden, "hidden", floating=True, dims=(2, 3))
    V.check_tensor(weight, "weight", floating=True, dims=(2,))
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden has hidden size {hidden.shape[-1]} but weight has shape {tuple(weight.shape)} "
                         f"(expected (V, {hidden.shape[-1]}))")
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one vocabulary row")
    V.check_same(hidden, weight, "hidden", "weight", shape=False)
    if bias is not None:
        V.check_tensor(bias, "bias", floating=True, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        V.check_same(bias, weight, "bias", "weight", shape=False)
    ignore_index = _check_int(ignore_index, "ignore_index")
    vocab = weight.shape[0]
    lead_shape = hidden.shape[:-1]
    t = _check_targets(targets, "targets", lead_shape, vocab, hidden.device, ignore_index)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, num_tokens=lead_shape.numel())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return t, lead_shape, chunk_size


def token_stats_from_logits(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                            stats: Union[str, Sequence[str]] = ("logprob",),
                            backend: str = "auto") -> Dict[str, torch.Tensor]:
    """:func:`token_stats` for callers that already hold the logits (..., V).

    "logprob" is differentiable w.r.t. ``logits``; the fused backends make one pass over
    each row in float32 (the backward one more, from the saved lse) and allocate nothing
    of size tokens x vocab besides the gradient itself.  ``targets`` has shape (...).
    """
    V.check_tensor(logits, "logits", floating=True)
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    ignore_index = _check_int(ignore_index, "ignore_index")
    stats = _check_stats(stats)
    vocab = logits.shape[-1]
    lead_shape = logits.shape[:-1]
    t = _check_targets(targets, "targets", lead_shape, vocab, logits.device, ignore_index)
    name = resolve_for_inputs(OP_LOGITS, backend, logits.device, logits.dtype)
    rows = logits.reshape(-1, vocab)
    if name == "eager":
        out = reference_rows(rows, t, ignore_index, any(s != "logprob" for s in stats))
    else:
        out = _rows_fwd(rows.contiguous(), t, ignore_index, name)
    return _assemble(out, t, ignore_index, stats, lead_shape)
