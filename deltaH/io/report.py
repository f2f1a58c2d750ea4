"""``report.md``: a results folder in words, tables and plots, readable without the code.

``write_report(summary, run_dir, plots)`` reads only the summary (``docs/results-schema.md``)
and, for text snippets of the most influential sequences, ``batches/*.jsonl`` beside it when
present. Every analysis may be ``null`` (not run); the report then says "not run" for it.
``format_summary_table(summary)`` is the plain-text table of ``deltah inspect RESULTS_DIR``.

Numbers carry 3 significant digits; magnitudes below 1e-3 or from 1e6 up are written as
``1.23e-5``. Minus signs are ASCII so values can be copied into code.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.analysis import reason_kind, trust_warnings
from deltaH.io.plots import (
    DECOMPOSITION_LABELS,
    DECOMPOSITIONS,
    as_float_array,
    eta_index,
    fmt,
    get,
    trusted_mask,
)

NOT_RUN = "not run"
SNIPPET = 60
TOP_ROWS = 5

PLOT_CAPTIONS = {
    "delta_h_vs_eta.png": "|ΔH| vs η per decomposition (filled: ΔH > 0, open: ΔH < 0), with δH₁ and the fit "
    "through the origin; shaded η are outside the trusted range",
    "ess_khat.png": "ESS/N and PSIS k̂ vs η; above the dashed k̂ threshold the importance weights are "
    "unreliable",
    "influence.png": "influence matrix M[n, i]: evaluation sequence n (rows) vs update sequence i (columns)",
    "contributors.png": "the update and evaluation sequences that moved the entropy most",
    "trajectory.png": "H, ΔH and δH₁ along the training steps of the study",
}


def _at(summary: Mapping[str, Any], j: int | None, *keys: str) -> float | None:
    """Element ``j`` of the per-η list at ``summary[keys...]`` (None if missing or null)."""
    a = get(summary, *keys)
    if j is None or a is None or not isinstance(a, Sequence) or j >= len(a):
        return None
    v = a[j]
    return None if v is None else float(v)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _pct(x: float | None, of: float | None) -> str:
    if not (_finite(x) and _finite(of)) or of == 0:
        return "n/a"
    return f"{fmt(100 * x / of)}%"  # type: ignore[operator]


def _cell(s: Any) -> str:
    """Text safe inside a markdown table cell, cut to ``SNIPPET`` characters."""
    t = " ".join(str(s).replace("|", "\\|").split("\n")).strip()
    t = " ".join(t.split())
    return t if len(t) <= SNIPPET else t[: SNIPPET - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], drop_empty: bool = False) -> list[str]:
    """A markdown table; ``drop_empty`` leaves out columns with no value in any row."""
    if drop_empty and rows:
        keep = [i for i in range(len(header)) if any(r[i] not in ("", "n/a") for r in rows)]
        header = [header[i] for i in keep]
        rows = [[r[i] for i in keep] for r in rows]
    head = " | ".join(h.replace("|", "\\|") for h in header)
    out = [f"| {head} |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def verdict(summary: Mapping[str, Any], j: int | None, dec: str) -> str | None:
    """The stored trust verdict of decomposition ``dec`` at grid point ``j``: "ok", or the kinds of
    its reasons (``trust.per_eta``, written by the runner's one trust rule); None when not stored."""
    why = get(summary, "trust", "per_eta", j, "reasons", dec) if j is not None else None
    if why is None:
        return None
    return "ok" if not why else ", ".join(dict.fromkeys(reason_kind(r) for r in why))


def all_warnings(summary: Mapping[str, Any]) -> list[str]:
    """The summary's warnings plus a line for every decomposition with an untrusted η (from the stored
    verdicts), so no report or table says "no warnings" beside a flag."""
    warns = list(summary.get("warnings") or [])
    return warns + [w for w in trust_warnings(summary.get("trust")) if w not in warns]


# -- reference point --------------------------------------------------------------------------
class _Ref:
    """The η_ref grid point and the values the headline and tables use."""

    def __init__(self, summary: Mapping[str, Any]) -> None:
        self.eta_ref = summary.get("eta_reference")
        self.eta = as_float_array(summary.get("eta"))
        self.j = eta_index(self.eta, self.eta_ref)
        self.eta_j = float(self.eta[self.j]) if self.eta is not None and self.j is not None else None
        self.exact = (self.eta_j is not None and self.eta_ref is not None
                      and math.isclose(self.eta_j, self.eta_ref, rel_tol=1e-6))
        tm = trusted_mask(summary, self.eta) if self.eta is not None else None
        self.trusted = None if tm is None or self.j is None else bool(tm[self.j])

    def dh(self, summary: Mapping[str, Any], dec: str, key: str = "delta_h") -> float | None:
        return _at(summary, self.j, "decompositions", dec, key)

    def dh1(self, summary: Mapping[str, Any], dec: str) -> tuple[float | None, float | None]:
        """δH₁ at η_ref (slope × η_ref when the slope is known) and its standard error."""
        fo = get(summary, "decompositions", dec, "first_order")
        if fo is None:
            return None, None
        slope, se = fo.get("slope"), fo.get("stderr_slope")
        if slope is not None and self.eta_ref is not None:
            return slope * self.eta_ref, (se * self.eta_ref if se is not None else None)
        return _at(summary, self.j, "decompositions", dec, "first_order", "delta_h"), None


# -- sections -------------------------------------------------------------------------------
def _headline(summary: Mapping[str, Any], ref: _Ref) -> list[str]:
    """The status banner (when not complete) and one paragraph: ΔH, δH₁ and H at η_ref."""
    h, h_tok = summary.get("h_orig"), summary.get("h_orig_per_token")
    banner = []
    if summary.get("status") not in (None, "complete"):
        banner = [f"> **Status: {summary.get('status')}.** Some analyses did not finish; what is missing "
                  "is marked \"not run\".", ""]
    eta_txt = f"η = {fmt(ref.eta_ref)}" if ref.eta_ref is not None else "the reference η"
    dh = ref.dh(summary, "full")
    para = []
    if get(summary, "decompositions", "full") is None or ref.j is None:
        para.append(f"At the learning rate of the next step ({eta_txt}), the true entropy change was "
                    f"{NOT_RUN}.")
    else:
        at = "" if ref.exact else f"; nearest grid point {fmt(ref.eta_j)}"
        if _finite(dh):
            tok = ref.dh(summary, "full", "delta_h_per_token")
            change = f"ΔH = {fmt(dh)} nats per sequence ({fmt(tok)} per token)"
        else:
            change = "ΔH = NaN (every importance weight was zero: the step is far too large for this batch)"
        s = (f"At the learning rate of the next step ({eta_txt}{at}), this update changes the policy's "
             f"entropy on the evaluation batch by {change}")
        d1, se = ref.dh1(summary, "full")
        if _finite(d1):
            s += f"; the first-order prediction is δH₁ = {fmt(d1)}" + (f" ± {fmt(se)}" if _finite(se) else "")
        para.append(s + ".")
        flagged = [d for d in DECOMPOSITIONS if verdict(summary, ref.j, d) not in (None, "ok")]
        if flagged:
            para.append(f"**Caution:** at this η ΔH is untrusted for {', '.join(f'`{d}`' for d in flagged)} "
                        "(see Trust).")
        elif ref.trusted is False:
            para.append("**Caution:** this η lies outside the trusted range (see Trust).")
    if h is not None:
        rel = f" The step changes it by {_pct(dh, h)}." if _finite(dh) else ""
        para.append(f"Before the step the entropy is H = {fmt(h)} nats per sequence ({fmt(h_tok)} per token, "
                    f"{summary.get('entropy_mode', 'rb')} estimator).{rel}")
    return banner + [" ".join(para)]


def _policy_of(config: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for src in (get(config, "policy"), get(config, "sampling"), config):
        if isinstance(src, Mapping):
            for k in ("temperature", "top_p", "max_new_tokens"):
                if k in src and k not in found:
                    found[k] = src[k]
    return found


def _setup(summary: Mapping[str, Any]) -> list[str]:
    out = ["## Setup", ""]
    ck = summary.get("checkpoint")
    if ck:
        tdt = ck.get("trainable_dtype")
        tdt_s = f" (trainable parameters stored in {tdt})" if tdt and tdt != ck.get("dtype") else ""
        out.append(f"- **Checkpoint:** `{ck.get('path')}` ({ck.get('kind', '?')}, global step "
                   f"{fmt(ck.get('global_step'))}); {fmt(ck.get('n_trainable'))} trainable parameters; "
                   f"computed in {ck.get('dtype', '?')}{tdt_s}; learning rate of the next step "
                   f"{fmt(ck.get('lr'))}.")
    else:
        out.append(f"- **Checkpoint:** {NOT_RUN}.")
    for which, words in (("eval", "Evaluation batch E"), ("update", "Update batch U")):
        b = get(summary, "batches", which)
        if not b:
            out.append(f"- **{words}:** {NOT_RUN}.")
            continue
        s = (f"- **{words}:** {fmt(b.get('n'))} sequences = {fmt(b.get('n_prompts'))} prompts × "
             f"{fmt(b.get('group_size'))} responses, {fmt(b.get('mean_tokens'))} response tokens on average")
        if which == "update":
            s += f"; mean reward {fmt(b.get('mean_reward'))}"
            rg = b.get("resampled_groups")
            if rg:
                s += f"; {fmt(rg)} group{'s' if rg != 1 else ''} resampled (all rewards equal: no signal)"
        out.append(s + ".")
    pol = _policy_of(summary.get("config"))
    pol_s = ", ".join(f"{k} = {fmt(v)}" for k, v in pol.items()) or "as configured"
    mode = summary.get("entropy_mode", "rb")
    mode_s = "Rao–Blackwellised (per-token entropy of q)" if mode == "rb" else "naive (surprisal −log q)"
    out.append(f"- **Policy:** sampling distribution q = top-p(softmax(z/τ)), {pol_s}; "
               f"entropy estimator {mode_s}.")
    up = summary.get("update")
    if up:
        mgn = get(summary, "checkpoint", "max_grad_norm")
        clip = f"clipped at norm {fmt(mgn)}" if mgn is not None else "no clipping"
        out.append(f"- **Update:** AdamW step on the `{up.get('loss_type')}` loss at lr "
                   f"{fmt(up.get('lr_ref'))}; gradient norm {fmt(up.get('grad_norm'))}, {clip} "
                   f"(clipping factor {fmt(up.get('clip_coef'))}).")
    else:
        out.append(f"- **Update:** {NOT_RUN}.")
    eta = as_float_array(summary.get("eta"))
    if eta is not None and eta.size:
        out.append(f"- **η grid:** {eta.size} values from {fmt(np.nanmin(eta))} to {fmt(np.nanmax(eta))}; "
                   f"reference η_ref = {fmt(summary.get('eta_reference'))} (the lr of the next step).")
    return out + [""]


def _decomposition(summary: Mapping[str, Any], ref: _Ref) -> list[str]:
    out = ["## Decomposition", ""]
    decs = summary.get("decompositions")
    if not decs or ref.j is None:
        return out + [f"True ΔH along the update directions: {NOT_RUN}.", ""]
    n_eval = get(summary, "batches", "eval", "n")
    second = any(_at(summary, ref.j, "decompositions", d, "second_order") is not None for d in DECOMPOSITIONS)
    header = ["decomposition", "ΔH (nats/seq)", "ΔH (nats/token)", "δH₁ ± s.e.", "ΔH / δH₁",
              f"ESS (of {fmt(n_eval)})" if n_eval else "ESS", "k̂", "retained mass", "nucleus moved",
              "log-log slope", "R² (line through 0)", "verdict"]
    header += ["2nd-order prediction"] if second else []
    top_p = _top_p(summary)
    rows = []
    for d in DECOMPOSITIONS:
        if not decs.get(d):
            rows.append([f"{d}"] + [NOT_RUN] + [""] * (len(header) - 2))
            continue
        dh = ref.dh(summary, d)
        d1, se = ref.dh1(summary, d)
        ratio = dh / d1 if _finite(dh) and _finite(d1) and d1 != 0 else None  # type: ignore[operator]
        row = [d, fmt(dh), fmt(ref.dh(summary, d, "delta_h_per_token")),
               fmt(d1) + (f" ± {fmt(se)}" if _finite(se) else ""), fmt(ratio), fmt(ref.dh(summary, d, "ess")),
               fmt(ref.dh(summary, d, "khat")),
               fmt(ref.dh(summary, d, "retained_mass"), 4) if top_p else "",
               _share(ref.dh(summary, d, "nucleus_changed")) if top_p else "",
               fmt(get(decs, d, "fit", "loglog_slope")), fmt(get(decs, d, "fit", "r2_origin")),
               verdict(summary, ref.j, d) or "n/a"]
        if second:
            row.append(fmt(_at(summary, ref.j, "decompositions", d, "second_order")))
        rows.append(row)
    at = f"η = {fmt(ref.eta_j)}" + ("" if ref.exact else f" (grid point nearest η_ref = {fmt(ref.eta_ref)})")
    legend = "; ".join(f"`{d}` = {DECOMPOSITION_LABELS[d]}" for d in DECOMPOSITIONS)
    out += [f"Values at {at}. {legend}.", ""]
    out += _table(header, rows, drop_empty=True) + [""]
    full, b, g, bg = (ref.dh(summary, d) for d in DECOMPOSITIONS)
    if _finite(full) and _finite(bg):
        diff = abs(full - bg)  # type: ignore[operator]
        out.append(f"`full` and `baseline+grad` are the same direction (the decomposition is exact) and "
                   f"differ by {fmt(diff)} nats ({_pct(diff, abs(full) if full else None)} of |ΔH|).")
    if _finite(full) and _finite(b) and _finite(g):
        out.append(f"Momentum + weight decay alone would change the entropy by {fmt(b)}, this batch's "
                   f"gradient alone by {fmt(g)} (ΔH is additive only to first order).")
    out.append("A log-log slope near 1 and ΔH/δH₁ near 1 mean the step is in the linear regime; the "
               "verdict is the trust rule's (see Trust).")
    return out + [""]


def _top_p(summary: Mapping[str, Any]) -> bool:
    """Whether the run used top-p (retained mass and moved nuclei mean something only then)."""
    stored = get(summary, "trust", "top_p")
    if stored is not None:
        return bool(stored)
    p = _policy_of(summary.get("config")).get("top_p")
    return p is None or float(p) < 1.0


def _share(x: float | None) -> str:
    """A fraction in [0, 1] as a percentage ("" when unknown)."""
    return "" if not _finite(x) else ("0" if x == 0 else f"{fmt(100 * x)}%")  # type: ignore[operator]


def _trust(summary: Mapping[str, Any], ref: _Ref) -> list[str]:
    out = ["## Trust", ""]
    tr = summary.get("trust")
    n_eval = get(summary, "batches", "eval", "n")
    if not tr:
        out.append(f"Trust analysis: {NOT_RUN}.")
    else:
        lo, hi, thr = tr.get("eta_min"), tr.get("eta_max"), tr.get("khat_threshold")
        if _finite(lo) and _finite(hi):
            out.append(f"ΔH along the full update is trusted for η from {fmt(lo)} to {fmt(hi)}.")
        else:
            out.append("ΔH along the full update is trusted at **no** η of the grid.")
        floor, noise, dt = tr.get("precision_floor"), tr.get("noise"), tr.get("dtype") or "the model's dtype"
        sig = f"σ ≥ {fmt(noise)} nats of {dt} rounding noise" if _finite(noise) else f"{dt} rounding noise"
        if _finite(floor):
            half = dt in ("bfloat16", "float16")
            low = " (computing in float32, checkpoint.dtype=float32, lowers it)" if half else ""
            out.append(f"At and below η = {fmt(floor)} the measured change is rounding noise ({sig}): the "
                       f"precision floor{low}.")
        else:
            out.append(f"No precision floor was found in the sweep ({sig}).")
        thr_s = (f"{thr:.3f} = min(1 − 1/log10 N, 0.7) for N = {fmt(n_eval)}" if _finite(thr) and n_eval
                 else fmt(thr))
        out.append(f"Each η and decomposition is checked by one rule (`deltaH.analysis`): ESS, PSIS k̂ above "
                   f"the threshold {thr_s} (counted only once the weights vary, N/ESS − 1 > 0.01), retained "
                   "mass and moved nuclei (top-p), the precision floor, and sign flips or non-monotone steps "
                   "against δH₁.")
        if ref.trusted is not None:
            where = "**inside**" if ref.trusted else "**outside**"
            out.append(f"The reference η_ref = {fmt(ref.eta_ref)} is {where} the trusted range.")
        table = _verdict_table(summary, ref)
        out += ["", *table, ""] if table else []
        rm = ref.dh(summary, "full", "retained_mass")
        if _top_p(summary) and _finite(rm):
            leak = (" — clearly below 1: some mass left θ's top-p nuclei, so ΔH covers the old support only"
                    if rm < 0.999 else "")  # type: ignore[operator]
            out.append(f"Retained mass at η_ref: {fmt(rm, 4)} (an estimate of the probability the updated "
                       f"policy keeps in θ's nuclei; sampling noise can put it above 1){leak}.")
        if tr.get("notes"):
            out += ["", "Notes (full update):"] + [f"- {n}" for n in tr["notes"]]
    warns = all_warnings(summary)
    out += ["", f"Warnings ({len(warns)}):" if warns else "No warnings were raised."]
    out += [f"- {w}" for w in warns]
    return out + [""]


def _verdict_table(summary: Mapping[str, Any], ref: _Ref) -> list[str]:
    """Per η: the full update's weight diagnostics and every decomposition's stored verdict."""
    if ref.eta is None or get(summary, "trust", "per_eta") is None:
        return []
    decs = [d for d in DECOMPOSITIONS if get(summary, "decompositions", d)]
    top_p = _top_p(summary)
    rows = []
    for j, e in enumerate(ref.eta):
        mark = " (η_ref)" if j == ref.j else ""
        rows.append([fmt(e) + mark, fmt(_at(summary, j, "decompositions", "full", "ess")),
                     fmt(_at(summary, j, "decompositions", "full", "khat")),
                     fmt(_at(summary, j, "decompositions", "full", "retained_mass"), 4) if top_p else "",
                     _share(_at(summary, j, "decompositions", "full", "nucleus_changed")) if top_p else ""]
                    + [verdict(summary, j, d) or "n/a" for d in decs])
    header = ["η", "ESS (full)", "k̂ (full)", "retained (full)", "nucleus moved (full)"] + decs
    return _table(header, rows, drop_empty=True)


def _read_rows(run_dir: Path, which: str) -> dict[int, dict[str, Any]]:
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


def _who(summary: Mapping[str, Any], run_dir: Path) -> list[str]:
    out = ["## Who caused it", ""]
    inf = summary.get("influence")
    if not inf:
        return out + [f"Influence of individual update sequences: {NOT_RUN}.", ""]
    kinds = inf.get("kind") or []
    kinds = [kinds] if isinstance(kinds, str) else kinds
    out.append("The gradient part of the step is split into one share per update sequence i "
               "(docs/math.md#influence-matrices); M[n, i] is the change of evaluation sequence n's "
               f"contribution to ΔH under share i alone, at "
               f"η = {fmt(inf.get('eta'))} ({', '.join(kinds) or 'kind unknown'}). "
               "Column sums say which update sequences moved the entropy; row sums say where it moved.")
    col = as_float_array(inf.get("column_delta_h"))
    if col is not None and np.isfinite(col).any():
        c = col[np.isfinite(col)]
        out.append(f"Summed over all {c.size} update sequences: {fmt(c.sum())} nats; "
                   f"{int((c > 0).sum())} raise the entropy (together {fmt(c[c > 0].sum())}), "
                   f"{int((c < 0).sum())} lower it (together {fmt(c[c < 0].sum())}).")
        i = int(np.nanargmax(np.abs(col)))
        if c.sum() != 0:
            out.append(f"The largest, update sequence {i}, contributes {fmt(col[i])} "
                       f"({_pct(float(col[i]), float(c.sum()))} of the sum).")
    upd, ev = _read_rows(run_dir, "update"), _read_rows(run_dir, "eval")
    top_u = (inf.get("top_update") or [])[:TOP_ROWS]
    if top_u:
        rows = []
        for k, t in enumerate(top_u, 1):
            rec = {**upd.get(int(t.get("row", -1)), {}), **{a: b for a, b in t.items() if b is not None}}
            rows.append([str(k), fmt(rec.get("row")), fmt(rec.get("delta_h")), fmt(rec.get("reward")),
                         fmt(rec.get("advantage")), _cell(rec.get("prompt", "")),
                         _cell(rec.get("response", ""))])
        out += ["", f"Top {len(rows)} update sequences by |ΔH|:", ""]
        out += _table(["rank", "row i", "ΔH (nats/seq)", "reward", "advantage", "prompt", "response"], rows,
                      drop_empty=True)
        adv = [(float(t["advantage"]), float(t["delta_h"])) for t in top_u
               if t.get("advantage") is not None and t.get("delta_h") is not None]
        pos = [d for a, d in adv if a > 0]
        if pos:
            out += ["", f"Of these, {len(pos)} have a positive advantage (the step makes them more likely); "
                        f"{sum(d < 0 for d in pos)} of those lower the entropy."]
    top_e = (inf.get("top_eval") or [])[:TOP_ROWS]
    if top_e:
        rows = []
        for k, t in enumerate(top_e, 1):
            rec = {**ev.get(int(t.get("row", -1)), {}), **{a: b for a, b in t.items() if b is not None}}
            rows.append([str(k), fmt(rec.get("row")), fmt(rec.get("delta_h")), fmt(rec.get("entropy")),
                         fmt(rec.get("logq")), _cell(rec.get("prompt", "")),
                         _cell(rec.get("response", ""))])
        out += ["", f"Top {len(rows)} evaluation sequences by |contribution|:", ""]
        out += _table(["rank", "row n", "ΔH (nats/seq)", "entropy (nats)", "log q", "prompt", "response"],
                      rows, drop_empty=True)
    return out + [""]


def _proxy(summary: Mapping[str, Any], ref: _Ref) -> list[str]:
    out = ["## Proxy comparison", ""]
    px = summary.get("proxy")
    if not px:
        return out + [f"Covariance proxy: {NOT_RUN}.", ""]
    eta = px.get("eta", ref.eta_ref)
    j = eta_index(ref.eta, eta)
    n_tok = get(summary, "batches", "eval", "mean_tokens")
    out.append(f"The covariance rule (Cui et al. 2025) predicts ΔH ≈ −η · Cov_token(log π(y_t), A) from the "
               f"update batch alone: Cov = {fmt(px.get('cov'))} at η = {fmt(eta)}. Per-sequence values use "
               f"{fmt(px.get('mean_response_tokens'))} tokens per response.")
    p_tok, p_seq = px.get("delta_h_per_token"), px.get("delta_h_per_sequence")
    rows = [["covariance proxy", fmt(p_tok), fmt(p_seq)]]
    measured: list[tuple[str, float | None]] = []
    for d in ("full", "grad"):
        if get(summary, "decompositions", d) and j is not None:
            dh = _at(summary, j, "decompositions", d, "delta_h")
            tok = _at(summary, j, "decompositions", d, "delta_h_per_token")
            rows.append([f"true ΔH ({d})", fmt(tok), fmt(dh)])
            measured.append((f"ΔH ({d})", dh))
            slope = get(summary, "decompositions", d, "first_order", "slope")
            d1 = slope * eta if slope is not None and eta is not None else None
            per_tok = f"≈ {fmt(d1 / n_tok)}" if _finite(d1) and n_tok else "n/a"  # type: ignore[operator]
            rows.append([f"δH₁ ({d})", per_tok, fmt(d1)])
            measured.append((f"δH₁ ({d})", d1))
    out += [""] + _table(["", "per token (nats)", "per sequence (nats)"], rows) + [""]
    if _finite(p_seq) and measured:
        agree = [f"{name}: {'agrees' if np.sign(v) == np.sign(p_seq) else '**disagrees**'}"  # type: ignore[arg-type]
                 for name, v in measured if _finite(v)]
        out.append("Sign of the proxy vs the measurement — " + "; ".join(agree) + ".")
        full = measured[0][1]
        if _finite(full) and full != 0:
            out.append(f"Proxy / true ΔH (full), per sequence: {fmt(p_seq / full)}.")  # type: ignore[operator]
    out.append("(δH₁ per token ≈ δH₁ per sequence / mean evaluation response length.)")
    return out + [""]


def _kernel(summary: Mapping[str, Any]) -> list[str]:
    out = ["## Kernel summary", ""]
    k = summary.get("kernel")
    if not k:
        return out + [f"Cross Fisher kernel: {NOT_RUN}.", ""]
    out.append(f"K[n, i] = ∇log q(n) · P · ∇log π(i) with the AdamW preconditioner P, computed "
               f"{k.get('method', '?')}ly over {fmt(k.get('n_same'))} same-prompt and {fmt(k.get('n_diff'))} "
               "different-prompt pairs.")
    out += [""] + _table(["pairs", "mean K", "mean |K|", "count"], [
        ["same prompt", fmt(k.get("mean_same")), fmt(k.get("abs_same")), fmt(k.get("n_same"))],
        ["different prompt", fmt(k.get("mean_diff")), fmt(k.get("abs_diff")), fmt(k.get("n_diff"))]]) + [""]
    a, b = k.get("abs_same"), k.get("abs_diff")
    if _finite(a) and _finite(b) and b:
        out.append(f"Same-prompt pairs couple {fmt(a / b)}× more strongly than different-prompt pairs "
                   "(mean |K|).")
    return out + [""]


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


def _footer(summary: Mapping[str, Any]) -> list[str]:
    v = summary.get("versions") or {}
    vs = ", ".join(f"{k} {v[k]}" for k in sorted(v))
    t = get(summary, "timings", "total")
    return ["## Run", "",
            f"deltaH {summary.get('deltah_version', '?')} (git {summary.get('git_revision') or 'n/a'}), "
            f"created {summary.get('created', '?')}; {vs or 'versions n/a'}; "
            f"seeds {json.dumps(summary.get('seeds'))}; total time {fmt(t)} s.", ""]


def render_report(summary: Mapping[str, Any], run_dir: Path, plots: Sequence[Path] = ()) -> str:
    """The text of ``report.md`` (see :func:`write_report`)."""
    run_dir = Path(run_dir)
    ref = _Ref(summary)
    by_name = {Path(p).name: Path(p) for p in plots if Path(p).is_file()}

    def imgs(*names: str) -> list[str]:
        return [_image(by_name.pop(n), run_dir) for n in names if n in by_name]

    step = get(summary, "checkpoint", "global_step")
    title = "# deltaH report" + (f": checkpoint step {step}" if step is not None else "")
    out = [title, ""] + _headline(summary, ref) + [""]
    out += _setup(summary)
    out += _decomposition(summary, ref) + imgs("delta_h_vs_eta.png")
    out += _trust(summary, ref) + imgs("ess_khat.png")
    out += _who(summary, run_dir) + imgs("contributors.png", "influence.png")
    out += _proxy(summary, ref)
    out += _kernel(summary)
    if by_name:
        out += ["## Plots", ""] + imgs(*sorted(by_name))
    out += [GLOSSARY] + _footer(summary)
    return "\n".join(out).rstrip() + "\n"


def write_report(summary: Mapping[str, Any], out_dir: Path, plots: Sequence[Path]) -> Path:
    """Write ``out_dir/report.md`` (``out_dir`` is the run folder); image links are relative to it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_report(summary, out_dir, plots), encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_summary_table(summary: Mapping[str, Any]) -> str:
    """Plain text for ``deltah inspect``: H, ΔH/δH₁ per decomposition at η_ref, ESS, k̂, status, warnings."""
    ref = _Ref(summary)
    ck = summary.get("checkpoint") or {}
    grid = "" if ref.exact or ref.eta_j is None else f" (grid {fmt(ref.eta_j)})"
    bad = [d for d in DECOMPOSITIONS if verdict(summary, ref.j, d) not in (None, "ok")]
    if get(summary, "trust", "per_eta") is not None:
        trust = f"  [UNTRUSTED for {', '.join(bad)}]" if bad else "  [trusted]"
    else:
        trust = "" if ref.trusted is None else ("  [trusted]" if ref.trusted else "  [UNTRUSTED]")
    lines = [f"status: {summary.get('status', '?')}    checkpoint: {ck.get('path', 'n/a')} "
             f"(step {fmt(ck.get('global_step'))})",
             f"H_orig = {fmt(summary.get('h_orig'))} nats/seq ({fmt(summary.get('h_orig_per_token'))} "
             f"nats/token), entropy_mode {summary.get('entropy_mode', '?')}",
             f"eta_ref = {fmt(ref.eta_ref)}" + grid + trust, ""]
    header = ["decomposition", "dH", "dH/token", "dH1", "dH1 s.e.", "ESS", "khat", "status"]
    rows = []
    decs = summary.get("decompositions") or {}
    for d in DECOMPOSITIONS:
        if not decs.get(d) or ref.j is None:
            rows.append([d, "", "", "", "", "", "", NOT_RUN])
            continue
        d1, se = ref.dh1(summary, d)
        dh, k = ref.dh(summary, d), ref.dh(summary, d, "khat")
        v = verdict(summary, ref.j, d)  # the runner's stored verdict: never re-derived here
        if v is None and d == "full" and ref.trusted is not None:
            v = "ok" if ref.trusted else "untrusted"
        status = "n/a" if v is None else v if v == "ok" else f"UNTRUSTED: {v}"
        rows.append([d, fmt(dh), fmt(ref.dh(summary, d, "delta_h_per_token")), fmt(d1), fmt(se),
                     fmt(ref.dh(summary, d, "ess")), fmt(k), status])
    w = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in [header, *rows]]
    lines.append("")
    for name in ("influence", "kernel", "proxy", "trust"):
        lines.append(f"{name}: {'done' if summary.get(name) else NOT_RUN}")
    warns = all_warnings(summary)
    lines += ["", f"warnings ({len(warns)}):" if warns else "warnings: none"] + [f"  - {x}" for x in warns]
    return "\n".join(lines) + "\n"
