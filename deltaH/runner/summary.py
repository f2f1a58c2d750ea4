"""From the stages' outputs to ``summary.json`` (layout: ``docs/results-schema.md``)."""

from __future__ import annotations

import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import deltaH
from deltaH.analysis import linear_fits, rounding_noise, trust_summary, trust_warnings
from deltaH.attribution import Estimate, Group
from deltaH.config import Config
from deltaH.estimators.first_order import FirstOrder
from deltaH.estimators.influence import CovarianceProxy
from deltaH.estimators.kernel import kernel_summary
from deltaH.io import schema as sc
from deltaH.io._report_kernel import kernel_warnings
from deltaH.io.results import to_jsonable
from deltaH.runner.calibrate import DirChunk
from deltaH.runner.controls import MEASURED, ControlsRun
from deltaH.runner.stages import (
    Attributed,
    Batches,
    Directions,
    EtaGrid,
    InfluencePair,
    Inputs,
    KernelRun,
    Realised,
    Sweep,
)
from deltaH.runner.stages import ref_index as ref_index
from deltaH.stats import share_mode
from deltaH.updates.directions import DECOMPOSITIONS


def to_np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltaH": deltaH.__version__,
    }


def trust_of(
    sw: Sweep, fo: FirstOrder, etas: list[float], n_eval: int, top_p: bool, dtype: str,
    tokens: float | None = None,
) -> dict[str, Any]:
    """The one trust rule (:func:`deltaH.analysis.trust_summary`) over every decomposition."""
    columns = {k: to_np(v).tolist() for k, v in sw.fields.items()}
    return trust_summary(
        etas,
        DECOMPOSITIONS,
        columns,
        to_np(fo.slope).tolist(),
        n_eval,
        sw.khat_threshold,
        top_p=top_p,
        dtype=dtype,
        noise=rounding_noise(dtype, sw.h_orig, n_eval, tokens),
    )


def decompositions(
    cfg: Config, sw: Sweep, fo: FirstOrder, so: torch.Tensor | None, etas: list[float], trust: dict[str, Any]
) -> dict[str, sc.Decomposition]:
    f = {k: to_np(v) for k, v in sw.fields.items()}
    slope = to_np(fo.slope)
    se = to_np(fo.stderr) if fo.stderr is not None else np.full_like(slope, np.nan)
    eta = np.asarray(etas)
    out = {}
    for j, name in enumerate(DECOMPOSITIONS):
        first = sc.FirstOrderLine(float(slope[j]), float(se[j]), (eta * slope[j]).tolist())
        out[name] = sc.Decomposition(
            **{k: f[k][:, j].tolist() for k in f},
            first_order=first if cfg.analyses.first_order else None,
            second_order=None if so is None else to_np(so)[:, j].tolist(),
            fit=sc.LineFit(**linear_fits(etas, f["delta_h"][:, j], trust["decompositions"][name]["trusted"])),  # type: ignore[arg-type]
        )
    return out


def influence_summary(inf: InfluencePair | None, bt: Batches) -> sc.InfluenceInfo | None:
    if inf is None:
        return None
    col = to_np(inf.true.column_delta_h)
    row_sums = to_np(inf.true.matrix).sum(1)
    up, rows_u = bt.update, bt.update.rows()
    top_u = [
        sc.TopUpdate(
            int(i),
            float(col[i]),
            float(up.rewards[i]),
            float(up.advantages[i]),
            rows_u[i].get("prompt"),
            rows_u[i].get("response"),
        )
        for i in np.argsort(-np.abs(col))[:10]
    ]
    top_e = [sc.TopEval(int(i), float(row_sums[i])) for i in np.argsort(-np.abs(row_sums))[:10]]
    return sc.InfluenceInfo(
        inf.true.eta,
        ["true", "first_order"],
        col.tolist(),
        to_np(inf.first_order.column_delta_h).tolist(),
        top_u,
        top_e,
    )


def _group(g: Group, label: str | None = None) -> sc.TagGroup:
    def est(e: Estimate) -> sc.GroupEstimate:
        return sc.GroupEstimate(e.delta_h, e.se, e.share, e.share_se)

    return sc.TagGroup(g.label if label is None else label, g.n, est(g.true), est(g.first_order))


