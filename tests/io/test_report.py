"""Results presentation: plots (valid PNGs, no matplotlib warnings), report.md and the inspect table.

The summaries are written here in the JSON layout of ``summary.json`` and read with
``RunSummary.from_json`` (:func:`typed`), as ``deltah inspect`` reads a results folder.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from deltaH import analysis as A  # noqa: E402
from deltaH.io import plots as P  # noqa: E402
from deltaH.io import report as R  # noqa: E402
from deltaH.io.schema import KernelInfo, RunSummary  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DECS = ("full", "baseline", "grad", "baseline+grad")
N_E, N_U, G_U = 32, 24, 6
ETA = np.logspace(-7, -1, 13)
ETA_REF = float(ETA[7])  # 1e-3.5 ≈ 3.16e-4, on the grid


def typed(summary: dict[str, Any]) -> RunSummary:
    """``summary`` as written to and read back from ``summary.json`` (NaN → null → NaN)."""
    return RunSummary.from_json(json.loads(json.dumps(summary, indent=2, sort_keys=True)))


def _nan_to_none(a: np.ndarray) -> list[Any]:
    return [None if not np.isfinite(v) else float(v) for v in a]


def with_trust(decs: dict[str, Any], h_orig: float, dtype: str = "float32",
               top_p: bool = True) -> dict[str, Any]:
    """``summary["trust"]`` as the runner builds it: the one trust rule on every decomposition
    (``h_orig = 0``: no dtype prior on the precision floor)."""
    cols = {k: [[decs[d][k][i] for d in DECS] for i in range(ETA.size)]
            for k in ("delta_h", "ess", "khat", "retained_mass")}
    return A.trust_summary(list(ETA), DECS, cols, [decs[d]["first_order"]["slope"] for d in DECS], N_E,
                           0.6, top_p=top_p, noise=A.rounding_noise(dtype, h_orig, N_E), dtype=dtype)


def synthetic(tmp_path: Path | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A summary following docs/results-schema.md: ΔH < 0 for full/grad, > 0 for the baseline.

    ΔH = slope·η + curv·η² + float noise near 1e-8, so the full ΔH changes sign at large η and the
    smallest η sit at the precision floor; ESS falls and k̂ rises with η; the kernel was not run.
    """
    rng = np.random.default_rng(0)
    slopes = {"full": -12.0, "baseline": 2.0, "grad": -14.0}
    curv = {"full": 400.0, "baseline": -10.0, "grad": 380.0}
    decs: dict[str, Any] = {}
    cols = {}
    for d in ("full", "baseline", "grad"):
        # float32 rounding noise of ~1e-6 nats: the two smallest η sit at the precision floor
        dh = slopes[d] * ETA + curv[d] * ETA**2 + 1e-6 * rng.standard_normal(ETA.size)
        cols[d] = dh
    cols["baseline+grad"] = cols["full"] + 1e-9 * rng.standard_normal(ETA.size)
    slopes["baseline+grad"] = slopes["full"]
    for d in DECS:
        dh = cols[d]
        size = abs(slopes[d]) * ETA  # ESS falls and k̂ rises with the size of the step
        ess = N_E / (1 + (size / 0.04) ** 2)
        khat = np.clip(0.05 + 0.8 * np.log10(1 + size / 0.025), None, 1.4)
        khat[0] = np.nan  # equal weights: k̂ undefined (null in JSON)
        decs[d] = {
            "delta_h": _nan_to_none(dh), "delta_h_per_token": _nan_to_none(dh / 5.1),
            "ess": _nan_to_none(ess), "khat": _nan_to_none(khat),
            "logw_max": _nan_to_none(30 * ETA), "logw_min": _nan_to_none(-30 * ETA),
            "retained_mass": [1.0] * ETA.size,
            "first_order": {"slope": slopes[d], "stderr_slope": 0.25 * abs(slopes[d]),
                            "delta_h": _nan_to_none(slopes[d] * ETA)},
            "second_order": None,
            "fit": {"slope_origin": slopes[d] * 1.01, "r2_origin": 0.998, "slope": slopes[d],
                    "intercept": 1e-9, "r2": 0.999, "loglog_slope": 1.02},
        }
    col_target = rng.normal(-1.2e-4, 1.5e-4, N_U)
    col_target[3] = -1.6e-3  # one update sequence dominates
    m_true = col_target / N_E + 2e-5 * rng.standard_normal((N_E, N_U))
    m_true[5:9, 3] -= 1e-4  # ...mostly through a few evaluation sequences
    m_fo = m_true * 0.97 + 1e-6 * rng.standard_normal((N_E, N_U))
    col = m_true.sum(0)
    rewards = (rng.random(N_U) > 0.5).astype(float)
    adv = rewards - rewards.reshape(-1, G_U).mean(1).repeat(G_U)
    order = np.argsort(-np.abs(col))[:5]
    share = 1 / N_E + 0.02 * rng.standard_normal(N_E)
    psf = np.outer(cols["full"], share / share.sum())
    row_tot = psf[7]
    e_order = np.argsort(-np.abs(row_tot))[:5]
    summary: dict[str, Any] = {
        "deltah_version": "0.1.0", "created": "2025-01-01T00:00:00", "git_revision": None,
        "versions": {"python": "3.11", "torch": "2.13.0", "transformers": "5.0", "peft": "0.21"},
        "status": "complete",
        "config": {"policy": {"temperature": 0.8, "top_p": 0.95}, "max_new_tokens": 16},
        "seeds": {"seed": 0, "eval": 1, "update": 2, "kernel": 3},
        "timings": {"load": 1.2, "total": 12.1},
        "checkpoint": {"path": "runs/toy/checkpoint-4", "kind": "trainer", "global_step": 4, "lr": ETA_REF,
                       "n_trainable": 12345, "dtype": "float32"},
        "batches": {
            "eval": {"n": N_E, "n_prompts": 8, "group_size": 4, "mean_tokens": 5.1},
            "update": {"n": N_U, "n_prompts": N_U // G_U, "group_size": G_U, "mean_tokens": 5.0,
                       "mean_reward": float(rewards.mean()), "resampled_groups": 1},
        },
        "update": {"loss_type": "dapo", "lr_ref": ETA_REF, "clip_coef": 0.8, "grad_norm": 1.25},
        "h_orig": 3.21, "h_orig_per_token": 0.6294, "entropy_mode": "rb",
        "eta": ETA.tolist(), "eta_reference": ETA_REF,
        "decompositions": decs,
        "trust": with_trust(decs, 3.21),
        "influence": {
            "eta": ETA_REF, "kind": ["true", "first_order"], "column_delta_h": col.tolist(),
            "top_update": [{"row": int(i), "delta_h": float(col[i]), "reward": float(rewards[i]),
                            "advantage": float(adv[i]), "prompt": f"What is {i} + {i}?",
                            "response": f"The answer | is {2 * i}\nDone."} for i in order],
            "top_eval": [{"row": int(n), "delta_h": float(row_tot[n])} for n in e_order],
        },
        "kernel": None,
        "proxy": {"cov": 0.8, "delta_h_per_token": -0.8 * ETA_REF, "mean_response_tokens": 5.0,
                  "delta_h_per_sequence": -0.8 * ETA_REF * 5.0, "eta": ETA_REF},
        "warnings": ["1 update group had equal rewards and was resampled"],
    }
    summary["warnings"] += A.trust_warnings(summary["trust"])  # as the runner writes them
    arrays = {
        "eta": ETA, "delta_h": np.stack([cols[d] for d in DECS], 1),
        "delta_h1": np.stack([slopes[d] * ETA for d in DECS], 1),
        "ess": np.stack([decs[d]["ess"] for d in DECS], 1),
        "khat": np.array([decs[d]["khat"] for d in DECS], dtype=float).T, "per_sequence_full": psf,
        "influence_true": m_true, "influence_first_order": m_fo,
        "eval_logq": -rng.gamma(3.0, 2.0, N_E), "eval_entropy": rng.gamma(3.0, 1.0, N_E),
        "update_rewards": rewards, "update_advantages": adv,
    }
    return summary, arrays


