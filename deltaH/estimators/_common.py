"""What the ΔH estimators share: argument checks, the η list, direction trees, θ-side statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deltaH import _trees
from deltaH._choices import ENTROPY_MODES, check_choice
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, BatchError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.stats import SequenceStats, sequence_stats


def as_etas(eta: float | Sequence[float] | Tensor) -> tuple[list[float], bool]:
    """``(etas, scalar)``: the step sizes as a list of finite floats, and whether one was given."""
    if isinstance(eta, Tensor):
        eta = eta.tolist()
    if isinstance(eta, int | float):
        etas, scalar = [float(eta)], True
    else:
        etas, scalar = [float(e) for e in eta], False
        if not etas:
            raise ArgumentError("eta is an empty sequence: pass a float or a non-empty list of floats")
    for e in etas:
        if not math.isfinite(e):
            raise ArgumentError(f"eta must be finite, got {e!r}")
    return etas, scalar


def check_options(entropy_mode: str, dir_chunk: int) -> None:
    """Validate the options shared by the ΔH estimators."""
    check_choice("entropy_mode", entropy_mode, ENTROPY_MODES)
    if int(dir_chunk) < 1:
        raise ArgumentError(f"dir_chunk must be >= 1, got {dir_chunk!r}")


def validate_dirs(
    lm: FunctionalLM, params: Mapping[str, Tensor], dirs: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Check a stacked direction tree against the parameters and cast it to their dtype/device."""
    if not dirs:
        raise BatchError("dirs is empty: pass a dict of stacked tensors [K, *param_shape]")
    lm.check_names(dirs, what="dirs", stacked=True)
    _trees.n_stacked(dirs)
    return {n: d.to(dtype=params[n].dtype, device=params[n].device) for n, d in dirs.items()}


def base_stats(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    policy: SamplingPolicy,
    tf_batch_size: int = 16,
    head_chunk: int | None = None,
    share_prompts: str = "auto",
) -> SequenceStats:
    """θ-side statistics (:func:`deltaH.stats.sequence_stats`), checked: every sequence must have
    finite ``log q`` under θ.

    Under top-p they include every scored position's nucleus key (``nucleus_key``), so that
    :func:`~deltaH.estimators.true.delta_h_true_multi` can count the positions whose nucleus a step moves.
    """
    st = sequence_stats(lm, params, batch, policy=policy, tf_batch_size=tf_batch_size,
                        head_chunk=head_chunk, nucleus_keys=True, share_prompts=share_prompts)
    bad = ~torch.isfinite(st.logq)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise BatchError(
            f"evaluation sequences {rows} have log q = -inf under θ: they contain tokens outside the "
            f"nucleus of {policy}, so they were not sampled from this policy (check temperature/top_p)"
        )
    return st