def attribution_summary(
    att: Attributed | None, prompts: list[str] | None = None, top: int = 5
) -> sc.AttributionInfo | None:
    """The typed ``attribution`` section; same-prompt groups are labelled with their prompt (``prompts``:
    one per update sequence, when known)."""
    if att is None:
        return None
    a, t = att.result, att.tags

    def label(fam: str, g: Group) -> str:
        return f"{g.label}: {prompts[g.rows[0]]}" if prompts and fam == "prompt_group" and g.rows else g.label

    def seq(i: int) -> sc.AttributedSequence:
        return sc.AttributedSequence(
            i, float(a.delta_h[i]), float(a.delta_h_se[i]), float(a.delta_h1[i]), float(a.delta_h1_se[i]),
            float(t.advantage[i]), math.nan if t.reward is None else float(t.reward[i]), bool(t.truncated[i]),
            int(t.length[i]), int(t.group[i]), None if t.text is None else t.text[i])

    raise_ = [i for i in a.rank_true if a.delta_h[i] > 0][:top]
    lower = [int(i) for i in np.argsort(a.delta_h, kind="stable") if a.delta_h[i] < 0][:top]  # NaN last
    return sc.AttributionInfo(
        eta=att.eta,
        update=_group(a.update),
        baseline=_group(a.baseline),
        total=_group(a.total),
        families=[sc.TagFamily(f.name, f.title, [_group(g, label(f.name, g)) for g in f.groups])
                  for f in a.families],
        omitted=dict(a.omitted),
        top_raise=[seq(i) for i in raise_],
        top_lower=[seq(i) for i in lower],
    )


def batches_summary(cfg: Config, bt: Batches) -> sc.BatchesInfo:
    ev, up = bt.eval, bt.update
    return sc.BatchesInfo(
        eval=sc.EvalBatchInfo(
            len(ev),
            int(ev.prompt_index.unique().numel()),
            ev.group_size,
            float(ev.batch.n_tokens.double().mean()),
        ),
        update=sc.UpdateBatchInfo(
            len(up),
            int(up.group.unique().numel()),
            up.group_size,
            float(up.batch.n_tokens.double().mean()),
            float(up.rewards.double().nanmean()) if bool(torch.isfinite(up.rewards).any()) else math.nan,
            bt.n_resampled,
        ),
    )


def kernel_info(cfg: Config, kern: KernelRun) -> sc.KernelInfo:
    """The typed ``kernel`` section: same- vs different-prompt statistics and, for a projection, its
    memory and fidelity."""
    ks = kernel_summary(kern.kernel, kern.prompt_e, kern.prompt_u)
    pk = kern.projected
    if pk is None:
        return sc.KernelInfo(method=cfg.analyses.kernel_method, **ks.__dict__)
    f = pk.fidelity
    return sc.KernelInfo(
        method=cfg.analyses.kernel_method,
        **ks.__dict__,
        proj_dim=pk.proj_dim,
        subspace=pk.subspace,
        memory_fraction=pk.stored_floats / pk.exact_floats,
        check_memory_fraction=pk.check_floats / pk.exact_floats,
        fidelity=None if f is None else sc.KernelFidelity(**f.__dict__),
    )