def _f(x: float) -> str:
    """3 significant digits as the report writes them (``-0.00375``, ``-7.36e-4``), written out here."""
    if 1e-3 <= abs(x) < 1e3:
        return f"{x:.3g}"
    mant, exp = f"{x:.2e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def _check_png(p: Path) -> None:
    data = p.read_bytes()
    assert data[:8] == PNG_MAGIC, p
    assert len(data) > 10_000, (p, len(data))


def test_fmt() -> None:
    assert R.fmt(-0.012345) == "-0.0123"
    assert R.fmt(5e-4) == "5e-4"
    assert R.fmt(1.2345e-5) == "1.23e-5"
    assert R.fmt(3.21) == "3.21"
    assert R.fmt(1234.5) == "1234"
    assert R.fmt(None) == "n/a"
    assert R.fmt(float("nan")) == "NaN"
    assert R.fmt(0.0) == "0"
    assert R.fmt(7) == "7"


def test_plots_and_report(tmp_path: Path) -> None:
    summary, arrays = synthetic()
    plots = P.make_plots(typed(summary), arrays, tmp_path / "plots")
    names = sorted(p.name for p in plots)
    assert names == ["contributors.png", "delta_h_vs_eta.png", "ess_khat.png", "influence.png"]
    for p in plots:
        assert p.parent == tmp_path / "plots"
        _check_png(p)

    path = R.write_report(typed(summary), tmp_path, plots)
    assert path == tmp_path / "report.md"
    text = path.read_text(encoding="utf-8")

    # headline numbers, formatted independently here
    full = summary["decompositions"]["full"]
    dh, dh_tok = full["delta_h"][7], full["delta_h_per_token"][7]
    d1, se = -12.0 * ETA_REF, 3.0 * ETA_REF
    head = text.split("## Setup")[0]
    assert "η = 3.16e-4" in head
    assert abs(dh) > 1e-3 and abs(dh_tok) < 1e-3  # both styles appear
    assert f"ΔH = {_f(dh)} nats per sequence ({_f(dh_tok)} per token)" in head
    assert f"δH₁ = {_f(d1)} ± {_f(se)}" in head
    assert dh < 0 and summary["decompositions"]["baseline"]["delta_h"][7] > 0

    # decomposition table: one row per decomposition, with the values at η_ref
    for d in DECS:
        dd = summary["decompositions"][d]
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {d} |"))
        assert f"| {_f(dd['delta_h'][7])} |" in row
        assert f"| {_f(dd['khat'][7])} |" in row
        assert "1.02" in row and "0.998" in row
    assert "| decomposition |" in text

    # trust, warnings, influence with text snippets, proxy, kernel
    assert "trusted for η from 1e-7 to 0.00316" in text and "**inside** the trusted range" in text
    assert len(summary["warnings"]) == 5  # the resampling note + one line per decomposition
    for w in summary["warnings"]:
        assert w in text
    assert "No warnings were raised" not in text
    assert "| 1e-7 | 32 | n/a | 1 | ok | precision floor | precision floor | ok |" in text
    top = summary["influence"]["top_update"][0]
    assert f"What is {top['row']} + {top['row']}?" in text
    assert "The answer \\| is" in text  # pipes escaped inside a table cell
    assert "## Proxy comparison" in text and "covariance proxy" in text and "agrees" in text
    kernel = text.split("## Kernel summary")[1].split("##")[0]
    assert "not run" in kernel

    # every image link resolves to an existing PNG
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4
    for rel in links:
        assert not Path(rel).is_absolute() and rel.startswith("plots/")
        _check_png(tmp_path / rel)
    assert "## How to read this" in text and "retained mass" in text
    # formulas are linked to the math page users have, never to internal design notes
    assert "docs/math.md#influence-matrices" in text and "docs/math.md" in text.split("## How to read")[1]
    assert "DESIGN" not in text and "§" not in text


