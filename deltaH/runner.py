"""An experiment plan from a config to a results folder (the edge: I/O, logging, progress bars).

Per checkpoint: load → E and U batches → update directions (full, baseline, grad, per-sequence
components) → θ-side statistics once → an η sweep of true ΔH for each decomposition (auto grid:
the trustworthy range) → δH₁ (and the second-order term) → influence matrices at the reference η
→ Fisher kernel (optional) → covariance proxy → summary.json, arrays, batches, plots, report.md.
Several checkpoints run as one study (one sub-folder each, plus a trajectory plot). Each finished
analysis is recorded in ``progress.json``; ``resume`` redoes the cheap deterministic steps
(batches, directions) and skips finished analyses.
"""

from __future__ import annotations

import glob
import logging
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import deltaH
from deltaH.analysis import auto_grid, linear_fits, trust_range
from deltaH.config import Config
from deltaH.estimators.first_order import delta_h_first_order
from deltaH.estimators.influence import covariance_proxy, influence_matrix
from deltaH.estimators.kernel import fisher_kernel, kernel_summary
from deltaH.estimators.true import base_stats, delta_h_true_multi
from deltaH.functional import FunctionalLM
from deltaH.io.progress import progress_bar
from deltaH.io.results import ResultsDir, to_jsonable
from deltaH.policy import SamplingPolicy
from deltaH.stats import token_diagnostics
from deltaH.updates.directions import DECOMPOSITIONS, update_directions

log = logging.getLogger(__name__)
PROBE_DECADES = (-6, -5, -4, -3, -2, -1, 0, 1, 2)


class UserError(ValueError):
    """Bad input found by the runner (missing files, a checkpoint without optimizer state, ...)."""


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def __call__(self, name: str) -> _Span:
        return _Span(self, name)


class _Span:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.timings[self.name] = self.timer.timings.get(self.name, 0.0) + time.perf_counter() - self.t0


def resolve_checkpoints(path: str | Sequence[str]) -> list[str]:
    """``toy``, a folder, a list of folders, or a glob (sorted by the trailing step number)."""
    if not isinstance(path, str):
        out: list[str] = []
        for p in path:
            out.extend(resolve_checkpoints(p))
        return out
    if path == "toy":
        from deltaH.toy import toy_checkpoint_path

        return [str(toy_checkpoint_path())]
    if any(ch in path for ch in "*?["):
        hits = glob.glob(path)
        if not hits:
            raise UserError(f"config key 'checkpoint.path': the glob {path!r} matches no folder")

        def step(p: str) -> tuple[int, str]:
            tail = Path(p).name.rsplit("-", 1)[-1]
            return (int(tail) if tail.isdigit() else -1, p)

        return sorted(hits, key=step)
    if not Path(path).exists():
        raise UserError(f"config key 'checkpoint.path': {path!r} does not exist")
    return [path]


