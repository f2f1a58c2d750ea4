"""Post-processing of η sweeps: linear fits, the trustworthy η range, the precision floor.

Pure functions of numbers (no I/O). For one decomposition with sweep ``ΔH(η)``, first-order
slope ``s`` (so ``δH₁ = η·s``), ESS, k̂ and retained mass at each η:

* **upper limit**: ``η`` is too large when ESS < ``min_ess_frac``·N, k̂ > the PSIS threshold (only
  counted when the weights actually vary, ESS < 0.99·N: with nearly equal weights k̂ is fitted to
  noise), or the retained mass < ``min_retained`` (top-p only: the step moved mass out of the
  nuclei); every η from the smallest failing one up is untrusted;
* **precision floor**: ``η`` is too small when ``ΔH(η)`` no longer follows ``η·s``:
  ``|ΔH − η s| > max_dev·|η s|`` at this η although larger trusted η follow it (rounding noise,
  which grows like ``1/η`` relative to the signal, dominates: in float32 below η ≈ 1e-6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Trust:
    """Per-η flags and the trusted range (``nan`` bounds when nothing is trusted)."""

    trusted: list[bool]
    eta_min: float
    eta_max: float
    precision_floor: float
    notes: list[str]


def trust_range(
    eta: ArrayLike,
    delta_h: ArrayLike,
    slope: float,
    ess: ArrayLike,
    khat: ArrayLike,
    retained: ArrayLike,
    n: int,
    khat_threshold: float,
    *,
    min_ess_frac: float = 0.5,
    min_retained: float = 0.99,
    max_dev: float = 0.25,
    check_retained: bool = True,
) -> Trust:
    """Flag each η of a sweep as trustworthy (module docstring) and summarise the range."""
    e = np.asarray(eta, dtype=float)
    dh = np.asarray(delta_h, dtype=float)
    order = np.argsort(e)
    notes: list[str] = []
    big_ok = np.ones_like(e, dtype=bool)
    for i in order:
        reasons = []
        if not (ess[i] >= min_ess_frac * n):
            reasons.append(f"ESS {ess[i]:.3g} < {min_ess_frac:g}·N")
        k = khat[i]
        # k̂ is a tail-shape statistic: with nearly equal weights (ESS ≈ N) it is fitted to noise.
        if k is not None and math.isfinite(k) and k > khat_threshold and ess[i] < 0.99 * n:
            reasons.append(f"k̂ {k:.2f} > {khat_threshold:.2f}")
        if check_retained and not (retained[i] >= min_retained):
            reasons.append(f"retained mass {retained[i]:.4f} < {min_retained:g}")
        if reasons:
            notes.append(f"η = {e[i]:.3g}: step too large for the batch ({'; '.join(reasons)})")
            # Large-step failures grow with η: everything from the first failure up is untrusted.
            big_ok[[j for j in order if e[j] >= e[i]]] = False
            break
    lin = np.abs(e * slope)
    dev = np.abs(dh - e * slope)
    follows = (dev <= max_dev * lin) & np.isfinite(dh) & (lin > 0)
    # Precision floor: the largest η below the smallest trusted-and-following η that fails to follow.
    floor = float("nan")
    ok_idx = [i for i in order if big_ok[i] and follows[i]]
    if ok_idx:
        lowest_ok = e[ok_idx[0]]
        below_bad = [e[i] for i in order if e[i] < lowest_ok and not follows[i]]
        if below_bad:
            floor = float(max(below_bad))
            notes.append(
                f"below η ≈ {floor:.3g} ΔH stops following the first-order line (rounding noise of the "
                "model's dtype dominates): the precision floor"
            )
    small_ok = ~(e <= floor) if math.isfinite(floor) else np.ones_like(big_ok)
    trusted = big_ok & small_ok & np.isfinite(dh)
    if slope == 0 or not math.isfinite(slope):
        notes.append("first-order slope is 0 or not finite: the precision floor cannot be located")
    te = e[trusted]
    return Trust(
        trusted=[bool(t) for t in trusted],
        eta_min=float(te.min()) if te.size else float("nan"),
        eta_max=float(te.max()) if te.size else float("nan"),
        precision_floor=floor,
        notes=notes,
    )


def linear_fits(eta: ArrayLike, delta_h: ArrayLike, mask: Sequence[bool] | None = None) -> dict[str, float]:
    """Least-squares lines through the origin and with intercept, their R², and the log-log slope."""
    e = np.asarray(eta, dtype=float)
    y = np.asarray(delta_h, dtype=float)
    m = np.isfinite(y) if mask is None else (np.asarray(mask, dtype=bool) & np.isfinite(y))
    e, y = e[m], y[m]
    nan = float("nan")
    out = {
        "slope_origin": nan,
        "r2_origin": nan,
        "slope": nan,
        "intercept": nan,
        "r2": nan,
        "loglog_slope": nan,
        "n_points": int(m.sum()),
    }
    if e.size < 2:
        return out
    tss = float(((y - y.mean()) ** 2).sum())
    s0 = float((e * y).sum() / (e * e).sum())
    out["slope_origin"] = s0
    a, b = np.polyfit(e, y, 1)
    out["slope"], out["intercept"] = float(a), float(b)
    if tss > 0:
        out["r2_origin"] = 1 - float(((y - s0 * e) ** 2).sum()) / tss
        out["r2"] = 1 - float(((y - (a * e + b)) ** 2).sum()) / tss
    same_sign = (y > 0).all() or (y < 0).all()
    if same_sign and e.size >= 2 and (e > 0).all():
        out["loglog_slope"] = float(np.polyfit(np.log(e), np.log(np.abs(y)), 1)[0])
    return out


def auto_grid(eta_min: float, eta_max: float, n_points: int, reference: float) -> list[float]:
    """``n_points`` log-spaced η over ``[eta_min, eta_max]``, plus the reference η when inside it."""
    grid = list(np.geomspace(eta_min, eta_max, int(n_points))) if eta_max > eta_min else [eta_min]
    if eta_min <= reference <= eta_max and not any(math.isclose(g, reference, rel_tol=1e-9) for g in grid):
        grid.append(reference)
    return sorted(float(g) for g in grid)