def test_format_summary_table() -> None:
    summary, _ = synthetic()
    table = R.format_summary_table(typed(summary))
    for d in DECS:
        assert re.search(rf"^{re.escape(d)}\s", table, re.M), d
    assert "status: complete" in table
    assert "kernel: not run" in table
    assert _f(summary["decompositions"]["full"]["delta_h"][7]) in table
    assert "warnings (5):" in table and summary["warnings"][1] in table
    assert re.search(r"^grad\s.*\sok$", table, re.M)  # η_ref = 3.16e-4 is trusted everywhere


def test_all_optional_analyses_null(tmp_path: Path) -> None:
    summary, _ = synthetic()
    for k in ("decompositions", "trust", "influence", "kernel", "proxy", "checkpoint", "update"):
        summary[k] = None
    summary.update(eta=None, eta_reference=None, warnings=[], status="incomplete")
    plots = P.make_plots(typed(summary), {}, tmp_path / "plots")
    assert plots == []
    text = R.write_report(typed(summary), tmp_path, plots).read_text(encoding="utf-8")
    assert "Status: incomplete" in text
    # optional analyses that were off are "not run"; parts every run records are "not recorded"
    for line in ("Influence of individual update sequences: not run.", "Covariance proxy: not run.",
                 "Cross Fisher kernel: not run.", "- **Checkpoint:** not recorded.",
                 "- **Update:** not recorded.", "True ΔH along the update directions: not recorded.",
                 "Trust analysis: not recorded.", "the true entropy change was not recorded."):
        assert line in text, line
    assert "![" not in text
    table = R.format_summary_table(typed(summary))
    for line in ("influence: not run", "kernel: not run", "proxy: not run", "trust: not recorded"):
        assert line in table.splitlines(), line
    assert table.count("not recorded") == 5  # the four decomposition rows and trust


