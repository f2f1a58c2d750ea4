"""The stages of one run, each a function of the config and earlier stages' outputs.

load inputs → batches → θ-side statistics → directions → first order (η = 1 slopes) → η grid →
true sweep → second order → influence → attribution → kernel → proxy → token diagnostics. Every stage but
the first returns a frozen dataclass that :mod:`deltaH.runner.cache` can store, so a resumed run
reloads finished stages instead of recomputing them. In a distributed run each rank passes its shard
of E (and of U's per-sequence gradients) to the estimators and every stage returns the global value,
per-sequence arrays gathered in row order (:mod:`deltaH.runner.shard`). The orchestrator is
:func:`deltaH.runner.orchestrate.analyse_checkpoint`; the summary is built in :mod:`deltaH.runner.summary`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from deltaH.analysis import Trust, auto_grid, rounding_noise, trust_range
from deltaH.attribution import Attribution, Contributions, UpdateTags, attribute, tags_from_batch
from deltaH.config import Config
from deltaH.errors import ConfigError
from deltaH.estimators.first_order import FirstOrder, delta_h_first_order
from deltaH.estimators.influence import CovarianceProxy, Influence, covariance_proxy, influence_matrix
from deltaH.estimators.kernel import ProjectedKernel, fisher_kernel, projected_kernel
from deltaH.estimators.true import TrueDeltaH, base_stats, delta_h_true_multi
from deltaH.functional import FunctionalLM
from deltaH.io.progress import progress_bar
from deltaH.policy import SamplingPolicy
from deltaH.runner import shard
from deltaH.runner.calibrate import DirChunk, calibrate_dir_chunk
from deltaH.runner.recorded import UpdateSource, recorded_update_batch
from deltaH.sampling.builders import EvalBatch, UpdateBatch
from deltaH.stats import SequenceStats, TokenDiagnostics, token_diagnostics
from deltaH.updates.directions import DECOMPOSITIONS, UpdateDirections, update_directions

log = logging.getLogger(__name__)
PROBE_DECADES = (-6, -5, -4, -3, -2, -1, 0, 1, 2)
SWEEP_FIELDS = (
    "delta_h",
    "delta_h_per_token",
    "ess",
    "khat",
    "logw_max",
    "logw_min",
    "retained_mass",
    "nucleus_changed",
)


@dataclass(frozen=True)
class Seeds:
    """Every random draw's seed, derived from ``config.seed``."""

    seed: int
    eval: int
    update: int
    kernel: int

    @classmethod
    def of(cls, seed: int) -> Seeds:
        return cls(seed=seed, eval=seed * 1000 + 1, update=seed * 1000 + 2, kernel=seed * 1000 + 3)


@dataclass(frozen=True)
class Inputs:
    """What the checkpoint, data and config provide (loaded every time; never cached)."""

    ckpt: Any
    lm: FunctionalLM
    params: dict[str, Tensor]
    tokenizer: Any
    records: list[Any]
    reward_fn: Callable[..., Any]
    policy: SamplingPolicy
    seeds: Seeds
    quiet: bool
    source: UpdateSource = UpdateSource("sampled", None, None, None, "update_batch.source is sample", None)
    #: the ``dir_chunk`` stage's choice (``compute.dir_chunk: auto`` calibrated); None: not yet run
    dir_chunk: int | None = None
    #: the half-precision dtype the checkpoint was saved in when ``checkpoint.dtype: auto`` computes it
    #: in float32 ("" otherwise), and whether its trainable parameters were in that dtype too
    upcast_from: str = ""
    upcast_trainable: bool = False

    @property
    def compute_dtype(self) -> str:
        """The dtype the logits are computed in (peft keeps adapters in float32 in a bf16 model)."""
        return str(self.lm.compute_dtype).removeprefix("torch.")

    def kw(self, cfg: Config) -> dict[str, Any]:
        """Keyword arguments shared by the ΔH estimators. ``dir_chunk`` is the calibrated one once the
        ``dir_chunk`` stage has run; before that, ``auto`` is 1 (the plain loop)."""
        chunk = cfg.compute.dir_chunk
        if self.dir_chunk is not None:
            chunk = self.dir_chunk
        elif chunk == "auto":
            chunk = 1
        return {
            "lm": self.lm,
            "policy": self.policy,
            "tf_batch_size": cfg.compute.tf_batch_size,
            "head_chunk": cfg.compute.head_chunk,
            "dir_chunk": chunk,
            "entropy_mode": cfg.analyses.entropy_mode,
            "share_prompts": cfg.compute.share_prompts,
        }


