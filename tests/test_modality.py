"""MultiDelete's losses: modality_decoupling_loss, similarity_matching_loss (MSE via the
Gram identity or blocked panels, KL with an online softmax) and the derangement helper.
Fast backends (cpp; triton under the interpreter) against a float64 eager oracle, with
grad_output != 1, odd shapes, float32 and bfloat16; semantics, edge cases, torch.compile,
clear errors.  GPU (cuda, triton on CUDA): the tests marked gpu at the end."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import backends
from unlearn_fast.ops import modality as M

from helpers import cpu_backends_for, rel_err

SIM_FAST = cpu_backends_for(M.OP_SIMILARITY)
MD_FAST = cpu_backends_for(M.OP_DECOUPLING)
needs_cpp = pytest.mark.skipif(not backends.availability("cpp").available, reason="C++ extension not built")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


# --------------------------------------------------------------------------------------
# similarity_matching_loss
# --------------------------------------------------------------------------------------
def _sim_inputs(bi, bt, d, dtype=torch.float32, scale=1.0, device="cpu"):
    xs = [torch.randn(n, d) * scale / math.sqrt(d) for n in (bi, bt, bi, bt)]
    return [x.to(device=device, dtype=dtype) for x in xs]


def _sim_run(inputs, backend, grad_out=-0.7, **kw):
    a, b, c, d = (x.detach().clone() for x in inputs)
    a.requires_grad_()
    b.requires_grad_()
    out = uf.similarity_matching_loss(a, b, c, d, backend=backend, **kw)
    ga, gb = torch.autograd.grad(out * grad_out, (a, b))
    return out, ga, gb


def _sim_oracle(inputs, grad_out=-0.7, **kw):
    kw = {k: v for k, v in kw.items() if k not in ("algorithm", "block_rows")}
    return _sim_run([x.double() for x in inputs], "eager", grad_out, **kw)


def _assert_close_to_oracle(inputs, backend, dtype, **kw):
    ref = _sim_oracle(inputs, **kw)
    eager_kw = {k: v for k, v in kw.items() if k not in ("algorithm", "block_rows")}
    eager = _sim_run(inputs, "eager", **eager_kw)
    out = _sim_run(inputs, backend, **kw)
    assert out[0].dtype == torch.float32 and out[0].dim() == 0
    assert out[1].dtype == dtype and out[2].dtype == dtype
    for got, want, base in zip(out, ref, eager):
        assert torch.isfinite(got.float()).all()
        assert rel_err(got, want) <= rel_err(base, want) + TOL[dtype], (rel_err(got, want), rel_err(base, want))


SIM_CASES = [  # (form, extra kwargs): each path of the fused backends
    ("mse", dict(algorithm="gram")),
    ("mse", dict(algorithm="blocked")),
    ("mse", dict(algorithm="blocked", block_rows=8)),
    ("kl", dict()),                 # one panel: the gradient is formed in the forward pass
    ("kl", dict(block_rows=8)),     # several panels: online column states, recomputing backward
]


@pytest.mark.parametrize("backend", SIM_FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("case", range(len(SIM_CASES)))
def test_similarity_matches_oracle(backend, dtype, direction, case):
    form, kw = SIM_CASES[case]
    if backend == "triton" and ("block_rows" in kw or (dtype == torch.bfloat16 and direction != "both")):
        pytest.skip("triton tiles by itself; bf16 runs once per form under the interpreter (slow)")
    inputs = _sim_inputs(37, 29, 19, dtype, scale=3.0)
    _assert_close_to_oracle(inputs, backend, dtype, form=form, direction=direction, temperature=0.7, **kw)


@pytest.mark.parametrize("backend", SIM_FAST)
@pytest.mark.parametrize("form", ["mse", "kl"])
def test_similarity_reduction_sum_and_odd_shapes(backend, form):
    for bi, bt, d in [(1, 5, 7), (6, 1, 7), (21, 33, 35)]:
        inputs = _sim_inputs(bi, bt, d, scale=2.0)
        _assert_close_to_oracle(inputs, backend, torch.float32, form=form, reduction="sum", temperature=1.3)


@pytest.mark.parametrize("backend", SIM_FAST)
def test_similarity_kl_peaked_and_extreme_logits(backend):
    # CLIP-like: unit embeddings, T = 0.01 (logits up to 100), and raw logits of ~1e3
    unit = [F.normalize(x, dim=-1) for x in _sim_inputs(24, 19, 40)]
    _assert_close_to_oracle(unit, backend, torch.float32, form="kl", temperature=0.01)
    big = _sim_inputs(24, 19, 40, scale=40.0)
    ref = _sim_oracle(big, form="kl", temperature=1.0)
    out = _sim_run(big, backend, form="kl", temperature=1.0, block_rows=5)
    for got, want in zip(out, ref):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < 1e-4


@pytest.mark.parametrize("backend", ["eager"] + SIM_FAST)
def test_similarity_mse_directions_agree_and_match_definition(backend):
    a, b, c, d = _sim_inputs(13, 17, 9)
    vals = [uf.similarity_matching_loss(a, b, c, d, form="mse", direction=k, temperature=0.5, backend=backend)
            for k in M.DIRECTIONS]
    expected = ((a @ b.t() - c @ d.t()) / 0.5).square().mean()
    for v in vals:
        assert torch.allclose(v, expected, rtol=1e-5)


def test_gram_identity_and_its_gradient_float64():
    """The formulas the fused MSE implements, restated in float64 against autograd."""
    a, b, c, d = (torch.randn(n, 11, dtype=torch.float64) for n in (7, 5, 7, 5))
    a.requires_grad_()
    b.requires_grad_()
    direct = (a @ b.t() - c @ d.t()).square().sum()
    ga, gb = torch.autograd.grad(direct, (a, b))
    with torch.no_grad():
        aa, bb, ac, bd = a.t() @ a, b.t() @ b, a.t() @ c, b.t() @ d
        gram = (aa * bb).sum() - 2 * (ac * bd).sum() + ((c.t() @ c) * (d.t() @ d)).sum()
        assert torch.allclose(gram, direct, rtol=1e-12)
        assert torch.allclose(2 * (a @ bb - c @ bd.t()), ga, rtol=1e-12)
        assert torch.allclose(2 * (b @ aa - d @ ac.t()), gb, rtol=1e-12)


def test_kl_form_matches_written_out_definition():
    a, b, c, d = (torch.randn(n, 6, dtype=torch.float64) for n in (4, 9, 4, 9))
    T = 0.3
    s, r = a @ b.t() / T, c @ d.t() / T

    def kl_rows(x, y):  # mean over rows of KL(softmax(y) || softmax(x))
        p = torch.softmax(y, 1)
        return (p * (torch.log_softmax(y, 1) - torch.log_softmax(x, 1))).sum(1).mean()

    for direction, expected in [("i2t", kl_rows(s, r)), ("t2i", kl_rows(s.t(), r.t())),
                                ("both", 0.5 * (kl_rows(s, r) + kl_rows(s.t(), r.t())))]:
        got = uf.similarity_matching_loss(a, b, c, d, form="kl", direction=direction, temperature=T, backend="eager")
        assert torch.allclose(got, expected, rtol=1e-12)
        for backend in SIM_FAST:
            fast = uf.similarity_matching_loss(a.float(), b.float(), c.float(), d.float(), form="kl",
                                               direction=direction, temperature=T, backend=backend)
            assert torch.allclose(fast.double(), expected, rtol=1e-5)


def test_choose_mse_algorithm_and_block_rows():
    assert M.choose_mse_algorithm(256, 256, 768) == "blocked"
    assert M.choose_mse_algorithm(16384, 16384, 512) == "gram"
    assert M.default_block_rows(100, 50) == 100
    rows = M.default_block_rows(16384, 16384)
    assert rows % 16 == 0 and rows * 16384 <= M.PANEL_ELEMENTS


@pytest.mark.parametrize("backend", ["eager"] + SIM_FAST)
def test_similarity_references_get_no_gradient_and_empty_batch(backend):
    a, b, c, d = _sim_inputs(5, 6, 8)
    a.requires_grad_()
    c.requires_grad_()  # a reference that happens to require grad stays a constant
    c0 = c.detach().clone()
    out = uf.similarity_matching_loss(a, b, c, d, form="kl", backend=backend)
    out.backward()
    assert c.grad is None and torch.equal(c.detach(), c0) and a.grad is not None
    e = torch.zeros(0, 8, requires_grad=True)
    zero = uf.similarity_matching_loss(e, b, torch.zeros(0, 8), d, form="kl", backend=backend)
    assert zero.item() == 0.0
    zero.backward()
    assert e.grad.shape == (0, 8)


# --------------------------------------------------------------------------------------
# modality_decoupling_loss
# --------------------------------------------------------------------------------------
def _md_inputs(dtype=torch.float32):
    shapes = [(3, 5, 33), (11, 17), (7, 9)]  # a 3-D pair, different D per pair
    out = []
    for shape in shapes:
        s = torch.randn(shape)
        out += [s.to(dtype), (s + 0.5 * torch.randn(shape)).to(dtype)]
    return out


def _md_run(tensors, backend, **kw):
    ts = [t.detach().clone().requires_grad_(i % 2 == 0) for i, t in enumerate(tensors)]
    total, terms = uf.modality_decoupling_loss(*ts, backend=backend, return_terms=True, **kw)
    grads = torch.autograd.grad(total * 1.9, ts[0::2])
    return [total] + [terms[k] for k in M.TERM_NAMES] + list(grads)


@pytest.mark.parametrize("backend", MD_FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distance", ["mse", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_decoupling_matches_oracle(backend, dtype, distance, reduction):
    tensors = _md_inputs(dtype)
    kw = dict(distance=distance, reduction=reduction, weights=(1.0, 0.3, -2.5))
    ref = _md_run([t.double() for t in tensors], "eager", **kw)
    eager = _md_run(tensors, "eager", **kw)
    out = _md_run(tensors, backend, **kw)
    assert all(o.dtype == torch.float32 for o in out[:4])
    assert all(g.dtype == dtype for g in out[4:])
    for got, want, base in zip(out, ref, eager):
        assert rel_err(got, want) <= rel_err(base, want) + TOL[dtype]


def test_decoupling_is_the_papers_sum_of_mse_terms():
    t = _md_inputs()
    total, terms = uf.modality_decoupling_loss(*t, backend="eager", return_terms=True)
    expected = [F.mse_loss(t[k], t[k + 1]) for k in (0, 2, 4)]
    for name, e in zip(M.TERM_NAMES, expected):
        assert torch.allclose(terms[name], e)
    assert torch.allclose(total, sum(expected))
    cos = uf.modality_decoupling_loss(*t, distance="cosine", weights=(0, 0, 1), backend="eager")
    assert torch.allclose(cos, (1 - F.cosine_similarity(t[4], t[5], dim=-1)).mean())


@pytest.mark.parametrize("backend", ["eager"] + MD_FAST)
def test_decoupling_empty_pair_zero_vectors_and_inputs_untouched(backend):
    t = _md_inputs()
    t[2], t[3] = torch.zeros(0, 17), torch.zeros(0, 17)  # no retained pairs this step
    t[4][0] = 0.0  # a zero embedding: cosine treats its norm as eps (torch's clamp)
    before = [x.clone() for x in t]
    for distance in M.DISTANCES:
        out = _md_run(t, backend, distance=distance)
        assert out[2].item() == 0.0 and all(torch.isfinite(o).all() for o in out)
        assert out[5].shape == (0, 17)
        ref = _md_run([x.double() for x in t], "eager", distance=distance)
        assert rel_err(out[0], ref[0]) < 1e-5 and rel_err(out[6], ref[6]) < 1e-5
    assert all(torch.equal(x, y) for x, y in zip(t, before))


@needs_cpp
def test_decoupling_gradient_only_where_needed():
    t = _md_inputs()
    s0 = t[0].clone().requires_grad_()
    out = uf.modality_decoupling_loss(s0, *t[1:], backend="cpp")
    (g,) = torch.autograd.grad(out, s0)
    ref = uf.modality_decoupling_loss(s0.double(), *(x.double() for x in t[1:]), backend="eager")
    (gref,) = torch.autograd.grad(ref, s0)
    assert rel_err(g, gref) < 1e-5


# --------------------------------------------------------------------------------------
# derangement
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 5, 101])
def test_derangement_is_a_permutation_without_fixed_points(n):
    for seed in range(20):
        p = uf.derangement(n, seed)
        assert p.dtype == torch.int64
        assert torch.equal(p.sort().values, torch.arange(n))
        assert not (p == torch.arange(n)).any()


def test_derangement_seeded_reproducible_and_uniform():
    assert torch.equal(uf.derangement(50, 7), uf.derangement(50, 7))
    assert not torch.equal(uf.derangement(50, 7), uf.derangement(50, 8))
    g = torch.Generator().manual_seed(0)
    counts = {}
    draws = 2700
    for _ in range(draws):
        key = tuple(uf.derangement(4, generator=g).tolist())
        counts[key] = counts.get(key, 0) + 1
    all_derangements = [p for p in itertools.permutations(range(4)) if all(p[i] != i for i in range(4))]
    assert sorted(counts) == sorted(all_derangements)  # all 9, including the two-cycle pairs
    expected = draws / len(all_derangements)  # 300; sd ~16
    assert all(abs(c - expected) < 80 for c in counts.values()), counts


def test_shuffle_without_fixed_points_and_errors():
    x = torch.arange(12.0).reshape(6, 2)
    y, perm = uf.shuffle_without_fixed_points(x, seed=3)
    assert torch.equal(y, x[perm]) and not (perm == torch.arange(6)).any()
    with pytest.raises(ValueError, match="n must be >= 2"):
        uf.derangement(1)
    with pytest.raises(TypeError, match="n must be a Python int"):
        uf.derangement(True)
    with pytest.raises(TypeError, match="seed"):
        uf.derangement(4, seed=1.5)


# --------------------------------------------------------------------------------------
# torch.compile, nn.Modules, validation
# --------------------------------------------------------------------------------------
@needs_cpp
def test_torch_compile_fullgraph():
    a, b, c, d = _sim_inputs(9, 11, 6)
    t = _md_inputs()

    def step(a, b, c, d, *t):
        kl = uf.similarity_matching_loss(a, b, c, d, form="kl", backend="cpp")
        mse = uf.similarity_matching_loss(a, b, c, d, form="mse", algorithm="gram", backend="cpp")
        md = uf.modality_decoupling_loss(*t, distance="cosine", backend="cpp")
        return kl + mse + md

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [x.clone().requires_grad_(i in (0, 1, 4)) for i, x in enumerate([a, b, c, d] + t)]
    out = compiled(*args)
    grads = torch.autograd.grad(out, [args[0], args[1], args[4]])
    ref_args = [x.clone().requires_grad_(i in (0, 1, 4)) for i, x in enumerate([a, b, c, d] + t)]
    ref = step(*ref_args)
    ref_grads = torch.autograd.grad(ref, [ref_args[0], ref_args[1], ref_args[4]])
    assert torch.allclose(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r)


def test_modules():
    a, b, c, d = _sim_inputs(5, 5, 4)
    mod = uf.SimilarityMatchingLoss(form="kl", temperature=0.5, backend="eager")
    assert torch.allclose(mod(a, b, c, d), uf.similarity_matching_loss(a, b, c, d, form="kl", temperature=0.5,
                                                                       backend="eager"))
    t = _md_inputs()
    md = uf.ModalityDecouplingLoss(weights=(1, 2, 3), backend="eager")
    assert torch.allclose(md(*t), uf.modality_decoupling_loss(*t, weights=(1, 2, 3), backend="eager"))
    assert "weights" in repr(md) and "form='kl'" in repr(mod)


def test_similarity_validation_errors():
    a, b, c, d = _sim_inputs(4, 5, 6)
    sim = uf.similarity_matching_loss
    with pytest.raises(ValueError, match="reference_image has shape"):
        sim(a, b, c[:3], d)
    with pytest.raises(ValueError, match="embedding size"):
        sim(a, b[:, :5], c, d[:, :5])
    with pytest.raises(ValueError, match="student_image must have 2 dimensions"):
        sim(a[0], b, c, d)
    with pytest.raises(TypeError, match="dtype"):
        sim(a, b.double(), c, d.double())
    with pytest.raises(TypeError, match="floating-point"):
        sim(a.long(), b, c.long(), d)
    with pytest.raises(ValueError, match="form must be one of"):
        sim(a, b, c, d, form="l2")
    with pytest.raises(ValueError, match="direction must be one of"):
        sim(a, b, c, d, direction="x")
    with pytest.raises(ValueError, match="applies to form='mse' only"):
        sim(a, b, c, d, form="kl", algorithm="gram")
    with pytest.raises(ValueError, match="temperature"):
        sim(a, b, c, d, temperature=0.0)
    with pytest.raises(ValueError, match="block_rows"):
        sim(a, b, c, d, block_rows=0)
    with pytest.raises(ValueError, match="D >= 1"):
        sim(a[:, :0], b[:, :0], c[:, :0], d[:, :0])
    with pytest.raises(ValueError, match="backend must be one of"):
        sim(a, b, c, d, backend="fast")
    if SIM_FAST:
        with pytest.raises(TypeError, match="float64"):
            sim(a.double(), b.double(), c.double(), d.double(), backend=SIM_FAST[0])


def test_decoupling_validation_errors():
    t = _md_inputs()
    md = uf.modality_decoupling_loss
    with pytest.raises(ValueError, match="reference_retain_fused has shape"):
        md(t[0], t[1], t[2], t[3][:, :4], t[4], t[5])
    with pytest.raises(TypeError, match="dtype"):
        md(t[0], t[1], t[2].double(), t[3].double(), t[4], t[5])
    with pytest.raises(TypeError, match="student_unimodal must be a torch.Tensor"):
        md(t[0], t[1], t[2], t[3], None, t[5])
    with pytest.raises(ValueError, match="D >= 1"):
        md(t[0], t[1], t[2][:, :0], t[3][:, :0], t[4], t[5])
    with pytest.raises(ValueError, match="three entries"):
        md(*t, weights=(1.0, 1.0))
    with pytest.raises(TypeError, match="Python numbers"):
        md(*t, weights=(1.0, torch.tensor(1.0), 1.0))
    with pytest.raises(ValueError, match="finite"):
        md(*t, weights=(1.0, float("nan"), 1.0))
    with pytest.raises(ValueError, match="distance must be one of"):
        md(*t, distance="l1")
    with pytest.raises(ValueError, match="reduction must be one of"):
        md(*t, reduction="none")


# --------------------------------------------------------------------------------------
# GPU: cuda and triton on CUDA against the float64 oracle (run on a GPU machine)
# --------------------------------------------------------------------------------------
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("direction", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("case", range(len(SIM_CASES)))
def test_gpu_similarity_matches_oracle(backend, dtype, direction, case):
    form, kw = SIM_CASES[case]
    for bi, bt, d in [(37, 29, 19), (300, 517, 96)]:
        inputs = _sim_inputs(bi, bt, d, dtype, scale=3.0, device="cuda")
        _assert_close_to_oracle(inputs, backend, dtype, form=form, direction=direction, temperature=0.7, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_gpu_decoupling_matches_oracle(backend, dtype, distance):
    tensors = [t.cuda() for t in _md_inputs(dtype)]
    kw = dict(distance=distance, weights=(1.0, 0.3, -2.5))
    ref = _md_run([t.double() for t in tensors], "eager", **kw)
    eager = _md_run(tensors, "eager", **kw)
    out = _md_run(tensors, backend, **kw)
    for got, want, base in zip(out, ref, eager):
        assert rel_err(got, want) <= rel_err(base, want) + TOL[dtype]


@pytest.mark.gpu
def test_gpu_similarity_large_batch_runs_without_batch_squared_memory():
    a, b, c, d = _sim_inputs(16384, 16384, 256, device="cuda")
    a.requires_grad_()
    b.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = uf.similarity_matching_loss(a, b, c, d, form="kl", backend="cuda")
    out.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(out) and extra < 16384 * 16384 * 4  # less than one B x B float32 matrix


@needs_cpp
def test_auto_routes_tiny_cpu_batches_to_eager_and_larger_ones_to_cpp(monkeypatch):
    calls = []
    real = M.reference_similarity
    monkeypatch.setattr(M, "reference_similarity", lambda *a: calls.append("eager") or real(*a))
    small = _sim_inputs(16, 16, 8)
    uf.similarity_matching_loss(*small, form="kl")
    assert calls == ["eager"]
    large = _sim_inputs(300, 300, 8)
    uf.similarity_matching_loss(*large, form="kl")
    assert calls == ["eager"]  # 300 x 300 > AUTO_EAGER_MAX_ELEMENTS: the fused path ran


def test_decoupling_auto_routes_small_cpu_batches_to_eager(monkeypatch):
    """backend="auto" on the CPU: eager up to AUTO_EAGER_DECOUPLING_ELEMENTS per tensor, the
    fused pass above (when the cpp backend is built)."""
    import unlearn_fast.ops.modality as mod
    from unlearn_fast import backends as be

    calls = []
    real = mod._md_fwd
    monkeypatch.setattr(mod, "_md_fwd", lambda *a: calls.append(a[-1]) or real(*a))
    d = 64
    small_rows = mod.AUTO_EAGER_DECOUPLING_ELEMENTS // d
    for rows, expect_fused in ((small_rows, False), (small_rows + 1, True)):
        calls.clear()
        xs = [torch.randn(rows, d) for _ in range(6)]
        xs[0].requires_grad_()
        loss = mod.modality_decoupling_loss(*xs)
        loss.backward()
        fused_here = be.resolve(mod.OP_DECOUPLING, "auto", "cpu") != "eager"
        assert bool(calls) == (expect_fused and fused_here), (rows, calls)
        expected = sum(torch.nn.functional.mse_loss(xs[k].detach(), xs[k + 1]) for k in (0, 2, 4))
        torch.testing.assert_close(loss.detach(), expected.to(loss.dtype), rtol=1e-5, atol=1e-6)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_auto_runs_half_precision_fused_whatever_the_batch_size(dtype):
    # small batches used to take the eager path, which rounds in the input dtype: near
    # convergence (student ~ reference) the cosine term was off by 130 %, fp16 sums overflowed
    torch.manual_seed(0)
    ref = [torch.randn(64, 512) for _ in range(3)]
    stu = [(r + 0.02 * torch.randn_like(r)) for r in ref]
    xs = [t.to(dtype) for pair in zip(stu, ref) for t in pair]
    for distance, reduction in (("cosine", "mean"), ("mse", "sum")):
        got = uf.modality_decoupling_loss(*xs, distance=distance, reduction=reduction)
        oracle = uf.modality_decoupling_loss(*[x.double() for x in xs], distance=distance, reduction=reduction)
        assert torch.isfinite(got) and abs(float(got) - float(oracle)) <= 1e-3 * abs(float(oracle)), distance
    unit = [F.normalize(torch.randn(64, 512), dim=1) for _ in range(4)]
    sim = [u.to(dtype) for u in unit]
    got = uf.similarity_matching_loss(*sim, form="kl")
    oracle = uf.similarity_matching_loss(*[s.double() for s in sim], form="kl")
    assert abs(float(got) - float(oracle)) <= 1e-3 * abs(float(oracle))
