"""Head-level fused ops on a CUDA GPU: token_stats (+ cross_entropy) and
fused_linear_dual_masked_kl, cuda and triton backends, against the float64 eager
oracle on the CPU; fp32/bf16, masks, biases, frozen/shared heads, grad_output != 1,
reduction none, the Qwen2-VL vocabulary, no host synchronisation in the forward, and
torch.compile.  Marked gpu: skipped without CUDA (tests/conftest.py)."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import backends
from unlearn_fast.ops import token_stats as ts

from helpers import rel_err

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
EXTRAS = ("lse", "entropy", "mean_logp", "std_logp")
IGN = -100


def _available(backend):
    av = backends.availability(backend)
    if not av.available:  # on a GPU machine both backends must run
        pytest.fail(f"backend {backend!r} unavailable on a GPU machine: {av.reason}")


def _round(x, dtype):
    return None if x is None else x.to(dtype).to(torch.float64)


# ------------------------------------------------------------------------ token_stats
def _ts_run(h, w, b, t, dtype, backend, device, go, weight_grad):
    hh = h.to(device=device, dtype=dtype).requires_grad_()
    ww = w.to(device=device, dtype=dtype).requires_grad_(weight_grad)
    bb = None if b is None else b.to(device=device, dtype=dtype).requires_grad_()
    out = uf.token_stats(hh, ww, t.to(device), bb, stats=ts.STATS, chunk_size=64, backend=backend)
    inputs = [hh] + ([ww] if weight_grad else []) + ([bb] if bb is not None else [])
    grads = torch.autograd.grad(out["logprob"], inputs, go.to(device=device, dtype=out["logprob"].dtype))
    return {k: v.cpu() for k, v in out.items()}, [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_token_stats_matches_oracle(backend, dtype, weight_grad, bias):
    _available(backend)
    n, H, V = 301, 96, 5003
    h = _round(torch.randn(n, H, dtype=torch.float64), dtype)
    w = _round(torch.randn(V, H, dtype=torch.float64) * 3 / H ** 0.5, dtype)
    b = _round(torch.randn(V, dtype=torch.float64), dtype) if bias else None
    t = torch.randint(0, V, (n,))
    t[torch.rand(n) < 0.25] = IGN
    go = torch.rand(n, dtype=torch.float64) * 3 - 1
    ref, rg = _ts_run(h, w, b, t, torch.float64, "eager", "cpu", go, weight_grad)
    eag, eg = _ts_run(h, w, b, t, dtype, "eager", "cuda", go, weight_grad)
    out, og = _ts_run(h, w, b, t, dtype, backend, "cuda", go, weight_grad)
    for k in ("logprob",) + EXTRAS:
        assert rel_err(out[k], ref[k]) <= rel_err(eag[k], ref[k]) + TOL[dtype], k
    valid = t != IGN
    assert torch.equal(out["correct"], (out["argmax"] == t) & valid)
    for a, r, e in zip(og, rg, eg):
        assert a.dtype == dtype
        assert rel_err(a, r) <= rel_err(e, r) + TOL[dtype]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_token_stats_qwen_vocab_and_all_ignored(backend):
    _available(backend)
    n, H, V = 40, 64, 151936
    h = torch.randn(n, H, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(V, H, device="cuda") / H ** 0.5).to(torch.bfloat16)
    t = torch.randint(0, V, (n,), device="cuda")
    out = uf.token_stats(h, w, t, stats=ts.STATS, backend=backend)
    ref = uf.token_stats(h.double().cpu(), w.double().cpu(), t.cpu(), stats=ts.STATS, backend="eager")
    for k in ("logprob",) + EXTRAS:
        assert rel_err(out[k], ref[k]) <= 2e-2, k
    t[:] = IGN
    hh = h.clone().requires_grad_()
    loss = uf.cross_entropy(hh, w, t, backend=backend)
    (g,) = torch.autograd.grad(loss, hh)
    assert loss.item() == 0.0 and torch.all(g == 0)


# -------------------------------------------------------------- fused linear DMK
def _fl_inputs(n, H, V, dtype, *, bias=False, shared=False):
    f64 = dict(dtype=torch.float64)
    sw = torch.randn(V, H, **f64) * 3 / H ** 0.5
    x = dict(sh=torch.randn(n, H, **f64), th=torch.randn(n, H, **f64), sw=sw,
             tw=sw if shared else sw + 0.5 * torch.randn(V, H, **f64) / H ** 0.5,
             sb=torch.randn(V, **f64) if bias else None, tb=torch.randn(V, **f64) if bias else None)
    x = {k: _round(v, dtype) for k, v in x.items()}
    x["shared"] = shared
    return x


def _fl_run(x, dtype, backend, device, go, *, weight_grad, **kw):
    d = dict(device=device, dtype=dtype)
    sh = x["sh"].to(**d).requires_grad_()
    sw = x["sw"].to(**d).requires_grad_(weight_grad)
    tw = sw if x["shared"] else x["tw"].to(**d)
    sb = None if x["sb"] is None else x["sb"].to(**d).requires_grad_()
    tb = None if x["tb"] is None else x["tb"].to(**d)
    mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = uf.fused_linear_dual_masked_kl(sh, sw, x["th"].to(**d), tw, student_bias=sb, teacher_bias=tb,
                                         backend=backend, **mv)
    inputs = [sh] + ([sw] if weight_grad else []) + ([sb] if sb is not None else [])
    grads = torch.autograd.grad(out, inputs, go.to(device=device, dtype=out.dtype))
    return out.cpu(), [g.cpu() for g in grads]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "mean", "siu"])
@pytest.mark.parametrize("head", ["trainable", "frozen_shared"])
def test_fused_linear_matches_oracle(backend, dtype, reduction, head):
    _available(backend)
    n, H, V = 203, 96, 5003
    x = _fl_inputs(n, H, V, dtype, bias=True, shared=head == "frozen_shared")
    ks = torch.rand(n) < 0.7
    go = torch.rand(n, dtype=torch.float64) * 3 - 1 if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    kw = dict(token_mask=ks, forget_token_ids=[0, 7, V - 1], reduction=reduction, temperature=1.3, chunk_size=64,
              weight_grad=head == "trainable")
    ref, rg = _fl_run(x, torch.float64, "eager", "cpu", go, **kw)
    eag, eg = _fl_run(x, dtype, "eager", "cuda", go, **kw)
    out, og = _fl_run(x, dtype, backend, "cuda", go, **kw)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(out, ref) <= rel_err(eag, ref) + TOL[dtype]
    for a, r, e in zip(og, rg, eg):
        assert a.dtype == dtype
        assert rel_err(a, r) <= rel_err(e, r) + TOL[dtype]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_linear_qwen_vocab_all_masked_and_no_sync(backend):
    _available(backend)
    n, H, V = 48, 64, 151936
    x = _fl_inputs(n, H, V, torch.bfloat16)
    d = dict(device="cuda", dtype=torch.bfloat16)
    sh, sw, th = x["sh"].to(**d), x["sw"].to(**d), x["th"].to(**d)
    ks = (torch.rand(n) < 0.7).to("cuda")
    kv = (torch.rand(V) < 0.99).to("cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the forward raises
    try:
        out = uf.fused_linear_dual_masked_kl(sh.requires_grad_(), sw, th, sw, ks, kv, reduction="none",
                                             backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = uf.fused_linear_dual_masked_kl(sh.detach().double().cpu(), sw.double().cpu(), th.double().cpu(),
                                         sw.double().cpu(), ks.cpu(), kv.cpu(), reduction="none", backend="eager")
    assert rel_err(out.detach(), ref) <= 2e-2
    loss = uf.fused_linear_dual_masked_kl(sh, sw, th, sw, torch.zeros_like(ks), backend=backend)
    (g,) = torch.autograd.grad(loss, sh)
    assert loss.item() == 0.0 and torch.all(g == 0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_linear_compile_fullgraph(backend):
    _available(backend)
    torch._dynamo.reset()
    x = _fl_inputs(37, 32, 1031, torch.float32)
    d = dict(device="cuda", dtype=torch.float32)
    sh, sw, th = x["sh"].to(**d), x["sw"].to(**d), x["th"].to(**d)

    def fn(hidden, weight, teacher):
        return uf.fused_linear_dual_masked_kl(hidden, weight, teacher, weight, chunk_size=16, backend=backend) * 2

    compiled = torch.compile(fn, fullgraph=True)
    res = []
    for f in (compiled, fn):
        hh, ww = sh.clone().requires_grad_(), sw.clone().requires_grad_()
        val = f(hh, ww, th)
        res.append((val,) + torch.autograd.grad(val, [hh, ww]))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