@dataclass(frozen=True)
class Batches:
    """E and U as drawn from ``q`` (with provenance)."""

    eval: EvalBatch
    update: UpdateBatch

    def to(self, device: torch.device) -> Batches:
        """E's and U's token tensors on ``device`` (a cached or broadcast batch arrives on the CPU)."""
        return Batches(
            dataclasses.replace(self.eval, batch=self.eval.batch.to(device)),
            dataclasses.replace(self.update, batch=self.update.batch.to(device)),
        )

    @property
    def n_resampled(self) -> int:
        return int((self.update.resampled > 0).sum())

    @property
    def warnings(self) -> list[str]:
        n = self.n_resampled
        if not n:
            return []
        return [
            f"{n} update group(s) had equal rewards and were re-sampled (U is conditioned on "
            "non-degenerate groups, unlike the trainer)"
        ]


#: Where η_ref comes from (:func:`eta_reference`): a number in ``eta.reference``, the checkpoint's
#: next-step lr, or the lr of the step that produced the checkpoint (its trainer_state.json log).
ETA_SOURCES = ("config", "checkpoint_lr", "logged_lr")


def eta_reference(
    reference: str | float, lr: float, logged_lr: float | None, where: str
) -> tuple[float, str]:
    """η_ref and its source (one of :data:`ETA_SOURCES`) for ``eta.reference = reference``.

    A number is used as given. ``"lr"`` is the checkpoint's next-step ``lr`` when it is positive; at
    the end of a linear schedule that lr is 0 (the next step changes nothing), and η_ref is then the
    last positive lr of the run, ``logged_lr`` (the ``learning_rate`` of the last ``log_history`` entry
    of the checkpoint's ``trainer_state.json``: the step that produced it). Without one it is a
    ``ConfigError`` naming ``eta.reference`` (``where`` names the checkpoint).
    """
    if reference != "lr":
        return float(reference), "config"
    if lr > 0:
        return lr, "checkpoint_lr"
    if logged_lr is not None and logged_lr > 0:
        return logged_lr, "logged_lr"
    raise ConfigError(
        f"config key 'eta.reference': 'lr' is the next-step learning rate, but checkpoint {where} has lr = "
        f"{lr:g} (the end of its schedule) and its trainer_state.json logs no positive learning_rate; set "
        "eta.reference to a number, e.g. --set eta.reference=1e-5 (the training run's lr)",
        "eta.reference",
    )


@dataclass(frozen=True)
class ReplayInfo:
    """What the replay of a recorded step adds to its directions: the gradient part split into the
    policy-gradient and β·KL terms (per unit lr; ``grad_kl`` None without KL), the ratio-clipping
    statistics, the per-token loss weights ``[N_U, T]`` and the trainer's options."""

    grad_pg: dict[str, Tensor]
    grad_kl: dict[str, Tensor] | None
    clip: dict[str, float]
    token_weights: Tensor
    options: dict[str, Any]
    step: int | None


