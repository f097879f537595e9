"""Evaluation reports: eval.json (atomic), a printed table, and plots.

eval.json::

    {"schema": "unlearn_fast.eval/1", "created": "...", "config": {...},
     "models": {"<label>": {"model": "<path or builtin>",
                            "sets": {"<set>": {"<metric>": value, ...}, ...},
                            "summary": {"<metric>": value, ...}}}}   # summary: with a concept

Values are numbers or null (a metric whose set was empty).  :func:`load_results` also
reads ``unlearn-fast run``'s results.json ({"base": {"lm": row}, "methods": [{"method":
name, ...}, ...]}; the base row becomes model "base") and plain {method: {metric: value}}
files; their rows become each model's "summary".
"""
from __future__ import annotations

import json
import math
import os
from datetime import datetime, timezone
from typing import Dict, List, Mapping, Optional, Sequence

SCHEMA = "unlearn_fast.eval/1"
# the columns the run CLI prints, in order (others follow alphabetically)
SUMMARY_ORDER = ("efficacy", "generality", "specificity", "text_retention", "fluency", "diversity", "mia_auc",
                 "c_dis", "privleak", "forget_vqa_mc_accuracy", "forget_text_mc_accuracy", "retain_vqa_mc_accuracy",
                 "retain_text_mc_accuracy", "pair_auc", "retained_retrieval")
SET_ORDER = ("n", "mc_accuracy", "answer_accuracy", "rouge_l", "rouge1", "efficacy", "names_own_concept", "diversity",
             "loss", "probability", "perplexity", "zlib", "min_k", "min_k_plus_plus", "exact_memorization")


def _clean(v):
    """JSON-safe: NaN/inf -> None, numpy / torch scalars -> Python numbers."""
    if isinstance(v, Mapping):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def make_report(models: Mapping[str, Mapping], config: Optional[Mapping] = None) -> dict:
    return {"schema": SCHEMA, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": _clean(dict(config or {})), "models": _clean(dict(models))}


def write_report(out_dir: str, report: dict) -> str:
    """Write ``out_dir/eval.json`` atomically (temporary file + rename)."""
    from unlearn_fast.bench.harness import write_atomic_json

    os.makedirs(out_dir, exist_ok=True)
    return write_atomic_json(os.path.join(out_dir, "eval.json"), _clean(report))


def load_results(path: str, label: Optional[str] = None) -> Dict[str, dict]:
    """{label: {"sets": ..., "summary": ...}} from an eval.json or a run results file."""
    if os.path.isdir(path):
        for name in ("eval.json", "results.json"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"{path}: no eval.json or results.json in this folder")
    with open(path) as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
    numeric = lambda row: {k: v for k, v in row.items()  # noqa: E731
                           if (isinstance(v, (int, float)) and not isinstance(v, bool)) or v is None}
    if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
        models = obj["models"]
    elif isinstance(obj, dict) and isinstance(obj.get("methods"), list):
        # ``unlearn-fast run``'s results.json: {"base": {"lm": row, "clip": row}, "methods": [row, ...]}
        models = {}
        for kind, row in (obj.get("base") or {}).items():
            if isinstance(row, dict):
                models["base" if kind == "lm" else f"base-{kind}"] = {"summary": numeric(row)}
        for row in obj["methods"]:
            if not isinstance(row, dict) or "method" not in row:
                raise ValueError(f"{path}: every entry of 'methods' needs a 'method' name")
            models[str(row["method"])] = {"summary": numeric(row)}
    else:
        table = obj.get("methods", obj) if isinstance(obj, dict) else None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{path}: expected an eval.json or a {{method: {{metric: value}}}} results file")
        models = {m: {"summary": numeric(row)} for m, row in table.items()}
    if label is not None:
        if len(models) != 1:
            raise ValueError(f"{path}: a label applies to a file with one model; it has {len(models)}")
        models = {label: next(iter(models.values()))}
    return models


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e6):
        return f"{int(v)}" if not isinstance(v, bool) else str(v)
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"


def _ordered(keys, order) -> List[str]:
    keys = list(dict.fromkeys(keys))
    return [k for k in order if k in keys] + sorted(k for k in keys if k not in order)


