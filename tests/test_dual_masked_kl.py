"""Dual masked KL: eager and cpp against a float64 oracle, semantics, validation,
torch.compile.  (Triton: tests/test_dmk_triton.py; CUDA: tests/test_dmk_gpu.py.)"""
import math

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import backends
from unlearn_fast.ops.dual_masked_kl import reference_rows

from helpers import rel_err

FAST = [b for b in ("cpp",) if backends.availability(b).available]
needs_cpp = pytest.mark.skipif(not FAST, reason="C++ extension not built")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _oracle(s, t, ks, kv, form, reduction, temperature, grad_out=None):
    s64 = s.detach().double().requires_grad_()
    out = uf.dual_masked_kl(s64, t.double(), ks, kv, form=form, reduction=reduction,
                            temperature=temperature, backend="eager")
    g = grad_out.double() if grad_out is not None else torch.ones_like(out)
    (grad,) = torch.autograd.grad(out, s64, g)
    return out, grad


def _run(s, t, ks, kv, form, reduction, temperature, backend, grad_out=None):
    s = s.detach().clone().requires_grad_()
    out = uf.dual_masked_kl(s, t, ks, kv, form=form, reduction=reduction, temperature=temperature, backend=backend)
    g = grad_out.to(out.dtype) if grad_out is not None else torch.ones_like(out)
    (grad,) = torch.autograd.grad(out, s, g)
    return out, grad


def _masks(kind, lead, vocab):
    if kind == "none":
        return None, None
    if kind == "all_on":
        return torch.ones(lead, dtype=torch.bool), torch.ones(vocab, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(lead, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
    return torch.rand(lead) > 0.3, torch.rand(vocab) > 0.2


def _logits(kind, shape, dtype):
    x = torch.randn(shape)
    if kind == "peaked":
        x = x * 8.0
        idx = torch.randint(0, shape[-1], shape[:-1])
        x.scatter_(-1, idx.unsqueeze(-1), 30.0)
    elif kind == "extreme":
        x = torch.randint(-1, 2, shape).float() * 1e4 + torch.randn(shape)
    return x.to(dtype)


@needs_cpp
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(37, 1271), (3, 5, 257), (2, 4100)])
@pytest.mark.parametrize("masks", ["none", "all_on", "all_off", "random"])
@pytest.mark.parametrize("form", ["kl", "cross_entropy"])
def test_fast_backend_matches_oracle(backend, dtype, shape, masks, form):
    s = _logits("normal", shape, dtype)
    t = _logits("normal", shape, dtype)
    ks, kv = _masks(masks, shape[:-1], shape[-1])
    for reduction in ("sum", "mean", "siu"):
        ref, gref = _oracle(s, t, ks, kv, form, reduction, 1.3)
        out, g = _run(s, t, ks, kv, form, reduction, 1.3, backend)
        eout, eg = _run(s, t, ks, kv, form, reduction, 1.3, "eager")
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all() and torch.isfinite(g.float()).all()
        assert g.dtype == dtype and g.shape == s.shape
        assert rel_err(out, ref) <= max(rel_err(eout, ref), 0.0) + TOL[dtype]
        assert rel_err(g, gref) <= max(rel_err(eg, gref), 0.0) + TOL[dtype]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["peaked", "extreme"])
def test_peaked_and_extreme_logits(dtype, kind):
    shape = (19, 3001)
    s, t = _logits(kind, shape, dtype), _logits(kind, shape, dtype)
    ks, kv = _masks("random", shape[:-1], shape[-1])
    for form in ("kl", "cross_entropy"):
        ref, gref = _oracle(s, t, ks, kv, form, "none", 1.0)
        out, g = _run(s, t, ks, kv, form, "none", 1.0, "cpp")
        eout, eg = _run(s, t, ks, kv, form, "none", 1.0, "eager")
        assert torch.isfinite(out).all() and torch.isfinite(g.float()).all()
        # absolute per-row error relative to the scale of the logits (values reach 1e4)
        scale = max(1.0, ref.abs().max().item())
        err = (out.double() - ref).abs().max().item() / scale
        eerr = (eout.double() - ref).abs().max().item() / scale
        assert err <= eerr + TOL[dtype]
        assert rel_err(g, gref) <= rel_err(eg, gref) + TOL[dtype]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reduction_none_with_nonuniform_grad_output(dtype):
    shape = (4, 9, 517)
    s, t = _logits("normal", shape, dtype), _logits("normal", shape, dtype)
    ks, kv = _masks("random", shape[:-1], shape[-1])
    go = torch.randn(shape[:-1])
    ref, gref = _oracle(s, t, ks, kv, "kl", "none", 0.7, go)
    out, g = _run(s, t, ks, kv, "kl", "none", 0.7, "cpp", go)
    assert out.shape == shape[:-1]
    assert (out[~ks] == 0).all()
    assert rel_err(out, ref) < TOL[dtype] + 1e-6
    assert rel_err(g, gref) < TOL[dtype] + 1e-6


