"""MultiDelete's decoder-VLM variant (``multidelete.arch=llava``: the last token's hidden
state as the fused representation) on a tiny Qwen2-VL: the representations do not depend
on the other rows of a batch (3-D rotary positions under padding), a short run trains the
student only, and the pair evaluation runs."""
import math

import torch

from tiny_models import task_and_tokenizer, tiny_qwen2vl
from unlearn_fast.methods.multidelete import run_multidelete
from unlearn_fast.methods.multidelete_llava import evaluate_llava_pairs, last_token_states
from unlearn_fast.models import get_adapter

CONCEPT = "seven"


def test_qwen2vl_last_token_states_are_per_row():
    task, tok = task_and_tokenizer()
    model = tiny_qwen2vl()
    ad = get_adapter(model)
    imgs, caps, _ = task.image_caption_pairs(CONCEPT)
    rows_i = [imgs[0], None, imgs[1]]
    rows_c = [caps[0] + " and more words here", caps[1], None]  # three lengths, mixed modalities
    with torch.no_grad():
        batch = last_token_states(model, ad, tok, rows_i, rows_c)
        alone = torch.cat([last_token_states(model, ad, tok, [i], [c]) for i, c in zip(rows_i, rows_c)])
    assert batch.shape == (3, model.config.text_config.hidden_size)
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)


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
