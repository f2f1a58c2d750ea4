"""The sections of ``report.md`` on the sweep (see :mod:`deltaH.io.report`), each a list of markdown lines:
headline, setup, decomposition and trust."""

from __future__ import annotations

from typing import Any

import numpy as np

from deltaH.io._present import DECOMPOSITION_LABELS, DECOMPOSITIONS, as_float_array, at, num
from deltaH.io._report_common import (
    NOT_RECORDED,
    NOT_RUN,
    Ref,
    all_warnings,
    pct,
    policy_of,
    share,
    show,
    table,
    uses_top_p,
    verdict,
)
from deltaH.io.schema import ComputeInfo, Decomposition, RunSummary, missing


def headline(summary: RunSummary, ref: Ref) -> list[str]:
    """The status banner (when not complete) and one paragraph: ΔH, δH₁ and H at η_ref."""
    banner = []
    if summary.status not in (None, "complete"):
        banner = [f"> **Status: {summary.status}.** Some analyses did not finish; what is missing is marked "
                  f"\"{NOT_RUN}\" or \"{NOT_RECORDED}\".", ""]
    eta_txt = f"η = {show(ref.eta_ref)}" if ref.eta_ref is not None else "the reference η"
    dh = ref.dh("full")
    para = []
    full = ref.dec("full")
    if full is None or ref.j is None:
        para.append(f"At the learning rate of the next step ({eta_txt}), the true entropy change was "
                    f"{NOT_RECORDED}.")
    else:
        near = "" if ref.exact else f"; nearest grid point {show(ref.eta_j)}"
        if dh is not None:
            change = f"ΔH = {show(dh)} nats per sequence ({show(ref.at(full.delta_h_per_token))} per token)"
        else:
            change = "ΔH = NaN (every importance weight was zero: the step is far too large for this batch)"
        s = (f"At the learning rate of the next step ({eta_txt}{near}), this update changes the policy's "
             f"entropy on the evaluation batch by {change}")
        d1, se = ref.dh1("full")
        if d1 is not None:
            pm = f" ± {show(se)}" if se is not None else ""
            s += f"; the first-order prediction is δH₁ = {show(d1)}{pm}"
        para.append(s + ".")
        flagged = ref.flagged()
        if flagged:
            para.append(f"**Caution:** at this η ΔH is untrusted for {', '.join(f'`{d}`' for d in flagged)} "
                        "(see Trust).")
        elif ref.trusted is False:
            para.append("**Caution:** this η lies outside the trusted range (see Trust).")
    h = num(summary.h_orig)
    if h is not None:
        rel = f" The step changes it by {pct(dh, h)}." if dh is not None else ""
        tok, mode = show(summary.h_orig_per_token), summary.entropy_mode or "rb"
        para.append(f"Before the step the entropy is H = {show(h)} nats per sequence ({tok} per token, "
                    f"{mode} estimator).{rel}")
    return banner + [" ".join(para)]


def _checkpoint(ck: dict[str, Any]) -> str:
    """The checkpoint line, from ``summary.checkpoint`` (``Checkpoint.describe()`` and the compute dtype)."""
    if not ck:
        return f"- **Checkpoint:** {NOT_RECORDED}."
    tdt = ck.get("trainable_dtype")
    tdt_s = f" (trainable parameters stored in {tdt})" if tdt and tdt != ck.get("dtype") else ""
    return (f"- **Checkpoint:** `{ck.get('path')}` ({ck.get('kind', '?')}, global step "
            f"{show(ck.get('global_step'))}); {show(ck.get('n_trainable'))} trainable parameters; "
            f"computed in {ck.get('dtype', '?')}{tdt_s}; learning rate of the next step "
            f"{show(ck.get('lr'))}.")


def _batches(summary: RunSummary) -> list[str]:
    ev, up = summary.batches.eval, summary.batches.update
    out = []
    for b, words in ((ev, "Evaluation batch E"), (up, "Update batch U")):
        if missing(b):
            out.append(f"- **{words}:** {NOT_RECORDED}.")
            continue
        s = (f"- **{words}:** {show(b.n)} sequences = {show(b.n_prompts)} prompts × "
             f"{show(b.group_size)} responses, {show(b.mean_tokens)} response tokens on average")
        if b is up:
            s += f"; mean reward {show(up.mean_reward)}"
            rg = up.resampled_groups
            if rg:
                s += f"; {show(rg)} group{'s' if rg != 1 else ''} resampled (all rewards equal: no signal)"
        out.append(s + ".")
    return out


