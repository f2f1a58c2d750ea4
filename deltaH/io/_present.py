"""What the plots and the report share: number formatting, the decompositions, the η sweep of a
:class:`~deltaH.io.schema.RunSummary` as arrays, and matplotlib on the Agg backend.

A summary read from an older folder may lack values (:meth:`RunSummary.from_json` fills them with
NaN, ``[]`` or ``{}``); everything here treats those as "not recorded" rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from deltaH._choices import DECOMPOSITIONS as DECOMPOSITIONS
from deltaH.io.schema import RunSummary

DECOMPOSITION_LABELS = {
    "full": "full update",
    "baseline": "baseline (momentum + weight decay)",
    "grad": "grad (this batch's gradient)",
    "baseline+grad": "baseline + grad (check = full)",
}
COLORS = {"full": "#1f77b4", "baseline": "#2ca02c", "grad": "#d62728", "baseline+grad": "#9467bd"}
DPI = 120


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


def num(x: Any) -> float | None:
    """``x`` as a float, or None when it is missing or not finite (``summary.json`` writes NaN and inf
    as null, and :meth:`RunSummary.from_json` reads null back as NaN)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def at(values: Sequence[Any] | None, j: int | None) -> float | None:
    """Element ``j`` of a per-η list as :func:`num` (None when the list is missing or too short)."""
    if j is None or values is None or not 0 <= j < len(values):
        return None
    return num(values[j])


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


def eta_index(eta: np.ndarray | None, target: float | None) -> int | None:
    """Index of the grid point nearest ``target`` in log space (None without a grid or target)."""
    if eta is None or target is None or not (target > 0) or not (eta > 0).any():
        return None
    return int(np.argmin(np.abs(np.log(np.maximum(eta, 1e-300)) - np.log(target))))


def eta_grid(summary: RunSummary, arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The η grid [n_eta] of the summary, else of ``arrays/eta.npy``; None when neither has one."""
    eta = as_float_array(summary.eta) if summary.eta else None
    if eta is None and "eta" in arrays:
        eta = np.asarray(arrays["eta"], dtype=np.float64).reshape(-1)
    return eta if eta is not None and eta.size else None


def sweep(summary: RunSummary, arrays: Mapping[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """Per decomposition: ``delta_h``, ``delta_h1``, ``ess``, ``khat`` over the η grid (NaN where null).

    Read from ``summary.decompositions``; the ``[n_eta, 4]`` arrays fill in what it lacks.
    """
    eta = eta_grid(summary, arrays)
    if eta is None:
        return {}
    n = eta.size
    out: dict[str, dict[str, np.ndarray]] = {}
    for j, name in enumerate(DECOMPOSITIONS):
        d = summary.decompositions.get(name)
        fo = d.first_order if d is not None else None
        series: dict[str, np.ndarray] = {}
        for key, src in (
            ("delta_h", d.delta_h if d is not None else None),
            ("delta_h1", fo.delta_h if fo is not None else None),
            ("ess", d.ess if d is not None else None),
            ("khat", d.khat if d is not None else None),
        ):
            a = as_float_array(src) if src else None
            if a is None and key in arrays:
                full = np.asarray(arrays[key], dtype=np.float64)
                if full.ndim == 2 and full.shape[1] > j:
                    a = full[:, j]
            if a is not None and a.shape == (n,) and np.isfinite(a).any():
                series[key] = a
        if series:
            out[name] = series
    return out


def trusted_mask(summary: RunSummary, eta: np.ndarray, decomposition: str | None = None) -> np.ndarray | None:
    """Boolean [n_eta] from ``trust.decompositions[decomposition].trusted`` when given and stored,
    else ``trust.trusted`` (the full update's), else ``trust.eta_min`` … ``trust.eta_max``."""
    tr = summary.trust
    own = tr.decompositions.get(decomposition) if decomposition else None
    t = own.trusted if own is not None and own.trusted else tr.trusted
    if t and len(t) == eta.size:
        return np.array([bool(v) for v in t])
    lo, hi = num(tr.eta_min), num(tr.eta_max)
    if lo is None and hi is None:
        return None
    return (eta >= (-np.inf if lo is None else lo)) & (eta <= (np.inf if hi is None else hi))


def tick_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: fmt(v, 2))


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError that names the fix."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("deltaH plots need matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_summary(summary: Any, what: str) -> None:
    """A clear error for a plain dict (``summary.json`` as loaded) where a :class:`RunSummary` belongs."""
    if not isinstance(summary, RunSummary):
        raise TypeError(f"{what} takes a deltaH.io.schema.RunSummary, not a {type(summary).__name__}: read "
                        "summary.json with RunSummary.from_json(ResultsDir(path).read_json('summary.json'))")
