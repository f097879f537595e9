"""pytest-benchmark suite: head-level ops from hidden states -- linear cross-entropy, the
fused linear dual masked KL, token statistics with the MIA extras -- eager (logits =
hidden @ W.T, then the loss) vs torch.compile of eager vs the fused backends; forward,
forward+backward (trainable head) and forward+backward with a frozen head.

    pytest benchmarks/bench_linear.py                                  # CPU: eager, compile, cpp
    pytest benchmarks/bench_linear.py -k "fused_linear_dmk and not compile"
    UF_BENCH_HEAD=qwen2vl UF_BENCH_TOKENS=512 pytest benchmarks/bench_linear.py -k bfloat16

Heads: llava (H=4096, V=32000), qwen2vl (H=3584, V=151936), tiny (H=256, V=4099).  On a
GPU machine the fused providers are cuda and triton.  Each result's extra_info holds
the peak memory above the inputs (bytes; RSS on the CPU) and the same without the
returned gradients.  The eager references and the op definitions are those of
``unlearn-fast bench linear`` (unlearn_fast/bench/linear.py), which writes the full
table (JSON, CSV, plots).
"""
import os

import pytest
import torch

from unlearn_fast import backends
from unlearn_fast.bench import linear as suite
from unlearn_fast.bench.harness import peak_memory, synchronize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HEAD = os.environ.get("UF_BENCH_HEAD", "llava")
TOKENS = int(os.environ.get("UF_BENCH_TOKENS", "512"))
_COMPILED = {}


def _providers(op_name):
    out = ["eager", "compile"]
    for name in (("cuda", "triton") if DEVICE == "cuda" else ("cpp",)):
        try:
            backends.resolve(op_name, name, DEVICE)
            out.append(name)
        except Exception:  # not built / not available here: not benchmarked
            pass
    return out


CASES = [(op, mode) for op in suite.OPS for mode in suite.MODES if op != "token_stats_mia" or mode == "fwd"]
PROVIDERS = sorted(set(_providers("token_stats")) | set(_providers("fused_linear_dual_masked_kl")),
                   key=["eager", "compile", "cpp", "cuda", "triton"].index)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def inputs(request):
    gen = torch.Generator().manual_seed(0)
    return suite._inputs(HEAD, TOKENS, request.param, DEVICE, gen), request.param


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op, mode", CASES, ids=[f"{o}-{m}" for o, m in CASES])
def test_linear(benchmark, inputs, op, mode, provider):
    x, dtype = inputs
    trainable = mode == "fwd+bwd"
    w = x["w"].detach().requires_grad_(trainable)
    h = x["h"].detach().requires_grad_(mode != "fwd")
    args = dict(x, h=h, w=w, wt=x["w"].detach().clone() if trainable else w)
    fn = suite._loss_fn(op, provider, _COMPILED)

    def step():
        if mode == "fwd":
            with torch.no_grad():
                out = fn(args)
        else:
            out = torch.autograd.grad(fn(args), [h, w] if trainable else [h])
        synchronize(DEVICE)
        return out

    hdim, vocab = suite.HEADS[HEAD]
    benchmark.group = f"{op} {mode} N={TOKENS} H={hdim} V={vocab} {str(dtype).replace('torch.', '')} {DEVICE}"
    peak = peak_memory(step, DEVICE)  # also the warm-up (compiles)
    grad_bytes = 0 if mode == "fwd" else h.numel() * h.element_size() + (w.numel() * w.element_size()
                                                                          if trainable else 0)
    benchmark.extra_info["peak_mem_bytes"] = peak
    benchmark.extra_info["peak_mem_beyond_grad_bytes"] = max(0, peak - grad_bytes)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
