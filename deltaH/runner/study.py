"""Several checkpoints as one study: one sub-folder each, plus ``study.json`` and a trajectory plot.

Each checkpoint runs in its own guard (:func:`deltaH.io.results.run_guard` on its sub-folder): a
checkpoint that fails is recorded in ``study.json`` as ``{"checkpoint", "status": "failed", "error"}``
and in the study's ``run.log`` with its traceback, and the others are analysed all the same. The run
then ends ``partial`` (:func:`deltaH.runner.orchestrate.run`); ``--resume`` analyses again only the
checkpoints whose sub-folder is not complete.

In a distributed run every rank walks the checkpoints; rank 0 alone has the folders (the others pass
``rd = None``) and tells the others which checkpoints are already complete. A failure there ends the
whole run (:mod:`deltaH.runner.distributed`) instead of moving on to the next checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deltaH import _dist
from deltaH.config import Config
from deltaH.io.results import RUN_LOG, ResultsDir, log_traceback, run_guard
from deltaH.runner import distributed
from deltaH.runner.summary import ref_index
from deltaH.runner.token_stages import study_columns

log = logging.getLogger(__name__)


def study_row(ckpt_path: str, s: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's line of the study: entropy and ΔH / δH₁ of the full update at η_ref."""
    i = ref_index(s["eta"], s["eta_reference"])
    full = s["decompositions"]["full"]
    first = full["first_order"]
    return {
        "checkpoint": Path(ckpt_path).name,
        "status": "complete",
        "global_step": s["checkpoint"].get("global_step"),
        "h_orig": s["h_orig"],
        "eta_reference": s["eta_reference"],
        "eta_reference_source": s.get("eta_reference_source"),
        "delta_h_ref": full["delta_h"][i],
        "delta_h1_ref": None if first is None else first["delta_h"][i],
        **step_columns(s),
        **study_columns(s),
    }


def step_columns(s: dict[str, Any]) -> dict[str, Any]:
    """The step after the checkpoint (``step``), where its U came from, and — when the next checkpoint
    exists — the entropy change that really happened (``delta_h_realised``, the realised step at
    η = 1) beside the predicted one (``delta_h_predicted``: the rebuilt step at η = lr, true and first
    order) and the replay error."""
    rp = s.get("replay") or {}
    by = {d["name"]: d for d in rp.get("directions") or []}
    real = by.get("realised") or {}
    pred = by.get("replayed") or by.get("sampled") or {}
    return {
        "step": rp.get("step"),
        "update_source": rp.get("source"),
        "delta_h_realised": real.get("delta_h"),
        "delta_h_predicted": pred.get("delta_h"),
        "delta_h1_predicted": pred.get("delta_h1"),
        "step_error": rp.get("step_error"),
    }


def failed_row(ckpt_path: str, exc: Exception) -> dict[str, Any]:
    """The line of a checkpoint whose analysis raised ``exc``: its error in one line."""
    text = str(exc).strip()
    return {
        "checkpoint": Path(ckpt_path).name,
        "status": "failed",
        "error": f"{type(exc).__name__}: {text.splitlines()[0] if text else type(exc).__name__}",
    }


def _sub_folder(rd: ResultsDir, i: int, ckpt_path: str) -> ResultsDir:
    path = rd.path / f"{i:02d}-{Path(ckpt_path).name}"
    sub = ResultsDir.open(path) if (path / "progress.json").is_file() else ResultsDir.create(rd.path, path)
    sub.owned = False  # a failed checkpoint's folder stays, for its run.log and its cache (--resume)
    return sub


def _analyse(
    cfg: Config, ckpt_path: str, sub: ResultsDir | None, quiet: bool, on_stage: Any
) -> dict[str, Any] | None:
    """One checkpoint in its guard (run.log, status); returns its study row (None without a folder:
    another rank of a distributed run)."""
    from deltaH.runner.orchestrate import analyse_checkpoint

    if not distributed.broadcast(sub is not None and sub.progress().get("status") == "complete"):
        if sub is None:
            analyse_checkpoint(cfg, ckpt_path, None, quiet, on_stage)
            return None
        sub.set_progress(status="running", error=None)
        with run_guard(sub):
            analyse_checkpoint(cfg, ckpt_path, sub, quiet, on_stage)
        sub.set_progress(status="complete", error=None)
    return None if sub is None else study_row(ckpt_path, sub.read_json("summary.json"))


def run_study(
    cfg: Config, paths: list[str], rd: ResultsDir | None, quiet: bool, on_stage: Any = None
) -> list[str]:
    """Analyse each checkpoint of ``paths`` into ``rd/NN-<name>``, write ``study.json`` (one row per
    checkpoint, in order) and ``plots/trajectory.png`` (the checkpoints that succeeded); returns the
    names of the checkpoints that failed. If every one failed, the first failure is raised (after
    ``study.json`` is written), as a run of that checkpoint alone would raise it.
    """
    rows: list[dict[str, Any]] = []
    first_failure: Exception | None = None
    if rd is None:  # another rank of a distributed run: the same checkpoints, rank 0 writes
        for p in paths:
            _analyse(cfg, p, None, quiet, on_stage)
        return []
    for i, p in enumerate(tqdm(paths, desc="checkpoints", disable=quiet)):
        try:
            row_ok = _analyse(cfg, p, _sub_folder(rd, i, p), quiet, on_stage)
            assert row_ok is not None
            rows.append(row_ok)
        except Exception as exc:  # one checkpoint's failure never discards the others
            if _dist.active():
                raise  # ... but in a distributed run the other ranks may be blocked inside it: end the run
            row = failed_row(p, exc)
            rows.append(row)
            log_traceback(rd.path / RUN_LOG, f"checkpoint {p} failed")
            log.warning("checkpoint %s failed (%s); going on with the others", p, row["error"])
            first_failure = first_failure or exc
    ok = [r for r in rows if r["status"] == "complete"]
    failed = [r["checkpoint"] for r in rows if r["status"] == "failed"]
    rd.write_json("study.json", {"status": "partial" if failed else "complete", "checkpoints": rows})
    if first_failure is not None and not ok:
        raise first_failure
    if cfg.output.plots and ok:
        try:
            from deltaH.io.plots import make_trajectory_plot

            make_trajectory_plot(ok, rd.path / "plots" / "trajectory.png")
        except ImportError as exc:
            log.warning("trajectory plot skipped: %s", exc)
    return failed
