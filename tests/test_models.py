"""Model adapters on tiny random configs of the real classes: image-token expansion and
mask alignment, hidden states + lm_head == the model's logits, vision/language parameter
split, LoRA with the reference shared (no copy), CLIP embeddings, errors."""
import pytest
import torch

from tiny_models import task_and_tokenizer, tiny_clip, tiny_llava, tiny_qwen2vl
from unlearn_fast.models import (Reference, UnsupportedModelError, apply_lora, get_adapter, lora_target_modules,
                                 unwrap)


def _rows():
    task, _ = task_and_tokenizer()
    img = task.forget_set("seven")[0]
    import dataclasses

    target = dataclasses.replace(img, answer="This is zorbel now.", target_phrase="zorbel", options=(),
                                 answer_index=None)
    return [target, task.text_facts("seven")[0], task.forget_set("two")[3]]


@pytest.mark.parametrize("make", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2vl"])
def test_collate_alignment(make):
    _, tok = task_and_tokenizer()
    model = make()
    adapter = get_adapter(model)
    rows = _rows()
    b = adapter.collate(rows, tok)
    B, T = b["input_ids"].shape
    for key in ("attention_mask", "labels", "target_phrase_mask", "image_token_mask"):
        assert b[key].shape == (B, T)
    image_id = adapter.image_token_id(tok)
    n_img = (b["input_ids"] == image_id).sum(1).tolist()
    assert n_img[1] == 0 and n_img[0] == n_img[2] > 1  # expanded for the image rows only
    if adapter.family == "llava":
        assert n_img[0] == (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
        assert b["pixel_values"].shape[0] == 2
    else:
        thw = b["image_grid_thw"]
        assert n_img[0] == int(thw[0].prod()) // 4 and b["pixel_values"].shape[0] == int(thw.prod(1).sum())
        assert torch.equal(b["mm_token_type_ids"].bool(), b["image_token_mask"])
    for i, ex in enumerate(rows):
        lab = b["labels"][i]
        kept = lab != -100
        # labels: the answer tokens and </s>, at the same positions as in input_ids
        assert torch.equal(lab[kept], b["input_ids"][i][kept])
        assert tok.decode(lab[kept][:-1]).strip() == ex.answer and int(lab[kept][-1]) == tok.eos_token_id
        assert not (kept & b["image_token_mask"][i]).any()
        tp = b["target_phrase_mask"][i]
        if ex.target_phrase:
            assert tok.decode(b["input_ids"][i][tp]).strip() == ex.target_phrase and bool((tp <= kept).all())
        else:
            assert not tp.any()
    # the forward accepts the batch and the image tokens line up with the features
    out = model(**adapter.forward_kwargs(model, b))
    assert out.logits.shape[:2] == (B, T)


def test_collate_left_padding_for_generation():
    _, tok = task_and_tokenizer()
    adapter = get_adapter(tiny_llava())
    rows = _rows()
    right = adapter.collate(rows, tok, with_answer=False)
    left = adapter.collate(rows, tok, with_answer=False, padding_side="left")
    assert (right["labels"] == -100).all() and not right["target_phrase_mask"].any()
    for i in range(len(rows)):
        r = right["input_ids"][i][right["attention_mask"][i].bool()]
        lft = left["input_ids"][i][left["attention_mask"][i].bool()]
        assert torch.equal(r, lft)
        assert bool(left["attention_mask"][i][-1]) and tok.decode(lft[-2:]).endswith("ASSISTANT:")
    with pytest.raises(ValueError, match="padding_side"):
        adapter.collate(rows, tok, padding_side="middle")


@pytest.mark.parametrize("make", [tiny_llava, tiny_qwen2vl], ids=["llava", "qwen2vl"])
def test_hidden_states_times_head_equals_logits(make):
    _, tok = task_and_tokenizer()
    model = make()
    adapter = get_adapter(model)
    b = adapter.collate(_rows(), tok)
    with torch.no_grad():
        ref = model(**adapter.forward_kwargs(model, b)).logits
        h = adapter.hidden_states(model, b)
        w, bias = adapter.lm_head(model)
        assert h.shape[:2] == b["input_ids"].shape and w.shape[0] == ref.shape[-1]
        torch.testing.assert_close(torch.nn.functional.linear(h, w, bias), ref, rtol=1e-5, atol=1e-5)


def test_vision_parameter_split():
    llava, qwen, clip = tiny_llava(), tiny_qwen2vl(), tiny_clip()
    for model, vision, language in [(llava, "model.vision_tower.", "model.language_model."),
                                    (llava, "model.multi_modal_projector.", "lm_head."),
                                    (qwen, "model.visual.", "model.language_model."),
                                    (clip, "vision_model.", "text_model.")]:
        a = get_adapter(model)
        names = [n for n, _ in model.named_parameters()]
        assert any(n.startswith(vision) for n in names) and any(n.startswith(language) for n in names)
        for n in names:
            if n.startswith(vision):
                assert a.is_vision_parameter(n), n
            if n.startswith(language):
                assert not a.is_vision_parameter(n), n
    peft_model = apply_lora(tiny_llava(), r=2, where="all")
    a = get_adapter(peft_model)
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
    assert any(a.is_vision_parameter(n) for n in lora) and not all(a.is_vision_parameter(n) for n in lora)
    assert all(a.is_vision_parameter(n) == ("vision_tower" in n or "multi_modal_projector" in n) for n in lora)


def test_lora_reference_is_shared_not_copied():
    _, tok = task_and_tokenizer()
    base = tiny_llava()
    adapter = get_adapter(base)
    b = adapter.collate(_rows(), tok)
    with torch.no_grad():
        original = adapter.logits(base, b)
    model = apply_lora(tiny_llava(), r=2)  # same seed: the same base weights
    assert all("language_model" in n for n in lora_target_modules(tiny_llava(), "language"))
    ref = Reference(model)
    assert ref.shared and ref.model is model
    with torch.no_grad():  # train the adapters a little
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        student = adapter.logits(model, b)
        with ref.active() as r:
            reference = adapter.logits(r, b)
    assert (student - original).abs().max() > 1e-3
    torch.testing.assert_close(reference, original, rtol=1e-5, atol=1e-5)
    # no second copy of any frozen weight: the reference reads the same storage
    with ref.active() as r:
        w_ref, _ = adapter.lm_head(r)
    assert w_ref.data_ptr() == adapter.lm_head(model)[0].data_ptr()
    # without LoRA the reference is a frozen copy
    plain = tiny_llava()
    ref2 = Reference(plain)
    assert not ref2.shared and ref2.model is not plain
    assert not any(p.requires_grad for p in ref2.model.parameters())


def test_clip_adapter():
    task, tok = task_and_tokenizer()
    model = tiny_clip()
    a = get_adapter(model)
    imgs, caps, _ = task.image_caption_pairs("seven")
    b = a.collate_pairs(imgs[:3], caps[:3], tok)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], pixel_values=b["pixel_values"])
        img, txt = a.image_embeds(model, b["pixel_values"]), a.text_embeds(model, b["input_ids"], b["attention_mask"])
    torch.testing.assert_close(torch.nn.functional.normalize(img, dim=-1), out.image_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.nn.functional.normalize(txt, dim=-1), out.text_embeds, rtol=1e-5, atol=1e-6)
    # pooled at </s>: captions differing only before </s> give different embeddings
    other = a.collate_captions(["a handwritten digit two"], tok)
    assert (txt[0] - a.text_embeds(model, other["input_ids"], other["attention_mask"])[0]).abs().max() > 0
    with pytest.raises(UnsupportedModelError, match="without an lm_head"):
        a.lm_head(model)
    with pytest.raises(ValueError, match="3 images but 2 captions"):
        a.collate_pairs(imgs[:3], caps[:2], tok)


