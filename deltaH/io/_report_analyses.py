"""The sections of ``report.md`` on the optional analyses (see :mod:`deltaH.io.report`): who caused the
change (influence, with the sequences' text from ``batches/``) and the covariance proxy (the kernel's
section is :mod:`deltaH.io._report_kernel`)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.io._present import as_float_array, at, eta_index, num
from deltaH.io._report_common import NOT_RUN, Ref, cell, pct, show, table
from deltaH.io.schema import InfluenceInfo, RunSummary

TOP_ROWS = 5


def read_rows(run_dir: Path, which: str) -> dict[int, dict[str, Any]]:
    """``batches/<which>.jsonl`` (or ``.jsonl.gz``) as {row: record}; empty when absent or unreadable."""
    p = run_dir / "batches" / f"{which}.jsonl"
    try:
        if p.is_file():
            text = p.read_text()
        elif p.with_name(p.name + ".gz").is_file():
            text = gzip.decompress(p.with_name(p.name + ".gz").read_bytes()).decode()
        else:
            return {}
        recs = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    except (OSError, ValueError):
        return {}
    return {int(r.get("row", i)): r for i, r in enumerate(recs)}


def _first(*values: Any) -> Any:
    """The first value that is not missing (None or NaN): the summary's, else the batch file's."""
    return next((v for v in values if not (v is None or (isinstance(v, float) and math.isnan(v)))), None)


def _top_update(inf: InfluenceInfo, rows_u: dict[int, dict[str, Any]]) -> list[str]:
    """The update sequences with the largest |ΔH|, with their text from ``batches/update.jsonl``."""
    top = inf.top_update[:TOP_ROWS]
    if not top:
        return []
    rows = []
    for k, t in enumerate(top, 1):
        rec = rows_u.get(t.row, {}) if t.row is not None else {}
        rows.append([str(k), show(_first(t.row, rec.get("row"))), show(_first(t.delta_h, rec.get("delta_h"))),
                     show(_first(t.reward, rec.get("reward"))),
                     show(_first(t.advantage, rec.get("advantage"))),
                     cell(_first(t.prompt, rec.get("prompt"), "")),
                     cell(_first(t.response, rec.get("response"), ""))])
    out = ["", f"Top {len(rows)} update sequences by |ΔH|:", ""]
    out += table(["rank", "row i", "ΔH (nats/seq)", "reward", "advantage", "prompt", "response"], rows,
                 drop_empty=True)
    pos = [dh for dh, adv in ((num(t.delta_h), num(t.advantage)) for t in top)
           if dh is not None and adv is not None and adv > 0]
    if pos:
        out += ["", f"Of these, {len(pos)} have a positive advantage (the step makes them more likely); "
                    f"{sum(d < 0 for d in pos)} of those lower the entropy."]
    return out


def _top_eval(inf: InfluenceInfo, rows_e: dict[int, dict[str, Any]]) -> list[str]:
    """The evaluation sequences with the largest |contribution|, with ``batches/eval.jsonl``'s text."""
    top = inf.top_eval[:TOP_ROWS]
    if not top:
        return []
    rows = []
    for k, t in enumerate(top, 1):
        rec = rows_e.get(t.row, {}) if t.row is not None else {}
        rows.append([str(k), show(_first(t.row, rec.get("row"))), show(_first(t.delta_h, rec.get("delta_h"))),
                     show(rec.get("entropy")), show(rec.get("logq")), cell(rec.get("prompt", "")),
                     cell(rec.get("response", ""))])
    out = ["", f"Top {len(rows)} evaluation sequences by |contribution|:", ""]
    return out + table(["rank", "row n", "ΔH (nats/seq)", "entropy (nats)", "log q", "prompt", "response"],
                       rows, drop_empty=True)


def who(summary: RunSummary, run_dir: Path) -> list[str]:
    out = ["## Who caused it", ""]
    inf = summary.influence
    if inf is None:
        return out + [f"Influence of individual update sequences: {NOT_RUN}.", ""]
    out.append("The gradient part of the step is split into one share per update sequence i "
               "(docs/math.md#influence-matrices); M[n, i] is the change of evaluation sequence n's "
               f"contribution to ΔH under share i alone, at "
               f"η = {show(inf.eta)} ({', '.join(inf.kind) or 'kind unknown'}). "
               "Column sums say which update sequences moved the entropy; row sums say where it moved.")
    col = as_float_array(inf.column_delta_h) if inf.column_delta_h else None
    if col is not None and np.isfinite(col).any():
        c = col[np.isfinite(col)]
        out.append(f"Summed over all {c.size} update sequences: {show(c.sum())} nats; "
                   f"{int((c > 0).sum())} raise the entropy (together {show(c[c > 0].sum())}), "
                   f"{int((c < 0).sum())} lower it (together {show(c[c < 0].sum())}).")
        i = int(np.nanargmax(np.abs(col)))
        if c.sum() != 0:
            out.append(f"The largest, update sequence {i}, contributes {show(col[i])} "
                       f"({pct(float(col[i]), float(c.sum()))} of the sum).")
    out += _top_update(inf, read_rows(run_dir, "update"))
    return out + _top_eval(inf, read_rows(run_dir, "eval")) + [""]


def proxy(summary: RunSummary, ref: Ref) -> list[str]:
    out = ["## Proxy comparison", ""]
    px = summary.proxy
    if px is None:
        return out + [f"Covariance proxy: {NOT_RUN}.", ""]
    eta = _first(num(px.eta), ref.eta_ref)
    j = eta_index(ref.eta, eta)
    n_tok = num(summary.batches.eval.mean_tokens)
    out.append(f"The covariance rule (Cui et al. 2025) predicts ΔH ≈ −η · Cov_token(log π(y_t), A) from the "
               f"update batch alone: Cov = {show(px.cov)} at η = {show(eta)}. Per-sequence values use "
               f"{show(px.mean_response_tokens)} tokens per response.")
    p_tok, p_seq = num(px.delta_h_per_token), num(px.delta_h_per_sequence)
    rows = [["covariance proxy", show(p_tok), show(p_seq)]]
    measured: list[tuple[str, float | None]] = []
    for name in ("full", "grad"):
        d = ref.dec(name)
        if d is None or j is None:
            continue
        dh = at(d.delta_h, j)
        rows.append([f"true ΔH ({name})", show(at(d.delta_h_per_token, j)), show(dh)])
        measured.append((f"ΔH ({name})", dh))
        slope = num(d.first_order.slope) if d.first_order is not None else None
        d1 = slope * eta if slope is not None and eta is not None else None
        per_tok = f"≈ {show(d1 / n_tok)}" if d1 is not None and n_tok else "n/a"
        rows.append([f"δH₁ ({name})", per_tok, show(d1)])
        measured.append((f"δH₁ ({name})", d1))
    out += [""] + table(["", "per token (nats)", "per sequence (nats)"], rows) + [""]
    if p_seq is not None and measured:
        agree = [f"{what}: {'agrees' if np.sign(v) == np.sign(p_seq) else '**disagrees**'}"
                 for what, v in measured if v is not None]
        out.append("Sign of the proxy vs the measurement — " + "; ".join(agree) + ".")
        full = measured[0][1]
        if full is not None and full != 0:
            out.append(f"Proxy / true ΔH (full), per sequence: {show(p_seq / full)}.")
    out.append("(δH₁ per token ≈ δH₁ per sequence / mean evaluation response length.)")
    return out + [""]
