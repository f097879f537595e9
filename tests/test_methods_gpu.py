"""GPU checks of the methods (skipped without CUDA): every fused backend that runs on the
GPU gives the eager backend's loss terms and gradients on a tiny LLaVA, and a short run
trains on the GPU end to end."""
import pytest
import torch

from helpers import gpu_backends_for
from tiny_models import task_and_tokenizer, tiny_llava

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("method", ["siu", "npo", "ga_kl"])
def test_fused_backends_match_eager_on_gpu(method):
    from unlearn_fast.methods.runner import build_lm_method

    task, tok = task_and_tokenizer()
    results = {}
    for backend in ["eager"] + gpu_backends_for("token_stats"):
        torch.manual_seed(0)
        m, model, ctx, hp = build_lm_method(method, tiny_llava().cuda(), tok, task, "seven", backend=backend,
                                            overrides={"batch_size": 3, "lora": 2 if method == "siu" else 0})
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * (0.3 if "lora_B" in n else 0.02))
        terms = m.losses(0)
        terms["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[backend] = ({k: float(v.detach()) for k, v in terms.items()}, grad.double().cpu())
    ref_terms, ref_grad = results.pop("eager")
    for backend, (terms, grad) in results.items():
        for k, v in ref_terms.items():
            assert abs(terms[k] - v) <= 1e-4 * max(1.0, abs(v)), (backend, k, terms[k], v)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-5, msg=backend)


def test_short_run_on_gpu():
    from unlearn_fast.methods.runner import run_lm_method

    task, tok = task_and_tokenizer()
    res = run_lm_method("mmunlearner", tiny_llava().cuda(), tok, task, "seven", progress=False,
                        overrides={"steps": 2, "batch_size": 2, "fisher_batches": 1, "forget_every": 1})
    assert next(res.model.parameters()).is_cuda and len(res.history) == 2
