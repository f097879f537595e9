"""Evaluation reports: eval.json (atomic), a printed table, and plots.

eval.json::

    {"schema": "unlearn_fast.eval/1", "created": "...", "config": {...},
     "models": {"<label>": {"model": "<path or builtin>",
                            "sets": {"<set>": {"<metric>": value, ...}, ...},
                            "summary": {"<metric>": value, ...}}}}   # summary: with a concept

Values are numbers or null (a metric whose set was empty).  :func:`load_results` also
reads ``unlearn-fast run`` style files ({method: {metric: value}} or {"methods": {...}}),
whose rows become each method's "summary".
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
    if isinstance(obj, dict) and obj.get("schema") == SCHEMA:
        models = obj["models"]
    else:
        table = obj.get("methods", obj) if isinstance(obj, dict) else None
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError(f"{path}: expected an eval.json or a {{method: {{metric: value}}}} results file")
        models = {m: {"summary": {k: v for k, v in row.items() if isinstance(v, (int, float)) or v is None}}
                  for m, row in table.items()}
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


def _bars(ax, labels: Sequence[str], values: Sequence, title: str):
    xs = range(len(labels))
    vals = [float("nan") if v is None else float(v) for v in values]
    ax.bar(list(xs), [0 if math.isnan(v) else v for v in vals],
           color=[f"C{i % 10}" for i in xs])
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.tick_params(axis="y", labelsize=7)


def plot_report(models: Mapping[str, Mapping], out_dir: str, before: Optional[str] = None) -> List[str]:
    """Per-metric bars across models/methods (summary.png, set_<name>.png) and, with
    two or more models, before/after bars (before_after.png: ``before`` = the first
    model unless named) of the summary metrics, or of each set's main metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    labels = list(models)
    written = []

    def grid(items, path, title):
        if not items:
            return
        cols = min(4, len(items))
        rows = (len(items) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, (name, vals) in zip(axes.flat, items):
            _bars(ax, labels, vals, name)
        for ax in list(axes.flat)[len(items):]:
            ax.axis("off")
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    summary_keys = _ordered([k for m in labels for k in (models[m].get("summary") or {})
                             if not k.startswith("num_")], SUMMARY_ORDER)
    grid([(k, [(models[m].get("summary") or {}).get(k) for m in labels]) for k in summary_keys],
         os.path.join(out_dir, "summary.png"), "per-method metrics")
    sets = list(dict.fromkeys(s for m in labels for s in (models[m].get("sets") or {})))
    for s in sets:
        keys = _ordered([k for m in labels for k in ((models[m].get("sets") or {}).get(s) or {}) if k != "n"],
                        SET_ORDER)
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in s)
        grid([(k, [((models[m].get("sets") or {}).get(s) or {}).get(k) for m in labels]) for k in keys],
             os.path.join(out_dir, f"set_{safe}.png"), f"set {s}")
    if len(labels) >= 2:
        written += _plot_before_after(models, out_dir, before or labels[0], plt)
    return written


def _plot_before_after(models, out_dir, before, plt) -> List[str]:
    if before not in models:
        raise ValueError(f"before={before!r} is not one of the models {list(models)}")
    after = [m for m in models if m != before]
    base = models[before]
    if base.get("summary"):
        items = [(k, None) for k in _ordered(base["summary"], SUMMARY_ORDER) if not k.startswith("num_")]
        get = lambda m, k, _s: (models[m].get("summary") or {}).get(k)  # noqa: E731
    else:
        items = [(k, s) for s, mets in (base.get("sets") or {}).items()
                 for k in ("mc_accuracy", "answer_accuracy", "loss", "min_k") if k in mets]
        get = lambda m, k, s: ((models[m].get("sets") or {}).get(s) or {}).get(k)  # noqa: E731
    if not items:
        return []
    cols = min(4, len(items))
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    width = 0.8 / (len(after) + 1)
    for ax, (k, s) in zip(axes.flat, items):
        series = [before] + after
        for i, m in enumerate(series):
            v = get(m, k, s)
            ax.bar([i * width], [0 if v is None else v], width=width, color=f"C{i % 10}", label=m)
        ax.set_xticks([])
        ax.set_title(k if s is None else f"{s}: {k}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=7)
    fig.suptitle(f"before ({before}) / after", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path = os.path.join(out_dir, "before_after.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
