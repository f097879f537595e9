"""The distributed top-k (2 processes, gloo, CPU) equals the single-process answer over
the ranks' lists concatenated in rank order, ties included."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from unlearn_fast import saliency as S

from helpers import cpu_backends_for

pytestmark = pytest.mark.distributed
WORLD = 2
FRACTIONS = (0.0, 0.013, 0.4, 1.0)


def _shards():
    """Per case, each rank's score list (ranks hold different numbers of tensors)."""
    gen = torch.Generator().manual_seed(11)
    randn = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return {
        "float32": [[randn(37, 19), randn(1271)], [randn(0), randn(3, 5, 7), randn(70001)]],
        # heavy ties that straddle the ranks
        "ties": [[torch.full((1000,), 2.0), torch.ones(77)], [torch.full((5000,), -2.0), torch.zeros(3)]],
        "bfloat16": [[randn(4099).bfloat16()], [randn(33).bfloat16(), randn(999).bfloat16()]],
        "empty_rank": [[randn(513), randn(64)], [randn(0)]],
    }


# eager (plain-PyTorch primitives) and the C++ kernels when built; one spawn for both
BACKENDS = ["eager"] + cpu_backends_for("saliency")[:1]


def _worker(rank, init_file, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for backend in BACKENDS:
            for case, shards in _shards().items():
                for i, fraction in enumerate(FRACTIONS):
                    mask = S.topk_mask_distributed(shards[rank], fraction, backend=backend)
                    mask.save(os.path.join(out_dir, f"{backend}-{case}-{i}-{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def test_distributed_topk_equals_single_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for backend in BACKENDS:
        _compare(backend, tmp_path)


def _compare(backend, tmp_path):
    for case, shards in _shards().items():
        together = shards[0] + shards[1]
        for i, fraction in enumerate(FRACTIONS):
            single = S.topk_mask(together, fraction, backend=backend)  # eager: torch.cat + torch.topk
            parts = [S.BitMask.load(tmp_path / f"{backend}-{case}-{i}-{r}.safetensors") for r in range(WORLD)]
            words = parts[0].words + parts[1].words
            assert all(torch.equal(a, b) for a, b in zip(words, single.words)), (backend, case, fraction)
            assert parts[0].meta["k"] == single.meta["k"] == sum(p.count() for p in parts)
            assert parts[0].meta["threshold"] == parts[1].meta["threshold"] == single.meta["threshold"]
