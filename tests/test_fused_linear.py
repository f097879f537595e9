"""fused_linear_dual_masked_kl: every CPU backend (cpp; triton under the interpreter)
against a float64 eager oracle, with fresh random inputs, non-power-of-two N/H/V,
grad_output != 1, masks, biases, frozen / trainable / shared heads, all reductions and
both forms; the Python chunk loop the triton backend runs; torch.compile; validation.
GPU: tests/test_linear_gpu.py."""
import importlib.util

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import backends
from unlearn_fast.ops import dual_masked_kl as dmk
from unlearn_fast.ops import fused_linear as fl

from helpers import cpu_backends_for, rel_err

HAS_TRITON_DMK = importlib.util.find_spec("unlearn_fast.triton") is not None and \
    importlib.util.find_spec("unlearn_fast.triton.dual_masked_kl") is not None
_needs_triton_dmk = pytest.mark.skipif(not HAS_TRITON_DMK, reason="unlearn_fast/triton/dual_masked_kl.py (the "
                                       "Triton DMK row kernels, branch dmk) is not in this tree yet")


def _backend_params():
    out = []
    for name in cpu_backends_for(fl.OP):
        out.append(pytest.param(name, marks=_needs_triton_dmk) if name == "triton" else name)
    return out


FAST = _backend_params()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _shape_for(backend):
    # the triton interpreter runs Python per block: keep its shapes tiny
    return (11, 8, 131, 4) if backend == "triton" else (37, 19, 1271, 8)  # N, H, V, chunk


def _inputs(lead, H, V, dtype, *, bias=False, shared=False, scale=1.0):
    """Student/teacher hidden states and heads, rounded to ``dtype`` and held in float64
    so that the oracle sees exactly the low-precision run's inputs."""
    f64 = dict(dtype=torch.float64)
    sh, th = torch.randn(*lead, H, **f64), torch.randn(*lead, H, **f64)
    sw = torch.randn(V, H, **f64) * (3 * scale / H ** 0.5)
    tw = sw if shared else sw + 0.5 * torch.randn(V, H, **f64) / H ** 0.5
    sb = torch.randn(V, **f64) if bias else None
    tb = torch.randn(V, **f64) if bias else None
    r = lambda x: None if x is None else x.to(dtype).to(torch.float64)  # noqa: E731
    return dict(sh=r(sh), sw=r(sw), th=r(th), tw=r(sw) if shared else r(tw), sb=r(sb), tb=r(tb), shared=shared)


def _run(x, dtype, backend, go, *, weight_grad=True, bias_grad=True, **kw):
    """Loss and gradients w.r.t. student hidden (and weight, bias when trainable)."""
    sh = x["sh"].to(dtype).requires_grad_()
    sw = x["sw"].to(dtype).requires_grad_(weight_grad)
    tw = sw if x["shared"] else x["tw"].to(dtype)
    sb = None if x["sb"] is None else x["sb"].to(dtype).requires_grad_(bias_grad)
    tb = None if x["tb"] is None else x["tb"].to(dtype)
    out = uf.fused_linear_dual_masked_kl(sh, sw, x["th"].to(dtype), tw, student_bias=sb, teacher_bias=tb,
                                         backend=backend, **kw)
    names = ["h"] + (["w"] if weight_grad else []) + (["b"] if sb is not None and bias_grad else [])
    inputs = [sh] + ([sw] if weight_grad else []) + ([sb] if sb is not None and bias_grad else [])
    grads = torch.autograd.grad(out, inputs, go.to(out.dtype))
    return out, dict(zip(names, grads))


def _grad_output(lead, reduction):
    if reduction == "none":
        return torch.rand(lead, dtype=torch.float64) * 3 - 1  # non-uniform, mixed sign
    return torch.tensor(1.7, dtype=torch.float64)


