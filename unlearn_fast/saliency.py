"""Weight saliency for unlearning: Fisher accumulation, saliency masks, exact global
top-k, fused gradient transforms and the SalUn weight reset, over lists of parameters of
any sizes and dtypes.

* ``FisherAccumulator``: diagonal Fisher F += scale * g^2 over a parameter list, float32
  state on the parameters' devices, one fused launch per (device, dtype) group.
* ``ratio_mask``: MMUnlearner's saliency map m = 1[(F_f + eps) / (F_p + eps) >= tau].
* ``topk_mask`` / ``topk_mask_distributed``: SalUn's global top-fraction by |score|
  across every listed tensor, by radix selection over the float bit patterns (no
  concatenation, no sort, no 2^24 limit); the distributed variant all-reduces the
  histograms and gives the single-process answer over the ranks' lists in rank order.
* ``BitMask``: the packed result, 1 bit per weight (1/32 of a float mask), with
  ``count()``, ``to_dense()``, ``save(path)`` / ``BitMask.load(path)`` (safetensors).
* ``transform_gradients_``: in place on the gradient list: clip by the global norm, then
  g <- m * g ("mask") or g <- m * g / (F_p + lam) ("geometry", SFR-on), then optionally
  remove the component along a retain gradient; two passes over the data at most.
* ``reset_unmasked_`` (alias ``salun_reset_``): theta <- m * theta + (1 - m) * theta_orig.
* ``select_parameters`` / ``mmunlearner_mask`` / ``mmunlearner_preserve_fisher``: the
  per-module choice by name patterns (vision vs language preserve Fishers), built for
  whatever parameters are trainable (LoRA-aware); a pattern that matches no trainable
  parameter raises an error naming it.

Tensor lists may be given as mappings name -> tensor (e.g. ``dict(model.named_parameters())``).
Two mappings, or a mapping and a named ``BitMask``, are matched by name, never by position,
and must hold the same names; plain lists are matched by position.

Backends ("auto", "eager", "cpp", "triton", "cuda") dispatch through
``unlearn_fast.backends``; "eager" is the papers' per-parameter code (and torch.cat +
torch.topk for the top-k), the baseline and the test oracle.  float64 inputs run on the
eager backend.
"""
from __future__ import annotations

import json
import math
import re
from typing import Callable, Dict, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from unlearn_fast import backends
from unlearn_fast.ops import saliency as K
from unlearn_fast.ops._validation import FLOAT_DTYPES

__all__ = [
    "BitMask", "FisherAccumulator", "ratio_mask", "topk_mask", "topk_mask_distributed", "topk_threshold",
    "TopKSelection", "transform_gradients_", "GradientTransform", "reset_unmasked_", "salun_reset_",
    "select_parameters", "mmunlearner_mask", "mmunlearner_preserve_fisher",
]

FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("mask", "geometry")
FORMAT = "unlearn_fast.bitmask"
FORMAT_VERSION = "1"
# Radix digits of the 31-bit key, most significant first: (shift, bits).
DIGITS = ((20, 11), (9, 11), (0, 9))
# bfloat16 / float16 widen to float32 with at least this many trailing zero bits.
HALF_ZERO_BITS = 13
TIE_SEARCH_CHUNK = 1 << 16

Named = Sequence[Tuple[str, torch.Tensor]]


# --------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------
def _tensor_list(x, name: str, *, allow_none: bool = False) -> List[Optional[torch.Tensor]]:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors (one per parameter), got a single tensor")
    if isinstance(x, Mapping):
        x = list(x.values())
    try:
        out = list(x)
    except TypeError as exc:
        raise TypeError(f"{name} must be a list of tensors, got {type(x).__name__}") from exc
    for i, t in enumerate(out):
        if t is None and allow_none:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}[{i}] must be floating point (float32/bfloat16/float16/float64), got {t.dtype}")
    return out


def _mapping_names(x) -> Optional[List[str]]:
    return [str(k) for k in x.keys()] if isinstance(x, Mapping) else None


def _in_order(x, names: Optional[Sequence[str]], name: str, ref_name: str):
    """``x`` itself, or, when ``x`` is a mapping name -> tensor, its tensors in the order
    of ``names`` (the names of ``ref_name``'s tensors): two mappings are matched by name,
    never by position, and their keys must be the same."""
    if not isinstance(x, Mapping):
        return x
    if names is None:
        raise ValueError(f"{name} is a mapping name -> tensor but {ref_name} is an unnamed list; pass both as "
                         f"mappings (matched by name) or both as lists (matched by position)")
    _check_same_names([str(k) for k in x.keys()], names, f"{name}'s", ref_name)
    by_key = {str(k): v for k, v in x.items()}
    return [by_key[n] for n in names]


def _check_same_names(got: Sequence[str], want: Sequence[str], what: str, ref_name: str) -> None:
    if sorted(got) != sorted(want):
        missing = [n for n in want if n not in set(got)]
        extra = [n for n in got if n not in set(want)]
        raise ValueError(f"{what} names differ from {ref_name}'s: missing {missing[:5]}, not in {ref_name} "
                         f"{extra[:5]}")


def _check_aligned(ref: Sequence[torch.Tensor], other: Sequence[Optional[torch.Tensor]], ref_name: str, name: str,
                   labels: Optional[Sequence[str]] = None) -> None:
    if len(other) != len(ref):
        raise ValueError(f"{name} has {len(other)} tensors but {ref_name} has {len(ref)}; they must correspond")
    for i, (a, b) in enumerate(zip(ref, other)):
        if b is None or a is None:
            continue
        where = f"[{i}]" + (f" ({labels[i]})" if labels else "")
        if a.shape != b.shape:
            raise ValueError(f"{name}{where} has shape {tuple(b.shape)} but {ref_name}{where} has shape "
                             f"{tuple(a.shape)}")
        if a.device != b.device:
            raise ValueError(f"{name}{where} is on {b.device} but {ref_name}{where} is on {a.device}")


