"""Triton kernels for MultiDelete's losses (unlearn_fast/ops/modality.py).

Modality decoupling: one launch over the three (student, reference) pairs, grid
(row blocks, 3); program (i, k) reduces rows [i BLOCK_R, (i + 1) BLOCK_R) of pair k into
partial[k, i] (0 past the pair's end), and one single-program launch sums them in a fixed
order and applies the means and weights.  The backward writes the gradient rows of every
pair that needs one in one launch.

Similarity matching, flash-attention style: a program owns BLOCK_M rows of S = x y^T / T and
streams BLOCK_N columns at a time, each tile of S and R = xr yr^T / T formed with tl.dot over
BLOCK_K slices of the embeddings and never stored.  Rows keep running (max, sum) for both
softmaxes and the shifted cross term W = sum e^(r - mr) ((r - mr) - (s - ms)), rescaled when
a maximum rises, so KL = W / sr + log ss - log sr (form="kl"); or the sum of (s - r)^2
(form="mse", blocked).  The t2i direction is the same kernel on (y, x, yr, xr).
The gradient kernel recomputes the tiles: for x rows I and output columns Dblk of the
embedding, grad_x[I, Dblk] = sum_J G_IJ y_J[:, Dblk] with
G = g_row (softmax_row(s) - softmax_row(r)) + g_col (softmax_col(s) - softmax_col(r)) from the
saved statistics (or 2 g (s - r) for the MSE form); grad_y is the same kernel with the roles
swapped.  Gradient tiles stay in float32 (tl.dot in IEEE float32).  Offsets are 64-bit.
The Gram form of the MSE runs its D x D products through torch.matmul (cuBLAS).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from unlearn_fast.backends import triton_interpret

MODE_KL = 0
MODE_MSE = 1
COSINE_EPS_C = tl.constexpr(1e-8)  # torch.nn.functional.cosine_similarity's eps


# ======================================================================================
# Modality decoupling
# ======================================================================================
@triton.jit(do_not_specialize=["n0", "d0", "n1", "d1", "n2", "d2"])
def _md_fwd_kernel(s0, r0, n0, d0, s1, r1, n1, d1, s2, r2, n2, d2, partial_ptr, num_blocks,
                   COSINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    if pair == 0:
        s_ptr, r_ptr, n, d = s0, r0, n0.to(tl.int64), d0.to(tl.int64)
    elif pair == 1:
        s_ptr, r_ptr, n, d = s1, r1, n1.to(tl.int64), d1.to(tl.int64)
    else:
        s_ptr, r_ptr, n, d = s2, r2, n2.to(tl.int64), d2.to(tl.int64)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)  # sum (s - r)^2, or s.r for cosine
    ss = tl.zeros([BLOCK_R], dtype=tl.float32)
    rr = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = rows[:, None] * d + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if COSINE:
            acc += tl.sum(s * r, axis=1)
            ss += tl.sum(s * s, axis=1)
            rr += tl.sum(r * r, axis=1)
        else:
            e = s - r
            acc += tl.sum(e * e, axis=1)
    if COSINE:
        ns = tl.maximum(tl.sqrt(ss), COSINE_EPS_C)
        nr = tl.maximum(tl.sqrt(rr), COSINE_EPS_C)
        val = tl.where(row_ok, 1.0 - acc / (ns * nr), 0.0)
    else:
        val = acc
    tl.store(partial_ptr + pair * num_blocks + pid, tl.sum(val, axis=0))


@triton.jit
def _md_finalize_kernel(partial_ptr, num_blocks, out_ptr, sc0, sc1, sc2, w0, w1, w2, BLOCK: tl.constexpr):
    """out = (sc_k * sum_b partial[k, b] for k < 3, sum_k w_k out[k]), summed in a fixed order."""
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCK):
        idx = b0 + tl.arange(0, BLOCK)
        ok = idx < num_blocks
        acc0 += tl.load(partial_ptr + idx, mask=ok, other=0.0)
        acc1 += tl.load(partial_ptr + num_blocks + idx, mask=ok, other=0.0)
        acc2 += tl.load(partial_ptr + 2 * num_blocks + idx, mask=ok, other=0.0)
    t0 = sc0 * tl.sum(acc0, axis=0)
    t1 = sc1 * tl.sum(acc1, axis=0)
    t2 = sc2 * tl.sum(acc2, axis=0)
    tl.store(out_ptr, t0)
    tl.store(out_ptr + 1, t1)
    tl.store(out_ptr + 2, t2)
    tl.store(out_ptr + 3, w0 * t0 + w1 * t1 + w2 * t2)


@triton.jit(do_not_specialize=["n0", "d0", "n1", "d1", "n2", "d2"])
def _md_bwd_kernel(go_ptr, s0, r0, g0, n0, d0, s1, r1, g1, n1, d1, s2, r2, g2, n2, d2, sc0, sc1, sc2, w0, w1, w2,
                   COSINE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    pair = tl.program_id(1)
    go_total = tl.load(go_ptr + 3)
    if pair == 0:
        s_ptr, r_ptr, g_ptr, n, d = s0, r0, g0, n0.to(tl.int64), d0.to(tl.int64)
        go = (tl.load(go_ptr) + w0 * go_total) * sc0
    elif pair == 1:
        s_ptr, r_ptr, g_ptr, n, d = s1, r1, g1, n1.to(tl.int64), d1.to(tl.int64)
        go = (tl.load(go_ptr + 1) + w1 * go_total) * sc1
    else:
        s_ptr, r_ptr, g_ptr, n, d = s2, r2, g2, n2.to(tl.int64), d2.to(tl.int64)
        go = (tl.load(go_ptr + 2) + w2 * go_total) * sc2
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n
    a = tl.zeros([BLOCK_R], dtype=tl.float32)  # coefficient of r
    b = tl.zeros([BLOCK_R], dtype=tl.float32)  # coefficient of s
    if COSINE:
        dot = tl.zeros([BLOCK_R], dtype=tl.float32)
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        rr = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            cols = k0 + tl.arange(0, BLOCK_D)
            mask = row_ok[:, None] & (cols < d)[None, :]
            offs = rows[:, None] * d + cols[None, :]
            s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(s * r, axis=1)
            ss += tl.sum(s * s, axis=1)
            rr += tl.sum(r * r, axis=1)
        norm_s = tl.sqrt(ss)
        ns = tl.maximum(norm_s, COSINE_EPS_C)
        nr = tl.maximum(tl.sqrt(rr), COSINE_EPS_C)
        inv = 1.0 / (ns * nr)
        a = -go * inv
        b = tl.where(norm_s > COSINE_EPS_C, go * (dot * inv) / (ns * ns), 0.0)
    else:
        a = a - 2.0 * go
        b = b + 2.0 * go
    for k0 in range(0, d, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (cols < d)[None, :]
        offs = rows[:, None] * d + cols[None, :]
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = a[:, None] * r + b[:, None] * s
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def _md_blocks(d_max: int):
    block_d = min(triton.next_power_of_2(max(d_max, 16)), 256 if triton_interpret() else 128)
    block_r = 16 if triton_interpret() else max(1, 4096 // block_d)
    return block_r, block_d


def decoupling_forward(s0, r0, s1, r1, s2, r2, cosine: bool, scales, weights) -> torch.Tensor:
    """(4,) float32: (L_MD, L_multi, L_uni, weighted total); term k = scales[k] * pair k's sum."""
    pairs = ((s0, r0), (s1, r1), (s2, r2))
    block_r, block_d = _md_blocks(max(s.shape[1] for s, _ in pairs))
    num_blocks = max(1, max(triton.cdiv(s.shape[0], block_r) for s, _ in pairs))
    partial = torch.empty((3, num_blocks), dtype=torch.float32, device=s0.device)
    out = torch.empty(4, dtype=torch.float32, device=s0.device)
    args = []
    for s, r in pairs:
        args += [s, r, s.shape[0], s.shape[1]]
    _md_fwd_kernel[(num_blocks, 3)](*args, partial, num_blocks, COSINE=cosine, BLOCK_R=block_r, BLOCK_D=block_d)
    _md_finalize_kernel[(1,)](partial, num_blocks, out, *[float(v) for v in scales], *[float(v) for v in weights],
                              BLOCK=min(1024, triton.next_power_of_2(num_blocks)))
    return out