def test_llava_with_a_siglip_tower_gets_one_image_token_per_patch():
    # llava-interleave's layout: a SigLIP tower (no CLS token) and the "full" feature
    # strategy; the adapter once added a CLS slot and every forward failed
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from unlearn_fast.data.tokenizer import IMAGE, token_id
    from unlearn_fast.models.adapters import SIGLIP_MEAN

    _, tok = task_and_tokenizer()
    torch.manual_seed(0)
    vision = SiglipVisionConfig(image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                num_attention_heads=4)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=token_id(tok, IMAGE),
                                                      vision_feature_select_strategy="full",
                                                      vision_feature_layer=-1)).eval()
    a = get_adapter(model)
    assert a.num_image_tokens == 16 and a.pixel_mean == SIGLIP_MEAN
    b = a.collate(_rows(), tok)
    with torch.no_grad():
        model(**a.forward_kwargs(model, b))  # image tokens match the tower's features


def test_tokenizer_without_bos_collates():
    # Qwen2-VL's tokenizer has no BOS token: prompts start without one (it was refused)
    import copy

    task, tok = task_and_tokenizer()
    no_bos = copy.deepcopy(tok)
    no_bos.bos_token = None
    model = tiny_qwen2vl()
    a = get_adapter(model)
    with_bos, without = a.collate(_rows(), tok), a.collate(_rows(), no_bos)
    assert int(with_bos["input_ids"][0, 0]) == tok.bos_token_id and int(without["input_ids"][0, 0]) != tok.bos_token_id
    assert torch.equal(with_bos["labels"][:, 1:][with_bos["labels"][:, 1:] != -100],
                       without["labels"][without["labels"] != -100])  # the same answer tokens
    with torch.no_grad():
        model(**a.forward_kwargs(model, without))


