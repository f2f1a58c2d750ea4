"""``compute.dir_chunk: auto``: time a few chunk sizes on this machine and model, keep the fastest.

The estimators take ``dir_chunk`` directions per ``vmap`` call (1 = a plain loop, no vmap). Which is
fastest depends on the device, the model and the rank of the directions: on CPU the loop usually
wins, on a GPU the batched form is expected to. :func:`calibrate_dir_chunk` times the true-ΔH
evaluation (:func:`~deltaH.estimators.true.delta_h_true_multi`) of one teacher-forcing chunk of E
(its first ``tf_batch_size`` sequences) along the run's ``K`` stacked directions at η_ref, for each
candidate in ``1, 2, 4, 8, 16`` capped at ``K``: one warm-up call, then the median of ``repeats``
timed calls, candidates interleaved so that a change in the machine's load hits them alike. The
fastest median wins (ties: the smaller chunk). The chunk size never changes results (the estimators'
chunking-invariance tests); only the speed and peak memory.

The choice and the timings are a stage of the run (``dir_chunk``), so ``--resume`` reuses them from
the run's cache; they are written to ``summary.json`` (``compute``) and the report's setup.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from deltaH import _trees
from deltaH.batch import SequenceBatch
from deltaH.estimators.true import base_stats, delta_h_true_multi
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy

CANDIDATES = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class DirChunk:
    """The ``dir_chunk`` a run used: ``source`` is ``config`` (an integer in ``compute.dir_chunk``)
    or ``calibrated`` (``auto``: ``seconds[i]`` is the median time of ``candidates[i]`` on
    ``n_sequences`` sequences of E along ``k`` directions, ``repeats`` timed calls each)."""

    value: int
    source: str
    candidates: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    k: int = 0
    n_sequences: int = 0
    repeats: int = 0


def candidates_for(k: int) -> list[int]:
    """``1, 2, 4, 8, 16`` capped at ``k`` (``k`` itself joins when it is below 16 and not a power of 2)."""
    out = [c for c in CANDIDATES if c <= k]
    if k < CANDIDATES[-1] and k not in out:
        out.append(k)
    return out or [1]


def pick(candidates: list[int], seconds: list[float]) -> int:
    """The candidate with the smallest time; a tie goes to the smaller chunk (less memory)."""
    return min(zip(seconds, candidates, strict=True))[1]


def calibrate_dir_chunk(
    params: Mapping[str, Tensor],
    dirs: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    eta: float,
    tf_batch_size: int,
    head_chunk: int | None = None,
    entropy_mode: str = "rb",
    share_prompts: str = "auto",
    repeats: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> DirChunk:
    """Time ``delta_h_true_multi`` on the first ``tf_batch_size`` rows of ``batch`` along ``dirs
    [K, ...]`` at ``eta`` for each of :func:`candidates_for` ``(K)``; see the module docstring."""
    k = _trees.n_stacked(dirs)
    sub = batch.select(slice(0, int(tf_batch_size)))
    base = base_stats(lm, params, sub, policy, tf_batch_size, head_chunk, share_prompts)
    cands = candidates_for(k)

    def once(c: int) -> float:
        t = clock()
        delta_h_true_multi(params, dirs, sub, lm=lm, policy=policy, eta=eta, tf_batch_size=tf_batch_size,
                           dir_chunk=c, entropy_mode=entropy_mode, head_chunk=head_chunk, base=base,
                           share_prompts=share_prompts)
        return clock() - t

    for c in cands:  # warm-up: first-call allocations, lazy kernels
        once(c)
    times: dict[int, list[float]] = {c: [] for c in cands}
    for _ in range(max(1, int(repeats))):
        for c in cands:
            times[c].append(once(c))
    seconds = [statistics.median(times[c]) for c in cands]
    return DirChunk(pick(cands, seconds), "calibrated", cands, seconds, k, len(sub), max(1, int(repeats)))