def decoupling_backward(grad, s0, r0, s1, r1, s2, r2, cosine: bool, scales, weights, need0: bool, need1: bool,
                        need2: bool):
    pairs = ((s0, r0, need0), (s1, r1, need1), (s2, r2, need2))
    block_r, block_d = _md_blocks(max(s.shape[1] for s, _, _ in pairs))
    grads = [torch.empty_like(s) if need else s.new_empty((0,)) for s, _, need in pairs]
    args = []
    for (s, r, need), g in zip(pairs, grads):
        # a pair without a gradient gets 0 rows (its output pointer is never written)
        args += [s, r, g if need else s, s.shape[0] if need else 0, s.shape[1]]
    num_blocks = max((triton.cdiv(s.shape[0], block_r) for s, _, need in pairs if need), default=1)
    num_blocks = max(1, num_blocks)
    _md_bwd_kernel[(num_blocks, 3)](grad, *args, *[float(v) for v in scales], *[float(v) for v in weights],
                                    COSINE=cosine, BLOCK_R=block_r, BLOCK_D=block_d)
    return tuple(grads)


# ======================================================================================
# Similarity matching
# ======================================================================================
@triton.jit
def _tile_products(x_ptr, y_ptr, xr_ptr, yr_ptr, rows, row_ok, cols, col_ok, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """(x[rows] . y[cols], xr[rows] . yr[cols]) as float32 (BLOCK_M, BLOCK_N) tiles.

    bf16/fp16 tiles go to tl.dot as they are (exact products, float32 accumulation); UPCAST
    converts them to float32 first, for the interpreter, whose bf16 tl.dot is wrong (triton 3.9)."""
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    r = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_offs = rows[:, None] * K + ks[None, :]
        y_offs = cols[:, None] * K + ks[None, :]
        x_mask = row_ok[:, None] & k_ok[None, :]
        y_mask = col_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0)
        y = tl.load(y_ptr + y_offs, mask=y_mask, other=0.0)
        xr = tl.load(xr_ptr + x_offs, mask=x_mask, other=0.0)
        yr = tl.load(yr_ptr + y_offs, mask=y_mask, other=0.0)
        if UPCAST:
            x, y, xr, yr = x.to(tl.float32), y.to(tl.float32), xr.to(tl.float32), yr.to(tl.float32)
        if x.dtype == tl.float32:  # full float32 products, not TF32
            s += tl.dot(x, tl.trans(y), input_precision="ieee")
            r += tl.dot(xr, tl.trans(yr), input_precision="ieee")
        else:
            s += tl.dot(x, tl.trans(y))
            r += tl.dot(xr, tl.trans(yr))
    return s, r


