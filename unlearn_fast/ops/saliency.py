"""Saliency kernels for MMUnlearner / SalUn / SFR-on: the per-backend primitives and the
eager references.  The public API (FisherAccumulator, BitMask, ratio_mask, topk_mask,
transform_gradients_, ...) lives in ``unlearn_fast.saliency`` and calls these.

Every primitive takes whole tensor lists (one call per device/dtype group):

  fisher_accumulate(fisher!, grads, scale)              F += scale * g^2 (float32 F)
  ratio_mask(words!, forget, preserve, threshold, eps)   bit = (F_f + eps) / (F_p + eps) >= threshold
  abs_histogram(scores, shift, bits, prefix_shift, prefix) -> int64[2^bits]
        histogram of the digit (key >> shift) & (2^bits - 1) over the elements whose
        key >> prefix_shift == prefix, key = float32 bits of |score| (31 bits)
  count_equal(scores, key) -> int64[len(scores)]          elements with key == key, per tensor
  topk_mask(words!, scores, key, tie_limits)              bit = key > K or (key == K and index < tie_limit)
  transform_reduce(grads, words, preserve, retain, lam) -> float64[3]
        [sum g^2, sum t * r, sum r^2] with t = m * g (/ (F_p + lam) when preserve is given)
  transform_apply(grads!, words, preserve, retain, lam, coef)   g <- coef[0] * t - coef[1] * r
  reset(params!, originals, words)                         param <- original where the bit is 0
  popcount(words) -> int64                                 set bits

An empty ``words`` / ``preserve`` / ``retain`` list means "no mask" / "mask mode" / "no
projection".  Masks are int32 tensors of packed bits, ceil(numel / 32) words per tensor,
element i in bit i % 32 of word i // 32 (see ``pack_bits``).

The eager backend implements the primitives with plain per-tensor PyTorch (the distributed
top-k drives them on any backend) and, for the two composite operations, the formulations
the papers' code uses: ``reference_topk_bits`` (torch.cat of |scores| + torch.topk) and
``reference_transform_`` (clip_grad_norm_-style clipping, then per-parameter float masks).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from unlearn_fast import backends
from unlearn_fast.ops._common import cpu_ops, cuda_ops

OP = "saliency"
KEY_BITS = 31  # |x| as float32 bits: the sign bit is always 0
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: coef = max_norm / (total_norm + 1e-6)

Tensors = List[torch.Tensor]


def words_for(numel: int) -> int:
    """Number of int32 words of a packed mask over ``numel`` elements."""
    return (int(numel) + 31) // 32


def _bit_weights(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """Pack a bool/0-1 tensor (any shape, row-major order) into int32 words, little-endian bits."""
    flat = dense.reshape(-1).to(torch.bool)
    n = flat.numel()
    padded = torch.zeros(words_for(n) * 32, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    byte = (padded.view(-1, 8) * _bit_weights(flat.device)).sum(dim=1, dtype=torch.uint8)
    return byte.view(torch.int32)


def unpack_bits(words: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: a flat bool tensor of ``numel`` elements."""
    byte = words.reshape(-1).contiguous().view(torch.uint8)
    bits = (byte.unsqueeze(1) & _bit_weights(words.device)) != 0
    return bits.reshape(-1)[:numel]


def abs_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys ordering |x| (float32 bits with the sign cleared)."""
    return x.reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF


def key_to_float(key: int) -> float:
    return torch.tensor([key], dtype=torch.int32).view(torch.float32).item()


# --------------------------------------------------------------------------------------
# Eager primitives: the straightforward per-parameter loops.
# --------------------------------------------------------------------------------------
def eager_fisher_accumulate(fisher: Tensors, grads: Tensors, scale: float) -> None:
    for f, g in zip(fisher, grads):
        f.add_(g.to(f.dtype).reshape(f.shape) ** 2 * scale)


def eager_ratio_dense(forget: torch.Tensor, preserve: torch.Tensor, threshold: float, eps: float) -> torch.Tensor:
    """MMUnlearner's saliency map as its code computes it: a float ratio, compared."""
    return (forget + eps) / (preserve + eps) >= threshold


def eager_ratio_mask(words: Tensors, forget: Tensors, preserve: Tensors, threshold: float, eps: float) -> None:
    for w, ff, fp in zip(words, forget, preserve):
        w.copy_(pack_bits(eager_ratio_dense(ff, fp, threshold, eps)))


