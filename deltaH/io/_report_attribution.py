"""The ``report.md`` section on which groups of update sequences drove ΔH (``summary.attribution``), and
the one-line answer the headline carries (see :mod:`deltaH.io.report`)."""

from __future__ import annotations

from pathlib import Path

from deltaH.attribution import FAMILY_TITLES
from deltaH.io._present import num
from deltaH.io._report_analyses import read_rows
from deltaH.io._report_common import NOT_RUN, Ref, cell, show, table, verdict
from deltaH.io.schema import (
    AttributedSequence,
    AttributionInfo,
    GroupEstimate,
    RunSummary,
    TagFamily,
    TagGroup,
)

MAX_GROUPS = 12  # same-prompt groups listed in the table (the largest |ΔH| first)
CLEAR = 2.0  # a group "clearly" moves the entropy when |ΔH| > CLEAR standard errors


def clear(e: GroupEstimate) -> bool | None:
    """|ΔH| > 2 s.e. (None when either is unknown)."""
    dh, se = num(e.delta_h), num(e.se)
    return None if dh is None or se is None else abs(dh) > CLEAR * se


def pm(x: float | None, se: float | None) -> str:
    """``x ± se`` (``x`` alone when the error is unknown)."""
    return show(x) if num(se) is None else f"{show(x)} ± {show(se)}"


def pct_pm(x: float | None, se: float | None) -> str:
    v, s = num(x), num(se)
    if v is None:
        return "n/a"
    return f"{show(100 * v)}%" + ("" if not s else f" ± {show(100 * s)}%")


def _moves(e: GroupEstimate) -> str:
    dh = num(e.delta_h) or 0.0
    return "raises" if dh > 0 else "lowers"


def drivers(summary: RunSummary) -> list[str]:
    """The headline's answer: the groups (of every family but same-prompt groups) that clearly move the
    entropy in the direction of the total, the most clearly (largest |ΔH| / s.e.) first."""
    att = summary.attribution
    if att is None:
        return []
    total = num(att.total.true.delta_h)
    if total is None or total == 0:
        return []
    hits = [(g.label, g.true) for f in att.families if f.name != "prompt_group" for g in f.groups
            if clear(g.true) and (num(g.true.delta_h) or 0.0) * total > 0]
    hits.sort(key=lambda h: -abs((num(h[1].delta_h) or 0.0) / (num(h[1].se) or 1.0)))
    way = "down" if total < 0 else "up"
    if not hits:
        return [f"No tagged group of the update batch clearly drives the entropy {way} on its own "
                "(|ΔH| ≤ 2 s.e. for each; see *What drove it*)."]
    items = "; ".join(f"{label}: {pm(e.delta_h, e.se)}" for label, e in hits)
    return [f"**What drove the entropy {way}** (groups of the update batch with |ΔH| > 2 s.e., true ΔH in "
            f"nats per sequence; see *What drove it*): {items}."]


def _same_split(fam: TagFamily, earlier: list[TagFamily]) -> TagFamily | None:
    """An earlier family whose groups hold the same sequences (same sizes and sums): e.g. reward and
    advantage sign under binary rewards."""
    key = sorted((g.n, g.true.delta_h) for g in fam.groups)
    return next((f for f in earlier if sorted((g.n, g.true.delta_h) for g in f.groups) == key), None)


def _family_line(title: str, groups: list[TagGroup], many: bool) -> str:
    hit = sorted((g for g in groups if clear(g.true)), key=lambda g: -abs(num(g.true.delta_h) or 0.0))
    rest = [g for g in groups if not clear(g.true)]
    parts = [f"{g.label} {_moves(g.true)} it (ΔH = {pm(g.true.delta_h, g.true.se)}, "
             f"{pct_pm(g.true.share, None)} of the total)" for g in hit[: 3 if many else None]]
    if many and len(hit) > 3:
        k = len(hit) - 3
        parts.append(f"{k} more group{'s clearly move' if k > 1 else ' clearly moves'} it")
    if rest:
        noise = (f"{len(rest)} other group{'s' * (len(rest) != 1)}" if many
                 else ", ".join(f"{g.label} ({pm(g.true.delta_h, g.true.se)})" for g in rest))
        parts.append(f"within noise: {noise}" if hit else f"every group within noise ({noise})")
    return f"- **{title}:** " + "; ".join(parts) + "."


