"""Sharded evaluation: every rank takes every world_size-th item (of the image items, then
of the text items), computes per-item results, and one ``all_gather_object`` puts them
back in input order on every rank.  Strided shards balance the work when items are sorted by length.  Without an
initialised process group (or with one process) everything runs locally.

Lockstep: every rank's shard is padded to the same length, per modality (with copies of
one item, whose results are dropped), so every rank makes the same number of batched
passes and its k-th batch runs the vision encoder exactly when every rank's does.  An
FSDP-sharded model needs that (each forward is a collective: a rank that stops early
leaves the others waiting in an all-gather); see also ``generation.generate_greedy``,
which keeps the decoding steps in lockstep for such a model."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def world() -> Tuple[int, int]:
    """(rank, world_size) of the default process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_shard(shard) -> bool:
    """``shard``: True, False or "auto" (shard when a process group with > 1 rank exists)."""
    if shard == "auto":
        return world()[1] > 1
    if not isinstance(shard, bool):
        raise ValueError(f"shard must be True, False or 'auto', got {shard!r}")
    if shard and world()[1] == 1:
        return False
    return shard


def is_sharded_model(model) -> bool:
    """Whether ``model`` holds FSDP2-sharded (DTensor) parameters: its forward passes are
    collectives that every rank must make together."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.5
        from torch.distributed._tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def sharded_map(fn: Callable[[List[T]], List[R]], items: Sequence[T], shard="auto") -> List[R]:
    """``fn(items)`` computed shard by shard: ``fn`` maps a list of items to a list of
    per-item results (same length).  Every rank returns the full list, in input order."""
    items = list(items)
    if not resolve_shard(shard):
        out = fn(items)
        if len(out) != len(items):
            raise RuntimeError(f"sharded function returned {len(out)} results for {len(items)} items")
        return out
    import torch.distributed as dist

    rank, size = world()
    # per modality (image rows, text rows), this rank's strided share padded to the same
    # count on every rank; image rows first (the length-sorted batching puts them first
    # anyway), so batch k holds images on one rank exactly when it does on every rank
    mine: List[int] = []
    padded: List[T] = []
    for group in ([i for i, it in enumerate(items) if _has_image(it)],
                  [i for i, it in enumerate(items) if not _has_image(it)]):
        share = group[rank::size]
        mine += share
        n_pad = -(-len(group) // size) - len(share)
        padded += [items[i] for i in share] + ([items[share[-1] if share else group[0]]] * n_pad if n_pad else [])
    local = fn(padded)
    if len(local) != len(padded):
        raise RuntimeError(f"sharded function returned {len(local)} results for {len(padded)} items")
    shares = [local[j] for j, keep in enumerate(_real(items, rank, size)) if keep]  # the padding's are dropped
    gathered: List[List] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(gathered, list(zip(mine, shares)))
    out: List[Optional[R]] = [None] * len(items)
    for part in gathered:
        for i, r in part:
            out[i] = r
    return out  # type: ignore[return-value]


def _has_image(item) -> bool:
    """An example with an image (or a tuple holding one, e.g. a (question, option, row)
    candidate): its batch runs the vision encoder."""
    if isinstance(item, tuple):
        return any(_has_image(x) for x in item)
    return getattr(item, "image", None) is not None


def _real(items: Sequence, rank: int, size: int) -> List[bool]:
    """Per entry of this rank's padded list: True for a real item, False for padding."""
    flags: List[bool] = []
    for group in ([it for it in items if _has_image(it)], [it for it in items if not _has_image(it)]):
        n = len(group[rank::size])
        flags += [True] * n + [False] * (-(-len(group) // size) - n)
    return flags
