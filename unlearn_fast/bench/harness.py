"""Timing, peak-memory and result-writing helpers shared by every benchmark suite.

Schema: one row per measurement
    op, provider, mode, shape, dtype, device, metric, value, version, timestamp
``shape`` is a string like "N=2048,V=32000"; ``metric`` is one of
    time_median_s, time_iqr_s, peak_mem_bytes, ratio_to_eager (eager time / this time),
    mem_ratio_to_eager, peak_mem_tensor_bytes, tensor_mem_ratio_to_eager, bandwidth_gbps,
    roofline_floor_s, roofline_fraction, tokens_per_s, failed (1: the case raised) ...
``Recorder.write(out_dir)`` writes bench.json (a list of rows), bench.csv, summary.md
(bench/summary.py) and plots (bench/plots.py).
"""
from __future__ import annotations

import csv
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Dict, List, Optional

import torch

from unlearn_fast.memory import empty_cpu_buffer_cache

SCHEMA_FIELDS = ("op", "provider", "mode", "shape", "dtype", "device", "metric", "value", "version", "timestamp")


def _version() -> str:
    from unlearn_fast import __version__

    return __version__


@dataclass
class Row:
    op: str
    provider: str
    mode: str
    shape: str
    dtype: str
    device: str
    metric: str
    value: float
    version: str = field(default_factory=_version)
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


def validate_rows(rows: List[dict]) -> None:
    """Raise ValueError if ``rows`` do not follow the schema (used by tests and loaders)."""
    for i, row in enumerate(rows):
        missing = [f for f in SCHEMA_FIELDS if f not in row]
        if missing:
            raise ValueError(f"row {i} lacks fields {missing}")
        if not isinstance(row["value"], (int, float)):
            raise ValueError(f"row {i}: value must be a number, got {row['value']!r}")
        for f in SCHEMA_FIELDS:
            if f != "value" and not isinstance(row[f], str):
                raise ValueError(f"row {i}: field {f} must be a string")


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 1, reps: int = 5,
            max_seconds: float = 30.0) -> List[float]:
    """Wall times of ``fn()`` (seconds), after ``warmup`` calls; stops early past max_seconds."""
    for _ in range(warmup):
        fn()
        synchronize(device)
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > max_seconds and len(times) >= 2:
            break
    return times


def median_iqr(times: List[float]):
    med = statistics.median(times)
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        return med, q[2] - q[0]
    return med, max(times) - min(times)


def available_cpu_memory() -> Optional[int]:
    """Bytes the kernel says a new allocation can get without swapping (MemAvailable in
    /proc/meminfo); None where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_in_memory(need_bytes: float, device: str, what: str, headroom: float = 0.9) -> None:
    """Raise MemoryError (which the suites record as a failed case) when a CPU case is
    estimated to need more than ``headroom`` of the available memory.  On the CPU an
    allocation past it does not raise: the kernel's OOM killer ends the whole run, with
    every row it had not written yet.  CUDA raises OutOfMemoryError itself: no check."""
    if device != "cpu":
        return
    free = available_cpu_memory()
    if free is not None and need_bytes > headroom * free:
        raise MemoryError(f"{what} needs about {need_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available here: "
                          f"skipped (fewer tokens fit)")


def _rss_bytes() -> int:
    """Resident anonymous memory (resident minus file-backed pages), where tensors live.  File
    pages (the mapped libraries) are counted out: the kernel may reclaim cold ones during a
    long call, which would hide that much tensor growth from the peak."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


# glibc's malloc policy during a peak-memory measurement, and outside it.
#
# By default glibc serves requests of 128 KiB or more with mmap, but its threshold is
# dynamic: each free of an mmap'd chunk raises it to that chunk's size (at most 32 MiB,
# DEFAULT_MMAP_THRESHOLD_MAX on 64-bit) and sets the trim threshold to twice that.  Freed
# heap memory is then recycled without leaving the RSS, which would hide temporaries from
# the RSS sampler, so the sampler pins a 64 KiB mmap threshold while it runs.  That policy
# must not outlive the measurement: every 8 MiB temporary would be a fresh mmap, zeroed page
# by page by the kernel, and munmap'd on free (measured ~100x slower per allocate-and-touch;
# the saliency suite saw eager 7x slower after a memory measurement).
#
# glibc has no getter for these values, and once mallopt sets one of them the dynamic
# adjustment stays off for good.  So on leaving the sampler we pin the dynamic policy's
# steady state instead -- the state a process that has freed a tensor of 32 MiB or more is
# in anyway (every benchmark has, in its warm-up): mmap threshold 32 MiB, trim threshold
# 64 MiB.  ``unlearn-fast bench`` pins that state at start too (bench.run_bench), so timings
# before and after a memory measurement see the same allocator: the order of time and
# memory measurements does not matter.  (Eager's first calls after a measurement still
# regrow the trimmed heap: the suites time several calls after a warm-up.)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_POLICIES = {
    "rss": {M_MMAP_THRESHOLD: 64 * 2**10, M_TRIM_THRESHOLD: 128 * 2**10},
    "steady": {M_MMAP_THRESHOLD: 32 * 2**20, M_TRIM_THRESHOLD: 64 * 2**20},
}
# "default" (glibc's own, dynamic: never touched), "rss" or "steady"; "unsupported" when
# libc is not glibc.  Tests read it to check that the RSS policy never outlives a sampler.
malloc_policy = "default"
_LIBC = None
_LIBC_LOADED = False


