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
_CHUNK_ELEMENTS = 262_144  # resamples × tokens handled at once: [B, n] arrays of 2 MB stay in cache


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
    """One series sorted once, so that every bootstrap resample costs O(n): the stable ``order``,
    the tie group of each sorted position and where each group starts, and the negative entries most
    negative first (ties in index order, as :func:`lowering`)."""

    order: np.ndarray
    group: np.ndarray
    starts: np.ndarray
    neg: np.ndarray


def _presort(x: np.ndarray) -> _Sorted:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    first = np.r_[True, xs[1:] != xs[:-1]]
    return _Sorted(order, np.cumsum(first) - 1, np.flatnonzero(first), order[xs < 0])


# Resamples are rows of a count matrix C [B, n]: entry j holds how often item j (a token, or a
# sequence) appears in the resample; the full sample is a row of ones. Every statistic below is
# the one of the literal resample (items repeated), computed from C without repeating anything.
def _ranks(s: _Sorted, c: np.ndarray) -> np.ndarray:
    """Average ranks ``[B, n]`` of every item in each resample (ties share their average rank)."""
    gw = np.add.reduceat(c[:, s.order], s.starts, axis=1)  # each tie group's size in the resample
    out = np.empty_like(c)
    out[:, s.order] = (np.cumsum(gw, axis=1) - gw + (gw + 1) / 2)[:, s.group]
    return out


def _wspearman(ra: np.ndarray, rb: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:func:`spearman` of each resample ``[B]`` from the ranks :func:`_ranks` gives."""
    n = c.sum(1, keepdims=True)
    a, b = ra - (n + 1) / 2, rb - (n + 1) / 2
    den = np.sqrt((c * a * a).sum(1) * (c * b * b).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (c * a * b).sum(1) / den
    return np.where((n[:, 0] >= 2) & (den > 0), out, math.nan)


def _wsign(r: np.ndarray, e: np.ndarray, c: np.ndarray) -> np.ndarray:
    """:func:`sign_agreement` of each resample ``[B]``."""
    w = c * (e != 0)
    tot = w.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, (w * (np.sign(r) == np.sign(e))).sum(1) / tot, math.nan)


def _take(s: _Sorted, c: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``[B, n]``: how many copies of each item the resample's :func:`lowering` selection of ``k[b]``
    holds."""
    cn = c[:, s.neg]
    before = np.cumsum(cn, axis=1) - cn  # copies of more negative items
    cut = int((before < k[:, None]).sum(1).max()) if s.neg.size else 0  # nothing is taken beyond
    out = np.zeros_like(c)
    out[:, s.neg[:cut]] = np.clip(k[:, None] - before[:, :cut], 0, cn[:, :cut])
    return out


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), math.nan)


def _topk(sr: _Sorted, takes_e: list[np.ndarray], e: np.ndarray, c: np.ndarray,
          ks: list[np.ndarray]) -> list[np.ndarray]:
    """precision, recall, share and exact share ``[B]`` of each budget; ``takes_e``: the exact
    selections (:func:`_take` of ``e``), ``ks``: ``k`` per resample of each budget."""
    total = (c * e).sum(1)
    out: list[np.ndarray] = []
    for k, te in zip(ks, takes_e, strict=True):
        tr = _take(sr, c, k)
        hit = np.minimum(tr, te).sum(1)
        out += [_ratio(hit, tr.sum(1)), _ratio(hit, te.sum(1)), _ratio((tr * e).sum(1), total),
                _ratio((te * e).sum(1), total)]
    return out


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
    ok = np.ones(n_seq, dtype=bool) if m_seq is None else np.isfinite(m_seq)
    seq_sorted = {k: _presort(v[ok]) for k, v in seq.items()}
    m_ok = None if m_seq is None else m_seq[ok]
    m_sorted = None if m_ok is None else _presort(m_ok)
    e = tok["exact"]
    n_stats = 4 + 4 * len(budgets)
    stats = {k: np.empty((0, n_stats)) for k in tok}  # row 0: the full sample, then each resample
    counts = [np.ones((1, n_seq)), *[np.bincount(p, minlength=n_seq)[None, :] for p in picks]]
    step = max(1, _CHUNK_ELEMENTS // max(rows.size, 1))
    for s0 in range(0, len(counts), step):
        cs = np.concatenate(counts[s0 : s0 + step]).astype(np.float64)  # [B, M] sequence counts
        c = cs[:, rows]  # [B, n] token counts
        n_res = c.sum(1)
        ks = [np.maximum(1, np.floor(b * n_res)).astype(np.int64) for b in budgets]
        rank_e = _ranks(sorted_["exact"], c)
        takes_e = [_take(sorted_["exact"], c, k) for k in ks]
        cs_ok = cs[:, ok]
        rank_m = None if m_sorted is None else _ranks(m_sorted, cs_ok)
        for name, r in tok.items():
            cols = [_wspearman(_ranks(sorted_[name], c), rank_e, c), _wsign(r, e, c),
                    *_topk(sorted_[name], takes_e, e, c, ks)]
            if m_ok is None or rank_m is None:
                cols += [np.full(len(cs), math.nan)] * 2
            else:
                cols += [_wspearman(_ranks(seq_sorted[name], cs_ok), rank_m, cs_ok),
                         _wsign(seq[name][ok], m_ok, cs_ok)]
            stats[name] = np.concatenate([stats[name], np.stack(cols, 1)])

    def score(name: str) -> RuleScore:
        vals = stats[name][0]
        ses = _se(stats[name][1:]) if n_boot else np.full(vals.size, math.nan)
        return _score(name, vals, ses, budgets, rows.size)

    return Scoreboard(
        rules=[score(k) for k in proxies],
        exact=score("exact"),
        n_tokens=int(rows.size),
        n_sequences=int(n_seq),
        n_boot=int(n_boot),
        seed=int(seed),
    )
