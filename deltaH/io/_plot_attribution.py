"""``attribution.png``: ΔH summed over tagged groups of update sequences, one panel per tag family
(``summary.attribution``; see :mod:`deltaH.io.plots`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.io._present import DPI, fmt, num, pyplot, tick_formatter
from deltaH.io.schema import RunSummary, TagGroup

MAX_BARS = 12  # same-prompt groups drawn (the largest |ΔH| first)
RAISE, LOWER, BASE = "#d62728", "#1f77b4", "0.55"


def _value(x: float) -> float:
    v = num(x)
    return 0.0 if v is None else v


def _err(x: float) -> float:
    v = num(x)
    return 0.0 if v is None else v


def _panel(ax: Any, title: str, groups: list[TagGroup], baseline: TagGroup) -> None:
    rows = [*groups, baseline]
    y = np.arange(len(rows), dtype=float)
    h = 0.38
    for k, g in enumerate(rows):
        base = g is baseline
        for off, est, hatch in ((-h / 2, g.true, None), (h / 2, g.first_order, "///")):
            v = _value(est.delta_h)
            color = BASE if base else (RAISE if v > 0 else LOWER)
            ax.barh(y[k] + off, v, height=h, color=color if hatch is None else "white", edgecolor=color,
                    hatch=hatch, lw=1.0, xerr=_err(est.se), error_kw={"ecolor": "k", "capsize": 2, "lw": 0.8})
    labels = [f"{g.label} (n={g.n})" if g.n else "baseline (momentum + wd)" for g in rows]
    ax.set_yticks(y, [lab if len(lab) <= 34 else lab[:33] + "…" for lab in labels], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.axhline(len(rows) - 1.5, color="0.7", lw=0.6, ls=":")
    ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(tick_formatter())
    ax.set_title(title, fontsize=9)


def plot_attribution(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    """One panel per tag family: each group's true ΔH (solid) and δH₁ (hatched) at η_ref with ± one
    jackknife standard error, the baseline (grey) below; red raises the entropy, blue lowers it."""
    att = summary.attribution
    if att is None or not att.families:
        return None
    plt = pyplot()
    panels = []
    for f in att.families:
        groups = f.groups
        if len(groups) > MAX_BARS:
            groups = sorted(groups, key=lambda g: -abs(_value(g.true.delta_h)))[:MAX_BARS]
            title = f"{f.title} (largest {MAX_BARS} of {len(f.groups)} by |ΔH|)"
        else:
            title = f.title
        panels.append((title, groups))
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    tallest = max(len(g) for _, g in panels) + 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, nrows * (0.42 * tallest + 1.3) + 0.9),
                             squeeze=False)
    for ax, (title, groups) in zip(axes.flat, panels, strict=False):
        _panel(ax, title, groups, att.baseline)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("ΔH at η_ref (nats per sequence)", fontsize=8)
    t, u = att.total.true, att.update.true
    fig.suptitle(f"What drove the entropy change at η = {fmt(att.eta)}: total ΔH = {fmt(t.delta_h)} ± "
                 f"{fmt(t.se)}, update batch {fmt(u.delta_h)} ± {fmt(u.se)}\n"
                 "solid: true ΔH, hatched: δH₁, whiskers ± 1 s.e.; red raises the entropy, blue lowers it",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
