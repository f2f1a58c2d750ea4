"""Plots of a results folder (``docs/results-schema.md``), drawn with matplotlib on the Agg backend.

``make_plots(summary, arrays, run_dir / "plots")`` (``summary``: a :class:`~deltaH.io.schema.RunSummary`,
``arrays``: ``ResultsDir.load_arrays()``) writes, when their data exist:

* ``delta_h_vs_eta.png``  |ΔH| vs η on log-log axes, one panel per decomposition: filled markers
  where ΔH > 0, open markers where ΔH < 0, the δH₁ line (dashed), the least-squares line through
  the origin (dotted), the precision floor and the untrusted η range shaded;
* ``ess_khat.png``        ESS/N and PSIS k̂ vs η per decomposition, k̂ threshold dashed;
* ``influence.png``       the influence matrix ``M[n, i]`` [N_E, N_U] (true and/or first order),
  diverging colormap centred at 0;
* ``contributors.png``    the largest column sums (update sequences) and per-evaluation-sequence
  contributions;
* ``attribution.png``     ΔH summed over tagged groups of update sequences (advantage sign, reward,
  truncation, length quartile, prompt group), true and first order with standard errors;
* ``token_influence.png`` each published token-level rule's prediction against the exact token
  influence, one point per update token, one panel per rule.
* ``kernel.png``          the cross Fisher kernel's entries over same-prompt and different-prompt
  pairs, two histograms side by side.

A plot whose data are missing (an analysis that was not run, ``null`` in the summary) is skipped.
matplotlib is optional (``pip install matplotlib``); it is imported lazily, and its absence raises
an ``ImportError`` that says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltaH.io._plot_attribution import plot_attribution as plot_attribution
from deltaH.io._plot_kernel import plot_kernel as plot_kernel
from deltaH.io._plot_sweep import plot_delta_h_vs_eta as plot_delta_h_vs_eta
from deltaH.io._plot_sweep import plot_ess_khat as plot_ess_khat
from deltaH.io._plot_tokens import plot_token_influence as plot_token_influence
from deltaH.io._present import COLORS as COLORS
from deltaH.io._present import DECOMPOSITION_LABELS as DECOMPOSITION_LABELS
from deltaH.io._present import DECOMPOSITIONS as DECOMPOSITIONS
from deltaH.io._present import DPI as DPI
from deltaH.io._present import as_float_array as as_float_array
from deltaH.io._present import eta_grid as eta_grid
from deltaH.io._present import eta_index as eta_index
from deltaH.io._present import fmt as fmt
from deltaH.io._present import num, pyplot, require_summary, tick_formatter
from deltaH.io._present import sweep as sweep
from deltaH.io._present import trusted_mask as trusted_mask
from deltaH.io.schema import RunSummary

TOP_K = 15


def _influence_eta(summary: RunSummary) -> float | None:
    """η of the influence matrices (η_ref when not recorded)."""
    inf = summary.influence
    return (num(inf.eta) if inf is not None else None) or num(summary.eta_reference)


def _symmetric_limit(m: np.ndarray) -> float:
    a = np.abs(m[np.isfinite(m)])
    if not a.size:
        return 1.0
    v = float(np.quantile(a, 0.995)) if a.size > 200 else float(a.max())
    return v if v > 0 else (float(a.max()) or 1.0)


def plot_influence(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    mats = [(k, np.asarray(arrays[a], dtype=np.float64)) for k, a in
            (("true (SNIS)", "influence_true"), ("first order", "influence_first_order"))
            if a in arrays and np.asarray(arrays[a]).ndim == 2 and np.asarray(arrays[a]).size]
    if not mats:
        return None
    plt = pyplot()
    from matplotlib.colors import TwoSlopeNorm

    eta = _influence_eta(summary)
    g_u = summary.batches.update.group_size
    n_e, n_u = mats[0][1].shape
    w = min(6.5, max(3.5, 3.0 + n_u / 16))
    h = min(6.5, max(3.0, 2.0 + n_e / 16))
    fig, axes = plt.subplots(1, len(mats), figsize=(w * len(mats) + 1.0, h), squeeze=False)
    for ax, (kind, m) in zip(axes[0], mats, strict=True):
        v = _symmetric_limit(m)
        im = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -v, v),
                       interpolation="nearest")
        if g_u and 1 < g_u < n_u and n_u // g_u <= 32:
            for b in range(g_u, n_u, g_u):
                ax.axvline(b - 0.5, color="0.4", lw=0.5)
        ax.set_xlabel("update sequence i" + (f" (groups of {g_u})" if g_u else ""))
        ax.set_ylabel("evaluation sequence n")
        ax.set_title(f"Influence M[n, i], {kind}" + (f", η = {fmt(eta)}" if eta else ""), fontsize=10)
        clipped = np.nanmax(np.abs(m)) > v
        cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend="both" if clipped else "neither",
                          format=tick_formatter())
        cb.set_label("contribution to ΔH (nats per sequence)\nred: raises entropy, blue: lowers it",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def _bar(ax: Any, vals: np.ndarray, labels: list[str]) -> None:
    y = np.arange(vals.size)
    colors = ["#d62728" if v > 0 else "#1f77b4" for v in vals]
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(tick_formatter())




def _contributor_labels(idx: np.ndarray, first: np.ndarray | None, first_fmt: str, second: np.ndarray | None,
                        second_fmt: str) -> list[str]:
    """Bar labels ``#i`` plus two optional per-sequence values (e.g. reward and advantage)."""
    labels = []
    for i in idx:
        lab = f"#{i}"
        if first is not None and i < len(first):
            lab += first_fmt.format(float(first[i]))
        if second is not None and i < len(second):
            lab += second_fmt.format(float(second[i]))
        labels.append(lab)
    return labels


