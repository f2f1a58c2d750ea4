"""Published token-level rules that predict a policy-gradient step's entropy change
(docs/math.md#token-level-proxies).

Every rule reads only the update batch U at θ: per scored token ``(i, k)`` the trainer's
``p = softmax(z/τ)`` (temperature ``τ``, no top-p) through ``log p(y)``, ``H = −Σ_v p_v log p_v``,
``Σ_v p_v²`` and ``Σ_v p_v² log p_v`` (:func:`head_stats`), and the sequence's advantage ``A_i``.
Each function returns the rule's own quantity ``[M, T]`` (0 outside ``mask``), as its source
writes it; :data:`PROXIES` orients each one as a prediction of the token's entropy change ΔH (up to a
positive factor: its sign is the predicted sign, larger means "raises the entropy more"), which is
what :mod:`deltaH.scoreboard` compares with the exact token influence
(:mod:`deltaH.estimators.token_influence`).

Not implemented: "entropy polarity" (Zhang et al., arXiv 2605.11775). Its abstract describes a signed
first-order token quantity made of a sampled-token contribution and a state-wise distributional
correction, but no formula or code is public, so it cannot be transcribed faithfully.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH.policy import compute_dtype

__all__ = [
    "PROXIES",
    "Proxy",
    "covariance_per_token",
    "head_stats",
    "proxy_predictions",
    "sign_rule",
    "steer_omega",
    "wang_discriminator",
    "wang_n",
]


def head_stats(logits: Tensor, targets: Tensor, temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``log p(y)``, ``H``, ``Σ_v p_v²`` and ``Σ_v p_v² log p_v`` of ``p = softmax(logits/τ)``.

    ``logits [..., V]``, ``targets [...]``; results shaped like ``targets`` in the compute dtype
    (float64 for float64 logits, else float32). ``0 · log 0`` counts as 0 (a ``−inf`` logit).
    """
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    lp = torch.log_softmax(z, dim=-1)
    p = lp.exp()
    plp = torch.where(p > 0, lp, torch.zeros_like(lp))
    p2 = p * p
    logp_y = lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp_y, -(p * plp).sum(-1), p2.sum(-1), (p2 * plp).sum(-1)


def _adv(adv: Tensor, like: Tensor) -> Tensor:
    """Per-sequence ``[M]`` or per-token ``[M, T]`` advantages as ``[M, T]``."""
    a = adv.to(like.device, like.dtype)
    return a.unsqueeze(1).expand_as(like) if a.dim() == 1 else a


def covariance_per_token(logp: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """Cui et al. (2025, arXiv 2505.22617), the per-token term of the covariance rule::

        cov_t = (log π(y_t) − mean log π) · (A_t − mean A)          means over the scored tokens of U

    as Clip-Cov / KL-Cov compute it (verl ``core_algos.compute_policy_loss_kl_cov``: ``(adv −
    adv.mean()) · (logp − logp.mean())`` over the valid tokens; both select the tokens of largest
    ``cov_t``). Its mean over tokens is :func:`deltaH.estimators.influence.covariance_proxy`'s ``Cov``;
    the rule predicts ``ΔH ≈ −η · Cov``, so a token's predicted change is ``−cov_t``.
    """
    m = mask.bool()
    a = _adv(adv, logp)
    lp_bar, a_bar = logp[m].mean(), a[m].mean()
    return torch.where(m, (logp - lp_bar) * (a - a_bar), torch.zeros_like(logp))


def steer_omega(
    logp: Tensor, entropy: Tensor, adv: Tensor, mask: Tensor, old_logp: Tensor | None = None
) -> Tensor:
    """STEER's Ω (Hao et al., arXiv 2510.10150; zz-haooo/STEER ``verl/trainer/ppo/core_algos.py::
    compute_token_weights``), literally::

        π     = clamp(exp(log π), 1e-8, 1 − 1e-8)
        π_old = clamp(exp(log π_old), 1e-8, 1)
        Ω     = (A / π_old) · π(1 − π) · (log π + H)          non-finite Ω set to 0

    ``old_logp`` defaults to ``logp`` (on-policy: the step is taken at the checkpoint). STEER reweights
    tokens by ``|Ω|``; the entropy change it estimates has the sign of ``−Ω`` (rewarding a token more
    likely than ``e^{−H}`` lowers the entropy).
    """
    x = logp.exp().clamp(min=1e-8, max=1.0 - 1e-8)
    f = x * (1 - x) * (torch.log(x) + entropy)
    old = (logp if old_logp is None else old_logp).exp().clamp(min=1e-8, max=1.0)
    omega = _adv(adv, logp) / old * f
    omega = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))
    return torch.where(mask.bool(), omega, torch.zeros_like(omega))