def format_table(models: Mapping[str, Mapping]) -> str:
    """One block per evaluation set (and one for the summary): metric rows x model columns."""
    labels = list(models)
    width = max([12] + [len(m) + 2 for m in labels])
    blocks = []
    summary_keys = [k for m in labels for k in (models[m].get("summary") or {}) if not k.startswith("num_")]
    if summary_keys:
        blocks.append(("summary", _ordered(summary_keys, SUMMARY_ORDER), lambda m, k: (models[m].get("summary")
                                                                                         or {}).get(k)))
    sets = list(dict.fromkeys(s for m in labels for s in (models[m].get("sets") or {})))
    for s in sets:
        keys = [k for m in labels for k in ((models[m].get("sets") or {}).get(s) or {})]
        blocks.append((s, _ordered(keys, SET_ORDER),
                       lambda m, k, s=s: ((models[m].get("sets") or {}).get(s) or {}).get(k)))
    lines = []
    for title, keys, get in blocks:
        name_w = max([len(title)] + [len(k) for k in keys]) + 2
        lines.append(f"{title:<{name_w}}" + "".join(f"{m:>{width}}" for m in labels))
        for k in keys:
            lines.append(f"  {k:<{name_w - 2}}" + "".join(f"{_fmt(get(m, k)):>{width}}" for m in labels))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


SET_PLOT_METRICS = ("mc_accuracy", "answer_accuracy", "efficacy", "loss", "min_k", "exact_memorization")


def _grouped(ax, groups: Sequence[str], series: Sequence[str], value, title: str) -> None:
    """Bars of value(series, group): one cluster per group, one colour per series."""
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        vals = [value(name, g) for g in groups]
        xs = [j + i * width for j in range(len(groups))]
        ax.bar(xs, [0.0 if v is None else float(v) for v in vals], width=width, color=f"C{i % 10}", label=name)
        for x, v in zip(xs, vals):
            if v is None:  # not measured for this model: say so rather than draw a 0 bar
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, color="gray", rotation=90)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def _figure(plt, items, draw, path: str, title: str, legend: bool) -> Optional[str]:
    """A grid of small axes, one per item, drawn by ``draw(ax, item)``; fixed margins
    (matplotlib's tight_layout costs seconds per figure)."""
    if not items:
        return None
    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    # margins in inches: the title above, the rotated tick labels and the legend below
    top_in, bottom_in = 0.55, 0.45 + (0.35 if legend else 0.0)
    height = 2.3 * rows + top_in + bottom_in
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, height), squeeze=False)
    for ax, item in zip(axes.flat, items):
        draw(ax, item)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    if legend:
        handles, names = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    fig.subplots_adjust(left=0.07, right=0.98, top=1 - top_in / height, bottom=bottom_in / height,
                        wspace=0.35, hspace=0.6)
    from unlearn_fast.bench.harness import write_atomic_figure

    try:
        return write_atomic_figure(fig, path, dpi=100)
    finally:
        plt.close(fig)


def plot_report(models: Mapping[str, Mapping], out_dir: str, before: Optional[str] = None) -> List[str]:
    """summary.png: one panel per summary metric, a bar per model / method;
    sets.png: one panel per main set metric (accuracies, efficacy, LOSS, Min-K%, exact
    memorisation), clusters = evaluation sets, bars = models; before_after.png (two or
    more models): ``before`` (default: the first model) against the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    labels = list(models)
    if before is not None and before not in models:
        raise ValueError(f"before={before!r} is not one of the models {labels}")
    summ = lambda m, k: (models[m].get("summary") or {}).get(k)  # noqa: E731
    sets = list(dict.fromkeys(s for m in labels for s in (models[m].get("sets") or {}) if s != "mia"))
    setv = lambda m, s, k: ((models[m].get("sets") or {}).get(s) or {}).get(k)  # noqa: E731
    summary_keys = [k for k in SUMMARY_ORDER if any(summ(m, k) is not None for m in labels)]
    set_keys = [k for k in SET_PLOT_METRICS if any(setv(m, s, k) is not None for m in labels for s in sets)]
    written = [
        _figure(plt, summary_keys, lambda ax, k: _grouped(ax, [""], labels, lambda m, _g: summ(m, k), k),
                os.path.join(out_dir, "summary.png"), "per-method metrics", legend=True),
        _figure(plt, set_keys, lambda ax, k: _grouped(ax, sets, labels, lambda m, s: setv(m, s, k), k),
                os.path.join(out_dir, "sets.png"), "metrics per evaluation set", legend=True),
    ]
    if len(labels) >= 2:
        ref = before or labels[0]
        order = [ref] + [m for m in labels if m != ref]
        if summary_keys:
            items = summary_keys
            draw = lambda ax, k: _grouped(ax, [""], order, lambda m, _g: summ(m, k), k)  # noqa: E731
        else:
            items = set_keys
            draw = lambda ax, k: _grouped(ax, sets, order, lambda m, s: setv(m, s, k), k)  # noqa: E731
        written.append(_figure(plt, items, draw, os.path.join(out_dir, "before_after.png"),
                               f"before ({ref}) / after", legend=True))
    return [p for p in written if p]
