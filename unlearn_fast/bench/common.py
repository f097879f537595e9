"""Argument handling shared by the benchmark suites."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch

from unlearn_fast import backends

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bench_device(args) -> str:
    dev = getattr(args, "device", None)
    if dev:
        return dev
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_dtypes(args, default=("float32", "bfloat16")) -> List[torch.dtype]:
    names = args.dtypes.split(",") if getattr(args, "dtypes", None) else list(default)
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ValueError(f"--dtypes: unknown {bad}; choose from {sorted(DTYPES)}")
    return [DTYPES[n] for n in names]


def bench_providers(args, op: str, device: str) -> List[str]:
    """eager first (the baseline), then compile (torch.compile of eager), then every fused
    backend that can run ``op`` on ``device`` here (triton's CPU interpreter excluded)."""
    wanted = args.backends.split(",") if getattr(args, "backends", None) else None
    out = ["eager"]
    if not getattr(args, "no_compile", False):
        out.append("compile")
    for name in ("cpp", "cuda", "triton"):
        if device == "cpu" and name == "triton":
            continue
        try:
            backends.resolve(op, name, device)
        except Exception:
            continue
        out.append(name)
    if wanted is not None:
        out = [p for p in out if p in wanted or p == "eager"]
    return out


def shape_str(**dims) -> str:
    return ",".join(f"{k}={v}" for k, v in dims.items())


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def cpu_threads(device: str, threads: Optional[int]) -> Iterator[int]:
    """Run a block with ``threads`` intra-op threads when ``device`` is the CPU (None: leave
    torch's setting); yields the thread count in effect, restores the old one after.

    Tiny models on a shared machine: OpenMP barriers cost more than the work, and with two
    threads on two loaded cores step times swing by 10x (eval and e2e suites, measured)."""
    old = torch.get_num_threads()
    if device == "cpu" and threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
