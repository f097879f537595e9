"""Dual masked KL on a CUDA GPU: the cuda and triton backends against the float64 eager
oracle (on the CPU), fp32/bf16/fp16, masks, extreme logits, the Qwen2-VL vocabulary
(151936), the scalar-load path (odd V, misaligned rows), torch.compile, and no host
synchronisation.  Marked gpu: skipped without CUDA (tests/conftest.py).  Run with
TRITON_INTERPRET=0 (benchmarks/gpu_suite.sh) so that triton compiles for the GPU."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import backends

from helpers import rel_err

pytestmark = pytest.mark.gpu
GPU_BACKENDS = ["cuda", "triton"]  # on a GPU machine both must run: _available() fails otherwise
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _available(backend):
    if backend == "triton" and backends.triton_interpret():
        pytest.skip("TRITON_INTERPRET=1 (tests/conftest.py's default): run with TRITON_INTERPRET=0 to test "
                    "compiled triton kernels (benchmarks/gpu_suite.sh does)")
    av = backends.availability(backend)
    if not av.available:
        pytest.fail(f"backend {backend!r} unavailable on a GPU machine: {av.reason}")


def _masks(kind, lead, vocab):
    if kind == "none":
        return None, None
    if kind == "all_off":
        return torch.zeros(lead, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
    return torch.rand(lead) > 0.3, torch.rand(vocab) > 0.2


def _logits(kind, shape, dtype):
    x = torch.randn(shape)
    if kind == "extreme":
        x = torch.randint(-1, 2, shape).float() * 1e4 + torch.randn(shape)
    elif kind == "peaked":
        x = x * 8.0
        x.scatter_(-1, torch.randint(0, shape[-1], shape[:-1]).unsqueeze(-1), 30.0)
    return x.to(dtype)


def _run(s, t, ks, kv, backend, device, *, form, reduction, temperature, grad_out, dtype=None):
    x = s.detach().to(device=device, dtype=dtype or s.dtype).requires_grad_()
    mv = lambda m: None if m is None else m.to(device)  # noqa: E731
    out = uf.dual_masked_kl(x, t.to(device=device, dtype=x.dtype), mv(ks), mv(kv), form=form, reduction=reduction,
                            temperature=temperature, backend=backend)
    (g,) = torch.autograd.grad(out, x, grad_out.to(device=device, dtype=out.dtype))
    return out.cpu(), g.cpu()


def _check(s, t, ks, kv, backend, *, form="kl", reduction="none", temperature=1.0, grad_out=None):
    dtype = s.dtype
    lead = s.shape[:-1]
    go = grad_out if grad_out is not None else (torch.rand(lead) * 2 - 0.5 if reduction == "none" else torch.tensor(1.7))
    kw = dict(form=form, reduction=reduction, temperature=temperature, grad_out=go)
    ref, gref = _run(s, t, ks, kv, "eager", "cpu", dtype=torch.float64, **kw)
    eout, eg = _run(s, t, ks, kv, "eager", "cuda", **kw)
    out, g = _run(s, t, ks, kv, backend, "cuda", **kw)
    assert out.dtype == torch.float32 and g.dtype == dtype and g.shape == s.shape
    assert torch.isfinite(out).all() and torch.isfinite(g.float()).all()
    scale = max(1.0, ref.abs().max().item())
    err = (out.double() - ref).abs().max().item() / scale
    eerr = (eout.double() - ref).abs().max().item() / scale
    assert err <= eerr + TOL[dtype], (err, eerr)
    assert rel_err(g, gref) <= rel_err(eg, gref) + TOL[dtype], (rel_err(g, gref), rel_err(eg, gref))
    return out, g


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masks", ["none", "all_off", "random"])
@pytest.mark.parametrize("shape", [(37, 1271), (3, 5, 4096), (2, 7, 32000)])
def test_matches_oracle(backend, dtype, masks, shape):
    _available(backend)
    s, t = _logits("normal", shape, dtype), _logits("normal", shape, dtype)
    ks, kv = _masks(masks, shape[:-1], shape[-1])
    for form in ("kl", "cross_entropy"):
        out, g = _check(s, t, ks, kv, backend, form=form, temperature=1.3)
        if ks is not None:
            assert torch.all(out[~ks] == 0) and torch.all(g[~ks] == 0)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen2vl_vocabulary(backend, dtype):
    _available(backend)
    shape = (6, 151936)
    s, t = _logits("peaked", shape, dtype), _logits("normal", shape, dtype)
    ks, kv = _masks("random", shape[:-1], shape[-1])
    for reduction in ("none", "mean", "siu"):
        _check(s, t, ks, kv, backend, form="cross_entropy", reduction=reduction)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["peaked", "extreme"])
def test_peaked_and_extreme_logits(backend, dtype, kind):
    _available(backend)
    shape = (19, 9001)
    s, t = _logits(kind, shape, dtype), _logits(kind, shape, dtype)
    ks, kv = _masks("random", shape[:-1], shape[-1])
    for form in ("kl", "cross_entropy"):
        _check(s, t, ks, kv, backend, form=form)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_misaligned_rows_take_the_scalar_path(backend):
    """Contiguous logits whose data pointer is not 16-byte aligned (a view at offset 1)."""
    _available(backend)
    n, V = 5, 4000
    flat_s, flat_t = torch.randn(n * V + 1, device="cuda"), torch.randn(n * V + 1, device="cuda")
    s, t = flat_s[1:].view(n, V), flat_t[1:].view(n, V)
    assert s.is_contiguous() and s.data_ptr() % 16 != 0
    kv = (torch.rand(V, device="cuda") > 0.2)
    x = s.detach().clone().requires_grad_()  # aligned copy for the reference run
    ref = uf.dual_masked_kl(s.double(), t.double(), vocab_mask=kv, reduction="none", backend="eager")
    out = uf.dual_masked_kl(s.requires_grad_(), t, vocab_mask=kv, reduction="none", backend=backend)
    assert rel_err(out, ref) < 1e-5
    (g,) = torch.autograd.grad(out.sum(), s)
    (gref,) = torch.autograd.grad(uf.dual_masked_kl(x, t, vocab_mask=kv, reduction="none", backend="eager").sum(), x)
    assert rel_err(g, gref) < 1e-5


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_all_masked_and_empty(backend):
    _available(backend)
    s = torch.randn(3, 41, device="cuda", requires_grad=True)
    t = torch.randn(3, 41, device="cuda")
    for reduction in ("mean", "siu", "sum", "none"):
        out = uf.dual_masked_kl(s, t, torch.zeros(3, dtype=torch.bool, device="cuda"), reduction=reduction,
                                backend=backend)
        assert torch.all(out == 0)
        (g,) = torch.autograd.grad(out.sum(), s)
        assert torch.all(g == 0)
    empty = uf.dual_masked_kl(torch.randn(0, 9, device="cuda"), torch.randn(0, 9, device="cuda"), reduction="sum",
                              backend=backend)
    assert empty.item() == 0.0


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_kl_div_equivalence(backend):
    _available(backend)
    s, t = torch.randn(2, 7, 3001, device="cuda"), torch.randn(2, 7, 3001, device="cuda")
    out = uf.dual_masked_kl(s, t, form="kl", reduction="sum", backend=backend)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s, -1), torch.log_softmax(t, -1), log_target=True,
                                          reduction="sum")
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_auto_picks_cuda():
    _available("cuda")
    assert backends.resolve("dual_masked_kl", "auto", "cuda") == "cuda"
    info = backends.native_cuda().build_info()
    assert info["device_count"] >= 1 and info["archs"] != "unknown"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_torch_compile_fullgraph(backend):
    _available(backend)
    s = torch.randn(3, 7, 1031, device="cuda", requires_grad=True)
    t = torch.randn(3, 7, 1031, device="cuda")
    ks = torch.rand(3, 7, device="cuda") > 0.3
    kv = torch.rand(1031, device="cuda") > 0.1

    def loss_fn(x, y, m):
        return uf.dual_masked_kl(x, y, m, kv, reduction="mean", backend=backend) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    out = compiled(s, t, ks)
    (g,) = torch.autograd.grad(out, s)
    ref = loss_fn(s, t, ks)
    (gref,) = torch.autograd.grad(ref, s)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(g, gref, atol=1e-7)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync_in_forward_and_backward(backend):
    _available(backend)
    s = torch.randn(8, 2048, device="cuda", requires_grad=True)
    t = torch.randn(8, 2048, device="cuda")
    ks = torch.rand(8, device="cuda") > 0.3
    kv = torch.rand(2048, device="cuda") > 0.1
    uf.dual_masked_kl(s, t, ks, kv, backend=backend).backward()  # warm up (compile, imports)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = uf.dual_masked_kl(s, t, ks, kv, reduction="mean", backend=backend)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
