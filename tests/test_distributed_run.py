"""A 2-process gloo run of a method on the built-in data equals the 1-process run:
each rank trains on its half of every global batch, the losses are means over the
global batch and the gradients are averaged, so the weights and losses agree."""
import pytest
import torch

pytestmark = pytest.mark.distributed

KW = dict(overrides={"steps": 3, "batch_size": 4, "lora": 2, "lr": 1e-2}, progress=False)


def _train():
    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()  # the built-in digits task
    res = run_lm_method("siu", tiny_llava(), tok, task, "seven", **KW)
    return {"state": {k: v.detach().clone() for k, v in res.model.state_dict().items()},
            "losses": [h[k] for h in res.history for k in ("ce", "dmk", "loss")]}


def _worker(rank, world, store, out_path, tests_dir):
    import sys

    import torch.distributed as dist

    sys.path.insert(0, tests_dir)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        res = _train()
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    import os

    import torch.multiprocessing as mp

    out_path = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out_path, os.path.dirname(__file__)), nprocs=2, join=True)
    ddp = torch.load(out_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        single = _train()
    finally:
        torch.set_num_threads(threads)
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7)
    for name, w in single["state"].items():
        torch.testing.assert_close(ddp["state"][name], w, rtol=1e-5, atol=1e-6, msg=name)
    base = __import__("tiny_models").tiny_llava().state_dict()
    changed = sum(int(not torch.equal(base[n], w)) for n, w in single["state"].items() if n in base)
    assert changed > 0  # the run did train (LoRA merged into the weights)