@triton.jit
def _sim_rows_fwd_kernel(x_ptr, y_ptr, xr_ptr, yr_ptr, stats_ptr, vals_ptr, M, N, K, inv_t,
                         MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    ms = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    mr = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    ss = tl.zeros([BLOCK_M], dtype=tl.float32)
    sr = tl.zeros([BLOCK_M], dtype=tl.float32)
    w = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        s, r = _tile_products(x_ptr, y_ptr, xr_ptr, yr_ptr, rows, row_ok, cols, col_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        if MODE == 0:
            s = s * inv_t  # 0 at padded columns, which the masks below leave out
            r = r * inv_t
            new_ms = tl.maximum(ms, tl.max(tl.where(col_ok[None, :], s, float("-inf")), axis=1))
            new_mr = tl.maximum(mr, tl.max(tl.where(col_ok[None, :], r, float("-inf")), axis=1))
            ds = s - new_ms[:, None]
            dr = r - new_mr[:, None]
            es = tl.where(col_ok[None, :], tl.exp(ds), 0.0)
            er = tl.where(col_ok[None, :], tl.exp(dr), 0.0)
            diff = dr - ds
            # move the running W to the new maxima (an empty state, sr = 0, has no W)
            shift = tl.where(sr > 0, mr - new_mr, 0.0) - tl.where(sr > 0, ms - new_ms, 0.0)
            fr = tl.exp(mr - new_mr)
            w = fr * (w + sr * shift) + tl.sum(er * diff, axis=1)
            sr = fr * sr + tl.sum(er, axis=1)
            ss = tl.exp(ms - new_ms) * ss + tl.sum(es, axis=1)
            ms = new_ms
            mr = new_mr
        else:
            e = s - r  # 0 at padded columns
            w += tl.sum(e * e, axis=1)
    if MODE == 0:
        lss = tl.log(ss)
        lsr = tl.log(sr)
        tl.store(vals_ptr + rows, w / sr + lss - lsr, mask=row_ok)
        tl.store(stats_ptr + rows, ms, mask=row_ok)
        tl.store(stats_ptr + M + rows, lss, mask=row_ok)
        tl.store(stats_ptr + 2 * M + rows, mr, mask=row_ok)
        tl.store(stats_ptr + 3 * M + rows, lsr, mask=row_ok)
    else:
        tl.store(vals_ptr + rows, w, mask=row_ok)


@triton.jit
def _sim_grad_kernel(x_ptr, y_ptr, xr_ptr, yr_ptr, row_stats_ptr, col_stats_ptr, gw_ptr, out_ptr, M, N, K, inv_t,
                     MODE: tl.constexpr, USE_ROWS: tl.constexpr, USE_COLS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DOUT: tl.constexpr, UPCAST: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    dcols = pid_d.to(tl.int64) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    dcol_ok = dcols < K
    g_row = tl.load(gw_ptr)
    g_col = tl.load(gw_ptr + 1)
    if MODE == 0 and USE_ROWS:
        ms = tl.load(row_stats_ptr + rows, mask=row_ok, other=0.0)
        lss = tl.load(row_stats_ptr + M + rows, mask=row_ok, other=0.0)
        mr = tl.load(row_stats_ptr + 2 * M + rows, mask=row_ok, other=0.0)
        lsr = tl.load(row_stats_ptr + 3 * M + rows, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_DOUT], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        s, r = _tile_products(x_ptr, y_ptr, xr_ptr, yr_ptr, rows, row_ok, cols, col_ok, K, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
        valid = row_ok[:, None] & col_ok[None, :]
        if MODE == 0:
            s = s * inv_t
            r = r * inv_t
            g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            if USE_ROWS:
                g += g_row * (tl.exp((s - ms[:, None]) - lss[:, None]) - tl.exp((r - mr[:, None]) - lsr[:, None]))
            if USE_COLS:
                cms = tl.load(col_stats_ptr + cols, mask=col_ok, other=0.0)
                clss = tl.load(col_stats_ptr + N + cols, mask=col_ok, other=0.0)
                cmr = tl.load(col_stats_ptr + 2 * N + cols, mask=col_ok, other=0.0)
                clsr = tl.load(col_stats_ptr + 3 * N + cols, mask=col_ok, other=0.0)
                g += g_col * (tl.exp((s - cms[None, :]) - clss[None, :]) - tl.exp((r - cmr[None, :]) - clsr[None, :]))
        else:
            g = 2.0 * g_row * (s - r)
        g = tl.where(valid, g, 0.0)  # padded rows / columns (their statistics are placeholders)
        y = tl.load(y_ptr + cols[:, None] * K + dcols[None, :], mask=col_ok[:, None] & dcol_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.dot(g, y, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * K + dcols[None, :], acc, mask=row_ok[:, None] & dcol_ok[None, :])


def _sim_blocks(K: int):
    if triton_interpret():  # the interpreter runs each program in numpy: few, small programs
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, UPCAST=True), 32
    return (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, UPCAST=False, num_warps=8),
            min(128, triton.next_power_of_2(max(K, 16))))


def _row_pass(x, y, xr, yr, inv_t: float, mode: int):
    """Per-row values (KL or sum of squares) and (4, M) statistics of x's rows against y."""
    M, K = x.shape
    N = y.shape[0]
    vals = torch.empty(M, dtype=torch.float32, device=x.device)
    stats = torch.zeros((4, M), dtype=torch.float32, device=x.device)
    blocks, _ = _sim_blocks(K)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]),)  # num_warps, when present, is a launch option
    _sim_rows_fwd_kernel[grid](x, y, xr, yr, stats, vals, M, N, K, inv_t, MODE=mode, **blocks)
    return vals, stats