def _glibc():
    global _LIBC, _LIBC_LOADED
    if not _LIBC_LOADED:
        _LIBC_LOADED = True
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt  # noqa: B018  (AttributeError if this libc has no mallopt)
            libc.malloc_trim
            _LIBC = libc
        except (OSError, AttributeError):  # not glibc: the sampler still works, less precisely
            _LIBC = None
    return _LIBC


def set_malloc_policy(name: str) -> str:
    """Pin glibc's mmap and trim thresholds to policy ``name`` ("rss" or "steady");
    returns the previous policy name."""
    global malloc_policy
    previous = malloc_policy
    libc = _glibc()
    if libc is None:
        malloc_policy = "unsupported"
        return previous
    for param, value in MALLOC_POLICIES[name].items():
        libc.mallopt(param, value)
    malloc_policy = name
    return previous


def _release_free_heap() -> None:
    """malloc_trim(0): give the free chunks glibc still holds back to the OS.  Memory freed
    before the mmap threshold was lowered stays resident in the heap, and a tensor that later
    reuses it would not raise the RSS (a fused op's panels read as 0 bytes)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _RssSampler:
    """Peak resident set size while a block runs, sampled every ~0.2 ms in a thread.

    torch has no CPU allocator statistics; large tensors are mmap'd and returned to the
    OS on free, so RSS tracks them.  The peak is reported relative to the RSS before the
    block (inputs already allocated are not counted).  glibc's "rss" malloc policy holds
    only while the block runs (see MALLOC_POLICIES)."""

    def __init__(self, interval: float = 2e-4):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        set_malloc_policy("rss")
        gc.collect()
        _release_free_heap()
        # Buffers the C++ kernels cached from earlier calls would be reused without raising
        # the RSS: a fused op's gradient would read as 0 bytes.
        empty_cpu_buffer_cache()
        self.base = _rss_bytes()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.peak = max(self.peak, _rss_bytes())
        self._stop.set()
        self._thread.join()
        set_malloc_policy("steady")

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory allocated while ``fn()`` runs, above what was allocated before (bytes).

    What ``fn`` returns is dropped after the measurement, so it counts in the peak:
    subtract the size of returned gradients yourself when the target excludes them."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    with _RssSampler() as sampler:
        out = fn()
        # read while the result is alive: a short call may finish between two samples
        sampler.peak = max(sampler.peak, _rss_bytes())
        del out
    return int(sampler.extra)


def tensor_peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes of tensor storage allocated while ``fn()`` runs, above what was live
    before -- the CPU counterpart of CUDA's ``max_memory_allocated`` (on CUDA it is
    ``peak_memory``).

    ``peak_memory`` on the CPU reads the resident set, which also holds what is not a
    tensor: malloc's chunk headers and page rounding, Python objects, thread stacks.  At a
    few MiB those are a large part of the reading (the built-in model's evaluation pass).
    This replays every allocation and free of torch's CPU allocator (torch.profiler with
    ``profile_memory``) in time order and keeps the largest running total; the C++
    kernels' own mmap'd gradients (csrc/common.h, empty_for_full_write) report themselves
    to it the same way.  It does not see what bypasses both: BLAS workspaces, and the C++
    kernels' per-thread float rows for bf16 inputs (V floats each) -- quote it beside the
    RSS peak, not instead of it."""
    if device.startswith("cuda"):
        return peak_memory(fn, device)
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    allocations = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for _, nbytes in sorted(allocations, key=lambda a: a[0]):
        live += nbytes
        peak = max(peak, live)
    return int(peak)


_BANDWIDTH: Dict[str, float] = {}


def measured_bandwidth(device: str = "cpu", nbytes: int = 256 * 2**20) -> float:
    """Device memory bandwidth in bytes/s from a large copy (read + write), measured once."""
    if device in _BANDWIDTH:
        return _BANDWIDTH[device]
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, warmup=2, reps=7)
    bw = 2 * nbytes / statistics.median(times)
    _BANDWIDTH[device] = bw
    return bw


