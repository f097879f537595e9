"""unlearn_fast.saliency: every CPU backend (cpp; triton under the interpreter) against
the eager reference / a float64 oracle: Fisher accumulation, the ratio mask (bit-exact),
the global top-k (exact count, threshold and tie rule, incl. > 2^24 elements), BitMask
packing and files, the gradient transform (mask / geometry / clipping / projection), the
SalUn reset, name-pattern selection, torch.compile, bad input.  The distributed top-k
is in test_saliency_distributed.py; GPU runs of the same checks are marked gpu."""
import json
import math

import numpy as np
import pytest
import torch

from unlearn_fast import saliency as S
from unlearn_fast.ops import saliency as K

from helpers import compile_triton_for_gpu, cpu_backends_for, gpu_backends_for, rel_err

FAST = cpu_backends_for("saliency")
BACKENDS = ["eager"] + FAST
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
# odd sizes, an empty tensor, a tensor of one element, one spanning several 2048-chunks
SHAPES = [(37, 19), (0,), (1271,), (3, 5, 7), (1,), (4099,)]


def _randn(shapes, dtype=torch.float32, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _mixed(shapes):
    """fp32 and bf16 tensors in one list (two dtype groups)."""
    return [(torch.randn(s) * 2).to(torch.bfloat16 if i % 2 else torch.float32) for i, s in enumerate(shapes)]


def _same_bits(a: S.BitMask, b: S.BitMask) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.words, b.words))


# --------------------------------------------------------------------------------------
# Fisher accumulation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "mixed"])
def test_fisher_matches_oracle(backend, kind):
    params = _randn(SHAPES)
    batches = []
    for _ in range(3):
        if kind == "mixed":
            batches.append(_mixed(SHAPES))
        else:
            batches.append(_randn(SHAPES, getattr(torch, kind), scale=3.0))
    batches[1][2] = None  # a parameter the loss did not reach adds nothing
    scales = [1.0, 0.25, 3.0]
    oracle = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for grads, sc in zip(batches, scales):
        for o, g in zip(oracle, grads):
            if g is not None:
                o += sc * g.double() ** 2
    acc = S.FisherAccumulator(params, backend=backend)
    ref = S.FisherAccumulator(params, backend="eager")
    for grads, sc in zip(batches, scales):
        acc.accumulate(grads, sc)
        ref.accumulate(grads, sc)
    assert acc.num_batches == 3
    for f, fr, o in zip(acc.fisher, ref.fisher, oracle):
        assert f.dtype == torch.float32 and f.shape == o.shape
        assert rel_err(f, o) <= rel_err(fr, o) + 1e-6
    for m, o in zip(acc.mean(), oracle):
        assert rel_err(m, o / 3) <= 1e-6


def test_fisher_defaults_to_param_grads_and_names():
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)
    acc = S.FisherAccumulator(model)
    assert acc.names == ["0.weight", "1.weight", "1.bias"]
    model(torch.randn(4, 7)).square().sum().backward()
    acc.accumulate()
    fisher = acc.as_dict()
    assert torch.allclose(fisher["1.weight"], model[1].weight.grad ** 2)
    acc.reset()
    assert acc.num_batches == 0 and all(float(f.abs().sum()) == 0 for f in acc.fisher)
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        acc.mean()


def test_fisher_float64_runs_on_eager_and_fast_backends_refuse_it():
    params = _randn([(5, 3)], torch.float64)
    acc = S.FisherAccumulator(params, dtype=torch.float64)  # auto -> eager
    acc.accumulate(params)
    assert torch.equal(acc.fisher[0], params[0] ** 2)
    if FAST:
        acc = S.FisherAccumulator(params, dtype=torch.float64, backend=FAST[0])
        with pytest.raises(TypeError, match="float64"):
            acc.accumulate(params)


