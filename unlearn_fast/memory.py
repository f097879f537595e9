"""The C++ kernels' CPU buffer cache: their large buffers (gradients and chunk buffers of
8 MiB or more) stay mapped after their tensors die and are handed to the next request of
the same size.

Why: a training loop frees and re-requests the same gradient sizes every step, and fresh
memory costs page faults on first touch.  On virtual machines that report free memory to the
host (virtio-balloon free page reporting, as on this project's CI machines) those faults are
slow and their cost varies from run to run: the 32 MiB gradient of a DMK backward took
40-50 ms to back in some processes, against a 9 ms kernel.  A reused buffer has no faults.

Like torch's CUDA caching allocator, the cache holds memory that no tensor uses.  It is
bounded: 1 GiB by default, ``UNLEARN_FAST_CPU_CACHE_MB`` in the environment (read when the
extension loads) or :func:`set_cpu_buffer_cache_limit`; 0 turns it off.  A buffer larger
than a quarter of the limit is never kept (by default none above 256 MiB: a cached 0.5 GB
weight gradient would sit in the peak of every later allocation of a training step), and
the least recently freed buffers are unmapped first.  torch.profiler's memory events (and
``unlearn_fast.bench.harness.tensor_peak_memory``) count a buffer while a tensor holds it,
not while it is cached.  Without the C++ extension these functions do nothing.

    >>> import unlearn_fast
    >>> unlearn_fast.set_cpu_buffer_cache_limit(256 * 2**20)   # keep at most 256 MiB
    >>> unlearn_fast.empty_cpu_buffer_cache()                  # give it all back now
    >>> unlearn_fast.cpu_buffer_cache_info()["limit_bytes"]
    268435456
"""
from __future__ import annotations

from typing import Dict


def _native():
    from unlearn_fast.backends import native_cpu

    return native_cpu()


def cpu_buffer_cache_info() -> Dict[str, int]:
    """``cached_bytes`` and ``cached_buffers`` held now, ``limit_bytes``, and the ``hits``
    (outputs served from the cache) and ``misses`` (fresh mappings) so far.  All zero
    without the C++ extension."""
    native = _native()
    if native is None:
        return {"cached_bytes": 0, "cached_buffers": 0, "limit_bytes": 0, "hits": 0, "misses": 0}
    return dict(native.buffer_cache_stats())


def empty_cpu_buffer_cache() -> None:
    """Unmap every cached buffer (the limit stays as it is)."""
    native = _native()
    if native is not None:
        native.buffer_cache_empty()


def set_cpu_buffer_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of freed buffers, each at most ``nbytes // 4`` (0: none,
    every buffer is unmapped when its tensor dies); buffers beyond the new limit are
    unmapped now."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    native = _native()
    if native is not None:
        native.buffer_cache_set_limit(nbytes)
