"""pytest-benchmark: one end-to-end unlearning step (SIU: LoRA, CE + dual masked KL; NPO:
full fine-tuning) on a LLaVA-architecture model with a wide head, eager losses vs the
fused backend.  Run: ``python -m pytest benchmarks/bench_e2e.py --benchmark-only``
(``UF_BENCH_VOCAB`` / ``UF_BENCH_HIDDEN`` / ``UF_BENCH_BATCH`` change the shape).
Peak memory of each step is stored in ``extra_info``."""
import os

import pytest
import torch

VOCAB = int(os.environ.get("UF_BENCH_VOCAB", "32000"))
HIDDEN = int(os.environ.get("UF_BENCH_HIDDEN", "256"))
BATCH = int(os.environ.get("UF_BENCH_BATCH", "8"))


@pytest.fixture(scope="module")
def setup():
    from transformers import LlavaForConditionalGeneration

    from unlearn_fast.data import load_builtin_task
    from unlearn_fast.models.builtin import builtin_tokenizer, tiny_llava_config

    task = load_builtin_task()
    tok = builtin_tokenizer(task)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlavaForConditionalGeneration(tiny_llava_config(tok, text_hidden=HIDDEN, vocab_size=VOCAB)).to(device)
    return model.eval(), tok, task, device


@pytest.mark.parametrize("method", ["siu", "npo"])
@pytest.mark.parametrize("provider", ["eager", "fused"])
def test_e2e_step(benchmark, setup, method, provider):
    from unlearn_fast.bench.e2e import fused_providers, make_step
    from unlearn_fast.bench.harness import peak_memory

    model, tok, task, device = setup
    if provider == "fused":
        names = fused_providers(device)
        if not names:
            pytest.skip("no fused backend available here")
        provider = names[0]
    step = make_step(method, model, tok, task, provider, BATCH)
    step()  # warm-up
    benchmark.extra_info.update(vocab=VOCAB, hidden=HIDDEN, batch=BATCH, backend=provider,
                                peak_mem_bytes=peak_memory(step, device))
    benchmark.pedantic(step, rounds=3, iterations=1)
