"""Cross Fisher kernel between evaluation and update sequences (docs/math.md#fisher-kernel).

::

    K[t, i] = Σ_α ∇_α logq(t) · P_α · ∇_α log π(t_i)          [N_E, N_U]

``logq`` is the sampling policy's log-probability of evaluation sequence ``t`` (temperature and
top-p, nucleus held fixed); ``log π`` the trainer's (temperature, no top-p) of update sequence
``t_i``; ``P = (1−β1)/D`` the AdamW preconditioner, applied **once**. Since the AdamW component
of update sequence ``i`` is ``ĉ_i = −clip·coef_i·P·∇log π(t_i)``, the first-order change of
``logq(t)`` along ``ĉ_i`` is ``−clip·coef_i·K[t, i]``.

``method="exact"`` streams over blocks of parameters (memory ``O((N_E + N_U)·block)``);
``method="projection"`` (:func:`projected_kernel`) streams over sequences and keeps, of every
preconditioned gradient ``x = P^{1/2}∘∇``, its coordinates in a ``subspace``-dimensional basis of
the update side's gradients and a CountSketch (``proj_dim`` buckets) of the rest: unbiased, exact
once the basis spans U (:mod:`deltaH.estimators._sketch`). Memory: ``subspace·P + (N_E + N_U)·
(subspace + proj_dim)`` floats for ``P`` trainable parameters, against ``(N_E + N_U)·P`` for the
exact kernel in one block. With ``check_columns`` it also computes the exact columns of that many
random update sequences and reports the projection's fidelity on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH._choices import KERNEL_METHODS as METHODS
from deltaH._choices import check_choice
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, BatchError
from deltaH.estimators._sketch import Fidelity, features, fidelity, range_basis
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.updates.grads import sequence_logprob_grads


def _blocks(params: Mapping[str, Tensor], names: Sequence[str], block_size: int) -> list[list[str]]:
    """Consecutive groups of parameter names with at most ``block_size`` elements (or one name)."""
    out: list[list[str]] = []
    cur: list[str] = []
    size = 0
    for n in names:
        k = params[n].numel()
        if cur and size + k > block_size:
            out.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += k
    if cur:
        out.append(cur)
    return out


def _flat(g: Mapping[str, Tensor], names: Sequence[str]) -> Tensor:
    return torch.cat([g[n].reshape(g[n].shape[0], -1).double() for n in names], dim=1)


def _names(params: Mapping[str, Tensor], precond: Mapping[str, Tensor]) -> list[str]:
    names = [n for n in params if n in precond]
    if not names:
        raise ArgumentError("precond has no entry for any trainable parameter: pass UpdateDirections.precond")
    return names


def fisher_kernel(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    eval_batch: SequenceBatch,
    update_batch: SequenceBatch,
    precond: Mapping[str, Tensor],
    *,
    policy: SamplingPolicy,
    temperature: float | None = None,
    method: str = "exact",
    block_size: int = 2**20,
    proj_dim: int = 768,
    subspace: int = 16,
    seed: int = 0,
    seq_chunk: int = 8,
) -> Tensor:
    """``K [N_E, N_U]`` float64 (module docstring). ``precond`` maps parameter names to ``P``.

    ``temperature`` of the update side defaults to the policy's. ``method="projection"`` returns
    :func:`projected_kernel`'s ``kernel`` (without its fidelity check).
    """
    check_choice("method", method, METHODS)
    names = _names(params, precond)
    tau = policy.temperature if temperature is None else float(temperature)
    if method == "projection":
        return projected_kernel(
            lm, params, eval_batch, update_batch, precond, policy=policy, temperature=tau,
            proj_dim=proj_dim, subspace=subspace, seed=seed, seq_chunk=seq_chunk,
        ).kernel
    kern = torch.zeros(len(eval_batch), len(update_batch), dtype=torch.float64)
    for block in _blocks(params, names, int(block_size)):
        g_e, _ = sequence_logprob_grads(
            lm, params, eval_batch, names=block, seq_chunk=seq_chunk, policy=policy
        )
        g_u, _ = sequence_logprob_grads(
            lm, params, update_batch, temperature=tau, names=block, seq_chunk=seq_chunk
        )
        p = torch.cat([precond[n].reshape(-1).double() for n in block]).to(g_e[block[0]].device)
        kern += ((_flat(g_e, block) * p) @ _flat(g_u, block).T).cpu()
    return kern


@dataclass(frozen=True)
class ProjectedKernel:
    """:func:`projected_kernel`'s result.

    ``kernel [N_E, N_U]`` float64; ``check_columns [m]`` (sorted update rows) and ``check_exact
    [N_E, m]``: the exact kernel columns of ``m`` random update sequences, and ``fidelity`` of the
    projection on those ``N_E·m`` pairs (all None when ``check_columns=0``); ``proj_dim`` and
    ``subspace`` as used (``subspace ≤ N_U``). Memory in floats (float64 elements): ``stored_floats``
    the projection keeps (basis and features), ``check_floats`` what the check adds (its update rows
    and exact columns), ``exact_floats`` the exact kernel's ``(N_E + N_U)·P`` in one block.
    """

    kernel: Tensor
    check_columns: Tensor | None
    check_exact: Tensor | None
    fidelity: Fidelity | None
    proj_dim: int
    subspace: int
    stored_floats: int
    check_floats: int
    exact_floats: int


def projected_kernel(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    eval_batch: SequenceBatch,
    update_batch: SequenceBatch,
    precond: Mapping[str, Tensor],
    *,
    policy: SamplingPolicy,
    temperature: float | None = None,
    proj_dim: int = 768,
    subspace: int = 16,
    seed: int = 0,
    seq_chunk: int = 8,
    check_columns: int = 0,
) -> ProjectedKernel:
    """``K̂ [N_E, N_U]`` by the subspace + CountSketch projection (module docstring).

    Two passes over U (the basis from ``subspace`` random combinations of its rows, then its
    features) and one over E, each in chunks of ``seq_chunk`` sequences. ``check_columns``: that
    many update sequences (drawn from ``seed``) keep their whole preconditioned gradient, and every
    evaluation sequence's exact entries with them are computed as E streams by.
    """
    for key, val, low in (("proj_dim", proj_dim, 1), ("subspace", subspace, 0),
                          ("check_columns", check_columns, 0)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise ArgumentError(f"{key} must be an int >= {low}, got {val!r}")
    names = _names(params, precond)
    tau = policy.temperature if temperature is None else float(temperature)
    sizes = [params[n].numel() for n in names]
    root = torch.cat([precond[n].reshape(-1).double() for n in names]).sqrt()
    n_e, n_u, k = len(eval_batch), len(update_batch), int(proj_dim)
    ell, m = min(int(subspace), n_u), min(int(check_columns), n_u)

    def rows(batch: SequenceBatch, side: str) -> Iterator[tuple[int, Tensor]]:
        """``(first row, x = P^{1/2}∘∇ [n, P])`` per chunk of ``batch``."""
        for s in range(0, len(batch), seq_chunk):
            sub = batch.select(slice(s, s + seq_chunk))
            side_kw = {"policy": policy} if side == "eval" else {"temperature": tau}
            g, _ = sequence_logprob_grads(lm, params, sub, names=names, seq_chunk=seq_chunk, **side_kw)
            x = _flat(g, names)
            yield s, x * root.to(x.device)

    basis = range_basis(rows(update_batch, "update"), n_u, ell, seed) if ell > 0 else None
    cols = None
    if m:
        cols = torch.randperm(n_u, generator=torch.Generator().manual_seed(int(seed) + 1))[:m].sort().values
    f_u, s_u, kept = [], [], []
    for s, x in rows(update_batch, "update"):
        f, sk = features(x, basis, sizes, k, seed)
        f_u.append(f)
        s_u.append(sk)
        if cols is not None:
            kept.append(x[(cols[(cols >= s) & (cols < s + x.shape[0])] - s).to(x.device)])
    fu, su = torch.cat(f_u), torch.cat(s_u)
    x_check = torch.cat(kept) if cols is not None else None
    kern = torch.zeros(n_e, n_u, dtype=torch.float64)
    exact = torch.zeros(n_e, m, dtype=torch.float64) if x_check is not None else None
    for s, x in rows(eval_batch, "eval"):
        f, sk = features(x, basis, sizes, k, seed)
        kern[s : s + x.shape[0]] = (f @ fu.T + sk @ su.T).cpu()
        if exact is not None and x_check is not None:
            exact[s : s + x.shape[0]] = (x @ x_check.T).cpu()
    n_params = int(root.numel())
    return ProjectedKernel(
        kernel=kern,
        check_columns=cols,
        check_exact=exact,
        fidelity=None if exact is None or cols is None else fidelity(kern[:, cols], exact),
        proj_dim=k,
        subspace=ell,
        stored_floats=ell * n_params + (n_e + n_u) * (ell + k),
        check_floats=m * n_params + n_e * m,
        exact_floats=(n_e + n_u) * n_params,
    )


@dataclass(frozen=True)
class KernelSummary:
    """Mean, mean and median absolute value and count of kernel entries for same- and
    different-prompt pairs (NaN where there is no such pair)."""

    mean_same: float
    mean_diff: float
    abs_same: float
    abs_diff: float
    n_same: int
    n_diff: int
    median_abs_same: float = float("nan")
    median_abs_diff: float = float("nan")


def kernel_summary(
    kern: Tensor, prompt_e: Sequence[int] | Tensor, prompt_u: Sequence[int] | Tensor
) -> KernelSummary:
    """Split ``K [N_E, N_U]`` by whether evaluation and update sequences share a prompt id."""
    pe = torch.as_tensor(prompt_e).view(-1, 1)
    pu = torch.as_tensor(prompt_u).view(1, -1)
    if pe.shape[0] != kern.shape[0] or pu.shape[1] != kern.shape[1]:
        raise BatchError(
            f"prompt ids ({pe.shape[0]}, {pu.shape[1]}) do not match kernel shape {tuple(kern.shape)}"
        )
    same = pe == pu

    def stat(mask: Tensor, f: str) -> float:
        if not bool(mask.any()):
            return float("nan")
        vals = kern[mask]
        if f == "median":
            return float(vals.abs().double().quantile(0.5))
        return float(vals.mean() if f == "mean" else vals.abs().mean())

    return KernelSummary(
        mean_same=stat(same, "mean"),
        mean_diff=stat(~same, "mean"),
        abs_same=stat(same, "abs"),
        abs_diff=stat(~same, "abs"),
        n_same=int(same.sum()),
        n_diff=int((~same).sum()),
        median_abs_same=stat(same, "median"),
        median_abs_diff=stat(~same, "median"),
    )
