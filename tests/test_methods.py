"""Each method's loss terms against a straightforward eager formula on full logits, the
MMUnlearner mask and masked ascent, MultiDelete's terms, checkpoint/resume equality,
batch streams, backends agreeing."""
import math

import pytest
import torch
import torch.nn.functional as F

from tiny_models import task_and_tokenizer, tiny_clip, tiny_llava
from unlearn_fast.methods.runner import build_lm_method, run_lm_method
from unlearn_fast.methods.trainer import BatchStream, TrainConfig, Trainer

CONCEPT = "seven"


def _logits(model, adapter, batch):
    with torch.no_grad():
        return adapter.logits(model, batch).double()[:, :-1]


def _ce(logits, batch):
    y = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def _kl(student, teacher, mask, kv=None, form="kl", reduction="mean"):
    """sum_t K_S sum_v K_V p (log p - log q) / (#kept [x V]); p = teacher, q = student."""
    p = teacher.softmax(-1)
    logq = student.log_softmax(-1)
    w = p * (kv.double() if kv is not None else 1.0)
    rows = -(w * logq).sum(-1) if form == "cross_entropy" else (w * (teacher.log_softmax(-1) - logq)).sum(-1)
    m = mask[:, 1:].double()
    total = (rows * m).sum()
    z = m.sum().clamp(min=1) * (student.shape[-1] if reduction == "siu" else 1)
    return total / z


def _seq_logps(logits, batch):
    y = batch["labels"][:, 1:]
    lp = logits.log_softmax(-1).gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (lp * (y != -100)).sum(-1)


def _build(name, **ov):
    task, tok = task_and_tokenizer()
    method, model, ctx, hp = build_lm_method(name, tiny_llava(), tok, task, CONCEPT,
                                             overrides={"batch_size": 3, **ov}, backend="auto")
    with torch.no_grad():  # move the student away from the reference
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.3 if "lora_B" in n else 0.02))
    return method, model, ctx


def _reference_logits(ctx, batch):
    with ctx.reference.active() as ref:
        return _logits(ref, ctx.adapter, batch)


def _close(value, expected, rtol=1e-4):
    v, e = float(torch.as_tensor(value).detach()), float(torch.as_tensor(expected).detach())
    assert math.isfinite(v) and abs(v - e) <= rtol * max(1.0, abs(e)), (v, e)


@pytest.mark.parametrize("name", ["ga", "graddiff", "po"])
def test_ce_methods_match_eager(name):
    method, model, ctx = _build(name)
    terms = method.losses(1)
    bf = method.batch("forget", 1)
    if name == "ga":
        ce_f = _ce(_logits(model, ctx.adapter, bf), bf)
        _close(terms["forget_ce"], ce_f)
        _close(terms["loss"], -ce_f)
    elif name == "graddiff":
        br = method.batch("retain", 1)
        ce_f, ce_r = _ce(_logits(model, ctx.adapter, bf), bf), _ce(_logits(model, ctx.adapter, br), br)
        _close(terms["loss"], -ce_f + ce_r)
        _close(terms["retain_ce"], ce_r)
    else:
        bref = method.batch("refusal", 1)
        task, tok = task_and_tokenizer()
        answers = tok.batch_decode([row[row != -100][:-1] for row in bref["labels"]])
        assert all(a.strip() == task.refusal for a in answers)
        br = method.batch("retain", 1)
        _close(terms["loss"], _ce(_logits(model, ctx.adapter, bref), bref) + _ce(_logits(model, ctx.adapter, br), br))


@pytest.mark.parametrize("name", ["ga_kl", "kl_min"])
def test_kl_methods_match_eager(name):
    method, model, ctx = _build(name, kl_weight=0.7)
    terms = method.losses(0)
    bf, br = method.batch("forget", 0), method.batch("retain", 0)
    student, teacher = _logits(model, ctx.adapter, br), _reference_logits(ctx, br)
    # TOFU's KL: answer tokens only; KL_Min: every attended token
    mask = br["attention_mask"].bool() if name == "kl_min" else br["labels"] != -100
    kl = _kl(student, teacher, mask)
    assert float(kl) > 1e-4
    _close(terms["retain_kl"], kl)
    _close(terms["loss"], -_ce(_logits(model, ctx.adapter, bf), bf) + 0.7 * kl)


