"""Plots of benchmark rows: median time and peak memory per op, grouped by shape."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import List


def plot_rows(rows: List[dict], out_dir: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, scale in (("time_median_s", "median time (ms)", 1e3),
                                 ("peak_mem_bytes", "peak memory (MiB)", 1 / 2**20)):
        by_op = defaultdict(list)
        for r in rows:
            if r["metric"] == metric:
                by_op[r["op"]].append(r)
        for op, op_rows in by_op.items():
            cases = sorted({(r["shape"], r["dtype"], r["mode"]) for r in op_rows})
            providers = sorted({r["provider"] for r in op_rows})
            fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
            width = 0.8 / max(1, len(providers))
            for i, prov in enumerate(providers):
                vals = {(r["shape"], r["dtype"], r["mode"]): r["value"] * scale for r in op_rows if r["provider"] == prov}
                xs = [j + i * width for j in range(len(cases))]
                ax.bar(xs, [vals.get(c, 0.0) for c in cases], width=width, label=prov)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
            ax.set_xticklabels(["\n".join(c) for c in cases], fontsize=6)
            ax.set_ylabel(label)
            ax.set_yscale("log")
            ax.set_title(f"{op}: {label}")
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{op}_{metric}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
