"""Controls a user can set: the coefficient that puts the first-order entropy change at a target
(docs/math.md#controls). Pure functions of slopes; no model, no I/O.

δH₁ is linear in the direction. A loss term with coefficient ``c`` (the entropy bonus ``−c·H_U``,
or ``β·KL``) adds ``c·d`` to the step's direction per unit lr when ``D`` and the clipping factor
are held at this step's values, so at the reference step ``η``::

    δH₁(c) = η · (s_0 + c · s_d)          s_0: slope of the step without the term, s_d: of d
    c*     = (target/η − s_0) / s_d       δH₁(c*) = target exactly

Its standard error is the jackknife over the evaluation sequences: with the leave-one-out slopes
``s_0(n), s_d(n)`` (:class:`deltaH.estimators.first_order.FirstOrder` ``loo``)::

    c*(n) = (target/η − s_0(n)) / s_d(n),     se² = (N − 1)/N · Σ_n (c*(n) − mean c*)²

It is a first-order answer: valid while ΔH is linear in the step (the η sweep's trust range), and
for the step with ``D`` and clipping frozen; the runner measures ΔH at ``c*`` beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Control", "control_coefficient", "jackknife_se"]


@dataclass(frozen=True)
class Control:
    """``coef`` (``c*``), its jackknife ``se``, the leave-one-out ``loo [N]``, the slopes ``s_0``
    (``slope_base``) and ``s_d`` (``slope_dir``) with their jackknife standard errors, ``eta`` and
    the ``target``."""

    coef: float
    se: float
    loo: Tensor
    slope_base: float
    slope_base_se: float
    slope_dir: float
    slope_dir_se: float
    eta: float
    target: float


def jackknife_se(loo: Tensor) -> float:
    """``sqrt((N − 1)/N · Σ_n (loo_n − mean)²)`` of leave-one-out values ``[N]`` (NaN if one is not
    finite)."""
    x = loo.double().flatten()
    n = x.numel()
    if n < 2 or not bool(torch.isfinite(x).all()):
        return math.nan
    return float(((n - 1) / n * ((x - x.mean()) ** 2).sum()).sqrt())


def control_coefficient(
    slope_base: float, slope_dir: float, loo_base: Tensor, loo_dir: Tensor, *, eta: float, target: float
) -> Control:
    """``c*`` with ``δH₁(c*) = target`` at step ``eta`` (module docstring); ``loo_* [N]`` are the
    leave-one-out slopes. ``s_d = 0`` (the term does not move the entropy to first order) gives NaN."""
    aim = float(target) / float(eta)
    with torch.no_grad():
        loo_c = (aim - loo_base.double()) / loo_dir.double()
    coef = (aim - float(slope_base)) / float(slope_dir) if slope_dir != 0 else math.nan
    return Control(
        coef=coef,
        se=jackknife_se(loo_c),
        loo=loo_c,
        slope_base=float(slope_base),
        slope_base_se=jackknife_se(loo_base),
        slope_dir=float(slope_dir),
        slope_dir_se=jackknife_se(loo_dir),
        eta=float(eta),
        target=float(target),
    )
