"""``token_influence.png``: each published rule's prediction against the exact token influence, one
scattered point per scored update token, one panel per rule (``arrays/token_influence.npy``,
``arrays/token_proxies.npy`` and ``summary.proxies``; see :mod:`deltaH.io.plots`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from deltaH.io._present import DPI, fmt, num, pyplot, tick_formatter
from deltaH.io.schema import RunSummary

MAX_POINTS = 20_000  # tokens drawn per panel (a seeded subsample beyond this)


def plot_token_influence(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    """x: a token's exact δH₁ at η_ref; y: a rule's predicted change (its own units); red: the token's
    sequence has a positive advantage, blue: negative. Titles carry the Spearman ± s.e."""
    p = summary.proxies
    if p is None or not p.rules or "token_influence" not in arrays or "token_proxies" not in arrays:
        return None
    exact = np.asarray(arrays["token_influence"], dtype=np.float64)
    preds = np.asarray(arrays["token_proxies"], dtype=np.float64)
    if preds.ndim != 3 or preds.shape[0] != len(p.rules) or preds.shape[1:] != exact.shape:
        return None
    adv = arrays.get("update_advantages")
    a = np.asarray(adv, dtype=np.float64).reshape(-1, 1) * np.ones_like(exact) if adv is not None \
        and np.asarray(adv).size == exact.shape[0] else np.zeros_like(exact)
    mask = (exact != 0) | (preds != 0).any(0)
    idx = np.flatnonzero(mask.reshape(-1))
    if idx.size > MAX_POINTS:
        idx = np.sort(np.random.default_rng(0).choice(idx, MAX_POINTS, replace=False))
    x, col = exact.reshape(-1)[idx], a.reshape(-1)[idx]
    colors = np.where(col > 0, "#d62728", np.where(col < 0, "#1f77b4", "0.5"))
    plt = pyplot()
    n = len(p.rules)
    ncols = min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.4 * ncols, 3.8 * nrows + 0.6), squeeze=False)
    for ax, r, y in zip(axes.flat, p.rules, preds, strict=False):
        ax.scatter(x, y.reshape(-1)[idx], s=8, c=colors, alpha=0.6, linewidths=0)
        ax.axhline(0, color="k", lw=0.6)
        ax.axvline(0, color="k", lw=0.6)
        rho, se = num(r.spearman.value), num(r.spearman.se)
        stat = "Spearman n/a" if rho is None else f"Spearman {fmt(rho, 2)}"
        stat += "" if rho is None or se is None else f" ± {fmt(se, 2)}"
        ax.set_title(f"{r.label}\n{stat}", fontsize=9)
        ax.set_xlabel(f"exact δH₁ of the token at η = {fmt(p.eta)} (nats/seq)", fontsize=8)
        ax.set_ylabel("the rule's predicted ΔH (its units)", fontsize=8)
        ax.xaxis.set_major_formatter(tick_formatter())
        ax.yaxis.set_major_formatter(tick_formatter())
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    shown = f"{idx.size} of {int(mask.sum())} tokens" if idx.size < int(mask.sum()) else f"{idx.size} tokens"
    fig.suptitle(f"Published token-level rules against the exact token influence ({shown}; red: A > 0, "
                 "blue: A < 0)\nagreement lies along a rising diagonal through the origin", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