def test_gradient_formula_matches_spec():
    """d/dz_j = K_S (q_j S - K_V(j) p_j) / T, the formula in SPEC.md."""
    s, t = torch.randn(6, 50, dtype=torch.float64), torch.randn(6, 50, dtype=torch.float64)
    ks, kv = torch.rand(6) > 0.3, torch.rand(50) > 0.3
    T = 1.7
    _, g = _oracle(s, t, ks, kv, "kl", "sum", T)
    p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    S = (p * kv).sum(-1, keepdim=True)
    expected = ks[:, None] * (q * S - kv * p) / T
    assert torch.allclose(g, expected, atol=1e-12)


@pytest.mark.parametrize("backend", ["eager"] + FAST)
@pytest.mark.parametrize("form,reduction", [("kl", "sum"), ("cross_entropy", "none")])
def test_gradcheck_float64(backend, form, reduction):
    """torch.autograd.gradcheck in float64 (cpp runs its double kernel), leading batch dims."""
    s = torch.randn(2, 3, 23, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 23, dtype=torch.float64)
    ks, kv = torch.rand(2, 3) > 0.3, torch.rand(23) > 0.3

    def fn(x):
        return uf.dual_masked_kl(x, t, ks, kv, form=form, reduction=reduction, temperature=1.3, backend=backend)

    assert fn(s).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (s,))


@needs_cpp
def test_cpp_float64_matches_oracle_to_double_precision():
    s, t = torch.randn(9, 3001, dtype=torch.float64) * 5, torch.randn(9, 3001, dtype=torch.float64) * 5
    ks, kv = torch.rand(9) > 0.2, torch.rand(3001) > 0.2
    go = torch.randn(9, dtype=torch.float64)
    for form in ("kl", "cross_entropy"):
        ref, gref = _oracle(s, t, ks, kv, form, "none", 0.9, go)
        out, g = _run(s, t, ks, kv, form, "none", 0.9, "cpp", go)
        assert out.dtype == torch.float64 and g.dtype == torch.float64
        assert rel_err(out, ref) < 1e-12 and rel_err(g, gref) < 1e-12


def test_float64_backend_rule(monkeypatch):
    """float64: cpp/eager run it; auto keeps cpp on the CPU; a float32-only backend raises
    when named and is replaced by eager (with one warning) under auto."""
    from unlearn_fast.ops import dual_masked_kl as dmk

    s, t = torch.randn(3, 17, dtype=torch.float64), torch.randn(3, 17, dtype=torch.float64)
    if FAST:
        assert dmk._backend_for("auto", s.device, torch.float64) == "cpp"
    if backends.availability("triton").available:
        with pytest.raises(TypeError, match="float64"):
            uf.dual_masked_kl(s, t, backend="triton")
    monkeypatch.setattr(dmk.backends, "resolve", lambda op, backend, device: "triton")
    monkeypatch.setattr(dmk, "_FLOAT64_FALLBACK_WARNED", set())
    with pytest.warns(RuntimeWarning, match="eager"):
        assert dmk._backend_for("auto", s.device, torch.float64) == "eager"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dmk._backend_for("auto", s.device, torch.float64) == "eager"
        assert dmk._backend_for("auto", s.device, torch.float32) == "triton"


@pytest.mark.parametrize("backend", ["eager"] + FAST)
def test_equals_torch_kl_div_without_masks(backend):
    s, t = torch.randn(2, 7, 301), torch.randn(2, 7, 301)
    out = uf.dual_masked_kl(s, t, form="kl", reduction="sum", backend=backend)
    expected = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum")
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager"] + FAST)
def test_forms_differ_by_teacher_masked_entropy(backend):
    s, t = torch.randn(11, 97), torch.randn(11, 97)
    kv = torch.rand(97) > 0.3
    kl = uf.dual_masked_kl(s, t, vocab_mask=kv, form="kl", reduction="none", backend=backend)
    ce = uf.dual_masked_kl(s, t, vocab_mask=kv, form="cross_entropy", reduction="none", backend=backend)
    p = torch.softmax(t, -1)
    masked_neg_entropy = (kv * p * torch.log_softmax(t, -1)).sum(-1)
    assert torch.allclose(ce, kl - masked_neg_entropy, atol=1e-4)


