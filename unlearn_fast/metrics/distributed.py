"""Sharded evaluation: every rank takes the items i with i % world_size == rank, computes
per-item results, and one ``all_gather_object`` puts them back in input order on every
rank.  Strided shards balance the work when items are sorted by length.  Without an
initialised process group (or with one process) everything runs locally."""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple, TypeVar

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
    local = fn(items[rank::size])
    if len(local) != len(items[rank::size]):
        raise RuntimeError(f"sharded function returned {len(local)} results for {len(items[rank::size])} items")
    gathered: List[List[R]] = [None] * size  # type: ignore[list-item]
    dist.all_gather_object(gathered, local)
    return [gathered[i % size][i // size] for i in range(len(items))]
