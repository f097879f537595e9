"""Triton multi-tensor kernels for the saliency primitives (unlearn_fast/ops/saliency.py).

Multi-tensor apply: one launch covers a whole tensor list.  Small tables on the device
hold each tensor's data pointer (one int64 per tensor and list argument), its element
count and its first program; a program finds its tensor by binary search, casts the
pointer to the list's element type (a constexpr: lists are grouped by dtype) and
processes BLOCK consecutive elements (BLOCK is a multiple of 32, so a program owns whole
words of a packed mask).  Offsets are 64-bit.  Reductions write one float32
partial per program, summed in float64 on the host side of the launch (deterministic);
histograms and counts are integer atomics.  Runs under TRITON_INTERPRET=1 on the CPU.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per program (64 mask words)
NUM_WARPS = 8

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TL_BITS = {4: tl.int32, 2: tl.int16, 8: tl.int64}


def _tl_dtype(tensors: Sequence[torch.Tensor]):
    dt = tensors[0].dtype
    if any(t.dtype != dt for t in tensors):
        raise TypeError("triton saliency kernels: a tensor list must share one dtype")
    if dt not in _TL_DTYPE:
        raise TypeError(f"triton saliency kernels: unsupported dtype {dt}")
    return _TL_DTYPE[dt]


def _device(tensors: Sequence[torch.Tensor]) -> torch.device:
    return tensors[0].device


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x


def _pointers(tensors: Sequence[torch.Tensor], device) -> torch.Tensor:
    return _to_device(torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64), device)


class _Table:
    """Per-tensor element counts and first program (prefix sum of the programs per
    tensor, T + 1 entries): a program finds its tensor by binary search, so the table
    has 2T + 1 entries whatever the number of programs."""

    def __init__(self, numels: Sequence[int], device: torch.device, block: int = BLOCK):
        n = torch.tensor(list(numels), dtype=torch.int64)
        per = (n + block - 1) // block
        first = torch.zeros(len(numels) + 1, dtype=torch.int64)
        first[1:] = torch.cumsum(per, 0)
        self.num_programs = int(first[-1])
        self.num_tensors = len(numels)
        self.log_t = max(1, (len(numels)).bit_length())  # binary-search steps
        self.numel = _to_device(n, device)
        self.first = _to_device(first, device)

    def args(self):
        return self.numel, self.first, self.num_tensors


@triton.jit
def _locate(numel_ptr, first_ptr, num_tensors, LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor, first element, element count, offsets) of this program."""
    pid = tl.program_id(0).to(tl.int64)
    lo = pid * 0
    hi = lo + num_tensors
    for _ in tl.static_range(LOG_T):  # invariant: first[lo] <= pid < first[hi]
        open_ = hi - lo > 1
        mid = (lo + hi) // 2
        right = tl.load(first_ptr + mid) <= pid
        lo = tl.where(open_ & right, mid, lo)
        hi = tl.where(open_ & ~right, mid, hi)
    start = (pid - tl.load(first_ptr + lo)) * BLOCK
    n = tl.load(numel_ptr + lo)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    return lo, start, n, offs


