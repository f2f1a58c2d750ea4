"""``report.md``: a results folder in words, tables and plots, readable without the code.

``write_report(summary, run_dir, plots)`` reads only the :class:`~deltaH.io.schema.RunSummary`
(``docs/results-schema.md``) and, for text snippets of the most influential sequences,
``batches/*.jsonl`` beside it when present. An optional analysis that was off (``null``) is
reported as "not run"; a part every run records but this summary lacks (an older folder) as
"not recorded". ``format_summary_table(summary)`` is the plain-text table of
``deltah inspect RESULTS_DIR``.

Numbers carry 3 significant digits; magnitudes below 1e-3 or from 1e6 up are written as
``1.23e-5``; NaN and inf (``null`` in ``summary.json``) as n/a. Minus signs are ASCII so values can
be copied into code.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

from deltaH.io import _report_analyses as analyses
from deltaH.io import _report_attribution as attribution
from deltaH.io import _report_controls as controls_report
from deltaH.io import _report_kernel as kernel_report
from deltaH.io import _report_proxies as token_rules
from deltaH.io import _report_replay as replay
from deltaH.io import _report_sections as sections
from deltaH.io._present import DECOMPOSITIONS, require_summary
from deltaH.io._present import fmt as fmt
from deltaH.io._report_common import NOT_RECORDED as NOT_RECORDED
from deltaH.io._report_common import NOT_RUN as NOT_RUN
from deltaH.io._report_common import Ref, show
from deltaH.io._report_common import all_warnings as all_warnings
from deltaH.io._report_common import verdict as verdict
from deltaH.io.schema import RunSummary, missing

PLOT_CAPTIONS = {
    "delta_h_vs_eta.png": "|ΔH| vs η per decomposition (filled: ΔH > 0, open: ΔH < 0), with δH₁ and the fit "
    "through the origin; shaded η are outside the trusted range",
    "ess_khat.png": "ESS/N and PSIS k̂ vs η; above the dashed k̂ threshold the importance weights are "
    "unreliable",
    "influence.png": "influence matrix M[n, i]: evaluation sequence n (rows) vs update sequence i (columns)",
    "contributors.png": "the update and evaluation sequences that moved the entropy most",
    "attribution.png": "ΔH summed over groups of update sequences that share a tag, true (solid) and first "
    "order (hatched), ± one jackknife standard error; grey: the momentum + weight-decay baseline",
    "trajectory.png": "H, ΔH and δH₁ along the training steps of the study",
    "token_influence.png": "each published rule's predicted entropy change of an update token (y) against "
    "the exact token influence δH₁ (x), one point per scored token; red: positive advantage, blue: negative",
    "kernel.png": "distributions of the kernel entries K[t, i] over same-prompt (left) and different-prompt "
    "(right) pairs of evaluation and update sequences",
}


def _image(p: Path, run_dir: Path) -> str:
    rel = Path(os.path.relpath(Path(p).resolve(), Path(run_dir).resolve())).as_posix()
    alt = Path(p).stem.replace("_", " ")
    cap = PLOT_CAPTIONS.get(Path(p).name, alt)
    return f"![{alt}]({rel})\n\n*Figure: {cap}.*\n"


GLOSSARY = """## How to read this

- **ΔH** — the true change of the policy's entropy on the evaluation batch when the parameters move by
  η × (update direction), estimated by self-normalised importance sampling on sequences drawn before the
  step. Units: nats per sequence (whole response), or per token. Negative: the policy gets more certain.
- **δH₁** — the first-order (linear in η) prediction of ΔH, from exact derivatives; ± is its standard
  error over the evaluation sequences. ΔH/δH₁ ≈ 1 means the linear picture holds at that η.
- **ESS** — effective sample size of the importance weights, 1/Σ w̃²; N when the step changes nothing,
  near 1 when one sequence carries all the weight (the estimate then rests on one sample).
- **k̂** — the Pareto shape of the largest importance weights (PSIS). Above the sample-size threshold
  min(1 − 1/log10 N, 0.7) (0.585 at N = 256) the weights are heavy-tailed and ΔH is unreliable; shrink η
  or enlarge the evaluation batch. With nearly equal weights (ESS ≈ N) k̂ describes the shape of the
  per-sequence log-probability changes, not the estimate, and is not counted.
- **retained mass** — an estimate (the mean of the unnormalised importance weights) of the probability the
  updated policy keeps on responses the old policy could sample (top-p nuclei); sampling noise can put it
  above 1. Clearly below 1, mass moved outside them and ΔH covers the old support only.
- **nucleus moved** — the exact fraction of the evaluation batch's scored positions whose top-p kept set
  differs before and after the step (a token entered or left); ΔH(η) jumps there, so any move is flagged.
- **precision floor / trusted** — below the floor ΔH is rounding noise of the compute dtype; a trusted η
  passes every check of the trust rule (see Trust); untrusted ones are listed under Warnings.
- **Decompositions** — `full` is the real AdamW step; `baseline` is what momentum and weight decay do
  without this batch's gradient; `grad` is this batch's gradient share; `baseline+grad` must equal `full`.
- **Influence** — the gradient share split per update sequence; column i of M gives ΔH caused by update
  sequence i alone, row n where on the evaluation batch it lands.

