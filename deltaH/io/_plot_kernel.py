"""``kernel.png``: the distributions of the cross Fisher kernel's entries over same-prompt and
different-prompt (E, U) pairs, side by side on one axis (``arrays/kernel*.npy``; see
:mod:`deltaH.io.plots`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from deltaH.io._present import DPI, fmt, pyplot, tick_formatter
from deltaH.io.schema import RunSummary

BINS = 40


def plot_kernel(summary: RunSummary, arrays: Mapping[str, np.ndarray], out: Path) -> Path | None:
    """Two histograms (density) of ``K[t, i]``: pairs whose prompts are the same tokens, and the rest,
    over the central 99 % of all entries, with the mean (solid) and 0 (dotted) marked."""
    if summary.kernel is None or not {"kernel", "kernel_prompt_eval", "kernel_prompt_update"} <= set(arrays):
        return None
    k = np.asarray(arrays["kernel"], dtype=np.float64)
    pe, pu = np.asarray(arrays["kernel_prompt_eval"]), np.asarray(arrays["kernel_prompt_update"])
    if k.ndim != 2 or k.shape != (pe.size, pu.size) or not np.isfinite(k).any():
        return None
    same = pe[:, None] == pu[None, :]
    finite = k[np.isfinite(k)]
    lo, hi = (float(np.quantile(finite, q)) for q in (0.005, 0.995))
    if not hi > lo:
        lo, hi = float(finite.min()) - 1.0, float(finite.max()) + 1.0
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6), sharex=True, sharey=True)
    for ax, mask, title, color in ((axes[0], same, "same prompt", "#d62728"),
                                   (axes[1], ~same, "different prompt", "#1f77b4")):
        vals = k[mask & np.isfinite(k)]
        if vals.size:
            ax.hist(np.clip(vals, lo, hi), bins=BINS, range=(lo, hi), density=True, color=color, alpha=0.75)
            ax.axvline(float(vals.mean()), color="k", lw=1.2, label=f"mean {fmt(float(vals.mean()))}")
            ax.legend(fontsize=8, loc="upper right")
            mean_abs = fmt(float(np.abs(vals).mean()))
            ax.set_title(f"{title}: {vals.size} pairs, mean |K| {mean_abs}", fontsize=9)
        else:
            ax.text(0.5, 0.5, f"no {title} pairs\n(eval_batch.include_update_prompts: true\nadds them)",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_title(f"{title}: 0 pairs", fontsize=9)
        ax.axvline(0.0, color="0.4", lw=0.8, ls=":")
        ax.set_xlabel("K[t, i] (entries beyond the central 99 % piled at the edges)")
        ax.xaxis.set_major_formatter(tick_formatter())
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("density")
    method = summary.kernel.method or "?"
    fig.suptitle(f"Cross Fisher kernel ({method}): same vs different prompt", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
