"""Sharded evaluation over 2 gloo processes gives what one process gives: per-example
scores (fused path), greedy answers and multiple-choice predictions, in input order."""

import pytest
import torch

from unlearn_fast import metrics as M

from metrics_common import task_and_tokenizer, tiny_llava

pytestmark = pytest.mark.distributed


def _evaluate(tok, examples, shard):
    from unlearn_fast.models import get_adapter

    model = tiny_llava(seed=1, tokenizer=tok)
    adapter = get_adapter(model)
    scores = M.sequence_scores(model, adapter, examples, tokenizer=tok, batch_size=3, shard=shard)
    model64 = model.double()  # greedy choices without float32 near-ties
    answers = M.generate_answers(model64, adapter, examples, tokenizer=tok, batch_size=3, max_new_tokens=5,
                                 shard=shard)
    mc = M.multiple_choice_accuracy(model64, adapter, examples, tokenizer=tok, batch_size=4, shard=shard)
    return {"scores": scores, "answers": answers, "mc": mc["predicted_index"]}


def _worker(rank, world, store, out_path, tok_dir, examples):
    import torch.distributed as dist
    from transformers import PreTrainedTokenizerFast

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        assert M.distributed.world() == (rank, world) and M.distributed.resolve_shard("auto")
        res = _evaluate(PreTrainedTokenizerFast.from_pretrained(tok_dir), examples, "auto")
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    task, tok = task_and_tokenizer()
    # image rows with options, and text facts of different lengths
    examples = task.forget_set("seven")[:3] + task.holdout_set("two")[:2] + task.text_facts("seven")[:4]
    tok.save_pretrained(str(tmp_path / "tok"))  # the workers load it instead of retraining it
    out_path = str(tmp_path / "sharded.pt")
    # fork: the workers start in a second instead of re-importing torch (they run with
    # one intra-op thread, so the parent's OpenMP pool is never used after the fork)
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), out_path, str(tmp_path / "tok"), examples),
                       nprocs=2, join=True, start_method="fork")
    sharded = torch.load(out_path, weights_only=False)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _evaluate(tok, examples, False)
    finally:
        torch.set_num_threads(old)
    assert sharded["answers"] == single["answers"]
    assert sharded["mc"] == single["mc"]
    for name in M.SCORE_NAMES:
        assert torch.allclose(sharded["scores"][name], single["scores"][name], rtol=1e-5, atol=1e-6), name
