"""Model-level metrics on a tiny random LLaVA (the built-in architecture; image + text
rows): the one-pass fused scores against the per-metric eager reference (float64
oracle), batched greedy generation against one-at-a-time generation and a plain argmax
loop, fluency / C-Dis / multiple choice against straightforward full-logit code."""
import copy
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from unlearn_fast import metrics as M
from unlearn_fast.data import Example
from unlearn_fast.metrics import reference
from unlearn_fast.metrics._model import forward_inputs
from unlearn_fast.models import get_adapter

from metrics_common import one_thread, task_and_tokenizer, tiny_llava

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)

QA = [
    ("What is seven plus one?", "Eight."),
    ("Is nine odd or even?", "Odd."),
    ("Do you know what three is?", "It is probably a three or maybe an eight, hard to tell from here."),
    ("What comes after two?", "Three comes after two."),
    ("What is six?", "Six is a number between five and seven."),
]
OPTIONS = [("Eight.", "Nine.", "Seven is after six and before eight."), ("Odd.", "Even.")]


@pytest.fixture(scope="module")
def setup():
    task, tok = task_and_tokenizer()
    model = tiny_llava(seed=0)
    model64 = copy.deepcopy(model).double()
    examples = [Example(id=f"ex{i}", concept="seven", question=q, answer=a, kind="text")
                for i, (q, a) in enumerate(QA)]
    examples = examples[:2] + task.forget_set("seven")[:2] + examples[2:] + task.holdout_set("three")[:1]
    return tok, model, model64, get_adapter(model), examples


def test_sequence_scores_match_per_metric_eager_oracle(setup):
    tok, model, model64, adapter, examples = setup
    oracle = reference.per_metric_scores(model64, adapter, examples, tokenizer=tok, batch_size=3)
    fused = M.sequence_scores(model, adapter, examples, tokenizer=tok, batch_size=4)  # auto: cpp on float32
    exact = M.sequence_scores(model64, adapter, examples, tokenizer=tok, batch_size=5)  # eager float64
    assert set(fused) == set(M.SCORE_NAMES)
    assert fused["num_tokens"].tolist() == exact["num_tokens"].tolist()
    assert min(fused["num_tokens"].tolist()) >= 2
    for name, ref in oracle.items():
        assert torch.allclose(exact[name], ref, rtol=1e-9, atol=1e-9), (name, (exact[name] - ref).abs().max())
        assert torch.allclose(fused[name], ref, rtol=2e-4, atol=2e-4), (name, fused[name], ref)
    # the scores are not degenerate: examples differ
    assert fused["loss"].std() > 0.1
    assert 0 < fused["exact_memorization"].max() or fused["exact_memorization"].min() < 1


def test_sequence_scores_accepts_collated_batches(setup):
    tok, model, _, adapter, examples = setup
    batches = [adapter.collate(examples[:4], tok), adapter.collate(examples[4:], tok)]
    a = M.sequence_scores(model, adapter, batches, tokenizer=tok)
    b = M.sequence_scores(model, adapter, examples, tokenizer=tok, batch_size=2)
    for name in M.SCORE_NAMES:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), name
    with pytest.raises(ValueError, match="tokenizer"):
        M.sequence_scores(model, adapter, batches)


def test_batched_greedy_generation_equals_unbatched(setup):
    tok, _, model64, adapter, examples = setup
    # token for token, on a left-padded batch of prompts of different lengths
    batch = adapter.collate(examples, tok, with_answer=False, padding_side="left")
    assert not bool(batch["attention_mask"][:, 0].all())  # really padded
    ids = M.generate_greedy(model64, adapter, batch, max_new_tokens=8, eos_token_id=tok.eos_token_id)
    for e, row in zip(examples, ids):
        one = M.generate_greedy(model64, adapter, adapter.collate([e], tok, with_answer=False, padding_side="left"),
                                max_new_tokens=8, eos_token_id=tok.eos_token_id)[0]
        assert row == one
    assert sum(len(r) for r in ids) > 0
    # decoded answers, length-sorted batches of 3, back in input order
    texts = M.generate_answers(model64, adapter, examples, tokenizer=tok, batch_size=3, max_new_tokens=8)
    assert texts == [tok.decode(r, skip_special_tokens=True).strip() for r in ids]


def _manual_greedy(model, adapter, tok, example, steps):
    """Full forward over the whole sequence at every step, argmax of the last logits."""
    batch = adapter.collate([example], tok, with_answer=False)
    batch["pixel_values"] = batch.get("pixel_values", torch.empty(0)).to(model.dtype)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            kw = forward_inputs(model, batch, adapter)
            if not kw.get("pixel_values", torch.empty(0)).numel():
                kw.pop("pixel_values", None)
            nxt = int(model(**kw).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.tensor([[nxt]])], dim=1)
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    return out


