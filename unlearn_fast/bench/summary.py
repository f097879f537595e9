"""The summary table of a benchmark run (``DIR/summary.md``, also printed).

One line per (op, mode, shape, dtype, device): the baseline's median time (eager: the
papers' code), the best of our fused providers, their ratio, the peak-memory ratio (and the
tensor-level one where a suite measured it: bench/harness.tensor_peak_memory), and
what ``backend="auto"`` runs for that case on that device with its ratio to eager.  Cases
where the auto choice is slower than eager are flagged ``SLOWER THAN EAGER``: the
dispatcher should route those shapes elsewhere.

What auto runs: a suite module may define ``auto_provider(op, shape, dtype, device)``
returning the provider name (as in its rows) that ``backend="auto"`` would run, or None
when the op is not its own; otherwise the registry's answer
``backends.resolve(op, "auto", device)`` when ``op`` is a registered op name.
"""
from __future__ import annotations

import importlib
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Optional

# The reference each suite's ratio_to_eager is relative to, first present wins.
BASELINES = ("eager", "per_metric_eager", "one_by_one")
# Our fast paths (fused kernels; eval's fused pass; batched generation).  Other providers
# (compile, foreach, eager_1pass, one_pass_eager, peer kernels) are references, not ours.
OURS = ("cpp", "cuda", "triton", "fused", "batched_greedy")
SLOWER = "SLOWER THAN EAGER"
# Below this, both peaks are allocator and thread noise (an in-place update's few hundred
# KiB of OpenMP scratch "is 11x eager's" 30 KiB): the ratio says nothing, so it is not shown.
TINY_PEAK_BYTES = 2**20
MEMORY_METRICS = ("peak_mem_bytes", "peak_mem_tensor_bytes")

AutoLookup = Callable[[str, str, str, str], Optional[str]]


def registry_auto(op: str, shape: str, dtype: str, device: str) -> Optional[str]:
    """The registry's auto choice when ``op`` is a registered op name, else None."""
    from unlearn_fast import backends
    import unlearn_fast.ops.registry_all  # noqa: F401  (registers every op)

    if not backends.implementations(op):
        return None
    try:
        return backends.resolve(op, "auto", device)
    except backends.BackendUnavailableError:
        return None


def suite_auto_lookup(suites=None) -> AutoLookup:
    """Ask every suite's ``auto_provider`` hook first, then the registry."""
    if suites is None:
        from unlearn_fast.bench import SUITES as suites
    hooks = []
    for name in suites:
        try:
            mod = importlib.import_module(f"unlearn_fast.bench.{name}")
        except ImportError:
            continue
        if hasattr(mod, "auto_provider"):
            hooks.append(mod.auto_provider)

    def lookup(op, shape, dtype, device):
        for hook in hooks:
            name = hook(op, shape, dtype, device)
            if name is not None:
                return name
        return registry_auto(op, shape, dtype, device)

    return lookup


def summarize(rows: List[dict], auto_lookup: Optional[AutoLookup] = None) -> List[dict]:
    """Summary lines (dicts) of the cases in ``rows`` that have a baseline time."""
    auto_lookup = auto_lookup or registry_auto
    cases: "OrderedDict[tuple, Dict[str, Dict[str, float]]]" = OrderedDict()
    for r in rows:
        if r["metric"] in ("time_median_s",) + MEMORY_METRICS:
            key = (r["op"], r["mode"], r["shape"], r["dtype"], r["device"])
            cases.setdefault(key, {}).setdefault(r["provider"], {})[r["metric"]] = r["value"]
    lines = []
    for (op, mode, shape, dtype, device), by_provider in cases.items():
        timed = {p: m for p, m in by_provider.items() if "time_median_s" in m}
        baseline = next((b for b in BASELINES if b in timed), None)
        if baseline is None:
            continue
        base_t = timed[baseline]["time_median_s"]
        ours = [p for p in timed if p in OURS]
        best = min(ours, key=lambda p: timed[p]["time_median_s"]) if ours else None
        line = dict(op=op, mode=mode, shape=shape, dtype=dtype, device=device, baseline=baseline,
                    baseline_s=base_t, best=best, best_s=None, ratio=None, mem_ratio=None, tensor_mem_ratio=None,
                    mem_tiny=False,
                    auto=auto_lookup(op, shape, dtype, device), auto_s=None, auto_ratio=None, flag="")
        if best is not None:
            line["best_s"] = timed[best]["time_median_s"]
            line["ratio"] = base_t / line["best_s"]
            for metric, key in zip(MEMORY_METRICS, ("mem_ratio", "tensor_mem_ratio")):
                base_mem, best_mem = timed[baseline].get(metric), timed[best].get(metric)
                if best_mem is not None and base_mem:
                    line[key] = best_mem / base_mem
                    if metric == "peak_mem_bytes":
                        line["mem_tiny"] = max(base_mem, best_mem) < TINY_PEAK_BYTES
        auto = line["auto"]
        if auto == "eager":
            auto = baseline  # auto routes this case to the reference code itself
        if auto in timed:
            line["auto_s"] = timed[auto]["time_median_s"]
            line["auto_ratio"] = base_t / line["auto_s"]
            if line["auto_s"] > base_t:
                line["flag"] = SLOWER
        lines.append(line)
    return lines


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _x(ratio: Optional[float]) -> str:
    if ratio is None:
        return "-"
    if ratio == 0:
        return "0x"  # e.g. a fused forward that allocates nothing beyond its inputs
    return f"{ratio:.2f}x" if ratio >= 0.01 else "<0.01x"


