"""Helpers shared by the model-facing metrics: eval mode, moving a collated batch to the
model, length-sorted batching of examples, progress bars."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator, List, Sequence, Tuple

import torch

# Keys a collated batch may carry that the model's forward does not take.
NON_MODEL_KEYS = ("labels", "target_phrase_mask", "token_mask", "answer_mask")


def model_device_dtype(model) -> Tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's parameters (first floating parameter)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("model has no floating-point parameters")


def to_model(batch: dict, model) -> dict:
    """The batch's tensors on the model's device; floating tensors (pixel values) in its
    dtype.  Integer tensors keep their dtype."""
    device, dtype = model_device_dtype(model)
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device=device, dtype=dtype if v.is_floating_point() else None, non_blocking=True)
        out[k] = v
    return out


def forward_inputs(model, batch: dict, adapter=None) -> dict:
    """The model-forward keyword arguments of a collated batch (the adapter's
    ``forward_kwargs(model, batch)`` when it has one; otherwise every tensor but the
    label-like keys)."""
    fk = getattr(adapter, "forward_kwargs", None) if adapter is not None else None
    if callable(fk):
        return dict(fk(model, batch))
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and k not in NON_MODEL_KEYS}


@contextlib.contextmanager
def eval_mode(*models):
    """``model.eval()`` and no autograd for the block; the training flags are restored."""
    flags = [(m, m.training) for m in models if m is not None]
    for m, _ in flags:
        m.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for m, was in flags:
            m.train(was)


def length_sorted_batches(items: Sequence, lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Index batches of ``batch_size`` over items sorted by length (longest first), so
    each batch pads little; the caller scatters results back by index."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def example_length(ex, with_answer: bool = True) -> int:
    """A cheap proxy of an example's token count (characters; an image counts a lot)."""
    n = len(getattr(ex, "question", "") or "") + (len(getattr(ex, "answer", "") or "") if with_answer else 0)
    return n + (10_000 if getattr(ex, "image", None) is not None else 0)


def progress(iterable: Iterable, total: int, desc: str, enabled) -> Iterator:
    """tqdm over ``iterable`` when ``enabled`` (True, False, or None = when stderr is a tty)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return iter(iterable)
    from tqdm.auto import tqdm

    return iter(tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True))
