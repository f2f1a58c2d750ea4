"""Helpers of ``report.md`` and ``deltah inspect``: values at η_ref, stored verdicts, table cells.

Everything reads a :class:`~deltaH.io.schema.RunSummary`. NaN and inf print as "n/a", as the
``null`` they become in ``summary.json``, so the report of a summary in memory and of the same
summary read back from its file are identical.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from deltaH.analysis import reason_kind
from deltaH.io._present import DECOMPOSITIONS, as_float_array, at, eta_index, fmt, num, trusted_mask
from deltaH.io.schema import Decomposition, RunSummary, missing

NOT_RUN = "not run"  # an optional analysis that was off (null in summary.json)
NOT_RECORDED = "not recorded"  # a part every run writes, absent from this (older or partial) summary
SNIPPET = 60


def show(x: Any, sig: int = 3) -> str:
    """:func:`fmt`, with NaN and inf (null in ``summary.json``) as n/a."""
    return fmt(None if isinstance(x, float) and not math.isfinite(x) else x, sig)


def pct(x: float | None, of: float | None) -> str:
    if x is None or of is None or not (math.isfinite(x) and math.isfinite(of)) or of == 0:
        return "n/a"
    return f"{fmt(100 * x / of)}%"


def share(x: float | None) -> str:
    """A fraction in [0, 1] as a percentage ("" when unknown)."""
    return "" if x is None else ("0" if x == 0 else f"{fmt(100 * x)}%")


def cell(s: Any) -> str:
    """Text safe inside a markdown table cell, cut to ``SNIPPET`` characters."""
    t = " ".join(str(s).replace("|", "\\|").split("\n")).strip()
    t = " ".join(t.split())
    return t if len(t) <= SNIPPET else t[: SNIPPET - 1] + "…"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], drop_empty: bool = False) -> list[str]:
    """A markdown table; ``drop_empty`` leaves out columns with no value in any row."""
    if drop_empty and rows:
        keep = [i for i in range(len(header)) if any(r[i] not in ("", "n/a") for r in rows)]
        header = [header[i] for i in keep]
        rows = [[r[i] for i in keep] for r in rows]
    head = " | ".join(h.replace("|", "\\|") for h in header)
    out = [f"| {head} |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def verdict(summary: RunSummary, j: int | None, dec: str) -> str | None:
    """The stored trust verdict of decomposition ``dec`` at grid point ``j``: "ok", or the kinds of
    its reasons (``trust.per_eta``, written by the runner's one trust rule); None when not stored."""
    per = summary.trust.per_eta
    if j is None or not 0 <= j < len(per):
        return None
    why = per[j].reasons.get(dec)
    if why is None:
        return None
    return "ok" if not why else ", ".join(dict.fromkeys(reason_kind(r) for r in why))


def all_warnings(summary: RunSummary) -> list[str]:
    """The summary's warnings plus a line for every decomposition with an untrusted η (from the stored
    verdicts), so no report or table says "no warnings" beside a flag."""
    warns = list(summary.warnings)
    return warns + [w for w in summary.trust.warning_lines() if w not in warns]


def policy_of(config: Mapping[str, Any]) -> dict[str, Any]:
    """temperature, top_p and max_new_tokens of the resolved config (``policy`` or ``sampling``)."""
    found: dict[str, Any] = {}
    for src in (config.get("policy"), config.get("sampling"), config):
        if isinstance(src, Mapping):
            for k in ("temperature", "top_p", "max_new_tokens"):
                if k in src and k not in found:
                    found[k] = src[k]
    return found


def uses_top_p(summary: RunSummary) -> bool:
    """Whether the run used top-p (retained mass and moved nuclei mean something only then)."""
    if summary.trust.top_p is not None:
        return bool(summary.trust.top_p)
    p = policy_of(summary.config).get("top_p")
    return p is None or float(p) < 1.0


class Ref:
    """The η_ref grid point and the values the headline and tables use."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        self.eta_ref = num(summary.eta_reference)
        self.eta = as_float_array(summary.eta) if summary.eta else None
        self.j = eta_index(self.eta, self.eta_ref)
        self.eta_j = float(self.eta[self.j]) if self.eta is not None and self.j is not None else None
        self.exact = (self.eta_j is not None and self.eta_ref is not None
                      and math.isclose(self.eta_j, self.eta_ref, rel_tol=1e-6))
        tm = trusted_mask(summary, self.eta) if self.eta is not None else None
        self.trusted = None if tm is None or self.j is None else bool(tm[self.j])

    def dec(self, name: str) -> Decomposition | None:
        """Decomposition ``name``, or None when the summary does not record it."""
        d = self.summary.decompositions.get(name)
        return None if d is None or missing(d) else d

    def at(self, values: Sequence[Any] | None) -> float | None:
        """A per-η list's value at η_ref (None: not recorded or not finite)."""
        return at(values, self.j)

    def dh(self, name: str) -> float | None:
        d = self.dec(name)
        return None if d is None else self.at(d.delta_h)

    def dh1(self, name: str) -> tuple[float | None, float | None]:
        """δH₁ at η_ref (slope × η_ref when the slope is known) and its standard error."""
        d = self.dec(name)
        fo = None if d is None else d.first_order
        if fo is None:
            return None, None
        slope, se = num(fo.slope), num(fo.stderr_slope)
        if slope is not None and self.eta_ref is not None:
            return slope * self.eta_ref, (se * self.eta_ref if se is not None else None)
        return self.at(fo.delta_h), None

    def flagged(self) -> list[str]:
        """The decompositions whose stored verdict at η_ref is not "ok"."""
        return [d for d in DECOMPOSITIONS if verdict(self.summary, self.j, d) not in (None, "ok")]
