"""Pieces shared by the op modules: backend choice for an op's inputs, reductions over
per-row losses, lazy native op namespaces, and the kernel-pair record the backends
register."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

REDUCTIONS = ("none", "sum", "mean")


def resolve_for_inputs(op: str, backend: str, device: torch.device, dtype: torch.dtype, *,
                       eager_faster_on_cpu: bool = False) -> str:
    """The backend that runs ``op`` on these inputs: ``backends.resolve``, then two rules for
    ``backend="auto"`` (an explicit fused backend is honoured or refused, never rerouted):

    * float64 runs eager (the fused kernels are float32/bf16/fp16; asking a fused backend
      for float64 raises TypeError);
    * on the CPU, float32 runs eager when the caller says its measured crossover makes
      eager faster for this call's sizes (``eager_faster_on_cpu``; each op documents its
      rule).  bfloat16 / float16 always run fused: the eager references do their math in
      the input dtype (the papers' formulations), the kernels in float32, and ``auto``
      must not trade accuracy for speed depending on the batch size.
    """
    from unlearn_fast import backends

    name = backends.resolve(op, backend, device)
    if name == "eager" or backend != "auto":
        if dtype == torch.float64 and name != "eager":
            raise TypeError("float64 inputs run on the eager backend only (the fused kernels are float32/bf16/fp16)")
        return name
    if dtype == torch.float64 or (eager_faster_on_cpu and dtype == torch.float32
                                  and torch.device(device).type == "cpu"):
        return "eager"
    return name


@dataclass(frozen=True)
class KernelPair:
    """A backend's forward and backward entry points for one op."""

    forward: Callable
    backward: Callable


def cpu_ops():
    """``torch.ops.unlearn_fast_cpu`` after loading the C++ extension that defines it."""
    from unlearn_fast.backends import native_cpu

    if native_cpu() is None:  # resolve() has already refused, this is a safety net
        raise RuntimeError("unlearn_fast._C is not built")
    return torch.ops.unlearn_fast_cpu


def cuda_ops():
    """``torch.ops.unlearn_fast_cuda`` after loading the CUDA extension that defines it."""
    from unlearn_fast.backends import native_cuda

    if native_cuda() is None:
        raise RuntimeError("unlearn_fast._C_cuda is not built")
    return torch.ops.unlearn_fast_cuda


def reduce_rows(rows: torch.Tensor, kept: Optional[torch.Tensor], reduction: str, lead_shape,
                siu_denominator_scale: int = 1) -> torch.Tensor:
    """Reduce per-row losses (0 at masked rows).

    ``kept`` is the float token mask (None: every row kept).  "mean" divides by the number
    of kept rows and gives 0 (not NaN) when none are kept; "siu" also divides by
    ``siu_denominator_scale`` (the vocabulary size).  No host synchronisation.
    """
    if reduction == "none":
        return rows.reshape(lead_shape)
    return reduce_total(rows.sum(), kept, rows.numel(), reduction, siu_denominator_scale)


def reduce_total(total: torch.Tensor, kept: Optional[torch.Tensor], num_rows: int, reduction: str,
                 siu_denominator_scale: int = 1) -> torch.Tensor:
    """:func:`reduce_rows` for a loss already summed over its ``num_rows`` rows (a fused
    kernel may return the sum directly); ``reduction`` is "sum", "mean" or "siu"."""
    if reduction == "sum":
        return total
    count = kept.sum() if kept is not None else torch.tensor(float(num_rows), device=total.device)
    count = count.clamp(min=1.0)
    if reduction == "mean":
        return total / count
    if reduction == "siu":
        return total / (count * siu_denominator_scale)
    raise ValueError(f"unknown reduction {reduction!r}")


DOUBLE_BACKWARD_ERROR = ("unlearn_fast: the fused kernels' gradients cannot be differentiated again (double "
                         "backward through create_graph=True); use backend='eager' for higher-order gradients")


def _first_order_only(backward: Callable) -> Callable:
    """Like torch.autograd.function.once_differentiable, but sound: under
    create_graph=True the gradients come out behind a node that raises when they are
    differentiated again.  once_differentiable adds that node only when the incoming
    gradients require grad, and links it to nothing, so a double backward towards the
    op's inputs silently treats its gradients as constants."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled():  # a plain backward(): nothing more to do
            return outputs

        def alias(t):
            if t is None:
                return None
            t = t.detach()
            t.requires_grad_(True)
            return t

        # The node also takes the op's saved inputs that require grad, so that it lies on
        # every path from these gradients back to those inputs and runs (raising) there.
        connected = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
        raising = torch._C._functions.DelayedError(DOUBLE_BACKWARD_ERROR.encode(), len(outputs) + len(connected))
        return tuple(raising(*[alias(t) for t in outputs], *connected)[:len(outputs)])
    return wrapper


def register_first_order_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``op.register_autograd`` with a first-order-only backward (``_first_order_only``):
    the fused backward kernels have no derivative of their own (and some backwards hand
    out gradients the forward computed), so differentiating this op's gradients again
    raises instead of silently dropping its second-order terms; a ``create_graph=True``
    whose gradients nothing differentiates again still works."""
    op.register_autograd(_first_order_only(backward), setup_context=setup_context)