Every formula behind these terms is in docs/math.md of the deltaH source repository.
"""


def _footer(summary: RunSummary) -> list[str]:
    v = summary.versions
    vs = ", ".join(f"{k} {v[k]}" for k in sorted(v))
    total = show(summary.timings.get("total"))
    return ["## Run", "",
            f"deltaH {summary.deltah_version or '?'} (git {summary.git_revision or 'n/a'}), "
            f"created {summary.created or '?'}; {vs or 'versions n/a'}; "
            f"seeds {json.dumps(summary.seeds or None, sort_keys=True)}; total time {total} s.", ""]


def render_report(summary: RunSummary, run_dir: Path, plots: Sequence[Path] = ()) -> str:
    """The text of ``report.md`` (see :func:`write_report`)."""
    require_summary(summary, "render_report")
    run_dir = Path(run_dir)
    ref = Ref(summary)
    by_name = {Path(p).name: Path(p) for p in plots if Path(p).is_file()}

    def imgs(*names: str) -> list[str]:
        return [_image(by_name.pop(n), run_dir) for n in names if n in by_name]

    step = summary.checkpoint.get("global_step")
    title = "# deltaH report" + (f": checkpoint step {step}" if step is not None else "")
    out = [title, ""] + sections.headline(summary, ref) + [""]
    drv = attribution.drivers(summary)
    out += drv + [""] if drv else []
    out += sections.setup(summary)
    out += replay.step(summary)
    out += sections.decomposition(summary, ref) + imgs("delta_h_vs_eta.png")
    out += sections.trust(summary, ref) + imgs("ess_khat.png")
    out += analyses.who(summary, run_dir) + imgs("contributors.png", "influence.png")
    out += attribution.section(summary, ref, run_dir) + imgs("attribution.png")
    out += analyses.proxy(summary, ref)
    out += token_rules.section(summary) + imgs("token_influence.png")
    out += controls_report.section(summary)
    out += kernel_report.section(summary) + imgs("kernel.png")
    if by_name:
        out += ["## Plots", ""] + imgs(*sorted(by_name))
    out += [GLOSSARY] + _footer(summary)
    return "\n".join(out).rstrip() + "\n"


def write_report(summary: RunSummary, out_dir: Path, plots: Sequence[Path]) -> Path:
    """Write ``out_dir/report.md`` (``out_dir`` is the run folder); image links are relative to it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(summary, out_dir, plots), encoding="utf-8")
    os.replace(tmp, path)
    return path


def _decomposition_rows(summary: RunSummary, ref: Ref) -> list[list[str]]:
    """ΔH, δH₁, ESS, k̂ and the stored verdict of each decomposition at η_ref, for the inspect table."""
    rows = []
    for name in DECOMPOSITIONS:
        d = ref.dec(name)
        if d is None or ref.j is None:
            rows.append([name, "", "", "", "", "", "", NOT_RECORDED])
            continue
        d1, se = ref.dh1(name)
        v = verdict(summary, ref.j, name)  # the runner's stored verdict: never re-derived here
        if v is None and name == "full" and ref.trusted is not None:
            v = "ok" if ref.trusted else "untrusted"
        status = "n/a" if v is None else v if v == "ok" else f"UNTRUSTED: {v}"
        rows.append([name, show(ref.at(d.delta_h)), show(ref.at(d.delta_h_per_token)), show(d1), show(se),
                     show(ref.at(d.ess)), show(ref.at(d.khat)), status])
    return rows


def format_summary_table(summary: RunSummary) -> str:
    """Plain text for ``deltah inspect``: H, ΔH/δH₁ per decomposition at η_ref, ESS, k̂, status, warnings."""
    require_summary(summary, "format_summary_table")
    ref = Ref(summary)
    ck = summary.checkpoint
    grid = "" if ref.exact or ref.eta_j is None else f" (grid {show(ref.eta_j)})"
    source = f" from {summary.eta_reference_source}" if summary.eta_reference_source else ""
    if summary.trust.per_eta:
        bad = ref.flagged()
        trust = f"  [UNTRUSTED for {', '.join(bad)}]" if bad else "  [trusted]"
    else:
        trust = "" if ref.trusted is None else ("  [trusted]" if ref.trusted else "  [UNTRUSTED]")
    lines = [f"status: {summary.status or '?'}    checkpoint: {ck.get('path', 'n/a')} "
             f"(step {show(ck.get('global_step'))})",
             f"H_orig = {show(summary.h_orig)} nats/seq ({show(summary.h_orig_per_token)} "
             f"nats/token), entropy_mode {summary.entropy_mode or '?'}",
             f"eta_ref = {show(ref.eta_ref)}" + source + grid + trust, ""]
    header = ["decomposition", "dH", "dH/token", "dH1", "dH1 s.e.", "ESS", "khat", "status"]
    rows = _decomposition_rows(summary, ref)
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]
    lines.append("")
    rp = summary.replay
    if not missing(rp) and rp.source:
        err = "" if math.isnan(rp.step_error) else f", replay error {show(rp.step_error)}"
        lines.append(f"update batch: {rp.source} (step {show(rp.step)}){err}")
    optional = (("influence", summary.influence), ("attribution", summary.attribution),
                ("kernel", summary.kernel), ("proxy", summary.proxy), ("token influence", summary.proxies),
                ("controls", summary.controls))
    for name, part in optional:
        lines.append(f"{name}: {NOT_RUN if part is None else 'done'}")
    lines.append(f"trust: {NOT_RECORDED if missing(summary.trust) else 'done'}")
    warns = all_warnings(summary)
    lines += ["", f"warnings ({len(warns)}):" if warns else "warnings: none"] + [f"  - {x}" for x in warns]
    return "\n".join(lines) + "\n"