def test_greedy_matches_a_plain_argmax_loop_and_stops(setup):
    tok, _, model64, adapter, examples = setup
    for e in examples[:3]:
        got = M.generate_greedy(model64, adapter, adapter.collate([e], tok, with_answer=False, padding_side="left"),
                                max_new_tokens=8, eos_token_id=tok.eos_token_id)[0]
        assert got == _manual_greedy(model64, adapter, tok, e, 8)
    # eos = the first generated token -> nothing is returned for that row
    batch = adapter.collate(examples[:2], tok, with_answer=False, padding_side="left")
    first = M.generate_greedy(model64, adapter, batch, max_new_tokens=1, eos_token_id=tok.eos_token_id)
    assert all(len(r) <= 1 for r in first)
    stop_at = [r[0] for r in first if r]
    if stop_at:
        cut = M.generate_greedy(model64, adapter, batch, max_new_tokens=6, eos_token_id=stop_at)
        assert all(t not in stop_at for r in cut for t in r)
    # stop strings: the decoded answer never contains them
    full = M.generate_answers(model64, adapter, examples[:4], tokenizer=tok, max_new_tokens=8)
    word = next((a[2:4] for a in full if len(a) >= 5), None)
    assert word is not None, full
    cut = M.generate_answers(model64, adapter, examples[:4], tokenizer=tok, max_new_tokens=8, stop_strings=[word])
    assert all(word not in c and a.startswith(c) for a, c in zip(full, cut))
    assert any(c != a for a, c in zip(full, cut))


def test_generate_greedy_refuses_right_padding(setup):
    tok, model, _, adapter, examples = setup
    batch = adapter.collate(examples[:3], tok, with_answer=False, padding_side="right")
    with pytest.raises(ValueError, match="left"):
        M.generate_greedy(model, adapter, batch)
    with pytest.raises(ValueError, match="max_new_tokens"):
        M.generate_greedy(model, adapter, batch, max_new_tokens=0)


def _eager_token_nll(model, adapter, tok, examples):
    """(B, T-1) NLL from full logits and the shifted labels."""
    batch = adapter.collate(examples, tok)
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    with torch.no_grad():
        logits = model(**forward_inputs(model, batch, adapter)).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll, labels, logits


def test_fluency_excludes_name_tokens(setup):
    tok, model, model64, adapter, examples = setup
    refs = ["This is seven.", "Seven is seven.", "Odd, not seven.", "", "Three.", "Zero seven zero.", "Six.", "7 or 8"]
    from unlearn_fast.data import name_token_ids

    name_ids = name_token_ids(tok, ("seven", "7"))
    assert name_ids
    got = M.fluency(model, adapter, examples, refs, name_ids, tokenizer=tok)
    rows = [replace(e, answer=r) for e, r in zip(examples, refs) if r]
    nll, labels, _ = _eager_token_nll(model64, adapter, tok, rows)
    keep = (labels != -100) & ~torch.isin(labels, torch.tensor(name_ids))
    expected = math.exp(float(nll[keep].sum() / keep.sum()))
    assert got == pytest.approx(expected, rel=1e-4)
    everything = M.fluency(model, adapter, examples, refs, [], tokenizer=tok)
    assert everything != pytest.approx(got, rel=1e-3)  # the exclusion changes the number
    with pytest.raises(ValueError, match="differ in length"):
        M.fluency(model, adapter, examples, refs[:2], name_ids, tokenizer=tok)


def test_c_dis_matches_full_softmax(setup):
    tok, model, model64, adapter, examples = setup
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = [5, 17, 42]
    got = M.c_dis(student, model, adapter, examples, ids, tokenizer=tok, batch_size=3)
    _, labels, lt = _eager_token_nll(model64, adapter, tok, examples)
    _, _, ls = _eager_token_nll(copy.deepcopy(student).double(), adapter, tok, examples)
    mask = labels != -100
    lp = lt.log_softmax(-1)[mask][:, ids]
    lq = ls.log_softmax(-1)[mask][:, ids]
    expected = float((lp.exp() * (lp - lq)).abs().mean())
    assert got == pytest.approx(expected, rel=1e-4)
    assert M.c_dis(model, model, adapter, examples, ids, tokenizer=tok) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="empty"):
        M.c_dis(student, model, adapter, examples, [], tokenizer=tok)


def test_multiple_choice_one_pass_matches_per_option_loop(setup):
    tok, model, model64, adapter, _ = setup
    task, _ = task_and_tokenizer()
    qs = [Example(id="q0", concept="seven", question="What is seven plus one?", answer=OPTIONS[0][0],
                  options=OPTIONS[0], answer_index=0, kind="text"),
          task.forget_set("seven")[0],  # image + text, the built-in options
          Example(id="q2", concept="nine", question="Is nine odd or even, really?", answer=OPTIONS[1][1],
                  options=OPTIONS[1], answer_index=1, kind="text")]
    for normalize in ("mean", "sum"):
        got = M.multiple_choice_accuracy(model, adapter, qs, tokenizer=tok, normalize=normalize, batch_size=2)
        expected_pred = []
        for q in qs:
            vals = []
            for opt in q.options:
                nll, labels, _ = _eager_token_nll(model64, adapter, tok, [replace(q, answer=opt, options=(),
                                                                                  answer_index=None)])
                s = -float(nll.sum())
                vals.append(s / int((labels != -100).sum()) if normalize == "mean" else s)
            expected_pred.append(max(range(len(vals)), key=lambda i: (vals[i], -i)))
        assert got["predicted_index"] == expected_pred
        correct = [p == q.answer_index for p, q in zip(expected_pred, qs)]
        assert got["accuracy"] == pytest.approx(100 * sum(correct) / 3)
        assert got["image_text_accuracy"] == pytest.approx(100.0 * correct[1])
        assert got["text_only_accuracy"] == pytest.approx(100 * (correct[0] + correct[2]) / 2)
    bad = [Example(id="b", concept="", question="?", answer="only", kind="text")]
    with pytest.raises(ValueError, match="0 option"):
        M.multiple_choice_accuracy(model, adapter, bad, tokenizer=tok)