def setup(summary: RunSummary) -> list[str]:
    out = ["## Setup", "", _checkpoint(summary.checkpoint), *_batches(summary)]
    pol = policy_of(summary.config)
    pol_s = ", ".join(f"{k} = {show(v)}" for k, v in pol.items()) or "as configured"
    mode = summary.entropy_mode or "rb"
    mode_s = "Rao–Blackwellised (per-token entropy of q)" if mode == "rb" else "naive (surprisal −log q)"
    out.append(f"- **Policy:** sampling distribution q = top-p(softmax(z/τ)), {pol_s}; "
               f"entropy estimator {mode_s}.")
    up = summary.update
    if not missing(up):
        mgn = summary.checkpoint.get("max_grad_norm")
        clip = f"clipped at norm {show(mgn)}" if mgn is not None else "no clipping"
        out.append(f"- **Update:** AdamW step on the `{up.loss_type}` loss at lr "
                   f"{show(up.lr_ref)}; gradient norm {show(up.grad_norm)}, {clip} "
                   f"(clipping factor {show(up.clip_coef)}).")
    else:
        out.append(f"- **Update:** {NOT_RECORDED}.")
    eta = as_float_array(summary.eta) if summary.eta else None
    if eta is not None and eta.size:
        out.append(f"- **η grid:** {eta.size} values from {show(np.nanmin(eta))} to {show(np.nanmax(eta))}; "
                   f"reference η_ref = {show(summary.eta_reference)}{_eta_source(summary)}.")
    if summary.compute is not None:
        out.append(_compute_line(summary.compute))
    return out + [""]


def _compute_line(c: ComputeInfo) -> str:
    """The dir_chunk used; for ``auto`` the timing of each candidate (a timing line: compare skips it)."""
    what = "a plain loop over directions" if c.dir_chunk == 1 else f"{c.dir_chunk} directions per vmap call"
    if c.dir_chunk_source != "calibrated" or not c.candidates:
        return f"- **Compute:** dir_chunk {c.dir_chunk} ({what}), as configured."
    times = ", ".join(f"{k}: {t * 1e3:.1f} ms" for k, t in zip(c.candidates, c.seconds, strict=False))
    return (f"- **Compute:** dir_chunk {c.dir_chunk} ({what}), calibrated (auto): median seconds of one "
            f"true-ΔH evaluation of {c.n_sequences} sequences along {c.k} directions, by chunk: {times}.")


ETA_SOURCE_WORDS = {
    "config": "eta.reference as configured",
    "checkpoint_lr": "the checkpoint's lr: the lr of the next step",
    "logged_lr": "the lr of the step that produced the checkpoint, from its trainer_state.json log: the next "
                 "step's lr is 0 at the end of the schedule",
}


def _eta_source(summary: RunSummary) -> str:
    """Where η_ref came from, in words (`` (...)``), or nothing for a folder that did not record it."""
    words = ETA_SOURCE_WORDS.get(summary.eta_reference_source or "")
    return f" ({words})" if words else ""


def _decomposition_row(summary: RunSummary, ref: Ref, name: str, d: Decomposition, top_p: bool,
                       second: bool) -> list[str]:
    dh = ref.at(d.delta_h)
    d1, se = ref.dh1(name)
    ratio = dh / d1 if dh is not None and d1 is not None and d1 != 0 else None
    row = [name, show(dh), show(ref.at(d.delta_h_per_token)),
           show(d1) + (f" ± {show(se)}" if se is not None else ""), show(ratio), show(ref.at(d.ess)),
           show(ref.at(d.khat)),
           show(ref.at(d.retained_mass), 4) if top_p else "",
           share(ref.at(d.nucleus_changed)) if top_p else "",
           show(d.fit.loglog_slope), show(d.fit.r2_origin),
           verdict(summary, ref.j, name) or "n/a"]
    return row + ([show(ref.at(d.second_order))] if second else [])


def decomposition(summary: RunSummary, ref: Ref) -> list[str]:
    out = ["## Decomposition", ""]
    decs = {name: ref.dec(name) for name in DECOMPOSITIONS}
    if all(d is None for d in decs.values()) or ref.j is None:
        return out + [f"True ΔH along the update directions: {NOT_RECORDED}.", ""]
    n_eval = summary.batches.eval.n
    second = any(d is not None and ref.at(d.second_order) is not None for d in decs.values())
    header = ["decomposition", "ΔH (nats/seq)", "ΔH (nats/token)", "δH₁ ± s.e.", "ΔH / δH₁",
              f"ESS (of {show(n_eval)})" if n_eval else "ESS", "k̂", "retained mass", "nucleus moved",
              "log-log slope", "R² (line through 0)", "verdict"]
    header += ["2nd-order prediction"] if second else []
    top_p = uses_top_p(summary)
    rows = []
    for name, d in decs.items():
        if d is None:
            rows.append([name, NOT_RECORDED] + [""] * (len(header) - 2))
        else:
            rows.append(_decomposition_row(summary, ref, name, d, top_p, second))
    near = "" if ref.exact else f" (grid point nearest η_ref = {show(ref.eta_ref)})"
    legend = "; ".join(f"`{d}` = {DECOMPOSITION_LABELS[d]}" for d in DECOMPOSITIONS)
    out += [f"Values at η = {show(ref.eta_j)}{near}. {legend}.", ""]
    out += table(header, rows, drop_empty=True) + [""]
    full, b, g, bg = (ref.dh(d) for d in DECOMPOSITIONS)
    if full is not None and bg is not None:
        diff = abs(full - bg)
        out.append(f"`full` and `baseline+grad` are the same direction (the decomposition is exact) and "
                   f"differ by {show(diff)} nats ({pct(diff, abs(full) if full else None)} of |ΔH|).")
    if full is not None and b is not None and g is not None:
        out.append(f"Momentum + weight decay alone would change the entropy by {show(b)}, this batch's "
                   f"gradient alone by {show(g)} (ΔH is additive only to first order).")
    out.append("A log-log slope near 1 and ΔH/δH₁ near 1 mean the step is in the linear regime; the "
               "verdict is the trust rule's (see Trust).")
    return out + [""]