def _grad_pass(x, y, xr, yr, row_stats, col_stats, gw, inv_t: float, mode: int, use_rows: bool, use_cols: bool):
    M, K = x.shape
    N = y.shape[0]
    out = torch.empty((M, K), dtype=torch.float32, device=x.device)
    blocks, block_dout = _sim_blocks(K)
    grid = (triton.cdiv(M, blocks["BLOCK_M"]), triton.cdiv(K, block_dout))
    _sim_grad_kernel[grid](x, y, xr, yr, row_stats, col_stats, gw, out, M, N, K, inv_t, MODE=mode,
                           USE_ROWS=use_rows, USE_COLS=use_cols, BLOCK_DOUT=block_dout, **blocks)
    return out


def kl_forward(a, b, c, d, inv_t: float, w_row: float, w_col: float, block_rows: int, grad_in_forward: bool):
    if grad_in_forward:
        raise ValueError("the triton backend computes the similarity gradient in backward (grad_in_forward=False)")
    zero = torch.zeros((), dtype=torch.float64, device=a.device)
    row_stats = torch.zeros((4, a.shape[0]), dtype=torch.float32, device=a.device)
    col_stats = torch.zeros((4, b.shape[0]), dtype=torch.float32, device=a.device)
    loss = zero
    if w_row != 0.0:
        vals, row_stats = _row_pass(a, b, c, d, inv_t, MODE_KL)
        loss = loss + w_row * vals.sum(dtype=torch.float64)
    if w_col != 0.0:
        vals, col_stats = _row_pass(b, a, d, c, inv_t, MODE_KL)
        loss = loss + w_col * vals.sum(dtype=torch.float64)
    empty = a.new_empty((0,), dtype=torch.float32)
    return loss.to(torch.float32), row_stats, col_stats, empty, empty.clone()