def test_npo_matches_eager():
    method, model, ctx = _build("npo", beta=0.25, retain_weight=0.5)
    terms = method.losses(2)
    bf, br = method.batch("forget", 2), method.batch("retain", 2)
    ratio = _seq_logps(_logits(model, ctx.adapter, bf), bf) - _seq_logps(_reference_logits(ctx, bf), bf)
    npo = (-(2 / 0.25) * F.logsigmoid(-0.25 * ratio)).mean()
    assert ratio.abs().max() > 1e-3
    _close(terms["npo"], npo)
    _close(terms["loss"], npo + 0.5 * _ce(_logits(model, ctx.adapter, br), br))


@pytest.mark.parametrize("preset", ["default", "reference"])
def test_siu_matches_eager(preset):
    from unlearn_fast.data import name_token_ids

    method, model, ctx = _build("siu", lora=2, preset=preset)
    task, tok = task_and_tokenizer()
    b = None
    for i in range(6):  # a batch with target phrases
        b = method.batch("siu", i)
        if b["target_phrase_mask"].any():
            terms = method.losses(i)
            break
    student, teacher = _logits(model, ctx.adapter, b), _reference_logits(ctx, b)
    kv = torch.ones(student.shape[-1])
    ids = name_token_ids(tok, task.concept(CONCEPT).variants)
    kv[ids] = 0
    if preset == "default":
        ks = (b["labels"] != -100) & ~b["target_phrase_mask"]
        dmk = _kl(student, teacher, ks, kv, "kl", "mean")
        _close(terms["loss"], _ce(student, b) + dmk)
    else:
        ks = b["attention_mask"].bool() & ~b["target_phrase_mask"]
        dmk = _kl(student, teacher, ks, kv, "cross_entropy", "siu")
        _close(terms["loss"], 0.9 * _ce(student, b) + 0.75 * dmk)
    _close(terms["dmk"], dmk)
    # the batch has target-phrase tokens at positions the KL would otherwise cover
    assert (b["target_phrase_mask"] & (b["labels"] != -100)).any()


