"""The benchmark harness itself: malloc policy scoping, the row schema, result files,
plots, the summary, peer listing, and a tiny run of every bench/profile subcommand
through the real CLI entry point (no timing assertions beyond the malloc check, which
compares a 100x effect with a 5x margin)."""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from unlearn_fast.bench import harness


# --------------------------------------------------------------------------- step 1: malloc
def _allocate_and_touch_median(reps: int = 30, nbytes: int = 8 * 2**20) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x = torch.empty(nbytes // 4)
        x.fill_(1.0)
        del x
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def test_rss_malloc_policy_is_scoped_to_the_measurement():
    seen = []

    def fn():
        seen.append(harness.malloc_policy)
        return torch.ones(1 << 20)

    harness.peak_memory(fn, "cpu")
    if harness.malloc_policy == "unsupported":
        pytest.skip("libc is not glibc: no malloc policy to scope")
    assert seen == ["rss"]
    assert harness.malloc_policy == "steady"


def test_timing_after_a_memory_measurement_is_not_slower():
    """Under the RSS policy every 8 MiB allocation is a fresh mmap the kernel zeroes page by
    page (~100x slower here); the policy must end with the measurement."""
    if harness._glibc() is None:
        pytest.skip("libc is not glibc")
    _allocate_and_touch_median(5)  # warm-up: glibc's dynamic threshold settles
    before = _allocate_and_touch_median()
    harness.peak_memory(lambda: torch.ones(1 << 20), "cpu")
    after = _allocate_and_touch_median()
    assert after < 5 * before + 1e-3, (before, after)
