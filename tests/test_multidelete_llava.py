"""MultiDelete on LLaVA (methods/multidelete_llava.py): last-token representations,
the loss terms against an eager formula, where gradients flow, the frozen reference,
the losses going down, and the evaluation's matching score."""
import pytest
import torch
import torch.nn.functional as F

from tiny_models import task_and_tokenizer, tiny_clip, tiny_llava, tiny_qwen2vl
from unlearn_fast.methods.multidelete import run_multidelete
from unlearn_fast.methods.multidelete_llava import (LlavaMultiDelete, evaluate_llava_pairs, last_token_states,
                                                    match_scores)
from unlearn_fast.models import Reference, UnsupportedModelError, apply_lora, get_adapter

CONCEPT = "seven"


def _perturbed_llava(seed=1):
    model = tiny_llava(seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _method(model, reference, **hp):
    task, tok = task_and_tokenizer()
    return LlavaMultiDelete(model, get_adapter(model), tok, task, CONCEPT, reference, **{"batch_size": 3, **hp})


@pytest.mark.parametrize("make_model", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2vl"])
def test_last_token_states_shape_and_padding(make_model):
    # Qwen2-VL: 3-D rotary positions under padding
    task, tok = task_and_tokenizer()
    model = make_model()
    ad = get_adapter(model)
    imgs, caps, _ = task.image_caption_pairs(CONCEPT)
    rows_i = [imgs[0], None, imgs[1]]
    rows_c = [caps[0] + " and more words here", caps[1], None]  # three different lengths
    with torch.no_grad():
        batch = last_token_states(model, ad, tok, rows_i, rows_c)
        alone = torch.cat([last_token_states(model, ad, tok, [i], [c]) for i, c in zip(rows_i, rows_c)])
    assert batch.shape == (3, model.config.text_config.hidden_size)
    # right padding: a row's representation does not depend on the other rows
    torch.testing.assert_close(batch, alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batch[0], batch[1])
    with pytest.raises(ValueError, match="needs an image, a caption or both"):
        last_token_states(model, ad, tok, [None], [None])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        last_token_states(model, ad, tok, imgs[:2], caps[:1])


@pytest.mark.parametrize("unimodal", ["image", "image+text"])
def test_terms_match_eager(unimodal):
    model = tiny_llava()
    ref = Reference(model)
    model = _perturbed_llava()  # the student differs from the reference
    ref_model = ref.model
    md = _method(model, ref, unimodal=unimodal, uni_weight=0.5)
    terms = md.losses(2)
    f, r = md.forget(2), md.retain(2)
    f_imgs, f_caps = [x for x, _ in f], [c for _, c in f]
    r_imgs, r_caps = [x for x, _ in r], [c for _, c in r]
    perm = md.mismatched_captions(f_caps, 2)
    assert all(p != c for p, c in zip(perm, f_caps))
    ad, tok = md.adapter, md.tokenizer
    with torch.no_grad():
        h = lambda m, i, c: last_token_states(m, ad, tok, i, c)  # noqa: E731
        l_md = F.mse_loss(h(model, f_imgs, f_caps), h(ref_model, f_imgs, perm))
        l_multi = F.mse_loss(h(model, r_imgs, r_caps), h(ref_model, r_imgs, r_caps))
        s_uni, m_uni = h(model, f_imgs, [None] * len(f_imgs)), h(ref_model, f_imgs, [None] * len(f_imgs))
        if unimodal == "image+text":
            s_uni = torch.cat([s_uni, h(model, [None] * len(f_caps), f_caps)])
            m_uni = torch.cat([m_uni, h(ref_model, [None] * len(f_caps), f_caps)])
        l_uni = F.mse_loss(s_uni, m_uni)
    for name, want in (("md", l_md), ("multi", l_multi), ("uni", l_uni), ("loss", l_md + l_multi + 0.5 * l_uni)):
        torch.testing.assert_close(terms[name].detach(), want, rtol=1e-4, atol=1e-7, msg=name)
    assert float(l_multi) > 0 and float(l_uni) > 0


def test_gradients_flow_only_into_the_student():
    model = tiny_llava()
    ref = Reference(model)  # a frozen deep copy
    frozen = {n: p.detach().clone() for n, p in ref.model.named_parameters()}
    model.requires_grad_(True)
    md = _method(model, ref)
    md.losses(0)["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    ad = get_adapter(model)
    # the language model and the vision side (image rows) both get gradients
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if not ad.is_vision_parameter(n))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ad.is_vision_parameter(n))
    # the lm_head is not part of any representation
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if "lm_head" in n)
    for n, p in ref.model.named_parameters():
        assert p.grad is None and not p.requires_grad and torch.equal(p, frozen[n]), n