def _check_number(value, name: str, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return v


def _check_backend_name(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")


def _resolve(backend: str, device: torch.device, dtypes: Iterable[torch.dtype]) -> str:
    """Backend for one device; float64 runs on the eager backend only."""
    _check_backend_name(backend)
    name = backends.resolve(K.OP, backend, device)
    if name != "eager" and any(d not in FAST_DTYPES for d in dtypes):
        if backend != "auto":
            raise TypeError(f"backend {backend!r} runs float32/bfloat16/float16 tensors; float64 runs on 'eager'")
        name = "eager"
    return name


def _groups(tensors: Sequence[Optional[torch.Tensor]]) -> Dict[Tuple[torch.device, torch.dtype], List[int]]:
    """Indices of the non-empty tensors grouped by (device, dtype): one launch per group."""
    out: Dict[Tuple[torch.device, torch.dtype], List[int]] = {}
    for i, t in enumerate(tensors):
        if t is None or t.numel() == 0:
            continue
        out.setdefault((t.device, t.dtype), []).append(i)
    return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of a contiguous tensor (a contiguous copy otherwise: read-only uses)."""
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def _named(params, name: str) -> Tuple[List[str], List[torch.Tensor]]:
    """Names and tensors from a module (trainable parameters), a mapping, (name, tensor)
    pairs, or plain tensors (names "0", "1", ...)."""
    if isinstance(params, torch.nn.Module):
        pairs = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    elif isinstance(params, Mapping):
        pairs = list(params.items())
    else:
        if isinstance(params, torch.Tensor):
            raise TypeError(f"{name} must be a list of tensors or (name, tensor) pairs, got a single tensor")
        try:
            items = list(params)
        except TypeError as exc:
            raise TypeError(f"{name} must be a module, a mapping, or a list of tensors / (name, tensor) "
                            f"pairs, got {type(params).__name__}") from exc
        if items and all(isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items):
            pairs = items
        else:
            pairs = [(str(i), t) for i, t in enumerate(items)]
    names = [n for n, _ in pairs]
    tensors = [t for _, t in pairs]
    for n, t in pairs:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: entry {n!r} is a {type(t).__name__}, not a tensor")
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: parameter names must be unique")
    return names, tensors


# --------------------------------------------------------------------------------------
# BitMask
# --------------------------------------------------------------------------------------
class BitMask:
    """A packed boolean mask over a list of tensors: 1 bit per element.

    Tensor i's bits are ``words[i]``, an int32 tensor of ceil(numel / 32) words on that
    tensor's device; element j (row-major) is bit j % 32 of word j // 32, little-endian,
    so ``words[i].view(torch.uint8)`` is ``numpy.packbits(dense, bitorder="little")``.
    Bits past the end are 0.  Words of tensors on one device share one buffer.

    ``meta`` records how the mask was built (e.g. the top-k threshold); ``names`` are
    parameter names (when known) and travel with ``save`` / ``load``.
    """

    def __init__(self, words: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]],
                 names: Optional[Sequence[str]] = None, meta: Optional[dict] = None):
        words, shapes = list(words), [torch.Size(s) for s in shapes]
        if len(words) != len(shapes):
            raise ValueError(f"BitMask: {len(words)} word tensors for {len(shapes)} shapes")
        for i, (w, s) in enumerate(zip(words, shapes)):
            if not isinstance(w, torch.Tensor) or w.dtype != torch.int32 or w.dim() != 1:
                raise TypeError(f"BitMask: words[{i}] must be a 1-D int32 tensor")
            if w.numel() != K.words_for(s.numel()):
                raise ValueError(f"BitMask: words[{i}] has {w.numel()} words, shape {tuple(s)} needs "
                                 f"{K.words_for(s.numel())}")
        if names is not None:
            names = [str(n) for n in names]
            if len(names) != len(shapes):
                raise ValueError(f"BitMask: {len(names)} names for {len(shapes)} tensors")
            if len(set(names)) != len(names):
                raise ValueError("BitMask: names must be unique")
        self.words: List[torch.Tensor] = words
        self.shapes: List[torch.Size] = shapes
        self.names: Optional[List[str]] = names
        self.meta: dict = dict(meta or {})

    # ---- construction
    @classmethod
    def zeros(cls, shapes: Sequence[Sequence[int]], devices: Sequence[Union[str, torch.device]],
              names: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> "BitMask":
        """An all-zero mask; the words of each device live in one buffer."""
        shapes = [torch.Size(s) for s in shapes]
        devices = [torch.device(d) for d in devices]
        counts = [K.words_for(s.numel()) for s in shapes]
        totals: Dict[torch.device, int] = {}
        for d, c in zip(devices, counts):
            totals[d] = totals.get(d, 0) + c
        buffers = {d: torch.zeros(n, dtype=torch.int32, device=d) for d, n in totals.items()}
        offsets = {d: 0 for d in totals}
        words = []
        for d, c in zip(devices, counts):
            words.append(buffers[d].narrow(0, offsets[d], c))
            offsets[d] += c
        return cls(words, shapes, names, meta)

    @classmethod
    def like(cls, tensors: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None,
             meta: Optional[dict] = None) -> "BitMask":
        return cls.zeros([t.shape for t in tensors], [t.device for t in tensors], names, meta)

    @classmethod
    def from_dense(cls, masks: Sequence[torch.Tensor], names: Optional[Sequence[str]] = None) -> "BitMask":
        """Pack bool (or 0/1) tensors."""
        masks = list(masks)
        for i, m in enumerate(masks):
            if not isinstance(m, torch.Tensor):
                raise TypeError(f"masks[{i}] must be a tensor, got {type(m).__name__}")
        out = cls.like(masks, names)
        for w, m in zip(out.words, masks):
            if m.numel():
                w.copy_(K.pack_bits(m != 0))
        return out

    # ---- queries
    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def numels(self) -> List[int]:
        return [s.numel() for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * 4 for w in self.words)

    @property
    def devices(self) -> List[torch.device]:
        return [w.device for w in self.words]

    def count(self, backend: str = "auto") -> int:
        """Number of set bits (one host read)."""
        total = 0
        for (dev, _), idx in _groups(self.words).items():
            ops = K.ops_for(_resolve(backend, dev, ()))
            total += int(ops.popcount([self.words[i] for i in idx]))
        return total

    def to_dense(self) -> List[torch.Tensor]:
        """Bool tensors shaped like the masked tensors (on the words' devices)."""
        return [K.unpack_bits(w, s.numel()).view(s) for w, s in zip(self.words, self.shapes)]

    def to(self, device: Union[str, torch.device]) -> "BitMask":
        out = BitMask.zeros(self.shapes, [device] * len(self), self.names, self.meta)
        for dst, src in zip(out.words, self.words):
            dst.copy_(src)
        return out

    def select(self, names: Sequence[str]) -> "BitMask":
        """The masks of ``names`` in that order (views), e.g. to match a model's trainable
        parameters after loading; raises if a name is missing."""
        if self.names is None:
            raise ValueError("this BitMask has no parameter names; build it with names= to select by name")
        where = {n: i for i, n in enumerate(self.names)}
        missing = [n for n in names if n not in where]
        if missing:
            raise KeyError(f"BitMask has no mask for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        idx = [where[n] for n in names]
        return BitMask([self.words[i] for i in idx], [self.shapes[i] for i in idx], list(names), self.meta)

    def __repr__(self) -> str:
        return (f"BitMask({len(self)} tensors, {self.numel} elements, {self.nbytes / 2**20:.2f} MiB packed"
                f"{', ' + json.dumps(self.meta) if self.meta else ''})")

    # ---- files
    def save(self, path) -> None:
        """Write a safetensors file: one int32 tensor "words" (every tensor's words in
        order) and metadata (format, bit order, names, shapes, word offsets, meta).
        No pickle."""
        from safetensors.torch import save_file

        offsets, start = [], 0
        for w in self.words:
            offsets.append(start)
            start += w.numel()
        flat = torch.cat([w.detach().to("cpu") for w in self.words] + [torch.zeros(0, dtype=torch.int32)])
        names = self.names if self.names is not None else [str(i) for i in range(len(self))]
        metadata = {
            "format": FORMAT, "version": FORMAT_VERSION, "bit_order": "little",
            "names": json.dumps(names), "shapes": json.dumps([list(s) for s in self.shapes]),
            "word_offsets": json.dumps(offsets), "meta": json.dumps(self.meta),
            "has_names": "1" if self.names is not None else "0",
        }
        save_file({"words": flat.contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, device: Union[str, torch.device] = "cpu") -> "BitMask":
        """Read a file written by ``save``; the words are put on ``device``."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            md = f.metadata() or {}
            if md.get("format") != FORMAT:
                raise ValueError(f"{path}: not a BitMask file (format {md.get('format')!r})")
            if md.get("version") != FORMAT_VERSION:
                raise ValueError(f"{path}: unsupported BitMask version {md.get('version')!r}")
            flat = f.get_tensor("words")
        try:
            names = json.loads(md["names"])
            shapes = json.loads(md["shapes"])
            offsets = json.loads(md["word_offsets"])
            meta = json.loads(md.get("meta", "{}"))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: malformed BitMask metadata ({exc})") from exc

        def is_count(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        # Everything is checked before anything is allocated: a file is user input.
        well_formed = (isinstance(names, list) and all(isinstance(n, str) for n in names)
                       and isinstance(shapes, list) and all(isinstance(s, list) and all(is_count(d) for d in s)
                                                            for s in shapes)
                       and isinstance(offsets, list) and all(is_count(o) for o in offsets)
                       and isinstance(meta, dict) and flat.dtype == torch.int32 and flat.dim() == 1
                       and len(shapes) == len(names) == len(offsets))
        if not well_formed:
            raise ValueError(f"{path}: malformed BitMask file")
        needed = [K.words_for(math.prod(s)) for s in shapes]
        for i, (off, n) in enumerate(zip(offsets, needed)):
            if off + n > flat.numel():
                raise ValueError(f"{path}: words of tensor {i} ({names[i]}) lie outside the payload")
        if sum(needed) != flat.numel():
            raise ValueError(f"{path}: the payload has {flat.numel()} words but the shapes need {sum(needed)}")
        shapes = [torch.Size(s) for s in shapes]
        out = cls.zeros(shapes, [device] * len(shapes), names if md.get("has_names") == "1" else None, meta)
        for i, (w, off) in enumerate(zip(out.words, offsets)):
            src = flat[off:off + w.numel()]
            tail = shapes[i].numel() % 32
            if src.numel() and tail and int(src[-1]) & ~((1 << tail) - 1) & 0xFFFFFFFF:
                raise ValueError(f"{path}: tensor {i} ({names[i]}) has bits set past its end")
            w.copy_(src)
        return out


def _mask_words(mask, ref: Sequence[torch.Tensor], ref_name: str, names: Optional[Sequence[str]] = None
                ) -> Optional[List[torch.Tensor]]:
    """The per-tensor words of ``mask`` (a BitMask, or bool tensors as a list or a mapping),
    checked against ``ref``'s shapes and devices.  Where ``ref``'s tensors are named
    (``names``) and the mask is too, they are matched by name."""
    if mask is None:
        return None
    if isinstance(mask, BitMask):
        if names is not None and mask.names is not None and list(mask.names) != list(names):
            _check_same_names(mask.names, names, "the mask's parameter", ref_name)
            mask = mask.select(names)
    else:
        if isinstance(mask, torch.Tensor):
            raise TypeError("mask must be a BitMask or a list of bool tensors, got a single tensor")
        mask = _in_order(mask, names, "mask", ref_name)
        try:
            mask = BitMask.from_dense(list(mask))
        except TypeError as exc:
            raise TypeError(f"mask must be a BitMask or a list of bool tensors ({exc})") from exc
    if len(mask) != len(ref):
        raise ValueError(f"mask covers {len(mask)} tensors but {ref_name} has {len(ref)}; they must correspond")
    for i, (s, t, w) in enumerate(zip(mask.shapes, ref, mask.words)):
        if s != t.shape:
            label = f" ({mask.names[i]})" if mask.names else ""
            raise ValueError(f"mask[{i}]{label} has shape {tuple(s)} but {ref_name}[{i}] has shape {tuple(t.shape)}")
        if w.device != t.device:
            raise ValueError(f"mask[{i}] is on {w.device} but {ref_name}[{i}] is on {t.device}")
    return mask.words


# --------------------------------------------------------------------------------------
# Fisher accumulation
# --------------------------------------------------------------------------------------
class FisherAccumulator:
    """Diagonal Fisher information of a parameter list: ``accumulate`` adds scale * g^2
    to a float32 state on each parameter's device (one fused launch per device/dtype
    group of the gradients), ``mean()`` divides by the number of accumulated batches
    (MMUnlearner's F = mean over batches of (dL/dw)^2).

    Args:
        params: a module (its trainable parameters), a mapping name -> tensor, (name,
            tensor) pairs (e.g. ``model.named_parameters()`` filtered to the trainable
            ones), or plain tensors.  With LoRA pass what is trainable.
        backend: "auto", "eager", "cpp", "triton", "cuda".
        dtype: float32 (default) or float64 (eager only; for tests).
    """

    def __init__(self, params, *, backend: str = "auto", dtype: torch.dtype = torch.float32):
        self.names, self.params = _named(params, "params")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        _check_backend_name(backend)
        self.backend = backend
        self.fisher: List[torch.Tensor] = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in self.params]
        self.num_batches = 0

    def accumulate(self, grads: Optional[Sequence[Optional[torch.Tensor]]] = None, scale: float = 1.0
                   ) -> "FisherAccumulator":
        """F += scale * g^2.  ``grads`` defaults to each parameter's ``.grad``; a None entry
        (a parameter the loss did not reach) adds nothing.  Gradients keep their dtype
        (float32 / bfloat16 / float16); the sum is formed in float32."""
        scale = _check_number(scale, "scale")
        if grads is None:
            grads = [p.grad for p in self.params]
        grads = _tensor_list(_in_order(grads, self.names, "grads", "params"), "grads", allow_none=True)
        _check_aligned(self.fisher, grads, "params", "grads", self.names)
        with torch.no_grad():
            for (dev, dt), idx in _groups(grads).items():
                name = _resolve(self.backend, dev, (dt, self.fisher[idx[0]].dtype))
                ops = K.ops_for(name)
                if name == "eager":
                    ops.fisher_accumulate([self.fisher[i] for i in idx], [grads[i] for i in idx], scale)
                else:
                    ops.fisher_accumulate([self.fisher[i].view(-1) for i in idx], [_flat(grads[i]) for i in idx],
                                          scale)
        self.num_batches += 1
        return self

    def mean(self) -> List[torch.Tensor]:
        """The accumulated sum divided by the number of ``accumulate`` calls (new tensors)."""
        if self.num_batches == 0:
            raise RuntimeError("FisherAccumulator.mean(): nothing accumulated yet")
        return [f / self.num_batches for f in self.fisher]

    def as_dict(self, mean: bool = True) -> Dict[str, torch.Tensor]:
        return dict(zip(self.names, self.mean() if mean else self.fisher))

    def reset(self) -> None:
        for f in self.fisher:
            f.zero_()
        self.num_batches = 0


# --------------------------------------------------------------------------------------
# MMUnlearner's ratio mask
# --------------------------------------------------------------------------------------
def ratio_mask(forget_fisher, preserve_fisher, threshold: float = 1.0, eps: float = 1e-15, *,
               names: Optional[Sequence[str]] = None, backend: str = "auto") -> BitMask:
    """m = 1[(F_f + eps) / (F_p + eps) >= threshold], packed (1 bit per weight).

    The ratio is formed in float32 with the same roundings as the eager formula, so the
    bits equal it exactly (float64 Fishers run on the eager backend in float64).  Note the
    paper's convention: with threshold 1, a weight with F_f = F_p = 0 is selected.
    Fishers that are not float32 (bfloat16 / float16) are converted first.
    """
    if names is None:
        names = _mapping_names(forget_fisher)
    ff = _tensor_list(_in_order(forget_fisher, names, "forget_fisher", "names"), "forget_fisher")
    fp = _tensor_list(_in_order(preserve_fisher, names, "preserve_fisher", "forget_fisher"), "preserve_fisher")
    _check_aligned(ff, fp, "forget_fisher", "preserve_fisher", names)
    threshold = _check_number(threshold, "threshold")
    eps = _check_number(eps, "eps", nonneg=True)
    out = BitMask.like(ff, names, {"kind": "ratio", "threshold": threshold, "eps": eps})
    for (dev, _), idx in _groups(ff).items():
        dts = {ff[i].dtype for i in idx} | {fp[i].dtype for i in idx}
        name = _resolve(backend, dev, dts)
        ops = K.ops_for(name)
        words = [out.words[i] for i in idx]
        if name == "eager":
            wide = torch.float64 if torch.float64 in dts else torch.float32
            ops.ratio_mask(words, [ff[i].to(wide) for i in idx], [fp[i].to(wide) for i in idx], threshold, eps)
        else:
            as32 = lambda t: _flat(t.to(torch.float32))  # noqa: E731  (no copy for float32)
            ops.ratio_mask(words, [as32(ff[i]) for i in idx], [as32(fp[i]) for i in idx], threshold, eps)
    return out


# --------------------------------------------------------------------------------------
# Global top-k by |score|
# --------------------------------------------------------------------------------------
class TopKSelection(NamedTuple):
    """The exact k-th largest |score| and how the ties at it are split.

    threshold: the k-th largest |score| as a float (+inf when k = 0).
    key: its float32 bit pattern (the value the kernels compare).
    k, total: kept and total element counts.
    greater: elements with |score| > threshold (all kept).
    ties: elements with |score| == threshold; ties_kept of them are kept, the first ones
        in list order (tensor order, then row-major element order; across ranks, rank
        order first).
    tie_limits: per local tensor, ties at element index < limit are kept.
    """

    threshold: float
    key: int
    k: int
    total: int
    greater: int
    ties: int
    ties_kept: int
    tie_limits: List[int]


def _k_from_fraction(fraction, total: int) -> int:
    fraction = _check_number(fraction, "fraction")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return min(total, int(math.floor(fraction * total + 0.5)))


class _Comm:
    """Sum-all-reduce of small int64 vectors across a torch.distributed group (or none)."""

    def __init__(self, group=None, distributed: bool = False):
        self.enabled = distributed
        self.group = group
        if distributed:
            import torch.distributed as dist

            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("topk_mask_distributed needs an initialised torch.distributed process group")
            self.dist = dist
            self.rank = dist.get_rank(group)
            self.world = dist.get_world_size(group)
            nccl = dist.get_backend(group) == "nccl"
            self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        else:
            self.rank, self.world = 0, 1

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(torch.long).cpu()
        if not self.enabled:
            return values
        t = values.to(self.device)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM, group=self.group)
        return t.cpu()


def _select(scores: List[torch.Tensor], k: int, backend: str, comm: _Comm) -> TopKSelection:
    """Radix selection of the k-th largest key over the (local) score list."""
    groups = _groups(scores)
    plans = [(K.ops_for(_resolve(backend, dev, (dt,))), [_flat(scores[i]) for i in idx], idx)
             for (dev, dt), idx in groups.items()]
    local_total = sum(s.numel() for s in scores)
    full_precision = any(dt not in (torch.bfloat16, torch.float16) for (_, dt) in groups)
    head = comm.sum(torch.tensor([local_total, int(full_precision)]))
    total, full_precision = int(head[0]), bool(head[1])
    k = min(max(k, 0), total)
    numels = [s.numel() for s in scores]
    if k == 0:
        return TopKSelection(math.inf, 0x7FFFFFFF, 0, total, 0, 0, 0, [0] * len(scores))
    zero_bits = 0 if full_precision else HALF_ZERO_BITS
    prefix, prefix_shift, rank = 0, K.KEY_BITS, k  # rank: position of the k-th key from the top of the bin
    bin_count = total
    for shift, bits in DIGITS:
        if shift + bits <= zero_bits:  # these digits are 0 for every score
            prefix, prefix_shift = prefix << bits, shift
            continue
        hist = torch.zeros(1 << bits, dtype=torch.long)
        for ops, flat, _ in plans:
            hist += ops.abs_histogram(flat, shift, bits, prefix_shift, prefix).cpu()
        hist = comm.sum(hist)
        from_top = torch.cumsum(hist.flip(0), 0)
        pos = int(torch.searchsorted(from_top, torch.tensor([rank]))[0])  # first cumulative count >= rank
        digit = (1 << bits) - 1 - pos
        bin_count = int(hist[digit])
        rank -= int(from_top[pos]) - bin_count
        prefix, prefix_shift = (prefix << bits) | digit, shift
    key, ties, ties_kept = prefix, bin_count, rank
    limits = _tie_limits(plans, scores, numels, key, ties, ties_kept, comm)
    return TopKSelection(K.key_to_float(key), key, k, total, k - ties_kept, ties, ties_kept, limits)


def _tie_limits(plans, scores, numels, key: int, ties: int, ties_kept: int, comm: _Comm) -> List[int]:
    """Per local tensor, the element index below which ties at ``key`` are kept, so that
    exactly ``ties_kept`` ties are kept, the first ones in (rank, tensor, element) order."""
    if ties_kept == ties:
        return list(numels)
    counts = torch.zeros(len(scores), dtype=torch.long)
    for ops, flat, idx in plans:
        counts[idx] = ops.count_equal(flat, key).cpu()
    need = ties_kept
    if comm.enabled:  # ties held by lower ranks come first
        per_rank = torch.zeros(comm.world, dtype=torch.long)
        per_rank[comm.rank] = counts.sum()
        per_rank = comm.sum(per_rank)
        need = min(max(ties_kept - int(per_rank[:comm.rank].sum()), 0), int(per_rank[comm.rank]))
    limits, before = [], 0
    for i, c in enumerate(counts.tolist()):
        if before + c <= need:
            limits.append(numels[i])
        elif before >= need:
            limits.append(0)
        else:
            limits.append(_nth_tie(scores[i], plans, i, key, need - before))
        before += c
    return limits


def _nth_tie(score: torch.Tensor, plans, index: int, key: int, nth: int) -> int:
    """1 + the element index of the nth (1-based) element of ``score`` whose key is ``key``."""
    ops = next(o for o, _, idx in plans if index in idx)
    flat = _flat(score)
    starts = list(range(0, flat.numel(), TIE_SEARCH_CHUNK))
    counts = ops.count_equal([flat[s:s + TIE_SEARCH_CHUNK] for s in starts], key).cpu()
    cum = torch.cumsum(counts, 0)
    c = int(torch.searchsorted(cum, torch.tensor([nth]))[0])
    before = int(cum[c] - counts[c])
    if c < len(starts):
        chunk = K.abs_keys(flat[starts[c]:starts[c] + TIE_SEARCH_CHUNK].cpu())
        hits = torch.nonzero(chunk == key).reshape(-1)
        if nth - before <= hits.numel():
            return starts[c] + int(hits[nth - before - 1]) + 1
    # the backend's key counts disagree with torch's keys of the same values: a kernel bug
    raise RuntimeError(f"top-k tie search: the backend counted more elements with key {key:#x} than torch "
                       f"finds in tensor {index}; please report this with the scores' dtype")


def topk_threshold(scores, fraction: Optional[float] = None, *, k: Optional[int] = None, backend: str = "auto"
                   ) -> TopKSelection:
    """The exact k-th largest |score| over every listed tensor (radix selection), with
    k = round(fraction * total) (halves up) or given directly."""
    scores = _tensor_list(scores, "scores")
    k = _k_arg(fraction, k, sum(s.numel() for s in scores))
    return _select(scores, k, backend, _Comm())


def _k_arg(fraction, k, total) -> int:
    if (fraction is None) == (k is None):
        raise ValueError("give exactly one of fraction and k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        return min(k, total)
    return _k_from_fraction(fraction, total)


def _write_topk(scores: List[torch.Tensor], sel: TopKSelection, backend: str, names, meta) -> BitMask:
    out = BitMask.like(scores, names, meta)
    if sel.k == 0:
        return out
    for (dev, dt), idx in _groups(scores).items():
        ops = K.ops_for(_resolve(backend, dev, (dt,)))
        ops.topk_mask([out.words[i] for i in idx], [_flat(scores[i]) for i in idx], sel.key,
                      [sel.tie_limits[i] for i in idx])
    return out


def topk_mask(scores, fraction: float, *, names: Optional[Sequence[str]] = None, backend: str = "auto") -> BitMask:
    """SalUn's global mask: the ``fraction`` of all listed elements with the largest |score|.

    Exactly k = round(fraction * total) elements are kept (halves round up).  Tie rule:
    every element with |score| above the k-th largest value is kept; elements equal to it
    are kept in list order (tensor order, then row-major element order) until k are kept.
    NaN counts as larger than every number (as in torch.topk).  The fused backends select
    by radix histograms over the float32 bit patterns of |score| (three passes, two for
    bfloat16/float16 lists, plus one for the mask; extra memory: the histograms and the
    mask); the eager backend concatenates and calls torch.topk.  ``mask.meta`` holds the
    threshold, k and the tie counts.
    """
    if names is None:
        names = _mapping_names(scores)
    scores = _tensor_list(_in_order(scores, names, "scores", "names"), "scores")
    total = sum(s.numel() for s in scores)
    k = _k_from_fraction(fraction, total)
    devices = {s.device for s in scores}
    eager = any(_resolve(backend, d, {s.dtype for s in scores if s.device == d}) == "eager" for d in devices)
    meta = {"kind": "topk", "fraction": float(fraction), "k": k, "total": total}
    if eager:  # the reference formulation: concatenate on the first device, torch.topk
        if len(devices) > 1:
            scores_c = [s.to(scores[0].device) for s in scores]
        else:
            scores_c = scores
        dense = K.reference_topk_bits(scores_c, k)
        out = BitMask.like(scores, names, meta)
        for w, d in zip(out.words, dense):
            if d.numel():
                w.copy_(K.pack_bits(d).to(w.device))
        if k:  # the smallest kept key, as a float (NaN when NaNs fill the top k)
            kept = torch.cat([K.abs_keys(s)[d] for s, d in zip(scores_c, dense)])
            out.meta["threshold"] = K.key_to_float(int(kept.min()))
        else:
            out.meta["threshold"] = math.inf
        return out
    sel = _select(scores, k, backend, _Comm())
    meta.update(threshold=sel.threshold, greater=sel.greater, ties=sel.ties, ties_kept=sel.ties_kept)
    return _write_topk(scores, sel, backend, names, meta)


def topk_mask_distributed(scores, fraction: float, *, group=None, names: Optional[Sequence[str]] = None,
                          backend: str = "auto") -> BitMask:
    """``topk_mask`` over the union of every rank's ``scores`` (each rank holds a shard,
    e.g. its FSDP/pipeline parameters): the radix histograms, totals and tie counts are
    all-reduced over ``group`` (gloo on CPU, NCCL on GPU), so each rank gets the mask of
    its own tensors, equal to the single-process answer over the ranks' lists
    concatenated in rank order (ties go to lower ranks first).  Every rank must call it."""
    if names is None:
        names = _mapping_names(scores)
    scores = _tensor_list(_in_order(scores, names, "scores", "names"), "scores")
    sel, meta = _select_distributed(scores, fraction, group, backend)
    return _write_topk(scores, sel, backend, names, meta)


def _select_distributed(scores: List[torch.Tensor], fraction: float, group, backend: str):
    """The radix selection of topk_mask_distributed (every rank calls it): (selection, meta)."""
    comm = _Comm(group, distributed=True)
    total = int(comm.sum(torch.tensor([sum(s.numel() for s in scores)]))[0])
    k = _k_from_fraction(fraction, total)
    sel = _select(scores, k, backend, comm)
    meta = {"kind": "topk", "fraction": float(fraction), "k": k, "total": total, "threshold": sel.threshold,
            "greater": sel.greater, "ties": sel.ties, "ties_kept": sel.ties_kept, "world_size": comm.world}
    return sel, meta


# --------------------------------------------------------------------------------------
# Gradient transform
# --------------------------------------------------------------------------------------
class GradientTransform(NamedTuple):
    """What ``transform_gradients_`` computed (0-d tensors on the first gradient's device,
    None when not computed): the global gradient norm before clipping, the clipping
    factor, and the projection coefficient <t, r> / <r, r> of the transformed gradient t
    onto the retain gradient r (after clipping)."""

    total_norm: Optional[torch.Tensor]
    clip_coef: Optional[torch.Tensor]
    projection_coef: Optional[torch.Tensor]


def transform_gradients_(grads, mask=None, mode: str = "mask", preserve_fisher=None, lam: float = 1.0,
                         project_out=None, max_norm: Optional[float] = None, *, backend: str = "auto",
                         total_norm=None) -> GradientTransform:
    """Transform a gradient list in place (MMUnlearner / SFR-on), in this order:

    1. clip by the global norm (torch.nn.utils.clip_grad_norm_'s rule: multiply by
       min(1, max_norm / (||g|| + 1e-6)), the norm over every gradient, before masking);
    2. ``mode="mask"``: g <- m * g;  ``mode="geometry"``: g <- m * g / (F_p + lam);
    3. ``project_out`` (a retain gradient list r): g <- g - (<g, r> / <r, r>) r, the dot
       products global over the list (nothing is removed when r = 0).

    Fused backends make at most two passes: one reduction (||g||^2, <m g / (F_p + lam), r>,
    ||r||^2, float64 accumulation) when clipping or projecting, then one pass that writes
    g = c * t - alpha * r in float32 rounded once to g's dtype; no host synchronisation.

    Args:
        grads: gradient tensors (float32 / bfloat16 / float16; float64 on eager),
            modified in place.  ``None`` entries are not allowed: pass zeros.
        mask: a ``BitMask`` (or bool tensors) shaped like ``grads``, or None (all ones).
        mode: "mask" or "geometry".
        preserve_fisher: the preserve-set Fisher F_p per gradient (geometry mode only;
            converted to float32 if needed).
        lam: the damping lambda > 0 of the geometry mode.
        project_out: retain gradients r shaped like ``grads`` (converted to their dtypes).
        max_norm: the clipping norm (> 0) or None for no clipping.
        backend: "auto", "eager", "cpp", "triton", "cuda".
        total_norm: the norm of the WHOLE gradient when ``grads`` are one rank's shards
            of it (FSDP: see ``methods/fsdp.global_grad_norm``): clipping then uses it
            instead of the norm of ``grads``, so every shard gets the single-process
            factor.  Needs ``max_norm``; not with ``project_out`` (its dot products would
            be local to the shard).
    """
    names = _mapping_names(grads) or (mask.names if isinstance(mask, BitMask) else None)
    g = _tensor_list(grads, "grads")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    words = _mask_words(mask, g, "grads", names)
    preserve = None
    if mode == "geometry":
        if preserve_fisher is None:
            raise ValueError("mode='geometry' needs preserve_fisher (the preserve-set Fisher)")
        preserve = _tensor_list(_in_order(preserve_fisher, names, "preserve_fisher", "grads"), "preserve_fisher")
        _check_aligned(g, preserve, "grads", "preserve_fisher")
        lam = _check_number(lam, "lam", positive=True)
    elif preserve_fisher is not None:
        raise ValueError("preserve_fisher is only used with mode='geometry'")
    retain = None
    if project_out is not None:
        retain = _tensor_list(_in_order(project_out, names, "project_out", "grads"), "project_out")
        _check_aligned(g, retain, "grads", "project_out")
    if max_norm is not None:
        max_norm = _check_number(max_norm, "max_norm", positive=True)
    if total_norm is not None:
        if max_norm is None:
            raise ValueError("total_norm is the norm to clip by: it needs max_norm")
        if project_out is not None:
            raise ValueError("total_norm (sharded gradients) cannot be combined with project_out: the projection's "
                             "dot products would cover this shard only")
        total_norm = _check_number(float(total_norm), "total_norm", nonneg=True)
    for t in g:
        if t.requires_grad and torch.is_grad_enabled():
            raise ValueError("grads must not require grad (pass p.grad, not p)")
    if not g:
        return GradientTransform(None, None, None)
    devices = {t.device for t in g}
    dtypes = {t.dtype for t in g}
    names = {d: _resolve(backend, d, dtypes) for d in devices}
    with torch.no_grad():
        if any(n == "eager" for n in names.values()):
            dense = [d.float() for d in BitMask(words, [t.shape for t in g]).to_dense()] if words else None
            total, clip, proj = K.reference_transform_(g, dense, preserve, lam, retain, max_norm, total_norm)
            return GradientTransform(total, clip, proj)
        return _fused_transform(g, words, preserve, lam, retain, max_norm, names, total_norm)


def _fused_transform(g, words, preserve, lam, retain, max_norm, names, total_norm=None) -> GradientTransform:
    # In-place kernels need contiguous gradients: work on copies of the others.
    work = [t if t.is_contiguous() else t.contiguous() for t in g]
    plans = []
    for (dev, dt), idx in _groups(work).items():
        ops = K.ops_for(names[dev])
        plans.append((dev, ops, idx,
                      [work[i].view(-1) for i in idx],
                      [words[i] for i in idx] if words is not None else [],
                      [_flat(preserve[i].to(torch.float32)) for i in idx] if preserve is not None else [],
                      [_flat(retain[i].to(dt)) for i in idx] if retain is not None else []))
    home = g[0].device
    total = clip = proj = None
    coef = torch.tensor([1.0, 0.0], dtype=torch.float32, device=home)
    if total_norm is not None:  # the whole (sharded) gradient's norm is given: no reduction pass
        total = torch.tensor(total_norm, dtype=torch.float64, device=home)
        clip = torch.clamp(max_norm / (total + K.CLIP_EPS), max=1.0)
        coef = torch.stack([clip, torch.zeros_like(clip)]).to(torch.float32)
    elif max_norm is not None or retain is not None:
        sums = torch.zeros(3, dtype=torch.float64, device=home)
        for dev, ops, idx, gw, ww, pw, rw in plans:
            sums = sums + ops.transform_reduce(gw, ww, pw, rw, lam).to(home)
        total = sums[0].sqrt()
        clip = torch.ones((), dtype=torch.float64, device=home)
        if max_norm is not None:
            clip = torch.clamp(max_norm / (total + K.CLIP_EPS), max=1.0)
        if retain is not None:
            proj = torch.where(sums[2] > 0, clip * sums[1] / sums[2].clamp_min(torch.finfo(torch.float64).tiny),
                               torch.zeros((), dtype=torch.float64, device=home))
        coef = torch.stack([clip, proj if proj is not None else torch.zeros_like(clip)]).to(torch.float32)
    for dev, ops, idx, gw, ww, pw, rw in plans:
        ops.transform_apply(gw, ww, pw, rw, lam, coef.to(dev))
    for t, w in zip(g, work):
        if w is not t:
            t.copy_(w)
    if max_norm is None:
        total = clip = None
    return GradientTransform(total, clip, proj)


# --------------------------------------------------------------------------------------
# SalUn reset
# --------------------------------------------------------------------------------------
def reset_unmasked_(params, originals, mask, *, backend: str = "auto") -> None:
    """SalUn's reset, in place: theta <- m * theta + (1 - m) * theta_orig, i.e. every
    weight whose mask bit is 0 returns to its original value (a bitwise copy)."""
    names = _mapping_names(params) or (mask.names if isinstance(mask, BitMask) else None)
    p = _tensor_list(params, "params")
    o = _tensor_list(_in_order(originals, names, "originals", "params"), "originals")
    _check_aligned(p, o, "params", "originals")
    for i, (a, b) in enumerate(zip(p, o)):
        if a.dtype != b.dtype:
            raise TypeError(f"originals[{i}] has dtype {b.dtype} but params[{i}] has {a.dtype}")
    words = _mask_words(mask, p, "params", names)
    if words is None:
        raise ValueError("mask is required")
    with torch.no_grad():
        for (dev, dt), idx in _groups(p).items():
            name = _resolve(backend, dev, (dt,))
            ops = K.ops_for(name)
            work = [p[i] if p[i].is_contiguous() else p[i].contiguous() for i in idx]
            if name == "eager":
                ops.reset(work, [o[i] for i in idx], [words[i] for i in idx])
            else:
                ops.reset([w.view(-1) for w in work], [_flat(o[i]) for i in idx], [words[i] for i in idx])
            for i, w in zip(idx, work):
                if w is not p[i]:
                    p[i].copy_(w)


salun_reset_ = reset_unmasked_


# --------------------------------------------------------------------------------------
# Per-module selection by name patterns (MMUnlearner: vision vs language modules)
# --------------------------------------------------------------------------------------
Patterns = Union[str, "re.Pattern", Sequence[Union[str, "re.Pattern"]]]


def _compile(patterns, name: str) -> List["re.Pattern"]:
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    try:
        pats = list(patterns)
    except TypeError as exc:
        raise TypeError(f"{name} must be a regular expression or a list of them") from exc
    if not pats:
        raise ValueError(f"{name} is empty")
    out = []
    for p in pats:
        if isinstance(p, re.Pattern):
            out.append(p)
        elif isinstance(p, str):
            try:
                out.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"{name}: invalid regular expression {p!r} ({exc})") from exc
        else:
            raise TypeError(f"{name}: patterns must be strings, got {type(p).__name__}")
    return out


def _all_named(params) -> Tuple[List[Tuple[str, torch.Tensor]], List[Tuple[str, torch.Tensor]]]:
    """(trainable pairs, all pairs) from a module or a list of (name, tensor) pairs."""
    if isinstance(params, torch.nn.Module):
        every = list(params.named_parameters())
    else:
        names, tensors = _named(params, "named_params")
        every = list(zip(names, tensors))
    trainable = [(n, p) for n, p in every if p.requires_grad]
    return trainable, every


def select_parameters(named_params, patterns: Patterns, *, trainable_only: bool = True
                      ) -> List[Tuple[str, torch.Tensor]]:
    """The (name, parameter) pairs whose name matches any of ``patterns`` (regular
    expressions, ``re.search``: a plain substring such as "vision_tower" works), in model
    order.  ``named_params``: a module or (name, tensor) pairs.  With ``trainable_only``
    (default) only parameters with requires_grad count, so with LoRA the adapters are
    selected, not the frozen base weights.  Raises ValueError naming every pattern that
    matches no (trainable) parameter, instead of silently selecting nothing."""
    pats = _compile(patterns, "patterns")
    trainable, every = _all_named(named_params)
    pool = trainable if trainable_only else every
    _require_matches(pats, pool, every, "patterns", trainable_only)
    return [(n, p) for n, p in pool if any(c.search(n) for c in pats)]


def _require_matches(pats, pool, every, what: str, trainable_only: bool) -> None:
    problems = []
    for c in pats:
        if any(c.search(n) for n, _ in pool):
            continue
        frozen = [n for n, _ in every if c.search(n)]
        if trainable_only and frozen:
            problems.append(f"{c.pattern!r} matches no trainable parameter (only {len(frozen)} frozen ones, e.g. "
                            f"{frozen[0]!r}; with LoRA, the trainable parameters are the adapters)")
        else:
            example = pool[0][0] if pool else "(none)"
            problems.append(f"{c.pattern!r} matches no parameter (names look like {example!r})")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def _vision_flags(names: Sequence[str], is_vision, every_names: Sequence[str]) -> List[bool]:
    if callable(is_vision) and not isinstance(is_vision, re.Pattern):
        return [bool(is_vision(n)) for n in names]
    pats = _compile(is_vision, "is_vision")
    pool = [(n, None) for n in names]
    _require_matches(pats, pool, [(n, None) for n in every_names], "is_vision", True)
    return [any(c.search(n) for c in pats) for n in names]


def _aligned_fisher(fisher, names: Sequence[str], what: str) -> List[torch.Tensor]:
    if isinstance(fisher, FisherAccumulator):
        fisher = fisher.as_dict(mean=True)
    if isinstance(fisher, Mapping):
        missing = [n for n in names if n not in fisher]
        if missing:
            raise ValueError(f"{what} has no entry for {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        return [fisher[n] for n in names]
    return _tensor_list(fisher, what)


def _mmu_inputs(named_params, is_vision, preserve_fisher_vision, preserve_fisher_language):
    trainable, every = _all_named(named_params)
    if not trainable:
        raise ValueError("named_params has no trainable parameter (requires_grad=True)")
    names = [n for n, _ in trainable]
    params = [p for _, p in trainable]
    vision = _vision_flags(names, is_vision, [n for n, _ in every])
    fv = _aligned_fisher(preserve_fisher_vision, names, "preserve_fisher_vision")
    fl = _aligned_fisher(preserve_fisher_language, names, "preserve_fisher_language")
    _check_aligned(params, fv, "named_params", "preserve_fisher_vision", names)
    _check_aligned(params, fl, "named_params", "preserve_fisher_language", names)
    return trainable, every, names, params, vision, fv, fl


def mmunlearner_preserve_fisher(named_params, preserve_fisher_vision, preserve_fisher_language, is_vision
                                ) -> List[torch.Tensor]:
    """Per trainable parameter, the preserve Fisher MMUnlearner uses: the retain-VQA Fisher
    for vision modules, the retain VQA + text QA Fisher for language modules."""
    _, _, _, _, vision, fv, fl = _mmu_inputs(named_params, is_vision, preserve_fisher_vision,
                                             preserve_fisher_language)
    return [a if v else b for v, a, b in zip(vision, fv, fl)]


def mmunlearner_mask(named_params, forget_fisher, preserve_fisher_vision, preserve_fisher_language,
                     is_vision: Union[Callable[[str], bool], Patterns], threshold: float = 1.0, eps: float = 1e-15, *,
                     modules: Optional[Patterns] = None, fraction: Optional[float] = None,
                     distributed: bool = False, replicated: Optional[Sequence[bool]] = None, group=None,
                     backend: str = "auto") -> BitMask:
    """MMUnlearner's saliency mask over the trainable parameters.

    m = 1[(F_f + eps) / (F_p + eps) >= threshold] with F_p the retain-VQA Fisher for vision
    parameters and the retain VQA + text QA Fisher for language parameters.  With
    ``fraction`` the mask keeps instead the ``fraction`` of all trainable weights with the
    largest ratio (SalUn-style sparsity; ``topk_mask``'s exact count and tie rule; the
    ratios take one float32 copy of the trainable weights' size).  ``distributed=True``:
    each rank passes its shard of the parameters (FSDP; ``replicated[i]`` marks a parameter
    every rank holds whole, counted once) and the k-th largest ratio is selected over all
    ranks with ``topk_mask_distributed`` (``group``: the process group); every rank then
    keeps its weights with a ratio >= that value, so all weights tied with it are kept
    (more than k only when the k-th ratio is tied) and replicated parameters get the same
    mask on every rank.

    Args:
        named_params: a module or (name, parameter) pairs; only trainable parameters
            (requires_grad) get a mask, in that order (LoRA: the adapters).
        forget_fisher, preserve_fisher_vision, preserve_fisher_language: lists aligned with
            the trainable parameters, mappings name -> tensor, or FisherAccumulators.
        is_vision: a callable name -> bool, or regular expression(s) matching the vision
            parameters' names (e.g. "vision_tower|multi_modal_projector"); each pattern must
            match a trainable parameter.
        modules: optional pattern(s) restricting which parameters the forget step may
            update; the others get an all-zero mask.  Each must match a trainable parameter.
    Returns a ``BitMask`` named by parameter.
    """
    trainable, every, names, params, vision, fv, fl = _mmu_inputs(named_params, is_vision, preserve_fisher_vision,
                                                                   preserve_fisher_language)
    ff = _aligned_fisher(forget_fisher, names, "forget_fisher")
    _check_aligned(params, ff, "named_params", "forget_fisher", names)
    preserve = [a if v else b for v, a, b in zip(vision, fv, fl)]
    if fraction is None:
        mask = ratio_mask(ff, preserve, threshold, eps, names=names, backend=backend)
    else:
        ratios = [(f.float() + eps) / (p.float() + eps) for f, p in zip(ff, preserve)]
        if distributed:
            import torch.distributed as dist

            first = dist.get_rank(group) == 0
            replicated = list(replicated) if replicated is not None else [False] * len(ratios)
            if len(replicated) != len(ratios):
                raise ValueError(f"replicated has {len(replicated)} entries for {len(ratios)} trainable parameters")
            counted = [r if first or not rep else r.new_empty(0) for r, rep in zip(ratios, replicated)]
            _, kth = _select_distributed(counted, fraction, group, backend)  # the k-th ratio only: no mask
            mask = BitMask.from_dense([r >= kth["threshold"] for r in ratios], names=names)
            mask.meta.update({k: kth[k] for k in ("fraction", "k", "total", "threshold", "world_size")})
        else:
            mask = topk_mask(ratios, fraction, names=names, backend=backend)
        del ratios
    if modules is not None:
        pats = _compile(modules, "modules")
        _require_matches(pats, trainable, every, "modules", True)
        for i, n in enumerate(names):
            if not any(c.search(n) for c in pats):
                mask.words[i].zero_()
    mask.meta.update(kind="mmunlearner", num_vision=sum(vision))
    return mask
