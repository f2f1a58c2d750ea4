"""From an update batch U and the optimizer state to ΔH directions (docs/math.md#directions-and-eta).

One call: loss coefficients (exactly the trainer's normalisation) → per-sequence gradients
``g_i = coef_i · ∇S_i`` (``vmap(grad)``) → the AdamW step decomposed with ``D`` at its full-batch
value → directions per unit learning rate (``u = Δθ/lr``), so ``η = lr`` reproduces the real step::

    full      u   = Δθ / lr                       (the real AdamW update)
    baseline  b̂   = (−lr·λ·θ − lr·β1·m/D) / lr    (momentum + weight decay)
    grad      Σĉ  = Σ_i c_i / lr                  (this batch's gradient part)
    components ĉ_i = −(1−β1)·clip·g_i / D          [M, ...]    (one per update sequence)
    precond   P   = (1−β1) / D                     (AdamW preconditioner, docs/math.md#fisher-kernel)

``b̂ + Σĉ = u`` to float tolerance.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH import _dist
from deltaH._choices import DECOMPOSITIONS as DECOMPOSITIONS
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, BatchError, CheckpointError
from deltaH.functional import FunctionalLM
from deltaH.updates.adamw import AdamWState, adamw_decompose, unit_lr
from deltaH.updates.grads import sequence_logprob_grads
from deltaH.updates.losses import loss_coefficients


@dataclass(frozen=True)
class UpdateDirections:
    """Directions per unit learning rate (module docstring); trees keyed by parameter name."""

    full: dict[str, Tensor]
    baseline: dict[str, Tensor]
    grad: dict[str, Tensor]
    components: dict[str, Tensor]
    coef: Tensor
    precond: dict[str, Tensor]
    lr: dict[str, float]
    lr_ref: float
    clip_coef: float
    grad_norm: float

    def stacked(self) -> dict[str, Tensor]:
        """The four decompositions of :data:`DECOMPOSITIONS` stacked ``[4, ...]`` for ΔH calls."""
        return {
            n: torch.stack([self.full[n], self.baseline[n], self.grad[n], self.baseline[n] + self.grad[n]])
            for n in self.full
        }


def update_directions(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    adv: Tensor,
    state: AdamWState,
    *,
    loss_type: str = "dapo",
    temperature: float = 1.0,
    grad_accum_steps: int = 1,
    max_completion_length: int | None = None,
    max_grad_norm: float | None = None,
    seq_chunk: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
    rows: slice | None = None,
) -> UpdateDirections:
    """Directions of the AdamW step on ``batch`` (U, ``M`` sequences, advantages ``adv [M]``).

    ``on_progress(done, total)``, if given, is called as the per-sequence gradients finish
    (sequences done out of ``M``), for a progress bar at the edge.

    ``rows`` (a distributed run, ``torch.distributed`` initialised): this rank computes the
    per-sequence gradients of rows ``rows`` of ``batch`` only (the loss coefficients still come from
    the whole batch); the ranks' rows, contiguous and in rank order, are gathered so every rank
    returns the full result. A shard starting on a multiple of ``seq_chunk`` makes the same
    ``vmap`` calls as one process: the result is bit-identical to it.
    """
    lm.check_names(params)
    missing = [n for n in params if n not in state.names]
    if missing:
        raise CheckpointError(
            f"optimizer state has no entry for trainable parameter '{missing[0]}' ({len(missing)} missing): "
            "the state does not belong to this model (or its trainable set differs)"
        )
    if adv.shape != (len(batch),):
        raise BatchError(
            f"advantages must have shape [{len(batch)}] (one per update sequence), got {tuple(adv.shape)}"
        )
    coef = loss_coefficients(
        batch.n_tokens,
        adv,
        loss_type=loss_type,
        grad_accum_steps=grad_accum_steps,
        max_completion_length=max_completion_length,
    )
    names = list(params)
    mine = batch if rows is None else batch.select(rows)
    if len(mine):
        g_seq, _ = sequence_logprob_grads(
            lm, params, mine, temperature=temperature, names=names, seq_chunk=seq_chunk,
            on_progress=on_progress,
        )
    else:  # more ranks than update sequences: this one holds none
        g_seq = {n: params[n].new_zeros((0, *params[n].shape)) for n in names}
    c = coef if rows is None else coef[rows]
    # in place: g_seq is ours, and [M, *shape] per name is the largest thing this builds (M·|θ|)
    per_seq = {n: g.mul_(c.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))) for n, g in g_seq.items()}
    del g_seq
    if rows is not None:
        per_seq = {n: _dist.all_cat(g, 0) for n, g in per_seq.items()}
        got = next(iter(per_seq.values())).shape[0]
        if got != len(batch):
            raise ArgumentError(
                f"rows {rows} of {len(batch)} update sequences gathered to {got} rows: pass rows only in a "
                "distributed run, each rank its own contiguous shard, in rank order"
            )
    return directions_from_grads(params, per_seq, state, coef=coef, max_grad_norm=max_grad_norm)


def reference_lr(lrs: Mapping[str, float]) -> float:
    """The lr most parameters step with (``lrs``: per parameter name): ``UpdateDirections.lr_ref``."""
    return Counter(lrs.values()).most_common(1)[0][0]


def directions_from_grads(
    params: Mapping[str, Tensor],
    per_seq: Mapping[str, Tensor],
    state: AdamWState,
    *,
    coef: Tensor,
    max_grad_norm: float | None = None,
) -> UpdateDirections:
    """The AdamW step of the per-sequence loss gradients ``per_seq`` (``[M, *s]`` per name, the
    gradient of sequence ``i``'s share of the loss) as directions per unit lr.

    A parameter whose group has ``lr = 0`` (the last step of a linear schedule) still has a
    direction per unit lr, ``−λθ − m′/D``: it is computed directly (the step with lr 1), since the
    real step is zero and cannot be divided by its lr. ``lr_ref`` is then 0 and the caller picks η.
    """
    zero = {n for n in per_seq if state.hyper[n].lr == 0.0}
    st = state
    if zero:  # D does not depend on lr: the step with lr = 1 is the direction per unit lr
        hyper = {n: (h._replace(lr=1.0) if n in zero else h) for n, h in state.hyper.items()}
        st = dataclasses.replace(state, hyper=hyper)
    dec = adamw_decompose(params, per_seq, st, max_grad_norm=max_grad_norm)
    full = unit_lr(dec.full, st)  # also checks every lr (the same names as the components)
    comps = {n: c.div_(st.hyper[n].lr) for n, c in dec.components.items()}  # in place: no second M·|θ|
    grad_sum = {n: c.sum(0) for n, c in comps.items()}
    lrs = {n: float(state.hyper[n].lr) for n in dec.full}
    lr_ref = reference_lr(lrs)
    return UpdateDirections(
        full=full,
        baseline=unit_lr(dec.baseline, st),
        grad=grad_sum,
        components=comps,
        coef=coef,
        precond={n: (1 - state.hyper[n].betas[0]) / d for n, d in dec.denom.items()},
        lr=lrs,
        lr_ref=lr_ref,
        clip_coef=float(dec.clip_coef),
        grad_norm=float(dec.grad_norm),
    )
