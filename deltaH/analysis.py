"""Post-processing of η sweeps: the one trust rule, linear fits, the auto grid.

Pure functions of numbers (no I/O). :func:`trust_range` is the only place that decides whether a
ΔH value is trusted; the runner stores its verdicts (``summary["trust"]``, :func:`trust_summary`)
and the report and ``deltah inspect`` print them (:func:`trust_warnings`), never re-deriving them.

**The rule**, for one decomposition with sweep ``ΔH(η)``, first-order slope ``s`` (``δH₁ = η·s``)
and, at each η, ESS, k̂, retained mass and the nucleus-changed fraction (docs/math.md#reliability-diagnostics):

1. *Step too large for the batch* (each η on its own; every η from the smallest failing one up is
   untrusted, since these failures grow with η):

   * ESS < ``min_ess_frac``·N;
   * k̂ > the PSIS threshold ``min(1 − 1/log10 N, 0.7)`` — counted only when the weights vary,
     ``N/ESS − 1 > khat_min_dispersion``. Why: ``N/ESS − 1`` is the squared coefficient of
     variation of the weights, i.e. the factor by which they inflate the Monte Carlo variance of
     ΔH (Kong's rule); below 1 % no single weight can carry more than ``1 + √(0.01·N)`` times
     its share. k̂ is the shape of the *largest weights relative to each other*: it is scale-free,
     so for ``w = exp(η g)`` it tends, as η → 0, to the tail shape of the directional derivatives
     ``g`` (or of the rounding noise in ``log q``), whatever η — while the weights become equal.
     With ESS ≈ N it describes ``g``, not the reliability of this ΔH (``tests/test_analysis.py``
     checks both facts on Student-t scores);
   * retained mass < ``min_retained`` (top-p only: the step moved mass out of θ's nuclei);
   * nucleus changed at more than ``max_nucleus_changed`` of E's scored positions (top-p only;
     default 0: any move). A token entering or leaving a nucleus of mass ``p`` changes that
     position's entropy by up to ``h(r) + r·log|S|`` with ``r ≤ (1 − p)/p`` (0.2–0.8 nats at
     p = 0.95), i.e. ΔH by that over N — as large as a typical smooth ΔH — so ΔH(η) jumps and
     stops being comparable with δH₁.

2. *Precision floor* (rounding noise of the model's dtype). The noise of ΔH is at least
   ``σ = ε·(|H|/√T)·√(2/N)`` (:func:`rounding_noise`, ``T`` scored tokens per sequence): each
   token's entropy carries a relative rounding error of at least ``ε`` from its logits (the compute
   dtype's epsilon; float32's for float64 models, whose RMSNorm and attention softmax HF keeps in
   float32), independent from token to token and at θ and θ' once the step exceeds an ulp, and
   averaged over N sequences; the statistics themselves are computed in float64. An η is below the
   floor when

   * ``|δH₁| < 2σ / max_dev`` (a 2σ error would exceed ``max_dev`` of the signal), or
   * ΔH does not follow δH₁ (``|ΔH − δH₁| > max_dev·|δH₁|``) at this η although a larger η does
     (σ is an order of magnitude, not a bound: on the toy, 256 sequences of ~3 tokens, the rms of
     ΔH − δH₁ along random directions was 53× σ in float32 at η = 1e-9 and 0.14× σ in bfloat16 at
     η = 1e-7, where a smaller η leaves every bfloat16 activation unchanged).

   If no η of the sweep follows δH₁ at all (e.g. ΔH/δH₁ far from 1 at the smallest η), every η is
   untrusted: the sweep never reaches the linear regime where the two must agree.

3. *Against δH₁*, from the smallest η that follows δH₁ up: a sign flip (ΔH and δH₁ of opposite
   signs, ``|ΔH| > 2σ``) or a non-monotone step (ΔH moves against δH₁'s direction between two
   grid points, by more than ``2√2·σ``) is untrusted, and so is every larger η (a nucleus jump or
   strong curvature: the sweep has left the first-order regime). Flips and steps are also listed
   at η that already failed rule 1.

A ΔH that is not finite is untrusted at its η. With a zero or non-finite slope, 2 and 3 cannot be
applied (noted). Larger η that satisfy 1–3 but not ``max_dev`` stay trusted: second-order
effects are real and ΔH is still measured reliably there (the report shows ΔH/δH₁).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

ArrayLike = Sequence[float] | np.ndarray

# Effective rounding unit of a compute dtype: float64 HF models keep norms and the attention
# softmax in float32, so float32's epsilon bounds them too.
_EPS = {
    "float64": float(np.finfo(np.float32).eps),
    "float32": float(np.finfo(np.float32).eps),
    "bfloat16": 2.0**-7,
    "float16": 2.0**-10,
}


@dataclass(frozen=True)
class TrustRule:
    """The thresholds of :func:`trust_range` (module docstring), stored beside its verdicts."""

    min_ess_frac: float = 0.5
    khat_min_dispersion: float = 0.01
    min_retained: float = 0.99
    max_nucleus_changed: float = 0.0
    max_dev: float = 0.25


@dataclass(frozen=True)
class Trust:
    """Per-η verdicts (input order) and the trusted range (``nan`` bounds when nothing is trusted).

    ``reasons[i]`` is empty exactly when ``trusted[i]``; ``precision_floor`` is the largest η
    judged to be below the floor (``nan``: none in the sweep); ``noise`` is σ in nats.
    """

    trusted: list[bool]
    reasons: list[list[str]]
    eta_min: float
    eta_max: float
    precision_floor: float
    noise: float
    notes: list[str]


def rounding_noise(dtype: str, h_orig: float, n: int, tokens: float | None = None) -> float:
    """The order of magnitude of the rounding noise of ΔH in nats (0 if unknown; not a bound: the
    module docstring gives measured ratios), for per-sequence entropies
    ``H`` (mean ``h_orig`` nats) over ``n`` sequences of ``tokens`` scored tokens on average.

    Without ``tokens``: ``σ = ε(dtype)·|H|·√(2/N)``, the noise of per-sequence sums formed in the
    model's dtype (a relative error ``ε`` on the whole sum, new at θ and θ'). With ``tokens`` (how
    deltaH computes them: each token's statistics in float64 from the logits), rounding enters only
    through each token's logits, a relative ``ε`` on each token's ``H_t``, independent from token to
    token: ``σ = ε·(|H|/√T)·√(2/N)`` (``√Σ_t H_t² ≈ |H|/√T`` for ``T`` tokens of similar entropy).
    """
    eps = _EPS.get(str(dtype).removeprefix("torch."))
    if eps is None or not (n > 0 and math.isfinite(h_orig)):
        return 0.0
    per_seq = abs(h_orig) if tokens is None or not tokens >= 1 else abs(h_orig) / math.sqrt(tokens)
    return eps * per_seq * math.sqrt(2.0 / n)


# Each reason reads "<kind>: <details>"; the kinds, in the order the rule applies them:
NOT_FINITE = "not finite"
TOO_LARGE = "step too large"
ABOVE_FAILURE = "above a failing η"
FLOOR = "precision floor"
NEVER_LINEAR = "never linear"
SIGN_FLIP = "sign flip"
NON_MONOTONE = "non-monotone"
LEFT_REGIME = "beyond the first-order regime"


def reason_kind(reason: str) -> str:
    """The kind of a reason string (the text before its first ``": "``)."""
    return reason.split(": ", 1)[0]


def _details(reasons: Sequence[str]) -> str:
    return "; ".join(r.split(": ", 1)[-1] for r in reasons)


def _g(x: float) -> str:
    return f"{x:.3g}"


def _large_step(i: int, ess: np.ndarray, khat: np.ndarray, retained: np.ndarray, moved: np.ndarray,
                n: int, thr: float, top_p: bool, rule: TrustRule) -> list[str]:
    """Reasons why the weights at grid point ``i`` say the step is too large (rule 1)."""
    out = []
    if not ess[i] >= rule.min_ess_frac * n:
        out.append(f"{TOO_LARGE}: ESS {_g(ess[i])} < {rule.min_ess_frac:g}·N = {_g(rule.min_ess_frac * n)}")
    disp = n / ess[i] - 1 if ess[i] > 0 else math.inf
    if math.isfinite(khat[i]) and khat[i] > thr and disp > rule.khat_min_dispersion:
        out.append(f"{TOO_LARGE}: k̂ {khat[i]:.2f} > {thr:.3f} and the weights vary "
                   f"(N/ESS − 1 = {_g(disp)} > {rule.khat_min_dispersion:g})")
    if top_p and not retained[i] >= rule.min_retained:
        out.append(f"{TOO_LARGE}: retained mass {retained[i]:.4f} < {rule.min_retained:g}")
    if top_p and math.isfinite(moved[i]) and moved[i] > rule.max_nucleus_changed:
        out.append(f"{TOO_LARGE}: the nucleus moved at {100 * moved[i]:.3g}% of E's scored positions")
    return out


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
    nucleus_changed: ArrayLike | None = None,
    noise: float = 0.0,
    check_retained: bool = True,
    rule: TrustRule = TrustRule(),  # noqa: B008 (frozen)
) -> Trust:
    """Apply the trust rule (module docstring) to one decomposition's sweep.

    ``check_retained``: top-p is active (retained mass and nucleus changes are checked);
    ``nucleus_changed``: the fraction per η (NaN or ``None``: unknown, not checked); ``noise``: σ
    from :func:`rounding_noise` (0: no prior floor, only the empirical one).
    """
    e = np.asarray(eta, dtype=float)
    dh = np.asarray(delta_h, dtype=float)
    m = e.size
    ess_a = np.asarray(ess, dtype=float)
    khat_a = np.array([np.nan if k is None else k for k in khat], dtype=float)
    ret_a = np.asarray(retained, dtype=float)
    moved = np.full(m, np.nan) if nucleus_changed is None else np.asarray(nucleus_changed, dtype=float)
    order = [int(i) for i in np.argsort(e, kind="stable")]
    reasons: list[list[str]] = [[] for _ in range(m)]
    notes: list[str] = []
    for i in range(m):
        if not math.isfinite(dh[i]):
            reasons[i].append(f"{NOT_FINITE}: ΔH = {dh[i]}")

    # 1. step too large: every η's own reasons, and a cut from the smallest failing η up
    cut = math.inf
    for i in order:
        why = _large_step(i, ess_a, khat_a, ret_a, moved, n, khat_threshold, check_retained, rule)
        if not why and e[i] > cut:
            why = [f"{ABOVE_FAILURE}: the step is already too large at η = {_g(cut)}"]
        elif why and not math.isfinite(cut):
            cut = e[i]
            notes.append(f"η ≥ {_g(cut)}: the step is too large for the batch ({_details(why)})")
        reasons[i] += why

    floor = math.nan
    if not (math.isfinite(slope) and slope != 0):
        notes.append("the first-order slope is 0 or not finite: the precision floor and the comparison "
                     "with δH₁ cannot be applied")
    else:
        floor = _against_first_order(e, dh, slope, noise, order, reasons, notes, rule)

    trusted = [not r for r in reasons]
    te = e[np.asarray(trusted, dtype=bool)] if m else e
    return Trust(
        trusted=trusted,
        reasons=reasons,
        eta_min=float(te.min()) if te.size else math.nan,
        eta_max=float(te.max()) if te.size else math.nan,
        precision_floor=floor,
        noise=float(noise),
        notes=notes,
    )


def _against_first_order(e: np.ndarray, dh: np.ndarray, slope: float, noise: float, order: list[int],
                         reasons: list[list[str]], notes: list[str], rule: TrustRule) -> float:
    """Rules 2 and 3 (module docstring): add reasons in place; return the precision floor (an η)."""
    lin = e * slope
    floor_signal = 2 * noise / rule.max_dev
    cand = [i for i in order if not reasons[i]]
    below = [i for i in cand if abs(lin[i]) < floor_signal]
    for i in below:
        reasons[i].append(f"{FLOOR}: |δH₁| = {_g(abs(lin[i]))} < 2σ/{rule.max_dev:g} = {_g(floor_signal)} "
                          "nats (σ: the dtype's rounding noise)")
    cand = [i for i in cand if i not in below]
    follows = {i: abs(dh[i] - lin[i]) <= rule.max_dev * abs(lin[i]) for i in cand}
    first = next((i for i in cand if follows[i]), None)
    if first is None:
        for i in cand:
            reasons[i].append(f"{NEVER_LINEAR}: ΔH/δH₁ = {_g(dh[i] / lin[i])}, and no η of the sweep follows "
                              f"δH₁ within {rule.max_dev:.0%}")
        if cand:
            notes.append("ΔH follows δH₁ at no η of the sweep: nothing is trusted")
        return max((float(e[i]) for i in below), default=math.nan)
    low = [i for i in cand if e[i] < e[first]]
    for i in low:
        reasons[i].append(f"{FLOOR}: ΔH/δH₁ = {_g(dh[i] / lin[i])} while larger η follow δH₁")
    floor = max((float(e[i]) for i in below + low), default=math.nan)
    if math.isfinite(floor):
        notes.append(f"η ≤ {_g(floor)}: ΔH is rounding noise (precision floor; σ ≥ {_g(noise)} nats)")
    # 3. sign flips and non-monotone steps from the first following η up (also reported at η that
    # already failed rule 1: they say how the sweep broke)
    upper = [i for i in order if e[i] >= e[first] and math.isfinite(dh[i]) and i not in below]
    cut = math.inf
    for prev, i in zip(upper, upper[1:], strict=False):
        why = []
        if np.sign(dh[i]) == -np.sign(slope) and abs(dh[i]) > 2 * noise:
            why.append(f"{SIGN_FLIP}: ΔH = {_g(dh[i])} while δH₁ = {_g(lin[i])}")
        step = dh[i] - dh[prev]
        if step * slope < 0 and abs(step) > 2 * math.sqrt(2) * noise:
            why.append(f"{NON_MONOTONE}: ΔH moved by {_g(step)} from η = {_g(e[prev])}, against δH₁")
        reasons[i] += why
        if why and not math.isfinite(cut):
            cut = e[i]
            notes.append(f"η ≥ {_g(cut)}: ΔH leaves the first-order regime ({_details(why)})")
    for i in upper:
        if e[i] > cut and not reasons[i]:
            reasons[i].append(f"{LEFT_REGIME}: ΔH already left it at η = {_g(cut)}")
    return floor


def trust_summary(
    eta: Sequence[float],
    names: Sequence[str],
    columns: Mapping[str, Sequence[Sequence[float | None]]],
    slopes: Sequence[float],
    n: int,
    khat_threshold: float,
    *,
    top_p: bool,
    noise: float,
    dtype: str,
    rule: TrustRule = TrustRule(),  # noqa: B008 (frozen)
) -> dict[str, Any]:
    """:func:`trust_range` for every decomposition, as the JSON-ready ``summary["trust"]``.

    ``columns[key][i][j]`` is field ``key`` (``delta_h``, ``ess``, ``khat``, ``retained_mass``,
    ``nucleus_changed``) at η ``i`` for decomposition ``names[j]``. The top-level ``trusted``,
    ``eta_min``, ``eta_max``, ``precision_floor`` and ``notes`` are those of ``names[0]``;
    ``per_eta[i]`` holds every decomposition's verdict and reasons at η ``i``.
    """

    def col(key: str, j: int) -> list[float]:
        rows = columns.get(key)
        if rows is None:
            return [math.nan] * len(eta)
        return [math.nan if r[j] is None else float(r[j]) for r in rows]  # type: ignore[arg-type]

    per: dict[str, Trust] = {}
    for j, name in enumerate(names):
        per[name] = trust_range(eta, col("delta_h", j), float(slopes[j]), col("ess", j), col("khat", j),
                                col("retained_mass", j), n, khat_threshold,
                                nucleus_changed=col("nucleus_changed", j), noise=noise,
                                check_retained=top_p, rule=rule)
    main = per[names[0]]
    return {
        "eta_min": main.eta_min,
        "eta_max": main.eta_max,
        "precision_floor": main.precision_floor,
        "trusted": main.trusted,
        "notes": main.notes,
        "khat_threshold": khat_threshold,
        "noise": noise,
        "dtype": dtype,
        "top_p": top_p,
        "rule": asdict(rule),
        "decompositions": {
            name: {"trusted": t.trusted, "eta_min": t.eta_min, "eta_max": t.eta_max,
                   "precision_floor": t.precision_floor, "notes": t.notes}
            for name, t in per.items()
        },
        "per_eta": [
            {"eta": float(x), "trusted": all(t.trusted[i] for t in per.values()),
             "reasons": {name: t.reasons[i] for name, t in per.items()}}
            for i, x in enumerate(eta)
        ],
    }


def trust_warnings(trust: Mapping[str, Any] | None) -> list[str]:
    """One warning line per decomposition with an untrusted η, from ``summary["trust"]["per_eta"]``.

    Consecutive grid points failing for the same kind of reason are written as one range.
    """
    rows = sorted((trust or {}).get("per_eta") or [], key=lambda r: float(r["eta"]))
    names: list[str] = []
    for row in rows:
        names += [n for n in (row.get("reasons") or {}) if n not in names]
    out = []
    for name in names:
        groups: list[tuple[str, list[float], list[str]]] = []  # (kind, η list, first reasons)
        for row in rows:
            why = (row.get("reasons") or {}).get(name) or []
            if not why:
                groups.append(("", [], []))
                continue
            kind = reason_kind(why[0])
            if groups and groups[-1][0] == kind:
                groups[-1][1].append(float(row["eta"]))
            else:
                groups.append((kind, [float(row["eta"])], list(why)))
        items = []
        for kind, etas, why in groups:
            if not kind:
                continue
            if len(etas) == 1:
                items.append(f"η = {_g(etas[0])} ({'; '.join(why)})")
            else:
                items.append(f"η = {_g(etas[0])} … {_g(etas[-1])} (at η = {_g(etas[0])}: {'; '.join(why)})")
        if items:
            n_bad = sum(len(g[1]) for g in groups)
            out.append(f"{name}: ΔH untrusted at {n_bad} of {len(rows)} η — {', '.join(items)}")
    return out


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
