"""How well token-level entropy rules predict a step's effect (docs/math.md#proxy-scoreboard). Pure numpy.

Inputs, on the ``M`` update sequences of U (``[M, T]`` arrays, the ``k``-th scored token of row ``i``
at ``[i, k]``, ``mask`` marking the scored tokens):

* ``exact``: each token's exact first-order entropy change (the token influence
  ``s`` of :mod:`deltaH.estimators.token_influence`, at any fixed η);
* ``proxies``: ``{name: [M, T]}``, each rule's predicted change (oriented: its sign is the predicted
  sign, :data:`deltaH.estimators.proxies.PROXIES`);
* ``measured`` (optional) ``[M]``: each sequence's measured ΔH (SNIS along its component ĉ_i, the
  influence matrix's column sums).

For each rule, with ``e`` the exact and ``r`` the rule's values on the scored tokens::

    spearman       rank correlation of r and e over tokens (average ranks for ties)
    sign           fraction of tokens with e ≠ 0 where sign r = sign e
    top-k (budget f of the tokens, k = max(1, ⌊f·n⌋) as Clip-Cov and KL-Cov count them):
      S_r = the k tokens the rule predicts lower the entropy most (most negative r, among r < 0)
      S_e = the same for e;   precision = |S_r ∩ S_e| / |S_r|,  recall = |S_r ∩ S_e| / |S_e|
      share = Σ_{S_r} e / Σ_all e   the fraction of the step's first-order change its tokens carry
    seq_spearman, seq_sign   Σ_k r[i, k] against the measured ΔH_i, over sequences

Standard errors: a seeded bootstrap over update sequences (rows are resampled with replacement,
all their tokens together; every statistic is recomputed on each resample; SE = standard deviation
over resamples). ``exact`` itself gets the sequence-level row (how well first order ranks the
measured per-sequence ΔH) and its own top-k share (the best any rule could do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

BUDGETS = (0.0002, 0.002, 0.02)  # Clip-Cov / KL-Cov's token budgets: 0.02%, 0.2%, 2%


@dataclass(frozen=True)
class Est:
    """A statistic and its bootstrap standard error (NaN where undefined)."""

    value: float
    se: float


@dataclass(frozen=True)
class TopK:
    """One budget: ``k`` tokens of ``n``; precision, recall and share as in the module docstring;
    ``exact_share``: the share of the exact top-k (the best possible)."""

    budget: float
    k: int
    precision: Est
    recall: Est
    share: Est
    exact_share: Est


@dataclass(frozen=True)
class RuleScore:
    """One rule against the exact token influence and the measured per-sequence ΔH."""

    name: str
    spearman: Est
    sign: Est
    topk: list[TopK]
    seq_spearman: Est
    seq_sign: Est


@dataclass(frozen=True)
class Scoreboard:
    """Every rule's :class:`RuleScore`; ``exact``: the exact token influence's own sequence-level row
    (token-level statistics are 1 by definition); sizes and the bootstrap's settings."""

    rules: list[RuleScore]
    exact: RuleScore
    n_tokens: int
    n_sequences: int
    n_boot: int
    seed: int


def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks ``1..n`` with ties given their average rank (``scipy.stats.rankdata`` 'average')."""
    n = x.size
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]] if n else np.zeros(0, dtype=bool)
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = (0.5 * (starts + ends - 1) + 1.0)[np.cumsum(first) - 1]
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the average ranks; NaN with fewer than 2 values or a constant side."""
    if a.size < 2:
        return math.nan
    ra, rb = rankdata(a) - (a.size + 1) / 2, rankdata(b) - (b.size + 1) / 2
    den = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum()) / den if den > 0 else math.nan


def sign_agreement(r: np.ndarray, e: np.ndarray) -> float:
    """Fraction of the entries with ``e ≠ 0`` where ``sign r == sign e`` (NaN when every ``e`` is 0)."""
    keep = e != 0
    return float((np.sign(r[keep]) == np.sign(e[keep])).mean()) if keep.any() else math.nan


