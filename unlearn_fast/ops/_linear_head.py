"""Pieces shared by the ops computed from hidden states and a head weight
(:mod:`~unlearn_fast.ops.token_stats`, :mod:`~unlearn_fast.ops.fused_linear`): the GEMMs
of the Python chunk loops (the triton backend; csrc/linear_chunk.h is the C++ twin), and
the handling of gradients that the fused forward computes while the logits are at hand.

Gradients formed in the forward.  The hidden-state gradient of row r depends only on row
r, so the forward returns the per-row Jacobian (or, for a loss that is a fixed weighted
sum of the rows, that sum's gradient) and the backward scales it: exact for any
grad_output.  The weight gradient sums over rows, so it is formed in the forward only
when the loss is a fixed weighted sum of the rows (a scalar); the backward then scales it
by the scalar grad_output, in place, so no second (V, H) copy exists.  A second backward
through the same graph (retain_graph=True) would reuse the scaled tensor, so it is
refused with a clear error.
"""
from __future__ import annotations

from typing import Optional

import torch

# Chunk buffers: the (chunk, V) logits buffers of one chunk take at most this many bytes
# counted in float32 (half of it for bfloat16/float16 inputs).
CHUNK_BYTES = 128 * 2**20
# The fewest rows a chunk gets whatever the budget (see default_chunk_size).
MIN_CHUNK_ROWS = 256
# When the budget is below MIN_CHUNK_ROWS (a large vocabulary), the tokens are still
# split into at least SPLIT_CHUNKS chunks while each keeps SPLIT_CHUNK_ROWS rows, so a
# few hundred tokens do not sit in one or two chunks as big as eager's logits.
SPLIT_CHUNKS = 3
SPLIT_CHUNK_ROWS = 168
# Vocabulary rows per partial product when a low-precision weight gradient is summed in
# float32 (see add_weight_grad).
WEIGHT_GRAD_SLAB = 4096


def default_chunk_size(vocab_size: int, buffers: int, num_tokens: Optional[int] = None) -> int:
    """Tokens per chunk.

    1. The largest multiple of 8 whose ``buffers`` float32 (chunk, V) logits buffers fit in
       ``CHUNK_BYTES`` (the budget keeps them a small fraction of what eager code allocates),
    2. but at least ``MIN_CHUNK_ROWS``: every chunk's GEMMs stream the whole (V, H) weight,
       and BLAS runs below its peak on few rows, so small chunks cost time that eager's
       single GEMM does not pay (measured on the 2-core CPU with the vocabulary-slab GEMMs
       of csrc/linear_chunk.h, H = 3584, V = 151,936: 128 rows at ~0.93x and 64 rows at
       ~0.83x the rate of 256; the plain row-major product: 64 rows at ~0.5x);
    3. with ``num_tokens`` given, as many equal chunks as fit whole (sizes rounded up to a
       multiple of 8, between that size and twice it, never more than num_tokens), so no
       chunk is a thin GEMM; the buffers may then take up to twice the budget;
    4. and where step 2 overrode the budget, at least ``SPLIT_CHUNKS`` chunks if each
       keeps ``SPLIT_CHUNK_ROWS`` rows (so 512 tokens at V = 151,936 run as 3 x 176, not
       2 x 256: the buffers hold a third of the tokens' logits, not half).  Measured on
       the 2-core CPU at N = 512: 176-row chunks as fast as 256 for the trainable-head
       cross-entropy and both fused linear DMK cases (within 3 %).
    """
    budget_rows = CHUNK_BYTES // (4 * buffers * max(int(vocab_size), 1))
    budget_rows -= budget_rows % 8
    c = max(MIN_CHUNK_ROWS, budget_rows)
    if num_tokens is not None:
        n = max(1, int(num_tokens))
        chunks = max(1, n // c)
        if budget_rows < MIN_CHUNK_ROWS:
            chunks = max(chunks, min(SPLIT_CHUNKS, n // SPLIT_CHUNK_ROWS))
        c = min(n, -(-(-(-n // chunks)) // 8) * 8)
    return c


def chunk_logits(hc: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out=None) -> torch.Tensor:
    """hc (n, H) @ weight (V, H)^T (+ bias) into ``out``."""
    if bias is None:
        return torch.matmul(hc, weight.t(), out=out)
    return torch.addmm(bias, hc, weight.t(), out=out)


def add_weight_grad(grad_weight32: torch.Tensor, g: torch.Tensor, hc: torch.Tensor) -> None:
    """grad_weight32 (V, H) float32 += g (n, V)^T @ hc.  A low-precision g runs the GEMM in
    its dtype on vocabulary slabs (float32 accumulation inside the GEMM, one rounding of
    each chunk's partial product) and sums the partial products in float32 across chunks:
    summing chunks in bfloat16 drifts with their number, a float32 GEMM is 2-4x slower."""
    if g.dtype == torch.float32:
        grad_weight32.addmm_(g.t(), hc)
        return
    for v0 in range(0, g.shape[1], WEIGHT_GRAD_SLAB):
        grad_weight32[v0:v0 + WEIGHT_GRAD_SLAB] += g[:, v0:v0 + WEIGHT_GRAD_SLAB].t() @ hc


def add_bias_grad(grad_bias32: torch.Tensor, g: torch.Tensor) -> None:
    grad_bias32 += g.sum(0, dtype=torch.float32)


def refuse_second_backward(ctx, op_name: str) -> None:
    """Call first in a backward that hands out forward-computed weight gradients."""
    if getattr(ctx, "gradients_handed_out", False):
        raise RuntimeError(f"{op_name}: the weight gradient computed in the forward was already handed to an earlier "
                           "backward through this graph; compute the loss again for a second backward")


def scaled(precomputed: torch.Tensor, scale: torch.Tensor, ctx=None) -> torch.Tensor:
    """precomputed * scale (a 0-d float32 tensor; float32 math).  With ``ctx`` the tensor
    is a (V, H)-sized weight gradient: scaled in place (functional under torch.compile)
    and ``ctx`` marked so that a second backward is refused."""
    if ctx is None or torch.compiler.is_compiling():
        return precomputed * scale
    ctx.gradients_handed_out = True
    return precomputed.mul_(scale)