@dataclass(frozen=True)
class Directions:
    """The AdamW step on U per unit lr, and the reference step size ``eta_ref`` (from ``eta_source``,
    one of :data:`ETA_SOURCES`)."""

    update: UpdateDirections
    eta_ref: float
    fresh: bool = False
    eta_source: str = "checkpoint_lr"
    replay: ReplayInfo | None = None

    @functools.cached_property
    def stacked(self) -> dict[str, Tensor]:
        """The four decompositions ``[4, ...]``, stacked once and shared by every stage that sweeps them."""
        return self.update.stacked()

    @property
    def eta_warning(self) -> str | None:
        """Why η_ref is not the checkpoint's next-step lr (``None`` when it is)."""
        lr = self.update.lr_ref
        if self.eta_source == "logged_lr":
            return (
                f"the checkpoint's next-step lr is {lr:g} (the end of its schedule): η_ref = "
                f"{self.eta_ref:g} is the lr of the step that produced it (its trainer_state.json log), so "
                "ΔH at η_ref is a step of that size along the next step's direction, not the trainer's next "
                "step"
            )
        if self.eta_source == "config" and not math.isclose(self.eta_ref, lr, rel_tol=1e-9):
            return (
                f"η_ref = {self.eta_ref:g} is eta.reference, not the checkpoint's next-step lr ({lr:g}): "
                "ΔH at η_ref is not the size of the trainer's next step"
            )
        return None

    @property
    def warnings(self) -> list[str]:
        out = [] if self.eta_warning is None else [self.eta_warning]
        if self.fresh:
            out.append(
                "checkpoint.optimizer is fresh: the step is the first one of a new AdamW (betas 0.9, "
                "0.999, eps 1e-8, no weight decay), not the step the trainer's saved optimizer would take"
            )
        if len(set(self.update.lr.values())) > 1:
            out.append(
                "parameter groups have different learning rates: directions are per unit of each "
                f"group's lr and η_ref = {self.eta_ref:g} reproduces the real step only for that group"
            )
        return out


@dataclass(frozen=True)
class EtaGrid:
    """The η values of the sweep; ``probe`` is the auto grid's probe (None for a given grid)."""

    etas: list[float]
    probe: Trust | None
    warnings: list[str]


@dataclass(frozen=True)
class Sweep:
    """True ΔH over the grid for the four decompositions: each field of :data:`SWEEP_FIELDS`
    ``[n_eta, 4]``, ``per_sequence_full [n_eta, N_E]``, the θ-side entropies and, at η_ref,
    ``loo_ref [4, N_E]``: each decomposition's ΔH with evaluation sequence n left out."""

    fields: dict[str, Tensor]
    per_sequence_full: Tensor
    h_orig: float
    h_orig_per_token: float
    khat_threshold: float
    loo_ref: Tensor | None = None


@dataclass(frozen=True)
class Realised:
    """The step that really happened, ``θ_N − θ_{N−1}`` (checkpoint ``N`` minus this one), measured
    on E beside the step deltaH rebuilt, and a replayed step's policy-gradient and KL parts.

    ``names[k]`` (``realised``, ``replayed`` or ``sampled``, ``policy_gradient``, ``kl``: those that
    apply) was taken as the direction ``η·d`` with ``η = eta[k]`` (1 for the realised step; the
    step's lr for the others). Every field is ``[K]``: true ΔH (SNIS) and its diagnostics, and δH₁
    with its standard error. ``step_error``: ``‖lr·full − (θ_N − θ_{N−1})‖ / ‖θ_N − θ_{N−1}‖``
    (float rounding for an exact replay; large for a sampled U, which is not the trainer's batch).
    """

    names: list[str]
    eta: list[float]
    delta_h: Tensor
    delta_h_per_token: Tensor
    ess: Tensor
    khat: Tensor
    retained_mass: Tensor
    first_order: Tensor
    first_order_se: Tensor
    step_error: float | None
    realised_norm: float
    next_checkpoint: str | None


@dataclass(frozen=True)
class InfluencePair:
    """True and first-order influence matrices at ``eta_ref``."""

    true: Influence
    first_order: Influence


