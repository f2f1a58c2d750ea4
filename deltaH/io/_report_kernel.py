"""The kernel section of ``report.md`` (see :mod:`deltaH.io.report`): same- vs different-prompt
pairs of the cross Fisher kernel and, for a projection, its memory and measured fidelity."""

from __future__ import annotations

from deltaH.io._present import num
from deltaH.io._report_common import NOT_RUN, show, table
from deltaH.io.schema import KernelInfo, RunSummary

#: Below this Spearman correlation on its checked pairs a projection's ranking is called coarse.
MIN_SPEARMAN = 0.9


def kernel_warnings(k: KernelInfo | None) -> list[str]:
    """A warning when a projected kernel's checked fidelity is poor (none for exact or unchecked)."""
    if k is None or k.fidelity is None:
        return []
    rho = num(k.fidelity.spearman)
    if rho is None or rho >= MIN_SPEARMAN:
        return []
    return [f"the projected kernel ranks its checked pairs with Spearman {rho:.3g} < {MIN_SPEARMAN} against "
            "the exact kernel: raise analyses.kernel_subspace or analyses.kernel_proj_dim, or use "
            "kernel_method: exact"]


def _projection(k: KernelInfo) -> list[str]:
    if k.proj_dim is None:
        return []
    mem, chk = num(k.memory_fraction), num(k.check_memory_fraction)
    out = [f"Projection: U's preconditioned gradients span a subspace of {show(k.subspace)} dimensions kept "
           f"exactly, and a CountSketch with {show(k.proj_dim)} buckets carries the rest "
           "(docs/math.md#fisher-kernel); it keeps "
           f"{'n/a' if mem is None else f'{100 * mem:.3g}%'} of the exact kernel's memory"
           + ("" if chk is None or chk == 0 else f" (the check adds {100 * chk:.3g}%)") + "."]
    f = k.fidelity
    if f is None:
        return out + ["Its fidelity was not checked (analyses.kernel_check_columns: 0).", ""]
    out += ["", f"Fidelity against the exact kernel on {show(f.n_pairs)} pairs ({show(f.n_columns)} random "
            "update sequences' columns, every evaluation sequence):", ""]
    out += table(["Spearman", "Pearson", "‖K̂ − K‖ / ‖K‖", "column sums: relative error"],
                 [[show(f.spearman), show(f.pearson), show(f.rel_error), show(f.col_sum_rel_error)]])
    return [*out, "", *[f"**Warning:** {w}." for w in kernel_warnings(k)]]


def section(summary: RunSummary) -> list[str]:
    out = ["## Kernel summary", ""]
    k = summary.kernel
    if k is None:
        return out + [f"Cross Fisher kernel: {NOT_RUN}.", ""]
    how = {"exact": "exactly", "projection": "by projection"}.get(k.method, f"by {k.method or '?'}")
    out.append(f"K[n, i] = ∇log q(n) · P · ∇log π(i) with the AdamW preconditioner P, computed "
               f"{how} over {show(k.n_same)} same-prompt and {show(k.n_diff)} "
               "different-prompt pairs (a pair shares a prompt when both prompts have the same tokens).")
    rows = [["same prompt", *map(show, (k.mean_same, k.abs_same, k.median_abs_same, k.n_same))],
            ["different prompt", *map(show, (k.mean_diff, k.abs_diff, k.median_abs_diff, k.n_diff))]]
    out += [""] + table(["pairs", "mean K", "mean |K|", "median |K|", "count"], rows) + [""]
    a, b = num(k.abs_same), num(k.abs_diff)
    if a is not None and b:
        out.append(f"Same-prompt pairs couple {show(a / b)}× more strongly than different-prompt pairs "
                   "(mean |K|).")
    elif not k.n_same:
        out.append("No evaluation sequence shares a prompt with an update sequence: set "
                   "eval_batch.include_update_prompts: true to draw evaluation responses to U's prompts.")
    return out + [""] + _projection(k) + [""]
