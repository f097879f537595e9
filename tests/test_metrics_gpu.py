"""GPU: the one-pass scores, C-Dis and batched generation on CUDA (auto backend: cuda,
then triton) against the float64 per-metric eager oracle on the CPU.  Skipped without
a GPU."""
import copy

import pytest
import torch

from unlearn_fast import metrics as M
from unlearn_fast.metrics import reference
from unlearn_fast.models import get_adapter

from helpers import rel_err
from metrics_common import task_and_tokenizer, tiny_llava

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup():
    task, tok = task_and_tokenizer()
    model = tiny_llava(seed=0)
    rows = task.forget_set("seven")[:3] + task.text_facts("seven")[:3] + task.holdout_set("two")[:2]
    return tok, model, get_adapter(model), rows


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scores_on_cuda_match_cpu_oracle(setup, backend, dtype):
    tok, model, adapter, rows = setup
    oracle = reference.per_metric_scores(copy.deepcopy(model).double(), adapter, rows, tokenizer=tok, batch_size=4)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    got = M.sequence_scores(gpu, adapter, rows, tokenizer=tok, batch_size=3, backend=backend)
    eager = reference.per_metric_scores(gpu, adapter, rows, tokenizer=tok, batch_size=4)  # same dtype, eager
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name, ref in oracle.items():
        # no worse than the eager path in the same dtype (bf16 weights change the model itself)
        assert rel_err(got[name], ref) <= rel_err(eager[name], ref) + tol, name


def test_generation_and_c_dis_on_cuda(setup):
    tok, model, adapter, rows = setup
    cpu = M.generate_answers(model, adapter, rows, tokenizer=tok, batch_size=8, max_new_tokens=6)
    gpu_model = copy.deepcopy(model).to("cuda")
    gpu = M.generate_answers(gpu_model, adapter, rows, tokenizer=tok, batch_size=8, max_new_tokens=6)
    assert gpu == cpu
    ids = [5, 17, 42]
    c_cpu = M.c_dis(model, model, adapter, rows, ids, tokenizer=tok)
    c_gpu = M.c_dis(gpu_model, gpu_model, adapter, rows, ids, tokenizer=tok)
    assert c_cpu == pytest.approx(0.0, abs=1e-9) and c_gpu == pytest.approx(0.0, abs=1e-7)
