"""Token-level entropy rules (deltaH.estimators.proxies) against literal per-token transcriptions.

Each reference is the paper's or the reference code's formula written out for one token at a time
with Python floats (``math``), on hand-built logits: a confident row (p ≈ 1, STEER's upper clamp),
a target of probability below 1e-8 (its lower clamp), a ``−inf`` logit (``0·log 0``), padding.
The orientation of each rule (the sign of the entropy change it predicts) is checked against the
entropy of a softmax after the logit step the rule assumes, by finite differences.

Tolerances: float64 on both sides; the references sum in a different order, so they agree to a few
ulps of the largest term: ``REL`` = 1e-12 (observed ≤ 2e-15).
"""

from __future__ import annotations

import math

import pytest
import torch

from deltaH.estimators.proxies import (
    PROXIES,
    covariance_per_token,
    head_stats,
    proxy_predictions,
    sign_rule,
    steer_omega,
    wang_discriminator,
    wang_n,
)

TAU = 0.7
REL = 1e-12
NEG = float("-inf")


def _logits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits [3, 4, 5]``, ``targets [3, 4]``, ``mask [3, 4]``, ``adv [3]``."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 2
    z[0, 1] = torch.tensor([40.0, 0.0, 0.0, 0.0, 0.0])  # p(target 0) ≈ 1: STEER's 1 − 1e-8 clamp
    z[1, 0] = torch.tensor([0.0, -30.0, 0.0, 0.0, 0.0])  # p(target 1) < 1e-8: its 1e-8 clamp
    z[2, 2, 4] = NEG  # a token outside the support: 0·log 0 = 0
    y = torch.tensor([[2, 0, 1, 3], [1, 4, 0, 2], [3, 1, 0, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([0.7, -1.3, 0.2], dtype=torch.float64)
    return z, y, mask, adv


def ref_token(z: list[float], y: int) -> dict[str, float]:
    """p = softmax(z/τ) of one token, and log p(y), H, Σp², Σp² log p, written out."""
    zs = [v / TAU for v in z]
    zmax = max(zs)
    ex = [math.exp(v - zmax) for v in zs]
    tot = sum(ex)
    p = [e / tot for e in ex]
    logp = [math.log(q) if q > 0 else NEG for q in p]
    return {
        "logp": logp[y],
        "entropy": -sum(q * lq for q, lq in zip(p, logp, strict=True) if q > 0),
        "sum_p2": sum(q * q for q in p),
        "sum_p2_logp": sum(q * q * lq for q, lq in zip(p, logp, strict=True) if q > 0),
    }


def _refs() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    z, y, mask, adv = _logits()
    out = {k: torch.zeros(3, 4, dtype=torch.float64) for k in ("logp", "entropy", "sum_p2", "sum_p2_logp")}
    for i in range(3):
        for k in range(4):
            for key, v in ref_token(z[i, k].tolist(), int(y[i, k])).items():
                out[key][i, k] = v
    return out, mask, adv


def _close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> None:
    scale = float(want[mask].abs().max())
    torch.testing.assert_close(got[mask], want[mask], rtol=0, atol=REL * max(scale, 1e-300))
    assert bool((got[~mask] == 0).all())


def test_head_stats_match_the_written_out_softmax() -> None:
    z, y, mask, _ = _logits()
    ref, _, _ = _refs()
    got = dict(zip(("logp", "entropy", "sum_p2", "sum_p2_logp"), head_stats(z, y, TAU), strict=True))
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=0, atol=REL * float(ref[key].abs().max()))


def test_covariance_per_token_is_clip_cov_kl_cov_term() -> None:
    ref, mask, adv = _refs()
    toks = [(i, k) for i in range(3) for k in range(4) if mask[i, k]]
    lp_bar = sum(float(ref["logp"][i, k]) for i, k in toks) / len(toks)
    a_bar = sum(float(adv[i]) for i, _ in toks) / len(toks)  # the per-token advantage, A of its sequence
    want = torch.zeros(3, 4, dtype=torch.float64)
    for i, k in toks:
        want[i, k] = (float(adv[i]) - a_bar) * (float(ref["logp"][i, k]) - lp_bar)
    _close(covariance_per_token(ref["logp"], adv, mask), want, mask)
    # its token mean is covariance_proxy's Cov (the same rule, one number)
    assert math.isclose(float(covariance_per_token(ref["logp"], adv, mask)[mask].mean()),
                        float(want[mask].mean()), rel_tol=1e-12)


def steer_reference(logp: float, entropy: float, adv: float, old_logp: float) -> float:
    """``compute_token_weights`` of zz-haooo/STEER, before ``abs``, for one token."""
    x = min(max(math.exp(logp), 1e-8), 1.0 - 1e-8)
    f = x * (1 - x) * (math.log(x) + entropy)
    old = min(max(math.exp(old_logp), 1e-8), 1.0)
    metric = adv / old * f
    return metric if math.isfinite(metric) else 0.0


def test_steer_omega_with_its_clamps_and_non_finite_rule() -> None:
    ref, mask, adv = _refs()
    ent = ref["entropy"].clone()
    ent[2, 1] = float("nan")  # a NaN entropy: STEER sets the metric to 0
    old = ref["logp"] + torch.linspace(-0.5, 0.5, 12, dtype=torch.float64).reshape(3, 4)
    old[1, 1] = -40.0  # π_old below 1e-8: clamped
    for old_lp in (None, old):
        want = torch.zeros(3, 4, dtype=torch.float64)
        for i in range(3):
            for k in range(4):
                o = float(ref["logp"][i, k] if old_lp is None else old_lp[i, k])
                if mask[i, k]:
                    want[i, k] = steer_reference(float(ref["logp"][i, k]), float(ent[i, k]), float(adv[i]), o)
        got = steer_omega(ref["logp"], ent, adv, mask, old_logp=old_lp)
        _close(got, want, mask)
        assert got[2, 1] == 0.0
    # the clamps matter on these tokens: without them Ω would differ
    p0 = math.exp(float(ref["logp"][0, 1]))
    assert p0 > 1 - 1e-8 and float(steer_omega(ref["logp"], ent, adv, mask)[0, 1]) != 0.0
    assert math.exp(float(ref["logp"][1, 0])) < 1e-8


def test_wang_discriminator_and_baseline_as_trinity_computes_them() -> None:
    ref, mask, adv = _refs()
    s_want = torch.zeros(3, 4, dtype=torch.float64)
    xd_want = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for k in range(4):
            if not mask[i, k]:
                continue
            lp, h = float(ref["logp"][i, k]), float(ref["entropy"][i, k])
            s = math.exp(lp) * (h + lp)  # clipb/clipv: S = p * (H + LP)
            n = h * float(ref["sum_p2"][i, k]) + float(ref["sum_p2_logp"][i, k])  # compute_N_from_logits
            s_want[i, k], xd_want[i, k] = s, n - s  # clipv: xD = N - S
    n = wang_n(ref["entropy"], ref["sum_p2"], ref["sum_p2_logp"])
    _close(wang_discriminator(ref["logp"], ref["entropy"], mask), s_want, mask)
    _close(wang_discriminator(ref["logp"], ref["entropy"], mask, n), xd_want, mask)


def test_sign_rule_and_predictions_table() -> None:
    ref, mask, adv = _refs()
    want = torch.zeros(3, 4, dtype=torch.float64)
    for i in range(3):
        for k in range(4):
            if mask[i, k]:
                want[i, k] = -float(adv[i]) * (float(ref["logp"][i, k]) + float(ref["entropy"][i, k]))
    _close(sign_rule(ref["logp"], ref["entropy"], adv, mask), want, mask)
    pred = proxy_predictions({**ref, "mask": mask}, adv)
    assert list(pred) == [p.name for p in PROXIES]
    for tensor in pred.values():
        assert tensor.shape == (3, 4) and bool((tensor[~mask] == 0).all())


# -------------------------------------------------------------------------------- orientation
def _entropy(z: torch.Tensor) -> float:
    lp = torch.log_softmax(z, -1)
    return float(-(lp.exp() * lp).sum())


@pytest.mark.parametrize("seed", range(6))
def test_orientation_matches_the_logit_step_each_rule_assumes(seed: int) -> None:
    """Each rule's predicted sign is that of the entropy change after its own logit step
    (central finite differences, h = 1e-5; the O(h²) error is far below the values tested)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(7, generator=g, dtype=torch.float64) * 1.5
    y = int(torch.randint(0, 7, (1,), generator=g))
    a = float(torch.randn(1, generator=g, dtype=torch.float64))
    p = torch.softmax(z, -1)
    names = ("logp", "entropy", "sum_p2", "sum_p2_logp")
    values = head_stats(z.unsqueeze(0), torch.tensor([y]), 1.0)
    stats = {k: v.reshape(1, 1) for k, v in zip(names, values, strict=True)}
    pred = {k: float(v) for k, v in proxy_predictions({**stats, "mask": torch.ones(1, 1, dtype=torch.bool)},
                                                      torch.tensor([a])).items()}
    e_y = torch.nn.functional.one_hot(torch.tensor(y), 7).double()
    h = 1e-5

    def dh(step: torch.Tensor) -> float:
        return (_entropy(z + h * step) - _entropy(z - h * step)) / (2 * h)

    # Wang Thm 3.2 and the sign rule: the sampled logit alone moves by ε ∝ A
    d1 = dh(a * e_y)
    assert math.isclose(d1, pred["wang_s"], rel_tol=1e-6, abs_tol=1e-9)  # ΔH = −ε·S*
    assert math.copysign(1, d1) == math.copysign(1, pred["sign_rule"])
    # Wang Thm 3.3: a policy-gradient step on a softmax, δz = ε·A·(e_y − p)
    assert math.isclose(dh(a * (e_y - p)), pred["wang_xd"], rel_tol=1e-6, abs_tol=1e-9)  # = ε·A·(N − S*)
    # STEER: the sampled logit moves along ∂(ratio·A)/∂z_y = (A/π_old)·π(1−π) (on-policy: π_old = π)
    py = float(p[y])
    assert math.copysign(1, dh(a * (1 - py) * e_y)) == math.copysign(1, pred["steer"])