def test_siu_backends_agree():
    from helpers import cpu_backends_for

    task, tok = task_and_tokenizer()
    values = {}
    for backend in ["eager"] + cpu_backends_for("token_stats")[:1]:
        method, model, ctx = _build("siu", lora=2)
        ctx.backend = backend
        terms = method.losses(0)
        terms["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        values[backend] = (float(terms["loss"].detach()), grad)
    (l0, g0), (l1, g1) = values.values()
    _close(l0, l1, 1e-5)
    torch.testing.assert_close(g0, g1, rtol=1e-4, atol=1e-6)


def test_mmunlearner_mask_and_masked_ascent():
    from unlearn_fast.saliency import transform_gradients_

    task, tok = task_and_tokenizer()
    method, model, ctx, hp = build_lm_method("mmunlearner", tiny_llava(), tok, task, CONCEPT,
                                             overrides={"batch_size": 4, "fisher_batches": 2, "lr": 1e-2})
    trainer = Trainer(model, TrainConfig(steps=1, lr=1e-2, progress=False))
    method.prepare(trainer)

    def fisher(which):
        stream = method.data.stream(which)
        acc = [torch.zeros_like(p) for p in trainer.params]
        for i in range(2):
            model.zero_grad()
            ctx.ce(stream(i)).backward()
            for a, p in zip(acc, trainer.params):
                a += (p.grad if p.grad is not None else torch.zeros_like(p)) ** 2 / 2
        model.zero_grad()
        return acc

    ff, fv, fl = fisher("forget"), fisher("retain_vqa"), fisher("preserve_language")
    dense = method.mask.to_dense()
    is_vision = [ctx.adapter.is_vision_parameter(n) for n, _ in trainer.named_params]
    assert any(is_vision) and not all(is_vision)
    n_sel = 0
    for m, f, v, l, vis in zip(dense, ff, fv, fl, is_vision):
        expected = (f + 1e-15) / ((v if vis else l) + 1e-15) >= 1.0
        assert (m.bool() == expected).float().mean() > 0.999  # float32 ratio ties aside
        n_sel += int(m.sum())
    total = sum(p.numel() for p in trainer.params)
    assert 0 < n_sel < total
    # one masked ascent step: AdamW starts from zero state, so unselected weights stay put
    before = [p.detach().clone() for p in trainer.params]
    trainer.update(lambda i: {"loss": -ctx.ce(method.batch("forget", i))},
                   grad_transform=lambda g: transform_gradients_(g, method.mask, mode="mask", max_norm=1.0))
    moved_outside = sum(int(((p.detach() != b) & ~m.bool()).sum()) for p, b, m in zip(trainer.params, before, dense))
    moved_inside = sum(int(((p.detach() != b) & m.bool()).sum()) for p, b, m in zip(trainer.params, before, dense))
    assert moved_outside == 0 and moved_inside > 0


def test_mmunlearner_mask_fraction():
    task, tok = task_and_tokenizer()
    method, model, ctx, hp = build_lm_method("mmunlearner", tiny_llava(), tok, task, CONCEPT,
                                             overrides={"batch_size": 4, "fisher_batches": 2, "mask_fraction": 0.1})
    trainer = Trainer(model, TrainConfig(steps=1, progress=False))
    method.prepare(trainer)
    total = sum(p.numel() for p in trainer.params)
    assert method.mask.count() == round(0.1 * total) and method.mask.meta["kind"] == "mmunlearner"
    for bad in (0.0, 1.5):  # refused when the method is built, before any Fisher pass
        with pytest.raises(ValueError, match=r"mask_fraction must be None or in \(0, 1\]"):
            build_lm_method("mmunlearner", tiny_llava(), tok, task, CONCEPT,
                            overrides={"batch_size": 4, "fisher_batches": 1, "mask_fraction": bad})


def test_mmunlearner_geometry_runs():
    task, tok = task_and_tokenizer()
    res = run_lm_method("mmunlearner", tiny_llava(), tok, task, CONCEPT, progress=False,
                        overrides={"steps": 3, "batch_size": 2, "fisher_batches": 1, "forget_every": 2,
                                   "mode": "geometry"})
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert "forget_ce" in res.history[0] and "forget_ce" not in res.history[1] and "retain_ce" in res.history[1]


def _multidelete_on_a_perturbed_clip(**hp):
    """(MultiDelete, the trained model, its frozen reference), the model a little away
    from the reference so that every term is non-zero."""
    from unlearn_fast.methods.multidelete import MultiDelete
    from unlearn_fast.models import Reference, get_adapter

    task, tok = task_and_tokenizer()
    model = tiny_clip()
    ref = Reference(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return MultiDelete(model, get_adapter(model), tok, task, CONCEPT, ref, batch_size=5, **hp), model, ref


def test_multidelete_terms_match_eager():
    from unlearn_fast.methods.multidelete import fused_pair

    md, model, ref = _multidelete_on_a_perturbed_clip(uni_weight=0.5)
    terms = md.losses(3)
    f, r = md.forget(3), md.retain(3)
    caps = [c for _, c in f]
    perm = md.mismatched_captions(caps, 3)
    assert all(p != c for p, c in zip(perm, caps))  # every forget image gets a caption that is not its own
    with torch.no_grad():
        s_fi, s_ft = md._embed(model, [x for x, _ in f], caps)
        m_fi, m_fp = md._embed(ref.model, [x for x, _ in f], perm)
        s_ri, s_rt = md._embed(model, [x for x, _ in r], [c for _, c in r])
        m_ri, m_rt = md._embed(ref.model, [x for x, _ in r], [c for _, c in r])
    l_md = F.mse_loss(fused_pair(s_fi, s_ft), fused_pair(m_fi, m_fp))
    l_multi = F.mse_loss(fused_pair(s_ri, s_rt), fused_pair(m_ri, m_rt))
    l_uni = F.mse_loss(s_fi, m_fi)
    _close(terms["md"], l_md, 1e-5)
    _close(terms["multi"], l_multi, 1e-5)
    _close(terms["uni"], l_uni, 1e-5)
    _close(terms["loss"], l_md + l_multi + 0.5 * l_uni, 1e-5)
    assert float(l_multi) > 0 and float(l_uni) > 0


def test_multidelete_image_and_text_unimodal_term():
    # unimodal="image+text": the uni term also keeps the forget captions' text embeddings
    md, model, ref = _multidelete_on_a_perturbed_clip(unimodal="image+text")
    terms = md.losses(1)
    f = md.forget(1)
    imgs, caps = [x for x, _ in f], [c for _, c in f]
    with torch.no_grad():
        s_fi, s_ft = md._embed(model, imgs, caps)
        m_fi, m_ft = md._embed(ref.model, imgs, caps)
    _close(terms["uni"], F.mse_loss(torch.cat([s_fi, s_ft]), torch.cat([m_fi, m_ft])), 1e-5)


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    task, tok = task_and_tokenizer()
    base = tiny_llava()
    kw = dict(overrides={"steps": 4, "batch_size": 2, "lr": 1e-3}, progress=False)
    straight = run_lm_method("graddiff", base, tok, task, CONCEPT, **kw)

    class Stop(Exception):
        pass

    from unlearn_fast.methods import methods as M

    real = M.Method.train_step

    def crash_at_3(self, trainer, step):
        if step == 3:
            raise Stop
        return real(self, trainer, step)

    out = str(tmp_path / "run")
    M.Method.train_step = crash_at_3
    try:
        with pytest.raises(Stop):
            run_lm_method("graddiff", base, tok, task, CONCEPT, out_dir=out, checkpoint_every=2, **kw)
    finally:
        M.Method.train_step = real
    resumed = run_lm_method("graddiff", base, tok, task, CONCEPT, out_dir=out, checkpoint_every=2, **kw)
    assert resumed.resumed_from == 2
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in straight.history], rel=1e-6)
    for (n, p), (_, q) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    with open(out + "/log.jsonl") as f:
        assert [int(__import__("json").loads(line)["step"]) for line in f] == [1, 2, 3, 4]
    # the input model is untouched
    fresh = tiny_llava()
    for (n, p), (_, q) in zip(base.named_parameters(), fresh.named_parameters()):
        assert torch.equal(p, q), n