def _check(x, dtype, backend, *, reduction="mean", weight_grad=True, bias_grad=True, **kw):
    lead = x["sh"].shape[:-1]
    go = _grad_output(lead, reduction)
    ref, rg = _run(x, torch.float64, "eager", go, weight_grad=weight_grad, bias_grad=bias_grad,
                   reduction=reduction, **kw)
    eag, eg = _run(x, dtype, "eager", go, weight_grad=weight_grad, bias_grad=bias_grad, reduction=reduction, **kw)
    out, og = _run(x, dtype, backend, go, weight_grad=weight_grad, bias_grad=bias_grad, reduction=reduction, **kw)
    tol = TOL[dtype]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= rel_err(eag, ref) + tol, (rel_err(out, ref), rel_err(eag, ref))
    assert og.keys() == rg.keys()
    for k in rg:
        assert og[k].dtype == dtype and og[k].shape == rg[k].shape, k
        e_fast, e_eager = rel_err(og[k], rg[k]), rel_err(eg[k], rg[k])
        assert e_fast <= e_eager + tol, ("grad", k, e_fast, e_eager)
    return out, og


def _random_token_mask(lead, p_keep=0.7):
    return torch.rand(lead) < p_keep


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_oracle(backend, dtype, reduction):
    n, h, v, chunk = _shape_for(backend)
    x = _inputs((n,), h, v, dtype)
    ks = _random_token_mask((n,))
    out, og = _check(x, dtype, backend, reduction=reduction, token_mask=ks, forget_token_ids=[0, 5, v - 1],
                     chunk_size=chunk)
    if reduction == "none":  # masked positions: zero loss, no gradient into their hidden rows
        assert torch.all(out[~ks] == 0)
        assert torch.all(og["h"][~ks] == 0)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("reduction", ["sum", "siu", "none"])
@pytest.mark.parametrize("form", ["kl", "cross_entropy"])
def test_reductions_forms_temperature_bias(backend, reduction, form):
    n, h, v, chunk = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32, bias=True)
    vm = torch.rand(v) < 0.8
    _check(x, torch.float32, backend, reduction=reduction, form=form, temperature=1.7, vocab_mask=vm,
           token_mask=_random_token_mask((n,)), chunk_size=chunk)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("head", ["frozen", "shared_trainable", "shared_frozen"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_frozen_and_shared_heads(backend, head, reduction):
    n, h, v, chunk = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32, shared=head.startswith("shared"))
    _, og = _check(x, torch.float32, backend, reduction=reduction, weight_grad=head == "shared_trainable",
                   token_mask=_random_token_mask((n,)), chunk_size=chunk)
    assert ("w" in og) == (head == "shared_trainable")


@pytest.mark.parametrize("backend", [b for b in FAST if b != "triton"])  # interpreter: too slow at this V
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocabulary_slabs(backend, reduction):
    # V over several of the CPU float32 GEMMs' vocabulary slabs (csrc/linear_chunk.h,
    # kVocabSlab = 4096) with a partial last one, biases, and a one-row last chunk
    x = _inputs((17,), 12, 2 * 4096 + 123, torch.float32, bias=True)
    _check(x, torch.float32, backend, reduction=reduction, chunk_size=8, forget_token_ids=[3, 4500, 8300])


@pytest.mark.parametrize("backend", FAST)
def test_bf16_bias_frozen_head_default_chunk(backend):
    n, h, v, _ = _shape_for(backend)
    x = _inputs((2, n), h, v, torch.bfloat16, bias=True)
    _check(x, torch.bfloat16, backend, reduction="none", weight_grad=False, bias_grad=True,
           token_mask=_random_token_mask((2, n)))


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("which", ["all_on", "all_off", "vocab_all_off"])
def test_mask_extremes(backend, which):
    n, h, v, chunk = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32, bias=True)
    ks = torch.zeros(n, dtype=torch.bool) if which == "all_off" else torch.ones(n, dtype=torch.bool)
    vm = torch.zeros(v, dtype=torch.bool) if which == "vocab_all_off" else None
    for reduction in ("mean", "none"):
        out, og = _check(x, torch.float32, backend, reduction=reduction, token_mask=ks, vocab_mask=vm,
                         chunk_size=chunk)
        if which != "all_on":  # nothing contributes: exactly zero loss and gradients, no NaN
            assert torch.all(out == 0)
            for g in og.values():
                assert torch.all(g == 0)


