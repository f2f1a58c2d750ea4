"""Which update sequences drove the entropy change: sums of per-sequence ΔH over tagged groups of U,
their shares and jackknife standard errors (docs/math.md#attribution).

Pure functions of numbers (no I/O). Per kind (true SNIS ΔH, first-order δH₁), from the influence
matrices at η_ref (:func:`deltaH.estimators.influence.influence_matrix`) and the baseline decomposition::

    d[i]      = ΔH along update sequence i's component ĉ_i            [N_U]   (column sums of M)
    L[n, i]   = d[i] recomputed without evaluation sequence n          [N_E, N_U]   (``Influence.loo``)
    b, L_b[n] = ΔH along the baseline (momentum + weight decay), and without n   [], [N_E]

For a group ``G ⊆ U`` and the total ``T = Σ_i d_i + b``::

    ΔH_G       = Σ_{i∈G} d_i                  share_G = ΔH_G / T
    L_G[n]     = Σ_{i∈G} L[n, i]              L_T[n]  = Σ_i L[n, i] + L_b[n]
    se(ΔH_G)²  = (N_E − 1)/N_E · Σ_n (L_G[n] − mean_n L_G)²                          (jackknife)
    se(share)² = the same with L_G[n] / L_T[n]

The leave-one-out value of a sum of estimates is the sum of their leave-one-out values, so this is
the exact jackknife of ``ΔH_G`` — for one first-order column it is the estimator's own standard
error (``FirstOrder.stderr``). It needs ``L``, not only the columns of M: a column's
per-sequence terms contain ``e_n·(a_n − ā)/N``, which sums to zero but not its variance. Without
``L_b`` the baseline is held fixed in the shares' errors.

Tag families (:class:`UpdateTags`), each a partition of U: advantage sign, reward correct/incorrect
(only when the rewards take exactly two values), truncated (no EOS) vs finished, response-length
quartile, same-prompt group. A family with fewer than two non-empty groups is left out, with the
reason. Length quartiles go by rank: a sequence with ``s`` strictly shorter responses among ``N_U``
is in quartile ``1 + ⌊4s/N_U⌋``, so equal lengths always share a quartile (ties can leave one empty).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltaH.errors import ArgumentError

# |A| at most this fraction of max|A| counts as a zero advantage: float32 r − mean(r) of equal
# rewards can round to a few ulps instead of 0, and a ~1e-7 relative coefficient moves nothing.
ZERO_ADVANTAGE_RTOL = 1e-6
FAMILIES = ("advantage_sign", "reward", "truncation", "length_quartile", "prompt_group")
FAMILY_TITLES = {
    "advantage_sign": "advantage sign",
    "reward": "reward",
    "truncation": "truncation",
    "length_quartile": "response-length quartile",
    "prompt_group": "same-prompt group",
}


@dataclass(frozen=True)
class UpdateTags:
    """What is known about each of the ``N`` update sequences, whatever produced them.

    ``advantage [N]``; ``reward [N]`` or None (unknown); ``group [N]`` same-prompt group id;
    ``truncated [N]`` True when the response did not end with EOS; ``length [N]`` response tokens;
    ``text`` the responses' text (or None).
    """

    advantage: np.ndarray
    reward: np.ndarray | None
    group: np.ndarray
    truncated: np.ndarray
    length: np.ndarray
    text: list[str] | None = None

    def __post_init__(self) -> None:
        conv: dict[str, tuple[Any, Callable[[Any], np.ndarray]]] = {
            "advantage": (self.advantage, lambda x: np.asarray(x, dtype=np.float64)),
            "group": (self.group, lambda x: np.asarray(x, dtype=np.int64)),
            "truncated": (self.truncated, lambda x: np.asarray(x, dtype=bool)),
            "length": (self.length, lambda x: np.asarray(x, dtype=np.int64)),
        }
        if self.reward is not None:
            conv["reward"] = (self.reward, lambda x: np.asarray(x, dtype=np.float64))
        n = None
        for name, (value, to) in conv.items():
            a = to(_numpy(value))
            if a.ndim != 1:
                raise ArgumentError(f"UpdateTags.{name} must be 1-D [N], got shape {a.shape}")
            n = a.shape[0] if n is None else n
            if a.shape[0] != n:
                raise ArgumentError(f"UpdateTags.{name} has {a.shape[0]} entries, advantage has {n}: one per "
                                    "update sequence")
            if a.dtype == np.float64 and not np.isfinite(a).all():
                raise ArgumentError(f"UpdateTags.{name} has non-finite entries; pass finite values")
            object.__setattr__(self, name, a)
        if self.text is not None and len(self.text) != n:
            raise ArgumentError(f"UpdateTags.text has {len(self.text)} entries for {n} update sequences")
        if self.text is not None:
            object.__setattr__(self, "text", [str(t) for t in self.text])

    def __len__(self) -> int:
        return int(self.advantage.shape[0])


def _numpy(x: Any) -> Any:
    """A tensor as a numpy array (torch stays an optional import here)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def tags_from_batch(
    batch: Any,
    *,
    advantages: Any,
    group: Any,
    eos_token_ids: Sequence[int],
    rewards: Any | None = None,
    texts: Sequence[str] | None = None,
) -> UpdateTags:
    """:class:`UpdateTags` of a :class:`~deltaH.batch.SequenceBatch` of update sequences.

    ``length`` is the number of response tokens (``response_mask``, EOS included); a row is
    ``truncated`` when its last response token is none of ``eos_token_ids``. The other tags are
    passed through (``[N]`` each; ``texts``: the decoded responses).
    """
    rm = batch.response_mask.bool()
    pos = np.arange(rm.shape[1])
    last = (_numpy(rm) * pos).argmax(1)  # every row has a response token (SequenceBatch checks it)
    last_tok = _numpy(batch.input_ids)[np.arange(rm.shape[0]), last]
    return UpdateTags(
        advantage=advantages,
        reward=rewards,
        group=group,
        truncated=~np.isin(last_tok, np.asarray(list(eos_token_ids), dtype=np.int64)),
        length=_numpy(rm.sum(1)),
        text=None if texts is None else list(texts),
    )


