"""An experiment plan from a config to a results folder (the edge: I/O, logging, progress bars).

Per checkpoint, in stages (:mod:`deltaH.runner.stages`): load → E and U batches → θ-side
statistics → update directions (full, baseline, grad, per-sequence components) → δH₁ slopes →
η grid (auto: the trustworthy range) → true ΔH sweep of each decomposition → second order →
influence matrices at the reference η → Fisher kernel → covariance proxy → summary.json, arrays,
batches, plots, report.md. Several checkpoints run as one study (one sub-folder each, plus a
trajectory plot). Every stage's output is cached in the run folder, keyed by the config slice it
reads, so ``resume`` recomputes only the unfinished stages.
"""

from deltaH.runner.orchestrate import analyse_checkpoint as analyse_checkpoint
from deltaH.runner.orchestrate import resolve_checkpoints as resolve_checkpoints
from deltaH.runner.orchestrate import run as run

__all__ = ["analyse_checkpoint", "resolve_checkpoints", "run"]
