"""MultiDelete's decoder-VLM variant (``multidelete.arch=llava``: the last token's hidden
state as the fused representation) on a tiny Qwen2-VL: a short run trains the student
only, and the pair evaluation runs (that a row's representation does not depend on the
other rows of a batch: test_multidelete_llava.py, both architectures)."""
import math

import torch

from tiny_models import task_and_tokenizer, tiny_qwen2vl
from unlearn_fast.methods.multidelete import run_multidelete
from unlearn_fast.methods.multidelete_llava import evaluate_llava_pairs
from unlearn_fast.models import get_adapter

CONCEPT = "seven"


def test_qwen2vl_multidelete_run_and_evaluation():
    task, tok = task_and_tokenizer()
    base = tiny_qwen2vl()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    res = run_multidelete(base, tok, task, CONCEPT, overrides={"arch": "llava", "steps": 3, "batch_size": 3},
                          progress=False)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the input is untouched
    assert type(res.model).__name__ == "Qwen2VLForConditionalGeneration"
    assert all(math.isfinite(h["loss"]) for h in res.history) and len(res.history) == 3
    assert any(h["md"] > 0 for h in res.history)
    changed = sum(int(not torch.equal(before[k], v)) for k, v in res.model.state_dict().items())
    assert changed > 0
    row = evaluate_llava_pairs(res.model, get_adapter(res.model), tok, task, CONCEPT, reference_model=base,
                               max_examples=6)
    assert 0.0 <= row["pair_auc"] <= 1.0 and 0.0 <= row["retained_retrieval"] <= 100.0
    assert row["num_forget_pairs"] == 6 and row["num_retain_pairs"] == 6
