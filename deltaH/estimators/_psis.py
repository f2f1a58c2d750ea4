"""Pareto-smoothed importance sampling diagnostic ``k̂`` (Vehtari et al., JMLR 2024).

A generalized Pareto distribution is fitted (Zhang & Stephens 2009, with the weakly informative
prior on ``k`` used by arviz/loo) to the ``M = ceil(min(S/5, 3√S))`` largest importance weights
above the ``(M+1)``-th largest. ``k̂ > min(1 − 1/log10 S, 0.7)`` means the importance-sampling
estimate is unreliable; ``k̂ > 1`` means the weights' mean does not exist.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def tail_size(n: int) -> int:
    """``M``: how many of the largest weights the Pareto fit uses for ``n`` samples."""
    return int(math.ceil(min(0.2 * n, 3 * math.sqrt(n))))


def khat_threshold(n: int) -> float:
    """Sample-size dependent reliability threshold ``min(1 − 1/log10 n, 0.7)``."""
    if n <= 1:
        return float("nan")
    return float(min(1 - 1 / math.log10(n), 0.7))


def _gpdfit(x: np.ndarray) -> float:
    """Posterior-mean shape ``k`` of a generalized Pareto fit to sorted positive exceedances ``x``."""
    n = x.shape[0]
    prior_bs, prior_k = 3.0, 10.0
    m_est = 30 + int(n**0.5)
    b = 1 - np.sqrt(m_est / (np.arange(1, m_est + 1, dtype=float) - 0.5))
    b /= prior_bs * x[int(n / 4 + 0.5) - 1]
    b += 1 / x[-1]
    k = np.log1p(-b[:, None] * x).mean(axis=1)
    len_scale = n * (np.log(-(b / k)) - k - 1)
    w = 1 / np.exp(len_scale - len_scale[:, None]).sum(axis=1)
    keep = w >= 10 * np.finfo(float).eps
    w, b = w[keep], b[keep]
    w /= w.sum()
    b_post = float(np.sum(b * w))
    k_post = float(np.log1p(-b_post * x).mean())
    return (n * k_post + prior_k * 0.5) / (n + prior_k)


def psis_khat(logw_top: Tensor, n: int) -> Tensor:
    """``k̂`` per row of ``logw_top [K, m]``.

    ``logw_top`` holds, in any order, at least the ``tail_size(n) + 1`` largest log-weights of
    each row (all of them is fine; ``n`` is the total sample count). ``-inf`` entries are zero
    weights. Returns ``[K]`` float64; NaN where the fit is undefined (equal weights, too small a
    tail, fewer than 5 samples beyond the cutoff).
    """
    m = tail_size(n)
    out = torch.full((logw_top.shape[0],), float("nan"), dtype=torch.float64)
    lw_all = logw_top.detach().double().cpu().numpy()
    tiny = math.log(np.finfo(float).tiny)
    for i, lw in enumerate(lw_all):
        lw = np.sort(lw)[-(m + 1) :]
        if lw.shape[0] < m + 1 or not np.isfinite(lw[-1]):
            continue
        lw = lw - lw[-1]
        cutoff = max(lw[0], tiny)
        tail = lw[lw > cutoff]
        if tail.shape[0] <= 4:
            continue
        x = np.exp(tail) - math.exp(cutoff)
        x.sort()
        if not (x[-1] > 0):
            continue
        out[i] = _gpdfit(x)
    return out
