"""The controls section of ``report.md`` (see :mod:`deltaH.io.report`): the entropy-bonus (and KL)
coefficient that puts δH₁ of the step at the target, and ΔH measured there (``summary.controls``)."""

from __future__ import annotations

from deltaH.io._present import num
from deltaH.io._report_common import NOT_RUN, show, table
from deltaH.io.schema import ControlInfo, ControlsInfo, RunSummary

TITLES = {
    "entropy_coef": ("Entropy bonus", "c",
                     "TRL `GRPOConfig.entropy_coef`, verl `entropy_coeff`: the loss gets −c·H_U"),
    "beta": ("KL coefficient", "β", "TRL `GRPOConfig.beta`: the loss gets +β·KL to the reference model"),
}
ROWS = {
    "step": "the step ({sym} = {cur})",
    "term": "the term alone ({sym} = {sym}*)",
    "controlled": "step with {sym}* (D, clipping frozen)",
    "trainer": "trainer's AdamW step with {sym}*",
}


def _control(c: ControlInfo, ctl: ControlsInfo) -> list[str]:
    title, sym, what = TITLES.get(c.name, (c.name, "c", ""))
    eta = num(ctl.eta)
    head = (f"**{title}** ({what}): {sym}* = {show(c.coef)} ± {show(c.coef_se)} makes δH₁ = "
            f"{show(ctl.target)} nats per sequence.")
    s0, sd = num(c.slope_base), num(c.slope_term)
    if eta is not None and s0 is not None and sd is not None:
        head += (f" Without the term δH₁ = {show(eta * s0)} ± {show(eta * c.slope_base_se)}; each unit of "
                 f"{sym} adds {show(eta * sd)} ± {show(eta * c.slope_term_se)}.")
    out = [head, ""]
    if not c.directions or num(c.coef) is None:
        return out
    rows = []
    for d in c.directions:
        label = ROWS.get(d.name, d.name).format(sym=sym, cur=show(c.current))
        rows.append([label, show(d.delta_h), f"{show(d.delta_h1)} ± {show(d.delta_h1_se)}",
                     show(d.second_order), show(d.ess), show(d.khat)])
    out += table(["direction at η_ref", "ΔH (nats/seq)", "δH₁ ± s.e.", "½η²·d²ΔH/dη²", "ESS", "k̂"], rows,
                 drop_empty=True)
    by = {d.name: d for d in c.directions}
    step, ctl_d, tr = by.get("step"), by.get("controlled"), by.get("trainer")
    if step is not None and ctl_d is not None:
        dh0, dh = num(step.delta_h), num(ctl_d.delta_h)
        if dh0 is not None and dh is not None:
            gap = dh - ctl.target
            line = (f"At {sym}* the measured ΔH misses the target by {show(gap)} nats, against a change of "
                    f"{show(dh0 - ctl.target)} from the target without the term")
            so = num(ctl_d.second_order)
            line += "." if so is None else f"; the second-order term predicts a miss of {show(so)}."
            out += ["", line]
    if tr is not None and num(tr.delta_h) is not None:
        out += ["", f"A trainer that sets {sym} = {show(c.coef)} recomputes D and the clipping factor: its "
                f"step changes the entropy by {show(tr.delta_h)} (δH₁ {show(tr.delta_h1)})."]
    return out + [""]


def section(summary: RunSummary) -> list[str]:
    out = ["## Controls", ""]
    ctl = summary.controls
    if ctl is None:
        return out + [f"Coefficients that steer the entropy change (analyses.controls): {NOT_RUN}.", ""]
    out += [f"Which coefficient makes this step's first-order entropy change δH₁ equal the target "
            f"{show(ctl.target)} nats per sequence at η = {show(ctl.eta)} (docs/math.md#controls)? The "
            f"bonus's entropy H_U at θ is {show(ctl.entropy_u)} nats per token.", ""]
    for c in ctl.controls:
        out += _control(c, ctl)
    if ctl.notes:
        out += [f"- {n}" for n in ctl.notes] + [""]
    return out
