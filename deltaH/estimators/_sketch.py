"""The projected kernel's pure math (docs/math.md#fisher-kernel): a subspace of the update side kept
exactly, a CountSketch of the rest, and the fidelity of an approximation against exact entries.

Rows are preconditioned gradients ``x = P^{1/2} ∘ g`` (flat, float64), so ``K = X_E X_Uᵀ``. With an
orthonormal basis ``Q [P, ℓ]`` and the CountSketch ``S`` (coordinate ``α`` to bucket ``h(α)`` with
sign ``s(α)``, ``k`` buckets)::

    K̂ = (X_E Q)(X_U Q)ᵀ + (R_E S)(R_U S)ᵀ          R = X (I − Q Qᵀ)      [N_E, N_U]

``E_S[S Sᵀ] = I`` and ``Q Qᵀ (I − Q Qᵀ) = 0``, so ``E_S[K̂] = X_E Q Qᵀ X_Uᵀ + X_E (I − Q Qᵀ) X_Uᵀ = K``
for any ``Q`` drawn independently of ``S``: the estimator is unbiased, and an entry's variance is at
most ``2‖r_e‖²‖r_u‖²/k`` — the sketch only sees what ``Q`` misses. ``Q`` spans ``ℓ`` random
combinations of the update rows (``Ω [N_U, ℓ]`` Gaussian; Halko, Martinsson & Tropp 2011, the
randomised range finder): it captures U's leading directions, and all of U once ``ℓ ≥ rank(X_U)``
(then ``R_U = 0`` and ``K̂ = K`` up to round-off). Sketching ``P^{1/2} g`` on both sides, rather
than ``P g`` against ``g``, keeps the norms in the variance those of the inner product being
estimated.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def count_sketch(x: Tensor, sizes: Sequence[int], k: int, seed: int) -> Tensor:
    """``x [n, P] → x S [n, k]`` (float64): coordinate ``α`` to bucket ``h(α)`` with sign ``s(α)``.

    ``h, s`` are drawn per block of ``sizes`` (the parameter tensors, in order) from ``seed``, so
    they are never stored whole and are the same for every call with the same ``seed``.
    """
    out = torch.zeros(x.shape[0], k, dtype=torch.float64, device=x.device)
    start = 0
    for j, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + j)
        bucket = torch.randint(0, k, (size,), generator=gen).to(x.device)
        sign = (torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1).to(x.device)
        out.index_add_(1, bucket, x[:, start : start + size].double() * sign)
        start += size
    return out


def range_basis(chunks: Iterable[tuple[int, Tensor]], n_rows: int, ell: int, seed: int) -> Tensor:
    """``Q [P, ℓ]`` with orthonormal columns spanning ``X_Uᵀ Ω`` (``Ω [n_rows, ℓ]`` standard normal
    from ``seed``), accumulated over ``chunks`` of ``(first row, X_U[rows] [n, P])``."""
    omega = torch.randn(n_rows, ell, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
    acc: Tensor | None = None
    for start, x in chunks:
        part = omega[start : start + x.shape[0]].to(x.device).T @ x.double()  # [ℓ, P]
        acc = part if acc is None else acc + part
    assert acc is not None, "range_basis needs at least one chunk"
    q, _ = torch.linalg.qr(acc.T)  # [P, ℓ]; spans the ℓ combinations even when they are dependent
    return q


def features(
    x: Tensor, basis: Tensor | None, sizes: Sequence[int], k: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``(x Q [n, ℓ], (x − x Q Qᵀ) S [n, k])`` of rows ``x [n, P]`` (``ℓ = 0`` without a basis)."""
    x = x.double()
    if basis is None:
        return x.new_zeros(x.shape[0], 0), count_sketch(x, sizes, k, seed)
    f = x @ basis
    return f, count_sketch(x - f @ basis.T, sizes, k, seed)


def sketch_kernel(
    x_e: Tensor, x_u: Tensor, sizes: Sequence[int], *, proj_dim: int, subspace: int, seed: int
) -> Tensor:
    """``K̂ [N_E, N_U]`` of in-memory rows (module docstring); the LM version,
    :func:`deltaH.estimators.kernel.projected_kernel`, streams the same steps over sequences."""
    ell = min(int(subspace), x_u.shape[0])
    basis = range_basis([(0, x_u)], x_u.shape[0], ell, seed) if ell > 0 else None
    f_e, s_e = features(x_e, basis, sizes, proj_dim, seed)
    f_u, s_u = features(x_u, basis, sizes, proj_dim, seed)
    return f_e @ f_u.T + s_e @ s_u.T


# ------------------------------------------------------------------------------------- fidelity
@dataclass(frozen=True)
class Fidelity:
    """An approximate kernel against exact entries on the same pairs.

    ``spearman`` and ``pearson``: rank and linear correlation over the pairs; ``rel_error``:
    ``‖K̂ − K‖_F / ‖K‖_F``; ``col_sum_rel_error``: the same for the column sums ``Σ_t K[t, i]``
    (what an update sequence does to the whole evaluation batch); ``n_pairs``, ``n_columns``.
    """

    spearman: float
    pearson: float
    rel_error: float
    col_sum_rel_error: float
    n_pairs: int
    n_columns: int


def ranks(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of a 1-D tensor, ties sharing their mean rank (float64)."""
    v = x.double().flatten()
    order = torch.argsort(v, stable=True)
    r = torch.empty_like(v)
    r[order] = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    uniq, inv = torch.unique(v, return_inverse=True)
    if uniq.numel() < v.numel():  # average the ranks within each tie
        sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, r)
        counts = torch.bincount(inv, minlength=uniq.numel()).double()
        r = (sums / counts)[inv]
    return r


def pearson(a: Tensor, b: Tensor) -> float:
    """Pearson correlation of two equally long tensors (NaN when either is constant)."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


def fidelity(approx: Tensor, exact: Tensor) -> Fidelity:
    """:class:`Fidelity` of ``approx`` against ``exact`` (both ``[n, m]``: n rows, m columns)."""
    a, e = approx.double(), exact.double()
    norm, col = float(e.norm()), e.sum(0)
    return Fidelity(
        spearman=pearson(ranks(a), ranks(e)),
        pearson=pearson(a, e),
        rel_error=float((a - e).norm()) / norm if norm > 0 else math.nan,
        col_sum_rel_error=float((a.sum(0) - col).norm() / col.norm()) if float(col.norm()) > 0 else math.nan,
        n_pairs=int(e.numel()),
        n_columns=int(e.shape[1]) if e.dim() == 2 else 1,
    )