def test_partial_arrays_and_sign_change(tmp_path: Path) -> None:
    """Influence arrays only (no sweep), and a sweep where every ΔH is negative or zero."""
    summary, arrays = synthetic()
    only_inf = {k: arrays[k] for k in ("influence_true",)}
    s2 = dict(summary, decompositions=None, eta=None)
    assert sorted(p.name for p in P.make_plots(typed(s2), only_inf, tmp_path / "a")) == ["contributors.png",
                                                                                          "influence.png"]
    s3 = json.loads(json.dumps(summary))
    for d in DECS:
        dd = s3["decompositions"][d]
        dd["delta_h"] = [-abs(v) if v else 0.0 for v in dd["delta_h"]]
        dd["fit"]["slope_origin"] = None
    s3["trust"]["trusted"] = None  # fall back to eta_min / eta_max
    for d in DECS:
        s3["trust"]["decompositions"][d]["trusted"] = None
    t3 = typed(s3)
    mask = P.trusted_mask(t3, ETA, "full")
    lo, hi = s3["trust"]["eta_min"], s3["trust"]["eta_max"]
    assert mask is not None and mask.tolist() == [lo <= e <= hi for e in ETA] and 0 < mask.sum() < ETA.size
    p = P.plot_delta_h_vs_eta(t3, {}, tmp_path / "b.png")
    assert p is not None
    _check_png(p)


def test_trajectory_plot(tmp_path: Path) -> None:
    rows = [{"global_step": s, "h_orig": 3.2 - 0.1 * s, "delta_h_ref": -0.01 * (s + 1),
             "delta_h1_ref": -0.009 * (s + 1) if s != 2 else None} for s in (4, 0, 2, 6)]
    p = P.make_trajectory_plot(rows, tmp_path / "plots" / "trajectory.png")
    _check_png(p)
    text = R.write_report(typed(synthetic()[0]), tmp_path, [p]).read_text(encoding="utf-8")
    assert "](plots/trajectory.png)" in text