@dataclass(frozen=True)
class Attributed:
    """The update batch's tags and the attribution of ΔH at ``eta_ref`` to them."""

    tags: UpdateTags
    result: Attribution
    eta: float


def ref_index(etas: list[float], eta_ref: float) -> int:
    """Index of the grid point closest (in log η) to ``eta_ref``."""
    return int(np.argmin([abs(math.log(e) - math.log(eta_ref)) for e in etas]))


def eos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's EOS id(s) as a list (empty when it has none)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


# -- stages ---------------------------------------------------------------------------------------
def build_batches(cfg: Config, inp: Inputs) -> Batches:
    """U (sampled, or the recorded step's), then E; with ``eval_batch.include_update_prompts`` E also
    gets responses to U's prompts (drawn after its own rows, which stay as they are without them)."""
    from deltaH.sampling.builders import build_eval_batch, build_update_batch

    log.info("sampling the evaluation and update batches")
    common: dict[str, Any] = {"policy": inp.policy, "max_new_tokens": cfg.policy.max_new_tokens}
    if inp.source.kind != "sampled":
        assert inp.source.recorded is not None
        log.info("update batch: %s", inp.source.reason)
        up = recorded_update_batch(inp.source.recorded, inp.tokenizer, inp.policy, inp.source.kind)
    else:
        up = build_update_batch(
            inp.lm,
            inp.params,
            inp.records,
            inp.tokenizer,
            inp.reward_fn,
            **common,
            n_prompts=cfg.update_batch.n_prompts,
            group_size=cfg.update_batch.group_size,
            seed=inp.seeds.update,
            scale_rewards=cfg.update_batch.scale_rewards,  # type: ignore[arg-type]
            max_resample_attempts=cfg.update_batch.max_resample_attempts,
        )
    ev = build_eval_batch(
        inp.lm,
        inp.params,
        inp.records,
        inp.tokenizer,
        **common,
        total_sequences=cfg.eval_batch.total_sequences,
        group_size=cfg.eval_batch.group_size,
        seed=inp.seeds.eval,
        prompts=cfg.eval_batch.prompts,
        update_prompts_of=up if cfg.eval_batch.include_update_prompts else None,
    )
    return Batches(ev, up)


def theta_stats(cfg: Config, inp: Inputs, bt: Batches) -> SequenceStats:
    ev = shard.eval_shard(cfg, bt.eval.batch)
    with torch.no_grad():
        st = base_stats(
            inp.lm, inp.params, ev.batch, inp.policy, cfg.compute.tf_batch_size, cfg.compute.head_chunk,
            cfg.compute.share_prompts,
        )
    return shard.gather_stats(st)


def directions(cfg: Config, inp: Inputs, bt: Batches) -> Directions:
    if inp.source.kind != "sampled":
        return replayed_directions(cfg, inp, bt)
    ud = update_directions(
        inp.lm,
        inp.params,
        bt.update.batch,
        bt.update.advantages.double(),
        inp.ckpt.optimizer_state,
        loss_type=cfg.loss.type,
        temperature=cfg.policy.temperature,
        grad_accum_steps=cfg.loss.grad_accum_steps,
        max_completion_length=cfg.loss.max_completion_length or cfg.policy.max_new_tokens,
        max_grad_norm=cfg.checkpoint.max_grad_norm,
        seq_chunk=cfg.compute.seq_chunk,
        on_progress=progress_bar("per-sequence gradients of U", inp.quiet, "seq"),
        rows=shard.update_rows(cfg, len(bt.update.batch)),
    )
    eta_ref, source = eta_reference(cfg.eta.reference, ud.lr_ref, inp.ckpt.logged_lr, str(inp.ckpt.path))
    dr = Directions(ud, eta_ref, fresh=cfg.checkpoint.optimizer == "fresh", eta_source=source)
    if dr.eta_warning is not None:
        log.warning("%s", dr.eta_warning)
    return dr


