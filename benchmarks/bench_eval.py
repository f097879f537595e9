"""pytest-benchmark: the evaluation metric suite of one set, one fused pass vs one eager
pass per metric (open-unlearning style), on the built-in LLaVA architecture and on a
wide-vocabulary head (V = 151,936).  Random weights (the cost does not depend on them).

    python -m pytest benchmarks/bench_eval.py --benchmark-only

Peak memory is recorded in ``extra_info`` (RSS above the start, see bench/harness.py).
The CLI version with the full table is ``unlearn-fast bench eval``.
"""
import gc

import pytest
import torch

from unlearn_fast.bench import eval as suite
from unlearn_fast.bench.harness import peak_memory

ROWS = {"builtin-arch-random": 32, f"wide-head-V{suite.WIDE_VOCAB}": 8}


@pytest.fixture(scope="module", params=[0, 1], ids=list(ROWS))
def case(request):
    from unlearn_fast.models import get_adapter

    name, model, tok, task = suite._models(quick=True)[request.param]
    adapter = get_adapter(model)
    rows = suite._examples(task, ROWS[name])
    yield name, model, adapter, tok, rows
    del model
    gc.collect()


@pytest.mark.parametrize("provider", ["per_metric_eager", "fused"])
def test_eval_scores(benchmark, case, provider):
    name, model, adapter, tok, rows = case
    fn = suite._providers(model, adapter, tok, rows, batch_size=8)[provider]
    out = fn()  # warm-up, and a sanity check of the output
    assert set(suite.OPEN_UNLEARNING_METRICS) <= set(out)
    assert all(torch.isfinite(out[m]).all() for m in suite.OPEN_UNLEARNING_METRICS)
    benchmark.extra_info.update(model=name, rows=len(rows), provider=provider, peak_mem_bytes=peak_memory(fn))
    benchmark.pedantic(fn, rounds=2, iterations=1)
