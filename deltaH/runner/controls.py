"""The ``controls`` stage: the entropy-bonus coefficient (and, for a replayed step with a KL term, the
KL coefficient) that puts δH₁ of the step at ``analyses.entropy_target``, and ΔH measured there
(docs/math.md#controls; the algebra is :mod:`deltaH.controls`, the bonus :mod:`deltaH.updates.entropy_bonus`).

For each control, four directions are measured at ``η_ref`` (true ΔH by SNIS, δH₁ with its jackknife
SE, and the second-order term ``½η²·d²ΔH/dη²`` of the controlled step):

    step        the step analysed (entropy_coef 0; the recorded β)
    term        the term's own direction at the coefficient found (c*·ĉ_H; (β*/β)·grad_kl)
    controlled  the step with the coefficient set, D and clipping held at this step's values
    trainer     the AdamW step a trainer with that coefficient takes: D and clipping recomputed
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH.config import Config
from deltaH.controls import Control, control_coefficient
from deltaH.estimators.first_order import FirstOrder, delta_h_first_order
from deltaH.estimators.true import delta_h_true_multi
from deltaH.runner.stages import Batches, Directions, Inputs
from deltaH.stats import SequenceStats
from deltaH.updates.directions import directions_from_grads
from deltaH.updates.entropy_bonus import (
    bonus_direction,
    bonus_token_weights,
    entropy_bonus_grad,
    gradient_sum,
    micro_batch_labels,
)

log = logging.getLogger(__name__)
MEASURED = ("step", "term", "controlled", "trainer")


@dataclass(frozen=True)
class ControlOutcome:
    """One control: ``name`` (``entropy_coef`` or ``beta``), the coefficient in the step analysed
    (``current``), the :class:`~deltaH.controls.Control` found, and per direction of :data:`MEASURED`
    ``[4]``: true ΔH (per sequence and per token), ESS, k̂, δH₁ with its SE, and ``second_order``
    (NaN but for ``controlled``); all at η_ref. NaN throughout when ``c*`` is not finite."""

    name: str
    current: float
    control: Control
    delta_h: Tensor
    delta_h_per_token: Tensor
    ess: Tensor
    khat: Tensor
    delta_h1: Tensor
    delta_h1_se: Tensor
    second_order: Tensor


@dataclass(frozen=True)
class ControlsRun:
    """The stage's output: the target, η_ref, ``entropy_u`` (``H_U``, the bonus's entropy at θ, nats per
    token), this step's clipping factor, the controls found and notes for the reader."""

    target: float
    eta: float
    entropy_u: float
    clip_coef: float
    outcomes: list[ControlOutcome]
    notes: list[str]


def _micro_batches(inp: Inputs, bt: Batches, cfg: Config) -> tuple[Tensor, int, int]:
    """Per update row its (rank, micro-batch) label, the accumulation steps and the world size."""
    n_u = len(bt.update.batch)
    if inp.source.kind == "sampled":
        acc = cfg.loss.grad_accum_steps
        return torch.arange(n_u) // (n_u // acc), acc, 1
    assert inp.source.recorded is not None
    sizes = []
    for rec in inp.source.recorded:  # rows with a loss token, ranks then micro-batches (the replay's order)
        for mb in rec.micro_batches:
            cm = mb["completion_mask"].bool()
            if mb.get("tool_mask") is not None:
                cm = cm & mb["tool_mask"].bool()
            sizes.append(int(cm.any(1).sum()))
    labels = micro_batch_labels(sizes)
    if labels.numel() != n_u:
        raise AssertionError("the recorded micro-batches and the update batch disagree")  # a bug, not input
    o = inp.source.recorded[0].options
    return labels, len(inp.source.recorded[0].micro_batches), o.world_size


def _scaled(tree: Mapping[str, Tensor], c: float, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: (c * tree[n].double()).to(like[n].dtype) for n in like}


def _measure(
    cfg: Config, inp: Inputs, bt: Batches, base: SequenceStats, dirs: list[dict[str, Tensor]], eta: float
) -> dict[str, Tensor]:
    """True ΔH and δH₁ (± SE) at ``eta`` along ``dirs`` (per unit lr), and the second-order term of
    ``dirs[2]``."""
    stacked = {n: torch.stack([d[n] for d in dirs]) for n in inp.params}
    res = delta_h_true_multi(inp.params, stacked, bt.eval.batch, eta=eta, base=base, **inp.kw(cfg))
    fo = delta_h_first_order(inp.params, stacked, bt.eval.batch, eta=eta, mode="forward", base=base,
                             **inp.kw(cfg))
    ctl = {n: t[2:3] for n, t in stacked.items()}
    so = delta_h_first_order(inp.params, ctl, bt.eval.batch, eta=eta, mode="forward", base=base,
                             second_order=True, **inp.kw(cfg)).second_order
    second = torch.full((len(dirs),), math.nan, dtype=torch.float64)
    assert so is not None
    second[2] = float(so[0])
    se = fo.stderr if fo.stderr is not None else torch.full((len(dirs),), math.nan)
    return {
        "delta_h": res.delta_h.double().cpu(),
        "delta_h_per_token": res.delta_h_per_token.double().cpu(),
        "ess": res.ess.double().cpu(),
        "khat": res.khat.double().cpu(),
        "delta_h1": fo.delta_h.double().cpu(),
        "delta_h1_se": se.double().cpu(),
        "second_order": second,
    }


