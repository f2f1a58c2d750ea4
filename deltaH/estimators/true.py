"""True ΔH by self-normalised importance sampling (docs/math.md#true-entropy-change-snis).

The evaluation batch ``E`` (N sequences) was sampled from ``q_θ``. For directions ``v_k`` and a
step ``η``, with ``θ'_k = θ + η·v_k`` and per-sequence statistics from :mod:`deltaH.stats`::

    logw[k, n]  = logq_n(θ'_k) − logq_n(θ)                          [K, N]
    w̃[k, n]    = softmax_n(logw[k])                                [K, N]
    H_orig      = mean_n e_n(θ)                                     []
    H_upd[k]    = Σ_n w̃[k, n] · e_n(θ'_k)                          [K]
    ΔH[k]       = H_upd[k] − H_orig = Σ_n c[k, n]
    c[k, n]     = w̃[k, n] · e_n(θ'_k) − e_n(θ) / N                 [K, N]
    loo[k, n]   = ΔH[k] recomputed without sequence n                [K, N]  (jackknife input)
    ESS[k]      = 1 / Σ_n w̃[k, n]²
    retained[k] = mean_n exp(logw[k, n])   (mass of q_θ' on q_θ's support; < 1 means top-p leaked)
    moved[k]    = (1/P) Σ_{n, t∈R_n} 1[S_t(θ'_k) ≠ S_t(θ)]          (nucleus_changed; P = Σ_n |R_n|)

``S_t`` is the kept set (nucleus) at scored position ``t``, compared as a set of token ids through
an order-free key (:meth:`SamplingPolicy.token_stats_keyed`): ``moved`` is the exact fraction of
E's scored positions where the step let a token enter or leave the nucleus (0 at ``p = 1``, where
nothing is computed for it, and at ``η = 0``). Such a move makes ``ΔH(η)`` jump, so the first-order
picture and the linear fits no longer apply at that η (``deltaH.analysis.trust_range`` uses it).

``e`` is the RB entropy (``entropy_mode="rb"``) or the surprisal ``−logq`` (``"naive"``).
Per-token variant: ``Σ_n e_n / Σ_n |R_n|`` before, ``Σ_n w̃ e'_n / Σ_n w̃ |R_n|`` after.
All sums are float64 and distributed-aware (each rank passes its shard; sums, maxima and the
PSIS tail are reduced globally). The θ-side statistics are computed once per call and reused
for every direction and every ``η``; a zero direction or ``η = 0`` reuses them exactly, so it
gives ΔH = 0 and ESS = N exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from deltaH import _dist, _trees
from deltaH._choices import ENTROPY_MODES as ENTROPY_MODES
from deltaH._warn import warn
from deltaH.batch import SequenceBatch
from deltaH.estimators._common import as_etas, check_options, validate_dirs
from deltaH.estimators._common import base_stats as base_stats
from deltaH.estimators._psis import khat_threshold, psis_khat, tail_size
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.stats import SequenceStats, chunks_of, share_mode, stats_of_chunks


@dataclass(frozen=True)
class TrueDeltaH:
    """Result of :func:`delta_h_true_multi`.

    Per-direction fields are ``[K]`` (``[n_eta, K]`` for an η sequence; no K axis from
    :func:`delta_h_true`); ``per_sequence`` adds a trailing ``N`` axis (this rank's sequences).
    """

    delta_h: Tensor
    h_upd: Tensor
    per_sequence: Tensor
    loo: Tensor
    ess: Tensor
    khat: Tensor
    logw_max: Tensor
    logw_min: Tensor
    retained_mass: Tensor
    nucleus_changed: Tensor
    delta_h_per_token: Tensor
    h_upd_per_token: Tensor
    h_orig: Tensor
    h_orig_per_token: Tensor
    eta: Tensor
    n_sequences: int
    khat_threshold: float


def snis(base: SequenceStats, logq1: Tensor, ent1: Tensor, entropy_mode: str = "rb") -> dict[str, Tensor]:
    """The SNIS estimate from θ-side stats ``base`` ([N]) and θ'-side ``logq1, ent1`` ([K, N]).

    ``ent1`` is the RB entropy at θ'; in naive mode the surprisal ``−logq1`` is used instead.
    Returns a dict of the per-direction fields of :class:`TrueDeltaH` (without η/θ-only fields).
    """
    lq0 = base.logq.double()
    e0 = base.e(entropy_mode).double()
    ntok = base.n_tokens.double()
    lq1 = logq1.double()
    e1 = SequenceStats.pick(ent1, -lq1, entropy_mode).double()
    n_total = _dist.count(lq0.shape[0], lq0.device)
    sum_e0 = _dist.sum_rows(e0, 0)
    sum_tok = _dist.sum_rows(ntok, 0)
    h_orig = sum_e0 / n_total
    h_orig_tok = sum_e0 / sum_tok

    logw = lq1 - lq0  # [K, N]; -inf where θ' leaves θ's nucleus
    lmax = _dist.all_max(logw.amax(dim=1))  # [K]
    lmin = _dist.all_min(logw.amin(dim=1))
    dead = torch.isneginf(lmax)
    shift = torch.where(dead, torch.zeros_like(lmax), lmax)
    u = torch.exp(logw - shift.unsqueeze(1))  # [K, N], max 1
    ue1 = torch.where(u > 0, u * e1, torch.zeros_like(u))  # 0·∞ = 0 (naive mode, dead sequences)
    s = _dist.sum_rows(u, 1)
    s2 = _dist.sum_rows(u * u, 1)
    s_ue1 = _dist.sum_rows(ue1, 1)
    s_utok = _dist.sum_rows(u * ntok, 1)
    # c_n = (u_n e'_n − (S/N) e_n) / S: exactly 0 when θ' = θ (u ≡ 1, S = N).
    per_seq = (ue1 - (s / n_total).unsqueeze(1) * e0) / s.unsqueeze(1)
    delta = _dist.sum_rows(per_seq, 1)
    # Leave sequence n out: Σu e'/Σu moves by u_n (Σu e'/Σu − e'_n)/(Σu − u_n) and mean e by
    # (e_n − H_orig)/(N − 1). Written as ΔH plus these changes, so the jackknife's differences of
    # leave-one-out values keep their digits.
    ratio = (s_ue1 / s).unsqueeze(1)
    loo = (delta.unsqueeze(1) + (u * ratio - ue1) / (s.unsqueeze(1) - u)
           - (h_orig - e0) / (n_total - 1))
    h_upd_tok = s_ue1 / s_utok
    out = {
        "delta_h": delta,
        "h_upd": h_orig + delta,
        "per_sequence": per_seq,
        "loo": loo,
        "ess": s * s / s2,
        "logw_max": lmax,
        "logw_min": lmin,
        "retained_mass": torch.exp(lmax + torch.log(s / n_total)),
        "delta_h_per_token": h_upd_tok - h_orig_tok,
        "h_upd_per_token": h_upd_tok,
        "h_orig": h_orig,
        "h_orig_per_token": h_orig_tok,
    }
    if bool(dead.any()):
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=lq0.device)
        for key in ("delta_h", "h_upd", "delta_h_per_token", "h_upd_per_token"):
            out[key] = torch.where(dead, nan, out[key])
        out["per_sequence"] = torch.where(dead.unsqueeze(1), nan, per_seq)
        out["loo"] = torch.where(dead.unsqueeze(1), nan, loo)
        out["ess"] = torch.where(dead, torch.zeros_like(out["ess"]), out["ess"])
        out["retained_mass"] = torch.where(dead, torch.zeros_like(lmax), out["retained_mass"])
        warn(
            f"{int(dead.sum())} direction(s) put zero weight on every evaluation sequence (every sequence "
            "left the top-p nucleus): ΔH is NaN there; use a smaller eta"
        )
    n_int = int(n_total)
    m = tail_size(n_int) + 1
    top = logw.topk(min(m, logw.shape[1]), dim=1).values
    out["khat"] = psis_khat(_dist.all_cat(top, dim=1), n_int).to(lq0.device)
    return out


def delta_h_true_multi(
    params: Mapping[str, Tensor],
    dirs: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    eta: float | Sequence[float] | Tensor = 1e-4,
    tf_batch_size: int = 16,
    dir_chunk: int = 8,
    entropy_mode: str = "rb",
    head_chunk: int | None = None,
    base: SequenceStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    share_prompts: str = "auto",
) -> TrueDeltaH:
    """True ΔH along K stacked directions ``dirs [K, ...]`` for one η or a sweep of η.

    See the module docstring for the formulas. ``dirs`` may cover a subset of the trainable
    parameters (missing names are zero). ``base`` (θ-side stats from :func:`base_stats`) may be
    passed to reuse it across calls; ``nucleus_changed`` is NaN under top-p when ``base`` carries
    no ``nucleus_key`` (built by hand rather than by :func:`base_stats`). ``on_progress(done, total)``,
    if given, is called after each chunk of directions with the (direction, η) pairs done out of
    ``K · n_eta`` (for a progress bar at the edge; it does not change the result).
    ``share_prompts`` (``auto | on | off``, :func:`deltaH.stats.share_mode`): run each chunk's
    repeated prompts once (the same result up to rounding).
    """
    check_options(entropy_mode, dir_chunk)
    etas, scalar = as_etas(eta)
    share = share_mode(lm, share_prompts)
    with torch.no_grad():
        return _delta_h_true_multi(
            params,
            dirs,
            batch,
            lm,
            policy,
            etas,
            scalar,
            tf_batch_size,
            dir_chunk,
            entropy_mode,
            head_chunk,
            base,
            on_progress,
            share,
        )


def _delta_h_true_multi(
    params: Mapping[str, Tensor],
    dirs: Mapping[str, Tensor],
    batch: SequenceBatch,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    etas: list[float],
    scalar: bool,
    tf_batch_size: int,
    dir_chunk: int,
    entropy_mode: str,
    head_chunk: int | None,
    base: SequenceStats | None,
    on_progress: Callable[[int, int], None] | None = None,
    share: str = "off",
) -> TrueDeltaH:
    lm.check_names(params)
    dirs = validate_dirs(lm, params, dirs)
    k_total = _trees.n_stacked(dirs)
    chunks = chunks_of(batch, tf_batch_size, share)
    if base is None:
        base = base_stats(lm, params, batch, policy, tf_batch_size, head_chunk, share)
    zero = _trees.is_zero(dirs)
    dev = base.logq.device
    topp = policy.top_p < 1.0
    n_pos = _dist.count(base.n_tokens.sum(), dev)
    # Without θ's keys (a hand-made ``base``) the moved fraction is unknown under top-p: NaN.
    unknown = topp and base.nucleus_key is None
    results = []
    for i, e in enumerate(etas):
        lq1 = base.logq.unsqueeze(0).repeat(k_total, 1)
        en1 = base.entropy.unsqueeze(0).repeat(k_total, 1)
        moved = torch.full((k_total,), float("nan") if unknown else 0.0, dtype=torch.float64, device=dev)
        for s in range(0, k_total, dir_chunk):
            idx = torch.arange(s, min(s + dir_chunk, k_total))
            idx = idx[~zero[idx]] if e != 0.0 else idx[:0]  # θ' = θ exactly: keep the θ-side values
            if idx.numel() > 0:
                shifted = {n: params[n] + e * d[idx.to(d.device)] for n, d in dirs.items()}
                # n_moved is None when there are no θ keys to compare with (p = 1, or a hand-made base)
                lq, en, n_moved = stats_of_chunks(
                    lm, params, shifted, chunks, policy, head_chunk, base_key=base.nucleus_key
                )
                lq1[idx.to(lq1.device)] = lq
                en1[idx.to(en1.device)] = en
                if n_moved is not None:
                    moved[idx.to(dev)] = n_moved.to(device=dev, dtype=torch.float64)
            if on_progress is not None:
                on_progress(i * k_total + min(s + dir_chunk, k_total), len(etas) * k_total)
        out = snis(base, lq1, en1, entropy_mode)
        if topp and not unknown:
            moved = _dist.all_sum(moved) / n_pos
        out["nucleus_changed"] = moved
        results.append(out)
    return _assemble(results, etas, scalar, base)


def _assemble(
    results: list[dict[str, Tensor]], etas: list[float], scalar: bool, base: SequenceStats
) -> TrueDeltaH:
    n_total = int(_dist.count(base.logq.shape[0], base.logq.device))
    per_dir = [
        f.name
        for f in fields(TrueDeltaH)
        if f.name not in ("h_orig", "h_orig_per_token", "eta", "n_sequences", "khat_threshold")
    ]
    if scalar:
        vals = {k: results[0][k] for k in per_dir}
    else:
        vals = {k: torch.stack([r[k] for r in results]) for k in per_dir}
    return TrueDeltaH(
        **vals,
        h_orig=results[0]["h_orig"],
        h_orig_per_token=results[0]["h_orig_per_token"],
        eta=torch.tensor(etas[0] if scalar else etas, dtype=torch.float64),
        n_sequences=n_total,
        khat_threshold=khat_threshold(n_total),
    )


def delta_h_true(
    params: Mapping[str, Tensor],
    direction: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    eta: float | Sequence[float] | Tensor = 1e-4,
    **kwargs: object,
) -> TrueDeltaH:
    """:func:`delta_h_true_multi` for one direction (a plain tree, no K axis in the result)."""
    res = delta_h_true_multi(
        params,
        {n: t.unsqueeze(0) for n, t in direction.items()},
        batch,
        lm=lm,
        policy=policy,
        eta=eta,
        **kwargs,  # type: ignore[arg-type]
    )
    squeeze = {
        f.name: getattr(res, f.name).select(-2 if f.name in ("per_sequence", "loo") else -1, 0)
        for f in fields(TrueDeltaH)
        if f.name not in ("h_orig", "h_orig_per_token", "eta", "n_sequences", "khat_threshold")
    }
    return TrueDeltaH(
        **squeeze,
        h_orig=res.h_orig,
        h_orig_per_token=res.h_orig_per_token,
        eta=res.eta,
        n_sequences=res.n_sequences,
        khat_threshold=res.khat_threshold,
    )
