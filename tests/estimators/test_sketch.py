"""The projected kernel's math on synthetic gradients: unbiased, exact once the subspace spans U, with
the variance CountSketch theory predicts, and fidelity metrics equal to their textbook definitions.

Synthetic rows imitate preconditioned LoRA gradients: ``P = 600`` coordinates in three blocks, columns
scaled by log-normal factors (a preconditioner's dynamic range), U drawn near a 3-dimensional
subspace plus noise (few directions dominate, as measured on the toy). Every statistical check draws
``S`` seeded sketches (deterministic) and states its tolerance from the number of draws.
"""

from __future__ import annotations

import math

import pytest
import torch

from deltaH.estimators._sketch import (
    count_sketch,
    features,
    fidelity,
    pearson,
    range_basis,
    ranks,
    sketch_kernel,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = [200, 250, 150]
S = 400  # sketches per statistical check


def _rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = sum(SIZES)
    scale = torch.exp(torch.randn(p, generator=g, dtype=torch.float64))
    basis = torch.randn(3, p, generator=g, dtype=torch.float64)
    x_u = torch.randn(6, 3, generator=g, dtype=torch.float64) @ basis + 0.3 * torch.randn(
        6, p, generator=g, dtype=torch.float64
    )
    x_e = torch.randn(20, 3, generator=g, dtype=torch.float64) @ basis + torch.randn(
        20, p, generator=g, dtype=torch.float64
    )
    return x_e * scale, x_u * scale


def _cs_variance(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Exact variance of CountSketch inner products ``[n_a, n_b]`` (coordinates hashed independently):
    ``(‖a‖²‖b‖² + ⟨a, b⟩² − 2 Σ_α a_α² b_α²) / k``."""
    return ((a**2).sum(1)[:, None] * (b**2).sum(1)[None] + (a @ b.T) ** 2 - 2 * (a**2) @ (b**2).T) / k


@pytest.mark.parametrize("subspace", [0, 2])
def test_projection_is_unbiased(subspace: int) -> None:
    """Mean of S sketches − K, in units of its standard error: every entry |z| < 4.5 (120 entries; a
    normal |z| exceeds 4.5 with probability 7e-6, so 1e-3 for the family)."""
    x_e, x_u = _rows()
    exact = x_e @ x_u.T
    est = torch.stack(
        [sketch_kernel(x_e, x_u, SIZES, proj_dim=64, subspace=subspace, seed=s) for s in range(S)]
    )
    se = est.std(0) / math.sqrt(S)
    assert float(se.min()) > 0  # a real sketch, not an exact result in disguise
    z = (est.mean(0) - exact) / se
    assert float(z.abs().max()) < 4.5


def test_subspace_spanning_the_update_rows_is_exact() -> None:
    """ℓ ≥ N_U: the basis spans U, its residual is zero, and K̂ = K up to float64 round-off
    (QR and two products: ~1e-15 relative of the largest entry, bound 1e-12)."""
    x_e, x_u = _rows()
    exact = x_e @ x_u.T
    for ell in (6, 50):
        got = sketch_kernel(x_e, x_u, SIZES, proj_dim=8, subspace=ell, seed=1)
        torch.testing.assert_close(got, exact, rtol=0, atol=1e-12 * float(exact.abs().max()))


@pytest.mark.parametrize("subspace", [0, 2])
def test_variance_is_the_count_sketch_variance_of_the_residual(subspace: int) -> None:
    """Mean squared error over S sketches = the CountSketch variance of the residuals outside the
    seed's basis, averaged over seeds (for subspace = 0: of the rows themselves). Summed over all
    120 entries the ratio's sampling error is a few percent; tolerance 15 %."""
    x_e, x_u = _rows()
    exact = x_e @ x_u.T
    k = 64
    se2, pred = torch.zeros_like(exact), torch.zeros_like(exact)
    for s in range(S):
        se2 += (sketch_kernel(x_e, x_u, SIZES, proj_dim=k, subspace=subspace, seed=s) - exact) ** 2
        q = range_basis([(0, x_u)], x_u.shape[0], subspace, s) if subspace else None
        r_e = x_e if q is None else x_e - (x_e @ q) @ q.T
        r_u = x_u if q is None else x_u - (x_u @ q) @ q.T
        pred += _cs_variance(r_e, r_u, k)
    assert float(se2.sum() / pred.sum()) == pytest.approx(1.0, abs=0.15)


def test_error_falls_like_one_over_root_k_and_the_subspace_removes_most_of_it() -> None:
    x_e, x_u = _rows()
    exact = x_e @ x_u.T

    def mse(k: int, ell: int) -> float:
        return (
            sum(
                float(
                    ((sketch_kernel(x_e, x_u, SIZES, proj_dim=k, subspace=ell, seed=s) - exact) ** 2).mean()
                )
                for s in range(100)
            )
            / 100
        )

    # Variance ∝ 1/k: 4× the buckets, 1/4 of the MSE (100 draws each: ~15 % sampling error per MSE).
    assert mse(16, 0) / mse(64, 0) == pytest.approx(4.0, rel=0.35)
    # U lies near a 3-dim subspace (noise 0.3 of its scale): keeping 3 directions leaves the sketch
    # ~0.3² of U's energy, so the MSE drops by about 10× (bound: 3×).
    assert mse(64, 3) < mse(64, 0) / 3


def test_features_split_each_row_into_basis_and_residual() -> None:
    x_e, x_u = _rows()
    q = range_basis([(0, x_u[:4]), (4, x_u[4:])], 6, 3, seed=0)  # chunks sum to one basis
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-12)
    q1 = range_basis([(0, x_u)], 6, 3, seed=0)
    torch.testing.assert_close(q @ q.T, q1 @ q1.T, rtol=0, atol=1e-12)
    f, sk = features(x_e, q, SIZES, 32, seed=2)
    torch.testing.assert_close(f, x_e @ q)
    torch.testing.assert_close(sk, count_sketch(x_e - f @ q.T, SIZES, 32, seed=2))
    # The sketch is linear, seeded, and hashes each coordinate to one bucket with a sign.
    one = torch.zeros(1, sum(SIZES), dtype=torch.float64)
    one[0, 317] = 2.5
    out = count_sketch(one, SIZES, 32, seed=2)
    assert int((out != 0).sum()) == 1 and float(out.abs().sum()) == 2.5
    assert torch.equal(count_sketch(x_e, SIZES, 32, seed=2), count_sketch(x_e, SIZES, 32, seed=2))


def test_fidelity_metrics_match_their_definitions() -> None:
    g = torch.Generator().manual_seed(4)
    exact = torch.randn(30, 4, generator=g, dtype=torch.float64)
    approx = exact + 0.3 * torch.randn(30, 4, generator=g, dtype=torch.float64)
    f = fidelity(approx, exact)
    n = exact.numel()
    d = (ranks(approx) - ranks(exact)).double()
    assert f.spearman == pytest.approx(1 - 6 * float((d**2).sum()) / (n * (n**2 - 1)), rel=1e-12)  # no ties
    a, e = approx.flatten(), exact.flatten()
    cov = float(((a - a.mean()) * (e - e.mean())).mean())
    assert f.pearson == pytest.approx(cov / float(a.std(unbiased=False) * e.std(unbiased=False)), rel=1e-12)
    assert f.rel_error == pytest.approx(float((approx - exact).norm() / exact.norm()), rel=1e-12)
    cs = float((approx.sum(0) - exact.sum(0)).norm() / exact.sum(0).norm())
    assert f.col_sum_rel_error == pytest.approx(cs, rel=1e-12)
    assert (f.n_pairs, f.n_columns) == (120, 4)
    assert ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]  # ties share
    assert math.isnan(pearson(torch.ones(5), torch.arange(5.0)))