def _git_revision() -> str | None:
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


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "deltaH": deltaH.__version__,
    }


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(
    cfg: Config, out: str | Path | None = None, resume: str | Path | None = None, quiet: bool = False
) -> Path:
    """Run the plan of ``cfg``; returns the results folder."""
    paths = resolve_checkpoints(cfg.checkpoint.path)
    if resume is not None:
        rd = ResultsDir.open(resume)
    else:
        rd = ResultsDir.create(cfg.output.dir, out)
    rd.write_text("config.yaml", _yaml(cfg.to_dict()))
    try:
        if len(paths) == 1:
            _run_one(cfg, paths[0], rd, quiet)
        else:
            _run_study(cfg, paths, rd, quiet)
    except KeyboardInterrupt:
        rd.set_progress(status="incomplete", error="interrupted (Ctrl-C); continue with --resume")
        raise
    except Exception as exc:
        rd.set_progress(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    rd.set_progress(status="complete", error=None)
    return rd.path


def _yaml(d: dict[str, Any]) -> str:
    import yaml

    return str(yaml.safe_dump(to_jsonable(d), sort_keys=False))


def _run_study(cfg: Config, paths: list[str], rd: ResultsDir, quiet: bool) -> None:
    rows = []
    for i, p in enumerate(tqdm(paths, desc="checkpoints", disable=quiet)):
        sub_path = rd.path / f"{i:02d}-{Path(p).name}"
        sub = (
            ResultsDir.open(sub_path)
            if (sub_path / "progress.json").is_file()
            else ResultsDir.create(rd.path, sub_path)
        )
        if sub.progress().get("status") != "complete":
            _run_one(cfg, p, sub, quiet)
            sub.set_progress(status="complete")
        s = sub.read_json("summary.json")
        i_ref = _ref_index(s)
        full = s["decompositions"]["full"]
        rows.append(
            {
                "checkpoint": Path(p).name,
                "global_step": s["checkpoint"].get("global_step"),
                "h_orig": s["h_orig"],
                "delta_h_ref": full["delta_h"][i_ref],
                "delta_h1_ref": (full["first_order"] or {}).get("delta_h", [None] * (i_ref + 1))[i_ref],
            }
        )
    rd.write_json("study.json", {"checkpoints": rows})
    if cfg.output.plots:
        try:
            from deltaH.io.plots import make_trajectory_plot

            make_trajectory_plot(rows, rd.path / "plots" / "trajectory.png")
        except ImportError as exc:
            log.warning("trajectory plot skipped: %s", exc)


def _ref_index(summary: dict[str, Any]) -> int:
    eta = summary["eta"]
    ref = summary["eta_reference"]
    return int(np.argmin([abs(math.log(e) - math.log(ref)) for e in eta]))


def _run_one(cfg: Config, ckpt_path: str, rd: ResultsDir, quiet: bool) -> None:
    from deltaH.io.checkpoint import load_checkpoint
    from deltaH.sampling.builders import build_eval_batch, build_update_batch
    from deltaH.sampling.data import load_prompts
    from deltaH.sampling.rewards import load_reward_fn

    timer = _Timer()
    t_start = time.perf_counter()
    warnings_: list[str] = []
    partial: dict[str, Any] = rd.read_json("partial.json") or {}
    seeds = {
        "seed": cfg.seed,
        "eval": cfg.seed * 1000 + 1,
        "update": cfg.seed * 1000 + 2,
        "kernel": cfg.seed * 1000 + 3,
    }
    torch.manual_seed(cfg.seed)

    with timer("load"):
        log.info("loading checkpoint %s", ckpt_path)
        ckpt = load_checkpoint(
            ckpt_path,
            base_model=cfg.checkpoint.base_model,
            dtype=_dtype(cfg.checkpoint.dtype),
            device=_device(cfg.checkpoint.device),
        )
        if ckpt.optimizer_state is None:
            raise UserError(
                f"checkpoint {ckpt_path} has no optimizer state (optimizer.pt): deltaH needs it to rebuild "
                "the AdamW step; point checkpoint.path at a trainer checkpoint-N folder"
            )
        tok = ckpt.tokenizer
        if tok is None:
            raise UserError(
                f"checkpoint {ckpt_path} has no tokenizer files; save the tokenizer beside the model"
            )
        lm = FunctionalLM.from_model(ckpt.model)
        params = lm.params
        data_path = cfg.data.path
        if data_path == "toy":
            from deltaH.toy import toy_prompts_path

            data_path = str(toy_prompts_path())
        records = load_prompts(
            data_path,
            prompt_field=cfg.data.prompt_field,
            answer_field=cfg.data.answer_field,
            id_field=cfg.data.id_field,
            template=cfg.data.template,
            system_prompt=cfg.data.system_prompt,
            tokenizer=tok,
            limit=cfg.data.limit,
        )
        reward_fn = load_reward_fn(cfg.data.reward)
        policy = SamplingPolicy(cfg.policy.temperature, cfg.policy.top_p)

    with timer("batches"):
        log.info("sampling the evaluation and update batches")
        ev = build_eval_batch(
            lm,
            params,
            records,
            tok,
            policy=policy,
            total_sequences=cfg.eval_batch.total_sequences,
            group_size=cfg.eval_batch.group_size,
            max_new_tokens=cfg.policy.max_new_tokens,
            seed=seeds["eval"],
        )
        up = build_update_batch(
            lm,
            params,
            records,
            tok,
            reward_fn,
            policy=policy,
            n_prompts=cfg.update_batch.n_prompts,
            group_size=cfg.update_batch.group_size,
            max_new_tokens=cfg.policy.max_new_tokens,
            seed=seeds["update"],
            scale_rewards=cfg.update_batch.scale_rewards,  # type: ignore[arg-type]
            max_resample_attempts=cfg.update_batch.max_resample_attempts,
        )
        n_resampled = int((up.resampled > 0).sum())
        if n_resampled:
            warnings_.append(
                f"{n_resampled} update group(s) had equal rewards and were re-sampled (U is "
                "conditioned on non-degenerate groups, unlike the trainer)"
            )

    with timer("directions"):
        ud = update_directions(
            lm,
            params,
            up.batch,
            up.advantages.double(),
            ckpt.optimizer_state,
            loss_type=cfg.loss.type,
            temperature=cfg.policy.temperature,
            grad_accum_steps=cfg.loss.grad_accum_steps,
            max_completion_length=cfg.loss.max_completion_length or cfg.policy.max_new_tokens,
            max_grad_norm=cfg.checkpoint.max_grad_norm,
            seq_chunk=cfg.compute.seq_chunk,
            on_progress=progress_bar("per-sequence gradients of U", quiet, "seq"),
        )
        dirs = ud.stacked()
        eta_ref = ud.lr_ref if cfg.eta.reference == "lr" else float(cfg.eta.reference)
        if len(set(ud.lr.values())) > 1:
            warnings_.append(
                "parameter groups have different learning rates: directions are per unit of each "
                f"group's lr and η_ref = {eta_ref:g} reproduces the real step only for that group"
            )
        with torch.no_grad():
            base = base_stats(lm, params, ev.batch, policy, cfg.compute.tf_batch_size, cfg.compute.head_chunk)
    if not rd.is_done("batches"):
        detail = cfg.output.detail
        eval_rows = ev.rows()
        for r, lq, en in zip(eval_rows, base.logq.tolist(), base.entropy.tolist(), strict=True):
            r.update(logq=lq, entropy=en)
        if detail != "minimal":
            rd.write_jsonl("batches/eval.jsonl", eval_rows)
            rd.write_jsonl("batches/update.jsonl", up.rows())
        rd.save_array("eval_logq", base.logq, "log q of each evaluation sequence at θ [N_E]")
        rd.save_array("eval_entropy", base.entropy, "RB entropy of each evaluation sequence at θ [N_E]")
        rd.save_array("update_rewards", up.rewards, "reward of each update sequence [N_U]")
        rd.save_array("update_advantages", up.advantages, "advantage of each update sequence [N_U]")
        if detail == "debug":
            diag = token_diagnostics(
                lm,
                params,
                ev.batch,
                policy=policy,
                eos_token_ids=_eos_ids(tok),
                tf_batch_size=cfg.compute.tf_batch_size,
            )
            for name in ("row", "position", "logq", "entropy", "top1", "nucleus", "eos"):
                rd.save_array(
                    f"eval_token_{name}",
                    getattr(diag, name),
                    f"per scored evaluation token at θ: {name} [P] (see stats.TokenDiagnostics)",
                )
        rd.mark_done("batches")

    kw: dict[str, Any] = {
        "lm": lm,
        "policy": policy,
        "tf_batch_size": cfg.compute.tf_batch_size,
        "head_chunk": cfg.compute.head_chunk,
    }
    mode = cfg.analyses.entropy_mode

    def sweep(etas: list[float], d: dict[str, torch.Tensor], desc: str) -> list[Any]:
        out = []
        for e in tqdm(etas, desc=desc, disable=quiet, leave=False):
            out.append(
                delta_h_true_multi(
                    params,
                    d,
                    ev.batch,
                    eta=e,
                    dir_chunk=cfg.compute.dir_chunk,
                    entropy_mode=mode,
                    base=base,
                    **kw,
                )
            )
        return out

    # -- η grid (auto: probe the full direction over decades around η_ref) ---------------------
    with timer("first_order"):
        fo1 = delta_h_first_order(
            params,
            dirs,
            ev.batch,
            eta=1.0,
            mode="forward",
            dir_chunk=cfg.compute.dir_chunk,
            entropy_mode=mode,
            base=base,
            on_progress=progress_bar("first order δH₁", quiet),
            **kw,
        )
    slope_full = float(fo1.slope[0])
    if cfg.eta.grid == "auto":
        probe_etas = [eta_ref * 10.0**k for k in PROBE_DECADES]
        with timer("true"):
            probe = sweep(probe_etas, {n: d[:1] for n, d in dirs.items()}, "η probe")
        tr = trust_range(
            probe_etas,
            [float(r.delta_h[0]) for r in probe],
            slope_full,
            [float(r.ess[0]) for r in probe],
            [float(r.khat[0]) for r in probe],
            [float(r.retained_mass[0]) for r in probe],
            len(ev.batch),
            probe[0].khat_threshold,
            check_retained=policy.top_p < 1.0,
        )
        if math.isfinite(tr.eta_min):
            etas = auto_grid(tr.eta_min, tr.eta_max, cfg.eta.n_points, eta_ref)
        else:
            warnings_.append("no η in the probe range was trustworthy; using the probe grid itself")
            etas = probe_etas
    else:
        etas = sorted(float(e) for e in cfg.eta.grid)
    if not any(math.isclose(e, eta_ref, rel_tol=1e-9) for e in etas):
        etas = sorted([*etas, eta_ref])

    # -- true ΔH and δH₁ for the four decompositions ------------------------------------------
    if rd.is_done("true") and "true" in partial:
        true_part = partial["true"]
    else:
        with timer("true"):
            res = sweep(etas, dirs, "true ΔH")
        true_part = {
            key: np.stack([to_np(getattr(r, key)) for r in res]).tolist()
            for key in (
                "delta_h",
                "delta_h_per_token",
                "ess",
                "khat",
                "logw_max",
                "logw_min",
                "retained_mass",
            )
        }
        true_part["h_orig"] = float(res[0].h_orig)
        true_part["h_orig_per_token"] = float(res[0].h_orig_per_token)
        true_part["khat_threshold"] = res[0].khat_threshold
        true_part["per_sequence_full"] = np.stack([to_np(r.per_sequence[0]) for r in res]).tolist()
        partial["true"] = true_part
        rd.write_json("partial.json", partial)
        rd.mark_done("true")
    dh_arr = np.asarray(true_part["delta_h"], dtype=float)  # [n_eta, 4]

    with timer("first_order"):
        so = None
        if cfg.analyses.second_order:
            fo2 = delta_h_first_order(
                params,
                dirs,
                ev.batch,
                eta=etas,
                mode="forward",
                second_order=True,
                dir_chunk=cfg.compute.dir_chunk,
                entropy_mode=mode,
                base=base,
                **kw,
            )
            so = to_np(fo2.second_order)
    slope = to_np(fo1.slope)
    se_slope = to_np(fo1.stderr) if fo1.stderr is not None else np.full_like(slope, np.nan)
    eta_np = np.asarray(etas)
    dh1_arr = eta_np[:, None] * slope[None, :]

    tr_full = trust_range(
        etas,
        dh_arr[:, 0],
        float(slope[0]),
        [r[0] for r in true_part["ess"]],
        [r[0] if r[0] is not None else float("nan") for r in true_part["khat"]],
        [r[0] for r in true_part["retained_mass"]],
        len(ev.batch),
        true_part["khat_threshold"],
        check_retained=policy.top_p < 1.0,
    )
    i_ref = int(np.argmin(np.abs(np.log(eta_np) - math.log(eta_ref))))
    if not tr_full.trusted[i_ref]:
        warnings_.append(
            f"the reference η = {eta_ref:.3g} is outside the trustworthy range "
            f"[{tr_full.eta_min:.3g}, {tr_full.eta_max:.3g}]: treat ΔH there with care"
        )
    decomp: dict[str, Any] = {}
    for j, name in enumerate(DECOMPOSITIONS):
        decomp[name] = {
            **{
                k: [row[j] for row in true_part[k]]
                for k in (
                    "delta_h",
                    "delta_h_per_token",
                    "ess",
                    "khat",
                    "logw_max",
                    "logw_min",
                    "retained_mass",
                )
            },
            "first_order": {
                "slope": float(slope[j]),
                "stderr_slope": float(se_slope[j]),
                "delta_h": dh1_arr[:, j].tolist(),
            }
            if cfg.analyses.first_order
            else None,
            "second_order": None if so is None else so[:, j].tolist(),
            "fit": linear_fits(etas, dh_arr[:, j], tr_full.trusted),
        }
    rd.save_array("eta", eta_np, "η grid [n_eta]")
    rd.save_array("delta_h", dh_arr, f"true ΔH [n_eta, 4] for {list(DECOMPOSITIONS)}")
    rd.save_array("delta_h1", dh1_arr, "first-order δH₁ [n_eta, 4]")
    rd.save_array("ess", np.asarray(true_part["ess"]), "effective sample size [n_eta, 4]")
    rd.save_array("khat", np.asarray(true_part["khat"], dtype=float), "PSIS k̂ [n_eta, 4]")
    if cfg.output.detail in ("detailed", "debug"):
        rd.save_array(
            "per_sequence_full",
            np.asarray(true_part["per_sequence_full"]),
            "per-evaluation-sequence contributions c_n to ΔH along the full update [n_eta, N_E]",
        )

    # -- influence, kernel, proxy ---------------------------------------------------------------
    influence = None
    if cfg.analyses.influence:
        with timer("influence"):
            inf_t = influence_matrix(
                params,
                ud.components,
                ev.batch,
                eta=eta_ref,
                kind="true",
                dir_chunk=cfg.compute.dir_chunk,
                entropy_mode=mode,
                base=base,
                on_progress=progress_bar("influence, true ΔH", quiet, "col"),
                **kw,
            )
            inf_1 = influence_matrix(
                params,
                ud.components,
                ev.batch,
                eta=eta_ref,
                kind="first_order",
                dir_chunk=cfg.compute.dir_chunk,
                entropy_mode=mode,
                base=base,
                on_progress=progress_bar("influence, first order", quiet),
                **kw,
            )
        rd.save_array("influence_true", inf_t.matrix, "true influence M[n, i] at η_ref [N_E, N_U]")
        rd.save_array("influence_first_order", inf_1.matrix, "first-order influence [N_E, N_U]")
        col = to_np(inf_t.column_delta_h)
        order = np.argsort(-np.abs(col))[:10]
        rows_u = up.rows()
        row_sums = to_np(inf_t.matrix).sum(1)
        influence = {
            "eta": eta_ref,
            "kind": ["true", "first_order"],
            "column_delta_h": col.tolist(),
            "column_delta_h1": to_np(inf_1.column_delta_h).tolist(),
            "top_update": [
                {
                    "row": int(i),
                    "delta_h": float(col[i]),
                    "reward": float(up.rewards[i]),
                    "advantage": float(up.advantages[i]),
                    "prompt": rows_u[i].get("prompt"),
                    "response": rows_u[i].get("response"),
                }
                for i in order
            ],
            "top_eval": [
                {"row": int(i), "delta_h": float(row_sums[i])} for i in np.argsort(-np.abs(row_sums))[:10]
            ],
        }
    kernel = None
    if cfg.analyses.kernel:
        with timer("kernel"):
            kern = fisher_kernel(
                lm,
                params,
                ev.batch,
                up.batch,
                ud.precond,
                policy=policy,
                method=cfg.analyses.kernel_method,
                proj_dim=cfg.analyses.kernel_proj_dim,
                seed=seeds["kernel"],
                seq_chunk=cfg.compute.seq_chunk,
            )
        rd.save_array("kernel", kern, "cross Fisher kernel K[t, i] [N_E, N_U]")
        ks = kernel_summary(kern, ev.prompt_index, up.prompt_index)
        kernel = {"method": cfg.analyses.kernel_method, **ks.__dict__}
    proxy = None
    if cfg.analyses.proxy:
        px = covariance_proxy(
            lm, params, up.batch, up.advantages.double(), temperature=cfg.policy.temperature, eta=eta_ref
        )
        proxy = dict(px.__dict__)

    timer.timings["total"] = time.perf_counter() - t_start
    summary = {
        "deltah_version": deltaH.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_revision": _git_revision(),
        "versions": _versions(),
        "status": "complete",
        "config": cfg.to_dict(),
        "seeds": seeds,
        "timings": timer.timings,
        "checkpoint": {
            **_describe(ckpt),
            "n_trainable": int(sum(p.numel() for p in params.values())),
            "dtype": str(lm.dtype).replace("torch.", ""),
        },
        "batches": {
            "eval": {
                "n": len(ev),
                "n_prompts": int(ev.prompt_index.unique().numel()),
                "group_size": ev.group_size,
                "mean_tokens": float(ev.batch.n_tokens.double().mean()),
            },
            "update": {
                "n": len(up),
                "n_prompts": cfg.update_batch.n_prompts,
                "group_size": up.group_size,
                "mean_tokens": float(up.batch.n_tokens.double().mean()),
                "mean_reward": float(up.rewards.double().mean()),
                "resampled_groups": n_resampled,
            },
        },
        "update": {
            "loss_type": cfg.loss.type,
            "lr_ref": ud.lr_ref,
            "clip_coef": ud.clip_coef,
            "grad_norm": ud.grad_norm,
        },
        "h_orig": true_part["h_orig"],
        "h_orig_per_token": true_part["h_orig_per_token"],
        "entropy_mode": mode,
        "eta": etas,
        "eta_reference": eta_ref,
        "decompositions": decomp,
        "trust": {
            "eta_min": tr_full.eta_min,
            "eta_max": tr_full.eta_max,
            "precision_floor": tr_full.precision_floor,
            "khat_threshold": true_part["khat_threshold"],
            "trusted": tr_full.trusted,
            "notes": tr_full.notes,
        },
        "influence": influence,
        "kernel": kernel,
        "proxy": proxy,
        "warnings": warnings_ + tr_full.notes,
    }
    rd.write_json("summary.json", summary, gzip_large=True)
    if cfg.output.plots:
        _plots_and_report(summary, rd, warnings_)
    else:
        _report_only(summary, rd)
    rd.mark_done("report")


def _eos_ids(tok: Any) -> list[int]:
    eos = getattr(tok, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]


def _describe(ckpt: Any) -> dict[str, Any]:
    d = ckpt.describe() if hasattr(ckpt, "describe") else {}
    d.setdefault("path", str(getattr(ckpt, "path", "")))
    d.setdefault("kind", getattr(ckpt, "kind", None))
    d.setdefault("global_step", getattr(ckpt, "global_step", None))
    d.setdefault("lr", getattr(ckpt, "lr", None))
    return dict(to_jsonable(d))


def _plots_and_report(summary: dict[str, Any], rd: ResultsDir, warnings_: list[str]) -> None:
    plots: list[Path] = []
    try:
        from deltaH.io.plots import make_plots

        plots = make_plots(summary, rd.load_arrays(), rd.path / "plots")
    except ImportError as exc:
        summary["warnings"].append(f"plots skipped: {exc}")
        rd.write_json("summary.json", summary, gzip_large=True)
    from deltaH.io.report import write_report

    write_report(summary, rd.path, plots)


def _report_only(summary: dict[str, Any], rd: ResultsDir) -> None:
    from deltaH.io.report import write_report

    write_report(summary, rd.path, [])


def to_np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)
