"""The proxy scoreboard (deltaH.scoreboard) on synthetic inputs with known answers.

A perfect rule (the exact values, or a monotone transform of them) scores 1 everywhere and carries
the exact top-k share; the reversed rule scores −1, agrees in sign nowhere and selects none of the
exact top-k; an independent random rule has a rank correlation within a few bootstrap standard
errors of 0, and that standard error is about 1/√n. The bootstrap is checked against a literal loop
that draws the same sequences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from deltaH.scoreboard import BUDGETS, budget_k, lowering, rankdata, scoreboard, sign_agreement, spearman


def _synthetic(m: int = 60, t: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact token values ``[m, t]`` (distinct, both signs) and a ragged mask."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, t + 1, m)
    mask = np.arange(t)[None, :] < lengths[:, None]
    exact = rng.standard_normal((m, t)) * mask
    return exact, mask


def test_rank_helpers_by_hand() -> None:
    np.testing.assert_array_equal(rankdata(np.array([3.0, 1.0, 2.0, 2.0])), [4.0, 1.0, 2.5, 2.5])
    np.testing.assert_array_equal(rankdata(np.array([5.0, 5.0, 5.0])), [2.0, 2.0, 2.0])
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0, 35.0])) == pytest.approx(1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([3.0, 2.0, 1.0])) == pytest.approx(-1.0)
    assert math.isnan(spearman(np.array([1.0, 2.0]), np.array([4.0, 4.0])))  # a constant side
    # ties: the Pearson correlation of average ranks, written out
    a, b = np.array([1.0, 2.0, 2.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4.0])
    assert spearman(a, b) == pytest.approx(float(np.corrcoef(ra, rb)[0, 1]), rel=1e-12)
    r, e = np.array([1.0, -2.0, 0.0, 3.0]), np.array([2.0, 1.0, 0.0, -1.0])
    assert sign_agreement(r, e) == pytest.approx(1 / 3)  # the e = 0 token does not count
    assert budget_k(0.0002, 170) == 1 and budget_k(0.02, 170) == 3 and budget_k(0.02, 1000) == 20
    np.testing.assert_array_equal(lowering(np.array([0.5, -1.0, -3.0, -1.0, 2.0]), 2), [2, 1])
    np.testing.assert_array_equal(lowering(np.array([0.5, -1.0, 2.0]), 3), [1])  # only negatives count


def test_perfect_and_monotone_rules_score_one() -> None:
    exact, mask = _synthetic()
    measured = exact.sum(1)
    sb = scoreboard(exact, {"same": exact, "cubed": exact**3 * 7.0}, mask, measured, n_boot=50, seed=1)
    for r in sb.rules:
        assert r.spearman.value == pytest.approx(1.0) and r.sign.value == 1.0
        if r.name == "same":  # a token-wise monotone transform is not monotone in per-sequence sums
            assert r.seq_spearman.value == pytest.approx(1.0) and r.seq_sign.value == 1.0
        for t in r.topk:
            assert t.precision.value == t.recall.value == 1.0
            assert t.share.value == pytest.approx(t.exact_share.value)
        assert r.spearman.se == pytest.approx(0.0, abs=1e-12)  # every resample is perfect too
    assert [t.budget for t in sb.rules[0].topk] == list(BUDGETS)
    assert sb.n_tokens == int(mask.sum()) and sb.n_sequences == mask.shape[0]
    assert sb.exact.seq_spearman.value == pytest.approx(1.0)


def test_reversed_rule_scores_minus_one_and_misses_every_token() -> None:
    exact, mask = _synthetic()
    sb = scoreboard(exact, {"reversed": -exact}, mask, exact.sum(1), n_boot=20)
    r = sb.rules[0]
    assert r.spearman.value == pytest.approx(-1.0) and r.sign.value == 0.0
    assert r.seq_spearman.value == pytest.approx(-1.0) and r.seq_sign.value == 0.0
    e = exact[mask]
    for t in r.topk:
        assert t.precision.value == 0.0 and t.recall.value == 0.0
        # it selects the k largest positive exact values: their share of the total
        want = np.sort(e)[::-1][: t.k].sum() / e.sum()
        assert t.share.value == pytest.approx(want, rel=1e-12)


def test_random_rule_is_uncorrelated_within_its_standard_error() -> None:
    exact, mask = _synthetic(m=200, t=10, seed=3)
    noise = np.random.default_rng(4).standard_normal(exact.shape) * mask
    sb = scoreboard(exact, {"random": noise}, mask, exact.sum(1), n_boot=300, seed=5)
    r = sb.rules[0]
    n = int(mask.sum())
    assert abs(r.spearman.value) < 4 * r.spearman.se
    # rank correlation of independent samples has standard deviation ≈ 1/√(n−1); rows are resampled
    # whole, which changes it little for independent tokens
    assert 0.6 / math.sqrt(n - 1) < r.spearman.se < 1.6 / math.sqrt(n - 1)
    assert abs(r.sign.value - 0.5) < 4 * r.sign.se


def test_precision_and_recall_differ_when_few_tokens_lower_the_entropy() -> None:
    """Two of 100 exact values are negative: at k = 2 the rule's set and the exact set are sized
    by their own negatives (the exact set has 2, the rule's 2 of which 1 is right)."""
    exact = np.full((10, 10), 0.1)
    exact[0, 0], exact[3, 3] = -2.0, -1.0
    rule = np.full((10, 10), 0.2)
    rule[0, 0], rule[5, 5], rule[7, 7] = -3.0, -1.0, -0.5
    mask = np.ones((10, 10), dtype=bool)
    sb = scoreboard(exact, {"rule": rule}, mask, None, budgets=(0.02, 0.03), n_boot=0)
    t2, t3 = sb.rules[0].topk
    assert (t2.k, t2.precision.value, t2.recall.value) == (2, 0.5, 0.5)
    assert (t3.k, t3.precision.value, t3.recall.value) == (3, 1 / 3, 0.5)  # 3 selected, 2 exact
    assert t2.share.value == pytest.approx((-2.0 + 0.1) / exact.sum())
    assert math.isnan(sb.rules[0].seq_spearman.value) and math.isnan(sb.rules[0].spearman.se)


def test_bootstrap_matches_a_literal_loop_over_resampled_sequences() -> None:
    """Every statistic's SE against the same resamples built literally (rows concatenated)."""
    exact, mask = _synthetic(m=30, t=6, seed=7)
    rule = exact + np.random.default_rng(8).standard_normal(exact.shape) * mask
    measured = exact.sum(1) + 0.1
    sb = scoreboard(exact, {"rule": rule}, mask, measured, budgets=(0.02, 0.1), n_boot=40, seed=9)
    rng = np.random.default_rng(9)
    reps: dict[str, list[float]] = {"rho": [], "sign": [], "prec": [], "share": [], "seq": []}
    for _ in range(40):
        rows = rng.integers(0, 30, 30)
        r = np.concatenate([rule[i][mask[i]] for i in rows])
        e = np.concatenate([exact[i][mask[i]] for i in rows])
        k = budget_k(0.1, e.size)
        sr, se_ = lowering(r, k), lowering(e, k)
        reps["rho"].append(spearman(r, e))
        reps["sign"].append(sign_agreement(r, e))
        reps["prec"].append(np.intersect1d(sr, se_).size / sr.size)
        reps["share"].append(e[sr].sum() / e.sum())
        reps["seq"].append(spearman((rule * mask).sum(1)[rows], measured[rows]))
    got = sb.rules[0]
    top = got.topk[1]
    for key, est in (("rho", got.spearman), ("sign", got.sign), ("prec", top.precision),
                     ("share", top.share), ("seq", got.seq_spearman)):
        assert est.se == pytest.approx(float(np.std(reps[key], ddof=1)), rel=1e-9), key
    again = scoreboard(exact, {"rule": rule}, mask, measured, budgets=(0.02, 0.1), n_boot=40, seed=9)
    assert again == sb  # seeded
