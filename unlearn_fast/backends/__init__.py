"""Backend registry and dispatch.

Every fused op has an eager reference (backend ``"eager"``: plain PyTorch, the
correctness oracle and the baseline in benchmarks) and any number of fast backends:

  ``"cpp"``     C++ CPU kernels (OpenMP + SIMD) in ``unlearn_fast._C``
  ``"cuda"``    CUDA kernels in ``unlearn_fast._C_cuda``
  ``"triton"``  Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``)

``resolve(op, backend, device)`` turns a user's ``backend=`` argument into the name of
an implementation:

* ``"auto"`` picks the fastest available backend that implements ``op`` for the device
  (preference order in ``AUTO_ORDER``).  If the preferred fast backend is missing it
  falls back and warns once per (op, device, backend), saying why.
* An explicit name that cannot run raises ``BackendUnavailableError`` with the reason.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("eager", "cpp", "triton", "cuda")

# Fastest first.  Triton's CPU support is the interpreter: correct but slow, so it
# never wins "auto" on the CPU.
AUTO_ORDER = {
    "cpu": ("cpp", "eager"),
    "cuda": ("cuda", "triton", "eager"),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # why not (or a short description when available)


def _import_native(module: str) -> Tuple[Optional[object], str]:
    try:
        mod = importlib.import_module(module)
        return mod, "built"
    except ImportError as exc:  # not built (UNLEARN_FAST_NO_NATIVE) or broken build
        return None, f"{module} is not importable ({exc}); reinstall with `pip install --no-build-isolation -e .`"


@lru_cache(maxsize=None)
def native_cpu():
    """The C++ CPU extension module, or None."""
    return _import_native("unlearn_fast._C")[0]


@lru_cache(maxsize=None)
def native_cuda():
    """The CUDA extension module, or None."""
    return _import_native("unlearn_fast._C_cuda")[0]


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=None)
def availability(backend: str) -> Availability:
    """Whether ``backend`` can run at all on this machine, and why not."""
    if backend == "eager":
        return Availability(True, "plain PyTorch reference")
    if backend == "cpp":
        mod, why = _import_native("unlearn_fast._C")
        if mod is None:
            return Availability(False, why)
        return Availability(True, f"C++ CPU kernels, OpenMP threads={mod.build_info()['openmp_threads']}")
    if backend == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "torch.cuda.is_available() is False (no CUDA GPU or a CPU build of torch)")
        mod, why = _import_native("unlearn_fast._C_cuda")
        if mod is None:
            return Availability(False, why + " (the CUDA extension is built only when torch is a CUDA build and nvcc is present)")
        return Availability(True, "CUDA kernels")
    if backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            return Availability(False, f"triton is not installed ({exc}); `pip install triton`")
        if torch.cuda.is_available():
            return Availability(True, f"triton {triton.__version__} on CUDA")
        if triton_interpret():
            return Availability(True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU)")
        return Availability(False, "no CUDA GPU; triton runs on the CPU only under TRITON_INTERPRET=1")
    raise ValueError(f"unknown backend {backend!r}; expected one of {('auto',) + BACKENDS}")


def _backend_devices(backend: str) -> Tuple[str, ...]:
    if backend == "eager":
        return ("cpu", "cuda")
    if backend == "cpp":
        return ("cpu",)
    if backend == "cuda":
        return ("cuda",)
    if backend == "triton":
        return ("cuda", "cpu") if triton_interpret() else ("cuda",)
    raise ValueError(backend)


# op name -> backend name -> implementation (any callable; the op module decides the signature)
_KERNELS: Dict[str, Dict[str, Callable]] = {}
_warned: set = set()


def register(op: str, backend: str):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _KERNELS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def implementations(op: str) -> Dict[str, Callable]:
    return dict(_KERNELS.get(op, {}))


def _why_not(op: str, backend: str, device: str) -> Optional[str]:
    if backend not in _KERNELS.get(op, {}):
        return f"op {op!r} has no {backend!r} implementation (it has: {sorted(_KERNELS.get(op, {}))})"
    av = availability(backend)
    if not av.available:
        return av.reason
    if device not in _backend_devices(backend):
        return f"backend {backend!r} does not run on {device!r} tensors (runs on: {', '.join(_backend_devices(backend))})"
    return None


def resolve(op: str, backend: str, device: torch.device | str) -> str:
    """Return the backend name that will run ``op`` on ``device`` for a requested ``backend``."""
    dev = device if isinstance(device, str) else device.type
    return _resolve(op, backend, dev.split(":")[0])


# torch.compile runs this eagerly and treats the name as a constant, so dispatch adds
# no graph breaks (it imports modules and warns, which dynamo will not trace).
@torch.compiler.assume_constant_result
def _resolve(op: str, backend: str, dev: str) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        why = _why_not(op, backend, dev)
        if why is not None:
            raise BackendUnavailableError(f"backend {backend!r} cannot run {op!r} on {dev}: {why}")
        return backend
    order = AUTO_ORDER.get(dev, ("eager",))
    missing = []  # (backend, why) for backends that implement the op but cannot run here
    for name in order:
        why = _why_not(op, name, dev)
        if why is None:
            if missing:
                key = (op, dev, name)
                if key not in _warned:
                    _warned.add(key)
                    detail = "; ".join(f"{b}: {w}" for b, w in missing)
                    warnings.warn(f"unlearn_fast: {op} on {dev} falls back to backend {name!r} ({detail})",
                                  RuntimeWarning, stacklevel=3)
            return name
        if name in _KERNELS.get(op, {}):
            missing.append((name, why))
    raise BackendUnavailableError(f"no backend can run {op!r} on {dev}: " + "; ".join(f"{b}: {w}" for b, w in missing))


def info() -> Dict[str, Dict[str, object]]:
    """Backends, their availability and reasons, and which ops each implements."""
    out = {}
    for name in BACKENDS:
        av = availability(name)
        out[name] = {
            "available": av.available,
            "reason": av.reason,
            "devices": list(_backend_devices(name)),
            "ops": sorted(op for op, impls in _KERNELS.items() if name in impls),
        }
    return out
