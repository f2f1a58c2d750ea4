"""The trust rule (``deltaH.analysis``) on synthetic sweeps, the k̂-of-equal-weights rule, fits, grid.

Sweeps are built from a known line ``ΔH = s·η`` with every failure placed by hand, so each test
knows exactly which grid points must be untrusted and why (the reason's kind).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from deltaH import analysis as A
from deltaH.estimators._psis import khat_threshold, psis_khat, tail_size

N = 256
THR = khat_threshold(N)  # 0.585 at N = 256
ETA = np.geomspace(1e-7, 1e-2, 11)  # half-decade steps
S = -2.0  # first-order slope: δH₁ = S·η


def sweep(**over: object) -> dict:
    """A clean sweep: ΔH on the first-order line with 5 % curvature at the largest η, weights equal
    enough (ESS ≈ N, k̂ NaN/low), full retained mass, no nucleus moved."""
    d = {
        "eta": ETA, "delta_h": S * ETA * (1 + 5 * ETA), "slope": S,
        "ess": N * (1 - 0.1 * (ETA / 1e-2) ** 2), "khat": np.full(ETA.size, 0.2),
        "retained": np.ones(ETA.size), "n": N, "khat_threshold": THR,
    }
    d.update(over)
    return d


def run(d: dict, **kw: object) -> A.Trust:
    return A.trust_range(d["eta"], d["delta_h"], d["slope"], d["ess"], d["khat"], d["retained"], d["n"],
                         d["khat_threshold"], **kw)  # type: ignore[arg-type]


def kinds(t: A.Trust) -> list[str]:
    """The kind of each η's first reason ('' when trusted)."""
    return [A.reason_kind(r[0]) if r else "" for r in t.reasons]


def test_clean_line_is_trusted_everywhere() -> None:
    t = run(sweep(), noise=A.rounding_noise("float32", 1.1, N))
    assert t.trusted == [True] * ETA.size and t.reasons == [[]] * ETA.size
    assert t.eta_min == ETA[0] and t.eta_max == ETA[-1]
    assert math.isnan(t.precision_floor) and t.notes == []


@pytest.mark.parametrize("what", ["ess", "khat", "retained", "nucleus"])
def test_large_step_cuts_the_top_of_the_sweep(what: str) -> None:
    """A failure at η = 1e-3 (index 8) untrusts it and every larger η, even where that η's own
    diagnostics happen to pass (index 10 below)."""
    d = sweep()
    moved = np.zeros(ETA.size)
    bad = [8, 9]
    if what == "ess":
        d["ess"] = np.where(np.isin(np.arange(ETA.size), bad), 0.3 * N, N)
    elif what == "khat":
        d["ess"] = np.full(ETA.size, 0.9 * N)  # weights vary: N/ESS − 1 = 0.11
        d["khat"] = np.where(np.isin(np.arange(ETA.size), bad), 0.75, 0.3)
    elif what == "retained":
        d["retained"] = np.where(np.isin(np.arange(ETA.size), bad), 0.97, 1.0)
    else:
        moved[bad] = 1 / 1280  # one position of 1280
    t = run(d, nucleus_changed=moved, check_retained=True)
    assert kinds(t) == [""] * 8 + [A.TOO_LARGE, A.TOO_LARGE, A.ABOVE_FAILURE]
    assert t.eta_max == ETA[7] and t.eta_min == ETA[0]
    word = {"ess": "ESS", "khat": "k̂ 0.75 > 0.585", "retained": "retained mass 0.9700",
            "nucleus": "nucleus moved at 0.0781%"}[what]
    assert word in t.reasons[8][0] and any(word in n for n in t.notes)
    if what in ("retained", "nucleus"):  # top-p only: not checked at p = 1
        assert run(d, nucleus_changed=moved, check_retained=False).trusted == [True] * ETA.size


