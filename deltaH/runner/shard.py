"""This rank's share of a distributed run's work, and the gathers that undo it.

Every rank holds all of E and U (rank 0 samples them; :func:`deltaH.runner.distributed.broadcast`).
The evaluation rows are split into contiguous shards in rank order, each a whole number of
``lcm(tf_batch_size, seq_chunk)``-row blocks: every teacher-forcing chunk and every per-sequence
gradient chunk of a rank is then one that a single process would form, so per-sequence values are
bit-identical to one process, and the estimators' sums over gathered rows
(:func:`deltaH._dist.sum_rows`) are too. The update rows are split the same way in blocks of
``seq_chunk`` for the per-sequence gradients of the directions stage. With fewer blocks than ranks
the split is by single rows (results then equal one process's to float round-off).

Stage outputs are global: per-sequence arrays are gathered back in row order (:func:`gather`), so
the cache and the results folder do not depend on the number of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from deltaH import _dist
from deltaH.batch import SequenceBatch
from deltaH.config import Config
from deltaH.errors import ConfigError
from deltaH.runner import distributed
from deltaH.stats import SequenceStats


def span(n: int, unit: int, rank: int | None = None, world: int | None = None) -> slice:
    """Rank ``rank``'s rows ``[lo, hi)`` of ``n``: ``ceil(n / unit)`` blocks of ``unit`` rows dealt out
    contiguously, the first ``blocks % world`` ranks one block more (single rows when there are fewer
    blocks than ranks). Empty for a rank beyond the rows."""
    r = distributed.rank() if rank is None else rank
    w = distributed.world() if world is None else world
    if -(-n // unit) < w:
        unit = 1
    blocks = -(-n // unit)
    base, extra = divmod(blocks, w)
    start = r * base + min(r, extra)
    stop = start + base + (1 if r < extra else 0)
    return slice(min(n, start * unit), min(n, stop * unit))


def eval_unit(cfg: Config) -> int:
    return math.lcm(int(cfg.compute.tf_batch_size), int(cfg.compute.seq_chunk))


def check_world(cfg: Config, world: int) -> None:
    """Every rank needs at least one evaluation sequence (its estimators reduce over its shard)."""
    n = int(cfg.eval_batch.total_sequences)
    if world > n:
        raise ConfigError(
            f"config key 'eval_batch.total_sequences': {n} evaluation sequences cannot be shared by {world} "
            f"processes (each needs at least one): raise it to >= {world} or start fewer processes",
            "eval_batch.total_sequences",
        )


@dataclass(frozen=True)
class EvalShard:
    """This rank's rows of E (``rows``), their batch, and their θ-side statistics when given."""

    rows: slice
    batch: SequenceBatch
    base: SequenceStats | None


def eval_shard(cfg: Config, batch: SequenceBatch, base: SequenceStats | None = None) -> EvalShard:
    """This rank's shard of E (all of E in one process: the batch and ``base`` as given)."""
    if not _dist.active():
        return EvalShard(slice(0, len(batch)), batch, base)
    rows = span(len(batch), eval_unit(cfg))
    dev = batch.input_ids.device
    return EvalShard(rows, batch.select(rows), None if base is None else stats_rows(base, rows, dev))


def update_rows(cfg: Config, n: int) -> slice | None:
    """This rank's rows of U for its per-sequence gradients (None in one process: all of them)."""
    return span(n, int(cfg.compute.seq_chunk)) if _dist.active() else None


def stats_rows(st: SequenceStats, rows: slice, device: torch.device | None = None) -> SequenceStats:
    """Rows ``rows`` of per-sequence statistics ``[N]`` (``nucleus_key``, one entry per scored
    position in row order, by the rows' token offsets), on ``device`` if given."""

    def cut(x: Tensor) -> Tensor:
        return x[rows].to(device) if device is not None else x[rows]

    key = st.nucleus_key
    if key is not None:
        offsets = torch.cat([st.n_tokens.new_zeros(1), st.n_tokens.cumsum(0)]).tolist()
        key = key[int(offsets[rows.start]) : int(offsets[rows.stop])]
        key = key.to(device) if device is not None else key
    return SequenceStats(cut(st.logq), cut(st.entropy), cut(st.surprisal), cut(st.n_tokens), key)


def gather(x: Tensor | None, dim: int) -> Any:
    """Every rank's ``x`` concatenated along ``dim`` in rank order, on ``x``'s device (``x`` itself in one
    process; None stays None). NCCL moves CUDA tensors only: a CPU ``x`` travels through the GPU."""
    if x is None or not _dist.active():
        return x
    dev = x.device
    if dist.get_backend() == "nccl" and dev.type != "cuda":
        x = x.to(torch.device("cuda", torch.cuda.current_device()))
    return _dist.all_cat(x, dim).to(dev)


def gather_stats(st: SequenceStats) -> SequenceStats:
    """Per-sequence statistics of every rank's rows, in row order."""
    return replace(st, **{f.name: gather(getattr(st, f.name), 0) for f in fields(st)})