def _row(family: str, g: TagGroup) -> list[str]:
    return [family, cell(g.label), show(g.n) if g.n else "", pm(g.true.delta_h, g.true.se),
            pct_pm(g.true.share, g.true.share_se), pm(g.first_order.delta_h, g.first_order.se),
            pct_pm(g.first_order.share, g.first_order.share_se)]


def _table(att: AttributionInfo) -> list[str]:
    rows, notes = [], []
    for f in att.families:
        groups = f.groups
        if f.name == "prompt_group" and len(groups) > MAX_GROUPS:
            groups = sorted(groups, key=lambda g: -abs(num(g.true.delta_h) or 0.0))[:MAX_GROUPS]
            notes.append(f"Same-prompt groups: the {MAX_GROUPS} of {len(f.groups)} with the largest |ΔH| "
                         "(all are in summary.json).")
        rows += [_row(f.title, g) for g in groups]
    rows += [_row("—", att.update), _row("—", att.baseline), _row("—", att.total)]
    head = ["tag family", "group", "n", "ΔH ± s.e. (true)", "share ± s.e. (true)", "δH₁ ± s.e.",
            "share ± s.e. (δH₁)"]
    return [""] + table(head, rows) + ([""] + notes if notes else [])


def _top(title: str, seqs: list[AttributedSequence], prompts: dict[int, str]) -> list[str]:
    if not seqs:
        return []
    rows = [[str(k), show(s.row), pm(s.delta_h, s.delta_h_se), pm(s.delta_h1, s.delta_h1_se),
             show(s.advantage), show(s.reward), show(s.length), "no" if s.truncated else "yes",
             cell(prompts.get(s.row, "")), cell(s.response or "")]
            for k, s in enumerate(seqs, 1)]
    head = ["rank", "row i", "ΔH ± s.e.", "δH₁ ± s.e.", "advantage", "reward", "tokens", "EOS", "prompt",
            "response"]
    return ["", title, ""] + table(head, rows, drop_empty=True)


def section(summary: RunSummary, ref: Ref, run_dir: Path) -> list[str]:
    out = ["## What drove it", ""]
    att = summary.attribution
    if att is None:
        return out + [f"Attribution to groups of update sequences: {NOT_RUN} (it needs analyses.influence).",
                      ""]
    u, b, t = att.update.true, att.baseline.true, att.total.true
    out.append(f"Each update sequence's contribution is ΔH along its own share of the step (its "
               f"influence column, docs/math.md#attribution), at η = {show(att.eta)}. Summed over groups "
               "that share a tag, they say which kinds of samples moved the entropy. ± is one jackknife "
               "standard error over the evaluation sequences; a group *clearly* moves the entropy when "
               "|ΔH| > 2 s.e. Shares are of the total, update batch + baseline.")
    out.append("")
    grad = ref.dh("grad")
    gap = f" (ΔH along `grad` itself: {show(grad)}; they agree to first order)" if grad is not None else ""
    out.append(f"The update batch's sequences together change the entropy by {pm(u.delta_h, u.se)} "
               f"nats{gap}; momentum and weight decay (the baseline) by {pm(b.delta_h, b.se)} "
               f"({pct_pm(b.share, b.share_se)} of the total {pm(t.delta_h, t.se)}).")
    if clear(t) is False:
        out.append("The total is within 2 s.e. of zero, so the shares are unstable: compare the ΔH column.")
    bad = [d for d in ("baseline", "grad") if verdict(summary, ref.j, d) not in (None, "ok")]
    if bad:
        out.append(f"ΔH along {' and '.join(f'`{d}`' for d in bad)} is untrusted at this η (see Trust): read "
                   "its values here with the same care.")
    out.append("")
    for k, f in enumerate(att.families):
        same = _same_split(f, att.families[:k])
        line = _family_line(f.title, f.groups, many=f.name == "prompt_group")
        out.append(line if same is None else line[:-1] + f" (the same sequences as {same.title}).")
    for name, why in att.omitted.items():
        out.append(f"- **{FAMILY_TITLES.get(name, name)}:** not split: {why}.")
    out += _table(att)
    rows = read_rows(run_dir, "update")
    prompts = {i: str(r.get("prompt", "")) for i, r in rows.items()}
    for way, seqs in (("lower", att.top_lower), ("raise", att.top_raise)):
        out += _top(f"The {len(seqs)} update sequences that {way} the entropy most:", seqs, prompts)
    return out + [""]