def test_khat_of_nearly_equal_weights_is_not_counted() -> None:
    """k̂ above the threshold with ESS ≈ N (N/ESS − 1 ≤ 0.01) is not a failure; the same k̂ with
    weights that vary is; an undefined k̂ (equal weights, NaN/None) never is."""
    d = sweep(khat=np.full(ETA.size, 0.9), ess=np.full(ETA.size, N / 1.005))
    assert run(d).trusted == [True] * ETA.size
    d = sweep(khat=np.full(ETA.size, 0.9), ess=np.full(ETA.size, N / 1.02))
    assert kinds(run(d))[0] == A.TOO_LARGE
    d = sweep(khat=[None] * ETA.size, ess=np.full(ETA.size, N / 1.02))
    assert run(d).trusted == [True] * ETA.size


def test_why_khat_of_nearly_equal_weights_says_nothing() -> None:
    """For ``w = exp(η g)`` the Pareto fit sees exceedances ``≈ η·(g − g_cut)``: k̂ is scale-free and
    tends to the tail shape of ``g`` as η → 0, while ``N/ESS − 1 ∝ η²`` → 0 and the self-normalised
    mean converges to the plain mean (here: heavy-tailed Student-t(1.2) scores, k̂ ≈ 1)."""
    g = np.random.default_rng(0).standard_t(1.2, N)
    res = {}
    for eta in (1e-6, 1e-5, 1e-4, 0.02):
        lw = eta * g
        k = float(psis_khat(torch.tensor(lw[None]), N)[0])
        w = np.exp(lw - lw.max())
        ess = w.sum() ** 2 / (w * w).sum()
        res[eta] = (k, N / ess - 1)
    (k6, d6), (k5, d5), (k4, d4), (kl, dl) = res.values()
    assert k6 > THR and abs(k6 - k4) < 0.01 and abs(k6 - k5) < 0.01  # shape of g, whatever η
    assert d6 < 1e-6 and d4 / d6 == pytest.approx(1e4, rel=0.05)  # dispersion ∝ η²
    # so the rule ignores it at small η and counts it once the weights really vary (ESS still > N/2)
    assert 0.01 < dl < 1 and kl > THR
    verdict = A.trust_range([1e-6, 0.02], [S * 1e-6, S * 0.02], S, [N / (1 + d6), N / (1 + dl)], [k6, kl],
                            [1, 1], N, THR, check_retained=False)
    assert verdict.trusted == [True, False] and verdict.reasons[1][0].startswith("step too large: k̂")
    assert tail_size(N) == 48


def test_float32_floor_at_small_eta() -> None:
    """Rounding noise of 1e-7 nats on a float32 sweep: the η where it dominates are below the floor —
    the smallest ones by the dtype prior (|δH₁| < 2σ/max_dev), the next ones empirically (ΔH does not
    follow δH₁ while larger η do) — and the floor is the largest of them."""
    noise = 4e-7 * np.array([1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1])
    d = sweep(delta_h=S * ETA + noise)
    sigma = A.rounding_noise("float32", 5.0, N)  # 5.3e-8 nats
    t = run(d, noise=sigma)
    prior = np.abs(S * ETA) < 2 * sigma / 0.25
    empirical = (np.abs(noise) > 0.25 * np.abs(S * ETA)) & ~prior
    assert prior.tolist() == [True] + [False] * 10 and empirical.tolist() == [False, True] + [False] * 9
    assert kinds(t) == [A.FLOOR] * 2 + [""] * 9
    assert t.precision_floor == ETA[1] and t.eta_min == ETA[2]
    assert "< 2σ/0.25" in t.reasons[0][0] and "while larger η follow δH₁" in t.reasons[1][0]
    assert any("precision floor" in n for n in t.notes)
    # without the prior, the empirical rule alone finds the same floor here
    assert run(d, noise=0.0).trusted == t.trusted


