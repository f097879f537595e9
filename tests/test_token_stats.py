"""token_stats / token_stats_from_logits: every CPU backend (cpp; triton under the
interpreter) against a float64 eager oracle, semantics of ignored positions, gradients
with grad_output != 1, extras, torch.compile, validation.  GPU: test_token_stats_gpu.py."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.ops import token_stats as ts

from helpers import cpu_backends_for, rel_err

FAST = cpu_backends_for("token_stats")
BACKENDS = ["eager"] + FAST
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
EXTRAS = ("lse", "entropy", "mean_logp", "std_logp")
IGN = -100


def _inputs(lead, H, V, dtype, bias=False, ignore_frac=0.25, scale=1.0):
    h = torch.randn(*lead, H, dtype=torch.float64)
    w = torch.randn(V, H, dtype=torch.float64) * (scale / H ** 0.5) * 3
    b = torch.randn(V, dtype=torch.float64) if bias else None
    t = torch.randint(0, V, lead)
    t[torch.rand(lead) < ignore_frac] = IGN
    cast = lambda x: None if x is None else x.to(dtype).to(torch.float64)  # noqa: E731
    # The oracle sees the same (rounded) inputs as the low-precision run.
    return cast(h), cast(w), cast(b), t


def _run(h, w, b, t, dtype, backend, go, weight_grad=True, chunk_size=None, stats=ts.STATS):
    hh = h.to(dtype).requires_grad_()
    ww = w.to(dtype).requires_grad_(weight_grad)
    bb = None if b is None else b.to(dtype).requires_grad_()
    out = uf.token_stats(hh, ww, t, bb, stats=stats, chunk_size=chunk_size, backend=backend)
    inputs = [hh] + ([ww] if weight_grad else []) + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(out["logprob"], inputs, go.to(out["logprob"].dtype))
    return out, dict(zip(["h"] + (["w"] if weight_grad else []) + (["b"] if bb is not None else []), grads))


def _check_against_oracle(h, w, b, t, dtype, backend, weight_grad=True, chunk_size=None):
    go = torch.rand(t.shape, dtype=torch.float64) * 3 - 1  # grad_output != 1, mixed sign
    ref, rg = _run(h, w, b, t, torch.float64, "eager", go, weight_grad)
    eag, eg = _run(h, w, b, t, dtype, "eager", go, weight_grad)
    out, og = _run(h, w, b, t, dtype, backend, go, weight_grad, chunk_size)
    tol = TOL[dtype]
    for k in ("logprob",) + EXTRAS:
        assert out[k].shape == t.shape
        assert out[k].dtype == torch.float32
        e_fast, e_eager = rel_err(out[k], ref[k]), rel_err(eag[k], ref[k])
        assert e_fast <= e_eager + tol, (k, e_fast, e_eager)
    for k in rg:
        e_fast, e_eager = rel_err(og[k], rg[k]), rel_err(eg[k], rg[k])
        assert og[k].dtype == dtype
        assert e_fast <= e_eager + tol, ("grad", k, e_fast, e_eager)
    if not weight_grad:
        assert "w" not in og
    # argmax: the oracle logit at our argmax is the row maximum (up to rounding ties)
    logits = h.reshape(-1, h.shape[-1]) @ w.t() + (0 if b is None else b)
    valid = (t != IGN).reshape(-1)
    am = out["argmax"].reshape(-1)
    assert out["argmax"].dtype == torch.long
    picked = logits.gather(1, am[:, None]).squeeze(1)
    slack = 1e-4 if dtype == torch.float32 else 0.1
    assert torch.all((picked >= logits.max(1).values - slack * logits.abs().max(1).values)[valid])
    assert torch.equal(out["correct"].reshape(-1), (am == t.reshape(-1)) & valid)
    # ignored positions: 0 / False everywhere, no gradient into their hidden rows
    ign = ~valid
    for k in ("logprob",) + EXTRAS + ("argmax",):
        assert torch.all(out[k].reshape(-1)[ign] == 0), k
    assert not out["correct"].reshape(-1)[ign].any()
    assert torch.all(og["h"].reshape(-1, h.shape[-1])[ign] == 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_oracle(backend, dtype):
    h, w, b, t = _inputs((37,), 19, 1271, dtype)
    _check_against_oracle(h, w, b, t, dtype, backend, chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_3d_bias_weight_grad(backend, weight_grad):
    h, w, b, t = _inputs((3, 13), 19, 1271, torch.float32, bias=True)
    _check_against_oracle(h, w, b, t, torch.float32, backend, weight_grad=weight_grad, chunk_size=16)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_vocabulary_slabs(backend, weight_grad):
    # V over several of the CPU float32 GEMMs' vocabulary slabs (csrc/linear_chunk.h,
    # kVocabSlab = 4096) with a partial last one, a bias, and a one-row last chunk
    h, w, b, t = _inputs((17,), 12, 2 * 4096 + 123, torch.float32, bias=True)
    _check_against_oracle(h, w, b, t, torch.float32, backend, weight_grad=weight_grad, chunk_size=8)
    # the summed path (cross_entropy: gradients formed in the forward)
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_(weight_grad)
    loss = uf.cross_entropy(hh, ww, t, b.float(), chunk_size=8, backend=backend)
    ref = torch.nn.functional.cross_entropy(h @ w.t() + b, t, ignore_index=IGN)
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    got = torch.autograd.grad(loss, [hh] + ([ww] if weight_grad else []))
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(hr @ wr.t() + b, t, ignore_index=IGN), [hr, wr])
    for a, r in zip(got, want):
        assert rel_err(a, r) <= 1e-5


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype,offset", [(torch.float32, 0.0), (torch.float32, 1e4), (torch.bfloat16, 0.0)])
def test_linear_vocabulary_blocks_online_max(backend, dtype, offset):
    # The CPU loops fold the vocabulary in blocks of 4096 with a running maximum per token
    # (csrc/token_stats.cpp, linear_fwd_blocked / linear_bwd_blocked; bfloat16 without the
    # forward's hidden gradient): a bias rising with the vocabulary id raises every
    # token's maximum in each later block (each raise rescales the running sums and the
    # hidden-gradient accumulator), some tokens are nearly certain of their target
    # (1 - p_t from s_excl / s, no cancellation), the logits sit at +-1e4 with offset, and
    # an argmax tie across blocks must give the first index.
    V, H, n = 3 * 4096 + 77, 10, 23
    h, w, _, t = _inputs((n,), H, V, dtype, ignore_frac=0.2)
    b = torch.linspace(-6.0, 6.0, V, dtype=torch.float64) + offset
    w[4096 + 5] = w[5]
    b[4096 + 5] = b[5] = 40.0 + offset  # the two largest logits of tokens with h . w_5 ~ 0
    h[0] = 0.0
    t[0] = 2 * 4096 + 1
    t[1:4] = V - 1
    h[1:4] = w[V - 1] * 60.0  # p_t ~ 1
    h, b = h.to(dtype).double(), b.to(dtype).double()  # the oracle sees the rounded inputs
    for wg in (True, False):
        out = _check_against_oracle(h, w, b, t, dtype, backend, weight_grad=wg, chunk_size=8)
        assert out["argmax"][0].item() == 5
    # no-grad forward (evaluation) through the same loop
    with torch.no_grad():
        got = uf.token_stats(h.to(dtype), w.to(dtype), t, b.to(dtype), stats=ts.STATS, chunk_size=8,
                             backend=backend)
    assert got["argmax"][0].item() == 5
    ref = uf.token_stats(h, w, t, b, stats=ts.STATS, backend="eager")
    tol = 1e-5 * max(1.0, offset / 100) if dtype == torch.float32 else 1e-2
    for k in ("logprob",) + EXTRAS:
        scale = ref[k].abs().max().clamp_min(1.0)
        assert ((got[k].double() - ref[k]).abs().max() / scale).item() <= tol, k


@pytest.mark.parametrize("backend", FAST)
def test_linear_minus_inf_logits(backend):
    # A bias of -inf (a vocabulary masked out) over the whole first block of 4096 ids and
    # a few later ones: every token's maximum is -inf after the first block, which must add
    # nothing (not NaN) to its running sums.  Eager's entropy is NaN there (0 * -inf).
    V, H, n = 4096 + 300, 8, 11
    h, w, _, t = _inputs((n,), H, V, torch.float32, ignore_frac=0.0)
    b = torch.zeros(V, dtype=torch.float64)
    b[:4096] = float("-inf")
    b[4200:4210] = float("-inf")
    t = torch.randint(4096, V, (n,))
    t[(t >= 4200) & (t < 4210)] = 4300
    stats = ("logprob", "lse", "std_logp")
    hh = h.float().requires_grad_()
    out = uf.token_stats(hh, w.float(), t, b.float(), stats=stats, chunk_size=4, backend=backend)
    (gh,) = torch.autograd.grad(out["logprob"].sum(), [hh])
    hr = h.clone().requires_grad_()
    ref = uf.token_stats(hr, w, t, b, stats=stats, backend="eager")
    (gr,) = torch.autograd.grad(ref["logprob"].sum(), [hr])
    assert torch.isfinite(out["std_logp"]).all()
    assert rel_err(out["logprob"], ref["logprob"]) <= 1e-5
    assert rel_err(out["lse"], ref["lse"]) <= 1e-5
    assert rel_err(gh, gr) <= 1e-5


@pytest.mark.parametrize("backend", FAST)
def test_linear_bf16_bias_default_chunk(backend):
    h, w, b, t = _inputs((2, 11), 24, 1000, torch.bfloat16, bias=True, scale=4.0)
    _check_against_oracle(h, w, b, t, torch.bfloat16, backend)


@pytest.mark.parametrize("backend", FAST)
def test_ignored_chunks_are_zero(backend):
    # whole chunks of ignored tokens (skipped by the CPU kernel) and grad_output zeros
    h, w, b, t = _inputs((40,), 16, 300, torch.float32, ignore_frac=0.0)
    t[:17] = IGN
    out = _check_against_oracle(h, w, b, t, torch.float32, backend, chunk_size=8)
    assert torch.all(out["logprob"][:17] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored(backend):
    h, w, _, t = _inputs((9,), 8, 77, torch.float32)
    t[:] = IGN
    hh = h.float().requires_grad_()
    ww = w.float().requires_grad_()
    out = uf.token_stats(hh, ww, t, stats=ts.STATS, backend=backend)
    for k in ts.STATS:
        assert not out[k].any(), k
    loss = uf.cross_entropy(hh, ww, t, backend=backend)
    assert loss.item() == 0.0
    gh, gw = torch.autograd.grad(loss, [hh, ww])
    assert torch.all(gh == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "extreme"])
def test_from_logits_matches_oracle(backend, dtype, kind):
    n, V = 29, 1031
    x = torch.randn(n, V, dtype=torch.float64)
    if kind == "extreme":
        x = torch.randint(-1, 2, (n, V)).double() * 1e4 + x
    x = x.to(dtype).double()
    t = torch.randint(0, V, (n,))
    t[::5] = IGN
    go = torch.rand(n, dtype=torch.float64) * 2 - 0.5

    def run(d, be):
        xx = x.to(d).requires_grad_()
        out = uf.token_stats_from_logits(xx, t, stats=ts.STATS, backend=be)
        (g,) = torch.autograd.grad(out["logprob"], xx, go.to(out["logprob"].dtype))
        return out, g

    ref, rg = run(torch.float64, "eager")
    eag, eg = run(dtype, "eager")
    out, og = run(dtype, backend)
    for k in ("logprob",) + EXTRAS:
        assert rel_err(out[k], ref[k]) <= rel_err(eag[k], ref[k]) + TOL[dtype], k
        assert torch.isfinite(out[k]).all()
    assert og.dtype == dtype
    assert rel_err(og, rg) <= rel_err(eg, rg) + TOL[dtype]
    if kind == "normal":  # distinct maxima: argmax is exact
        valid = t != IGN
        assert torch.equal(out["argmax"][valid], x.argmax(1)[valid])


def test_extras_formulas_float64():
    # The eager extras against textbook formulas (the oracle itself is checked here).
    x = torch.randn(6, 50, dtype=torch.float64) * 3
    t = torch.randint(0, 50, (6,))
    out = uf.token_stats_from_logits(x, t, stats=ts.STATS, backend="eager")
    p = torch.softmax(x, -1)
    logp = torch.log(p)
    mu = (p * logp).sum(-1)
    sigma = torch.sqrt((p * logp ** 2).sum(-1) - mu ** 2)
    torch.testing.assert_close(out["logprob"], logp.gather(1, t[:, None]).squeeze(1))
    torch.testing.assert_close(out["lse"], torch.logsumexp(x, -1))
    torch.testing.assert_close(out["entropy"], -mu)
    torch.testing.assert_close(out["mean_logp"], mu)
    torch.testing.assert_close(out["std_logp"], sigma)
    assert torch.equal(out["argmax"], x.argmax(-1))
    assert torch.equal(out["correct"], x.argmax(-1) == t)


def test_stats_subset_and_shapes():
    h, w, _, t = _inputs((2, 5), 8, 40, torch.float32)
    out = uf.token_stats(h.float(), w.float(), t, stats="entropy")
    assert list(out) == ["entropy"] and out["entropy"].shape == (2, 5)
    out = uf.token_stats(h.float(), w.float(), t)
    assert list(out) == ["logprob"]
    assert not out["logprob"].requires_grad


def test_float64_runs_eager_and_explicit_fast_refuses():
    h, w, _, t = _inputs((5,), 8, 40, torch.float32)
    out = uf.token_stats(h, w, t)  # float64, auto -> eager
    assert out["logprob"].dtype == torch.float64
    if FAST:
        with pytest.raises(TypeError, match="float64"):
            uf.token_stats(h, w, t, backend=FAST[0])


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compiler):
    torch._dynamo.reset()
    h, w, _, t = _inputs((2, 7), 16, 301, torch.float32)
    h, w = h.float(), w.float()

    def fn(hidden, weight, targets):
        out = uf.token_stats(hidden, weight, targets, stats=("logprob", "entropy", "correct"), chunk_size=4)
        return (out["logprob"] * 2).sum() + out["entropy"].sum() * 0 + out["correct"].sum() * 0

    compiled = torch.compile(fn, fullgraph=True, backend=compiler)
    hh = h.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    val = compiled(hh, ww, t)
    gh, gw = torch.autograd.grad(val, [hh, ww])
    h2 = h.clone().requires_grad_()
    w2 = w.clone().requires_grad_()
    ref = fn(h2, w2, t)
    rh, rw = torch.autograd.grad(ref, [h2, w2])
    torch.testing.assert_close(val, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gw, rw)


def test_bad_inputs():
    h = torch.randn(4, 8)
    w = torch.randn(30, 8)
    t = torch.randint(0, 30, (4,))
    with pytest.raises(ValueError, match="hidden"):
        uf.token_stats(torch.randn(8), w, t)
    with pytest.raises(ValueError, match="weight"):
        uf.token_stats(h, torch.randn(30, 9), t)
    with pytest.raises(TypeError, match="hidden"):
        uf.token_stats(h.long(), w, t)
    with pytest.raises(TypeError, match="weight"):
        uf.token_stats(h, w.double(), t)
    with pytest.raises(ValueError, match="targets"):
        uf.token_stats(h, w, t[:3])
    with pytest.raises(TypeError, match="targets"):
        uf.token_stats(h, w, t.float())
    with pytest.raises(ValueError, match="targets"):
        uf.token_stats(h, w, torch.tensor([0, 1, 30, 2]))
    with pytest.raises(ValueError, match="targets"):
        uf.token_stats(h, w, torch.tensor([0, 1, -5, 2]))
    with pytest.raises(ValueError, match="bias"):
        uf.token_stats(h, w, t, torch.randn(29))
    with pytest.raises(ValueError, match="stats"):
        uf.token_stats(h, w, t, stats=("logprob", "perplexity"))
    with pytest.raises(ValueError, match="chunk_size"):
        uf.token_stats(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="device"):
        uf.token_stats(h, w.to("meta"), t)
    with pytest.raises(ValueError, match="targets"):
        uf.token_stats_from_logits(torch.randn(4, 30), torch.randint(0, 30, (5,)))
    with pytest.raises(ValueError, match="backend"):
        uf.token_stats(h, w, t, backend="fortran")
    # ignore_index positions never trip the range check
    uf.token_stats(h, w, torch.tensor([0, -100, 29, -100]))


# ---- cross_entropy's summed path: gradients formed in the fused forward -------------
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_cross_entropy_summed_path_matches_oracle(backend, dtype, weight_grad):
    h, w, b, t = _inputs((3, 13), 19, 1271, dtype, bias=True)
    tw = torch.rand(t.shape, dtype=torch.float64) + 0.5
    go = torch.tensor(1.7, dtype=torch.float64)

    def run(d, be, reduction):
        hh = h.to(d).requires_grad_()
        ww = w.to(d).requires_grad_(weight_grad)
        bb = b.to(d).requires_grad_()
        out = uf.cross_entropy(hh, ww, t, bb, token_weights=tw.float(), reduction=reduction, chunk_size=8,
                               backend=be)
        inputs = [hh, bb] + ([ww] if weight_grad else [])
        return (out,) + torch.autograd.grad(out, inputs, go.to(out.dtype))

    for reduction in ("mean", "sum"):
        ref, eag, got = run(torch.float64, "eager", reduction), run(dtype, "eager", reduction), run(dtype, backend,
                                                                                                   reduction)
        for a, r, e in zip(got, ref, eag):
            assert a.dtype == (torch.float32 if a.dim() == 0 else dtype)
            assert rel_err(a, r) <= rel_err(e, r) + TOL[dtype]


@pytest.mark.parametrize("backend", FAST)
def test_cross_entropy_second_backward_refused_and_weight_grads_fallback(backend):
    h, w, _, t = _inputs((2, 9), 8, 77, torch.float32)
    hh, ww = h.float().requires_grad_(), w.float().requires_grad_()
    loss = uf.cross_entropy(hh, ww, t, backend=backend)
    torch.autograd.grad(loss, [hh, ww], retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(loss, [hh, ww])
    # token weights that require grad take the per-token path and receive a gradient
    tw = torch.rand(t.shape, requires_grad=True)
    loss = uf.cross_entropy(hh, ww, t, token_weights=tw, backend=backend)
    (g_tw,) = torch.autograd.grad(loss, tw)
    nll = -uf.token_stats(h, w, t, backend="eager")["logprob"]
    kept = (t != IGN).double()
    wt = tw.detach().double() * kept
    expected = (nll * kept) / wt.sum() - (nll * wt).sum() * kept / wt.sum() ** 2
    assert rel_err(g_tw, expected) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_compile_fullgraph(reduction):
    torch._dynamo.reset()
    h, w, _, t = _inputs((2, 7), 16, 301, torch.float32)
    h, w = h.float(), w.float()

    def fn(hidden, weight, targets):
        out = uf.cross_entropy(hidden, weight, targets, reduction=reduction, chunk_size=4)
        return out.sum() * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    res = []
    for f in (compiled, fn):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        val = f(hh, ww, t)
        res.append((val,) + torch.autograd.grad(val, [hh, ww]))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b)


def test_auto_routes_small_trainable_head_to_eager_on_cpu(monkeypatch):
    """backend="auto", CPU: per-token log-probs with a trainable head and small logits run the
    eager reference (the fused path would add a head GEMM); a frozen head stays fused."""
    import unlearn_fast.ops.token_stats as ts
    from unlearn_fast import backends as be

    if be.resolve(ts.OP, "auto", "cpu") == "eager":
        pytest.skip("no fused CPU backend built")
    calls = []
    real = ts._linear_fwd
    monkeypatch.setattr(ts, "_linear_fwd", lambda *a: calls.append(a[-1]) or real(*a))
    h = torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 50, (6,))
    for trainable, expect_fused in ((True, False), (False, True)):
        calls.clear()
        w = torch.randn(50, 8, requires_grad=trainable)
        lp = ts.token_stats(h, w, y)["logprob"]
        expected = torch.log_softmax(h.detach() @ w.detach().T, -1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(lp.detach(), expected)
        assert bool(calls) == expect_fused


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_logits_add_nothing_to_entropy_and_spread(backend):
    # a vocabulary masked with -inf (through the bias, or in the logits): p = 0 there, and
    # 0 log 0 = 0 (the kernels once added 0 * -inf = NaN, which the variance clamp hid as 0)
    z = torch.randn(3, 37, dtype=torch.float64)
    z[:, ::3] = float("-inf")
    t = torch.tensor([1, 2, 4])
    lp = torch.log_softmax(z, -1)
    p, fin = lp.exp(), torch.isfinite(lp)
    mean = torch.where(fin, p * lp, 0).sum(-1)
    std = torch.where(fin, p * (lp - mean[:, None]) ** 2, 0).sum(-1).sqrt()
    stats = ("logprob", "entropy", "mean_logp", "std_logp")
    lin = uf.token_stats(torch.zeros(3, 5), torch.zeros(37, 5), t, z[0].float(), stats=stats, backend=backend)
    # logits = bias = z[0] for every token
    assert torch.allclose(lin["entropy"].double(), -mean[0].expand(3), atol=1e-5)
    assert torch.allclose(lin["std_logp"].double(), std[0].expand(3), atol=1e-5)
    rows = uf.token_stats_from_logits(z.float(), t, stats=stats, backend=backend)
    assert torch.allclose(rows["entropy"].double(), -mean, atol=1e-5)
    assert torch.allclose(rows["mean_logp"].double(), mean, atol=1e-5)
    assert torch.allclose(rows["std_logp"].double(), std, atol=1e-5)
    assert torch.allclose(rows["logprob"].double(), lp.gather(1, t[:, None])[:, 0], atol=1e-5)


def test_eager_low_precision_logprobs_are_formed_in_float32():
    # `auto` may run a small trainable head eagerly and its frozen reference fused: both
    # must round the same way, i.e. log_softmax in float32, not in bfloat16
    torch.manual_seed(0)
    h, w = torch.randn(24, 16).bfloat16(), (torch.randn(50, 16) * 0.5).bfloat16()
    t = torch.randint(0, 50, (24,))
    expect = torch.log_softmax((h.float() @ w.float().t()).bfloat16().float(), -1).gather(1, t[:, None])[:, 0]
    for backend in BACKENDS:
        got = uf.token_stats(h, w, t, backend=backend)["logprob"]
        assert got.dtype == torch.float32
        assert (got - expect).abs().max() < 2e-3, backend  # bf16 log_softmax is off by ~1e-2