def eager_abs_histogram(scores: Tensors, shift: int, bits: int, prefix_shift: int, prefix: int) -> torch.Tensor:
    hist = torch.zeros(1 << bits, dtype=torch.long, device=scores[0].device if scores else "cpu")
    for s in scores:
        k = abs_keys(s)
        if prefix_shift < KEY_BITS:
            k = k[(k >> prefix_shift) == prefix]
        hist += torch.bincount((k >> shift) & ((1 << bits) - 1), minlength=1 << bits)
    return hist


def eager_count_equal(scores: Tensors, key: int) -> torch.Tensor:
    if not scores:
        return torch.zeros(0, dtype=torch.long)
    return torch.stack([(abs_keys(s) == key).sum() for s in scores])


def eager_topk_mask(words: Tensors, scores: Tensors, key: int, tie_limits: Sequence[int]) -> None:
    for w, s, lim in zip(words, scores, tie_limits):
        k = abs_keys(s)
        idx = torch.arange(k.numel(), device=k.device)
        w.copy_(pack_bits((k > key) | ((k == key) & (idx < lim))))


def eager_reset(params: Tensors, originals: Tensors, words: Tensors) -> None:
    for p, o, w in zip(params, originals, words):
        keep = unpack_bits(w, p.numel()).view(p.shape)
        p.copy_(torch.where(keep, p, o))


_POPCOUNT_LUT = None


def eager_popcount(words: Tensors) -> torch.Tensor:
    global _POPCOUNT_LUT
    if _POPCOUNT_LUT is None:
        _POPCOUNT_LUT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)
    total = torch.zeros((), dtype=torch.long, device=words[0].device if words else "cpu")
    for w in words:
        lut = _POPCOUNT_LUT.to(w.device)
        byte = w.reshape(-1).view(torch.uint8)
        for i in range(0, byte.numel(), 1 << 24):  # bounded temporaries
            total += lut[byte[i:i + (1 << 24)].long()].sum(dtype=torch.long)
    return total


# --------------------------------------------------------------------------------------
# Eager references of the composite operations (benchmark baselines, test oracles).
# --------------------------------------------------------------------------------------
def reference_topk_bits(scores: Tensors, k: int) -> Tensors:
    """SalUn's global top-k as its code does it: concatenate |scores|, torch.topk for the
    k-th largest value, then our tie rule (ties at the threshold kept in list order) with
    a cumulative count over the concatenation.  Returns flat bool tensors.

    The values compared are ``abs_keys`` (|x|'s float32 bit patterns), which order every
    number as |x| does and put NaN above +inf, as the fused kernels do; comparing floats
    would drop a NaN that torch.topk had kept (NaN > kth and NaN == kth are both false)."""
    keys = torch.cat([abs_keys(s) for s in scores]) if scores else torch.zeros(0, dtype=torch.int32)
    n = keys.numel()
    if k <= 0 or n == 0:
        keep = torch.zeros(n, dtype=torch.bool, device=keys.device)
    elif k >= n:
        keep = torch.ones(n, dtype=torch.bool, device=keys.device)
    else:
        kth = torch.topk(keys, k, sorted=False).values.min()
        greater = keys > kth
        ties = keys == kth
        need = k - int(greater.sum())
        keep = greater | (ties & (torch.cumsum(ties, 0) <= need))
    out, start = [], 0
    for s in scores:
        out.append(keep[start:start + s.numel()])
        start += s.numel()
    return out


def reference_transform_(grads: Tensors, dense_masks: Optional[Sequence[torch.Tensor]],
                         preserve: Optional[Tensors], lam: float, retain: Optional[Tensors],
                         max_norm: Optional[float], total_norm: Optional[float] = None):
    """The papers' per-parameter code: clip by the global norm (torch's clip_grad_norm_
    formula, in the gradients' dtype; ``total_norm``, when given, is that norm: the grads
    are one rank's shards), zero each gradient where its mask is 0, divide by
    (F_p + lam) for the geometry mode, then subtract the projection onto the retain
    gradient.  In place; returns (total_norm, clip_coef, proj_coef) as tensors or None."""
    total = clip = proj = None
    if max_norm is not None:
        if total_norm is not None:
            total = torch.tensor(total_norm, dtype=torch.float64, device=grads[0].device)
        else:
            norms = [torch.linalg.vector_norm(g, 2) for g in grads]
            total = torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.zeros(())
        clip = torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)
        for g in grads:
            g.mul_(clip.to(g.dtype))
    for i, g in enumerate(grads):
        if dense_masks is not None:  # a select, as the kernels do: masked-out inf / NaN become 0
            g.masked_fill_(dense_masks[i].view(g.shape) == 0, 0)
        if preserve is not None:
            g.div_((preserve[i].view(g.shape) + lam).to(g.dtype))
    if retain is not None:
        # per-tensor dot products in the gradients' dtype, summed as float32 scalars
        # (float64 for float64 input, the oracle)
        acc = lambda t: t.to(torch.promote_types(t.dtype, torch.float32))  # noqa: E731
        dot = torch.stack([acc((g * r.view(g.shape)).sum()) for g, r in zip(grads, retain)]).sum()
        rr = torch.stack([acc((r * r).sum()) for r in retain]).sum()
        proj = dot / rr if float(rr) > 0 else torch.zeros((), dtype=rr.dtype)
        for g, r in zip(grads, retain):
            g.sub_(r.view(g.shape) * proj.to(g.dtype))
    return total, clip, proj


