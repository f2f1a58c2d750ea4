"""The η-sweep plots: ``delta_h_vs_eta.png`` and ``ess_khat.png`` (see :mod:`deltaH.io.plots`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.io._present import (
    COLORS,
    DECOMPOSITION_LABELS,
    DECOMPOSITIONS,
    DPI,
    eta_grid,
    fmt,
    num,
    pyplot,
    sweep,
    trusted_mask,
)
from deltaH.io.schema import RunSummary


def _shade_untrusted(ax: Any, eta: np.ndarray, trusted: np.ndarray | None, label: bool) -> None:
    """Shade runs of untrusted grid points out to the geometric midpoints with their neighbours."""
    if trusted is None or trusted.all():
        return
    pos = eta > 0  # log axis: η = 0 has no place on it
    order = np.argsort(eta[pos])
    e, t = eta[pos][order], trusted[pos][order]
    if not e.size:
        return
    edges = np.sqrt(e[:-1] * e[1:])
    lo_edge = e[0] / 3 if e.size == 1 else e[0] / np.sqrt(e[1] / e[0])
    hi_edge = e[-1] * 3 if e.size == 1 else e[-1] * np.sqrt(e[-1] / e[-2])
    bounds = np.concatenate([[lo_edge], edges, [hi_edge]])
    i = 0
    first = label
    while i < e.size:
        if t[i]:
            i += 1
            continue
        j = i
        while j + 1 < e.size and not t[j + 1]:
            j += 1
        ax.axvspan(bounds[i], bounds[j + 1], color="0.85", zorder=0, lw=0,
                   label="untrusted η" if first else None)
        first = False
        i = j + 1


def _eta_ref_line(ax: Any, summary: RunSummary, label: bool) -> None:
    ref = num(summary.eta_reference)
    if ref is not None and ref > 0:
        ax.axvline(ref, color="0.3", lw=0.8, ls="-.", zorder=1,
                   label="η_ref (next step's lr)" if label else None)


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def _sweep_panel(ax: Any, summary: RunSummary, eta: np.ndarray, name: str, s: dict[str, np.ndarray]
                 ) -> list[np.ndarray]:
    """One decomposition's |ΔH| (filled > 0, open < 0), δH₁, fit, floor and shading; returns the
    plotted magnitudes (for the shared y range)."""
    c, dh, ys = COLORS[name], s["delta_h"], []
    pos = np.isfinite(dh) & (dh > 0) & (eta > 0)
    neg = np.isfinite(dh) & (dh < 0) & (eta > 0)
    _shade_untrusted(ax, eta, trusted_mask(summary, eta, name), label=True)
    _eta_ref_line(ax, summary, label=True)
    own = summary.trust.decompositions.get(name)
    floor = num(own.precision_floor) if own is not None else None
    if floor is not None and floor > 0:  # an η: ΔH is rounding noise at and below it
        ax.axvline(floor, color="0.5", lw=0.8, ls=":", label="precision floor (η)")
    if "delta_h1" in s:
        x1, y1 = _positive(eta, np.abs(s["delta_h1"]))
        if x1.size:
            ax.plot(x1, y1, color="k", ls="--", lw=1.2, label="|δH₁| (first order)", zorder=2,
                    marker="x" if x1.size < 3 else None)
            ys.append(y1)
    dec = summary.decompositions.get(name)
    slope = num(dec.fit.slope_origin) if dec is not None else None
    if slope is not None and slope != 0:
        xf, yf = _positive(eta, np.abs(slope) * eta)
        if xf.size:
            ax.plot(xf, yf, color=c, ls=":", lw=1.2, label=f"fit |{fmt(slope)}·η| (through 0)", zorder=2)
    if pos.any():
        ax.plot(eta[pos], dh[pos], "o", color=c, ms=6, label="ΔH > 0 (true, SNIS)", zorder=3)
        ys.append(dh[pos])
    if neg.any():
        ax.plot(eta[neg], -dh[neg], "o", mfc="white", mec=c, mew=1.5, ms=6, label="ΔH < 0 (plotted |ΔH|)",
                zorder=3)
        ys.append(-dh[neg])
    ax.set_title(DECOMPOSITION_LABELS[name], fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return ys


def _log_axes(axes: Any, eta: np.ndarray, ys: list[np.ndarray]) -> None:
    """Shared log-log limits; no minor ticks over more than three decades."""
    from matplotlib.ticker import NullLocator

    y = np.concatenate(ys) if ys else np.array([])
    y = y[np.isfinite(y) & (y > 0)]
    pe = eta[np.isfinite(eta) & (eta > 0)]
    if not (y.size and pe.size):
        return
    ax0 = axes[0][0]
    ax0.set_xscale("log")
    ax0.set_yscale("log")
    ax0.set_xlim(pe.min() / 2, pe.max() * 2)
    ax0.set_ylim(y.min() / 3, y.max() * 3)
    # minor ticks over many decades cost seconds to lay out and add little; keep them on short ranges
    wide_x = pe.max() / pe.min() > 1e3
    wide_y = y.max() / y.min() > 1e3
    for row in axes:
        for ax in row:
            if wide_x:
                ax.xaxis.set_minor_locator(NullLocator())
            if wide_y:
                ax.yaxis.set_minor_locator(NullLocator())


def plot_delta_h_vs_eta(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    eta = eta_grid(summary, arrays)
    data = {k: v for k, v in sweep(summary, arrays).items() if "delta_h" in v}
    if eta is None or not data:
        return None
    plt = pyplot()
    names = [n for n in DECOMPOSITIONS if n in data]
    ncols = 2 if len(names) > 1 else 1
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    ys: list[np.ndarray] = []
    for k, name in enumerate(names):
        ys += _sweep_panel(axes[k // ncols][k % ncols], summary, eta, name, data[name])
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    _log_axes(axes, eta, ys)
    for r, row in enumerate(axes):
        for k, ax in enumerate(row):
            if not ax.get_visible():
                continue
            if (r + 1) * ncols + k >= len(names):  # the lowest visible panel of its column
                ax.set_xlabel("step size η (learning rate)")
            if k == 0:
                ax.set_ylabel("|ΔH| (nats per sequence)")
    fig.suptitle("Entropy change vs step size on the evaluation batch\n"
                 "filled: ΔH > 0 (entropy rises), open: ΔH < 0 (entropy falls); "
                 "shaded: outside the trusted range", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def plot_ess_khat(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    eta = eta_grid(summary, arrays)
    data = sweep(summary, arrays)
    if eta is None or not any("ess" in v or "khat" in v for v in data.values()):
        return None
    plt = pyplot()
    n_eval = summary.batches.eval.n
    trusted = trusted_mask(summary, eta)
    thr = num(summary.trust.khat_threshold)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    ok = eta > 0
    for ax in (a1, a2):
        _shade_untrusted(ax, eta, trusted, label=ax is a1)
        _eta_ref_line(ax, summary, label=ax is a1)
    for name in DECOMPOSITIONS:
        s = data.get(name, {})
        ls = "--" if name == "baseline+grad" else "-"
        if "ess" in s:
            e = s["ess"] / n_eval if n_eval else s["ess"]
            a1.plot(eta[ok], e[ok], "o", ls=ls, ms=4, color=COLORS[name], label=name)
        if "khat" in s:
            a2.plot(eta[ok], s["khat"][ok], "o", ls=ls, ms=4, color=COLORS[name], label=name)
    if thr is not None:
        a2.axhline(thr, color="k", ls="--", lw=1, label=f"k̂ threshold {fmt(thr)}")
    if ok.any():
        a1.set_xscale("log")
    a1.set_ylabel("ESS / N (effective sample fraction)" if n_eval else "ESS (effective sample size)")
    if n_eval:
        a1.set_ylim(-0.03, 1.05)
    a1.set_title(f"Effective sample size{f' (N = {n_eval})' if n_eval else ''}", fontsize=10)
    a2.set_ylabel("PSIS k̂ (Pareto shape of the largest weights)")
    a2.set_title("Tail of the importance weights: k̂ above the threshold = unreliable", fontsize=10)
    for ax in (a1, a2):
        ax.set_xlabel("step size η (learning rate)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