class Recorder:
    """Collects rows; writes JSON, CSV and plots atomically."""

    def __init__(self, quiet: bool = False):
        self.rows: List[Row] = []
        self.quiet = quiet

    def add(self, op: str, provider: str, mode: str, shape: str, dtype: str, device: str, metric: str,
            value: float) -> None:
        self.rows.append(Row(op, provider, mode, shape, dtype, device, metric, float(value)))

    def add_timing(self, op, provider, mode, shape, dtype, device, times: List[float],
                   peak_bytes: Optional[int] = None, eager_median: Optional[float] = None,
                   eager_peak: Optional[int] = None, floor_seconds: Optional[float] = None,
                   tensor_peak_bytes: Optional[int] = None, eager_tensor_peak: Optional[int] = None) -> float:
        """Add the standard rows for one (op, provider, mode, shape, dtype) measurement
        (``tensor_peak_bytes``: ``tensor_peak_memory``'s reading, where a suite takes it)."""
        med, iqr = median_iqr(times)
        add = lambda m, v: self.add(op, provider, mode, shape, dtype, device, m, v)  # noqa: E731
        add("time_median_s", med)
        add("time_iqr_s", iqr)
        if peak_bytes is not None:
            add("peak_mem_bytes", peak_bytes)
        if eager_median is not None:
            add("ratio_to_eager", eager_median / med)
        if eager_peak is not None and peak_bytes is not None and eager_peak > 0:
            add("mem_ratio_to_eager", peak_bytes / eager_peak)
        if tensor_peak_bytes is not None:
            add("peak_mem_tensor_bytes", tensor_peak_bytes)
            if eager_tensor_peak:
                add("tensor_mem_ratio_to_eager", tensor_peak_bytes / eager_tensor_peak)
        if floor_seconds is not None:
            add("roofline_floor_s", floor_seconds)
            add("roofline_fraction", floor_seconds / med)
        if not self.quiet:
            extra = f"  x{eager_median / med:5.2f} vs eager" if eager_median else ""
            mem = f"  peak {peak_bytes / 2**20:9.1f} MiB" if peak_bytes is not None else ""
            print(f"{op:>24} {provider:>16} {mode:>8} {shape:>24} {dtype:>9}  {med * 1e3:10.2f} ms{mem}{extra}",
                  flush=True)
        return med

    def failure(self, op, provider, mode, shape, dtype, device, exc: BaseException) -> None:
        """A case that raised (out of memory, a peer's API change...): printed, and kept as
        a row (metric "failed", value 1) so that summary.md lists it -- a run that lost
        cases says so at the end instead of in the middle of its log."""
        print(f"  {op} {provider} {mode} {shape} {dtype} failed: {type(exc).__name__}: {exc}", flush=True)
        self.add(op, provider, mode, shape, dtype, device, "failed", 1.0)

    def as_dicts(self) -> List[dict]:
        return [asdict(r) for r in self.rows]

    def write(self, out_dir: str, plot: bool = True) -> List[str]:
        """Write out_dir/bench.json (list of rows), bench.csv and summary.md atomically,
        merged with the rows of earlier runs into the same folder; plots too."""
        os.makedirs(out_dir, exist_ok=True)
        rows = self.as_dicts()
        validate_rows(rows)
        rows = read_folder_rows(out_dir) + rows  # merge with rows from other suites run into the same folder
        written = [write_atomic_json(os.path.join(out_dir, "bench.json"), rows)]
        written.append(_write_atomic_csv(os.path.join(out_dir, "bench.csv"), rows))
        from unlearn_fast.bench.summary import write_summary

        written.append(write_summary(rows, out_dir))
        if plot:
            written += write_plots(out_dir, rows)
        return written


def read_folder_rows(out_dir: str) -> List[dict]:
    """The rows of out_dir/bench.json ([] when there is none).  A file that is not a list
    of rows in the schema raises: merging would overwrite it, and it may be someone's results."""
    path = os.path.join(out_dir, "bench.json")
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            rows = json.load(f)
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("not a list of rows")
        validate_rows(rows)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a bench.json of this schema ({exc}); results merge into it, so "
                         f"move it away or choose another --out") from None
    return rows


def check_out_dir(out_dir: str) -> None:
    """Raise before any measurement if results could not be merged into ``out_dir``."""
    read_folder_rows(out_dir)


def write_plots(out_dir: str, rows: Optional[List[dict]] = None) -> List[str]:
    """The plots of every row in out_dir/bench.json (or of ``rows``); returns the paths."""
    from unlearn_fast.bench.plots import plot_rows

    return plot_rows(read_folder_rows(out_dir) if rows is None else rows, out_dir)


def write_atomic_json(path: str, obj) -> str:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    return path


def write_atomic_text(path: str, text: str) -> str:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


def write_atomic_figure(fig, path: str, dpi: int = 110) -> str:
    """Save a matplotlib figure atomically (a reader never sees half an image); the format
    follows the path's extension.  Closing the figure is the caller's."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
    except BaseException:
        os.unlink(tmp)
        raise
    os.replace(tmp, path)
    return path


def _write_atomic_csv(path: str, rows: List[dict]) -> str:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".csv")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(SCHEMA_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r[k] for k in SCHEMA_FIELDS})
    os.replace(tmp, path)
    return path