# --------------------------------------------------------------------------------------
# Backend kernel sets
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SaliencyKernels:
    fisher_accumulate: Callable
    ratio_mask: Callable
    abs_histogram: Callable
    count_equal: Callable
    topk_mask: Callable
    transform_reduce: Optional[Callable]
    transform_apply: Optional[Callable]
    reset: Callable
    popcount: Callable


def _native(ns_getter, name: str) -> Callable:
    return lambda *a: getattr(ns_getter(), f"saliency_{name}")(*a)


def _triton_fn(name: str) -> Callable:
    def call(*a):
        from unlearn_fast.triton import saliency as mod  # lazily: triton is optional

        return getattr(mod, name)(*a)

    return call


_PRIMITIVES = ("fisher_accumulate", "ratio_mask", "abs_histogram", "count_equal", "topk_mask", "transform_reduce",
               "transform_apply", "reset", "popcount")

backends.register(OP, "eager")(SaliencyKernels(
    fisher_accumulate=eager_fisher_accumulate, ratio_mask=eager_ratio_mask, abs_histogram=eager_abs_histogram,
    count_equal=eager_count_equal, topk_mask=eager_topk_mask, transform_reduce=None, transform_apply=None,
    reset=eager_reset, popcount=eager_popcount))
backends.register(OP, "cpp")(SaliencyKernels(**{p: _native(cpu_ops, p) for p in _PRIMITIVES}))
backends.register(OP, "cuda")(SaliencyKernels(**{p: _native(cuda_ops, p) for p in _PRIMITIVES}))
backends.register(OP, "triton")(SaliencyKernels(**{p: _triton_fn(p) for p in _PRIMITIVES}))


# --------------------------------------------------------------------------------------
# Custom ops for the fused backends (backend name as an argument), with fake kernels so
# torch.compile(fullgraph=True) traces through them.
# --------------------------------------------------------------------------------------
def _kernels(backend: str) -> SaliencyKernels:
    return backends.implementations(OP)[backend]


@torch.library.custom_op("unlearn_fast::saliency_fisher_accumulate", mutates_args=("fisher",))
def fisher_accumulate_op(fisher: List[torch.Tensor], grads: List[torch.Tensor], scale: float, backend: str) -> None:
    _kernels(backend).fisher_accumulate(fisher, grads, scale)


@fisher_accumulate_op.register_fake
def _(fisher, grads, scale, backend):
    return None


@torch.library.custom_op("unlearn_fast::saliency_ratio_mask", mutates_args=("words",))
def ratio_mask_op(words: List[torch.Tensor], forget: List[torch.Tensor], preserve: List[torch.Tensor],
                  threshold: float, eps: float, backend: str) -> None:
    _kernels(backend).ratio_mask(words, forget, preserve, threshold, eps)


@ratio_mask_op.register_fake
def _(words, forget, preserve, threshold, eps, backend):
    return None


@torch.library.custom_op("unlearn_fast::saliency_abs_histogram", mutates_args=())
def abs_histogram_op(scores: List[torch.Tensor], shift: int, bits: int, prefix_shift: int, prefix: int,
                     backend: str) -> torch.Tensor:
    return _kernels(backend).abs_histogram(scores, shift, bits, prefix_shift, prefix)


@abs_histogram_op.register_fake
def _(scores, shift, bits, prefix_shift, prefix, backend):
    return scores[0].new_empty((1 << bits,), dtype=torch.long)


