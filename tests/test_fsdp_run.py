"""FSDP mode (methods/fsdp.py): a 2-process gloo run of ga_kl under FSDP2 (the model's
decoder / vision blocks and backbone sharded, the frozen reference copy sharded the same
way) gives the same losses and weights as one ordinary process."""
import pytest
import torch

from helpers import one_thread, run_on_gloo_ranks

pytestmark = pytest.mark.distributed

KW = dict(overrides={"steps": 3, "batch_size": 4, "lr": 1e-2}, progress=False)


def _train(fsdp: bool, save_dir=None):
    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.runner import run_lm_method, save_unlearned_model

    task, tok = task_and_tokenizer()
    res = run_lm_method("ga_kl", tiny_llava(), tok, task, "seven", fsdp=fsdp, **KW)
    assert res.sharded == fsdp
    if fsdp:  # the weights as saved (gathered to rank 0 only)
        save_unlearned_model(res, save_dir)
        if torch.distributed.get_rank() != 0:
            return None
        from transformers import LlavaForConditionalGeneration

        state = LlavaForConditionalGeneration.from_pretrained(save_dir).state_dict()
    else:
        state = res.model.state_dict()
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "losses": [h[k] for h in res.history for k in ("forget_ce", "retain_kl", "loss", "grad_norm")]}


def _on_rank(rank, save_dir):
    from tiny_models import tiny_llava
    from unlearn_fast.methods import fsdp
    from unlearn_fast.models import get_adapter

    model = tiny_llava()
    groups = fsdp.shard_model(model, get_adapter(model))
    sharded = sum(fsdp.is_sharded(p) for p in model.parameters())
    res = _train(fsdp=True, save_dir=save_dir)
    if res is None:  # not rank 0: the saved weights are on rank 0 only
        return None
    return {**res, "groups": groups, "sharded": sharded, "head_sharded": fsdp.is_sharded(model.lm_head.weight)}


def test_fsdp_two_gloo_processes_equal_one(tmp_path):
    got = run_on_gloo_ranks(_on_rank, tmp_path, str(tmp_path / "saved"))
    assert "model.language_model.layers.0" in got["groups"] and "model" in got["groups"]
    assert got["sharded"] > 0 and not got["head_sharded"]  # the lm_head stays replicated
    with one_thread():  # as the workers
        single = _train(fsdp=False)
    assert got["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7)
    assert set(got["state"]) == set(single["state"])
    for name, w in single["state"].items():
        if name.endswith("k_proj.bias"):
            # softmax(q.(k + b)) does not depend on the key bias: its gradient is exactly 0
            # in exact arithmetic, so AdamW turns rounding noise (which differs with the
            # reduction order) into lr-sized steps; nothing to compare
            continue
        torch.testing.assert_close(got["state"][name], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    base = __import__("tiny_models").tiny_llava().state_dict()
    assert sum(int(not torch.equal(base[n], w)) for n, w in single["state"].items()) > 0  # it did train


def test_fsdp_refuses_what_it_cannot_do(tmp_path):
    import json

    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()
    with pytest.raises(RuntimeError, match="needs torch.distributed initialised"):
        run_lm_method("ga", tiny_llava(), tok, task, "seven", fsdp=True, progress=False, overrides={"steps": 1})
    # an FSDP (sharded) checkpoint is not silently ignored or misread by a plain run
    (tmp_path / "checkpoint" / "sharded").mkdir(parents=True)
    (tmp_path / "checkpoint" / "state.json").write_text(json.dumps({"step": 1, "history": []}))
    with pytest.raises(ValueError, match="holds an FSDP .sharded. checkpoint; resume it with --fsdp"):
        run_lm_method("ga", tiny_llava(), tok, task, "seven", progress=False, overrides={"steps": 2},
                      out_dir=str(tmp_path))