def replayed_directions(cfg: Config, inp: Inputs, bt: Batches) -> Directions:
    """The recorded step's directions: the gradient of the trainer's own objective
    (:func:`deltaH.updates.replay.replay_directions`), rows in the order of ``bt.update``."""
    from deltaH.updates.replay import replay_directions

    assert inp.source.recorded is not None
    rep = replay_directions(
        inp.lm,
        inp.params,
        inp.source.recorded,
        inp.ckpt.optimizer_state,
        seq_chunk=cfg.compute.seq_chunk,
        on_progress=progress_bar("per-sequence gradients of the recorded U", inp.quiet, "seq"),
        share_prompts=cfg.compute.share_prompts,
    )
    if not torch.equal(rep.batch.input_ids.cpu(), bt.update.batch.input_ids.cpu()):
        raise AssertionError("the replayed rows and the recorded update batch disagree")  # a bug, not input
    ud = rep.update
    info = ReplayInfo(
        grad_pg=rep.grad_pg,
        grad_kl=rep.grad_kl,
        clip={**{k: float(v) for k, v in rep.clip.items()}, "max_ratio_dev": float(rep.max_ratio_dev)},
        token_weights=rep.token_weights.double().cpu(),
        options=inp.source.recorded[0].options.to_dict(),
        step=inp.source.step,
    )
    eta_ref, source = eta_reference(cfg.eta.reference, ud.lr_ref, inp.ckpt.logged_lr, str(inp.ckpt.path))
    dr = Directions(ud, eta_ref, eta_source=source, replay=info)
    if dr.eta_warning is not None:
        log.warning("%s", dr.eta_warning)
    return dr


def dir_chunk(cfg: Config, inp: Inputs, bt: Batches, dr: Directions) -> DirChunk:
    """``compute.dir_chunk`` as given, or (``auto``) timed on one teacher-forcing chunk of this rank's
    E along the four decompositions at η_ref (:mod:`deltaH.runner.calibrate`)."""
    if cfg.compute.dir_chunk != "auto":
        return DirChunk(int(cfg.compute.dir_chunk), "config")
    return calibrate_dir_chunk(
        inp.params,
        dr.stacked,
        bt.eval.batch,
        lm=inp.lm,
        policy=inp.policy,
        eta=dr.eta_ref,
        tf_batch_size=cfg.compute.tf_batch_size,
        head_chunk=cfg.compute.head_chunk,
        entropy_mode=cfg.analyses.entropy_mode,
        share_prompts=cfg.compute.share_prompts,
    )


def first_order(cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats) -> FirstOrder:
    """δH₁ slopes (η = 1) of the four decompositions, with jackknife standard errors."""
    ev = shard.eval_shard(cfg, bt.eval.batch, base)
    fo = delta_h_first_order(
        inp.params,
        dr.stacked,
        ev.batch,
        eta=1.0,
        mode="forward",
        base=ev.base,
        on_progress=progress_bar("first order δH₁", inp.quiet),
        **inp.kw(cfg),
    )
    return dataclasses.replace(
        fo, per_sequence=shard.gather(fo.per_sequence, -1), loo=shard.gather(fo.loo, -1)
    )


def _sweep(
    cfg: Config,
    inp: Inputs,
    bt: Batches,
    base: SequenceStats,
    etas: list[float],
    dirs: Mapping[str, Tensor],
    desc: str,
) -> list[TrueDeltaH]:
    """True ΔH at each η; per-sequence fields hold this rank's rows of E."""
    ev = shard.eval_shard(cfg, bt.eval.batch, base)
    return [
        delta_h_true_multi(inp.params, dirs, ev.batch, eta=e, base=ev.base, **inp.kw(cfg))
        for e in tqdm(etas, desc=desc, disable=inp.quiet, leave=False)
    ]


