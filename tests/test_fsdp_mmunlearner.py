"""MMUnlearner under FSDP (methods/fsdp.py): the Fisher, the saliency mask and the masked
gradient transform run on each rank's parameter shards, the clipping norm is global; a
2-process gloo run equals one ordinary process (losses and final weights), in the mask
and the geometry mode, and with a top-fraction mask (the distributed radix top-k over the
ranks' shards)."""
import pytest
import torch

from helpers import cpu_backends_for, one_thread, run_on_gloo_ranks

pytestmark = pytest.mark.distributed

# forget_every=2: ascent (masked, clipped) steps at 0 and 2, a retain step every step
OVERRIDES = {"steps": 3, "batch_size": 4, "lr": 1e-2, "forget_every": 2, "fisher_batches": 2}
MODES = {"mask": {"mode": "mask"}, "geometry": {"mode": "geometry"},
         "topk": {"mode": "mask", "mask_fraction": 0.05}}


def _train(fsdp: bool, mode: str):
    from tiny_models import task_and_tokenizer, tiny_llava
    from unlearn_fast.methods.fsdp import full_state_on_rank0
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()
    res = run_lm_method("mmunlearner", tiny_llava(), tok, task, "seven", fsdp=fsdp, progress=False,
                        overrides={**OVERRIDES, **MODES[mode]})
    state = full_state_on_rank0(res.model) if res.sharded else res.model.state_dict()  # rank 0 only
    return {"state": {k: v.detach().clone() for k, v in state.items()},
            "losses": [h.get(k, float("nan")) for h in res.history for k in ("forget_ce", "retain_ce", "grad_norm")]}


def _on_rank(rank):
    return {mode: _train(True, mode) for mode in MODES}


def test_fsdp_mmunlearner_two_gloo_processes_equal_one(tmp_path):
    got = run_on_gloo_ranks(_on_rank, tmp_path)
    base = __import__("tiny_models").tiny_llava().state_dict()
    with one_thread():  # as the workers
        for mode in MODES:
            single = _train(False, mode)
            assert got[mode]["losses"] == pytest.approx(single["losses"], rel=1e-5, abs=1e-7, nan_ok=True), mode
            assert set(got[mode]["state"]) == set(single["state"])
            for name, w in single["state"].items():
                if name.endswith("k_proj.bias"):
                    continue  # zero gradient in exact arithmetic: AdamW amplifies rounding noise (test_fsdp_run)
                # topk: with 95% of the weights masked, AdamW's per-element normalisation turns
                # reduction-order rounding of near-zero gradients into ~6e-6 differences; a
                # mask difference would move a weight by ~lr = 1e-2
                torch.testing.assert_close(got[mode]["state"][name], w, rtol=1e-5,
                                           atol=5e-5 if mode == "topk" else 1e-6,
                                           msg=lambda m: f"{mode} {name}: {m}")
            assert sum(int(not torch.equal(base[n], w)) for n, w in single["state"].items()) > 0  # it trained


def test_global_grad_norm_and_clip_match_torch_on_plain_gradients():
    """Without sharding (no process group): the float64 norm of every gradient (None
    skipped, bf16 too), and clipping identical to torch.nn.utils.clip_grad_norm_."""
    from unlearn_fast.methods.fsdp import clip_grad_norm_, global_grad_norm

    grads = [torch.randn(37, 13) * 3, None, (torch.randn(11) * 3).bfloat16()]
    ref = float(torch.cat([g.double().reshape(-1) for g in grads if g is not None]).norm())
    assert global_grad_norm(grads) == pytest.approx(ref, rel=1e-12)
    assert global_grad_norm([None]) == 0.0
    ours = [torch.nn.Parameter(torch.zeros(37, 13)), torch.nn.Parameter(torch.zeros(5)),
            torch.nn.Parameter(torch.zeros(11))]
    ours[0].grad, ours[2].grad = torch.randn(37, 13) * 3, torch.randn(11) * 3
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        b.grad = None if a.grad is None else a.grad.clone()
    total = clip_grad_norm_(ours, 1.0)
    assert total == pytest.approx(float(torch.nn.utils.clip_grad_norm_(theirs, 1.0)), rel=1e-6) and total > 1
    for a, b in zip(ours, theirs):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_transform_total_norm_clips_shards_like_the_whole():
    """transform_gradients_(shards, total_norm=global norm) == the single-list transform, sliced."""
    from unlearn_fast.saliency import BitMask, transform_gradients_

    # float64: the eager reference; float32: every fused CPU backend too
    cases = [(torch.float64, "auto", 1e-12)] + [(torch.float32, b, 1e-5) for b in cpu_backends_for("saliency")]
    for dtype, backend, rel in cases:
        g = [torch.randn(37, 13, dtype=dtype) * 3, torch.randn(11, dtype=dtype) * 3]
        m = [torch.rand(37, 13) > 0.4, torch.rand(11) > 0.4]
        f = [torch.rand(37, 13, dtype=dtype), torch.rand(11, dtype=dtype)]
        for mode in ("mask", "geometry"):
            whole = [t.clone() for t in g]
            res = transform_gradients_(whole, BitMask.from_dense(m), mode, f if mode == "geometry" else None, 0.5,
                                       max_norm=1.0, backend=backend)
            total = float(torch.cat([t.reshape(-1) for t in g]).double().norm())
            assert float(res.total_norm) == pytest.approx(total, rel=rel) and float(res.clip_coef) < 1
            for lo, hi in ((0, 20), (20, 37)):  # two "ranks", each with its rows of the first tensor
                shard = [g[0][lo:hi].clone()]
                out = transform_gradients_(shard, BitMask.from_dense([m[0][lo:hi]]), mode,
                                           [f[0][lo:hi]] if mode == "geometry" else None, 0.5, max_norm=1.0,
                                           total_norm=total, backend=backend)
                torch.testing.assert_close(shard[0], whole[0][lo:hi], rtol=rel, atol=0,
                                           msg=lambda msg: f"{dtype} {backend} {mode}: {msg}")
                assert float(out.clip_coef) == pytest.approx(float(res.clip_coef), rel=rel)
    with pytest.raises(ValueError, match="total_norm .* needs max_norm"):
        transform_gradients_([g[0].clone()], total_norm=1.0)
    with pytest.raises(ValueError, match="cannot be combined with project_out"):
        transform_gradients_([g[0].clone()], max_norm=1.0, total_norm=1.0, project_out=[g[0]])
