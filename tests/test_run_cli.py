"""``unlearn-fast run`` end to end on tiny saved models and a small JSONL dataset:
outputs, resume, the input model untouched, and bad input failing fast with nothing
written."""
import dataclasses
import hashlib
import json
import os

import pytest

from tiny_models import task_and_tokenizer, tiny_clip, tiny_llava
from unlearn_fast.cli import main as cli_main
from unlearn_fast.data import write_jsonl_task

KEYS = ("method", "efficacy", "generality", "specificity", "text_retention", "fluency", "diversity", "mia_auc",
        "wall_seconds")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    task, tok = task_and_tokenizer()
    concepts = ("one", "two", "seven")
    count = {}
    rows = []
    for e in task.examples:
        if e.concept == "":
            rows.append(e)
        elif e.concept in concepts:
            if e.kind == "vqa":
                k = count.get((e.concept, e.split), 0)
                if k >= (6 if e.split == "train" else 3):
                    continue
                count[(e.concept, e.split)] = k + 1
            rows.append(e)
    small = dataclasses.replace(task, examples=rows, concepts={c: task.concepts[c] for c in concepts},
                                fictitious_names={c: task.fictitious_names[c] for c in concepts},
                                descriptions={c: task.descriptions[c] for c in concepts},
                                captions={c: task.captions[c] for c in concepts})
    data = str(root / "data" / "digits.jsonl")
    os.makedirs(os.path.dirname(data))
    write_jsonl_task(small, data)
    llava_dir, clip_dir = str(root / "llava"), str(root / "clip")
    for model, d in ((tiny_llava(), llava_dir), (tiny_clip(), clip_dir)):
        model.save_pretrained(d)
        tok.save_pretrained(d)
    return {"data": data, "llava": llava_dir, "clip": clip_dir}


def _digest(folder):
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def _run(assets, out, *extra, method="ga", model="llava"):
    argv = ["run", "--method", method, "--model", assets[model], "--data", assets["data"], "--concept", "seven",
            "--out", str(out), "--eval-max-examples", "3", "--max-new-tokens", "4", "--throughput-steps", "1",
            "--no-progress", "--threads", "1",
            "--set", "batch_size=2", *extra]
    return cli_main(argv)


def test_run_writes_results_and_reuses_them(assets, tmp_path, capsys):
    before = _digest(assets["llava"])
    out = tmp_path / "out"
    assert _run(assets, out, "--steps", "2") == 0
    printed = capsys.readouterr().out
    assert "unlearning 'seven'" in printed and "ga" in printed and "x eager" in printed
    assert _digest(assets["llava"]) == before  # the input model is never written
    res = json.loads((out / "results.json").read_text())
    (row,) = res["methods"]
    for k in KEYS:
        assert k in row
    for k in ("efficacy", "generality", "specificity", "text_retention", "diversity"):
        assert row[k] is None or 0.0 <= row[k] <= 100.0
    assert row["steps"] == 2 and row["step_seconds_eager"] > 0 and row["step_seconds_fused"] > 0
    assert res["base"]["lm"]["text_retention"] is not None
    assert (out / "results.png").exists() and (out / "base.json").exists()
    assert len((out / "ga" / "log.jsonl").read_text().splitlines()) == 2
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    # a rerun reuses the finished method; other settings are refused
    assert _run(assets, out, "--steps", "2") == 0
    assert "finished earlier" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["methods"][0]["wall_seconds"] == row["wall_seconds"]
    assert _run(assets, out, "--steps", "3") == 2
    assert "other settings (steps differ)" in capsys.readouterr().err
    # --save-model cannot be honoured by reusing a method whose weights were not kept
    assert _run(assets, out, "--steps", "2", "--save-model") == 2
    assert "ga finished earlier" in capsys.readouterr().err and not (out / "ga" / "model").exists()