def _outcome(name: str, current: float, ctl: Control, measured: dict[str, Tensor] | None) -> ControlOutcome:
    nan = torch.full((len(MEASURED),), math.nan, dtype=torch.float64)
    m = measured or {}
    keys = ("delta_h", "delta_h_per_token", "ess", "khat", "delta_h1", "delta_h1_se", "second_order")
    return ControlOutcome(name, current, ctl, *(m.get(k, nan) for k in keys))


def controls(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats, fo: FirstOrder
) -> ControlsRun:
    """The controls of this step (module docstring); ``fo``: the first-order stage (slopes and
    leave-one-out slopes of the four decompositions, ``η = 1``)."""
    a = cfg.analyses
    ud, eta, state = dr.update, dr.eta_ref, inp.ckpt.optimizer_state
    rec = inp.source.recorded[0].options if inp.source.recorded else None
    tau = cfg.policy.temperature if rec is None else rec.temperature
    mgn = cfg.checkpoint.max_grad_norm if rec is None else (
        rec.max_grad_norm if rec.max_grad_norm is not None and rec.max_grad_norm > 0 else None)
    notes: list[str] = []
    if ud.clip_coef < 1.0:
        notes.append(f"gradient clipping is active in this step (factor {ud.clip_coef:.3g}): a trainer with "
                     "the coefficient set clips its own total gradient, so its step differs from the "
                     "controlled one by more than D's change (compare 'trainer' with 'controlled')")
    t = min(int(state.step[n]) for n in inp.params) + 1
    if t <= 10:
        notes.append(f"this is the optimizer's step {t}: Adam's second moment v holds {t - 1} earlier "
                     f"gradients, so this step's makes up about 1/{t} of it and D moves with the coefficient "
                     "(compare 'trainer' with 'controlled')")
    assert fo.loo is not None, "the first-order stage runs in forward mode (leave-one-out slopes)"
    s_full, loo_full = float(fo.slope[0]), fo.loo[0].double().cpu()
    g_step = gradient_sum(ud.grad, ud, state)
    one = torch.ones(1, dtype=torch.float64)

    def trainer_step(g: Mapping[str, Tensor]) -> dict[str, Tensor]:
        per_seq = {n: g[n].to(inp.params[n].dtype).unsqueeze(0) for n in inp.params}
        return directions_from_grads(inp.params, per_seq, state, coef=one, max_grad_norm=mgn).full

    outcomes: list[ControlOutcome] = []
    entropy_u = math.nan
    if rec is not None and rec.top_entropy_quantile < 1.0:
        notes.append("the entropy bonus is not evaluated: the recorded step keeps only its top "
                     f"{rec.top_entropy_quantile:g} entropy quantile of tokens (top_entropy_quantile), whose "
                     "bonus mask deltaH does not rebuild")
    else:
        labels, acc, world = _micro_batches(inp, bt, cfg)
        w = bonus_token_weights(bt.update.batch.n_tokens, labels, acc, world)
        grad_h, entropy_u = entropy_bonus_grad(inp.lm, inp.params, bt.update.batch, w, temperature=tau,
                                               seq_chunk=cfg.compute.seq_chunk)
        d_h = bonus_direction(grad_h, ud, state)
        fo_h = delta_h_first_order(inp.params, {n: t.unsqueeze(0) for n, t in d_h.items()}, bt.eval.batch,
                                   eta=1.0, mode="forward", base=base, **inp.kw(cfg))
        assert fo_h.loo is not None
        ctl = control_coefficient(s_full, float(fo_h.slope[0]), loo_full, fo_h.loo[0].double().cpu(), eta=eta,
                                  target=a.entropy_target)
        measured = None
        if math.isfinite(ctl.coef):
            c = ctl.coef
            g_c = {n: g_step[n] - c * grad_h[n].to(g_step[n].device) for n in g_step}
            dirs = [ud.full, _scaled(d_h, c, ud.full),
                    {n: ud.full[n] + _scaled(d_h, c, ud.full)[n] for n in ud.full}, trainer_step(g_c)]
            measured = _measure(cfg, inp, bt, base, dirs, eta)
        else:
            notes.append("the entropy bonus does not move δH₁ of E (its slope is 0): no coefficient reaches "
                         "the target")
        outcomes.append(_outcome("entropy_coef", 0.0, ctl, measured))
    if dr.replay is not None and dr.replay.grad_kl is not None:
        beta = float(dr.replay.options.get("beta") or 0.0)
        kl = dr.replay.grad_kl
        fo_k = delta_h_first_order(inp.params, {n: t.unsqueeze(0) for n, t in kl.items()}, bt.eval.batch,
                                   eta=1.0, mode="forward", base=base, **inp.kw(cfg))
        assert fo_k.loo is not None
        s_kl, loo_kl = float(fo_k.slope[0]), fo_k.loo[0].double().cpu()
        ctl = control_coefficient(s_full - s_kl, s_kl / beta, loo_full - loo_kl, loo_kl / beta, eta=eta,
                                  target=a.entropy_target)
        measured = None
        if math.isfinite(ctl.coef):
            r = ctl.coef / beta
            g_kl = gradient_sum(kl, ud, state)
            g_b = {n: g_step[n] + (r - 1.0) * g_kl[n] for n in g_step}
            dirs = [ud.full, _scaled(kl, r, ud.full),
                    {n: ud.full[n] + _scaled(kl, r - 1.0, ud.full)[n] for n in ud.full}, trainer_step(g_b)]
            measured = _measure(cfg, inp, bt, base, dirs, eta)
        outcomes.append(_outcome("beta", beta, ctl, measured))
    return ControlsRun(float(a.entropy_target), eta, entropy_u, ud.clip_coef, outcomes, notes)