def _mem(line: dict) -> str:
    return "<1 MiB both" if line["mem_tiny"] else _x(line["mem_ratio"])


def to_markdown(lines: List[dict], title: str = "Benchmark summary") -> str:
    """A markdown table of summary lines, then the list of flagged cases."""
    out = [f"# {title}", "",
           "Times are medians in ms; `x eager` = eager time / this time (above 1: faster); `mem` = peak "
           "memory / eager's (below 1: less; `<1 MiB both`: both peaks under 1 MiB, no ratio); `tensor mem` = "
           "the same from tensor allocations only, where the suite measured it (CPU RSS counts malloc and "
           "Python overhead too); `auto` = what `backend=\"auto\"` runs for that case here.", "",
           "| op | mode | shape | dtype | device | eager ms | best fused | fused ms | x eager | mem | tensor mem "
           "| auto | auto x eager | flag |",
           "|---|---|---|---|---|---:|---|---:|---:|---:|---:|---|---:|---|"]
    for ln in lines:
        base = ln["baseline"] if ln["baseline"] != "eager" else ""
        out.append(f"| {ln['op']} | {ln['mode']} | {ln['shape']} | {ln['dtype']} | {ln['device']} | "
                   f"{_ms(ln['baseline_s'])}{f' ({base})' if base else ''} | {ln['best'] or '-'} | "
                   f"{_ms(ln['best_s'])} | {_x(ln['ratio'])} | {_mem(ln)} | {_x(ln['tensor_mem_ratio'])} | "
                   f"{ln['auto'] or '-'} | "
                   f"{_x(ln['auto_ratio'])} | {ln['flag']} |")
    flagged = [ln for ln in lines if ln["flag"]]
    out += ["", f"{len(flagged)} case(s) where backend=\"auto\" is slower than eager"
            + (":" if flagged else ".")]
    for ln in flagged:
        out.append(f"- {ln['op']} {ln['mode']} {ln['shape']} {ln['dtype']} {ln['device']}: auto runs {ln['auto']}, "
                   f"{_ms(ln['auto_s'])} ms vs eager {_ms(ln['baseline_s'])} ms ({_x(ln['auto_ratio'])})")
    return "\n".join(out) + "\n"


def failed_cases(rows: List[dict]) -> List[str]:
    """"op provider mode shape dtype device" of every case recorded as failed."""
    return [" ".join(r[f] for f in ("op", "provider", "mode", "shape", "dtype", "device"))
            for r in rows if r["metric"] == "failed"]


def report(rows: List[dict], auto_lookup: Optional[AutoLookup] = None, title: str = "Benchmark summary") -> str:
    """The summary table of ``rows``, then the cases that failed (see the run's log)."""
    text = to_markdown(summarize(rows, auto_lookup or suite_auto_lookup()), title=title)
    failed = failed_cases(rows)
    text += f"\n{len(failed)} case(s) failed" + (" (the reason is in the run's output):\n" if failed else ".\n")
    return text + "".join(f"- {case}\n" for case in failed)


def write_summary(rows: List[dict], out_dir: str, auto_lookup: Optional[AutoLookup] = None) -> str:
    from unlearn_fast.bench.harness import write_atomic_text

    return write_atomic_text(os.path.join(out_dir, "summary.md"), report(rows, auto_lookup))