def kl_backward(grad, a, b, c, d, row_stats, col_stats, inv_t: float, w_row: float, w_col: float, block_rows: int,
                need_a: bool, need_b: bool):
    gw = grad.to(torch.float32).reshape(1) * torch.tensor([w_row * inv_t, w_col * inv_t], dtype=torch.float32,
                                                          device=a.device)
    rows, cols = w_row != 0.0, w_col != 0.0
    empty = a.new_empty((0,), dtype=torch.float32)
    ga = _grad_pass(a, b, c, d, row_stats, col_stats, gw, inv_t, MODE_KL, rows, cols) if need_a else empty
    gb = (_grad_pass(b, a, d, c, col_stats, row_stats, gw.flip(0), inv_t, MODE_KL, cols, rows)
          if need_b else empty.clone())
    return ga, gb


def sq_forward(a, b, c, d, block_rows: int, want_grad: bool):
    vals, stats = _row_pass(a, b, c, d, 1.0, MODE_MSE)
    sumsq = vals.sum(dtype=torch.float64).to(torch.float32)
    empty = a.new_empty((0,), dtype=torch.float32)
    if not want_grad:
        return sumsq, empty, empty.clone()
    gw = torch.ones(2, dtype=torch.float32, device=a.device)
    ga = _grad_pass(a, b, c, d, stats, stats, gw, 1.0, MODE_MSE, False, False)
    gb = _grad_pass(b, a, d, c, stats, stats, gw, 1.0, MODE_MSE, False, False)
    return sumsq, ga, gb


# ---- Gram form: D x D products through torch.matmul ---------------------------------------
def gram_forward(a, b, c, d):
    a, b, c, d = (x.float() for x in (a, b, c, d))
    dim = a.shape[1]
    grams = torch.empty((4, dim, dim), dtype=torch.float32, device=a.device)
    torch.mm(a.t(), a, out=grams[0])
    torch.mm(b.t(), b, out=grams[1])
    torch.mm(a.t(), c, out=grams[2])
    torch.mm(b.t(), d, out=grams[3])
    cc, dd = c.t() @ c, d.t() @ d

    def frob(x, y):
        return torch.dot(x.reshape(-1), y.reshape(-1)).double()

    value = frob(grams[0], grams[1]) - 2.0 * frob(grams[2], grams[3]) + frob(cc, dd)
    return value.to(torch.float32), grams


def gram_backward(grad, a, b, c, d, grams, need_a: bool, need_b: bool):
    two_g = grad.to(torch.float32) * 2.0
    empty = a.new_empty((0,), dtype=torch.float32)

    def side(x, y, gxx, gcross):
        return torch.addmm(x.float() @ gxx, y.float(), gcross.t(), alpha=-1.0) * two_g

    ga = side(a, c, grams[1], grams[3]) if need_a else empty
    gb = side(b, d, grams[0], grams[2]) if need_b else empty.clone()
    return ga, gb