# --------------------------------------------------------------------------------------
# Ratio mask
# --------------------------------------------------------------------------------------
def _fishers(shapes):
    ff = [torch.rand(s) ** 4 for s in shapes]
    fp = [torch.rand(s) ** 4 for s in shapes]
    # exact ties of the ratio (1.0), zeros in both (ratio eps / eps = 1) and one side only
    for f, p in zip(ff, fp):
        flat_f, flat_p = f.view(-1), p.view(-1)
        n = flat_f.numel()
        flat_f[: n // 7] = flat_p[: n // 7]
        flat_f[n // 7: n // 5] = 0
        flat_p[n // 7: n // 6] = 0
        flat_p[n // 5: n // 4] = 0
    return ff, fp


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("threshold,eps", [(1.0, 1e-15), (0.5, 1e-15), (2.5, 0.0), (1.0, 1e-3)])
def test_ratio_mask_bits_equal_eager_float32(backend, threshold, eps):
    ff, fp = _fishers(SHAPES)
    ref = S.ratio_mask(ff, fp, threshold, eps, backend="eager")
    out = S.ratio_mask(ff, fp, threshold, eps, backend=backend)
    assert _same_bits(out, ref)
    dense = [((a + eps) / (b + eps) >= threshold) for a, b in zip(ff, fp)]
    assert all(torch.equal(d, e) for d, e in zip(out.to_dense(), dense))
    assert out.count(backend) == sum(int(d.sum()) for d in dense)
    assert out.meta == {"kind": "ratio", "threshold": threshold, "eps": eps}


def test_ratio_mask_paper_convention_zero_fishers_are_selected():
    m = S.ratio_mask([torch.zeros(5)], [torch.zeros(5)])
    assert m.count() == 5  # (0 + eps) / (0 + eps) = 1 >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_ratio_mask_float64_and_bfloat16_inputs(backend):
    ff, fp = _fishers(SHAPES)
    ff64 = [f.double() for f in ff]
    out = S.ratio_mask(ff64, [p.double() for p in fp], backend="auto")
    assert all(torch.equal(d, (a + 1e-15) / (b.double() + 1e-15) >= 1) for d, a, b in zip(out.to_dense(), ff64, fp))
    bf = [f.bfloat16() for f in ff]
    out = S.ratio_mask(bf, fp, backend=backend)
    ref = S.ratio_mask([f.float() for f in bf], fp, backend="eager")
    assert _same_bits(out, ref)


# --------------------------------------------------------------------------------------
# Global top-k
# --------------------------------------------------------------------------------------
def _reference_dense(scores, k):
    return K.reference_topk_bits(scores, k)


def _check_topk(scores, fraction, backend):
    total = sum(s.numel() for s in scores)
    k = min(total, int(math.floor(fraction * total + 0.5)))
    out = S.topk_mask(scores, fraction, backend=backend)
    assert out.count() == k
    ref = _reference_dense(scores, k)
    for d, r in zip(out.to_dense(), ref):
        assert torch.equal(d.reshape(-1), r)
    if 0 < k:
        flat = torch.cat([s.reshape(-1).float().abs() for s in scores])
        assert out.meta["threshold"] == float(torch.topk(flat, k).values[-1])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["float32", "bfloat16", "float16", "mixed", "integers"])
@pytest.mark.parametrize("fraction", [0.0, 1e-3, 0.1, 0.37, 1.0])
def test_topk_matches_reference(backend, kind, fraction):
    if kind == "mixed":
        scores = _mixed(SHAPES)
    elif kind == "integers":  # heavy ties at every threshold
        scores = [torch.randint(-3, 4, s).float() for s in SHAPES]
    else:
        scores = _randn(SHAPES, getattr(torch, kind), scale=0.01)
    out = _check_topk(scores, fraction, backend)
    assert out.meta["k"] == out.count()


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_tie_rule_keeps_ties_in_list_order(backend):
    # every |score| equal: the first k elements in (tensor, row-major) order are kept,
    # across tensor boundaries and across the 65536-element chunks of the tie search
    shapes = [(3, 5), (70001,), (0,), (33,)]
    scores = [torch.full(s, -2.5) for s in shapes]
    total = sum(math.prod(s) for s in shapes)
    ks = (1, 16, 40000, total - 1) if backend == "triton" else (1, 14, 15, 16, 40000, 70015, total - 1)
    for k in ks:  # (the interpreter is slow: fewer cuts)
        frac = k / total
        out = S.topk_mask(scores, frac, backend=backend)
        flat = torch.cat([d.reshape(-1) for d in out.to_dense()])
        assert torch.equal(flat, torch.arange(total) < k), k
        if backend != "eager":
            assert out.meta["ties"] == total and out.meta["ties_kept"] == k and out.meta["greater"] == 0


@pytest.mark.parametrize("backend", FAST)
def test_topk_selection_details(backend):
    scores = [torch.tensor([0.5, -3.0, 2.0, 2.0]), torch.tensor([[1.0, -2.0], [7.0, 0.0]])]
    sel = S.topk_threshold(scores, k=4, backend=backend)
    assert (sel.threshold, sel.k, sel.total, sel.greater, sel.ties, sel.ties_kept) == (2.0, 4, 8, 2, 3, 2)
    assert sel.tie_limits == [4, 0]  # tensor 0 keeps both its 2.0s, tensor 1's -2.0 is dropped
    out = S.topk_mask(scores, 0.5, backend=backend)
    assert [d.tolist() for d in out.to_dense()] == [[False, True, True, True], [[False, False], [True, False]]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_nan_ranks_above_every_number(backend):
    scores = [torch.tensor([1.0, float("nan"), float("inf"), -5.0, 0.0])]
    out = S.topk_mask(scores, 0.4, backend=backend)
    assert out.to_dense()[0].tolist() == [False, True, True, False, False]
    assert out.meta["threshold"] == math.inf
    # a NaN inside the top k (the eager path once compared floats, and NaN == kth is false)
    out = S.topk_mask([torch.tensor([float("nan"), 2.0, 1.0])], 2 / 3, backend=backend)
    assert out.to_dense()[0].tolist() == [True, True, False] and out.meta["threshold"] == 2.0
    assert [d.tolist() for d in K.reference_topk_bits([torch.tensor([float("nan"), 2.0, 1.0])], 2)] == \
        [[True, True, False]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_keeps_bfloat16_subnormals_apart_from_zero(backend):
    # 9.18e-41 is a bfloat16 subnormal; its key must differ from 0's on every backend
    scores = [torch.tensor([1.0, 9.183549615799121e-41, 0.0, 0.0]).bfloat16()]
    out = S.topk_mask(scores, 0.75, backend=backend)
    assert out.to_dense()[0].tolist() == [True, True, True, False]
    assert out.count() == 3


@pytest.mark.skipif("cpp" not in FAST, reason="needs the C++ extension")
def test_topk_beyond_2_pow_24_elements_is_exact():
    # torch.quantile refuses more than 2^24 elements; the radix selection has no limit.
    shapes = [(4096, 4096), (1001, 3001), (12345,)]
    gen = torch.Generator().manual_seed(7)
    scores = [torch.randn(s, generator=gen) for s in shapes]
    total = sum(s.numel() for s in scores)
    assert total > 1 << 24
    flat = torch.cat([s.reshape(-1) for s in scores]).abs()
    with pytest.raises(RuntimeError):
        torch.quantile(flat, 0.9)
    fraction = 0.0137
    k = int(math.floor(fraction * total + 0.5))
    kth = float(torch.topk(flat, k).values[-1])
    out = S.topk_mask(scores, fraction, backend="cpp")
    assert out.count() == k
    assert out.meta["threshold"] == kth
    assert out.meta["greater"] == int((flat > kth).sum())
    del flat
    for s, d in zip(scores, out.to_dense()):  # the mask is |s| > kth plus the kept ties
        above = s.abs() > kth
        assert torch.equal(d & ~(s.abs() == kth), above)


# --------------------------------------------------------------------------------------
# BitMask
# --------------------------------------------------------------------------------------
def test_bitmask_packing_layout_and_roundtrip():
    dense = [torch.rand(s) > 0.6 for s in SHAPES]
    m = S.BitMask.from_dense(dense, names=[f"p{i}" for i in range(len(SHAPES))])
    assert all(torch.equal(a, b) for a, b in zip(m.to_dense(), dense))
    assert m.count() == sum(int(d.sum()) for d in dense)
    for w, d in zip(m.words, dense):  # little-endian bit order = numpy.packbits(bitorder="little")
        packed = np.packbits(d.reshape(-1).numpy(), bitorder="little")
        got = w.view(torch.uint8).numpy()
        assert np.array_equal(got[: packed.size], packed) and not got[packed.size:].any()
    assert m.nbytes == sum(4 * ((d.numel() + 31) // 32) for d in dense)
    # one bit per weight: 1/32 of a float32 mask (up to the per-tensor word padding)
    numel = sum(d.numel() for d in dense)
    assert m.nbytes <= numel * 4 / 32 + 4 * len(dense)
    for backend in FAST:
        assert m.count(backend) == m.count("eager")


def test_bitmask_file_roundtrip(tmp_path):
    dense = [torch.rand(s) > 0.5 for s in SHAPES]
    names = ["vision.w", "empty", "lm.w", "lm.b", "one", "big"]
    m = S.BitMask.from_dense(dense, names=names)
    m.meta.update(kind="test", threshold=1.5)
    path = tmp_path / "mask.safetensors"
    m.save(path)
    raw = path.read_bytes()
    assert raw[8:9] == b"{"  # a safetensors header, not a pickle
    back = S.BitMask.load(path)
    assert back.names == names and back.shapes == m.shapes and back.meta == m.meta
    assert _same_bits(back, m)
    sub = back.select(["lm.b", "vision.w"])
    assert torch.equal(sub.to_dense()[0], dense[3]) and torch.equal(sub.to_dense()[1], dense[0])
    with pytest.raises(KeyError, match="nope"):
        back.select(["nope"])
    unnamed = S.BitMask.from_dense(dense)
    unnamed.save(tmp_path / "u.safetensors")
    assert S.BitMask.load(tmp_path / "u.safetensors").names is None


def test_bitmask_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"words": torch.zeros(2, dtype=torch.int32)}, str(tmp_path / "a"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a BitMask"):
        S.BitMask.load(tmp_path / "a")
    md = {"format": S.FORMAT, "version": S.FORMAT_VERSION, "names": json.dumps(["x"]), "shapes": json.dumps([[3]]),
          "word_offsets": json.dumps([0]), "meta": "{}", "has_names": "1"}
    save_file({"words": torch.tensor([0b1000], dtype=torch.int32)}, str(tmp_path / "b"), metadata=md)
    with pytest.raises(ValueError, match="past its end"):
        S.BitMask.load(tmp_path / "b")
    md["word_offsets"] = json.dumps([5])
    save_file({"words": torch.tensor([1], dtype=torch.int32)}, str(tmp_path / "c"), metadata=md)
    with pytest.raises(ValueError, match="outside"):
        S.BitMask.load(tmp_path / "c")


@pytest.mark.parametrize("change,match", [
    ({"shapes": [[-1]]}, "malformed"),                       # a negative dimension
    ({"shapes": [[1 << 40, 1 << 20]]}, "outside"),          # huge: refused before allocating
    ({"word_offsets": ["0"]}, "malformed"),                  # not an int
    ({"word_offsets": [True]}, "malformed"),
    ({"shapes": "3"}, "malformed"),
    ({"names": {"x": 1}}, "malformed"),
    ({"meta": []}, "malformed"),
    ({"shapes": [[3]], "words": [0, 0]}, "payload has 2 words"),  # trailing words
])
def test_bitmask_load_checks_metadata_before_allocating(tmp_path, change, match):
    from safetensors.torch import save_file

    fields = {"names": ["x"], "shapes": [[3]], "word_offsets": [0], "meta": {}, "words": [1]}
    fields.update(change)
    md = {"format": S.FORMAT, "version": S.FORMAT_VERSION, "has_names": "1",
          **{k: json.dumps(v) for k, v in fields.items() if k != "words"}}
    save_file({"words": torch.tensor(fields["words"], dtype=torch.int32)}, str(tmp_path / "m"), metadata=md)
    with pytest.raises(ValueError, match=match):
        S.BitMask.load(tmp_path / "m")


def test_bitmask_constructor_checks():
    with pytest.raises(ValueError, match="needs"):
        S.BitMask([torch.zeros(1, dtype=torch.int32)], [(40,)])
    with pytest.raises(TypeError, match="int32"):
        S.BitMask([torch.zeros(1)], [(4,)])
    with pytest.raises(ValueError, match="unique"):
        S.BitMask.zeros([(1,), (2,)], ["cpu", "cpu"], names=["a", "a"])


# --------------------------------------------------------------------------------------
# Gradient transform
# --------------------------------------------------------------------------------------
def _transform_case(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    r64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    fisher = [torch.rand(s, generator=gen) ** 3 for s in SHAPES]
    dense = [torch.rand(s, generator=gen) > 0.3 for s in SHAPES]
    # the oracle sees the values rounded to dtype
    g64 = [x.to(dtype).double() for x in g64]
    r64 = [x.to(dtype).double() for x in r64]
    return g64, r64, fisher, S.BitMask.from_dense(dense), dense


def _formula(g64, r64, fisher, dense, mode, lam, max_norm, project):
    """The transform written out in float64, independently of the implementations."""
    g = [x.clone() for x in g64]
    total = math.sqrt(sum(float((x ** 2).sum()) for x in g))
    c = min(1.0, max_norm / (total + 1e-6)) if max_norm is not None else 1.0
    t = [c * x * m.double() / ((f.double() + lam) if mode == "geometry" else 1.0) for x, m, f in zip(g, dense, fisher)]
    if project:
        dot = sum(float((a * b).sum()) for a, b in zip(t, r64))
        rr = sum(float((b * b).sum()) for b in r64)
        t = [a - dot / rr * b for a, b in zip(t, r64)]
    return t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["mask", "geometry"])
@pytest.mark.parametrize("max_norm,project", [(None, False), (0.5, False), (None, True), (0.5, True), (1e6, True)])
def test_transform_matches_formula(backend, dtype, mode, max_norm, project):
    g64, r64, fisher, mask, dense = _transform_case(dtype)
    lam = 0.05
    expect = _formula(g64, r64, fisher, dense, mode, lam, max_norm, project)

    def run(be, dt):
        g = [x.to(dt) for x in g64]
        info = S.transform_gradients_(g, mask, mode=mode, preserve_fisher=fisher if mode == "geometry" else None,
                                      lam=lam, project_out=[x.to(dt) for x in r64] if project else None,
                                      max_norm=max_norm, backend=be)
        return g, info

    out, info = run(backend, dtype)
    eager, _ = run("eager", dtype)
    for o, e, x in zip(out, eager, expect):
        assert o.dtype == dtype and o.shape == x.shape
        assert rel_err(o, x) <= rel_err(e, x) + TOL[dtype], (rel_err(o, x), rel_err(e, x))
    if max_norm is not None:
        total = math.sqrt(sum(float((x ** 2).sum()) for x in g64))
        # the fused backends accumulate in float64; eager (torch's clipping) in g's dtype
        tol = 1e-2 if (backend == "eager" and dtype == torch.bfloat16) else 1e-5
        assert info.total_norm is not None and abs(float(info.total_norm) - total) <= tol * total
        clip = min(1.0, max_norm / (total + 1e-6))
        assert abs(float(info.clip_coef) - clip) <= tol * clip
    else:
        assert info.total_norm is None and info.clip_coef is None
    assert (info.projection_coef is not None) == project
    if project and dtype == torch.float32:  # the result is orthogonal to the retain gradient
        dot = sum(float((o.double() * r).sum()) for o, r in zip(out, r64))
        scale = math.sqrt(sum(float((o.double() ** 2).sum()) for o in out) * sum(float((r ** 2).sum()) for r in r64))
        assert abs(dot) <= 1e-5 * scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_mixed_dtypes_and_no_mask(backend):
    g = _mixed(SHAPES)
    expect = [x.double() for x in g]
    total = math.sqrt(sum(float((x ** 2).sum()) for x in expect))
    eager = [x.clone() for x in g]
    S.transform_gradients_(g, None, max_norm=1.0, backend=backend)
    S.transform_gradients_(eager, None, max_norm=1.0, backend="eager")
    for o, e, x in zip(g, eager, expect):
        assert o.dtype == x.to(o.dtype).dtype
        assert rel_err(o, x / (total + 1e-6)) <= rel_err(e, x / (total + 1e-6)) + TOL[o.dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_non_contiguous_gradient_and_zero_retain(backend):
    base = torch.randn(19, 37)
    g = [base.t()]  # a transposed view: row-major order of the logical (37, 19) tensor
    dense = [torch.rand(37, 19) > 0.5]
    mask = S.BitMask.from_dense(dense)
    expect = base.t() * dense[0]
    info = S.transform_gradients_(g, mask, project_out=[torch.zeros(37, 19)], backend=backend)
    assert torch.equal(base.t(), expect)  # written through the view
    assert float(info.projection_coef) == 0.0  # r = 0: nothing removed, no NaN


@pytest.mark.parametrize("backend", BACKENDS)
def test_transform_masked_out_inf_and_nan_become_zero(backend):
    g = [torch.tensor([1.0, float("inf"), float("nan"), float("inf")])]
    mask = S.BitMask.from_dense([torch.tensor([True, False, False, True])])
    S.transform_gradients_(g, mask, backend=backend)
    assert g[0][:3].tolist() == [1.0, 0.0, 0.0] and g[0][3] == float("inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_mappings_are_matched_by_name_not_position(backend):
    ones, zeros = torch.ones(2), torch.zeros(2)
    # ratio_mask: preserve given in the other order
    m = S.ratio_mask({"a": ones, "b": zeros}, {"b": ones * 4, "a": zeros}, backend=backend)
    assert m.names == ["a", "b"] and [d.tolist() for d in m.to_dense()] == [[True, True], [False, False]]
    with pytest.raises(ValueError, match="names differ"):
        S.ratio_mask({"x": ones}, {"y": ones}, backend=backend)
    with pytest.raises(ValueError, match="unnamed list"):
        S.ratio_mask([ones], {"y": ones}, backend=backend)
    # FisherAccumulator: grads as a mapping in another order than the parameters
    acc = S.FisherAccumulator({"a": torch.zeros(2), "b": torch.zeros(2)}, backend=backend)
    acc.accumulate({"b": ones * 3, "a": ones})
    assert acc.fisher[0].tolist() == [1.0, 1.0] and acc.fisher[1].tolist() == [9.0, 9.0]
    # transform: the named mask and the preserve Fisher line up with the gradients by name
    mask = S.BitMask.from_dense([torch.tensor([True, True]), torch.tensor([False, False])], names=["a", "b"])
    grads = {"b": ones * 5, "a": ones * 2}
    S.transform_gradients_(grads, mask, mode="geometry", preserve_fisher={"a": ones, "b": ones}, lam=1.0,
                           backend=backend)
    assert grads["a"].tolist() == [1.0, 1.0] and grads["b"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="mask's parameter names differ"):
        S.transform_gradients_({"c": ones.clone(), "a": ones.clone()}, mask, backend=backend)
    # reset: originals matched by the parameters' names
    params = {"b": ones.clone(), "a": ones.clone()}
    S.reset_unmasked_(params, {"a": zeros - 1, "b": zeros - 2}, mask, backend=backend)
    assert params["a"].tolist() == [1.0, 1.0] and params["b"].tolist() == [-2.0, -2.0]
    # topk_mask: names= given with a mapping reorders it
    t = S.topk_mask({"a": torch.tensor([1.0]), "b": torch.tensor([9.0])}, 0.5, names=["b", "a"], backend=backend)
    assert t.names == ["b", "a"] and [d.tolist() for d in t.to_dense()] == [[True], [False]]


def test_transform_compiles_fullgraph():
    if "cpp" not in FAST:
        pytest.skip("needs the C++ extension")
    g64, r64, fisher, mask, dense = _transform_case(torch.float32)
    acc = S.FisherAccumulator([x.float() for x in g64], backend="cpp")

    def step(grads, retain):
        acc.accumulate(grads, 0.5)
        return S.transform_gradients_(grads, mask, mode="geometry", preserve_fisher=fisher, lam=0.1,
                                      project_out=retain, max_norm=1.0, backend="cpp")

    compiled = torch.compile(step, fullgraph=True)
    g = [x.float() for x in g64]
    r = [x.float() for x in r64]
    compiled(g, r)
    ref = [x.float() for x in g64]
    S.transform_gradients_(ref, mask, mode="geometry", preserve_fisher=fisher, lam=0.1, project_out=r, max_norm=1.0,
                           backend="cpp")
    assert all(torch.equal(a, b) for a, b in zip(g, ref))
    assert torch.allclose(acc.fisher[0], 0.5 * g64[0].float() ** 2)


# --------------------------------------------------------------------------------------
# SalUn reset
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reset_is_the_salun_formula(backend, dtype):
    theta = _randn(SHAPES, dtype)
    orig = _randn(SHAPES, dtype)
    dense = [torch.rand(s) > 0.4 for s in SHAPES]
    expect = [m * t + (~m) * o for t, o, m in zip(theta, orig, dense)]
    S.salun_reset_(theta, orig, S.BitMask.from_dense(dense), backend=backend)
    assert all(torch.equal(t, e) for t, e in zip(theta, expect))


def test_reset_on_module_parameters():
    model = torch.nn.Linear(9, 7)
    orig = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    mask = S.topk_mask([p.detach() for p in model.parameters()], 0.5)
    S.reset_unmasked_(list(model.parameters()), orig, mask)
    for p, o, m in zip(model.parameters(), orig, mask.to_dense()):
        assert torch.equal(p.detach(), torch.where(m, o + 1.0, o))


# --------------------------------------------------------------------------------------
# Name patterns, MMUnlearner mask
# --------------------------------------------------------------------------------------
class _ToyVLM(torch.nn.Module):
    def __init__(self, lora: bool = False):
        super().__init__()
        self.vision_tower = torch.nn.Linear(6, 5)
        self.multi_modal_projector = torch.nn.Linear(5, 4)
        self.language_model = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Linear(7, 3))
        if lora:  # base weights frozen, adapters trainable (as peft does)
            for p in self.parameters():
                p.requires_grad_(False)
            self.vision_tower.lora_A = torch.nn.Parameter(torch.randn(2, 6))
            self.language_model[0].lora_A = torch.nn.Parameter(torch.randn(2, 4))


def test_select_parameters_and_lora_awareness():
    model = _ToyVLM()
    sel = S.select_parameters(model, ["vision_tower", r"projector\.weight"])
    assert [n for n, _ in sel] == ["vision_tower.weight", "vision_tower.bias", "multi_modal_projector.weight"]
    lora = _ToyVLM(lora=True)
    assert [n for n, _ in S.select_parameters(lora, "vision")] == ["vision_tower.lora_A"]
    with pytest.raises(ValueError, match=r"'projector' matches no trainable parameter .*frozen"):
        S.select_parameters(lora, ["vision", "projector"])
    with pytest.raises(ValueError, match=r"'mlp\\\\.' matches no parameter"):
        S.select_parameters(model, [r"mlp\."])
    assert len(S.select_parameters(lora, "projector", trainable_only=False)) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_mmunlearner_mask_uses_the_module_preserve_fisher(backend):
    model = _ToyVLM(lora=True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ff = [torch.rand_like(p) for _, p in named]
    fv = [torch.rand_like(p) for _, p in named]
    fl = [torch.rand_like(p) for _, p in named]
    mask = S.mmunlearner_mask(model, ff, fv, fl, is_vision="vision_tower|projector", backend=backend)
    assert mask.names == ["vision_tower.lora_A", "language_model.0.lora_A"]
    expect = S.ratio_mask(ff, [fv[0], fl[1]], backend="eager")
    assert _same_bits(mask, expect)
    pres = S.mmunlearner_preserve_fisher(model, fv, fl, lambda n: n.startswith("vision"))
    assert pres[0] is fv[0] and pres[1] is fl[1]
    # dicts keyed by name work too; modules= restricts the update to the matched parameters
    by_name = lambda lst: dict(zip(mask.names, lst))  # noqa: E731
    only_lm = S.mmunlearner_mask(model, by_name(ff), by_name(fv), by_name(fl), is_vision=["vision"],
                                 modules="language_model", backend=backend)
    assert only_lm.count() == int(expect.to_dense()[1].sum())
    with pytest.raises(ValueError, match="'projector' matches no trainable parameter"):
        S.mmunlearner_mask(model, ff, fv, fl, is_vision=["projector"])
    with pytest.raises(ValueError, match="modules: 'mlp' matches no parameter"):
        S.mmunlearner_mask(model, ff, fv, fl, is_vision="vision", modules="mlp")
    with pytest.raises(ValueError, match="no entry for"):
        S.mmunlearner_mask(model, {"x": ff[0]}, fv, fl, is_vision="vision")
    # fraction=: the top fraction of the ratios (F_f + eps) / (F_p + eps) over every weight
    top = S.mmunlearner_mask(model, ff, fv, fl, is_vision="vision_tower|projector", fraction=0.3, backend=backend)
    ratios = torch.cat([((f + 1e-15) / (p + 1e-15)).reshape(-1) for f, p in zip(ff, [fv[0], fl[1]])])
    k = round(0.3 * ratios.numel())
    assert top.count() == k
    kept = torch.cat([d.reshape(-1) for d in top.to_dense()])
    assert kept[ratios.topk(k).indices].all()  # random ratios: no ties


# --------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    g = _randn([(3, 4), (5,)])
    m = S.BitMask.from_dense([torch.ones(3, 4, dtype=torch.bool), torch.ones(5, dtype=torch.bool)])
    with pytest.raises(ValueError, match="grads has 2 tensors but params has 1"):
        S.FisherAccumulator(g[:1]).accumulate(g)
    with pytest.raises(ValueError, match=r"grads\[0\] .*shape \(4, 3\)"):
        S.FisherAccumulator(g).accumulate([torch.randn(4, 3), g[1]])
    with pytest.raises(TypeError, match="list of tensors"):
        S.FisherAccumulator(g).accumulate(g[0])
    with pytest.raises(TypeError, match=r"grads\[1\] must be floating"):
        S.FisherAccumulator(g).accumulate([g[0], torch.ones(5, dtype=torch.long)])
    with pytest.raises(ValueError, match="preserve_fisher has 1 tensors"):
        S.ratio_mask(g, g[:1])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        S.ratio_mask(g, g, eps=-1.0)
    with pytest.raises(ValueError, match=r"fraction must lie in \[0, 1\]"):
        S.topk_mask(g, 1.5)
    with pytest.raises(TypeError, match="fraction must be a Python number"):
        S.topk_mask(g, "0.1")
    with pytest.raises(ValueError, match="exactly one of fraction and k"):
        S.topk_threshold(g)
    with pytest.raises(ValueError, match="mode must be one of"):
        S.transform_gradients_(g, m, mode="nope")
    with pytest.raises(ValueError, match="needs preserve_fisher"):
        S.transform_gradients_(g, m, mode="geometry")
    with pytest.raises(ValueError, match="only used with mode='geometry'"):
        S.transform_gradients_(g, m, preserve_fisher=g)
    with pytest.raises(ValueError, match="lam must be > 0"):
        S.transform_gradients_(g, m, mode="geometry", preserve_fisher=g, lam=0.0)
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        S.transform_gradients_(g, m, max_norm=-1.0)
    with pytest.raises(ValueError, match=r"mask\[0\] has shape \(4, 3\)"):
        S.transform_gradients_(g, S.BitMask.from_dense([torch.ones(4, 3), torch.ones(5)]))
    with pytest.raises(ValueError, match="mask covers 1 tensors"):
        S.transform_gradients_(g, S.BitMask.from_dense([torch.ones(3, 4)]))
    with pytest.raises(ValueError, match=r"project_out\[1\] has shape"):
        S.transform_gradients_(g, m, project_out=[g[0], torch.zeros(6)])
    with pytest.raises(ValueError, match="must not require grad"):
        S.transform_gradients_([torch.zeros(3, requires_grad=True)], None)
    with pytest.raises(ValueError, match="backend must be one of"):
        S.transform_gradients_(g, m, backend="fast")
    with pytest.raises(TypeError, match=r"originals\[0\] has dtype"):
        S.reset_unmasked_(g, [x.double() for x in g], m)
    with pytest.raises(ValueError, match="mask is required"):
        S.reset_unmasked_(g, g, None)


# --------------------------------------------------------------------------------------
# Triton kernels compiled for real GPUs (no GPU needed)
# --------------------------------------------------------------------------------------
_COMPILE_FOR_GPU = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from unlearn_fast.triton import saliency as m

TABLE = {"numel_ptr": "*i64", "first_ptr": "*i64", "num_tensors": "i32"}

def compile_(kernel, types, constexprs, arch):
    sig = {n: ("constexpr" if n in constexprs else types.get(n) or TABLE[n]) for n in kernel.arg_names}
    out = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": m.NUM_WARPS})
    assert len(out.asm["cubin"]) > 0
    print(kernel.fn.__name__, arch, "ok", flush=True)

P = "*i64"  # pointer tables hold int64 addresses
for arch, dt, flag in ((80, tl.float32, False), (90, tl.bfloat16, True)):
    base = dict(LOG_T=8, BLOCK=m.BLOCK)
    compile_(m._fisher_kernel, {"f_ptrs": P, "g_ptrs": P, "scale": "fp32"}, dict(base, G_DT=dt), arch)
    compile_(m._ratio_kernel, {"w_ptrs": P, "a_ptrs": P, "b_ptrs": P, "threshold": "fp32", "eps": "fp32"}, base, arch)
    compile_(m._histogram_kernel, {"x_ptrs": P, "hist_ptr": "*i64", "shift": "i32", "prefix_shift": "i32",
                                   "prefix": "i32"}, dict(base, X_DT=dt, NUM_BINS=2048), arch)
    compile_(m._count_equal_kernel, {"x_ptrs": P, "count_ptr": "*i64", "key": "i32"}, dict(base, X_DT=dt), arch)
    compile_(m._topk_mask_kernel, {"w_ptrs": P, "x_ptrs": P, "limit_ptr": "*i64", "key": "i32"}, dict(base, X_DT=dt),
             arch)
    flags = dict(base, G_DT=dt, HAS_MASK=True, GEOMETRY=flag, RETAIN=flag)
    compile_(m._reduce_kernel, {"g_ptrs": P, "w_ptrs": P, "p_ptrs": P, "r_ptrs": P, "partial_ptr": "*fp32",
                                "lam": "fp32"}, flags, arch)
    compile_(m._apply_kernel, {"g_ptrs": P, "w_ptrs": P, "p_ptrs": P, "r_ptrs": P, "coef_ptr": "*fp32",
                               "lam": "fp32"}, flags, arch)
    compile_(m._reset_kernel, {"p_ptrs": P, "o_ptrs": P, "w_ptrs": P}, dict(base, BITS_DT=tl.int16 if flag else tl.int32),
             arch)
    compile_(m._popcount_kernel, {"w_ptrs": P, "total_ptr": "*i64"}, base, arch)
"""


def test_triton_kernels_compile_for_sm80_and_sm90(tmp_path):
    """The interpreter checks the Python semantics only: compile every saliency kernel to a
    cubin (TTIR -> PTX -> ptxas, bundled with triton) for sm_80 / float32 and sm_90 /
    bfloat16 with all flags on, in a subprocess (TRITON_INTERPRET=1 patches this one)."""
    stdout = compile_triton_for_gpu(_COMPILE_FOR_GPU, tmp_path)
    assert stdout.count(" ok") == 18, stdout


# --------------------------------------------------------------------------------------
# GPU (skipped without CUDA): cuda and triton against eager on the device
# --------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_backends_match_eager():
    names = gpu_backends_for("saliency")
    assert names, "no GPU backend can run saliency"
    dev = "cuda"
    shapes = SHAPES + [(1 << 20,), (3, 70001)]
    for be in names:
        grads = [x.to(dev) for x in _mixed(shapes)]
        acc, ref = S.FisherAccumulator(grads, backend=be), S.FisherAccumulator(grads, backend="eager")
        acc.accumulate(grads, 0.5)
        ref.accumulate(grads, 0.5)
        assert all(rel_err(a, b) <= 1e-6 for a, b in zip(acc.fisher, ref.fisher))
        ff, fp = _fishers(shapes)
        ff, fp = [x.to(dev) for x in ff], [x.to(dev) for x in fp]
        assert _same_bits(S.ratio_mask(ff, fp, backend=be), S.ratio_mask(ff, fp, backend="eager"))
        for scores in (_randn(shapes), [torch.randint(-3, 4, s).float() for s in shapes], _mixed(shapes)):
            scores = [s.to(dev) for s in scores]
            a, b = S.topk_mask(scores, 0.013, backend=be), S.topk_mask(scores, 0.013, backend="eager")
            assert a.count(be) == b.count() and _same_bits(a, b)
        for dt in (torch.float32, torch.bfloat16):
            g64, r64, fisher, mask, dense = _transform_case(dt)
            expect = _formula(g64, r64, fisher, dense, "geometry", 0.05, 0.5, True)
            g = [x.to(dev, dt) for x in g64]
            S.transform_gradients_(g, mask.to(dev), mode="geometry", preserve_fisher=[f.to(dev) for f in fisher],
                                   lam=0.05, project_out=[x.to(dev, dt) for x in r64], max_norm=0.5, backend=be)
            assert all(rel_err(o, x) <= TOL[dt] for o, x in zip(g, expect))
        theta, orig = [x.to(dev) for x in _mixed(shapes)], [x.to(dev) for x in _mixed(shapes)]
        dense = [torch.rand(s, device=dev) > 0.5 for s in shapes]
        expect = [torch.where(m, t, o) for t, o, m in zip(theta, orig, dense)]
        S.reset_unmasked_(theta, orig, S.BitMask.from_dense(dense), backend=be)
        assert all(torch.equal(t, e) for t, e in zip(theta, expect))


@pytest.mark.gpu
def test_gpu_topk_beyond_2_pow_24():
    for be in gpu_backends_for("saliency"):
        scores = [torch.randn(s, device="cuda") for s in [(4096, 4096), (3001, 1001)]]
        flat = torch.cat([s.reshape(-1) for s in scores]).abs()
        k = int(math.floor(0.01 * flat.numel() + 0.5))
        out = S.topk_mask(scores, 0.01, backend=be)
        assert out.count(be) == k and out.meta["threshold"] == float(torch.topk(flat, k).values[-1])