def _eval_contributions(summary: RunSummary, arrays: Mapping[str, np.ndarray]
                        ) -> tuple[np.ndarray | None, str]:
    """Each evaluation sequence's contribution to ΔH: c_n at η_ref along the full update when saved
    (``detailed``), else the influence matrix's row sums; and its caption."""
    mat = arrays.get("influence_true", arrays.get("influence_first_order"))
    eta = eta_grid(summary, arrays)
    psf = arrays.get("per_sequence_full")
    j = eta_index(eta, num(summary.eta_reference))
    if psf is not None and np.asarray(psf).ndim == 2 and j is not None and j < np.asarray(psf).shape[0]:
        label = f"c_n along the full update, η = {fmt(eta[j])}" if eta is not None else "c_n, full update"
        return np.asarray(psf, dtype=np.float64)[j], label
    if mat is not None and np.asarray(mat).ndim == 2:
        inf_eta = _influence_eta(summary)
        label = f"Σ_i M[n, i] (update-batch gradient), η = {fmt(inf_eta)}" if inf_eta else "Σ_i M[n, i]"
        return np.asarray(mat, dtype=np.float64).sum(1), label
    return None, ""


def plot_contributors(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    inf = summary.influence
    col = as_float_array(inf.column_delta_h) if inf is not None and inf.column_delta_h else None
    mat = arrays.get("influence_true", arrays.get("influence_first_order"))
    if col is None and mat is not None and np.asarray(mat).ndim == 2:
        col = np.asarray(mat, dtype=np.float64).sum(0)
    row, row_label = _eval_contributions(summary, arrays)
    panels = [p for p in (col, row) if p is not None and np.isfinite(p).any()]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.0), squeeze=False)
    k = 0
    if col is not None and np.isfinite(col).any():
        ax = axes[0][k]
        c = np.nan_to_num(col)
        idx = np.argsort(-np.abs(c))[:TOP_K]
        _bar(ax, c[idx], _contributor_labels(idx, arrays.get("update_rewards"), "  r={:.2g}",
                                             arrays.get("update_advantages"), "  A={:+.2g}"))
        ax.set_xlabel("ΔH along this sequence's share of the step (nats per sequence)")
        ax.set_ylabel("update sequence i (r = reward, A = advantage)")
        inf_eta = _influence_eta(summary)
        at = f", η = {fmt(inf_eta)}" if inf_eta else ""
        ax.set_title(f"Top {idx.size} of {c.size} update sequences by |ΔH|{at}\nsum of all = {fmt(c.sum())}",
                     fontsize=10)
        k += 1
    if row is not None and np.isfinite(row).any():
        ax = axes[0][k]
        r = np.nan_to_num(row)
        idx = np.argsort(-np.abs(r))[:TOP_K]
        _bar(ax, r[idx], _contributor_labels(idx, arrays.get("eval_entropy"), "  H={:.3g}",
                                             arrays.get("eval_logq"), "  log q={:.3g}"))
        ax.set_xlabel("contribution to ΔH (nats per sequence)")
        ax.set_ylabel("evaluation sequence n (H = its entropy, nats)")
        ax.set_title(f"Top {idx.size} of {r.size} evaluation sequences\n{row_label}; sum = {fmt(r.sum())}",
                     fontsize=10)
    fig.suptitle("Who moved the entropy (red: raises it, blue: lowers it)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def make_plots(summary: RunSummary, arrays: Mapping[str, np.ndarray], out_dir: Path) -> list[Path]:
    """Write the schema's PNGs into ``out_dir`` (the run's ``plots/`` folder); return those written.

    A plot whose data are missing or null is skipped; raises ``ImportError`` without matplotlib.
    """
    require_summary(summary, "make_plots")
    pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fn, name in (
        (plot_delta_h_vs_eta, "delta_h_vs_eta.png"),
        (plot_ess_khat, "ess_khat.png"),
        (plot_influence, "influence.png"),
        (plot_contributors, "contributors.png"),
        (plot_attribution, "attribution.png"),
        (plot_token_influence, "token_influence.png"),
        (plot_kernel, "kernel.png"),
    ):
        p = fn(summary, arrays, out_dir / name)
        if p is not None:
            written.append(p)
    return written


def make_trajectory_plot(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """H, ΔH(η_ref) and δH₁(η_ref) along ``global_step`` for a study of several checkpoints.

    ``rows``: ``{"global_step", "h_orig", "delta_h_ref", "delta_h1_ref"}`` (nats per sequence;
    null values are left out); with ``delta_h_realised`` / ``delta_h_predicted`` / ``delta_h1_predicted``
    (a run whose next checkpoints exist) a third panel shows predicted vs realised ΔH per step.
    """
    plt = pyplot()
    rows = sorted(rows, key=lambda r: (r.get("global_step") is None, r.get("global_step") or 0))
    step = as_float_array([r.get("global_step") for r in rows])
    assert step is not None
    realised = any(r.get("delta_h_realised") is not None for r in rows)
    fig, axes = plt.subplots(3 if realised else 2, 1, figsize=(7.5, 9.5 if realised else 6.5), sharex=True)
    a1, a2 = axes[0], axes[1]

    def line(ax: Any, key: str, label: str, **kw: Any) -> None:
        y = as_float_array([r.get(key) for r in rows])
        assert y is not None
        ok = np.isfinite(step) & np.isfinite(y)
        if ok.any():
            ax.plot(step[ok], y[ok], label=label, **kw)

    line(a1, "h_orig", "H (before the step)", marker="o", color="#1f77b4")
    a1.set_ylabel("entropy H (nats per sequence)")
    a1.set_title("Policy entropy on the evaluation batch along training", fontsize=10)
    line(a2, "delta_h_ref", "ΔH (true, SNIS)", marker="o", color="#d62728")
    line(a2, "delta_h1_ref", "δH₁ (first order)", marker="s", ls="--", mfc="white", color="k")
    a2.axhline(0, color="0.5", lw=0.8)
    from matplotlib.ticker import MaxNLocator

    a2.xaxis.set_major_locator(MaxNLocator(integer=True))
    a2.set_ylabel("ΔH at η_ref (nats per sequence)")
    a2.set_xlabel("global_step (trainer step of the checkpoint)")
    a2.set_title("Entropy change of the next optimizer step", fontsize=10)
    if realised:  # per step N (= global_step + 1): what happened vs what deltaH rebuilt
        a3 = axes[2]
        line(a3, "delta_h_realised", "realised θ_N − θ_{N−1} (true ΔH)", marker="o", color="#2ca02c")
        line(a3, "delta_h_predicted", "rebuilt step at η = lr (true ΔH)", marker="x", ls=":", color="#d62728")
        line(a3, "delta_h1_predicted", "rebuilt step at η = lr (δH₁)", marker="s", ls="--", mfc="white",
             color="k")
        a3.axhline(0, color="0.5", lw=0.8)
        a3.set_ylabel("ΔH of the step (nats per sequence)")
        a3.set_title("Predicted vs realised entropy change of each step", fontsize=10)
        a3.set_xlabel("global_step of the checkpoint the step started from")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