@pytest.mark.parametrize("backend", FAST)
def test_caller_views_of_shifted_hidden_states(backend):
    # methods pass hidden[:, :-1] (non-contiguous views) and a (B, T-1) token mask
    n, h, v, chunk = _shape_for(backend)
    B, T = 2, n // 2 + 2
    sh = torch.randn(B, T, h)
    th = torch.randn(B, T, h)
    w = torch.randn(v, h) * (3 / h ** 0.5)
    ks = torch.rand(B, T - 1) < 0.7
    go = torch.rand(B, T - 1) + 0.5

    def run(hidden, teacher, be):
        hh = hidden.clone().requires_grad_()
        ww = w.to(hidden.dtype).requires_grad_()
        loss = uf.fused_linear_dual_masked_kl(hh[:, :-1], ww, teacher[:, :-1], ww, ks, reduction="none",
                                              chunk_size=chunk, backend=be)
        return (loss,) + torch.autograd.grad(loss, [hh, ww], go.to(loss.dtype))

    ref = run(sh.double(), th.double(), "eager")
    got = run(sh, th, backend)
    eag = run(sh, th, "eager")
    assert got[0].shape == (B, T - 1)
    for a, r, e in zip(got, ref, eag):
        assert rel_err(a, r) <= rel_err(e, r) + 1e-5
    assert torch.all(got[1][:, -1] == 0)  # the last position predicts nothing


@pytest.mark.parametrize("backend", FAST)
def test_extreme_logits(backend):
    # logits of magnitude ~1e3: the kernels keep maxima and log-sums apart
    n, h, v, chunk = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32, scale=300.0)
    _check(x, torch.float32, backend, reduction="none", chunk_size=chunk)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_chunk_sizes(backend, chunk):
    n, h, v, _ = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32)
    _check(x, torch.float32, backend, reduction="sum", token_mask=_random_token_mask((n,)), chunk_size=chunk)