def test_batch_stream_is_a_function_of_the_index(monkeypatch):
    seen = []
    s = BatchStream(list(range(10)), 4, lambda rows: (seen.append(1), list(rows))[1], seed=3)
    assert s.per_epoch == 2
    a, b = s(0), s(1)
    assert len(set(a) | set(b)) == 8 and s(0) == a and len(seen) == 2  # cached
    s2 = BatchStream(list(range(10)), 4, list, seed=3)
    assert s2(5) == s(5) and s2(2) != s2(4) or s2(2) == s2(4)
    from unlearn_fast.methods import trainer as T

    monkeypatch.setattr(T, "dist_info", lambda: (1, 2))
    assert BatchStream(list(range(10)), 4, list, seed=3)(0) == a[1::2]
    with pytest.raises(ValueError, match="empty"):
        BatchStream([], 2, list, name="forget")


def test_bf16_and_grad_accum_run():
    task, tok = task_and_tokenizer()
    res = run_lm_method("ga", tiny_llava(), tok, task, CONCEPT, progress=False, mixed_precision="bf16",
                        overrides={"steps": 2, "batch_size": 2, "grad_accum": 2})
    assert len(res.history) == 2 and all(math.isfinite(h["loss"]) for h in res.history)
    # two accumulated micro-batches of 2 rows == one batch of 4 rows when the means match
    base = tiny_llava()
    a = run_lm_method("ga", base, tok, task, CONCEPT, progress=False,
                      overrides={"steps": 1, "batch_size": 2, "grad_accum": 2, "lr": 1e-3})
    assert len(a.history) == 1 and a.history[0]["step"] == 1


def test_bad_hyperparameters():
    task, tok = task_and_tokenizer()
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        build_lm_method("ga", tiny_llava(), tok, task, CONCEPT, overrides={"betta": 1})
    with pytest.raises(ValueError, match="preset must be one of"):
        build_lm_method("siu", tiny_llava(), tok, task, CONCEPT, overrides={"preset": "paper"})
    with pytest.raises(ValueError, match="not in task"):
        build_lm_method("ga", tiny_llava(), tok, task, "eleven")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        TrainConfig(steps=0).validate()