def controls_info(ctl: ControlsRun, trusted_at_ref: bool) -> sc.ControlsInfo:
    """The typed ``controls`` section, with the notes a reader needs (first order, trust at η_ref)."""
    def value(x: torch.Tensor, j: int) -> float:
        return float(x[j])

    out = []
    for o in ctl.outcomes:
        dirs = [sc.ControlDirection(
            name, value(o.delta_h, j), value(o.delta_h_per_token, j), value(o.ess, j),
            None if math.isnan(value(o.khat, j)) else value(o.khat, j), value(o.delta_h1, j),
            value(o.delta_h1_se, j), value(o.second_order, j)) for j, name in enumerate(MEASURED)]
        k = o.control
        out.append(sc.ControlInfo(o.name, k.coef, k.se, o.current, k.slope_base, k.slope_base_se, k.slope_dir,
                                  k.slope_dir_se, dirs))
    notes = ["first order: δH₁ at the coefficient found equals the target exactly, ΔH only while ΔH is "
             "linear in the step (the η sweep around η_ref) and for the step with D and clipping frozen; "
             "'controlled' and 'trainer' measure how far that holds", *ctl.notes]
    if not trusted_at_ref:
        notes.append("the η sweep does not trust η_ref: the linearity the coefficients rest on is not "
                     "confirmed there")
    for c in out:
        if math.isfinite(c.coef) and math.isfinite(c.coef_se) and c.coef_se > abs(c.coef):
            notes.append(f"{c.name}: the standard error ({c.coef_se:.3g}) exceeds the coefficient "
                         f"({c.coef:.3g}); a larger evaluation batch pins it down")
        if c.name == "entropy_coef" and c.coef < 0:
            notes.append("entropy_coef < 0: reaching the target needs an entropy penalty, not a bonus (the "
                         "step already moves the entropy above the target to first order)")
    return sc.ControlsInfo(ctl.target, ctl.eta, ctl.entropy_u, ctl.clip_coef, out, notes)


def checkpoint_summary(inp: Inputs) -> dict[str, Any]:
    ckpt = inp.ckpt
    d = ckpt.describe() if hasattr(ckpt, "describe") else {}
    for k in ("path", "kind", "global_step", "lr"):
        d.setdefault(k, str(getattr(ckpt, k, "")) if k == "path" else getattr(ckpt, k, None))
    return {
        **to_jsonable(d),
        "n_trainable": int(sum(p.numel() for p in inp.params.values())),
        "dtype": inp.compute_dtype,
        "trainable_dtype": str(inp.lm.dtype).removeprefix("torch."),
    }


def warnings_of(bt: Batches, dr: Directions, grid: EtaGrid, trust: dict[str, Any]) -> list[str]:
    out = [*bt.warnings, *dr.warnings, *grid.warnings]
    if not trust["trusted"][ref_index(grid.etas, dr.eta_ref)]:
        lo, hi = trust["eta_min"], trust["eta_max"]
        rng = f"[{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else "(empty)"
        out.append(
            f"the reference η = {dr.eta_ref:.3g} is outside the trustworthy range {rng}: "
            "treat ΔH there with care"
        )
    return out + trust_warnings(trust)


def replay_summary(inp: Inputs, dr: Directions, real: Realised | None) -> sc.ReplayInfo:
    src = inp.source
    dirs = []
    if real is not None:
        for k, name in enumerate(real.names):
            kh = float(real.khat[k])
            dirs.append(
                sc.StepDirection(
                    name,
                    real.eta[k],
                    float(real.delta_h[k]),
                    float(real.delta_h_per_token[k]),
                    float(real.ess[k]),
                    None if math.isnan(kh) else kh,
                    float(real.retained_mass[k]),
                    float(real.first_order[k]),
                    float(real.first_order_se[k]),
                )
            )
    return sc.ReplayInfo(
        source=src.kind,
        reason=src.reason,
        step=src.step,
        where=src.where,
        trainer_options=None if dr.replay is None else to_jsonable(dr.replay.options),
        clip=None if dr.replay is None else dict(dr.replay.clip),
        next_checkpoint=src.next_checkpoint,
        step_error=math.nan if real is None or real.step_error is None else real.step_error,
        directions=dirs,
    )


