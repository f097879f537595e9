"""evaluate_task / evaluate_sets / evaluate_pairs wiring (which rows feed which metric,
checked with scripted answers and against direct metric calls on a tiny random LLaVA /
CLIP) and the ``unlearn-fast eval`` command end to end on a saved tiny model."""
import json
import math
import os

import pytest
import torch

from unlearn_fast import metrics as M
from unlearn_fast.metrics import evaluate as E
from unlearn_fast.metrics import text as T
from unlearn_fast.models import get_adapter

from metrics_common import one_thread, task_and_tokenizer, tiny_llava

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)
N = 3  # rows per set


@pytest.fixture(scope="module")
def llava():
    task, tok = task_and_tokenizer()
    model = tiny_llava(seed=2)
    return task, tok, model, get_adapter(model)


def test_subsample_even_and_deterministic():
    assert E.subsample(range(10), 3) == [0, 3, 6]
    assert E.subsample(range(2), 5) == [0, 1]
    assert E.subsample(range(4), None) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="max_examples"):
        E.subsample(range(4), 0)


def test_evaluate_task_routes_sets_to_metrics(llava, monkeypatch):
    """Scripted answers: the reference answer for every row but the concept's held-out
    images, which answer "no idea no idea" -> known efficacy, generality, specificity,
    text retention and diversity."""
    task, tok, model, adapter = llava

    def scripted(model_, adapter_, rows, **kw):
        return ["no idea no idea" if (e.concept == "seven" and e.split == "holdout") else e.answer for e in rows]

    monkeypatch.setattr(E, "generate_answers", scripted)
    row = E.evaluate_task(model, adapter, tok, task, "seven", max_examples=N, max_new_tokens=3)
    assert row["efficacy"] == 0.0           # "This is seven." names the concept
    assert row["generality"] == 100.0       # held-out images: never named
    assert row["specificity"] == 100.0      # other concepts named correctly
    assert row["text_retention"] == 100.0 and row["rouge_l_text"] == pytest.approx(1.0)
    assert row["diversity"] == pytest.approx((3 * 100.0 + 3 * 50.0) / 6)
    assert row["num_forget_vqa"] == row["num_holdout_vqa"] == row["num_forget_text"] == N
    assert 0.0 <= row["mia_auc"] <= 1.0 and row["mia_auc"] == row["mia_auc_min_k"]
    assert {"mia_auc_loss", "mia_auc_zlib", "mia_auc_min_k_plus_plus"} <= set(row)
    for key in ("forget_vqa", "forget_text", "holdout_vqa", "retain_vqa", "retain_text"):
        assert 0.0 <= row[f"{key}_mc_accuracy"] <= 100.0
    assert math.isfinite(row["fluency"]) and row["fluency"] > 1.0
    assert "c_dis" not in row and "privleak" not in row


def test_evaluate_task_matches_direct_metric_calls(llava):
    task, tok, model, adapter = llava
    cache = {}
    row = E.evaluate_task(model, adapter, tok, task, "seven", reference_model=model, max_examples=N,
                          max_new_tokens=4, return_answers=True, cache=cache)
    forget = E.subsample(task.forget_set("seven"), N)
    holdout = E.subsample(task.holdout_set("seven"), N)
    answers = M.generate_answers(model, adapter, forget, tokenizer=tok, max_new_tokens=4)
    assert row["answers"]["forget_vqa"] == answers
    assert row["efficacy"] == T.efficacy(answers, task.concept("seven"))
    sf = M.sequence_scores(model, adapter, forget, tokenizer=tok)
    sh = M.sequence_scores(model, adapter, holdout, tokenizer=tok)
    assert row["mia_auc"] == pytest.approx(M.mia_auc(sf["min_k"], sh["min_k"]))
    mc = M.multiple_choice_accuracy(model, adapter, forget, tokenizer=tok)
    assert row["forget_vqa_mc_accuracy"] == pytest.approx(mc["accuracy"])
    # the reference model is the model itself: nothing moved
    assert row["c_dis"] == pytest.approx(0.0, abs=1e-9)
    assert row["privleak"] == pytest.approx(0.0, abs=1e-9)
    assert row["reference_mia_auc"] == pytest.approx(row["mia_auc"])
    # the passes are cached per (model, row): a second call generates nothing new
    n_cached = len(cache)
    calls = []
    real = E.generate_answers
    try:
        E.generate_answers = lambda *a, **k: calls.append(1) or real(*a, **k)
        again = E.evaluate_task(model, adapter, tok, task, "seven", max_examples=N, max_new_tokens=4, cache=cache)
    finally:
        E.generate_answers = real
    assert calls == [] and len(cache) == n_cached
    assert again["efficacy"] == row["efficacy"]