def test_lora_reference_is_shared_and_only_adapters_train():
    model = apply_lora(tiny_llava(), r=2)
    ref = Reference(model)
    assert ref.shared and ref.model is model
    md = _method(model, ref)
    loss = md.losses(0)["loss"]
    loss.backward()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, n
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


def test_training_lowers_the_loss():
    """A few optimiser steps on one batch (the student starts away from the original,
    so every term is non-zero): each term and the total go down."""
    from unlearn_fast.methods.trainer import TrainConfig, Trainer

    ref = Reference(tiny_llava())
    model = _perturbed_llava()
    md = _method(model, ref, batch_size=4)
    trainer = Trainer(model, TrainConfig(steps=8, lr=2e-3, progress=False))
    history = [trainer.update(lambda micro: md.losses(0)) for _ in range(8)]
    first, last = history[0], history[-1]
    assert all(first[k] > 0 for k in ("md", "multi", "uni"))
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["md"] < first["md"] and last["multi"] < first["multi"], (first, last)


def test_run_leaves_the_input_and_reference_alone():
    task, tok = task_and_tokenizer()
    base = tiny_llava()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    res = run_multidelete(base, tok, task, CONCEPT, overrides={"steps": 2, "batch_size": 4}, progress=False)
    assert all(torch.equal(v, base_state[k]) for k, v in base.state_dict().items())  # input untouched
    assert res.hp["arch"] == "auto" and res.hp["unimodal"] == "image+text" and len(res.history) == 2
    assert any(not torch.equal(v, base_state[k]) for k, v in res.model.state_dict().items())  # it trained
    assert res.history[0]["multi"] == 0 and res.history[0]["uni"] == 0  # step 1: the student is the original


def test_match_scores_and_evaluation():
    task, tok = task_and_tokenizer()
    original = tiny_llava()
    ad = get_adapter(original)
    imgs, caps, _ = task.image_caption_pairs(CONCEPT)
    other = [task.caption("one")] * 4
    ones = match_scores(original, original, ad, tok, imgs[:4], caps[:4], other)
    torch.testing.assert_close(ones, torch.ones(4), rtol=1e-5, atol=1e-5)  # the original is its own matched pair
    student = _perturbed_llava()
    got = match_scores(student, original, ad, tok, imgs[:4], caps[:4], other, batch_size=3)
    with torch.no_grad():
        h = last_token_states(student, ad, tok, imgs[:4], caps[:4]).double()
        a = last_token_states(original, ad, tok, imgs[:4], caps[:4]).double()
        b = last_token_states(original, ad, tok, imgs[:4], other).double()
    want = ((h - b) * (a - b)).sum(-1) / ((a - b) ** 2).sum(-1)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)
    row = evaluate_llava_pairs(student, ad, tok, task, CONCEPT, reference_model=original, max_examples=6)
    assert 0.0 <= row["pair_auc"] <= 1.0 and 0.0 <= row["retained_retrieval"] <= 100.0
    assert row["num_forget_pairs"] == 6 and row["num_retain_pairs"] == 6
    base = evaluate_llava_pairs(original, ad, tok, task, CONCEPT, max_examples=6)
    assert base["pair_auc"] == pytest.approx(0.5) and base["retain_match"] == pytest.approx(1.0, abs=1e-5)


def test_arch_selection_errors():
    task, tok = task_and_tokenizer()
    with pytest.raises(UnsupportedModelError, match="arch='clip' but the model is a LlavaForConditionalGeneration"):
        run_multidelete(tiny_llava(), tok, task, CONCEPT, overrides={"arch": "clip", "steps": 1}, progress=False)
    with pytest.raises(UnsupportedModelError, match="arch='llava' but the model is a CLIPModel"):
        run_multidelete(tiny_clip(), tok, task, CONCEPT, overrides={"arch": "llava", "steps": 1}, progress=False)
    with pytest.raises(ValueError, match="arch must be one of"):
        run_multidelete(tiny_llava(), tok, task, CONCEPT, overrides={"arch": "blip", "steps": 1}, progress=False)
