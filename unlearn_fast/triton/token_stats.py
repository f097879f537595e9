"""Triton row kernels for token statistics (unlearn_fast/ops/token_stats.py).

One program per row of a (n, V) logits chunk, looping over the vocabulary in blocks:
pass 1 finds the maximum m and its first index, pass 2 accumulates, with d = z - m,
s = sum e^d, A1 = sum e^d d, A2 = sum e^d d^2 in float32; then
lse = m + log s (m and log s are stored apart), logprob = (z_t - m) - log s, E_p[log p] = A1/s - log s = -entropy,
Var_p[log p] = A2/s - (A1/s)^2.  The backward writes go * (1[v == t] - exp((z_v - m) - log s))
with the true-class term formed in float32.  The GEMMs of the linear path run through
torch.matmul (ops/token_stats.chunked_linear_*).  Row offsets are 64-bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rows_fwd_kernel(z_ptr, t_ptr, lp_ptr, st_ptr, am_ptr, V, stride, ignore_index,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    t = tl.load(t_ptr + row)
    valid = t != ignore_index
    in_range = (t >= 0) & (t < V)
    cols0 = tl.arange(0, BLOCK)
    best = -float("inf")
    best_idx = 0
    for start in range(0, V, BLOCK):
        cols = start + cols0
        z = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        bm = tl.max(z, axis=0)
        bi = tl.argmax(z, axis=0)
        take = bm > best
        best_idx = tl.where(take, start + bi, best_idx)
        best = tl.maximum(best, bm)
    s = 0.0
    a1 = 0.0
    a2 = 0.0
    for start in range(0, V, BLOCK):
        cols = start + cols0
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, z - best, 0.0)
        e = tl.where(mask, tl.exp(d), 0.0)
        s += tl.sum(e, axis=0)
        ed = tl.where(e > 0, e * d, 0.0)  # a -inf logit adds nothing (not 0 * -inf = NaN)
        a1 += tl.sum(ed, axis=0)
        a2 += tl.sum(tl.where(e > 0, ed * d, 0.0), axis=0)
    log_s = tl.log(s)
    mean_d = a1 / s
    var = tl.maximum(a2 / s - mean_d * mean_d, 0.0)
    safe_t = tl.where(valid & in_range, t, 0)
    zt = tl.load(base + safe_t).to(tl.float32)
    lp = tl.where(in_range, (zt - best) - log_s, float("nan"))
    tl.store(lp_ptr + row, tl.where(valid, lp, 0.0))
    tl.store(st_ptr + 4 * row, tl.where(valid, best, 0.0))
    tl.store(st_ptr + 4 * row + 1, tl.where(valid, log_s, 0.0))
    tl.store(st_ptr + 4 * row + 2, tl.where(valid, log_s - mean_d, 0.0))
    tl.store(st_ptr + 4 * row + 3, tl.where(valid, tl.sqrt(var), 0.0))
    tl.store(am_ptr + row, tl.where(valid, best_idx, 0).to(tl.int64))


@triton.jit
def _rows_bwd_kernel(go_ptr, z_ptr, t_ptr, st_ptr, g_ptr, V, stride, out_stride, ignore_index,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * stride
    out = g_ptr + row * out_stride
    t = tl.load(t_ptr + row)
    go = tl.load(go_ptr + row)
    m = tl.load(st_ptr + 4 * row)
    log_s = tl.load(st_ptr + 4 * row + 1)
    valid = (t != ignore_index) & (t >= 0) & (t < V)
    go = tl.where(valid, go, 0.0)
    safe_t = tl.where(valid, t, 0)
    pt = tl.where(valid, tl.exp((tl.load(base + safe_t).to(tl.float32) - m) - log_s), 0.0)
    true_term = go * (1.0 - pt)
    cols0 = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        cols = start + cols0
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(valid, -go * tl.exp((z - m) - log_s), 0.0)  # ignored rows: stats are 0, exp may overflow
        g = tl.where(cols == safe_t, tl.where(valid, true_term, 0.0), g)
        tl.store(out + cols, g.to(g_ptr.dtype.element_ty), mask=mask)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(max(int(V), 16)))


def rows_forward(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    """(logprob, row stats (n, 4) = [max, log_s, entropy, std_logp], argmax) of a (n, V) logits block."""
    n, V = logits.shape
    assert logits.stride(1) == 1
    f32 = dict(dtype=torch.float32, device=logits.device)
    lp, st = torch.empty(n, **f32), torch.empty((n, 4), **f32)
    am = torch.empty(n, dtype=torch.long, device=logits.device)
    if n:
        _rows_fwd_kernel[(n,)](logits, targets, lp, st, am, V, logits.stride(0), ignore_index,
                               BLOCK=_block(V))
    return lp, st, am


def rows_backward(grad: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, row_stats: torch.Tensor,
                  ignore_index: int, out_dtype=None) -> torch.Tensor:
    """Gradient rows go * (onehot - p) of a (n, V) logits block, in ``out_dtype`` (default: the logits')."""
    n, V = logits.shape
    out = torch.empty((n, V), dtype=out_dtype or logits.dtype, device=logits.device)
    if n:
        _rows_bwd_kernel[(n,)](grad, logits, targets, row_stats, out, V, logits.stride(0), out.stride(0), ignore_index,
                               BLOCK=_block(V))
    return out