@torch.library.custom_op("unlearn_fast::saliency_count_equal", mutates_args=())
def count_equal_op(scores: List[torch.Tensor], key: int, backend: str) -> torch.Tensor:
    return _kernels(backend).count_equal(scores, key)


@count_equal_op.register_fake
def _(scores, key, backend):
    return scores[0].new_empty((len(scores),), dtype=torch.long)


@torch.library.custom_op("unlearn_fast::saliency_topk_mask", mutates_args=("words",))
def topk_mask_op(words: List[torch.Tensor], scores: List[torch.Tensor], key: int, tie_limits: List[int],
                 backend: str) -> None:
    _kernels(backend).topk_mask(words, scores, key, tie_limits)


@topk_mask_op.register_fake
def _(words, scores, key, tie_limits, backend):
    return None


@torch.library.custom_op("unlearn_fast::saliency_transform_reduce", mutates_args=())
def transform_reduce_op(grads: List[torch.Tensor], words: List[torch.Tensor], preserve: List[torch.Tensor],
                        retain: List[torch.Tensor], lam: float, backend: str) -> torch.Tensor:
    return _kernels(backend).transform_reduce(grads, words, preserve, retain, lam)


@transform_reduce_op.register_fake
def _(grads, words, preserve, retain, lam, backend):
    return grads[0].new_empty((3,), dtype=torch.float64)


@torch.library.custom_op("unlearn_fast::saliency_transform_apply", mutates_args=("grads",))
def transform_apply_op(grads: List[torch.Tensor], words: List[torch.Tensor], preserve: List[torch.Tensor],
                       retain: List[torch.Tensor], lam: float, coef: torch.Tensor, backend: str) -> None:
    _kernels(backend).transform_apply(grads, words, preserve, retain, lam, coef)


@transform_apply_op.register_fake
def _(grads, words, preserve, retain, lam, coef, backend):
    return None


@torch.library.custom_op("unlearn_fast::saliency_reset", mutates_args=("params",))
def reset_op(params: List[torch.Tensor], originals: List[torch.Tensor], words: List[torch.Tensor],
             backend: str) -> None:
    _kernels(backend).reset(params, originals, words)


@reset_op.register_fake
def _(params, originals, words, backend):
    return None


@torch.library.custom_op("unlearn_fast::saliency_popcount", mutates_args=())
def popcount_op(words: List[torch.Tensor], backend: str) -> torch.Tensor:
    return _kernels(backend).popcount(words)


@popcount_op.register_fake
def _(words, backend):
    return words[0].new_empty((), dtype=torch.long)


class _EagerOps:
    """The primitives for the eager backend, with the custom ops' signatures."""

    fisher_accumulate = staticmethod(eager_fisher_accumulate)
    ratio_mask = staticmethod(eager_ratio_mask)
    abs_histogram = staticmethod(eager_abs_histogram)
    count_equal = staticmethod(eager_count_equal)
    topk_mask = staticmethod(eager_topk_mask)
    reset = staticmethod(eager_reset)
    popcount = staticmethod(eager_popcount)


class _FusedOps:
    """The primitives of one fused backend, through the custom ops."""

    def __init__(self, backend: str):
        self.backend = backend

    def fisher_accumulate(self, fisher, grads, scale):
        fisher_accumulate_op(fisher, grads, float(scale), self.backend)

    def ratio_mask(self, words, forget, preserve, threshold, eps):
        ratio_mask_op(words, forget, preserve, float(threshold), float(eps), self.backend)

    def abs_histogram(self, scores, shift, bits, prefix_shift, prefix):
        return abs_histogram_op(scores, shift, bits, prefix_shift, prefix, self.backend)

    def count_equal(self, scores, key):
        return count_equal_op(scores, key, self.backend)

    def topk_mask(self, words, scores, key, tie_limits):
        topk_mask_op(words, scores, key, [int(t) for t in tie_limits], self.backend)

    def transform_reduce(self, grads, words, preserve, retain, lam):
        return transform_reduce_op(grads, words, preserve, retain, float(lam), self.backend)

    def transform_apply(self, grads, words, preserve, retain, lam, coef):
        transform_apply_op(grads, words, preserve, retain, float(lam), coef, self.backend)

    def reset(self, params, originals, words):
        reset_op(params, originals, words, self.backend)

    def popcount(self, words):
        return popcount_op(words, self.backend)


def ops_for(backend_name: str):
    """The primitives of a resolved backend name (eager: plain PyTorch; else custom ops)."""
    return _EagerOps if backend_name == "eager" else _FusedOps(backend_name)