def _trust_range(summary: RunSummary) -> list[str]:
    """The trusted range, the precision floor and the rule, in words."""
    tr, n_eval = summary.trust, summary.batches.eval.n
    out = []
    lo, hi, floor, noise, thr = (num(x) for x in (tr.eta_min, tr.eta_max, tr.precision_floor, tr.noise,
                                                     tr.khat_threshold))
    if lo is not None and hi is not None:
        out.append(f"ΔH along the full update is trusted for η from {show(lo)} to {show(hi)}.")
    else:
        out.append("ΔH along the full update is trusted at **no** η of the grid.")
    dt = tr.dtype or "the model's dtype"
    sig = f"σ ≥ {show(noise)} nats of {dt} rounding noise" if noise is not None else f"{dt} rounding noise"
    if floor is not None:
        half = dt in ("bfloat16", "float16")
        low = " (computing in float32, checkpoint.dtype=float32, lowers it)" if half else ""
        out.append(f"At and below η = {show(floor)} the measured change is rounding noise ({sig}): the "
                   f"precision floor{low}.")
    else:
        out.append(f"No precision floor was found in the sweep ({sig}).")
    thr_s = (f"{thr:.3f} = min(1 − 1/log10 N, 0.7) for N = {show(n_eval)}" if thr is not None and n_eval
             else show(thr))
    out.append(f"Each η and decomposition is checked by one rule (`deltaH.analysis`): ESS, PSIS k̂ above "
               f"the threshold {thr_s} (counted only once the weights vary, N/ESS − 1 > 0.01), retained "
               "mass and moved nuclei (top-p), the precision floor, and sign flips or non-monotone steps "
               "against δH₁.")
    return out


def trust(summary: RunSummary, ref: Ref) -> list[str]:
    out = ["## Trust", ""]
    tr = summary.trust
    if missing(tr):
        out.append(f"Trust analysis: {NOT_RECORDED}.")
    else:
        out += _trust_range(summary)
        if ref.trusted is not None:
            where = "**inside**" if ref.trusted else "**outside**"
            out.append(f"The reference η_ref = {show(ref.eta_ref)} is {where} the trusted range.")
        verdicts = verdict_table(summary, ref)
        out += ["", *verdicts, ""] if verdicts else ["", f"Per-η verdicts: {NOT_RECORDED}.", ""]
        full = ref.dec("full")
        rm = ref.at(full.retained_mass) if full is not None else None
        if uses_top_p(summary) and rm is not None:
            leak = (" — clearly below 1: some mass left θ's top-p nuclei, so ΔH covers the old support only"
                    if rm < 0.999 else "")
            out.append(f"Retained mass at η_ref: {show(rm, 4)} (an estimate of the probability the updated "
                       f"policy keeps in θ's nuclei; sampling noise can put it above 1){leak}.")
        if tr.notes:
            out += ["", "Notes (full update):"] + [f"- {n}" for n in tr.notes]
    warns = all_warnings(summary)
    out += ["", f"Warnings ({len(warns)}):" if warns else "No warnings were raised."]
    out += [f"- {w}" for w in warns]
    return out + [""]


def verdict_table(summary: RunSummary, ref: Ref) -> list[str]:
    """Per η: the full update's weight diagnostics and every decomposition's stored verdict."""
    if ref.eta is None or not summary.trust.per_eta:
        return []
    decs = [d for d in DECOMPOSITIONS if ref.dec(d) is not None]
    full = ref.dec("full")
    cols = (full.ess, full.khat, full.retained_mass, full.nucleus_changed) if full is not None else ([],) * 4
    top_p = uses_top_p(summary)
    rows = []
    for j, e in enumerate(ref.eta):
        mark = " (η_ref)" if j == ref.j else ""
        ess, khat, ret, moved = (at(c, j) for c in cols)
        rows.append([show(e) + mark, show(ess), show(khat),
                     show(ret, 4) if top_p else "",
                     share(moved) if top_p else ""]
                    + [verdict(summary, j, d) or "n/a" for d in decs])
    header = ["η", "ESS (full)", "k̂ (full)", "retained (full)", "nucleus moved (full)"] + decs
    return table(header, rows, drop_empty=True)