@pytest.mark.parametrize("backend", ["eager"] + FAST)
def test_all_masked_gives_zero_not_nan(backend):
    s = torch.randn(3, 41, requires_grad=True)
    t = torch.randn(3, 41)
    for reduction in ("mean", "siu", "sum", "none"):
        out = uf.dual_masked_kl(s, t, torch.zeros(3, dtype=torch.bool), reduction=reduction, backend=backend)
        assert torch.all(out == 0)
        (g,) = torch.autograd.grad(out.sum(), s)
        assert torch.all(g == 0)


@pytest.mark.parametrize("backend", ["eager"] + FAST)
def test_reductions_and_forget_token_ids(backend):
    s, t = torch.randn(10, 64), torch.randn(10, 64)
    ks = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    ids = [3, 17, 63]
    rows = uf.dual_masked_kl(s, t, ks, forget_token_ids=ids, reduction="none", backend=backend)
    kv = torch.ones(64, dtype=torch.bool)
    kv[ids] = False
    ref = reference_rows(s.double(), t.double(), ks.float(), kv, 1.0, False)
    assert torch.allclose(rows.double(), ref, atol=1e-5)
    kept = ks.sum().item()
    assert torch.allclose(uf.dual_masked_kl(s, t, ks, forget_token_ids=ids, reduction="mean", backend=backend),
                          rows.sum() / kept, atol=1e-6)
    assert torch.allclose(uf.dual_masked_kl(s, t, ks, forget_token_ids=ids, reduction="siu", backend=backend),
                          rows.sum() / (kept * 64), atol=1e-7)
    # forget_token_ids combine with an explicit vocab_mask (both zero out entries)
    kv2 = torch.ones(64, dtype=torch.bool)
    kv2[5] = False
    both = uf.dual_masked_kl(s, t, ks, kv2, forget_token_ids=ids, reduction="none", backend=backend)
    kv2[ids] = False
    assert torch.allclose(both, uf.dual_masked_kl(s, t, ks, kv2, reduction="none", backend=backend), atol=1e-6)


def test_teacher_gets_no_gradient_and_inputs_untouched():
    s = torch.randn(4, 33, requires_grad=True)
    t = torch.randn(4, 33, requires_grad=True)
    s0, t0 = s.detach().clone(), t.detach().clone()
    for backend in ["eager"] + FAST:
        out = uf.dual_masked_kl(s, t, backend=backend)
        out.backward()
        assert t.grad is None
        assert torch.equal(s.detach(), s0) and torch.equal(t.detach(), t0)


def test_module_form():
    s, t = torch.randn(6, 40), torch.randn(6, 40)
    mod = uf.DualMaskedKLDivLoss(forget_token_ids=[1, 2], form="cross_entropy", reduction="siu", temperature=2.0)
    assert torch.allclose(mod(s, t), uf.dual_masked_kl(s, t, forget_token_ids=[1, 2], form="cross_entropy",
                                                       reduction="siu", temperature=2.0))
    assert "cross_entropy" in repr(mod)