@dataclass(frozen=True)
class Estimate:
    """One kind's ``delta_h`` of a group (nats per sequence), its ``share`` of the total, and their
    jackknife standard errors (NaN without leave-one-out values)."""

    delta_h: float
    se: float
    share: float
    share_se: float


@dataclass(frozen=True)
class Group:
    """A group of update sequences (``rows``, ``n`` of them) and its true and first-order estimates."""

    label: str
    n: int
    rows: list[int]
    true: Estimate
    first_order: Estimate


@dataclass(frozen=True)
class Family:
    """One tag family: ``name`` (of :data:`FAMILIES`), a partition of U into ``groups``."""

    name: str
    groups: list[Group]

    @property
    def title(self) -> str:
        return FAMILY_TITLES.get(self.name, self.name)


@dataclass(frozen=True)
class Attribution:
    """Result of :func:`attribute`.

    ``families``: the tag families that split U into at least two groups; ``omitted``: family name
    → why it was left out; ``update``: all of U together; ``baseline``: the momentum + weight-decay
    part (``n = 0``); ``total``: both (share 1); per sequence ``delta_h``, ``delta_h1 [N_U]`` and
    their standard errors; ``rank_true``, ``rank_first_order``: rows by contribution, largest
    (raises the entropy most) first.
    """

    families: list[Family]
    omitted: dict[str, str]
    update: Group
    baseline: Group
    total: Group
    delta_h: np.ndarray
    delta_h_se: np.ndarray
    delta_h1: np.ndarray
    delta_h1_se: np.ndarray
    rank_true: list[int]
    rank_first_order: list[int]

    def family(self, name: str) -> Family | None:
        return next((f for f in self.families if f.name == name), None)


