"""Influence matrices and the covariance proxy (docs/math.md#influence-matrices,
docs/math.md#covariance-proxy).

Influence matrix at a reference step ``η`` along the per-sequence AdamW components ``ĉ_i``::

    M[n, i] = c_n(ĉ_i, η)          [N_E, N_U]     (true: SNIS per-sequence contribution)
    M₁[n, i] = η · c'_n(ĉ_i)       [N_E, N_U]     (first order)
    Σ_n M[n, i] = ΔH along ĉ_i
    L[n, i]  = ΔH along ĉ_i without evaluation sequence n   [N_E, N_U]   (leave-one-out, both kinds)

Covariance proxy (Cui et al. 2025) on the update batch U, over all response tokens ``t``::

    Cov = mean_t [(log π(y_t) − mean log π)(A_t − mean A)]     (A_t: its sequence's advantage)
    ΔH_token ≈ −η · Cov            (per-token entropy change; × mean response length per sequence)

Its per-token term is :func:`deltaH.estimators.proxies.covariance_per_token`, scored token by token
against the exact token influence (docs/math.md#proxy-scoreboard).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltaH._choices import INFLUENCE_KINDS as KINDS
from deltaH._choices import check_choice
from deltaH.batch import SequenceBatch, compact
from deltaH.errors import BatchError
from deltaH.estimators.first_order import delta_h_first_order
from deltaH.estimators.true import delta_h_true_multi
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, trainer_logprob
from deltaH.stats import share_mode


@dataclass(frozen=True)
class Influence:
    """``matrix [N_E, N_U]`` and ``column_delta_h [N_U]`` (ΔH or δH₁ along each component);
    ``loo [N_E, N_U]``: each column's estimate with evaluation sequence n left out, the jackknife's
    input (:mod:`deltaH.attribution`); None only in an ``Influence`` built by hand."""

    matrix: Tensor
    column_delta_h: Tensor
    eta: float
    kind: str
    loo: Tensor | None = None


def influence_matrix(
    params: Mapping[str, Tensor],
    components: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    eta: float,
    kind: str = "true",
    **kwargs: Any,
) -> Influence:
    """Per-(evaluation × update sequence) contributions along the components ``ĉ_i [N_U, ...]``.

    ``kwargs`` go to :func:`delta_h_true_multi` or :func:`delta_h_first_order` (``dir_chunk``,
    ``tf_batch_size``, ``base``, ``on_progress`` for a progress bar, ``share_prompts``, ...).
    """
    check_choice("kind", kind, KINDS)
    if kind == "true":
        res = delta_h_true_multi(params, components, batch, lm=lm, policy=policy, eta=float(eta), **kwargs)
        return Influence(res.per_sequence.T.contiguous(), res.delta_h, float(eta), kind,
                         res.loo.T.contiguous())
    fo = delta_h_first_order(
        params, components, batch, lm=lm, policy=policy, eta=float(eta), per_sequence=True, **kwargs
    )
    assert fo.per_sequence is not None
    loo = None if fo.loo is None else fo.loo.T.contiguous()
    return Influence(fo.per_sequence.T.contiguous(), fo.delta_h, float(eta), kind, loo)


@dataclass(frozen=True)
class CovarianceProxy:
    """Cui et al.'s covariance rule on U: ``cov`` and the predicted entropy change at ``eta``."""

    cov: float
    delta_h_per_token: float
    delta_h_per_sequence: float
    mean_response_tokens: float
    eta: float


def covariance_proxy(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    adv: Tensor,
    *,
    temperature: float = 1.0,
    eta: float,
    share_prompts: str = "auto",
) -> CovarianceProxy:
    """The covariance proxy (module docstring) on the update batch with advantages ``adv [N_U]``;
    ``share_prompts`` (:func:`deltaH.stats.share_mode`): U's repeated prompts run once."""
    if adv.shape != (len(batch),):
        raise BatchError(f"advantages must have shape [{len(batch)}], got {tuple(adv.shape)}")
    with torch.no_grad():
        c = compact(batch, share_mode(lm, share_prompts))
        h = lm.hidden(params, c)[c.rows, c.pred_pos]
        lp = trainer_logprob(lm.head(params, h), c.targets, temperature)
    lp = lp.double()
    a = adv.double().to(lp.device)[c.rows]
    cov = float(((lp - lp.mean()) * (a - a.mean())).mean())
    mean_len = float(batch.n_tokens.double().mean())
    return CovarianceProxy(
        cov=cov,
        delta_h_per_token=-float(eta) * cov,
        delta_h_per_sequence=-float(eta) * cov * mean_len,
        mean_response_tokens=mean_len,
        eta=float(eta),
    )