@pytest.mark.parametrize("backend", FAST)
def test_masked_chunks_are_skipped_exactly(backend):
    # whole chunks of masked tokens (the CPU kernel skips their GEMMs) and zero grad_output
    n, h, v, _ = _shape_for(backend)
    x = _inputs((n,), h, v, torch.float32)
    ks = torch.ones(n, dtype=torch.bool)
    ks[: n // 2] = False
    out, og = _check(x, torch.float32, backend, reduction="none", token_mask=ks, chunk_size=2)
    assert torch.all(out[: n // 2] == 0) and torch.all(og["h"][: n // 2] == 0)


@pytest.mark.parametrize("backend", ["eager"] + FAST)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(backend, reduction):
    sh = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(33, 8, requires_grad=True)
    out = uf.fused_linear_dual_masked_kl(sh, w, torch.randn(0, 8), w, reduction=reduction, backend=backend)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction == "mean":
        assert out.item() == 0.0
        gh, gw = torch.autograd.grad(out, [sh, w])
        assert gh.shape == (0, 8) and torch.all(gw == 0)


@pytest.mark.parametrize("rows_backend", [
    "cpp", pytest.param("triton", marks=_needs_triton_dmk)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_python_chunk_loop(rows_backend, dtype):
    # The loop the triton backend runs (chunked_forward / chunked_backward), driven by
    # any backend's dual_masked_kl row kernels, against the float64 oracle.
    try:
        rows = backends.implementations(dmk.OP)[rows_backend]
        backends.resolve(dmk.OP, rows_backend, "cpu")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"{rows_backend} dual_masked_kl rows unavailable: {exc}")
    n, h, v, chunk = (11, 8, 131, 4) if rows_backend == "triton" else (29, 13, 517, 6)
    x = _inputs((n,), h, v, dtype, bias=True)
    ks = _random_token_mask((n,)).float()
    kv = (torch.rand(v) < 0.9).float()
    inv_t = 1 / 1.3
    args = lambda d: [x[k].to(d, copy=True) for k in ("sh", "sw", "th", "tw", "sb", "tb")]  # noqa: E731
    sh, sw, th, tw, sb, tb = [a.requires_grad_() if i in (0, 1, 4) else a
                              for i, a in enumerate(args(torch.float64))]
    ref_rows = fl.reference_linear(sh, sw, th, tw, sb, tb, ks.double(), kv.double(), inv_t, False)
    go = torch.rand(n, dtype=torch.float64) + 0.5
    r_gh, r_gw, r_gb = torch.autograd.grad(ref_rows, [sh, sw, sb], go, retain_graph=True)
    r_sum_gw, r_sum_gb = torch.autograd.grad(ref_rows.sum(), [sw, sb])
    a = args(dtype)
    loss, stats, gh, gw, gb = fl.chunked_forward(rows, *a, ks, kv, inv_t, False, chunk, True, True, True)
    tol = TOL[dtype]
    assert rel_err(loss, ref_rows) <= tol
    assert rel_err(gh.double() * go[:, None], r_gh) <= 3 * tol  # per-row Jacobian x grad_output
    assert rel_err(gw, r_sum_gw) <= 3 * tol and rel_err(gb, r_sum_gb) <= 3 * tol
    gw2, gb2 = fl.chunked_backward(rows, go.float(), *a, ks, kv, stats, inv_t, chunk, True, True)
    assert gw2.dtype == dtype and rel_err(gw2, r_gw) <= 3 * tol and rel_err(gb2, r_gb) <= 3 * tol


def test_no_grad_forward_equals_grad_forward():
    x = _inputs((23,), 12, 301, torch.float32)
    sh, sw, th = x["sh"].float(), x["sw"].float(), x["th"].float()
    for red in ("mean", "none"):
        with torch.no_grad():
            a = uf.fused_linear_dual_masked_kl(sh, sw, th, sw, reduction=red, chunk_size=8)
        b = uf.fused_linear_dual_masked_kl(sh.clone().requires_grad_(), sw, th, sw, reduction=red, chunk_size=8)
        assert not a.requires_grad and b.requires_grad
        assert torch.equal(a, b.detach())


def test_second_backward_through_summed_graph_is_refused():
    x = _inputs((9,), 8, 77, torch.float32)
    sh = x["sh"].float().requires_grad_()
    sw = x["sw"].float().requires_grad_()
    loss = uf.fused_linear_dual_masked_kl(sh, sw, x["th"].float(), sw)
    torch.autograd.grad(loss, [sh, sw], retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, [sh, sw])


def test_module_form():
    x = _inputs((2, 6), 8, 97, torch.float32)
    sh, sw, th = x["sh"].float(), x["sw"].float(), x["th"].float()
    ks = _random_token_mask((2, 6))
    mod = uf.FusedLinearDualMaskedKLDivLoss(forget_token_ids=[1, 2], form="cross_entropy", reduction="siu")
    assert "siu" in repr(mod)
    expected = uf.fused_linear_dual_masked_kl(sh, sw, th, sw, ks, forget_token_ids=[1, 2], form="cross_entropy",
                                              reduction="siu")
    torch.testing.assert_close(mod(sh, sw, th, sw, token_mask=ks), expected)


def test_default_chunk_size_rule():
    from unlearn_fast.ops import _linear_head
    from unlearn_fast.ops import token_stats as ts

    budget, floor = _linear_head.CHUNK_BYTES, _linear_head.MIN_CHUNK_ROWS
    split, split_rows = _linear_head.SPLIT_CHUNKS, _linear_head.SPLIT_CHUNK_ROWS
    for vocab in (32000, 151936, 4099, 97):
        for fn, buffers in ((fl.default_chunk_size, 2), (ts.default_chunk_size, 1)):
            c = fn(vocab)
            assert c % 8 == 0 and c >= floor
            assert c == floor or 4 * buffers * c * vocab <= budget < 4 * buffers * (c + 8) * vocab
            assert fn(vocab, num_tokens=5) == 5
            budget_bound = c == floor and 4 * buffers * floor * vocab > budget
            for n in (300, 512, 600, 1000, 4097, 20000):
                cn = fn(vocab, num_tokens=n)
                chunks = -(-n // cn)
                assert cn <= n and (cn == n or cn % 8 == 0)
                # balanced: no thin last chunk
                assert n - (chunks - 1) * cn > cn - 8 * chunks
                assert cn < 2 * c + 8
                if budget_bound and n // c < split and n >= split * split_rows:
                    # a large vocabulary splits a few hundred tokens into at least 3 chunks
                    assert chunks >= split and cn >= split_rows
                else:
                    # each chunk at least the unbalanced size
                    assert cn >= min(c, n)
    assert fl.default_chunk_size(151936, num_tokens=512) == 176
    assert ts.default_chunk_size(151936, num_tokens=1024) == 256
    assert fl.default_chunk_size(32000, num_tokens=512) == 512


def test_float64_runs_eager_and_explicit_fast_refuses():
    x = _inputs((5,), 8, 40, torch.float32)
    out = uf.fused_linear_dual_masked_kl(x["sh"], x["sw"], x["th"], x["tw"])
    assert out.dtype == torch.float64
    fast = cpu_backends_for(fl.OP)
    if fast:
        with pytest.raises(TypeError, match="float64"):
            uf.fused_linear_dual_masked_kl(x["sh"], x["sw"], x["th"], x["tw"], backend=fast[0])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(compiler, reduction):
    torch._dynamo.reset()
    x = _inputs((2, 7), 16, 301, torch.float32, bias=True)
    sh, sw, th, sb = x["sh"].float(), x["sw"].float(), x["th"].float(), x["sb"].float()
    ks = _random_token_mask((2, 7))
    weights = torch.rand(2, 7)

    def fn(hidden, weight, teacher, bias, mask):
        out = uf.fused_linear_dual_masked_kl(hidden, weight, teacher, weight, mask, reduction=reduction,
                                             student_bias=bias, teacher_bias=bias, forget_token_ids=[3],
                                             chunk_size=4)
        return (out * weights).sum() if reduction == "none" else out * 2

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    results = []
    for f in (compiled, fn):
        hh, ww, bb = sh.clone().requires_grad_(), sw.clone().requires_grad_(), sb.clone().requires_grad_()
        val = f(hh, ww, th, bb, ks)
        results.append((val,) + torch.autograd.grad(val, [hh, ww, bb]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _valid():
    h = torch.randn(4, 6)
    w = torch.randn(11, 6)
    return dict(student_hidden=h, student_weight=w, teacher_hidden=torch.randn(4, 6), teacher_weight=w)


@pytest.mark.parametrize("change, exc, match", [
    (dict(student_hidden=[[1.0]]), TypeError, "student_hidden must be a torch.Tensor"),
    (dict(student_hidden=torch.ones(4, 6, dtype=torch.long)), TypeError, "student_hidden must be a floating"),
    (dict(student_weight=torch.randn(11, 6, 1)), ValueError, "student_weight must have 2 dimensions"),
    (dict(student_weight=torch.randn(11, 5)), ValueError, "hidden size 6"),
    (dict(student_weight=torch.randn(0, 6)), ValueError, "at least one vocabulary row"),
    (dict(teacher_hidden=torch.randn(5, 6)), ValueError, "teacher_hidden has shape"),
    (dict(teacher_hidden=torch.randn(4, 6, dtype=torch.bfloat16)), TypeError, "teacher_hidden has dtype"),
    (dict(teacher_weight=torch.randn(12, 6)), ValueError, "teacher_weight has shape"),
    (dict(student_bias=torch.randn(10)), ValueError, "student_bias must have shape"),
    (dict(teacher_bias=torch.randn(11, dtype=torch.float64)), TypeError, "teacher_bias has dtype"),
    (dict(token_mask=torch.ones(5, dtype=torch.bool)), ValueError, "token_mask must have shape"),
    (dict(vocab_mask=torch.ones(10, dtype=torch.bool)), ValueError, "vocab_mask must have shape"),
    (dict(forget_token_ids=[11]), ValueError, "forget_token_ids must lie in"),
    (dict(forget_token_ids=[0.5]), TypeError, "forget_token_ids"),
    (dict(form="reverse"), ValueError, "form must be one of"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(temperature=0.0), ValueError, "temperature must be a finite positive"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(chunk_size=2.5), ValueError, "chunk_size must be a positive int"),
    (dict(backend="fastest"), ValueError, "backend must be one of"),
])
def test_validation_errors(change, exc, match):
    kw = _valid()
    kw.update(change)
    with pytest.raises(exc, match=match):
        uf.fused_linear_dual_masked_kl(**kw)


def test_unavailable_backend_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(uf.BackendUnavailableError, match="cuda"):
        uf.fused_linear_dual_masked_kl(**_valid(), backend="cuda")
