"""The C++ kernels' CPU buffer cache (csrc/buffer_cache.cpp, unlearn_fast/memory.py):
freed gradients of 8 MiB or more are reused by the next output of the same size, and the
reused memory, which still holds the last call's values, must give exact results."""
import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import backends

pytestmark = pytest.mark.skipif(not backends.availability("cpp").available, reason="C++ extension not built")

MIB = 2**20


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Each test starts from an empty cache with the default limit, and leaves it so."""
    limit = uf.cpu_buffer_cache_info()["limit_bytes"]
    uf.empty_cpu_buffer_cache()
    yield
    uf.set_cpu_buffer_cache_limit(limit)
    uf.empty_cpu_buffer_cache()


def _dmk_grad(student, teacher, token_mask, backend):
    s = student.detach().clone().requires_grad_()
    loss = uf.dual_masked_kl(s, teacher, token_mask, reduction="sum", backend=backend)
    return torch.autograd.grad(loss, s)[0]


def _dmk_inputs(n=64, v=32768, masked=()):
    student, teacher = torch.randn(n, v), torch.randn(n, v)  # an 8 MiB float32 gradient
    token_mask = torch.ones(n)
    token_mask[list(masked)] = 0
    return student, teacher, token_mask


def test_a_freed_gradient_is_reused_and_fully_rewritten():
    # The first call fills rows 0-31 with gradients; the second masks exactly those rows, so
    # a kernel that skipped writing masked rows would leave the first call's values there.
    first = _dmk_inputs(masked=range(32, 64))
    grad = _dmk_grad(*first, backend="cpp")
    assert grad[:32].abs().sum() > 0
    address = grad.data_ptr()
    del grad
    info = uf.cpu_buffer_cache_info()
    assert info["cached_buffers"] == 1 and info["cached_bytes"] >= 8 * MIB

    second = _dmk_inputs(masked=range(0, 32))
    grad = _dmk_grad(*second, backend="cpp")
    assert grad.data_ptr() == address
    assert uf.cpu_buffer_cache_info()["hits"] == info["hits"] + 1
    assert torch.count_nonzero(grad[:32]) == 0
    torch.testing.assert_close(grad, _dmk_grad(*second, backend="eager"), rtol=2e-5, atol=1e-7)


def test_a_live_buffer_is_never_handed_out_twice():
    student, teacher, token_mask = _dmk_inputs()
    first = _dmk_grad(student, teacher, token_mask, backend="cpp")
    second = _dmk_grad(student, teacher, token_mask, backend="cpp")
    assert first.data_ptr() != second.data_ptr()
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_modality_decoupling_gradients_on_reused_buffers():
    def grads(backend, seed):
        g = torch.Generator().manual_seed(seed)
        xs = [torch.randn(8192, 256, generator=g) for _ in range(6)]  # 8 MiB per gradient
        students = [xs[0].requires_grad_(), xs[2].requires_grad_(), xs[4].requires_grad_()]
        loss = uf.modality_decoupling_loss(*xs, weights=(1.0, 0.5, 2.0), backend=backend)
        return torch.autograd.grad(loss, students)

    first = grads("cpp", 0)
    del first
    cached = uf.cpu_buffer_cache_info()
    assert cached["cached_buffers"] >= 3
    for fused, eager in zip(grads("cpp", 1), grads("eager", 1)):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-9)
    assert uf.cpu_buffer_cache_info()["hits"] >= cached["hits"] + 3


def test_limit_zero_keeps_nothing():
    uf.set_cpu_buffer_cache_limit(0)
    grad = _dmk_grad(*_dmk_inputs(), backend="cpp")
    del grad
    assert uf.cpu_buffer_cache_info()["cached_bytes"] == 0


def test_the_least_recently_freed_buffers_are_evicted_first():
    # mapping lengths: an 8 MiB gradient maps 10 MiB, a 12 MiB one 14 MiB (2 MiB for alignment)
    uf.set_cpu_buffer_cache_limit(56 * MIB)  # a quarter: 14 MiB, so both sizes may be kept
    smalls = [_dmk_grad(*_dmk_inputs(n=64), backend="cpp") for _ in range(5)]
    large = _dmk_grad(*_dmk_inputs(n=96), backend="cpp")
    smalls.clear()
    assert uf.cpu_buffer_cache_info()["cached_bytes"] == 50 * MIB
    del large  # 50 + 14 > 56: the oldest small one goes
    info = uf.cpu_buffer_cache_info()
    assert info["cached_buffers"] == 5 and info["cached_bytes"] == 54 * MIB
    before = uf.cpu_buffer_cache_info()
    reused = [_dmk_grad(*_dmk_inputs(n=64), backend="cpp") for _ in range(5)]  # 4 kept: 4 hits, 1 miss
    after = uf.cpu_buffer_cache_info()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (4, 1)
    del reused
    uf.set_cpu_buffer_cache_limit(13 * MIB)  # lowering the limit unmaps down to it now
    assert uf.cpu_buffer_cache_info()["cached_bytes"] <= 13 * MIB


def test_a_buffer_above_a_quarter_of_the_limit_is_not_kept():
    uf.set_cpu_buffer_cache_limit(39 * MIB)  # a quarter is 9.75 MiB, under the 10 MiB mapping
    grad = _dmk_grad(*_dmk_inputs(), backend="cpp")
    del grad
    assert uf.cpu_buffer_cache_info()["cached_bytes"] == 0
    uf.set_cpu_buffer_cache_limit(40 * MIB)
    grad = _dmk_grad(*_dmk_inputs(), backend="cpp")
    del grad
    assert uf.cpu_buffer_cache_info()["cached_bytes"] == 10 * MIB


def test_empty_gives_everything_back():
    grad = _dmk_grad(*_dmk_inputs(), backend="cpp")
    del grad
    assert uf.cpu_buffer_cache_info()["cached_bytes"] > 0
    uf.empty_cpu_buffer_cache()
    assert uf.cpu_buffer_cache_info()["cached_bytes"] == 0


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("1", TypeError)])
def test_set_limit_rejects_bad_values(bad, error):
    with pytest.raises(error):
        uf.set_cpu_buffer_cache_limit(bad)


def test_environment_sets_the_limit():
    import os
    import subprocess
    import sys

    code = "import unlearn_fast as uf; print(uf.cpu_buffer_cache_info()['limit_bytes'])"
    env = dict(os.environ, UNLEARN_FAST_CPU_CACHE_MB="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 3 * MIB



# The head ops' float32 (V, H) weight-gradient accumulator comes from the cache and is not
# zero-filled: the first chunk that contributes overwrites it.  V x H x 4 = 8 MiB here, so a
# second call gets the first call's buffer, full of its gradient.
V, H = 4096, 512


def _weight_grad(backend, targets, hidden, weight, chunk_size):
    w = weight.detach().clone().requires_grad_()
    out = uf.token_stats(hidden, w, targets, chunk_size=chunk_size, backend=backend)["logprob"]
    (grad,) = torch.autograd.grad(out.sum(), w, allow_unused=True)
    return grad


@pytest.mark.parametrize("ignored_rows", [slice(0, 0), slice(0, 16), slice(0, 48)], ids=["none", "first-chunk", "all"])
def test_weight_gradient_on_a_dirty_reused_buffer(ignored_rows):
    hidden, weight = torch.randn(48, H), torch.randn(V, H) * 0.05
    dirty = _weight_grad("cpp", torch.randint(0, V, (48,)), hidden, weight, chunk_size=16)
    assert dirty.abs().sum() > 0
    del dirty
    targets = torch.randint(0, V, (48,))
    targets[ignored_rows] = -100
    hits = uf.cpu_buffer_cache_info()["hits"]
    fused = _weight_grad("cpp", targets, hidden, weight, chunk_size=16)
    assert uf.cpu_buffer_cache_info()["hits"] > hits
    eager = _weight_grad("eager", targets, hidden, weight, chunk_size=16)
    if fused is not None or eager is not None:
        torch.testing.assert_close(fused, eager if eager is not None else torch.zeros_like(fused),
                                   rtol=1e-4, atol=1e-6)
    if ignored_rows.stop == 48:
        assert fused is not None and torch.count_nonzero(fused) == 0


def test_fused_linear_dmk_weight_gradient_on_a_dirty_reused_buffer():
    def grad(token_mask, backend):
        g = torch.Generator().manual_seed(3)
        sh, th = torch.randn(48, H, generator=g), torch.randn(48, H, generator=g)
        sw = (torch.randn(V, H, generator=g) * 0.05).requires_grad_()
        loss = uf.fused_linear_dual_masked_kl(sh, sw, th, sw.detach() * 0.9, token_mask, chunk_size=16,
                                              reduction="sum", backend=backend)
        return torch.autograd.grad(loss, sw)[0]

    grad(torch.ones(48), "cpp")  # leaves a dirty (V, H) float32 buffer in the cache
    masked_first_chunk = torch.ones(48)
    masked_first_chunk[:16] = 0
    torch.testing.assert_close(grad(masked_first_chunk, "cpp"), grad(masked_first_chunk, "eager"),
                               rtol=1e-4, atol=1e-6)
    nothing_kept = grad(torch.zeros(48), "cpp")
    assert torch.count_nonzero(nothing_kept) == 0


def test_a_bad_environment_value_warns_and_keeps_the_default():
    import os
    import subprocess
    import sys

    code = "import unlearn_fast as uf; print(uf.cpu_buffer_cache_info()['limit_bytes'])"
    env = dict(os.environ, UNLEARN_FAST_CPU_CACHE_MB="lots")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == 1024 * MIB
    assert "ignoring UNLEARN_FAST_CPU_CACHE_MB=lots" in out.stderr
