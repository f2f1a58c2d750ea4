"""Write one checkpoint's results folder: batches, arrays, summary.json, plots and report.md.

What each ``output.detail`` level writes is listed in ``docs/results-schema.md``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from deltaH.config import Config
from deltaH.io.results import ResultsDir
from deltaH.io.schema import RunSummary
from deltaH.runner.stages import Attributed, Batches, InfluencePair, KernelRun, Sweep
from deltaH.runner.summary import to_np
from deltaH.stats import SequenceStats, TokenDiagnostics
from deltaH.updates.directions import DECOMPOSITIONS

log = logging.getLogger(__name__)
TOKEN_FIELDS = ("row", "position", "logq", "entropy", "top1", "nucleus", "eos")


def _detailed(cfg: Config) -> bool:
    return cfg.output.detail in ("detailed", "debug")


def write_batches(
    rd: ResultsDir,
    cfg: Config,
    bt: Batches,
    base: SequenceStats,
    diag: TokenDiagnostics | None,
    att: Attributed | None = None,
    token_rows: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
) -> None:
    eval_rows = bt.eval.rows()
    for r, lq, en in zip(eval_rows, base.logq.tolist(), base.entropy.tolist(), strict=True):
        r.update(logq=lq, entropy=en)
    update_rows = bt.update.rows()
    if att is not None and _detailed(cfg):  # each update sequence's contribution at η_ref, and its tag
        a = att.result
        for i, r in enumerate(update_rows):
            r.update(delta_h=float(a.delta_h[i]), delta_h_se=float(a.delta_h_se[i]),
                     delta_h1=float(a.delta_h1[i]), delta_h1_se=float(a.delta_h1_se[i]),
                     truncated=bool(att.tags.truncated[i]))
    if token_rows is not None and _detailed(cfg):  # each scored update token's δH₁ and the rules' values
        update_rows = token_rows(update_rows)
    if cfg.output.detail != "minimal":
        rd.write_jsonl("batches/eval.jsonl", eval_rows)
        rd.write_jsonl("batches/update.jsonl", update_rows)
    rd.save_array("eval_logq", base.logq, "log q of each evaluation sequence at θ [N_E]")
    rd.save_array("eval_entropy", base.entropy, "RB entropy of each evaluation sequence at θ [N_E]")
    rd.save_array("update_rewards", bt.update.rewards, "reward of each update sequence [N_U]")
    rd.save_array("update_advantages", bt.update.advantages, "advantage of each update sequence [N_U]")
    if diag is not None:
        for name in TOKEN_FIELDS:
            rd.save_array(
                f"eval_token_{name}",
                getattr(diag, name),
                f"per scored evaluation token at θ: {name} [P] (see stats.TokenDiagnostics)",
            )


def write_sweep(rd: ResultsDir, cfg: Config, etas: list[float], sw: Sweep, slope: torch.Tensor) -> None:
    eta = np.asarray(etas)
    rd.save_array("eta", eta, "η grid [n_eta]")
    rd.save_array("delta_h", to_np(sw.fields["delta_h"]), f"true ΔH [n_eta, 4] for {list(DECOMPOSITIONS)}")
    rd.save_array("delta_h1", eta[:, None] * to_np(slope)[None, :], "first-order δH₁ [n_eta, 4]")
    rd.save_array("ess", to_np(sw.fields["ess"]), "effective sample size [n_eta, 4]")
    rd.save_array("khat", to_np(sw.fields["khat"]), "PSIS k̂ [n_eta, 4]")
    rd.save_array(
        "nucleus_changed",
        to_np(sw.fields["nucleus_changed"]),
        "fraction of E's scored positions whose top-p nucleus moved [n_eta, 4]",
    )
    if _detailed(cfg):
        rd.save_array(
            "per_sequence_full",
            to_np(sw.per_sequence_full),
            "per-evaluation-sequence contributions c_n to ΔH along the full update [n_eta, N_E]",
        )


def write_analyses(
    rd: ResultsDir,
    cfg: Config,
    inf: InfluencePair | None,
    kern: KernelRun | None,
    att: Attributed | None = None,
) -> None:
    if inf is not None:
        rd.save_array("influence_true", inf.true.matrix, "true influence M[n, i] at η_ref [N_E, N_U]")
        rd.save_array("influence_first_order", inf.first_order.matrix, "first-order influence [N_E, N_U]")
        if _detailed(cfg):
            for kind, m in (("true", inf.true), ("first_order", inf.first_order)):
                if m.loo is not None:
                    rd.save_array(f"influence_{kind}_loo", m.loo,
                                  f"{kind} influence column sums with evaluation sequence n left out "
                                  "[N_E, N_U] (jackknife SE of any group of columns)")
    if att is not None:
        a, t = att.result, att.tags
        for name, arr, what in (
            ("update_delta_h", a.delta_h, "true ΔH along each update sequence's component at η_ref [N_U]"),
            ("update_delta_h_se", a.delta_h_se, "its jackknife standard error [N_U]"),
            ("update_delta_h1", a.delta_h1, "δH₁ along each update sequence's component at η_ref [N_U]"),
            ("update_delta_h1_se", a.delta_h1_se, "its jackknife standard error [N_U]"),
            ("update_group", t.group, "same-prompt group of each update sequence [N_U]"),
            ("update_length", t.length, "response tokens of each update sequence (EOS included) [N_U]"),
            ("update_truncated", t.truncated, "True where the response did not end with EOS [N_U]"),
        ):
            rd.save_array(name, np.asarray(arr), what)
    if kern is not None:
        rd.save_array("kernel", kern.kernel, "cross Fisher kernel K[t, i] [N_E, N_U]")
        rd.save_array("kernel_prompt_eval", kern.prompt_e,
                      "prompt number of each evaluation sequence (equal prompt tokens, equal number) [N_E]")
        rd.save_array("kernel_prompt_update", kern.prompt_u,
                      "prompt number of each update sequence, same numbering [N_U]")
        pk = kern.projected
        if pk is not None and pk.check_columns is not None and pk.check_exact is not None:
            rd.save_array("kernel_check_columns", pk.check_columns,
                          "update sequences whose exact kernel column checks the projection [m]")
            rd.save_array("kernel_check_exact", pk.check_exact, "their exact kernel columns [N_E, m]")


def write_summary_and_report(rd: ResultsDir, cfg: Config, summary: RunSummary) -> RunSummary:
    """summary.json, then the plots (optional) and report.md that are made from it; returns the summary
    as written (with a warning added when the plots could not be drawn)."""
    plots = []
    if cfg.output.plots:
        try:
            from deltaH.io.plots import make_plots

            plots = make_plots(summary, rd.load_arrays(), rd.path / "plots")
        except ImportError as exc:
            summary = dataclasses.replace(summary, warnings=[*summary.warnings, f"plots skipped: {exc}"])
    rd.write_json("summary.json", summary.to_json(), gzip_large=True)
    from deltaH.io.report import write_report

    write_report(summary, rd.path, plots)
    return summary
