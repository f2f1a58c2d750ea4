"""The ``report.md`` section on every update token's exact influence on the entropy and the scoreboard
of the published token-level rules against it (``summary.proxies``; see :mod:`deltaH.io.report`)."""

from __future__ import annotations

from deltaH.io._present import num
from deltaH.io._report_common import NOT_RUN, cell, pct, show, table
from deltaH.io.schema import ProxiesInfo, RunSummary, ScoreEstimate

TOP_TOKENS = 5


def _pm(e: ScoreEstimate, percent: bool = False) -> str:
    v, s = num(e.value), num(e.se)
    if v is None:
        return "n/a"
    if percent:
        return f"{show(100 * v)}%" + ("" if s is None else f" ± {show(100 * s)}%")
    return show(v) + ("" if s is None else f" ± {show(s)}")


def _budget(b: float) -> str:
    return f"{show(100 * b)}%"


def _agreement(p: ProxiesInfo) -> list[str]:
    head = ["rule (predicted ΔH of a token)", "Spearman vs exact", "sign agrees"]
    if p.measured:
        head += ["Spearman vs measured ΔH_i", "sign agrees (ΔH_i)"]
    rows = []
    for r in p.rules:
        cells = [r.label, _pm(r.spearman), _pm(r.sign_agreement, True)]
        if p.measured:
            cells += [_pm(r.seq_spearman), _pm(r.seq_sign_agreement, True)]
        rows.append(cells)
    if p.measured and p.exact is not None:
        rows.append(["exact token influence, summed per sequence", "1", "100%", _pm(p.exact.seq_spearman),
                     _pm(p.exact.seq_sign_agreement, True)])
    return table(head, rows)


def _selections(p: ProxiesInfo) -> list[str]:
    tops = p.rules[0].topk
    head = ["rule"] + [f"top {_budget(t.budget)} (k = {t.k}): precision / recall; share" for t in tops]
    rows = [[r.label] + [f"{_pm(t.precision, True)} / {_pm(t.recall, True)}; {_pm(t.share, True)}"
                         for t in r.topk] for r in p.rules]
    rows.append(["exact selection (the best any rule can do)"] + [f"100% / 100%; {_pm(t.exact_share, True)}"
                                                                  for t in tops])
    return table(head, rows)


def _best(p: ProxiesInfo) -> str | None:
    """One sentence on the best rule by token-level Spearman, and how good that is."""
    scored = [(num(r.spearman.value), num(r.spearman.se), r) for r in p.rules]
    scored = [s for s in scored if s[0] is not None]
    if not scored:
        return None
    rho, se, r = max(scored, key=lambda s: s[0] or 0.0)
    clear = se is not None and abs(rho or 0.0) > 2 * se
    verdict = "clearly above zero" if clear and (rho or 0.0) > 0 else "within 2 s.e. of zero" if not clear \
        else "clearly below zero"
    return (f"The best rank agreement with the exact token influence is {r.label}'s, Spearman "
            f"{_pm(r.spearman)} ({verdict}).")


def section(summary: RunSummary) -> list[str]:
    out = ["## Token influence and the published rules", ""]
    p = summary.proxies
    if p is None:
        return out + [f"Token influence and the scoreboard of token-level rules: {NOT_RUN}.", ""]
    out.append(
        "Every scored token of the update batch moves the entropy of the evaluation batch, to first order, "
        "by δH₁_t = −η·(1−β1)·clip·w_t·⟨∇log π(y_t), X/D⟩ (docs/math.md#token-influence): exact, from one "
        f"forward-mode pass over U. At η = {show(p.eta)} its {show(p.n_tokens)} tokens (τ = "
        f"{show(p.temperature)}) together give δH₁ along `grad` = {show(p.delta_h1_grad)} nats per sequence.")
    if p.top_tokens:
        rows = [[str(k), show(t.row), show(t.index), cell(repr(t.text) if t.text is not None else t.token_id),
                 show(t.delta_h1), pct(t.delta_h1, p.delta_h1_grad), show(t.advantage), show(t.logp),
                 show(t.entropy)] for k, t in enumerate(p.top_tokens[:TOP_TOKENS], 1)]
        out += ["", f"The {len(rows)} update tokens with the largest |δH₁|:", ""]
        out += table(["rank", "row i", "token k", "token", "δH₁ (nats/seq)", "share of δH₁ (grad)",
                      "advantage", "log π", "H"], rows)
    if not p.rules:
        return out + [""]
    out += ["", "**Scoreboard.** Published rules predict a token's entropy change from U alone "
                "(docs/math.md#token-level-proxies). Each is compared with the exact token influence "
                "(docs/math.md#proxy-scoreboard) and, summed per update sequence, with the measured ΔH_i of "
                "each sequence's share of the step (the influence matrix's columns); ± is a bootstrap "
                f"standard error over update sequences ({show(p.n_boot)} resamples).", ""]
    out += _agreement(p)
    out += ["", "The tokens each rule would clip at Clip-Cov / KL-Cov's budgets (its k most entropy-lowering "
                "tokens) against the exact k, and the fraction of δH₁ along `grad` those tokens carry (a "
                "share above 100% means the other tokens partly cancel them):", ""]
    out += _selections(p)
    out.append("")
    best = _best(p)
    if best:
        out.append(best)
    if not p.measured:
        out.append("Sequence-level scores need the measured per-sequence ΔH: analyses.influence was off.")
    for name, why in p.not_implemented.items():
        out.append(f"Not implemented: {name.replace('_', ' ')} ({why}).")
    return out + [""]
