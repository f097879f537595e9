"""Per-example scores from per-token statistics: a crafted distribution with known
Min-K% / Min-K%++ / LOSS / ZLib / exact-memorisation values, padding rows, empty rows,
and every token_stats backend feeding the same numbers."""
import math
import zlib

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast.metrics.scores import scores_from_token_stats, zlib_length

from helpers import cpu_backends_for

STATS = ("logprob", "mean_logp", "std_logp", "correct")


def _crafted():
    """Row 0: five answer positions whose target (id 0) has probability a_t, the rest of
    the mass spread evenly over 3 other ids; row 1: two answer positions, then padding.
    Logits are log-probabilities, so log p(target) = log a_t exactly."""
    a = [[0.9, 0.1, 0.5, 0.05, 0.3], [0.6, 0.2, 0.0, 0.0, 0.0]]
    n = [5, 2]
    logits = torch.zeros(2, 5, 4, dtype=torch.float64)
    targets = torch.full((2, 5), -100)
    for i in range(2):
        for t in range(n[i]):
            p = torch.tensor([a[i][t]] + [(1 - a[i][t]) / 3] * 3, dtype=torch.float64)
            logits[i, t] = p.log()
            targets[i, t] = 0
        for t in range(n[i], 5):
            logits[i, t] = torch.tensor([-50.0, 3.0, 1.0, 0.0])  # padding: must not count
    return logits, targets, a, n


def _expected(a_row, k):
    lp = [math.log(x) for x in a_row]
    zs = []
    for x in a_row:
        p = [x] + [(1 - x) / 3] * 3
        mu = sum(q * math.log(q) for q in p)
        sigma = math.sqrt(sum(q * (math.log(q) - mu) ** 2 for q in p))
        zs.append((math.log(x) - mu) / sigma)
    take = max(1, int(len(lp) * k))
    return {
        "answer_logprob": sum(lp),
        "loss": -sum(lp) / len(lp),
        "min_k": sum(sorted(lp)[:take]) / take,
        "min_k_plus_plus": sum(sorted(zs)[:take]) / take,
        # argmax is id 0 exactly where a_t > (1 - a_t) / 3, i.e. a_t > 0.25
        "exact_memorization": sum(x > 0.25 for x in a_row) / len(a_row),
    }


@pytest.mark.parametrize("backend", ["eager"] + cpu_backends_for("token_stats_from_logits"))
@pytest.mark.parametrize("k", [0.4, 0.1, 1.0])
def test_crafted_distribution_known_scores(backend, k):
    logits, targets, a, n = _crafted()
    dtype = torch.float64 if backend == "eager" else torch.float32
    st = uf.token_stats_from_logits(logits.to(dtype), targets, stats=STATS, backend=backend)
    answers = ["Seven.", "It is eight, I think."]
    zl = torch.tensor([zlib_length(s) for s in answers])
    out = scores_from_token_stats(st["logprob"], st["mean_logp"], st["std_logp"], st["correct"], targets != -100,
                                  k=k, zlib_lengths=zl)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for i in range(2):
        exp = _expected(a[i][:n[i]], k)
        for name, value in exp.items():
            assert out[name][i].item() == pytest.approx(value, rel=tol, abs=tol), (name, i)
        assert out["num_tokens"][i].item() == n[i]
        assert out["probability"][i].item() == pytest.approx(math.exp(-exp["loss"]), rel=tol)
        assert out["perplexity"][i].item() == pytest.approx(math.exp(exp["loss"]), rel=tol)
        assert out["zlib"][i].item() == pytest.approx(exp["loss"] / len(zlib.compress(answers[i].encode())), rel=tol)
        assert out[name].dtype == torch.float64


def test_min_k_fraction_floor_at_least_one():
    # 0.4 of 5 tokens -> the 2 lowest; 0.1 of 5 -> floor(0.5) = 0 -> at least 1
    lp = torch.tensor([[-0.1, -2.0, -0.5, -3.0, -1.0]])
    zeros = torch.zeros_like(lp)
    mask = torch.ones_like(lp, dtype=torch.bool)
    f = lambda k: scores_from_token_stats(lp, zeros, zeros, mask, mask, k=k)["min_k"].item()  # noqa: E731
    assert f(0.4) == pytest.approx(-2.5)
    assert f(0.1) == pytest.approx(-3.0)
    assert f(1.0) == pytest.approx(-6.6 / 5)


def test_rows_without_answer_tokens_are_nan_and_sigma_zero_is_safe():
    lp = torch.tensor([[-1.0, -2.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])
    zeros = torch.zeros_like(lp)  # sigma = 0: a one-hot distribution; the z-score is 0, not NaN
    out = scores_from_token_stats(lp, zeros, zeros, mask, mask)
    assert out["num_tokens"].tolist() == [2.0, 0.0]
    for name in ("loss", "min_k", "min_k_plus_plus", "exact_memorization", "answer_logprob"):
        assert math.isfinite(out[name][0].item()), name
        assert math.isnan(out[name][1].item()), name
    assert out["min_k_plus_plus"][0].item() == 0.0


def test_k_is_validated():
    x = torch.zeros(1, 2)
    m = torch.ones(1, 2, dtype=torch.bool)
    for bad in (0, 1.5, -0.1, True, "0.4"):
        with pytest.raises(ValueError, match="k must"):
            scores_from_token_stats(x, x, x, m, m, k=bad)


def test_min_k_plus_plus_avoids_the_eager_float32_cancellation():
    """open-unlearning's Min-K%++ takes sigma^2 = E_p[(log p)^2] - mu^2, which cancels in
    float32 when the vocabulary is wide and p nearly flat; the fused statistics keep
    sigma accurate.  Both against float64."""
    from helpers import rel_err

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 30011, generator=g, dtype=torch.float64) * 0.3
    targets = torch.randint(0, 30011, (12,), generator=g)

    def eager_z(lg):  # the reference formula, in lg's dtype
        logp = lg.log_softmax(-1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        return (logp.gather(-1, targets[:, None]).squeeze(-1) - mu) / sigma

    exact = eager_z(logits)
    naive = eager_z(logits.float()).double()
    st = uf.token_stats_from_logits(logits.float(), targets, stats=STATS)  # auto: the cpp kernel when built
    fused = ((st["logprob"] - st["mean_logp"]) / st["std_logp"]).double()
    assert rel_err(fused, exact) < 1e-4
    assert rel_err(fused, exact) < rel_err(naive, exact) / 10, (rel_err(fused, exact), rel_err(naive, exact))