def eta_grid(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats, fo: FirstOrder
) -> EtaGrid:
    """The sweep's η values: the config's list, or (auto) the trustworthy range of a probe of the
    full direction over decades around η_ref; η_ref always joins the grid."""
    probe, warnings = None, []
    if cfg.eta.grid == "auto":
        probe_etas = [dr.eta_ref * 10.0**k for k in PROBE_DECADES]
        res = _sweep(cfg, inp, bt, base, probe_etas, {n: d[:1] for n, d in dr.stacked.items()}, "η probe")
        n = len(bt.eval.batch)
        probe = trust_range(
            probe_etas,
            [float(r.delta_h[0]) for r in res],
            float(fo.slope[0]),
            [float(r.ess[0]) for r in res],
            [float(r.khat[0]) for r in res],
            [float(r.retained_mass[0]) for r in res],
            n,
            res[0].khat_threshold,
            check_retained=inp.policy.top_p < 1.0,
            nucleus_changed=[float(r.nucleus_changed[0]) for r in res],
            noise=rounding_noise(inp.compute_dtype, float(res[0].h_orig), n,
                                 float(bt.eval.batch.n_tokens.double().mean())),
        )
        if math.isfinite(probe.eta_min):
            etas = auto_grid(probe.eta_min, probe.eta_max, cfg.eta.n_points, dr.eta_ref)
        else:
            warnings.append("no η in the probe range was trustworthy; using the probe grid itself")
            etas = probe_etas
    else:
        etas = sorted(float(e) for e in cfg.eta.grid)
    if not any(math.isclose(e, dr.eta_ref, rel_tol=1e-9) for e in etas):
        etas = sorted([*etas, dr.eta_ref])
    return EtaGrid(etas, probe, warnings)


def true_sweep(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats, grid: EtaGrid
) -> Sweep:
    res = _sweep(cfg, inp, bt, base, grid.etas, dr.stacked, "true ΔH")
    return Sweep(
        fields={k: torch.stack([getattr(r, k).double().cpu() for r in res]) for k in SWEEP_FIELDS},
        per_sequence_full=shard.gather(torch.stack([r.per_sequence[0].double() for r in res]), -1).cpu(),
        h_orig=float(res[0].h_orig),
        h_orig_per_token=float(res[0].h_orig_per_token),
        khat_threshold=float(res[0].khat_threshold),
        loo_ref=shard.gather(res[ref_index(grid.etas, dr.eta_ref)].loo.double(), -1).cpu(),
    )


def second_order(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats, grid: EtaGrid
) -> Tensor:
    """½η²·d²ΔH/dη² along each decomposition ``[n_eta, 4]``."""
    ev = shard.eval_shard(cfg, bt.eval.batch, base)
    fo2 = delta_h_first_order(
        inp.params,
        dr.stacked,
        ev.batch,
        eta=grid.etas,
        mode="forward",
        second_order=True,
        base=ev.base,
        **inp.kw(cfg),
    )
    assert fo2.second_order is not None
    return fo2.second_order.double().cpu()


def influence(cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats) -> InfluencePair:
    """The influence matrices ``[N_E, N_U]``: each rank sweeps every column (update sequence) over its
    rows of E; the rows are gathered in order."""
    ev = shard.eval_shard(cfg, bt.eval.batch, base)
    args = (inp.params, dr.update.components, ev.batch)

    def rows_gathered(m: Influence) -> Influence:
        return dataclasses.replace(m, matrix=shard.gather(m.matrix, 0), loo=shard.gather(m.loo, 0))

    return InfluencePair(
        true=rows_gathered(influence_matrix(
            *args,
            eta=dr.eta_ref,
            kind="true",
            base=ev.base,
            on_progress=progress_bar("influence, true ΔH", inp.quiet, "col"),
            **inp.kw(cfg),
        )),
        first_order=rows_gathered(influence_matrix(
            *args,
            eta=dr.eta_ref,
            kind="first_order",
            base=ev.base,
            on_progress=progress_bar("influence, first order", inp.quiet),
            **inp.kw(cfg),
        )),
    )


