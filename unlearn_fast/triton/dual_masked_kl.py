"""Triton kernels for SIU's dual masked KL (unlearn_fast/ops/dual_masked_kl.py).

The same algorithm as the C++ CPU kernel (csrc/cpu/dual_masked_kl.h), one program per
row, the vocabulary in blocks:

forward   one streaming pass with online maxima ma = max(s/T), mb = max(t/T) (per block
          scalars) and the shifted accumulators (per lane, summed after the loop)
              sa = sum e^(a-ma),  sb = sum e^(b-mb),  Ks = sum K_V e^(b-mb),
              W  = sum K_V e^(b-mb) ((b-mb) - (a-ma)),  E = sum K_V e^(b-mb) (b-mb),
          rescaled when a block raises a maximum (so logits of +-1e4 never cancel);
              KL = W/sb + S (log sa - log sb),  S = Ks/sb,
              CE = KL - (E/sb - S log sb).
          Saves (ma, log sa, mb, log sb, S) per row: maxima and log-sums kept apart.
backward  recomputes q and p from the saved statistics and writes
              g = go * K_S / T * (q S - K_V p)
          in float32 before rounding to the logits' dtype.

Offsets are 64-bit (row * V passes 2^31 at real sizes).  Masked rows (K_S = 0) skip the
vocabulary loop and give a zero loss, zero statistics and a zero gradient.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

STATS_PER_ROW = 5
# A finite "minus infinity" for the running maxima: the first block's rise from it is
# finite, so rescaling the (zero) accumulators gives 0 rather than 0 * inf = NaN.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _dmk_fwd_kernel(s_ptr, t_ptr, ks_ptr, kv_ptr, rows_ptr, stats_ptr, V, inv_t,
                    HAS_KS: tl.constexpr, HAS_KV: tl.constexpr, CROSS_ENTROPY: tl.constexpr,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    keep = 1.0
    n_cols = V
    if HAS_KS:
        keep = tl.load(ks_ptr + row)
        # Masked rows run no iterations (a data-dependent trip count, no branch divergence).
        n_cols = tl.where(keep != 0.0, V, 0)
    cols0 = tl.arange(0, BLOCK)
    # Scalar running maxima; per-lane accumulators, summed once after the loop, so a
    # block costs two reductions (the maxima), not seven.
    ma = _NEG_BIG
    mb = _NEG_BIG
    zeros = tl.zeros([BLOCK], dtype=tl.float32)
    sa = zeros
    sb = zeros
    kept_sum = zeros
    w = zeros
    e = zeros
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        in_row = cols < V
        a = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
        b = tl.load(t_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
        new_ma = tl.maximum(ma, tl.max(tl.where(in_row, a, _NEG_BIG), axis=0))
        new_mb = tl.maximum(mb, tl.max(tl.where(in_row, b, _NEG_BIG), axis=0))
        if new_ma > ma:  # a rise of ma by d raises every (b - mb) - (a - ma) by d
            rise_a = new_ma - ma
            sa = sa * tl.exp(-rise_a)
            w = w + kept_sum * rise_a
            ma = new_ma
        if new_mb > mb:  # a rise of mb by d scales e^(b - mb) by e^-d and lowers (b - mb) by d
            rise_b = new_mb - mb
            r = tl.exp(-rise_b)
            w = r * (w - kept_sum * rise_b)
            e = r * (e - kept_sum * rise_b)
            kept_sum = kept_sum * r
            sb = sb * r
            mb = new_mb
        da = a - ma
        db = b - mb
        ea = tl.where(in_row, tl.exp(da), 0.0)
        eb = tl.where(in_row, tl.exp(db), 0.0)
        if HAS_KV:
            keb = tl.load(kv_ptr + cols, mask=in_row, other=0.0) * eb
        else:
            keb = eb
        sa += ea
        sb += eb
        kept_sum += keb
        # a teacher -inf logit (p = 0) adds nothing: 0 log 0 = 0, not 0 * -inf = NaN
        w += tl.where(keb > 0, keb * (db - da), 0.0)
        e += tl.where(keb > 0, keb * db, 0.0)
    sa = tl.sum(sa, axis=0)
    sb = tl.sum(sb, axis=0)
    kept_sum = tl.sum(kept_sum, axis=0)
    w = tl.sum(w, axis=0)
    e = tl.sum(e, axis=0)
    live = n_cols > 0
    sa = tl.where(live, sa, 1.0)  # masked rows: log 1 = 0, no 0/0
    sb = tl.where(live, sb, 1.0)
    log_sa = tl.log(sa)
    log_sb = tl.log(sb)
    kept = kept_sum / sb
    loss = w / sb + kept * (log_sa - log_sb)
    if CROSS_ENTROPY:
        loss = loss - (e / sb - kept * log_sb)
    tl.store(rows_ptr + row, tl.where(live, keep * loss, 0.0))
    st = stats_ptr + row * 5
    tl.store(st + 0, tl.where(live, ma, 0.0))
    tl.store(st + 1, tl.where(live, log_sa, 0.0))
    tl.store(st + 2, tl.where(live, mb, 0.0))
    tl.store(st + 3, tl.where(live, log_sb, 0.0))
    tl.store(st + 4, tl.where(live, kept, 0.0))


@triton.jit
def _dmk_bwd_kernel(go_ptr, s_ptr, t_ptr, ks_ptr, kv_ptr, stats_ptr, g_ptr, V, inv_t,
                    HAS_KS: tl.constexpr, HAS_KV: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    g_row = g_ptr + row * V
    scale = tl.load(go_ptr + row) * inv_t
    if HAS_KS:
        scale = scale * tl.load(ks_ptr + row)
    st = stats_ptr + row * 5
    ma = tl.load(st + 0)
    log_sa = tl.load(st + 1)
    mb = tl.load(st + 2)
    log_sb = tl.load(st + 3)
    kept = tl.load(st + 4)
    live = scale != 0.0
    cols0 = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        in_row = cols < V
        if live:
            a = tl.load(s_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
            b = tl.load(t_row + cols, mask=in_row, other=0.0).to(tl.float32) * inv_t
            q = tl.exp((a - ma) - log_sa)
            p = tl.exp((b - mb) - log_sb)
            if HAS_KV:
                p = p * tl.load(kv_ptr + cols, mask=in_row, other=0.0)
            g = scale * (q * kept - p)
        else:  # masked row or zero incoming gradient: the statistics are zeros, exp could overflow
            g = tl.zeros([BLOCK], dtype=tl.float32)
        tl.store(g_row + cols, g.to(g_ptr.dtype.element_ty), mask=in_row)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(max(int(V), 16)))


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def forward(student: torch.Tensor, teacher: torch.Tensor, token_mask: Optional[torch.Tensor],
            vocab_mask: Optional[torch.Tensor], inv_temperature: float,
            cross_entropy: bool, *, block: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rows float32 (N,), stats float32 (N, 5)) for contiguous (N, V) logits.

    ``block`` (a power of two) overrides the vocabulary block size; tests use small
    blocks to exercise the online rescaling across many blocks."""
    n, V = student.shape
    assert student.is_contiguous() and teacher.is_contiguous()
    f32 = dict(dtype=torch.float32, device=student.device)
    rows = torch.empty(n, **f32)
    stats = torch.empty((n, STATS_PER_ROW), **f32)
    if n:
        block = block or _block(V)
        _dmk_fwd_kernel[(n,)](student, teacher, token_mask if token_mask is not None else rows,
                              vocab_mask if vocab_mask is not None else rows, rows, stats, V, float(inv_temperature),
                              HAS_KS=token_mask is not None, HAS_KV=vocab_mask is not None,
                              CROSS_ENTROPY=bool(cross_entropy), BLOCK=block, num_warps=_num_warps(block))
    return rows, stats


def backward(grad_rows: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
             token_mask: Optional[torch.Tensor], vocab_mask: Optional[torch.Tensor], stats: torch.Tensor,
             inv_temperature: float, *, block: Optional[int] = None) -> torch.Tensor:
    """Gradient w.r.t. the student logits, in the student's dtype (computed in float32)."""
    n, V = student.shape
    grad = torch.empty_like(student)
    if n:
        block = block or _block(V)
        _dmk_bwd_kernel[(n,)](grad_rows, student, teacher, token_mask if token_mask is not None else grad_rows,
                              vocab_mask if vocab_mask is not None else grad_rows, stats, grad, V,
                              float(inv_temperature), HAS_KS=token_mask is not None,
                              HAS_KV=vocab_mask is not None, BLOCK=block, num_warps=_num_warps(block))
    return grad
