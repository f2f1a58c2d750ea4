"""Plots of a results folder (``docs/results-schema.md``), drawn with matplotlib on the Agg backend.

``make_plots(summary, arrays, run_dir / "plots")`` writes, when their data exist:

* ``delta_h_vs_eta.png``  |ΔH| vs η on log-log axes, one panel per decomposition: filled markers
  where ΔH > 0, open markers where ΔH < 0, the δH₁ line (dashed), the least-squares line through
  the origin (dotted), the precision floor and the untrusted η range shaded;
* ``ess_khat.png``        ESS/N and PSIS k̂ vs η per decomposition, k̂ threshold dashed;
* ``influence.png``       the influence matrix ``M[n, i]`` [N_E, N_U] (true and/or first order),
  diverging colormap centred at 0;
* ``contributors.png``    the largest column sums (update sequences) and per-evaluation-sequence
  contributions.

A plot whose data are missing (an analysis that was not run, ``null`` in the summary) is skipped.
matplotlib is optional (``pip install matplotlib``); it is imported lazily, and its absence raises
an ``ImportError`` that says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deltaH._choices import DECOMPOSITIONS as DECOMPOSITIONS

DECOMPOSITION_LABELS = {
    "full": "full update",
    "baseline": "baseline (momentum + weight decay)",
    "grad": "grad (this batch's gradient)",
    "baseline+grad": "baseline + grad (check = full)",
}
COLORS = {"full": "#1f77b4", "baseline": "#2ca02c", "grad": "#d62728", "baseline+grad": "#9467bd"}
DPI = 120
TOP_K = 15


def fmt(x: Any, sig: int = 3) -> str:
    """``x`` with ``sig`` significant digits; ``1.23e-5`` style below 1e-3 and from 1e6 up; n/a when null."""
    if x is None or isinstance(x, bool):
        return "n/a" if x is None else str(x)
    if isinstance(x, int | np.integer):
        return str(int(x))
    try:
        v = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e3:
        return f"{v:.{sig}g}"
    if 1e3 <= a < 1e6:
        return f"{v:.0f}"
    mant, exp = f"{v:.{sig - 1}e}".split("e")
    if "." in mant:
        mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _tick_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: fmt(v, 2))


def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError that names the fix."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("deltaH plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- data access: every field may be missing or null ------------------------------------------
def get(d: Any, *keys: str | int) -> Any:
    """``d[k0][k1]...`` or None when any level is missing or null."""
    for k in keys:
        if d is None:
            return None
        if isinstance(d, Mapping):
            d = d.get(k)  # type: ignore[call-overload]
        elif isinstance(d, Sequence) and isinstance(k, int) and not isinstance(d, str):
            d = d[k] if -len(d) <= k < len(d) else None
        else:
            return None
    return d


def as_float_array(x: Any) -> np.ndarray | None:
    """A float64 array with null → NaN, or None when ``x`` is missing or not numeric."""
    if x is None:
        return None
    try:
        if isinstance(x, np.ndarray):
            return x.astype(np.float64)
        return np.array([np.nan if v is None else v for v in x], dtype=np.float64)
    except (TypeError, ValueError):
        try:
            return np.asarray(x, dtype=np.float64)
        except (TypeError, ValueError):
            return None


def eta_grid(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    eta = as_float_array(summary.get("eta"))
    if eta is None and "eta" in arrays:
        eta = np.asarray(arrays["eta"], dtype=np.float64).reshape(-1)
    return eta if eta is not None and eta.size else None


def sweep(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per decomposition: ``delta_h``, ``delta_h1``, ``ess``, ``khat`` over the η grid (NaN where null).

    Read from ``summary["decompositions"]``; the ``[n_eta, 4]`` arrays fill in what it lacks.
    """
    eta = eta_grid(summary, arrays)
    if eta is None:
        return {}
    n = eta.size
    decs = summary.get("decompositions") or {}
    out: dict[str, dict[str, np.ndarray]] = {}
    for j, name in enumerate(DECOMPOSITIONS):
        d = decs.get(name) or {}
        series: dict[str, np.ndarray] = {}
        for key, src, arr_name in (
            ("delta_h", d.get("delta_h"), "delta_h"),
            ("delta_h1", get(d, "first_order", "delta_h"), "delta_h1"),
            ("ess", d.get("ess"), "ess"),
            ("khat", d.get("khat"), "khat"),
        ):
            a = as_float_array(src)
            if a is None and arr_name in arrays:
                full = np.asarray(arrays[arr_name], dtype=np.float64)
                if full.ndim == 2 and full.shape[1] > j:
                    a = full[:, j]
            if a is not None and a.shape == (n,) and np.isfinite(a).any():
                series[key] = a
        if series:
            out[name] = series
    return out