def realised(cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats) -> Realised | None:
    """ΔH on E of the step the trainer really took (read from the next checkpoint) beside the
    rebuilt step at η = lr and, for a replayed step, its policy-gradient and KL parts."""
    from deltaH.replay import realised_step, step_error, trainable_weights

    nxt = inp.source.next_checkpoint
    kl = dr.replay is not None and dr.replay.grad_kl is not None
    if nxt is None and not kl:
        return None
    first = next(iter(inp.params.values()))
    ud, lr = dr.update, dr.update.lr_ref
    dirs: dict[str, list[Tensor]] = {n: [] for n in inp.params}
    names: list[str] = []
    etas: list[float] = []
    real = None
    if nxt is not None:
        log.info("the realised step: %s minus this checkpoint", nxt)
        after = trainable_weights(
            Path(nxt), base_model=cfg.checkpoint.base_model, dtype=first.dtype, device=str(first.device)
        )
        real = realised_step({n: p.detach() for n, p in inp.params.items()}, after)
        names.append("realised")
        etas.append(1.0)
        for n in inp.params:
            dirs[n].append(real[n].to(first.dtype))
    eta_parts = lr if lr > 0 else dr.eta_ref
    parts = []
    if real is not None and lr > 0:
        parts.append(("replayed" if dr.replay is not None else "sampled", ud.full))
    if kl:
        assert dr.replay is not None and dr.replay.grad_kl is not None
        parts += [("policy_gradient", dr.replay.grad_pg), ("kl", dr.replay.grad_kl)]
    for name, tree in parts:
        names.append(name)
        etas.append(eta_parts)
        for n in inp.params:
            dirs[n].append(eta_parts * tree[n].to(first.dtype))
    stacked = {n: torch.stack(v) for n, v in dirs.items()}
    ev = shard.eval_shard(cfg, bt.eval.batch, base)
    res = delta_h_true_multi(inp.params, stacked, ev.batch, eta=1.0, base=ev.base, **inp.kw(cfg))
    fo = delta_h_first_order(
        inp.params, stacked, ev.batch, eta=1.0, mode="forward", base=ev.base, **inp.kw(cfg)
    )
    se = fo.stderr if fo.stderr is not None else torch.full_like(fo.slope, float("nan"))
    norm = (
        math.nan if real is None else float(sum(float(t.double().pow(2).sum()) for t in real.values()) ** 0.5)
    )
    return Realised(
        names=names,
        eta=etas,
        delta_h=res.delta_h.double().cpu(),
        delta_h_per_token=res.delta_h_per_token.double().cpu(),
        ess=res.ess.double().cpu(),
        khat=res.khat.double().cpu(),
        retained_mass=res.retained_mass.double().cpu(),
        first_order=fo.slope.double().cpu(),
        first_order_se=se.double().cpu(),
        step_error=step_error(ud.full, lr, real) if real is not None and lr > 0 else None,
        realised_norm=norm,
        next_checkpoint=nxt,
    )


def update_tags(inp: Inputs, up: UpdateBatch) -> UpdateTags:
    """The tags of a sampled update batch: its advantages, rewards, prompt groups, responses, and
    truncation and length from the response tokens and the tokenizer's EOS."""
    rewards = up.rewards if bool(torch.isfinite(up.rewards).all()) else None  # a recorded U has none
    return tags_from_batch(up.batch, advantages=up.advantages, group=up.group,
                           eos_token_ids=eos_ids(inp.tokenizer), rewards=rewards, texts=up.responses)