def test_bf16_floor_covers_what_float32_resolves() -> None:
    """The same sweep in bfloat16: σ is 2^-7/2^-23 = 65536× larger, so every η whose |δH₁| is under
    2σ/max_dev is untrusted even where ΔH happens to follow δH₁ (no empirical evidence needed)."""
    sig = {dt: A.rounding_noise(dt, 1.1, N) for dt in ("float64", "float32", "float16", "bfloat16")}
    assert sig["float64"] == sig["float32"] < sig["float16"] < sig["bfloat16"]
    assert sig["bfloat16"] / sig["float32"] == pytest.approx(2**16)
    assert A.rounding_noise("int8", 1.1, N) == 0.0
    # per-token statistics in float64: T tokens of independent rounding, σ shrinks by √T
    assert A.rounding_noise("float32", 1.1, N, 16.0) == pytest.approx(sig["float32"] / 4)
    assert A.rounding_noise("float32", 1.1, N, 0.0) == sig["float32"]  # no tokens: the whole-sum form
    t = run(sweep(), noise=sig["bfloat16"])
    below = np.abs(S * ETA) < 2 * sig["bfloat16"] / 0.25
    assert 0 < below.sum() < ETA.size
    assert t.trusted == list(~below) and t.precision_floor == ETA[below].max()


def test_nan_delta_h_is_untrusted_at_its_eta_only() -> None:
    dh = S * ETA
    dh[4] = np.nan
    t = run(sweep(delta_h=dh))
    assert kinds(t) == [""] * 4 + [A.NOT_FINITE] + [""] * 6
    fits = A.linear_fits(ETA, dh, t.trusted)
    assert fits["n_points"] == 10 and fits["slope_origin"] == pytest.approx(S)


@pytest.mark.parametrize("slope", [0.0, math.nan])
def test_zero_or_undefined_slope(slope: float) -> None:
    """Nothing to compare with: no floor, no sign/monotonicity checks, a note says so; the weights'
    diagnostics still apply."""
    d = sweep(slope=slope, delta_h=np.zeros(ETA.size), ess=np.where(np.arange(ETA.size) == 9, 0.2 * N, N))
    t = run(d, noise=A.rounding_noise("float32", 1.1, N))
    assert kinds(t) == [""] * 9 + [A.TOO_LARGE, A.ABOVE_FAILURE]
    assert math.isnan(t.precision_floor) and any("slope is 0 or not finite" in n for n in t.notes)


def test_sign_flip_and_everything_above_it() -> None:
    """ΔH turns positive at 1e-4 (a nucleus jump, say) and back: δH₁ stays negative."""
    dh = S * ETA
    dh[6] = 3e-4
    t = run(sweep(delta_h=dh))
    assert kinds(t) == [""] * 6 + [A.SIGN_FLIP] + [A.LEFT_REGIME] * 4
    assert "ΔH = 0.0003 while δH₁ = -0.0002" in t.reasons[6][0]
    assert any(A.reason_kind(r) == A.NON_MONOTONE for r in t.reasons[6])
    # where the weights already failed (a moved nucleus), the flip is listed beside that reason
    moved = np.where(np.arange(ETA.size) >= 6, 0.01, 0.0)
    t = run(sweep(delta_h=dh), nucleus_changed=moved)
    assert [A.reason_kind(r) for r in t.reasons[6]] == [A.TOO_LARGE, A.SIGN_FLIP, A.NON_MONOTONE]
    assert kinds(t) == [""] * 6 + [A.TOO_LARGE] * 5


def test_non_monotone_sweep() -> None:
    """ΔH keeps δH₁'s sign but shrinks in size from one η to the next (moves against δH₁)."""
    dh = S * ETA
    dh[8] = 0.5 * dh[7]
    t = run(sweep(delta_h=dh))
    assert kinds(t) == [""] * 8 + [A.NON_MONOTONE] + [A.LEFT_REGIME] * 2
    # a step against δH₁ within the rounding noise (2√2σ) is not a verdict; without noise it is
    eta = np.array([1e-4, 1.01e-4, 1e-3])
    d = sweep(eta=eta, delta_h=S * eta[[0, 0, 2]] + [0, 1e-8, 0], ess=[N] * 3, khat=[0.1] * 3,
              retained=[1] * 3)
    assert run(d, noise=1e-8).trusted == [True] * 3
    assert kinds(run(d, noise=0.0)) == ["", A.NON_MONOTONE, A.LEFT_REGIME]


