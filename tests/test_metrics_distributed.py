"""Sharded evaluation over 2 gloo processes gives what one process gives: per-example
scores (fused path), greedy answers and multiple-choice predictions, in input order."""
import os

import pytest
import torch

from unlearn_fast import metrics as M

from _pending_substrate import Example, TextLMAdapter, build_tokenizer

pytestmark = pytest.mark.distributed

QUESTIONS = ["What is seven plus one?", "Who is this?", "Is nine odd or even?", "Name the digit.",
             "What comes after two, please tell me?", "Zero?", "What is six?", "Count to three."]
ANSWERS = ["Eight.", "This is seven.", "Odd.", "It is a three.", "Three comes after two.", "Round.", "A number.",
           "One two three."]


def _setup():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(QUESTIONS + ANSWERS + ["USER:", "ASSISTANT:"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    examples = [Example(id=f"e{i}", concept="", question=q, answer=a, options=(a, ANSWERS[(i + 1) % 8]),
                        answer_index=i % 2)
                for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))]
    return tok, model, TextLMAdapter(), examples


def _evaluate(shard):
    tok, model, adapter, examples = _setup()
    scores = M.sequence_scores(model, adapter, examples, tokenizer=tok, batch_size=3, shard=shard)
    model64 = model.double()  # greedy choices without float32 near-ties
    answers = M.generate_answers(model64, adapter, examples, tokenizer=tok, batch_size=3, max_new_tokens=5,
                                 shard=shard)
    mc = M.multiple_choice_accuracy(model64, adapter, examples, tokenizer=tok, batch_size=4, shard=shard)
    return {"scores": scores, "answers": answers, "mc": mc["predicted_index"]}


def _worker(rank, world, store, out_path):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        assert M.distributed.world() == (rank, world) and M.distributed.resolve_shard("auto")
        res = _evaluate("auto")
        if rank == 0:
            torch.save(res, out_path)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    out_path = str(tmp_path / "sharded.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out_path), nprocs=2, join=True)
    sharded = torch.load(out_path)
    single = _evaluate(False)
    assert sharded["answers"] == single["answers"]
    assert sharded["mc"] == single["mc"]
    for name in M.SCORE_NAMES:
        assert torch.allclose(sharded["scores"][name], single["scores"][name], rtol=1e-5, atol=1e-6), name
    assert os.path.exists(out_path)
