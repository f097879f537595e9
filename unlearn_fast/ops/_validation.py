"""Input checks at the Python boundary: bad input raises a ValueError/TypeError that
names the argument, before anything reaches a kernel."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(x, name: str, *, floating: bool = False, dims: Optional[Iterable[int]] = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32/bfloat16/float16/float64), got {x.dtype}")
    if dims is not None and x.dim() not in tuple(dims):
        raise ValueError(f"{name} must have {' or '.join(str(d) for d in dims)} dimensions, got shape {tuple(x.shape)}")
    return x


def check_same(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, *, shape=True, dtype=True, device=True):
    if device and a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}; move them to one device")
    if dtype and a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has dtype {b.dtype}; they must match")
    if shape and a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")


def check_choice(value, name: str, choices: Sequence[str]):
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_positive(value, name: str) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite positive number, got {value}")
    return float(value)


def mask_as_float(mask, name: str, shape: Sequence[int], device: torch.device) -> torch.Tensor:
    """A 0/1 mask (bool, integer or float of 0s and 1s) as a contiguous float32 tensor."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool or 0/1), got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or float, got {mask.dtype}")
    return mask.to(torch.float32).contiguous()


def index_tensor(ids, name: str, upper: int, device: torch.device) -> torch.Tensor:
    """Token ids (list/tuple/tensor of ints) checked to lie in [0, upper).

    A Python sequence is checked in Python.  A tensor is checked with one host read of
    its min and max (a small id list, not a per-token tensor); under torch.compile that
    read would be a data-dependent guard, so there the check is skipped."""
    if isinstance(ids, torch.Tensor):
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        t = ids.reshape(-1).to(device=device, dtype=torch.long)
        if t.numel() and not torch.compiler.is_compiling():
            lo, hi = int(t.min()), int(t.max())
            _check_range(lo, hi, name, upper)
        return t
    try:
        values = [int(i) for i in ids]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a sequence or tensor of integer token ids") from exc
    if any(isinstance(i, float) and not float(i).is_integer() for i in ids):
        raise TypeError(f"{name} must hold integer token ids")
    if values:
        _check_range(min(values), max(values), name, upper)
    return torch.tensor(values, dtype=torch.long, device=device)


def _check_range(lo: int, hi: int, name: str, upper: int) -> None:
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}) (the vocabulary size), got values in [{lo}, {hi}]")
