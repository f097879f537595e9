"""Plots of benchmark rows.

* Line plots (``lines_<op>_vs_<DIM>_<mode>_<dtype>_<fixed dims>.png``): for every op whose
  rows sweep one shape dimension named in ``SWEEP_DIMS`` (vocabulary V, tokens N) with the
  other dimensions, the mode and the dtype fixed: median time (left) and peak memory
  (right) against that dimension, one line per provider, log x axis.
* Bar charts (``<op>_<metric>.png``): median time and peak memory per provider for the
  cases of an op that lie on no line (ops benchmarked at unrelated shapes), each bar
  labelled with its ratio to the suite's baseline (eager, or per-metric eager for the
  evaluation suite; time: baseline / this, as the tables' ``x eager``; memory: this /
  baseline).

Value axes are logarithmic only where the values span more than ``LOG_SPAN`` (a linear
axis from 0 otherwise: on a log axis a 1.3x gap looks like 10x and a narrow range shows no
tick labels).

Shapes are the rows' ``shape`` strings, "N=2048,V=32000" (``parse_shape``).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Dict, List, Tuple

SWEEP_DIMS = ("V", "N")  # vocabulary size, tokens
METRICS = (("time_median_s", "median time (ms)", 1e3), ("peak_mem_bytes", "peak memory (MiB)", 1 / 2**20))
LOG_SPAN = 20.0


def _log_values(values) -> bool:
    """Whether the positive values span more than LOG_SPAN (then a log value axis)."""
    positive = [v for v in values if v > 0]
    return len(positive) >= 2 and max(positive) / min(positive) > LOG_SPAN


def _finish_value_axis(ax, log: bool) -> None:
    """After drawing: a log scale, or a linear one from 0."""
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)


def _baseline(providers) -> str:
    """The provider ratios are taken against (as the summary tables do)."""
    from unlearn_fast.bench.summary import BASELINES

    return next((b for b in BASELINES if b in providers), "")


def _ratio_text(r: float) -> str:
    """1.27x; small ratios keep two significant digits (0.00017x, not 0.00x)."""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _case_label(shape: str, dtype: str, mode: str, width: int = 30) -> str:
    """Tick label of a bar cluster: the shape wrapped at its commas, then dtype and mode."""
    lines, line = [], ""
    for part in shape.split(","):
        if line and len(line) + 1 + len(part) > width:
            lines.append(line + ",")
            line = part
        else:
            line = f"{line},{part}" if line else part
    return "\n".join(lines + [line, dtype, mode])


def parse_shape(shape: str) -> Dict[str, object]:
    """"N=2048,V=32000,algo=gram" -> {"N": 2048, "V": 32000, "algo": "gram"} (ints where
    the value is one; parts without "=" are kept under their own text)."""
    out: Dict[str, object] = {}
    for part in filter(None, shape.split(",")):
        key, sep, value = part.partition("=")
        if not sep:
            out[part] = ""
            continue
        out[key] = int(value) if re.fullmatch(r"-?\d+", value) else value
    return out


def slug(text: str) -> str:
    """A stable, readable file-name piece: "=" dropped, "," -> "_", anything else outside
    [A-Za-z0-9+._-] -> "-" ("H=4096,V=32000" -> "H4096_V32000"; "fwd+bwd" is kept)."""
    text = text.replace("=", "").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9+._-]", "-", text)


def sweeps(rows: List[dict]) -> Dict[Tuple[str, str, str, str, str], List[dict]]:
    """Rows (time and memory metrics) grouped into lines: key (op, dim, mode, dtype,
    fixed dims as a shape string) -> rows, for every group with at least two values of dim."""
    groups: Dict[Tuple[str, str, str, str, str], List[dict]] = defaultdict(list)
    metrics = {m for m, _, _ in METRICS}
    for r in rows:
        if r["metric"] not in metrics:
            continue
        dims = parse_shape(r["shape"])
        for dim in SWEEP_DIMS:
            if not isinstance(dims.get(dim), int):
                continue
            fixed = ",".join(f"{k}={v}" for k, v in dims.items() if k != dim)
            groups[(r["op"], dim, r["mode"], r["dtype"], fixed)].append(r)
    return {key: rs for key, rs in groups.items()
            if len({parse_shape(r["shape"])[key[1]] for r in rs}) >= 2}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str) -> str:
    """Write the figure atomically and close it."""
    from unlearn_fast.bench.harness import write_atomic_figure

    try:
        return write_atomic_figure(fig, path)
    finally:
        plt.close(fig)


def plot_lines(rows: List[dict], out_dir: str) -> Tuple[List[str], set]:
    """Line figures; returns (paths, the (op, shape, dtype, mode) cases they cover)."""
    plt = _pyplot()
    written, covered = [], set()
    for (op, dim, mode, dtype, fixed), group in sorted(sweeps(rows).items()):
        present = [(m, label, scale) for m, label, scale in METRICS if any(r["metric"] == m for r in group)]
        fig, axes = plt.subplots(1, len(present), figsize=(5.5 * len(present), 4), squeeze=False)
        for ax, (metric, label, scale) in zip(axes[0], present):
            by_provider = defaultdict(dict)
            for r in group:
                if r["metric"] == metric:
                    by_provider[r["provider"]][parse_shape(r["shape"])[dim]] = r["value"] * scale
            xs_all = sorted({x for pts in by_provider.values() for x in pts})
            log = _log_values([y for pts in by_provider.values() for y in pts.values()])
            for provider in sorted(by_provider, key=lambda p: (p != "eager", p)):
                pts = sorted(by_provider[provider].items())
                if log:  # memory can be 0 (nothing beyond the inputs): a log axis cannot show it
                    pts = [(x, y) for x, y in pts if y > 0]
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=provider)
            _finish_value_axis(ax, log)
            ax.set_xscale("log")
            ax.set_xticks(xs_all)
            ax.set_xticklabels([str(x) for x in xs_all], fontsize=7)
            ax.minorticks_off()
            ax.set_xlabel({"V": "vocabulary size V", "N": "tokens N"}.get(dim, dim))
            ax.set_ylabel(label)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{op}  {mode}  {dtype}  ({fixed or 'no other dims'})", fontsize=9)
        fig.tight_layout()
        name = f"lines_{slug(op)}_vs_{dim}_{slug(mode)}_{dtype}" + (f"_{slug(fixed)}" if fixed else "") + ".png"
        written.append(_save(plt, fig, os.path.join(out_dir, name)))
        covered.update((r["op"], r["shape"], r["dtype"], r["mode"]) for r in group)
    return written, covered


def plot_bars(rows: List[dict], out_dir: str, skip: set = frozenset()) -> List[str]:
    """Bar charts per op of the cases not in ``skip`` ((op, shape, dtype, mode) tuples)."""
    plt = _pyplot()
    written = []
    for metric, label, scale in METRICS:
        by_op = defaultdict(list)
        for r in rows:
            if r["metric"] == metric and (r["op"], r["shape"], r["dtype"], r["mode"]) not in skip:
                by_op[r["op"]].append(r)
        for op, op_rows in by_op.items():
            cases = sorted({(r["shape"], r["dtype"], r["mode"]) for r in op_rows})
            base = _baseline({r["provider"] for r in op_rows})
            providers = sorted({r["provider"] for r in op_rows}, key=lambda p: (p != base, p))
            fig, ax = plt.subplots(figsize=(max(6, 2.0 * len(cases)), 4.2))
            width = 0.8 / max(1, len(providers))
            values = {(r["provider"], r["shape"], r["dtype"], r["mode"]): r["value"] * scale for r in op_rows}
            time_metric = metric == "time_median_s"
            for i, prov in enumerate(providers):
                xs = [j + i * width for j in range(len(cases))]
                heights = [values.get((prov, *c), 0.0) for c in cases]
                bars = ax.bar(xs, heights, width=width, label=prov)
                if prov == base:
                    continue
                ratios = []
                for c, h in zip(cases, heights):
                    ref = values.get((base, *c))
                    ratios.append("" if not (ref and h > 0) else _ratio_text(ref / h if time_metric else h / ref))
                ax.bar_label(bars, ratios, fontsize=6, padding=1)
            _finish_value_axis(ax, _log_values(values.values()))
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels([_case_label(*c) for c in cases], fontsize=6)
            ax.set_ylabel(label)
            if base:
                note = f"{base} time / this" if time_metric else f"this / {base}'s peak"
                ax.set_title(f"{op}: {label}\n(bar labels: {note})", fontsize=9)
            else:
                ax.set_title(f"{op}: {label}", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            written.append(_save(plt, fig, os.path.join(out_dir, f"{slug(op)}_{metric}.png")))
    return written


def plot_rows(rows: List[dict], out_dir: str) -> List[str]:
    """Line plots where rows sweep V or N, bar charts for the rest; returns the paths."""
    lines, covered = plot_lines(rows, out_dir)
    return lines + plot_bars(rows, out_dir, skip=covered)
