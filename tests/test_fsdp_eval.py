"""Evaluation with an FSDP-sharded model (no full-weight gather): each rank evaluates its
shard of the examples in lockstep (shards padded to equal length, greedy decoding synced
across ranks); the 2-process results equal one process on the same weights."""
import pytest
import torch

from helpers import one_thread, run_on_gloo_ranks

pytestmark = pytest.mark.distributed

EVAL_KW = dict(max_examples=5, max_new_tokens=5, batch_size=2, progress_bar=False)


def _evaluate(model, reference):
    from tiny_models import task_and_tokenizer
    from unlearn_fast.metrics import evaluate_task
    from unlearn_fast.metrics.generation import generate_answers
    from unlearn_fast.models import get_adapter

    task, tok = task_and_tokenizer()
    adapter = get_adapter(model)
    row = evaluate_task(model, adapter, tok, task, "seven", reference_model=reference, **EVAL_KW)
    # rows that stop at different steps: an end-of-sequence id the random model emits often
    rows = task.forget_set("seven", kind="vqa")[:5] + task.text_facts("seven")[:2]
    answers = {eos: generate_answers(model, adapter, rows, tokenizer=tok, eos_token_id=eos, batch_size=2,
                                     max_new_tokens=6, progress_bar=False) for eos in _frequent_ids()}
    return row, answers


def _frequent_ids():
    return tuple(torch.load(_frequent_ids.path)) if hasattr(_frequent_ids, "path") else ()


def _on_rank(rank, ids_path):
    from tiny_models import tiny_llava
    from unlearn_fast.methods import fsdp
    from unlearn_fast.models import get_adapter

    _frequent_ids.path = ids_path
    model = tiny_llava()
    fsdp.shard_model(model, get_adapter(model))
    return _evaluate(model, tiny_llava(seed=1))


def _common_token_ids():
    """Two token ids the random model generates often (so rows end at different steps)."""
    from collections import Counter

    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.metrics.generation import generate_greedy
    from unlearn_fast.models import get_adapter

    task, tok = task_and_tokenizer()
    model = tiny_llava()
    rows = task.forget_set("seven", kind="vqa")[:5] + task.text_facts("seven")[:2]
    batch = get_adapter(model).collate(rows, tok, with_answer=False, padding_side="left")
    ids = generate_greedy(model, get_adapter(model), batch, max_new_tokens=6, eos_token_id=-1)
    return [t for t, _ in Counter(t for row in ids for t in row[1:]).most_common(2)]


def test_fsdp_sharded_evaluation_equals_one_process(tmp_path):
    import math

    from tiny_models import tiny_llava

    ids_path = str(tmp_path / "ids.pt")
    torch.save(_common_token_ids(), ids_path)
    _frequent_ids.path = ids_path
    got_row, got_answers = run_on_gloo_ranks(_on_rank, tmp_path, ids_path)
    with one_thread():  # as the workers
        row, answers = _evaluate(tiny_llava(), tiny_llava(seed=1))
    del _frequent_ids.path
    assert answers == got_answers
    lengths = {len(a) for per_eos in answers.values() for a in per_eos}
    assert len(lengths) > 1  # rows did stop at different steps
    assert set(got_row) == set(row)
    for key, value in row.items():
        if isinstance(value, float) and math.isnan(value):
            assert math.isnan(got_row[key]), key
        else:
            assert got_row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
