"""Several checkpoints as one study: one sub-folder each, plus ``study.json`` and a trajectory plot."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from deltaH.config import Config
from deltaH.io.results import ResultsDir
from deltaH.runner.summary import ref_index

log = logging.getLogger(__name__)


def study_row(ckpt_path: str, s: dict[str, Any]) -> dict[str, Any]:
    """One checkpoint's line of the study: entropy and ΔH / δH₁ of the full update at η_ref."""
    i = ref_index(s["eta"], s["eta_reference"])
    full = s["decompositions"]["full"]
    first = full["first_order"]
    return {
        "checkpoint": Path(ckpt_path).name,
        "global_step": s["checkpoint"].get("global_step"),
        "h_orig": s["h_orig"],
        "delta_h_ref": full["delta_h"][i],
        "delta_h1_ref": None if first is None else first["delta_h"][i],
    }


def run_study(cfg: Config, paths: list[str], rd: ResultsDir, quiet: bool, on_stage: Any = None) -> None:
    from deltaH.runner.orchestrate import analyse_checkpoint

    rows = []
    for i, p in enumerate(tqdm(paths, desc="checkpoints", disable=quiet)):
        sub_path = rd.path / f"{i:02d}-{Path(p).name}"
        sub = (
            ResultsDir.open(sub_path)
            if (sub_path / "progress.json").is_file()
            else ResultsDir.create(rd.path, sub_path)
        )
        if sub.progress().get("status") != "complete":
            analyse_checkpoint(cfg, p, sub, quiet, on_stage)
            sub.set_progress(status="complete")
        rows.append(study_row(p, sub.read_json("summary.json")))
    rd.write_json("study.json", {"checkpoints": rows})
    if cfg.output.plots:
        try:
            from deltaH.io.plots import make_trajectory_plot

            make_trajectory_plot(rows, rd.path / "plots" / "trajectory.png")
        except ImportError as exc:
            log.warning("trajectory plot skipped: %s", exc)