@pytest.mark.parametrize("bad,exc,match", [
    (dict(teacher_logits=torch.randn(4, 11)), ValueError, "teacher_logits"),
    (dict(vocab_mask=torch.ones(9, dtype=torch.bool)), ValueError, "vocab_mask"),
    (dict(token_mask=torch.ones(5, dtype=torch.bool)), ValueError, "token_mask"),
    (dict(forget_token_ids=[0, 10]), ValueError, "forget_token_ids"),
    (dict(forget_token_ids=[-1]), ValueError, "forget_token_ids"),
    (dict(forget_token_ids=torch.tensor([1.5])), TypeError, "forget_token_ids"),
    (dict(teacher_logits=torch.randn(4, 10, dtype=torch.float64)), TypeError, "teacher_logits"),
    (dict(student_logits=torch.randint(0, 5, (4, 10))), TypeError, "student_logits"),
    (dict(form="jsd"), ValueError, "form"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(backend="tpu"), ValueError, "backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(teacher_logits="x"), TypeError, "teacher_logits"),
    (dict(student_logits=[[1.0, 2.0]]), TypeError, "student_logits"),
    (dict(teacher_logits=torch.randint(0, 5, (4, 10))), TypeError, "teacher_logits"),
    (dict(student_logits=torch.ones(4, 10, dtype=torch.bool)), TypeError, "student_logits"),
    (dict(student_logits=torch.randn(4, 10, dtype=torch.complex64)), TypeError, "student_logits"),
    (dict(student_logits=torch.randn(4, 0), teacher_logits=torch.randn(4, 0)), ValueError, "student_logits"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "student_logits"),
    (dict(token_mask=torch.ones(4, 10, dtype=torch.bool)), ValueError, "token_mask"),
    (dict(token_mask=[1, 1, 1, 1]), TypeError, "token_mask"),
    (dict(vocab_mask=torch.ones(4, 10, dtype=torch.bool)), ValueError, "vocab_mask"),
    (dict(forget_token_ids=torch.tensor([3, 10])), ValueError, "forget_token_ids"),
    (dict(forget_token_ids=["a"]), TypeError, "forget_token_ids"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=torch.tensor(2.0)), TypeError, "temperature"),
])
def test_bad_input_raises_clear_errors(bad, exc, match):
    kwargs = dict(student_logits=torch.randn(4, 10), teacher_logits=torch.randn(4, 10))
    kwargs.update(bad)
    with pytest.raises(exc, match=match):
        uf.dual_masked_kl(**kwargs)


def test_device_mismatch_is_reported():
    s = torch.randn(2, 5)
    t = torch.randn(2, 5, device="meta")
    with pytest.raises(ValueError, match="teacher_logits"):
        uf.dual_masked_kl(s, t)
    with pytest.raises(ValueError, match="token_mask"):
        uf.dual_masked_kl(s, s, torch.ones(2, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="vocab_mask"):
        uf.dual_masked_kl(s, s, vocab_mask=torch.ones(5, dtype=torch.bool, device="meta"))


def test_unavailable_backend_raises_with_reason():
    with pytest.raises(uf.BackendUnavailableError, match="cuda"):
        uf.dual_masked_kl(torch.randn(2, 5), torch.randn(2, 5), backend="cuda")


def test_auto_fallback_warns_once(monkeypatch):
    from unlearn_fast import backends as B

    monkeypatch.setattr(B, "_warned", set())
    monkeypatch.setattr(B, "availability", lambda name: B.Availability(name == "eager", "disabled for the test"))
    with pytest.warns(RuntimeWarning, match="falls back"):
        uf.dual_masked_kl(torch.randn(2, 5), torch.randn(2, 5))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        uf.dual_masked_kl(torch.randn(2, 5), torch.randn(2, 5))


@needs_cpp
def test_auto_picks_cpp_on_cpu():
    assert backends.resolve("dual_masked_kl", "auto", "cpu") == "cpp"


@needs_cpp
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    s = torch.randn(3, 7, 131, requires_grad=True)
    t = torch.randn(3, 7, 131)
    ks = torch.rand(3, 7) > 0.3

    def loss_fn(x, y, m):
        return uf.dual_masked_kl(x, y, m, forget_token_ids=[4, 9], reduction="mean", backend="cpp") * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend=compiler)
    out = compiled(s, t, ks)
    (g,) = torch.autograd.grad(out, s)
    ref = loss_fn(s, t, ks)
    (gref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(g, gref, atol=1e-7)
    assert math.isfinite(out.item())


@pytest.mark.parametrize("backend", ["eager"] + FAST + (["triton"] if backends.availability("triton").available
                                                         else []))
@pytest.mark.parametrize("form", ["kl", "cross_entropy"])
def test_teacher_neg_inf_logits_add_nothing(backend, form):
    # a teacher with a -inf logit (a token it can never emit) has p = 0 there: 0 log 0 = 0,
    # not 0 * -inf = NaN (the kernels once gave NaN for both forms, eager for "kl")
    torch.manual_seed(0)
    s, t = torch.randn(4, 29, dtype=torch.float64), torch.randn(4, 29, dtype=torch.float64)
    t[:, ::4] = float("-inf")
    p, log_q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    ce = -(p * log_q).sum(-1)
    expect = ce + torch.where(p > 0, p * torch.log_softmax(t, -1), 0).sum(-1) if form == "kl" else ce
    ss = s.float().requires_grad_()
    out = uf.dual_masked_kl(ss, t.float(), form=form, reduction="none", backend=backend)
    out.sum().backward()
    assert torch.allclose(out.double(), expect, atol=1e-5)
    assert torch.allclose(ss.grad.double(), torch.softmax(s, -1) - p, atol=1e-5)  # (q - p) per row