def budget_k(budget: float, n: int) -> int:
    """Tokens selected at ``budget``: ``max(1, ⌊budget·n⌋)`` (verl's Clip-Cov / KL-Cov count)."""
    return max(1, int(budget * n))


def lowering(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the (at most) ``k`` most negative entries among the negative ones, most negative
    first (ties in index order)."""
    neg = np.flatnonzero(values < 0)
    if neg.size > k:  # a linear-time partial selection, then order only the k kept
        kth = np.partition(values[neg], k - 1)[k - 1]
        neg = neg[values[neg] <= kth]
    return neg[np.lexsort((neg, values[neg]))][:k]


@dataclass(frozen=True)
class _Sorted:
    """One token series sorted once, so each bootstrap resample costs O(n): the stable ``order``,
    the tie group of each sorted position, and the negative entries most negative first (ties in
    index order, as :func:`lowering`)."""

    order: np.ndarray
    group: np.ndarray
    n_groups: int
    neg: np.ndarray


def _presort(x: np.ndarray) -> _Sorted:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    group = np.cumsum(np.r_[True, xs[1:] != xs[:-1]]) - 1 if x.size else np.zeros(0, dtype=np.int64)
    return _Sorted(order, group, int(group[-1]) + 1 if x.size else 0, order[xs < 0])


def _ranks(s: _Sorted, c: np.ndarray) -> np.ndarray:
    """Average ranks of every token in a resample holding token ``j`` ``c[j]`` times (by token)."""
    gw = np.bincount(s.group, weights=c[s.order], minlength=s.n_groups)
    out = np.empty(c.size)
    out[s.order] = (np.cumsum(gw) - gw + (gw + 1) / 2)[s.group]
    return out


def _wspearman(ra: np.ndarray, rb: np.ndarray, c: np.ndarray) -> float:
    """:func:`spearman` of a resample from the ranks :func:`_ranks` gives (equal to it for ``c = 1``)."""
    n = float(c.sum())
    if n < 2:
        return math.nan
    ra, rb = ra - (n + 1) / 2, rb - (n + 1) / 2
    den = math.sqrt(float((c * ra * ra).sum()) * float((c * rb * rb).sum()))
    return float((c * ra * rb).sum()) / den if den > 0 else math.nan


def _wsign(r: np.ndarray, e: np.ndarray, c: np.ndarray) -> float:
    """:func:`sign_agreement` of the resample with multiplicities ``c``."""
    w = c * (e != 0)
    tot = float(w.sum())
    return float((w * (np.sign(r) == np.sign(e))).sum()) / tot if tot > 0 else math.nan


def _take(s: _Sorted, c: np.ndarray, k: int) -> np.ndarray:
    """How many copies of each token the resample's :func:`lowering` selection of ``k`` holds."""
    cn = c[s.neg]
    out = np.zeros(c.size)
    out[s.neg] = np.clip(k - (np.cumsum(cn) - cn), 0, cn)
    return out


def _topk(
    sr: _Sorted, takes_e: list[np.ndarray], e: np.ndarray, c: np.ndarray, ks: Sequence[int]
) -> list[float]:
    """precision, recall, share and exact share of each ``k`` on the resample ``c``; ``takes_e``: the
    exact selections (:func:`_take` of ``e``)."""
    total = float((c * e).sum())
    out: list[float] = []
    for k, te in zip(ks, takes_e, strict=True):
        tr = _take(sr, c, k)
        hit, nr, ne = float(np.minimum(tr, te).sum()), float(tr.sum()), float(te.sum())
        out += [hit / nr if nr else math.nan, hit / ne if ne else math.nan,
                float((tr * e).sum()) / total if total != 0 else math.nan,
                float((te * e).sum()) / total if total != 0 else math.nan]
    return out


def _seq_stats(r_seq: np.ndarray, m_seq: np.ndarray | None) -> list[float]:
    if m_seq is None:
        return [math.nan, math.nan]
    ok = np.isfinite(m_seq)
    return [spearman(r_seq[ok], m_seq[ok]), sign_agreement(r_seq[ok], m_seq[ok])]


def _se(reps: np.ndarray) -> np.ndarray:
    """Column-wise standard deviation over the finite bootstrap replicates (NaN with fewer than 2)."""
    out = np.full(reps.shape[1], math.nan)
    for j in range(reps.shape[1]):
        col = reps[:, j][np.isfinite(reps[:, j])]
        if col.size >= 2:
            out[j] = float(col.std(ddof=1))
    return out


def _score(name: str, vals: np.ndarray, ses: np.ndarray, budgets: Sequence[float], n: int) -> RuleScore:
    def est(j: int) -> Est:
        return Est(float(vals[j]), float(ses[j]))

    tops = [TopK(b, budget_k(b, n), est(2 + 4 * q), est(3 + 4 * q), est(4 + 4 * q), est(5 + 4 * q))
            for q, b in enumerate(budgets)]
    j = 2 + 4 * len(budgets)
    return RuleScore(name, est(0), est(1), tops, est(j), est(j + 1))


def scoreboard(
    exact: np.ndarray,
    proxies: Mapping[str, np.ndarray],
    mask: np.ndarray,
    measured: np.ndarray | None = None,
    *,
    budgets: Sequence[float] = BUDGETS,
    n_boot: int = 200,
    seed: int = 0,
) -> Scoreboard:
    """Score each rule of ``proxies`` against ``exact`` (and ``measured``), module docstring."""
    mask = np.asarray(mask, dtype=bool)
    e2 = np.asarray(exact, dtype=np.float64)
    m_seq = None if measured is None else np.asarray(measured, dtype=np.float64)
    series = {"exact": e2, **{k: np.asarray(v, dtype=np.float64) for k, v in proxies.items()}}
    tok = {k: v[mask] for k, v in series.items()}
    seq = {k: (v * mask).sum(1) for k, v in series.items()}
    n_seq = mask.shape[0]
    rng = np.random.default_rng(seed)
    picks = [np.asarray(rng.integers(0, n_seq, n_seq)) for _ in range(n_boot)]
    lens = mask.sum(1)

    rows = np.repeat(np.arange(n_seq), lens)  # the row of each scored token, row-major
    sorted_ = {k: _presort(v) for k, v in tok.items()}
    e = tok["exact"]
    stats: dict[str, list[list[float]]] = {k: [] for k in tok}  # the full sample, then each resample
    for sel in [None, *picks]:
        c = np.ones(rows.size) if sel is None else np.bincount(sel, minlength=n_seq)[rows].astype(np.float64)
        ks = [budget_k(b, int(c.sum())) for b in budgets]
        rank_e = _ranks(sorted_["exact"], c)
        takes_e = [_take(sorted_["exact"], c, k) for k in ks]
        m = m_seq if sel is None or m_seq is None else m_seq[sel]
        for name, r in tok.items():
            seq_r = seq[name] if sel is None else seq[name][sel]
            stats[name].append([_wspearman(_ranks(sorted_[name], c), rank_e, c), _wsign(r, e, c),
                                *_topk(sorted_[name], takes_e, e, c, ks), *_seq_stats(seq_r, m)])

    def score(name: str) -> RuleScore:
        vals = np.asarray(stats[name][0])
        ses = _se(np.asarray(stats[name][1:])) if n_boot else np.full(vals.size, math.nan)
        return _score(name, vals, ses, budgets, rows.size)

    return Scoreboard(
        rules=[score(k) for k in proxies],
        exact=score("exact"),
        n_tokens=int(rows.size),
        n_sequences=int(n_seq),
        n_boot=int(n_boot),
        seed=int(seed),
    )