def trusted_mask(summary: Mapping[str, Any], eta: np.ndarray, decomposition: str | None = None
                 ) -> np.ndarray | None:
    """Boolean [n_eta] from ``trust["decompositions"][decomposition]["trusted"]`` when given and
    stored, else ``trust["trusted"]`` (the full update's), else ``trust["eta_min"/"eta_max"]``."""
    trust = summary.get("trust")
    if not trust:
        return None
    t = get(trust, "decompositions", decomposition, "trusted") if decomposition else None
    t = t if t is not None else trust.get("trusted")
    if t is not None and len(t) == eta.size:
        return np.array([bool(v) for v in t])
    lo, hi = trust.get("eta_min"), trust.get("eta_max")
    if lo is None and hi is None:
        return None
    lo = -np.inf if lo is None else lo
    hi = np.inf if hi is None else hi
    return (eta >= lo) & (eta <= hi)


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


def _eta_ref_line(ax: Any, summary: Mapping[str, Any], label: bool) -> None:
    ref = summary.get("eta_reference")
    if ref is not None and ref > 0:
        ax.axvline(ref, color="0.3", lw=0.8, ls="-.", zorder=1,
                   label="η_ref (next step's lr)" if label else None)


def _positive(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


# -- the plots ------------------------------------------------------------------------------
def plot_delta_h_vs_eta(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray],
                        out: Path) -> Path | None:
    eta = eta_grid(summary, arrays)
    data = {k: v for k, v in sweep(summary, arrays).items() if "delta_h" in v}
    if eta is None or not data:
        return None
    plt = _pyplot()
    from matplotlib.ticker import NullLocator

    names = [n for n in DECOMPOSITIONS if n in data]
    ncols = 2 if len(names) > 1 else 1
    nrows = (len(names) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), sharex=True, sharey=True,
                             squeeze=False)
    ys: list[np.ndarray] = []
    for k, name in enumerate(names):
        ax = axes[k // ncols][k % ncols]
        s, c = data[name], COLORS[name]
        dh = s["delta_h"]
        pos = np.isfinite(dh) & (dh > 0) & (eta > 0)
        neg = np.isfinite(dh) & (dh < 0) & (eta > 0)
        _shade_untrusted(ax, eta, trusted_mask(summary, eta, name), label=True)
        _eta_ref_line(ax, summary, label=True)
        floor = get(summary, "trust", "decompositions", name, "precision_floor")
        if floor is not None and floor > 0:  # an η: ΔH is rounding noise at and below it
            ax.axvline(floor, color="0.5", lw=0.8, ls=":", label="precision floor (η)")
        if "delta_h1" in s:
            x1, y1 = _positive(eta, np.abs(s["delta_h1"]))
            if x1.size:
                ax.plot(x1, y1, color="k", ls="--", lw=1.2, label="|δH₁| (first order)", zorder=2,
                        marker="x" if x1.size < 3 else None)
                ys.append(y1)
        slope = get(summary, "decompositions", name, "fit", "slope_origin")
        if slope is not None and np.isfinite(slope) and slope != 0:
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
    for k in range(len(names), nrows * ncols):
        axes[k // ncols][k % ncols].set_visible(False)
    y = np.concatenate(ys) if ys else np.array([])
    y = y[np.isfinite(y) & (y > 0)]
    pe = eta[np.isfinite(eta) & (eta > 0)]
    if y.size and pe.size:
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


def plot_ess_khat(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    eta = eta_grid(summary, arrays)
    data = sweep(summary, arrays)
    if eta is None or not any("ess" in v or "khat" in v for v in data.values()):
        return None
    plt = _pyplot()
    n_eval = get(summary, "batches", "eval", "n")
    trusted = trusted_mask(summary, eta)
    thr = get(summary, "trust", "khat_threshold")
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
    if thr is not None and np.isfinite(thr):
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


def _symmetric_limit(m: np.ndarray) -> float:
    a = np.abs(m[np.isfinite(m)])
    if not a.size:
        return 1.0
    v = float(np.quantile(a, 0.995)) if a.size > 200 else float(a.max())
    return v if v > 0 else (float(a.max()) or 1.0)


def plot_influence(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    mats = [(k, np.asarray(arrays[a], dtype=np.float64)) for k, a in
            (("true (SNIS)", "influence_true"), ("first order", "influence_first_order"))
            if a in arrays and np.asarray(arrays[a]).ndim == 2 and np.asarray(arrays[a]).size]
    if not mats:
        return None
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    eta = get(summary, "influence", "eta") or summary.get("eta_reference")
    g_u = get(summary, "batches", "update", "group_size")
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
                          format=_tick_formatter())
        cb.set_label("contribution to ΔH (nats per sequence)\nred: raises entropy, blue: lowers it",
                     fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def eta_index(eta: np.ndarray | None, target: float | None) -> int | None:
    """Index of the grid point nearest ``target`` in log space (None without a grid or target)."""
    if eta is None or target is None or not (target > 0) or not (eta > 0).any():
        return None
    return int(np.argmin(np.abs(np.log(np.maximum(eta, 1e-300)) - np.log(target))))


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
    ax.xaxis.set_major_formatter(_tick_formatter())


def plot_contributors(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    col = as_float_array(get(summary, "influence", "column_delta_h"))
    inf_eta = get(summary, "influence", "eta") or summary.get("eta_reference")
    mat = arrays.get("influence_true", arrays.get("influence_first_order"))
    if col is None and mat is not None and np.asarray(mat).ndim == 2:
        col = np.asarray(mat, dtype=np.float64).sum(0)
    row: np.ndarray | None = None
    row_label = ""
    eta = eta_grid(summary, arrays)
    psf = arrays.get("per_sequence_full")
    j = eta_index(eta, summary.get("eta_reference"))
    if psf is not None and np.asarray(psf).ndim == 2 and j is not None and j < np.asarray(psf).shape[0]:
        row = np.asarray(psf, dtype=np.float64)[j]
        row_label = f"c_n along the full update, η = {fmt(eta[j])}" if eta is not None else "c_n, full update"
    elif mat is not None and np.asarray(mat).ndim == 2:
        row = np.asarray(mat, dtype=np.float64).sum(1)
        row_label = f"Σ_i M[n, i] (update-batch gradient), η = {fmt(inf_eta)}" if inf_eta else "Σ_i M[n, i]"
    panels = [p for p in (col, row) if p is not None and np.isfinite(p).any()]
    if not panels:
        return None
    plt = _pyplot()
    rewards, adv = arrays.get("update_rewards"), arrays.get("update_advantages")
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 5.0), squeeze=False)
    k = 0
    if col is not None and np.isfinite(col).any():
        ax = axes[0][k]
        c = np.nan_to_num(col)
        idx = np.argsort(-np.abs(c))[:TOP_K]
        labels = []
        for i in idx:
            lab = f"#{i}"
            if rewards is not None and i < len(rewards):
                lab += f"  r={float(rewards[i]):.2g}"
            if adv is not None and i < len(adv):
                lab += f"  A={float(adv[i]):+.2g}"
            labels.append(lab)
        _bar(ax, c[idx], labels)
        ax.set_xlabel("ΔH along this sequence's share of the step (nats per sequence)")
        ax.set_ylabel("update sequence i (r = reward, A = advantage)")
        at = f", η = {fmt(inf_eta)}" if inf_eta else ""
        ax.set_title(f"Top {idx.size} of {c.size} update sequences by |ΔH|{at}\nsum of all = {fmt(c.sum())}",
                     fontsize=10)
        k += 1
    if row is not None and np.isfinite(row).any():
        ax = axes[0][k]
        r = np.nan_to_num(row)
        idx = np.argsort(-np.abs(r))[:TOP_K]
        logq, ent = arrays.get("eval_logq"), arrays.get("eval_entropy")
        labels = []
        for n in idx:
            lab = f"#{n}"
            if ent is not None and n < len(ent):
                lab += f"  H={float(ent[n]):.3g}"
            if logq is not None and n < len(logq):
                lab += f"  log q={float(logq[n]):.3g}"
            labels.append(lab)
        _bar(ax, r[idx], labels)
        ax.set_xlabel("contribution to ΔH (nats per sequence)")
        ax.set_ylabel("evaluation sequence n (H = its entropy, nats)")
        ax.set_title(f"Top {idx.size} of {r.size} evaluation sequences\n{row_label}; sum = {fmt(r.sum())}",
                     fontsize=10)
    fig.suptitle("Who moved the entropy (red: raises it, blue: lowers it)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out


def make_plots(summary: Mapping[str, Any], arrays: Mapping[str, np.ndarray], out_dir: Path) -> list[Path]:
    """Write the schema's PNGs into ``out_dir`` (the run's ``plots/`` folder); return those written.

    A plot whose data are missing or null is skipped; raises ``ImportError`` without matplotlib.
    """
    _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fn, name in (
        (plot_delta_h_vs_eta, "delta_h_vs_eta.png"),
        (plot_ess_khat, "ess_khat.png"),
        (plot_influence, "influence.png"),
        (plot_contributors, "contributors.png"),
    ):
        p = fn(summary, arrays, out_dir / name)
        if p is not None:
            written.append(p)
    return written


def make_trajectory_plot(rows: Sequence[Mapping[str, Any]], out: Path) -> Path:
    """H, ΔH(η_ref) and δH₁(η_ref) along ``global_step`` for a study of several checkpoints.

    ``rows``: ``{"global_step", "h_orig", "delta_h_ref", "delta_h1_ref"}`` (nats per sequence;
    null values are left out).
    """
    plt = _pyplot()
    rows = sorted(rows, key=lambda r: (r.get("global_step") is None, r.get("global_step") or 0))
    step = as_float_array([r.get("global_step") for r in rows])
    assert step is not None
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True)

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
    for ax in (a1, a2):
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