def wang_n(entropy: Tensor, sum_p2: Tensor, sum_p2_logp: Tensor) -> Tensor:
    """Wang et al.'s baseline ``N = H·Σ_v p_v² + Σ_v p_v² log p_v = E_{v∼p}[S*_v]`` (arXiv 2602.03392;
    Trinity-RFT ``examples/entropy/clipv_dp_actor.py::compute_N_from_logits``)."""
    return entropy * sum_p2 + sum_p2_logp


def wang_discriminator(logp: Tensor, entropy: Tensor, mask: Tensor, n: Tensor | None = None) -> Tensor:
    """Wang et al.'s entropy discriminator (arXiv 2602.03392; Trinity-RFT ``clipb_advantage.py``,
    ``clipv_advantage.py``)::

        S* = p(y) · (H + log p(y))             (clip_b's signal; Theorem 3.2: ΔH = −ε·S* for a logit step ε)
        xD = N − S*                            (with n = N given: clip_v's signal)

    Under a policy-gradient step the sampled logit moves by ``ε ∝ A``, so a token's predicted change is
    ``−A·S*``; with the whole distribution's response (Theorem 3.3) it is ``−A·(S* − N) = A·xD``.
    """
    s = logp.exp() * (entropy + logp)
    out = s if n is None else n - s
    return torch.where(mask.bool(), out, torch.zeros_like(out))


def sign_rule(logp: Tensor, entropy: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """The plain sign rule ``−A · (log π(y) + H)``: reinforcing a token more likely than ``e^{−H}``
    (or penalising a less likely one) lowers the entropy. Already a predicted change."""
    out = -_adv(adv, logp) * (logp + entropy)
    return torch.where(mask.bool(), out, torch.zeros_like(out))


@dataclass(frozen=True)
class Proxy:
    """A rule: ``name``, its source in words, and ``predict(stats, adv)``: its predicted per-token
    entropy change ``[M, T]`` (oriented, up to a positive factor) from the per-token statistics."""

    name: str
    label: str
    source: str
    predict: Callable[[Mapping[str, Tensor], Tensor], Tensor]


def _cov(s: Mapping[str, Tensor], a: Tensor) -> Tensor:
    return -covariance_per_token(s["logp"], a, s["mask"])


def _steer(s: Mapping[str, Tensor], a: Tensor) -> Tensor:
    return -steer_omega(s["logp"], s["entropy"], a, s["mask"])


def _wang_s(s: Mapping[str, Tensor], a: Tensor) -> Tensor:
    return -_adv(a, s["logp"]) * wang_discriminator(s["logp"], s["entropy"], s["mask"])


def _wang_xd(s: Mapping[str, Tensor], a: Tensor) -> Tensor:
    n = wang_n(s["entropy"], s["sum_p2"], s["sum_p2_logp"])
    return _adv(a, s["logp"]) * wang_discriminator(s["logp"], s["entropy"], s["mask"], n)


def _sign(s: Mapping[str, Tensor], a: Tensor) -> Tensor:
    return sign_rule(s["logp"], s["entropy"], a, s["mask"])


PROXIES: tuple[Proxy, ...] = (
    Proxy("covariance", "covariance −cov_t", "Cui et al. 2025 (Clip-Cov / KL-Cov)", _cov),
    Proxy("steer", "STEER −Ω", "Hao et al., arXiv 2510.10150", _steer),
    Proxy("wang_s", "Wang −A·S*", "Wang et al., arXiv 2602.03392 (clip_b)", _wang_s),
    Proxy("wang_xd", "Wang A·(N − S*)", "Wang et al., arXiv 2602.03392 (clip_v)", _wang_xd),
    Proxy("sign_rule", "sign rule −A·(log π + H)", "the first-order sign rule", _sign),
)


def proxy_predictions(stats: Mapping[str, Tensor], adv: Tensor) -> dict[str, Tensor]:
    """Every rule of :data:`PROXIES` on the same tokens: ``{name: [M, T]}`` float64.

    ``stats``: ``logp, entropy, sum_p2, sum_p2_logp, mask`` ``[M, T]`` (e.g. the fields of a
    :class:`~deltaH.estimators.token_influence.TokenInfluence`); ``adv``: ``[M]`` or ``[M, T]``.
    """
    s = {k: (v if k == "mask" else v.double()) for k, v in stats.items()}
    return {p.name: p.predict(s, adv.double()) for p in PROXIES}