@triton.jit
def _pack_words(bits, BLOCK: tl.constexpr):
    """(BLOCK,) booleans -> (BLOCK // 32,) int32 words, element j in bit j % 32."""
    b = tl.reshape(bits.to(tl.int64), (BLOCK // 32, 32))
    shifted = b << tl.arange(0, 32).to(tl.int64)[None, :]
    return tl.sum(shifted, axis=1).to(tl.int32)


@triton.jit
def _mask_bits(wptr, offs, valid):
    """The mask bit of each element (bool), given the tensor's word pointer."""
    w = tl.load(wptr + (offs >> 5), mask=valid, other=0)
    return ((w >> (offs & 31).to(tl.int32)) & 1) != 0


@triton.jit
def _fisher_kernel(f_ptrs, g_ptrs, numel_ptr, first_ptr, num_tensors, scale, G_DT: tl.constexpr,
                   LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    f = tl.load(f_ptrs + t).to(tl.pointer_type(tl.float32))
    g = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    x = tl.load(g + offs, mask=valid, other=0.0).to(tl.float32)
    acc = tl.load(f + offs, mask=valid, other=0.0)
    tl.store(f + offs, acc + scale * (x * x), mask=valid)


@triton.jit
def _ratio_kernel(w_ptrs, a_ptrs, b_ptrs, numel_ptr, first_ptr, num_tensors, threshold, eps,
                  LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    a = tl.load(tl.load(a_ptrs + t).to(tl.pointer_type(tl.float32)) + offs, mask=valid, other=0.0)
    b = tl.load(tl.load(b_ptrs + t).to(tl.pointer_type(tl.float32)) + offs, mask=valid, other=1.0)
    # IEEE division (Triton's default fp32 '/' is approximate): the bits match eager float32
    ratio = tl.math.div_rn(a + eps, b + eps)
    words = _pack_words((ratio >= threshold) & valid, BLOCK)
    widx = (start >> 5) + tl.arange(0, BLOCK // 32).to(tl.int64)
    w = tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32))
    tl.store(w + widx, words, mask=widx < (n + 31) // 32)


@triton.jit
def _abs_key(x_addr, offs, valid, X_DT: tl.constexpr):
    """|x|'s float32 bit pattern.  bfloat16 is widened from its raw bits (the high half of
    a float32): exact for subnormals, which a float conversion may flush to 0."""
    if X_DT == tl.bfloat16:
        bits = tl.load(x_addr.to(tl.pointer_type(tl.int16)) + offs, mask=valid, other=0)
        return (bits.to(tl.int32) & 0x7FFF) << 16
    else:
        x = tl.load(x_addr.to(tl.pointer_type(X_DT)) + offs, mask=valid, other=0.0).to(tl.float32)
        return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _histogram_kernel(x_ptrs, hist_ptr, numel_ptr, first_ptr, num_tensors, shift, prefix_shift, prefix,
                      X_DT: tl.constexpr, NUM_BINS: tl.constexpr, LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    key = _abs_key(tl.load(x_ptrs + t), offs, valid, X_DT)
    chosen = valid & ((key >> prefix_shift) == prefix)
    digit = tl.where(chosen, (key >> shift) & (NUM_BINS - 1), 0)
    hist = tl.histogram(digit, NUM_BINS)
    # elements not chosen went to bin 0: take them out again
    rejected = tl.sum((~chosen).to(tl.int32), axis=0)
    bins = tl.arange(0, NUM_BINS)
    hist = hist - tl.where(bins == 0, rejected, 0)
    tl.atomic_add(hist_ptr + bins, hist.to(tl.int64), mask=hist != 0)


@triton.jit
def _count_equal_kernel(x_ptrs, count_ptr, numel_ptr, first_ptr, num_tensors, key, X_DT: tl.constexpr,
                        LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    k = _abs_key(tl.load(x_ptrs + t), offs, valid, X_DT)
    c = tl.sum((valid & (k == key)).to(tl.int64), axis=0)
    tl.atomic_add(count_ptr + t, c)


@triton.jit
def _topk_mask_kernel(w_ptrs, x_ptrs, limit_ptr, numel_ptr, first_ptr, num_tensors, key, X_DT: tl.constexpr,
                      LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    k = _abs_key(tl.load(x_ptrs + t), offs, valid, X_DT)
    limit = tl.load(limit_ptr + t)
    take = valid & ((k > key) | ((k == key) & (offs < limit)))
    words = _pack_words(take, BLOCK)
    widx = (start >> 5) + tl.arange(0, BLOCK // 32).to(tl.int64)
    w = tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32))
    tl.store(w + widx, words, mask=widx < (n + 31) // 32)


@triton.jit
def _transformed(g, t, offs, valid, w_ptrs, p_ptrs, lam, HAS_MASK: tl.constexpr, GEOMETRY: tl.constexpr):
    """m * g (/ (F + lam)) in float32 for the given gradient values g."""
    if GEOMETRY:
        fisher = tl.load(tl.load(p_ptrs + t).to(tl.pointer_type(tl.float32)) + offs, mask=valid, other=0.0)
        g = tl.math.div_rn(g, fisher + lam)
    if HAS_MASK:
        bit = _mask_bits(tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32)), offs, valid)
        g = tl.where(bit, g, 0.0)
    return g


@triton.jit
def _reduce_kernel(g_ptrs, w_ptrs, p_ptrs, r_ptrs, partial_ptr, numel_ptr, first_ptr, num_tensors, lam,
                   G_DT: tl.constexpr, HAS_MASK: tl.constexpr, GEOMETRY: tl.constexpr, RETAIN: tl.constexpr,
                   LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    pid = tl.program_id(0).to(tl.int64)
    g = tl.load(tl.load(g_ptrs + t).to(tl.pointer_type(G_DT)) + offs, mask=valid, other=0.0).to(tl.float32)
    tl.store(partial_ptr + 3 * pid, tl.sum(g * g, axis=0))
    if RETAIN:
        r = tl.load(tl.load(r_ptrs + t).to(tl.pointer_type(G_DT)) + offs, mask=valid, other=0.0).to(tl.float32)
        tg = _transformed(g, t, offs, valid, w_ptrs, p_ptrs, lam, HAS_MASK, GEOMETRY)
        tl.store(partial_ptr + 3 * pid + 1, tl.sum(tg * r, axis=0))
        tl.store(partial_ptr + 3 * pid + 2, tl.sum(r * r, axis=0))
    else:
        tl.store(partial_ptr + 3 * pid + 1, 0.0)
        tl.store(partial_ptr + 3 * pid + 2, 0.0)


@triton.jit
def _apply_kernel(g_ptrs, w_ptrs, p_ptrs, r_ptrs, coef_ptr, numel_ptr, first_ptr, num_tensors, lam,
                  G_DT: tl.constexpr, HAS_MASK: tl.constexpr, GEOMETRY: tl.constexpr, RETAIN: tl.constexpr,
                  LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    gp = tl.load(g_ptrs + t).to(tl.pointer_type(G_DT))
    g = tl.load(gp + offs, mask=valid, other=0.0).to(tl.float32)
    clip = tl.load(coef_ptr)
    out = clip * _transformed(g, t, offs, valid, w_ptrs, p_ptrs, lam, HAS_MASK, GEOMETRY)
    if RETAIN:
        alpha = tl.load(coef_ptr + 1)
        r = tl.load(tl.load(r_ptrs + t).to(tl.pointer_type(G_DT)) + offs, mask=valid, other=0.0).to(tl.float32)
        out = out - alpha * r
    tl.store(gp + offs, out.to(G_DT), mask=valid)


@triton.jit
def _reset_kernel(p_ptrs, o_ptrs, w_ptrs, numel_ptr, first_ptr, num_tensors, BITS_DT: tl.constexpr,
                  LOG_T: tl.constexpr, BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    bit = _mask_bits(tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32)), offs, valid)
    o = tl.load(tl.load(o_ptrs + t).to(tl.pointer_type(BITS_DT)) + offs, mask=valid & ~bit)
    p = tl.load(p_ptrs + t).to(tl.pointer_type(BITS_DT))
    tl.store(p + offs, o, mask=valid & ~bit)  # kept weights are not touched


@triton.jit
def _popcount_kernel(w_ptrs, total_ptr, numel_ptr, first_ptr, num_tensors, LOG_T: tl.constexpr,
                     BLOCK: tl.constexpr):
    t, start, n, offs = _locate(numel_ptr, first_ptr, num_tensors, LOG_T, BLOCK)
    valid = offs < n
    w = tl.load(tl.load(w_ptrs + t).to(tl.pointer_type(tl.int32)) + offs, mask=valid, other=0)
    w = w.to(tl.uint32, bitcast=True)
    w = w - ((w >> 1) & 0x55555555)
    w = (w & 0x33333333) + ((w >> 2) & 0x33333333)
    w = (w + (w >> 4)) & 0x0F0F0F0F
    c = (w * 0x01010101) >> 24
    tl.atomic_add(total_ptr, tl.sum(c.to(tl.int64), axis=0))


# --------------------------------------------------------------------------------------
# Entry points (flat, contiguous tensors on one device; the ops module validated them)
# --------------------------------------------------------------------------------------
def fisher_accumulate(fisher: List[torch.Tensor], grads: List[torch.Tensor], scale: float) -> None:
    if not fisher:
        return
    dev = _device(fisher)
    tab = _Table([f.numel() for f in fisher], dev)
    if tab.num_programs:
        _fisher_kernel[(tab.num_programs,)](_pointers(fisher, dev), _pointers(grads, dev), *tab.args(),
                                            float(scale), G_DT=_tl_dtype(grads), LOG_T=tab.log_t, BLOCK=BLOCK,
                                            num_warps=NUM_WARPS)


def ratio_mask(words, forget, preserve, threshold: float, eps: float) -> None:
    if not forget:
        return
    dev = _device(forget)
    tab = _Table([f.numel() for f in forget], dev)
    if tab.num_programs:
        _ratio_kernel[(tab.num_programs,)](_pointers(words, dev), _pointers(forget, dev), _pointers(preserve, dev),
                                           *tab.args(), float(threshold), float(eps),
                                           LOG_T=tab.log_t, BLOCK=BLOCK, num_warps=NUM_WARPS)


def abs_histogram(scores, shift: int, bits: int, prefix_shift: int, prefix: int) -> torch.Tensor:
    dev = _device(scores)
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=dev)
    tab = _Table([s.numel() for s in scores], dev)
    if tab.num_programs:
        _histogram_kernel[(tab.num_programs,)](_pointers(scores, dev), hist, *tab.args(),
                                               int(shift), int(prefix_shift), int(prefix), X_DT=_tl_dtype(scores),
                                               NUM_BINS=1 << bits, LOG_T=tab.log_t, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return hist


def count_equal(scores, key: int) -> torch.Tensor:
    dev = _device(scores)
    counts = torch.zeros(len(scores), dtype=torch.int64, device=dev)
    tab = _Table([s.numel() for s in scores], dev)
    if tab.num_programs:
        _count_equal_kernel[(tab.num_programs,)](_pointers(scores, dev), counts, *tab.args(), int(key),
                                                 X_DT=_tl_dtype(scores), LOG_T=tab.log_t, BLOCK=BLOCK,
                                                 num_warps=NUM_WARPS)
    return counts


def topk_mask(words, scores, key: int, tie_limits) -> None:
    if not scores:
        return
    dev = _device(scores)
    tab = _Table([s.numel() for s in scores], dev)
    limits = _to_device(torch.tensor([int(x) for x in tie_limits], dtype=torch.int64), dev)
    if tab.num_programs:
        _topk_mask_kernel[(tab.num_programs,)](_pointers(words, dev), _pointers(scores, dev), limits, *tab.args(),
                                               int(key), X_DT=_tl_dtype(scores), LOG_T=tab.log_t, BLOCK=BLOCK,
                                               num_warps=NUM_WARPS)


def _transform_args(grads, words, preserve, retain):
    dev = _device(grads)
    tab = _Table([g.numel() for g in grads], dev)
    gp = _pointers(grads, dev)
    # absent lists: pass the gradient table (never read: the constexpr flags skip them)
    wp = _pointers(words, dev) if words else gp
    pp = _pointers(preserve, dev) if preserve else gp
    rp = _pointers(retain, dev) if retain else gp
    flags = dict(G_DT=_tl_dtype(grads), HAS_MASK=bool(words), GEOMETRY=bool(preserve), RETAIN=bool(retain))
    return dev, tab, gp, wp, pp, rp, flags


def transform_reduce(grads, words, preserve, retain, lam: float) -> torch.Tensor:
    if not grads:
        return torch.zeros(3, dtype=torch.float64)
    dev, tab, gp, wp, pp, rp, flags = _transform_args(grads, words, preserve, retain)
    partial = torch.zeros((max(tab.num_programs, 1), 3), dtype=torch.float32, device=dev)
    if tab.num_programs:
        _reduce_kernel[(tab.num_programs,)](gp, wp, pp, rp, partial, *tab.args(), float(lam),
                                            LOG_T=tab.log_t, BLOCK=BLOCK, num_warps=NUM_WARPS, **flags)
    return partial.to(torch.float64).sum(0)


def transform_apply(grads, words, preserve, retain, lam: float, coef: torch.Tensor) -> None:
    if not grads:
        return
    dev, tab, gp, wp, pp, rp, flags = _transform_args(grads, words, preserve, retain)
    coef = coef.to(device=dev, dtype=torch.float32).contiguous()
    if tab.num_programs:
        _apply_kernel[(tab.num_programs,)](gp, wp, pp, rp, coef, *tab.args(), float(lam),
                                           LOG_T=tab.log_t, BLOCK=BLOCK, num_warps=NUM_WARPS, **flags)


def reset(params, originals, words) -> None:
    if not params:
        return
    dev = _device(params)
    tab = _Table([p.numel() for p in params], dev)
    bits_dt = _TL_BITS[params[0].element_size()]
    if tab.num_programs:
        _reset_kernel[(tab.num_programs,)](_pointers(params, dev), _pointers(originals, dev), _pointers(words, dev),
                                           *tab.args(), BITS_DT=bits_dt, LOG_T=tab.log_t, BLOCK=BLOCK,
                                           num_warps=NUM_WARPS)


def popcount(words) -> torch.Tensor:
    dev = _device(words)
    total = torch.zeros((), dtype=torch.int64, device=dev)
    tab = _Table([w.numel() for w in words], dev)
    if tab.num_programs:
        _popcount_kernel[(tab.num_programs,)](_pointers(words, dev), total, *tab.args(),
                                              LOG_T=tab.log_t, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return total
