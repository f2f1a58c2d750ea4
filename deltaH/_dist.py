"""Reductions that are global when ``torch.distributed`` is initialised and identities otherwise.

Estimators reduce *sums and counts*, never averages of averages: each rank passes its shard of
the sequences and gets the global value back. Sums over sequences use :func:`sum_rows`, which
gathers the rows and sums them in one place, so a run whose ranks hold contiguous shards in rank
order gets the bits one process holding every row would get (an all-reduce of per-rank partial
sums would differ in the last bits); integer counts and maxima are exact either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

_LOCAL = False


def active() -> bool:
    return not _LOCAL and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block every reduction is this rank's own (as in one process): for a computation
    one rank does alone on all the rows."""
    global _LOCAL
    old, _LOCAL = _LOCAL, True
    try:
        yield
    finally:
        _LOCAL = old


def _all_reduce(x: Tensor, op: str) -> Tensor:
    """``x`` reduced over ranks by ``dist.ReduceOp.<op>`` (looked up only when distributed is active)."""
    if not active():
        return x
    x = x.clone()
    dist.all_reduce(x, op=getattr(dist.ReduceOp, op))
    return x


def all_sum(x: Tensor) -> Tensor:
    return _all_reduce(x, "SUM")


def sum_rows(x: Tensor, dim: int) -> Tensor:
    """``x.sum(dim)`` over every rank's rows along ``dim`` (each rank's shard in rank order).

    The shards are gathered (:func:`all_cat`) and summed by one reduction: bit-identical to one
    process holding the concatenated rows. It moves ``x.numel()`` elements per rank instead of the
    ``x.numel() / x.shape[dim]`` of an all-reduce: per-sequence vectors, small beside a forward pass.
    """
    return all_cat(x, dim).sum(dim)


def count(n: float | Tensor, device: torch.device | str | None = None) -> Tensor:
    """The global total of this rank's count ``n`` (sequences, tokens) as a float64 scalar."""
    return all_sum(torch.tensor(float(n), dtype=torch.float64, device=device))


def all_max(x: Tensor) -> Tensor:
    return _all_reduce(x, "MAX")


def all_min(x: Tensor) -> Tensor:
    return _all_reduce(x, "MIN")


def all_cat(x: Tensor, dim: int = -1) -> Tensor:
    """Concatenate each rank's ``x`` along ``dim`` (shapes may differ only along ``dim``)."""
    if not active():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[dim]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    m = int(max(int(s) for s in sizes))
    pad_shape = list(x.shape)
    pad_shape[dim] = m - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p.narrow(dim, 0, int(s)) for p, s in zip(parts, sizes, strict=True)], dim=dim)