def test_evaluate_sets_report(llava):
    task, tok, model, adapter = llava
    sets = {"forget_vqa": task.forget_set("seven"), "holdout_vqa": task.holdout_set("seven"),
            "forget_text": task.text_facts("seven")}
    out = E.evaluate_sets(model, adapter, tok, sets, task=task, concept="seven", max_examples=N, max_new_tokens=3)
    assert set(out) == {"forget_vqa", "holdout_vqa", "forget_text", "mia"}
    fv = out["forget_vqa"]
    assert fv["n"] == N and fv["num_tokens"] >= 2
    sc = M.sequence_scores(model, adapter, E.subsample(sets["forget_vqa"], N), tokenizer=tok)
    for name in M.SCORE_NAMES:
        assert fv[name] == pytest.approx(float(sc[name].mean()), rel=1e-6), name
    for key in ("mc_accuracy", "answer_accuracy", "rouge_l", "rouge1", "diversity", "efficacy", "names_own_concept"):
        assert key in fv, key
    assert fv["efficacy"] + fv["names_own_concept"] == pytest.approx(100.0)  # same concept on every row
    assert set(out["mia"]) == {f"mia_auc_{s}_vqa" for s in M.mia.MIA_SCORES}
    # mixed sets: accuracy over the rows with options only; "test" pairs with "forget" (MLLMU-Bench)
    from dataclasses import replace

    rows = task.forget_set("seven")[:2]
    plain = [replace(e, id=e.id + "-plain", options=(), answer_index=None) for e in rows]
    mixed = E.evaluate_sets(model, adapter, tok, {"forget_vqa": rows + plain, "test_vqa": task.holdout_set("seven")},
                            generate=False, max_examples=4)
    mc = M.multiple_choice_accuracy(model, adapter, rows, tokenizer=tok)
    assert mixed["forget_vqa"]["mc_accuracy"] == pytest.approx(mc["accuracy"])
    assert mixed["forget_vqa"]["n"] == 4 and "answer_accuracy" not in mixed["forget_vqa"]
    assert set(mixed["mia"]) == {f"mia_auc_{s}_vqa" for s in M.mia.MIA_SCORES}


def test_evaluate_pairs_on_a_tiny_clip():
    from transformers import CLIPModel

    from unlearn_fast.models.builtin import tiny_clip_config

    task, tok = task_and_tokenizer()
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(tok)).eval()
    adapter = get_adapter(model)
    out = E.evaluate_pairs(model, adapter, tok, task, "seven", max_examples=6, batch_size=4)
    assert out["num_forget_pairs"] == out["num_retain_pairs"] == 6
    imgs, caps, _ = task.image_caption_pairs("seven")
    keep = E.subsample(range(len(imgs)), 6)
    batch = adapter.collate_pairs([imgs[i] for i in keep], [caps[i] for i in keep], tok)
    with torch.no_grad():
        i = torch.nn.functional.normalize(adapter.image_embeds(model, batch["pixel_values"]), dim=-1)
        t = torch.nn.functional.normalize(adapter.text_embeds(model, batch["input_ids"], batch["attention_mask"]),
                                          dim=-1)
    assert out["forget_match"] == pytest.approx(float((i * t).sum(-1).mean()), rel=1e-5)
    assert 0.0 <= out["pair_auc"] <= 1.0
    assert 0.0 <= out["retained_retrieval"] <= 100.0 and 0.0 <= out["forget_retrieval"] <= 100.0


def _saved_tiny_llava(tmp_path):
    _, tok = task_and_tokenizer()
    path = tmp_path / "rand-llava"
    tiny_llava(seed=3).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


def test_eval_cli_end_to_end(tmp_path, capsys):
    from unlearn_fast.cli import main

    model_dir = _saved_tiny_llava(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "--model", model_dir, "--label", "rand", "--data", "builtin", "--concept", "seven",
               "--max-examples", "2", "--max-new-tokens", "2", "--batch-size", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "summary" in printed and "efficacy" in printed and "forget_vqa" in printed
    obj = json.loads((out / "eval.json").read_text())
    entry = obj["models"]["rand"]
    assert set(entry["sets"]) >= {"forget_vqa", "forget_text", "holdout_vqa", "retain_vqa", "retain_text",
                                  "specificity", "mia"}
    assert entry["sets"]["forget_vqa"]["n"] == 2
    assert {"efficacy", "generality", "specificity", "text_retention", "fluency", "diversity",
            "mia_auc"} <= set(entry["summary"])
    assert os.path.exists(out / "summary.png") and os.path.exists(out / "sets.png")
    # re-plot from the results file with a second, run-style results file: before/after appears
    run_file = tmp_path / "results.json"
    run_file.write_text(json.dumps({"siu": {"efficacy": 100.0, "generality": 90.0, "mia_auc": 0.5}}))
    rc = main(["eval", "--results", str(out / "eval.json"), "--results", str(run_file), "--out", str(tmp_path / "re")])
    assert rc == 0
    assert os.path.exists(tmp_path / "re" / "before_after.png")
    assert set(json.loads((tmp_path / "re" / "eval.json").read_text())["models"]) == {"rand", "siu"}


def test_eval_cli_bad_input_fails_fast(tmp_path, capsys):
    from unlearn_fast.cli import main

    assert main(["eval", "--out", str(tmp_path / "o")]) == 2
    assert main(["eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    model_dir = _saved_tiny_llava(tmp_path)
    assert main(["eval", "--model", model_dir, "--concept", "eleventy", "--out", str(tmp_path / "o")]) == 2
    assert "eleventy" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "eval.json")  # nothing half-written
    # a bad path after a good model fails before the good one is evaluated, with a hint for
    # a training run's folder (it holds a checkpoint, not a model)
    run_dir = tmp_path / "runs" / "siu"
    (run_dir / "checkpoint").mkdir(parents=True)
    assert main(["eval", "--model", model_dir, "--model", str(run_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--save-model" in err and "[eval]" not in err
    (run_dir / "model").mkdir()
    assert main(["eval", "--model", model_dir, "--reference-model", str(run_dir), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--reference-model" in err and "did you mean" in err and "[eval]" not in err
    assert not os.path.exists(tmp_path / "o" / "eval.json")
    # labels must be unique (one row each), and --before must name one of them, up front
    for extra, message in ((["--model", model_dir, "--label", "a", "--label", "a"], "labels must be unique"),
                           (["--before", "nosuch"], "--before 'nosuch' is not one of the models")):
        assert main(["eval", "--model", model_dir, *extra, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and "[eval]" not in err
    assert not os.path.exists(tmp_path / "o" / "eval.json")