def attribution(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, fo: FirstOrder, grid: EtaGrid, sw: Sweep,
    inf: InfluencePair,
) -> Attributed:
    """ΔH at η_ref summed over the tag families of U, with the baseline's share
    (:mod:`deltaH.attribution`)."""
    j, b = ref_index(grid.etas, dr.eta_ref), DECOMPOSITIONS.index("baseline")
    eta = dr.eta_ref
    base_true = float(sw.fields["delta_h"][j, b])
    true = Contributions(_np(inf.true.column_delta_h), _np(inf.true.loo), base_true,
                         None if sw.loo_ref is None else _np(sw.loo_ref[b]))
    first = Contributions(_np(inf.first_order.column_delta_h), _np(inf.first_order.loo),
                          eta * float(fo.slope[b]), None if fo.loo is None else eta * _np(fo.loo[b]))
    tags = update_tags(inp, bt.update)
    return Attributed(tags, attribute(true, first, tags), eta)


def _np(x: Tensor | None) -> Any:
    return None if x is None else x.detach().double().cpu().numpy()


@dataclass(frozen=True)
class KernelRun:
    """The kernel stage: ``kernel [N_E, N_U]``; ``prompt_e [N_E]`` and ``prompt_u [N_U]`` number the
    distinct prompts (by their tokens) of both batches, so pair ``(t, i)`` shares a prompt when
    ``prompt_e[t] == prompt_u[i]``; ``projected``: a projection's check and memory (None: exact)."""

    kernel: Tensor
    prompt_e: Tensor
    prompt_u: Tensor
    projected: ProjectedKernel | None = None


def kernel(cfg: Config, inp: Inputs, bt: Batches, dr: Directions) -> KernelRun:
    """The cross Fisher kernel (exact, or projected with its fidelity check) and the prompt of every row."""
    from deltaH.sampling.builders import prompt_tokens

    a = cfg.analyses
    args = (inp.lm, inp.params, bt.eval.batch, bt.update.batch, dr.update.precond)
    kw: dict[str, Any] = {"policy": inp.policy, "seed": inp.seeds.kernel, "seq_chunk": cfg.compute.seq_chunk}
    proj = None
    if a.kernel_method == "projection":
        proj = projected_kernel(*args, proj_dim=a.kernel_proj_dim, subspace=a.kernel_subspace,
                                check_columns=a.kernel_check_columns, **kw)
        kern = proj.kernel
    else:
        kern = fisher_kernel(*args, method="exact", **kw)
    keys: dict[tuple[int, ...], int] = {}
    rows = prompt_tokens(bt.eval.batch) + prompt_tokens(bt.update.batch)
    ids = [keys.setdefault(p, len(keys)) for p in rows]
    n_e = len(bt.eval.batch)
    return KernelRun(kern, torch.tensor(ids[:n_e]), torch.tensor(ids[n_e:]), proj)


def proxy(cfg: Config, inp: Inputs, bt: Batches, dr: Directions) -> CovarianceProxy:
    return covariance_proxy(
        inp.lm,
        inp.params,
        bt.update.batch,
        bt.update.advantages.double(),
        temperature=cfg.policy.temperature,
        eta=dr.eta_ref,
        share_prompts=cfg.compute.share_prompts,
    )


def diagnostics(cfg: Config, inp: Inputs, bt: Batches) -> TokenDiagnostics:
    """Per-token diagnostics of E at θ (``output.detail: debug``); each rank's tokens, gathered in order."""
    ev = shard.eval_shard(cfg, bt.eval.batch)
    d = token_diagnostics(
        inp.lm,
        inp.params,
        ev.batch,
        policy=inp.policy,
        eos_token_ids=eos_ids(inp.tokenizer),
        tf_batch_size=cfg.compute.tf_batch_size,
        share_prompts=cfg.compute.share_prompts,
    )
    d = dataclasses.replace(d, row=d.row + ev.rows.start)  # rows of E, not of the shard
    return TokenDiagnostics(**{f.name: shard.gather(getattr(d, f.name), 0) for f in dataclasses.fields(d)})