def source_warnings(cfg: Config, inp: Inputs, real: Realised | None) -> list[str]:
    """What a reader must know about where U came from (and what it was computed in)."""
    out = []
    if inp.upcast_from:
        what = (f"its {inp.upcast_from} weights" if inp.upcast_trainable
                else f"its {inp.upcast_from} base weights (the trainable ones were already float32)")
        note = (": the trainer's own step rounded every weight to "
                f"{inp.upcast_from}, which the float32 step deltaH analyses does not, so a replay error "
                "against the next checkpoint includes that rounding" if inp.upcast_trainable else "")
        out.append(f"checkpoint.dtype auto computed {what} in float32 (in half precision ΔH at a "
                   f"realistic lr is rounding noise; set checkpoint.dtype to keep it){note}")
    opts = inp.source.options
    if inp.source.kind == "recorded" and opts is not None:
        if (opts.temperature, opts.top_p) != (cfg.policy.temperature, cfg.policy.top_p):
            out.append(
                f"the trainer sampled with temperature {opts.temperature:g}, top_p {opts.top_p:g} but "
                f"policy.* measures the entropy of temperature {cfg.policy.temperature:g}, top_p "
                f"{cfg.policy.top_p:g}: set policy.temperature/top_p to the trainer's to measure its policy"
            )
        out.append(
            "U is the trainer's recorded step: its loss, clipping and KL come from the record "
            "(replay.trainer_options); the config's loss.* and checkpoint.max_grad_norm do not apply"
        )
    if (
        real is not None
        and real.step_error is not None
        and inp.source.kind == "recorded"
        and real.step_error > 1e-3
    ):
        out.append(
            f"the replayed step differs from the next checkpoint by {real.step_error:.2g} (relative): the "
            "record, the checkpoints or an option deltaH does not see (dropout? a custom optimizer?) disagree"
        )
    return out


def summarise(
    cfg: Config,
    inp: Inputs,
    bt: Batches,
    dr: Directions,
    fo: FirstOrder,
    grid: EtaGrid,
    sw: Sweep,
    so: torch.Tensor | None,
    inf: InfluencePair | None,
    kern: KernelRun | None,
    px: CovarianceProxy | None,
    timings: dict[str, float],
    att: Attributed | None = None,
    real: Realised | None = None,
    ctl: ControlsRun | None = None,
    chunk: DirChunk | None = None,
) -> sc.RunSummary:
    """The typed summary of one checkpoint (``summary.json`` is its ``to_json()``)."""
    etas = grid.etas
    trust = trust_of(sw, fo, etas, len(bt.eval.batch), inp.policy.top_p < 1.0, inp.compute_dtype,
                     float(bt.eval.batch.n_tokens.double().mean()))
    ud = dr.update
    kernel = None if kern is None else kernel_info(cfg, kern)
    return sc.RunSummary(
        deltah_version=deltaH.__version__,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        git_revision=git_revision(),
        versions=versions(),
        status="complete",
        config=cfg.to_dict(),
        seeds=dict(inp.seeds.__dict__),
        timings=timings,
        checkpoint=checkpoint_summary(inp),
        batches=batches_summary(cfg, bt),
        update=sc.UpdateInfo(
            cfg.loss.type if dr.replay is None else str(dr.replay.options.get("loss_type")),
            ud.lr_ref,
            ud.clip_coef,
            ud.grad_norm,
        ),
        h_orig=sw.h_orig,
        h_orig_per_token=sw.h_orig_per_token,
        entropy_mode=cfg.analyses.entropy_mode,
        eta=etas,
        eta_reference=dr.eta_ref,
        eta_reference_source=dr.eta_source,
        decompositions=decompositions(cfg, sw, fo, so, etas, trust),
        trust=sc.TrustInfo.from_json(trust),
        influence=influence_summary(inf, bt),
        attribution=attribution_summary(att, bt.update.prompts),
        kernel=kernel,
        proxy=None if px is None else sc.ProxyInfo(**px.__dict__),
        replay=replay_summary(inp, dr, real),
        warnings=warnings_of(bt, dr, grid, trust) + source_warnings(cfg, inp, real) + kernel_warnings(kernel),
        controls=None if ctl is None else controls_info(ctl, trust["trusted"][ref_index(etas, dr.eta_ref)]),
        compute=None if chunk is None else compute_info(chunk, share_mode(inp.lm, cfg.compute.share_prompts),
                                                        inp.lm.share_unsupported),
    )


def compute_info(chunk: DirChunk, share_prompts: str = "auto", share_unsupported: str = "") -> sc.ComputeInfo:
    """The typed ``compute`` section: the dir_chunk used and its calibration, and prompt sharing."""
    return sc.ComputeInfo(chunk.value, chunk.source, list(chunk.candidates), list(chunk.seconds), chunk.k,
                          chunk.n_sequences, chunk.repeats, share_prompts, share_unsupported)