@dataclass(frozen=True)
class Contributions:
    """One kind's inputs to :func:`attribute`: ``delta_h [N_U]`` along each component,
    ``loo [N_E, N_U]`` (or None: no standard errors), the baseline's ΔH and its ``baseline_loo
    [N_E]`` (or None: the baseline counts as exact in the shares' errors)."""

    delta_h: np.ndarray
    loo: np.ndarray | None
    baseline: float
    baseline_loo: np.ndarray | None = None

    def __post_init__(self) -> None:
        d = np.asarray(_numpy(self.delta_h), dtype=np.float64)
        if d.ndim != 1:
            raise ArgumentError(f"Contributions.delta_h must be 1-D [N_U], got shape {d.shape}")
        object.__setattr__(self, "delta_h", d)
        if self.loo is not None:
            loo = np.asarray(_numpy(self.loo), dtype=np.float64)
            if loo.ndim != 2 or loo.shape[1] != d.shape[0]:
                raise ArgumentError(f"Contributions.loo must be [N_E, {d.shape[0]}], got shape {loo.shape}")
            object.__setattr__(self, "loo", loo)
        if self.baseline_loo is not None:
            bl = np.asarray(_numpy(self.baseline_loo), dtype=np.float64)
            if self.loo is None or bl.shape != (self.loo.shape[0],):
                raise ArgumentError("Contributions.baseline_loo must be [N_E] and needs loo [N_E, N_U]")
            object.__setattr__(self, "baseline_loo", bl)
        object.__setattr__(self, "baseline", float(self.baseline))


def jackknife_se(loo: np.ndarray) -> np.ndarray:
    """Jackknife standard errors from leave-one-out values ``loo [N, ...]`` (axis 0: the left-out
    sequence): ``sqrt((N − 1)/N · Σ_n (loo_n − mean loo)²)``."""
    n = loo.shape[0]
    return np.sqrt((n - 1) / n * ((loo - loo.mean(0)) ** 2).sum(0))


