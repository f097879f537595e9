"""Sequence losses (CE, GA, sequence_logprob, NPO, SimNPO) against straightforward
eager formulas, for every CPU backend of the underlying token_stats."""
import pytest
import torch
import torch.nn.functional as F

import unlearn_fast as uf
from unlearn_fast import backends

from helpers import cpu_backends_for, rel_err

BACKENDS = ["eager"] + cpu_backends_for("token_stats")
IGN = -100


def _data(B=3, T=11, H=17, V=403, dtype=torch.float32):
    h = torch.randn(B, T, H, dtype=dtype)
    w = (torch.randn(V, H) / H ** 0.5 * 2).to(dtype)
    t = torch.randint(0, V, (B, T))
    t[:, :3] = IGN  # prompt
    t[1, 8:] = IGN  # padding
    return h, w, t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_torch(backend, reduction):
    h, w, t = _data()
    tw = torch.rand(t.shape) + 0.5
    for weights in (None, tw):
        hh = h.double().requires_grad_()
        ww = w.double().requires_grad_()
        logits = hh @ ww.t()
        nll = F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=IGN, reduction="none")
        nll = nll.reshape(t.shape)
        wt = (t != IGN).double() * (1.0 if weights is None else weights.double())
        ref = {"none": nll * wt, "sum": (nll * wt).sum(), "mean": (nll * wt).sum() / wt.sum()}[reduction]
        go = torch.rand(ref.shape, dtype=torch.float64) * 2 - 0.5
        rh, rw = torch.autograd.grad(ref, [hh, ww], go)

        h32 = h.clone().requires_grad_()
        w32 = w.clone().requires_grad_()
        out = uf.cross_entropy(h32, w32, t, token_weights=weights, reduction=reduction, backend=backend, chunk_size=8)
        assert out.shape == ref.shape
        gh, gw = torch.autograd.grad(out, [h32, w32], go.float())
        assert rel_err(out, ref) < 1e-5
        assert rel_err(gh, rh) < 1e-5 and rel_err(gw, rw) < 1e-5

        ga = uf.gradient_ascent(h, w, t, token_weights=weights, reduction=reduction, backend=backend)
        torch.testing.assert_close(ga, -out.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_from_logits(backend):
    _, _, t = _data()
    x = torch.randn(3, 11, 403)
    xx = x.clone().requires_grad_()
    out = uf.cross_entropy_from_logits(xx, t, backend=backend)
    ref = F.cross_entropy(x.double().reshape(-1, 403), t.reshape(-1), ignore_index=IGN)
    assert rel_err(out, ref) < 1e-5
    out.backward()
    xr = x.double().requires_grad_()
    F.cross_entropy(xr.reshape(-1, 403), t.reshape(-1), ignore_index=IGN).backward()
    assert rel_err(xx.grad, xr.grad) < 1e-5
    ga = uf.gradient_ascent_from_logits(x, t, backend=backend)
    torch.testing.assert_close(ga, -out.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_is_zero_not_nan(backend):
    h, w, t = _data()
    t[:] = IGN
    tw = torch.rand(t.shape)
    for weights in (None, tw):
        hh = h.clone().requires_grad_()
        loss = uf.cross_entropy(hh, w, t, token_weights=weights, backend=backend)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, hh)
        assert torch.isfinite(g).all() and not g.any()


def test_sequence_logprob():
    lp = -torch.rand(4, 9, dtype=torch.float64)
    mask = torch.rand(4, 9) > 0.4
    mask[2] = False
    s = uf.sequence_logprob(lp, mask)
    torch.testing.assert_close(s, torch.stack([lp[i][mask[i]].sum() for i in range(4)]))
    n = uf.sequence_logprob(lp, mask, normalize=True)
    expect = torch.stack([lp[i][mask[i]].mean() if mask[i].any() else lp.new_zeros(()) for i in range(4)])
    torch.testing.assert_close(n, expect)
    torch.testing.assert_close(uf.sequence_logprob(lp), lp.sum(-1))
    # gradient of the normalised form with grad_output != 1 and an empty sequence
    x = lp.clone().requires_grad_()
    go = torch.rand(4, dtype=torch.float64)
    (g,) = torch.autograd.grad(uf.sequence_logprob(x, mask, normalize=True), x, go)
    cnt = mask.sum(-1, keepdim=True).clamp(min=1)
    torch.testing.assert_close(g, go[:, None] * mask / cnt)


@pytest.mark.parametrize("beta", [0.1, 0.4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_npo(beta, reduction):
    pol = torch.randn(6, dtype=torch.float64) * 5 - 20
    ref = pol.detach() + torch.randn(6, dtype=torch.float64)
    x = pol.clone().requires_grad_()
    out = uf.npo(x, ref, beta=beta, reduction=reduction)
    per = -(2 / beta) * torch.log(torch.sigmoid(-beta * (pol - ref)))
    expect = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    torch.testing.assert_close(out, expect)
    go = torch.rand(out.shape, dtype=torch.float64) + 0.5
    (g,) = torch.autograd.grad(out, x, go)
    # d/dx -(2/b) log sigma(-b r) = 2 sigma(b r)
    dper = 2 * torch.sigmoid(beta * (pol - ref))
    gexp = {"mean": go * dper / 6, "sum": go * dper, "none": go * dper}[reduction]
    torch.testing.assert_close(g, gexp)
    mod = uf.NPOLoss(beta=beta, reduction=reduction)
    torch.testing.assert_close(mod(pol, ref), expect)


@pytest.mark.parametrize("delta", [0.0, 1.5])
def test_simnpo(delta):
    beta = 2.5
    logps = torch.randn(5, dtype=torch.float64) * 10 - 30
    lengths = torch.tensor([7, 3, 12, 1, 5])
    per = -(2 / beta) * torch.log(torch.sigmoid(-(beta / lengths) * logps - delta))
    torch.testing.assert_close(uf.simnpo(logps, lengths, beta=beta, delta=delta), per.mean())
    torch.testing.assert_close(uf.simnpo(logps / lengths, beta=beta, delta=delta, reduction="none"), per)
    torch.testing.assert_close(uf.SimNPOLoss(beta, delta)(logps, lengths), per.mean())
    x = logps.clone().requires_grad_()
    go = torch.rand(5, dtype=torch.float64)
    (g,) = torch.autograd.grad(uf.simnpo(x, lengths, beta=beta, delta=delta, reduction="none"), x, go)
    # d/dx -(2/b) log sigma(-(b/L) x - d) = (2/L) sigma((b/L) x + d)
    torch.testing.assert_close(g, go * 2 / lengths * torch.sigmoid(beta / lengths * logps + delta))


@pytest.mark.parametrize("backend", BACKENDS)
def test_npo_end_to_end_from_hidden(backend):
    # policy and reference sequence log-probs from token_stats, NPO gradient to the head
    h, w, t = _data()
    w_ref = w + 0.01 * torch.randn_like(w)
    ww = w.clone().requires_grad_()
    lp = uf.token_stats(h, ww, t, backend=backend)["logprob"]
    with torch.no_grad():
        lp_ref = uf.token_stats(h, w_ref, t, backend=backend)["logprob"]
    mask = t != IGN
    loss = uf.npo(uf.sequence_logprob(lp, mask), uf.sequence_logprob(lp_ref, mask), beta=0.1)
    (g,) = torch.autograd.grad(loss, ww)
    wr = w.double().requires_grad_()
    logp = torch.log_softmax(h.double() @ wr.t(), -1)
    tok = logp.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * mask
    logp_ref = torch.log_softmax(h.double() @ w_ref.double().t(), -1)
    tok_ref = logp_ref.gather(-1, t.clamp(min=0)[..., None]).squeeze(-1) * mask
    r = tok.sum(-1) - tok_ref.sum(-1)
    ref = (-(2 / 0.1) * F.logsigmoid(-0.1 * r)).mean()
    (gr,) = torch.autograd.grad(ref, wr)
    assert rel_err(loss, ref) < 1e-5
    assert rel_err(g, gr) < 1e-4


def test_modules():
    h, w, t = _data()
    ce = uf.LinearCrossEntropyLoss()(h, w, t)
    torch.testing.assert_close(ce, uf.cross_entropy(h, w, t))
    torch.testing.assert_close(uf.GradientAscentLoss()(h, w, t), -ce)
    logits = h @ w.t()
    torch.testing.assert_close(uf.CrossEntropyLoss()(logits, t), ce, rtol=1e-5, atol=1e-6)
    assert "negate=True" in repr(uf.GradientAscentLoss())


def test_bad_inputs():
    h, w, t = _data()
    with pytest.raises(ValueError, match="reduction"):
        uf.cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="token_weights"):
        uf.cross_entropy(h, w, t, token_weights=torch.ones(3))
    with pytest.raises(ValueError, match="beta"):
        uf.npo(torch.zeros(3), torch.zeros(3), beta=0.0)
    with pytest.raises(ValueError, match="reference_logps"):
        uf.npo(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="policy_logps"):
        uf.npo(torch.zeros(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="lengths"):
        uf.simnpo(torch.zeros(3), torch.ones(4))
    with pytest.raises(TypeError, match="delta"):
        uf.simnpo(torch.zeros(3), delta="1")
    with pytest.raises(ValueError, match="mask"):
        uf.sequence_logprob(torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_logprobs"):
        uf.sequence_logprob(torch.zeros(2, 3, dtype=torch.long))


def _fused_losses():
    torch.manual_seed(0)
    h0, th0, w0 = torch.randn(6, 8), torch.randn(6, 8), torch.randn(11, 8) * 0.5
    t = torch.randint(0, 11, (6,))
    return {
        "cross_entropy": lambda h, be: uf.cross_entropy(h, w0, t, backend=be),
        "token_stats": lambda h, be: uf.token_stats(h, w0, t, backend=be)["logprob"].sum(),
        "fused_linear_dmk": lambda h, be: uf.fused_linear_dual_masked_kl(h, w0, th0, w0, backend=be),
        "dual_masked_kl": lambda h, be: uf.dual_masked_kl(h @ w0.t(), th0 @ w0.t(), backend=be),
        "cross_entropy_from_logits": lambda h, be: uf.cross_entropy_from_logits(h @ w0.t(), t, backend=be),
    }, h0


@pytest.mark.skipif(not backends.availability("cpp").available, reason="needs the C++ extension")
@pytest.mark.parametrize("op", list(_fused_losses()[0]))
def test_double_backward_raises_instead_of_dropping_terms(op):
    # A gradient penalty through a fused op: its gradient cannot be differentiated again.
    # Once it silently came out as a constant (wrong second-order gradients).
    losses, h0 = _fused_losses()
    h = h0.clone().requires_grad_()
    g, = torch.autograd.grad(losses[op](h, "cpp") + 0.1 * (h ** 2).sum(), h, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad((g ** 2).sum(), h)
    # create_graph=True alone still works and gives the first-order gradient
    h2 = h0.clone().requires_grad_()
    g_eager, = torch.autograd.grad(losses[op](h2, "eager"), h2)
    g_cg, = torch.autograd.grad(losses[op](h, "cpp"), h, create_graph=True)
    assert torch.allclose(g_cg, g_eager, atol=1e-5)
    # and eager supports the second derivative
    g2, = torch.autograd.grad(losses[op](h2, "eager"), h2, create_graph=True)
    torch.autograd.grad((g2 ** 2).sum(), h2)