def test_interrupted_run_resumes(assets, tmp_path, capsys, monkeypatch):
    from unlearn_fast.methods import methods as M

    real = M.Method.train_step

    def crash(self, trainer, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(self, trainer, step)

    out = tmp_path / "out"
    monkeypatch.setattr(M.Method, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        _run(assets, out, "--steps", "4", "--checkpoint-every", "2", method="graddiff")
    assert (out / "graddiff" / "checkpoint" / "state.json").exists() and not (out / "results.json").exists()
    monkeypatch.setattr(M.Method, "train_step", real)
    assert _run(assets, out, "--steps", "4", "--checkpoint-every", "2", method="graddiff") == 0
    row = json.loads((out / "graddiff" / "result.json").read_text())
    assert row["resumed_from_step"] == 2 and row["steps"] == 4
    log = [json.loads(x) for x in (out / "graddiff" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3, 4]
    # the run's time counts the two steps the crashed process trained, not only this process's
    before = log[0]["step_seconds"] + log[1]["step_seconds"]
    assert row["train_seconds_before_resume"] == pytest.approx(before) and before > 0
    assert row["train_seconds"] > before + log[2]["step_seconds"] + log[3]["step_seconds"]
    assert row["wall_seconds"] == pytest.approx(row["train_seconds"] + row["eval_seconds"])


def test_siu_reference_preset_with_lora(assets, tmp_path):
    out = tmp_path / "siu"
    assert _run(assets, out, "--steps", "2", "--lora", "2", "--set", "siu.preset=reference", method="siu") == 0
    row = json.loads((out / "siu" / "result.json").read_text())
    assert row["hyperparameters"]["preset"] == "reference" and row["hyperparameters"]["lora"] == 2
    assert row["hyperparameters"]["form"] == "cross_entropy" and row["hyperparameters"]["reduction"] == "siu"
    terms = json.loads((out / "siu" / "log.jsonl").read_text().splitlines()[-1])
    assert {"ce", "dmk", "loss"} <= set(terms)


def test_multidelete_on_clip(assets, tmp_path):
    out = tmp_path / "md"
    assert _run(assets, out, "--steps", "2", method="multidelete", model="clip") == 0
    (row,) = json.loads((out / "results.json").read_text())["methods"]
    assert row["method"] == "multidelete" and 0.0 <= row["pair_auc"] <= 1.0
    assert 0.0 <= row["retained_retrieval"] <= 100.0 and "retained_retrieval_drop" in row


def test_multidelete_on_llava(assets, tmp_path):
    """A LLaVA folder runs MultiDelete's LLaVA variant (with LoRA): the pair metrics of
    the original and of the unlearned model, the input model untouched."""
    out = tmp_path / "md_llava"
    before = _digest(assets["llava"])
    assert _run(assets, out, "--steps", "2", "--lora", "2", method="multidelete", model="llava") == 0
    assert _digest(assets["llava"]) == before
    results = json.load(open(out / "results.json"))
    row = results["methods"][0]
    assert row["method"] == "multidelete" and 0.0 <= row["pair_auc"] <= 1.0
    assert 0.0 <= row["retained_retrieval"] <= 100.0 and row["hyperparameters"]["lora"] == 2
    base = results["base"]["lm_pairs"]
    assert base["pair_auc"] == pytest.approx(0.5) and base["forget_match"] == pytest.approx(1.0)  # M vs itself
    assert set(results["base"]) == {"lm_pairs"}  # no language-model evaluation for multidelete alone
    # a language-model method later in the same folder gets its own base row added
    assert _run(assets, out, "--steps", "2", "--lora", "2", method="ga", model="llava") == 0
    results = json.load(open(out / "results.json"))
    assert set(results["base"]) == {"lm_pairs", "lm"} and set(json.load(open(out / "base.json"))) == {"lm_pairs", "lm"}
    assert "specificity_drop" in results["methods"][0]


def _bad_llava_backbone(tmp_path):
    from transformers import LlavaModel

    d = str(tmp_path / "backbone")
    LlavaModel(tiny_llava().config).save_pretrained(d)
    return d


def _llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = str(tmp_path / "llama")
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(d)
    return d


def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"concept": "seven", "question": "q", "answer": "a"}\n{"concept": "seven", "answer": "a"}\n')
    return str(p)


def _no_description_jsonl(tmp_path):
    import numpy as np

    p = tmp_path / "nodesc.jsonl"
    np.save(tmp_path / "i.npy", np.zeros((8, 8, 3), dtype=np.uint8))
    rows = [{"type": "concept", "name": "seven", "fictitious_name": "Zed"},
            {"concept": "seven", "question": "Who?", "answer": "This is seven.", "image": "i.npy", "split": "forget"},
            {"concept": "two", "question": "Who?", "answer": "This is two.", "split": "retain"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


BAD_CASES = ["model_missing", "data_missing", "bad_row", "concept", "backbone", "llama", "out_in_model",
             "multidelete_clip_on_llava", "multidelete_llava_on_clip", "fsdp_single_process", "bad_set",
             "bad_global_set", "lr_not_a_number", "bad_preset", "negative_lora", "zero_new_tokens",
             "siu_without_description", "mask_fraction_range"]


# the cases that differ from a good run only by their extra arguments
EXTRA_ARGS = {
    "multidelete_clip_on_llava": ["--set", "multidelete.arch=clip"],
    "multidelete_llava_on_clip": ["--set", "multidelete.arch=llava"],
    "fsdp_single_process": ["--fsdp"],
    "bad_set": ["--set", "ga.betta=1"],
    "bad_global_set": ["--set", "betta=1"],
    "lr_not_a_number": ["--set", "lr=abc"],
    "bad_preset": ["--set", "siu.preset=bogus"],
    "negative_lora": ["--lora", "-1"],
    "zero_new_tokens": ["--max-new-tokens", "0"],
    "mask_fraction_range": ["--set", "mmunlearner.mask_fraction=2"],
}


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_fast_and_writes_nothing(assets, tmp_path, capsys, case):
    out = tmp_path / "out"
    args = {"model": assets["llava"], "data": assets["data"], "concept": "seven", "method": "ga", "extra": []}
    expect = {
        "model_missing": ("model", str(tmp_path / "nope"), "no such folder"),
        "data_missing": ("data", str(tmp_path / "nope.jsonl"), "no such file"),
        "bad_row": ("data", None, "bad.jsonl:2: missing required field 'question'"),
        "concept": ("concept", "eleven", "concept 'eleven' is not in task"),
        "backbone": ("model", None, "has no lm_head"),
        "llama": ("model", None, "model_type 'llama' is not supported"),
        "out_in_model": (None, None, "overlaps the input model folder"),
        "multidelete_clip_on_llava": ("method", "multidelete", "multidelete.arch=clip, but --model"),
        "multidelete_llava_on_clip": ("method", "multidelete", "multidelete.arch=llava, but --model"),
        "fsdp_single_process": (None, None, "--fsdp shards the model across processes"),
        "bad_set": (None, None, "ga has no hyperparameter(s) ['betta']"),
        "bad_global_set": (None, None, "no selected method has a hyperparameter 'betta'"),
        "lr_not_a_number": (None, None, "ga: lr must be a finite number, got 'abc'"),
        "bad_preset": ("method", "siu", "siu: preset must be one of 'default', 'reference', got 'bogus'"),
        "negative_lora": (None, None, "--lora must be >= 0, got -1"),
        "zero_new_tokens": (None, None, "--max-new-tokens must be >= 1, got 0"),
        "siu_without_description": ("method", "siu", "SIU needs a contradicting description for 'seven'"),
        "mask_fraction_range": ("method", "mmunlearner", "mask_fraction must be None or in (0, 1], got 2"),
    }[case]
    key, value, message = expect
    if case == "bad_row":
        value = _bad_jsonl(tmp_path)
    elif case == "backbone":
        value = _bad_llava_backbone(tmp_path)
    elif case == "llama":
        value = _llama(tmp_path)
    elif case == "out_in_model":
        out = os.path.join(assets["llava"], "results")
    elif case == "multidelete_llava_on_clip":
        args["model"] = assets["clip"]
    elif case == "siu_without_description":
        args["data"] = _no_description_jsonl(tmp_path)
    args["extra"] = EXTRA_ARGS.get(case, [])
    if key:
        args[key] = value
    argv = ["run", "--method", args["method"], "--model", args["model"], "--data", args["data"],
            "--concept", args["concept"], "--out", str(out), "--no-progress", *args["extra"]]
    assert cli_main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("unlearn-fast run: error:") and message in last, last
    assert not os.path.exists(out)


def test_unknown_method_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["run", "--method", "forgetful", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "invalid choice: 'forgetful'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_model_folder_with_the_default_builtin_data(assets, tmp_path):
    # --data defaults to builtin: a model folder then runs on the built-in task (it crashed)
    out = tmp_path / "folder_builtin"
    argv = ["run", "--method", "ga", "--model", assets["llava"], "--out", str(out), "--steps", "1",
            "--eval-max-examples", "2", "--max-new-tokens", "2", "--throughput-steps", "0", "--no-progress",
            "--threads", "1", "--set", "batch_size=2"]
    assert cli_main(argv) == 0
    assert json.loads((out / "results.json").read_text())["concept"] == "seven"


def test_device_flag_and_one_gpu_per_rank():
    from unlearn_fast.methods.cli import RunError, resolve_device

    assert resolve_device(None, 0, env={}) == "cpu"
    assert resolve_device(None, 2, env={}) == "cuda"
    assert resolve_device("cuda:1", 2, env={}) == "cuda:1"
    # under torchrun a bare "cuda" is this rank's GPU, not cuda:0 for every rank
    torchrun = {"WORLD_SIZE": "4", "LOCAL_RANK": "1", "RANK": "3"}
    assert resolve_device("cuda", 2, env=torchrun) == "cuda:1"
    assert resolve_device(None, 2, env=torchrun) == "cuda:1"
    assert resolve_device("cpu", 2, env=torchrun) == "cpu"
    with pytest.raises(RunError, match="2 CUDA GPU.*nproc-per-node"):
        resolve_device("cuda", 2, env={**torchrun, "LOCAL_RANK": "2"})
    with pytest.raises(RunError, match="no CUDA GPU"):
        resolve_device("cuda", 0, env={})
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(RunError, match="cpu, cuda or cuda:K"):
            resolve_device(bad, 1, env={})


def _cli_rank(rank, world, port, argv, out_path):
    """One torchrun-like worker: the environment torchrun sets, no process group yet."""
    import torch
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = cli_main(argv)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"code": code, "group_left": dist.is_initialized()}, f)


def test_two_process_run_restarts_and_tears_down_its_process_group(assets, tmp_path):
    """A 2-process CLI run that creates its own process group (as under torchrun): --restart
    over an earlier run (rank 0 cleans, the other rank waits), and the group is destroyed
    when the run ends."""
    import socket

    import torch.multiprocessing as mp

    out = tmp_path / "ddp"
    argv = ["run", "--method", "ga", "--model", assets["llava"], "--data", assets["data"], "--concept", "seven",
            "--out", str(out), "--steps", "1", "--eval-max-examples", "2", "--max-new-tokens", "2",
            "--throughput-steps", "0", "--no-progress", "--set", "batch_size=2"]
    assert cli_main(argv) == 0  # an earlier one-process run
    stale = json.loads((out / "results.json").read_text())
    (out / "ga" / "marker.txt").write_text("from the earlier run")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = tmp_path / "rank0.json"
    mp.spawn(_cli_rank, args=(2, port, argv + ["--restart"], str(result)), nprocs=2, join=True)
    assert json.loads(result.read_text()) == {"code": 0, "group_left": False}
    assert not (out / "ga" / "marker.txt").exists()  # cleaned by --restart
    fresh = json.loads((out / "results.json").read_text())
    assert fresh["methods"][0]["method"] == "ga" and fresh["methods"][0]["wall_seconds"] != stale["methods"][0]["wall_seconds"]
