"""A 2-process gloo run of a method on the built-in data equals the 1-process run:
each rank trains on its half of every global batch, the losses are means over the
global batch and the gradients are averaged, so the weights and losses agree."""
import pytest
import torch

from helpers import one_thread, run_on_gloo_ranks

pytestmark = pytest.mark.distributed

OVERRIDES = {
    "default": {"steps": 3, "batch_size": 4, "lora": 2, "lr": 1e-2},
    # a summed DMK (once 1/world of one process's) and shifted images (once drawn per rank)
    "sum_shift": {"steps": 3, "batch_size": 12, "lora": 2, "lr": 1e-2, "reduction": "sum", "augment_shift": 2},
}


def _train(variant):
    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()  # the built-in digits task
    res = run_lm_method("siu", tiny_llava(), tok, task, "seven", overrides=OVERRIDES[variant], progress=False)
    return {"state": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
            "losses": [h[k] for h in res.history for k in ("ce", "dmk", "loss")]}


def _on_rank(rank, variant):
    return _train(variant)


@pytest.mark.parametrize("variant", list(OVERRIDES))
def test_two_gloo_processes_equal_one(tmp_path, variant):
    ddp = run_on_gloo_ranks(_on_rank, tmp_path, variant)
    with one_thread():  # as the workers
        single = _train(variant)
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    for name, w in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    base = __import__("tiny_models").tiny_llava().state_dict()
    changed = sum(int(not torch.equal(base[n], w)) for n, w in single["state"].items() if n in base)
    assert changed > 0  # the run did train (LoRA merged into the weights)


# MultiDelete: an odd batch (shares of 3 and 2 pairs), so per-rank means would differ from
# the global mean; the mismatched captions are drawn over the global batch
MULTIDELETE = {
    "clip_mse": ("clip", {"steps": 3, "batch_size": 5, "lr": 1e-2}),
    "clip_cosine": ("clip", {"steps": 3, "batch_size": 5, "lr": 1e-2, "distance": "cosine",
                             "unimodal": "image+text"}),
    "llava": ("llava", {"steps": 2, "batch_size": 5, "lr": 1e-3}),
}


def _train_multidelete(variant):
    from tiny_models import task_and_tokenizer, tiny_clip, tiny_llava
    from unlearn_fast.methods.multidelete import run_multidelete

    arch, overrides = MULTIDELETE[variant]
    task, tok = task_and_tokenizer()
    res = run_multidelete(tiny_clip() if arch == "clip" else tiny_llava(), tok, task, "seven",
                          overrides=overrides, progress=False)
    return {"state": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
            "losses": [h[k] for h in res.history for k in ("md", "multi", "uni", "loss")]}


def _multidelete_on_rank(rank, variant):
    return _train_multidelete(variant)


@pytest.mark.parametrize("variant", list(MULTIDELETE))
def test_multidelete_two_gloo_processes_equal_one(tmp_path, variant):
    ddp = run_on_gloo_ranks(_multidelete_on_rank, tmp_path, variant)
    with one_thread():
        single = _train_multidelete(variant)
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)
    for name, w in single["state"].items():
        if name.endswith("k_proj.bias"):
            continue  # zero gradient in exact arithmetic: AdamW amplifies rounding noise (test_fsdp_run)
        torch.testing.assert_close(ddp["state"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    arch = MULTIDELETE[variant][0]
    base = getattr(__import__("tiny_models"), f"tiny_{arch}")().state_dict()
    assert sum(int(not torch.equal(base[n], w)) for n, w in single["state"].items() if n in base) > 0