def test_never_follows_first_order_untrusts_everything() -> None:
    """ΔH/δH₁ = 3.5 at every η (bf16 noise, a wrong slope, ...): the sweep never reaches the regime
    where both must agree, so even its smallest η is untrusted."""
    t = run(sweep(delta_h=3.5 * S * ETA))
    assert kinds(t) == [A.NEVER_LINEAR] * ETA.size
    assert "ΔH/δH₁ = 3.5" in t.reasons[0][0] and math.isnan(t.eta_min)


def test_curvature_at_large_eta_stays_trusted() -> None:
    """Second-order effects (ΔH/δH₁ = 1.5 at the largest η, monotone) are measured, not flagged."""
    dh = S * ETA * (1 + 50 * ETA)
    assert dh[-1] / (S * ETA[-1]) == pytest.approx(1.5)
    assert run(sweep(delta_h=dh)).trusted == [True] * ETA.size


def test_trust_summary_and_warnings() -> None:
    """Every decomposition gets its own verdicts; per_eta holds them all; warnings group runs of η
    failing for the same kind of reason, and are empty when everything is trusted."""
    base = S * ETA
    cols = {
        "delta_h": [[b, 0.1 * b] for b in base],
        "ess": [[N, N / 1.02] for _ in ETA],
        "khat": [[0.2, 0.9 if e >= 1e-3 else 0.3] for e in ETA],
        "retained_mass": [[1.0, 1.0] for _ in ETA],
    }
    tr = A.trust_summary(list(ETA), ["full", "baseline"], cols, [S, 0.1 * S], N, THR, top_p=False,
                         noise=0.0, dtype="float32")
    assert tr["trusted"] == [True] * ETA.size and tr["decompositions"]["full"]["trusted"] == tr["trusted"]
    base_ok = tr["decompositions"]["baseline"]["trusted"]
    assert base_ok == [e < 1e-3 for e in ETA]
    assert [r["trusted"] for r in tr["per_eta"]] == base_ok
    assert tr["per_eta"][9]["reasons"]["full"] == []
    assert A.reason_kind(tr["per_eta"][9]["reasons"]["baseline"][0]) == A.TOO_LARGE
    assert tr["rule"]["max_nucleus_changed"] == 0.0 and tr["dtype"] == "float32"
    (line,) = A.trust_warnings(tr)
    assert line.startswith("baseline: ΔH untrusted at 3 of 11 η — η = 0.001 … 0.01 (at η = 0.001: "
                           "step too large: k̂ 0.90")
    assert A.trust_warnings({"per_eta": [{"eta": 1.0, "reasons": {"full": []}}]}) == []
    assert A.trust_warnings(None) == []


def test_linear_fits_and_auto_grid() -> None:
    y = 3.0 * ETA + 1e-9
    f = A.linear_fits(ETA, y)
    assert f["slope_origin"] == pytest.approx(3.0, rel=1e-6) and f["r2"] == pytest.approx(1.0)
    assert f["loglog_slope"] == pytest.approx(1.0, abs=1e-2)
    assert math.isnan(A.linear_fits(ETA, -y * np.sign(ETA - 1e-4))["loglog_slope"])  # sign change
    assert math.isnan(A.linear_fits(ETA[:1], y[:1])["slope"])
    g = A.auto_grid(1e-6, 1e-3, 4, 3e-5)
    assert g == sorted(g) and len(g) == 5 and 3e-5 in g and g[0] == pytest.approx(1e-6)
    assert A.auto_grid(1e-6, 1e-3, 4, 1.0) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3])