def test_clip_captions_end_with_the_tokenizers_end_of_text_under_a_legacy_config():
    # OpenAI's CLIP configs keep eos_token_id = 2 while the tokenizer's end-of-text is its
    # largest id; CLIPTextModel then pools at argmax(input_ids): captions must end with it
    from transformers import CLIPConfig, CLIPModel

    from unlearn_fast.data.tokenizer import build_tokenizer

    caps = ["a handwritten digit seven", "a handwritten digit two", "a photo of the number nine"]
    tok = build_tokenizer(caps)
    tok.add_special_tokens({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"})
    tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    text = dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1, projection_dim=8)
    vision = dict(image_size=8, patch_size=2, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=4, projection_dim=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    a = get_adapter(model)
    b = a.collate_captions(caps, tok)
    enc = [[tok.bos_token_id] + tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in caps]
    T = max(map(len, enc))
    ids = torch.tensor([e + [tok.pad_token_id] * (T - len(e)) for e in enc])
    att = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])
    assert torch.equal(b["input_ids"], ids)
    with torch.no_grad():
        ours = a.text_embeds(model, b["input_ids"], b["attention_mask"])
        ref = model.get_text_features(input_ids=ids, attention_mask=att)
    torch.testing.assert_close(ours, getattr(ref, "pooler_output", ref), rtol=1e-5, atol=1e-6)


def test_unsupported_models():
    from transformers import LlamaConfig, LlamaForCausalLM, LlavaModel

    _, tok = task_and_tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="no adapter for LlamaForCausalLM"):
        get_adapter(llama)
    backbone = LlavaModel(tiny_llava().config)
    with pytest.raises(UnsupportedModelError, match="LlavaModel has no lm_head"):
        get_adapter(backbone)
    assert unwrap(apply_lora(tiny_llava(), r=2)).__class__.__name__ == "LlavaForConditionalGeneration"


def test_builtin_models_train_and_cache(tmp_path, monkeypatch):
    """The cache path on a 3-step training: CLIP first, LLaVA's vision tower from it,
    safetensors + config + tokenizer on disk, a second call loads without training."""
    from unlearn_fast.models import builtin

    calls = []
    real_clip, real_llava = builtin.train_builtin_clip, builtin.train_builtin_llava

    def short_clip(task, tok, **kw):
        calls.append("clip")
        return real_clip(task, tok, **{**kw, "steps": 3, "batch_size": 8})

    def short_llava(task, tok, **kw):
        calls.append("llava")
        return real_llava(task, tok, **{**kw, "steps": 3, "batch_size": 4})

    monkeypatch.setattr(builtin, "train_builtin_clip", short_clip)
    monkeypatch.setattr(builtin, "train_builtin_llava", short_llava)
    small_llava, small_clip = builtin.tiny_llava_config, builtin.tiny_clip_config
    monkeypatch.setattr(builtin, "tiny_llava_config", lambda tok, **kw: small_llava(
        tok, text_hidden=32, text_layers=1, vision_hidden=16, vision_layers=1))
    monkeypatch.setattr(builtin, "tiny_clip_config", lambda tok, **kw: small_clip(
        tok, hidden=16, layers=1, projection_dim=8))
    model, tok, task = builtin.load_builtin_llava(str(tmp_path), quiet=True)
    assert calls == ["clip", "llava"]
    folder = tmp_path / builtin.LLAVA_DIR
    for f in ("config.json", "model.safetensors", "tokenizer.json", "train_info.json"):
        assert (folder / f).exists()
    clip, _, _ = builtin.load_builtin_clip(str(tmp_path), quiet=True)
    torch.testing.assert_close(model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"],
                               clip.vision_model.state_dict()["embeddings.patch_embedding.weight"])
    again, tok2, _ = builtin.load_builtin_llava(str(tmp_path), quiet=True)
    assert calls == ["clip", "llava"]  # cached: no retraining
    assert tok2.convert_ids_to_tokens(tok2("This is seven.")["input_ids"]) == \
        tok.convert_ids_to_tokens(tok("This is seven.")["input_ids"])
    for (n, p), (_, q) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(p, q), n
