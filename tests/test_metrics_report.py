"""eval.json (atomic, NaN -> null, schema), loading run results files, the printed table
and the plots."""
import json
import math
import os

import pytest

from unlearn_fast.metrics import report

MODELS = {
    "base": {"model": "builtin", "sets": {"forget_vqa": {"n": 4, "loss": 0.25, "mc_accuracy": 100.0},
                                          "holdout_vqa": {"n": 3, "loss": 1.5, "rouge_l": float("nan")}},
             "summary": {"efficacy": 0.0, "generality": 10.0, "mia_auc": 0.9, "num_forget_vqa": 4}},
    "siu": {"model": "runs/siu", "sets": {"forget_vqa": {"n": 4, "loss": 3.0, "mc_accuracy": 25.0}},
            "summary": {"efficacy": 100.0, "generality": 95.0, "mia_auc": 0.55, "num_forget_vqa": 4}},
}


def test_write_report_is_valid_json_with_nulls(tmp_path):
    path = report.write_report(str(tmp_path), report.make_report(MODELS, {"concept": "seven"}))
    assert path == str(tmp_path / "eval.json")
    text = open(path).read()
    assert "NaN" not in text
    obj = json.loads(text)
    assert obj["schema"] == report.SCHEMA
    assert obj["models"]["base"]["sets"]["holdout_vqa"]["rouge_l"] is None
    assert obj["models"]["siu"]["summary"]["efficacy"] == 100.0
    assert obj["config"] == {"concept": "seven"}
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []  # no temporary left behind


def test_load_results_roundtrip_and_run_files(tmp_path):
    report.write_report(str(tmp_path), report.make_report(MODELS))
    back = report.load_results(str(tmp_path))  # a folder: finds eval.json
    assert back["siu"]["summary"]["mia_auc"] == 0.55
    run_file = tmp_path / "results.json"
    run_file.write_text(json.dumps({"methods": {"ga": {"efficacy": 80.0, "wall_s": 3.5, "note": "x"}}}))
    got = report.load_results(str(run_file))
    assert got == {"ga": {"summary": {"efficacy": 80.0, "wall_s": 3.5}}}
    run_out = tmp_path / "run.json"  # unlearn-fast run's layout
    run_out.write_text(json.dumps({"concept": "seven", "base": {"lm": {"efficacy": 1.0, "fluency": None}},
                                   "methods": [{"method": "siu", "efficacy": 99.0, "ok": True},
                                               {"method": "ga", "efficacy": 70.0}]}))
    got = report.load_results(str(run_out))
    assert list(got) == ["base", "siu", "ga"]  # the base first: the "before" of before_after.png
    assert got["base"]["summary"] == {"efficacy": 1.0, "fluency": None}
    assert got["siu"]["summary"] == {"efficacy": 99.0}
    with pytest.raises(ValueError, match="one model"):
        report.load_results(str(tmp_path / "eval.json"), label="x")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected an eval.json"):
        report.load_results(str(bad))


def test_format_table_blocks_and_order():
    table = report.format_table(MODELS)
    lines = table.splitlines()
    assert lines[0].split() == ["summary", "base", "siu"]
    assert lines[1].split() == ["efficacy", "0", "100"]  # SUMMARY_ORDER first
    assert not any("num_forget_vqa" in ln for ln in lines)
    i = lines.index(next(ln for ln in lines if ln.startswith("holdout_vqa")))
    assert any(ln.split()[:2] == ["rouge_l", "-"] for ln in lines[i:])  # NaN prints as "-"
    assert any(ln.split() == ["loss", "1.5", "-"] for ln in lines[i:])  # set missing for siu


def test_plots_written(tmp_path):
    paths = report.plot_report(MODELS, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == ["before_after.png", "sets.png", "summary.png"]
    for p in paths:
        assert os.path.getsize(p) > 1000
    with pytest.raises(ValueError, match="before"):
        report.plot_report(MODELS, str(tmp_path), before="nope")
    assert math.isnan(MODELS["base"]["sets"]["holdout_vqa"]["rouge_l"])  # inputs untouched