def _estimates(c: Contributions, member: np.ndarray) -> list[Estimate]:
    """Estimates of the groups given by the columns of ``member [N_U, n_groups]`` (0/1), then of the
    baseline and of the total."""
    total = float(c.delta_h.sum() + c.baseline)
    dh = np.append(c.delta_h @ member, [c.baseline, total])
    se = share_se = np.full(dh.shape, np.nan)
    if c.loo is not None:
        b_loo = c.baseline_loo if c.baseline_loo is not None else np.full(c.loo.shape[0], c.baseline)
        loo_t = c.loo.sum(1) + b_loo
        loo_g = np.concatenate([c.loo @ member, b_loo[:, None], loo_t[:, None]], axis=1)  # [N_E, groups + 2]
        se = jackknife_se(loo_g)
        with np.errstate(divide="ignore", invalid="ignore"):
            share_se = jackknife_se(loo_g / loo_t[:, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        share = dh / total
    return [Estimate(float(dh[k]), float(se[k]), float(share[k]), float(share_se[k])) for k in range(dh.size)]


def _quartiles(length: np.ndarray) -> np.ndarray:
    """Quartile 0..3 of each length by rank, ties together (module docstring)."""
    n = length.size
    shorter = np.searchsorted(np.sort(length), length, side="left")
    return np.minimum(4 * shorter // n, 3)


def _partitions(tags: UpdateTags) -> tuple[list[tuple[str, list[tuple[str, np.ndarray]]]], dict[str, str]]:
    """Each family's (label, mask) groups, non-empty ones only, and the reasons families are left out."""
    a, n = tags.advantage, len(tags)
    zero = np.abs(a) <= ZERO_ADVANTAGE_RTOL * (np.abs(a).max() if n else 0.0)
    fams: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    omitted: dict[str, str] = {}
    fams.append(("advantage_sign", [("positive advantage", (a > 0) & ~zero),
                                    ("negative advantage", (a < 0) & ~zero), ("zero advantage", zero)]))
    if tags.reward is None:
        omitted["reward"] = "rewards are unknown for this update batch"
    else:
        values = np.unique(tags.reward)
        if values.size != 2:
            omitted["reward"] = (f"the rewards take {values.size} distinct value{'s' * (values.size != 1)}; "
                                 "correct/incorrect needs exactly two")
        else:
            lo, hi = values
            fams.append(("reward", [(f"correct (reward {hi:g})", tags.reward == hi),
                                    (f"incorrect (reward {lo:g})", tags.reward == lo)]))
    fams.append(("truncation", [("truncated (no EOS)", tags.truncated), ("finished (EOS)", ~tags.truncated)]))
    q = _quartiles(tags.length)
    quart = []
    for k in range(4):
        m = q == k
        if m.any():
            lo_l, hi_l = int(tags.length[m].min()), int(tags.length[m].max())
            span = f"{lo_l}" if lo_l == hi_l else f"{lo_l}–{hi_l}"
            quart.append((f"Q{k + 1}: {span} tokens", m))
    fams.append(("length_quartile", quart))
    fams.append(("prompt_group", [(f"group {int(g)}", tags.group == g) for g in np.unique(tags.group)]))

    kept = []
    for name, groups in fams:
        groups = [(lab, m) for lab, m in groups if m.any()]
        if len(groups) >= 2:
            kept.append((name, groups))
        elif name not in omitted:
            omitted[name] = _why_single(name, groups[0][0] if groups else "", tags)
    return kept, omitted


def _why_single(name: str, label: str, tags: UpdateTags) -> str:
    if name == "truncation":
        return "every response was truncated (no EOS)" if tags.truncated.all() else (
            "every response ended with EOS (none was truncated)")
    if name == "length_quartile":
        return f"every response has the same length ({int(tags.length[0])} tokens)"
    if name == "prompt_group":
        return "every update sequence answers the same prompt"
    return f"every update sequence is in one group ({label}): nothing to compare"


def attribute(true: Contributions, first_order: Contributions, tags: UpdateTags) -> Attribution:
    """Group sums, shares and jackknife standard errors of the per-sequence contributions, per tag
    family (module docstring), for the true and the first-order contributions."""
    n = len(tags)
    for what, c in (("true", true), ("first_order", first_order)):
        if c.delta_h.shape != (n,):
            raise ArgumentError(f"{what}.delta_h has {c.delta_h.shape[0]} entries for {n} tagged update "
                                "sequences: pass one contribution per update sequence")
    kept, omitted = _partitions(tags)
    masks = [m for _, groups in kept for _, m in groups] + [np.ones(n, dtype=bool)]
    member = np.stack(masks, axis=1).astype(np.float64)  # [N_U, groups + all of U]
    est_t, est_f = _estimates(true, member), _estimates(first_order, member)

    def group(k: int, label: str, rows: np.ndarray) -> Group:
        return Group(label, int(rows.size), [int(i) for i in rows], est_t[k], est_f[k])

    families, k = [], 0
    for name, groups in kept:
        out = []
        for label, m in groups:
            out.append(group(k, label, np.flatnonzero(m)))
            k += 1
        families.append(Family(name, out))
    update = group(k, "update batch (all sequences)", np.arange(n))
    baseline = group(k + 1, "baseline (momentum + weight decay)", np.arange(0))
    total = group(k + 2, "total (update batch + baseline)", np.arange(n))
    se_t = jackknife_se(true.loo) if true.loo is not None else np.full(n, np.nan)
    se_f = jackknife_se(first_order.loo) if first_order.loo is not None else np.full(n, np.nan)
    return Attribution(
        families=families,
        omitted={f: omitted[f] for f in FAMILIES if f in omitted},
        update=update,
        baseline=baseline,
        total=total,
        delta_h=true.delta_h,
        delta_h_se=se_t,
        delta_h1=first_order.delta_h,
        delta_h1_se=se_f,
        rank_true=_ranked(true.delta_h),
        rank_first_order=_ranked(first_order.delta_h),
    )


def _ranked(d: np.ndarray) -> list[int]:
    """Rows by value, largest first (NaN last; ties in row order)."""
    key = np.where(np.isnan(d), -np.inf, d)
    return [int(i) for i in np.argsort(-key, kind="stable")]