def test_missing_matplotlib(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        P.make_plots(typed(synthetic()[0]), {}, tmp_path)


def _flag_baseline_khat() -> dict[str, Any]:
    """The `make demo` case: only the baseline's k̂ at η_ref fails, the summary's own warnings list is
    empty (as a hand-made or older summary's may be)."""
    summary, _ = synthetic()
    for d in DECS:  # a clean line with nearly equal weights everywhere
        dd = summary["decompositions"][d]
        slope = dd["first_order"]["slope"]
        dd["delta_h"] = [slope * e for e in ETA]
        dd["ess"] = [N_E * (1 - 1e-6)] * ETA.size
        dd["khat"] = [0.2] * ETA.size
    base = summary["decompositions"]["baseline"]
    base["khat"] = [0.9] * ETA.size  # above 0.6 everywhere; informative only where the weights vary
    base["ess"][7] = N_E / 1.05
    summary["trust"] = with_trust(summary["decompositions"], 0.0, top_p=False)
    summary["warnings"] = []
    return summary


def test_report_and_inspect_agree_on_a_flagged_khat(tmp_path: Path) -> None:
    summary = json.loads(json.dumps(_flag_baseline_khat()))
    (line,) = A.trust_warnings(summary["trust"])
    assert typed(summary).trust.warning_lines() == [line]
    assert line.startswith("baseline: ΔH untrusted at 6 of 13 η — η = 0.000316 (step too large: k̂ 0.90 > "
                           "0.600 and the weights vary (N/ESS − 1 = 0.05 > 0.01)), "
                           "η = 0.001 … 0.1 (at η = 0.001: above a failing η")
    text = R.write_report(typed(summary), tmp_path, []).read_text(encoding="utf-8")
    table = R.format_summary_table(typed(summary))
    assert "No warnings were raised" not in text and "Warnings (1):" in text and line in text
    assert "warnings (1):" in table and line in table
    assert re.search(r"^baseline\s.*UNTRUSTED: step too large$", table, re.M)
    assert re.search(r"^full\s.*\sok$", table, re.M) and "[UNTRUSTED for baseline]" in table
    row = next(ln for ln in text.splitlines() if ln.startswith("| baseline |"))
    assert row.endswith("| step too large |")
    assert "at this η ΔH is untrusted for `baseline`" in text.split("## Setup")[0]
    # where the weights are nearly equal the same k̂ is not a flag: every η below η_ref is ok
    assert [r["trusted"] for r in summary["trust"]["per_eta"]] == [j < 7 for j in range(ETA.size)]


def test_clean_summary_says_no_warnings(tmp_path: Path) -> None:
    summary = _flag_baseline_khat()
    summary["decompositions"]["baseline"]["ess"][7] = N_E * (1 - 1e-6)
    summary["trust"] = with_trust(summary["decompositions"], 0.0, top_p=False)
    text = R.write_report(typed(summary), tmp_path, []).read_text(encoding="utf-8")
    table = R.format_summary_table(typed(summary))
    assert "No warnings were raised." in text and "warnings: none" in table
    assert "UNTRUSTED" not in table and "[trusted]" in table


def test_trust_wording(tmp_path: Path) -> None:
    """No "NaN nats" floor; one k̂ threshold with its formula; retained mass is an estimate that may
    exceed 1 and appears only under top-p; the compute dtype and the clipping norm are reported."""
    summary, _ = synthetic()
    summary["trust"]["precision_floor"] = None
    summary["batches"]["eval"]["n"] = 256
    summary["trust"]["khat_threshold"] = 0.5847589881390798
    summary["checkpoint"].update(dtype="bfloat16", trainable_dtype="float32", max_grad_norm=1.0)
    text = R.render_report(typed(summary), tmp_path)
    assert "NaN nats" not in text and "No precision floor was found in the sweep" in text
    assert "threshold 0.585 = min(1 − 1/log10 N, 0.7) for N = 256" in text and "≤ 0.7" not in text
    assert "computed in bfloat16 (trainable parameters stored in float32)" in text
    assert "clipped at norm 1 (clipping factor 0.8)" in text
    assert "sampling noise can put it above 1" in text and "Retained mass at η_ref" in text
    summary["trust"]["top_p"] = False
    text = R.render_report(typed(summary), tmp_path)
    assert "Retained mass at η_ref" not in text and "| retained mass |" not in text
    summary["trust"].update(precision_floor=1e-6, dtype="bfloat16", noise=7.7e-4)
    text = R.render_report(typed(summary), tmp_path)
    assert ("At and below η = 1e-6 the measured change is rounding noise (σ ≥ 7.7e-4 nats of bfloat16 "
            "rounding noise): the precision floor (computing in float32, checkpoint.dtype=float32") in text


def test_report_is_the_same_from_memory_and_from_the_file(tmp_path: Path) -> None:
    """The runner renders the summary it holds (NaN, inf); inspect and later readers get it back from
    summary.json (null). Both must print the same report: a non-finite value reads "n/a", never "NaN"."""
    s = typed(synthetic()[0])
    full = s.decompositions["full"]
    khat = list(full.khat)
    khat[7] = math.nan
    ess = list(full.ess)
    ess[7] = math.inf
    mem = dataclasses.replace(
        s, kernel=KernelInfo("exact", math.nan, -4.5, math.nan, 1202.0, 0, 16384),
        decompositions={**s.decompositions, "full": dataclasses.replace(full, khat=khat, ess=ess)})
    back = RunSummary.from_json(json.loads(json.dumps(mem.to_json())))
    text = R.render_report(mem, tmp_path)
    assert text == R.render_report(back, tmp_path)
    assert R.format_summary_table(mem) == R.format_summary_table(back)
    assert "| same prompt | n/a | n/a | n/a | 0 |" in text
    assert "NaN" not in text and not re.search(r"\binf\b", text)
    row = next(ln for ln in text.splitlines() if ln.startswith("| full |"))
    assert "| n/a | n/a |" in row  # ESS and k̂ at η_ref


def test_older_summary_without_new_keys(tmp_path: Path) -> None:
    """A folder written before the per-η verdicts and nucleus moves: the report and inspect say what was
    not recorded and fall back to the full update's stored trusted range."""
    summary, _ = synthetic()
    del summary["trust"]["per_eta"], summary["trust"]["decompositions"], summary["trust"]["top_p"]
    assert "nucleus_changed" not in summary["decompositions"]["full"]  # synthetic() predates it too
    summary["warnings"] = summary["warnings"][:1]
    text = R.render_report(typed(summary), tmp_path)
    assert "Per-η verdicts: not recorded." in text
    assert "| nucleus moved |" not in text  # the column is left out, not filled with blanks
    assert "**inside** the trusted range" in text and "Warnings (1):" in text
    table = R.format_summary_table(typed(summary))
    assert "eta_ref = 3.16e-4  [trusted]" in table
    assert re.search(r"^full\s.*\sok$", table, re.M) and re.search(r"^grad\s.*\sn/a$", table, re.M)

    del summary["trust"]
    text = R.render_report(typed(summary), tmp_path)
    assert "Trust analysis: not recorded." in text
    assert "trust: not recorded" in R.format_summary_table(typed(summary))


def test_a_plain_dict_is_refused_with_the_fix(tmp_path: Path) -> None:
    summary, arrays = synthetic()
    fix = r"RunSummary, not a dict: read summary.json with RunSummary\.from_json"
    for call in (lambda: P.make_plots(summary, arrays, tmp_path), lambda: R.render_report(summary, tmp_path),
                 lambda: R.format_summary_table(summary)):
        with pytest.raises(TypeError, match=fix):
            call()


def test_inspect_reads_a_gzipped_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deltaH.cli import main

    summary, _ = synthetic()
    summary["kernel"] = {"method": "exact", "mean_same": None, "mean_diff": -4.5, "abs_same": None,
                         "abs_diff": 1202.0, "n_same": 0, "n_diff": 16384}
    (tmp_path / "progress.json").write_text(json.dumps({"status": "complete", "done": ["report"]}))
    (tmp_path / "summary.json.gz").write_bytes(gzip.compress(json.dumps(summary).encode()))
    assert main(["-q", "inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out == R.format_summary_table(typed(summary)) + "\n"
    assert "kernel: done" in out and "status: complete" in out


def test_summary_written_without_matplotlib_says_plots_were_skipped(monkeypatch: pytest.MonkeyPatch,
                                                                    tmp_path: Path) -> None:
    from deltaH.config import load_config
    from deltaH.io.results import ResultsDir
    from deltaH.runner.write import write_summary_and_report

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rd = ResultsDir.create(tmp_path, tmp_path / "run")
    summary = typed(synthetic()[0])
    written = write_summary_and_report(rd, load_config("configs/toy.yaml"), summary)
    line = "plots skipped: deltaH plots need matplotlib: pip install matplotlib"
    assert written.warnings == [*summary.warnings, line] and line not in summary.warnings  # frozen: a copy
    assert rd.read_json("summary.json")["warnings"][-1] == line
    text = (rd.path / "report.md").read_text(encoding="utf-8")
    assert f"- {line}" in text and "![" not in text


def with_attribution(summary: dict[str, Any]) -> dict[str, Any]:
    """``summary`` plus an ``attribution`` section built by the runner's own path (``attribute``, then
    ``attribution_summary``) from per-sequence contributions with known group sums: only the odd rows
    (negative advantage, reward 0) lower the entropy; the truncated rows 0, 2, 4 contribute ~0; every
    response has 5 tokens (the length family cannot split U)."""
    from deltaH.attribution import Contributions, UpdateTags, attribute
    from deltaH.runner.stages import Attributed
    from deltaH.runner.summary import attribution_summary

    rng = np.random.default_rng(1)
    adv = np.tile([1.0, -1.0], N_U // 2)
    d = np.where(adv < 0, -2e-4, 1e-6 * rng.standard_normal(N_U))
    # leave-one-out values: the column plus independent noise of 1e-5 per evaluation sequence, so a group
    # of k sequences has a jackknife SE of about 1e-5·sqrt(k·N_E) (≈ 2e-4 for 12): the odd rows' sum,
    # −2.4e-3, is ~10 s.e. from zero and the even rows' ~0 is within noise
    loo = d[None, :] + 1e-5 * rng.standard_normal((N_E, N_U))
    base_loo = 5e-4 + 1e-5 * rng.standard_normal(N_E)
    tags = UpdateTags(advantage=adv, reward=(adv > 0).astype(float),
                      group=np.repeat(np.arange(N_U // G_U), G_U),
                      truncated=np.isin(np.arange(N_U), [0, 2, 4]), length=np.full(N_U, 5),
                      text=[f"answer {i}" for i in range(N_U)])
    res = attribute(Contributions(d, loo, 5e-4, base_loo), Contributions(0.97 * d, 0.97 * loo, 4.8e-4), tags)
    info = attribution_summary(Attributed(tags, res, ETA_REF), [f"What is {i // G_U}?" for i in range(N_U)])
    assert info is not None
    return {**summary, "attribution": json.loads(json.dumps(dataclasses.asdict(info)))}


def test_attribution_section_answers_which_groups_drove_it(tmp_path: Path) -> None:
    summary, arrays = synthetic()
    s = typed(with_attribution(summary))
    att = s.attribution
    assert att is not None
    plots = P.make_plots(s, arrays, tmp_path / "plots")
    assert "attribution.png" in [p.name for p in plots]
    _check_png(tmp_path / "plots" / "attribution.png")
    text = R.write_report(s, tmp_path, plots).read_text(encoding="utf-8")
    neg = next(g for f in att.families if f.name == "advantage_sign" for g in f.groups
               if g.label == "negative advantage")
    assert neg.n == 12 and neg.true.delta_h == pytest.approx(-2.4e-3, rel=1e-12)
    assert 1e-4 < neg.true.se < 4e-4  # the noise put in: about 1e-5·sqrt(12·32)
    # the answer, in the headline and in the section
    head = text.split("## Setup")[0]
    dh, se = _f(neg.true.delta_h), _f(neg.true.se)
    assert ("**What drove the entropy down** (groups of the update batch with |ΔH| > 2 s.e., true ΔH in nats "
            f"per sequence; see *What drove it*): negative advantage: {dh} ± {se}") in head
    sec = text.split("## What drove it")[1].split("\n## ")[0]
    assert (f"- **advantage sign:** negative advantage lowers it (ΔH = {dh} ± {se}, "
            f"{_f(100 * neg.true.share)}% of the total); within noise: positive advantage") in sec
    assert "(the same sequences as advantage sign)." in sec.split("- **reward:**")[1].splitlines()[0]
    trunc = sec.split("- **truncation:** ")[1].splitlines()[0]
    assert trunc.startswith("finished (EOS) lowers it (ΔH = ")
    assert "; within noise: truncated (no EOS) (" in trunc
    assert ("- **response-length quartile:** not split: every response has the same length (5 tokens)."
            in sec)
    row = next(ln for ln in sec.splitlines() if ln.startswith("| advantage sign | negative advantage |"))
    assert row.startswith(f"| advantage sign | negative advantage | 12 | {dh} ± {se} | "
                          f"{_f(100 * neg.true.share)}% ± {_f(100 * neg.true.share_se)}% | ")
    assert "| same-prompt group | group 1: What is 1? | 6 |" in sec
    assert "| — | baseline (momentum + weight decay) |  | 5e-4 ± " in sec
    # the top sequences of both directions, with their text
    lower = sec.split("The 5 update sequences that lower the entropy most:")[1].split("The ")[0]
    assert "| answer 1 |" in lower and "| -1 |" in lower
    assert "The 5 update sequences that raise the entropy most:" in sec
    assert "](plots/attribution.png)" in sec
    assert "attribution: done" in R.format_summary_table(s)
    # and from a summary without it
    assert "Attribution to groups of update sequences: not run" in R.render_report(typed(summary), tmp_path)
