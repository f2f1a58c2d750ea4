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
from deltaH.analysis import Trust, linear_fits, trust_range
from deltaH.config import Config
from deltaH.estimators.first_order import FirstOrder
from deltaH.estimators.influence import CovarianceProxy
from deltaH.estimators.kernel import kernel_summary
from deltaH.io.results import to_jsonable
from deltaH.runner.stages import Batches, Directions, EtaGrid, InfluencePair, Inputs, Sweep
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


def ref_index(etas: list[float], eta_ref: float) -> int:
    """Index of the grid point closest (in log η) to ``eta_ref``."""
    return int(np.argmin([abs(math.log(e) - math.log(eta_ref)) for e in etas]))


def full_trust(sw: Sweep, fo: FirstOrder, etas: list[float], n_eval: int, check_retained: bool) -> Trust:
    """The trust verdicts of the full update's sweep."""
    f = {k: to_np(v)[:, 0] for k, v in sw.fields.items()}
    return trust_range(
        etas,
        f["delta_h"],
        float(fo.slope[0]),
        f["ess"],
        f["khat"],
        f["retained_mass"],
        n_eval,
        sw.khat_threshold,
        check_retained=check_retained,
    )


def decompositions(
    cfg: Config, sw: Sweep, fo: FirstOrder, so: torch.Tensor | None, etas: list[float], trusted: list[bool]
) -> dict[str, Any]:
    f = {k: to_np(v) for k, v in sw.fields.items()}
    slope = to_np(fo.slope)
    se = to_np(fo.stderr) if fo.stderr is not None else np.full_like(slope, np.nan)
    eta = np.asarray(etas)
    out: dict[str, Any] = {}
    for j, name in enumerate(DECOMPOSITIONS):
        first = {"slope": float(slope[j]), "stderr_slope": float(se[j]), "delta_h": (eta * slope[j]).tolist()}
        out[name] = {
            **{k: f[k][:, j].tolist() for k in f},
            "first_order": first if cfg.analyses.first_order else None,
            "second_order": None if so is None else to_np(so)[:, j].tolist(),
            "fit": linear_fits(etas, f["delta_h"][:, j], trusted),
        }
    return out


def influence_summary(inf: InfluencePair | None, bt: Batches) -> dict[str, Any] | None:
    if inf is None:
        return None
    col = to_np(inf.true.column_delta_h)
    row_sums = to_np(inf.true.matrix).sum(1)
    up, rows_u = bt.update, bt.update.rows()
    return {
        "eta": inf.true.eta,
        "kind": ["true", "first_order"],
        "column_delta_h": col.tolist(),
        "column_delta_h1": to_np(inf.first_order.column_delta_h).tolist(),
        "top_update": [
            {
                "row": int(i),
                "delta_h": float(col[i]),
                "reward": float(up.rewards[i]),
                "advantage": float(up.advantages[i]),
                "prompt": rows_u[i].get("prompt"),
                "response": rows_u[i].get("response"),
            }
            for i in np.argsort(-np.abs(col))[:10]
        ],
        "top_eval": [
            {"row": int(i), "delta_h": float(row_sums[i])} for i in np.argsort(-np.abs(row_sums))[:10]
        ],
    }


def batches_summary(cfg: Config, bt: Batches) -> dict[str, Any]:
    ev, up = bt.eval, bt.update
    return {
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
            "resampled_groups": bt.n_resampled,
        },
    }


def checkpoint_summary(inp: Inputs) -> dict[str, Any]:
    ckpt = inp.ckpt
    d = ckpt.describe() if hasattr(ckpt, "describe") else {}
    for k in ("path", "kind", "global_step", "lr"):
        d.setdefault(k, str(getattr(ckpt, k, "")) if k == "path" else getattr(ckpt, k, None))
    return {
        **to_jsonable(d),
        "n_trainable": int(sum(p.numel() for p in inp.params.values())),
        "dtype": str(inp.lm.dtype).replace("torch.", ""),
    }


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
    kern: torch.Tensor | None,
    px: CovarianceProxy | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    """The summary.json of one checkpoint."""
    etas, n_eval = grid.etas, len(bt.eval.batch)
    tr = full_trust(sw, fo, etas, n_eval, inp.policy.top_p < 1.0)
    warnings = [*bt.warnings, *dr.warnings, *grid.warnings]
    if not tr.trusted[ref_index(etas, dr.eta_ref)]:
        warnings.append(
            f"the reference η = {dr.eta_ref:.3g} is outside the trustworthy range "
            f"[{tr.eta_min:.3g}, {tr.eta_max:.3g}]: treat ΔH there with care"
        )
    ud = dr.update
    kernel = None
    if kern is not None:
        ks = kernel_summary(kern, bt.eval.prompt_index, bt.update.prompt_index)
        kernel = {"method": cfg.analyses.kernel_method, **ks.__dict__}
    return {
        "deltah_version": deltaH.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "git_revision": git_revision(),
        "versions": versions(),
        "status": "complete",
        "config": cfg.to_dict(),
        "seeds": inp.seeds.__dict__,
        "timings": timings,
        "checkpoint": checkpoint_summary(inp),
        "batches": batches_summary(cfg, bt),
        "update": {
            "loss_type": cfg.loss.type,
            "lr_ref": ud.lr_ref,
            "clip_coef": ud.clip_coef,
            "grad_norm": ud.grad_norm,
        },
        "h_orig": sw.h_orig,
        "h_orig_per_token": sw.h_orig_per_token,
        "entropy_mode": cfg.analyses.entropy_mode,
        "eta": etas,
        "eta_reference": dr.eta_ref,
        "decompositions": decompositions(cfg, sw, fo, so, etas, tr.trusted),
        "trust": {
            "eta_min": tr.eta_min,
            "eta_max": tr.eta_max,
            "precision_floor": tr.precision_floor,
            "khat_threshold": sw.khat_threshold,
            "trusted": tr.trusted,
            "notes": tr.notes,
        },
        "influence": influence_summary(inf, bt),
        "kernel": kernel,
        "proxy": None if px is None else dict(px.__dict__),
        "warnings": warnings + tr.notes,
    }
