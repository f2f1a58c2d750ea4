"""Cross Fisher kernel between evaluation and update sequences (docs/math.md#fisher-kernel).

::

    K[t, i] = Σ_α ∇_α logq(t) · P_α · ∇_α log π(t_i)          [N_E, N_U]

``logq`` is the sampling policy's log-probability of evaluation sequence ``t`` (temperature and
top-p, nucleus held fixed); ``log π`` the trainer's (temperature, no top-p) of update sequence
``t_i``; ``P = (1−β1)/D`` the AdamW preconditioner, applied **once**. Since the AdamW component
of update sequence ``i`` is ``ĉ_i = −clip·coef_i·P·∇log π(t_i)``, the first-order change of
``logq(t)`` along ``ĉ_i`` is ``−clip·coef_i·K[t, i]``.

``method="exact"`` streams over blocks of parameters (memory ``O((N_E + N_U)·block)``);
``method="projection"`` streams over sequences and keeps seeded random projections (CountSketch:
each coordinate hashed to one of ``k`` buckets with a random sign) of the gradients,
``K ≈ (G_E P S)(G_U S)ᵀ`` (memory ``O((N_E + N_U)·k)``; unbiased, error ∝ 1/√k).

Rows of ``K`` are multiplied out ``seq_chunk`` evaluation sequences at a time, so a row's value does
not depend on how many rows the call holds: a rank of a distributed run that passes its shard of E
(starting on a multiple of ``seq_chunk``) gets exactly the rows one process would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH._choices import KERNEL_METHODS as METHODS
from deltaH._choices import check_choice
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, BatchError
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
    proj_dim: int = 1024,
    seed: int = 0,
    seq_chunk: int = 8,
) -> Tensor:
    """``K [N_E, N_U]`` float64 (module docstring). ``precond`` maps parameter names to ``P``.

    ``temperature`` of the update side defaults to the policy's.
    """
    check_choice("method", method, METHODS)
    names = [n for n in params if n in precond]
    if not names:
        raise ArgumentError("precond has no entry for any trainable parameter: pass UpdateDirections.precond")
    tau = policy.temperature if temperature is None else float(temperature)
    n_e, n_u = len(eval_batch), len(update_batch)
    kern = torch.zeros(n_e, n_u, dtype=torch.float64)
    if method == "exact":
        for block in _blocks(params, names, int(block_size)):
            g_e, _ = sequence_logprob_grads(
                lm, params, eval_batch, names=block, seq_chunk=seq_chunk, policy=policy
            )
            g_u, _ = sequence_logprob_grads(
                lm, params, update_batch, temperature=tau, names=block, seq_chunk=seq_chunk
            )
            p = torch.cat([precond[n].reshape(-1).double() for n in block])
            kern += _rows_times(_flat(g_e, block) * p, _flat(g_u, block).T, seq_chunk)
        return kern
    if int(proj_dim) < 1:
        raise ArgumentError(f"proj_dim must be >= 1, got {proj_dim!r}")
    k = int(proj_dim)
    p_all = torch.cat([precond[n].reshape(-1).double() for n in names])
    sizes = [params[n].numel() for n in names]

    def project(batch: SequenceBatch, side: str) -> Tensor:
        out = []
        for s in range(0, len(batch), seq_chunk):
            sub = batch.select(slice(s, s + seq_chunk))
            if side == "eval":
                g, _ = sequence_logprob_grads(
                    lm, params, sub, names=names, seq_chunk=seq_chunk, policy=policy
                )
            else:
                g, _ = sequence_logprob_grads(
                    lm, params, sub, temperature=tau, names=names, seq_chunk=seq_chunk
                )
            flat = _flat(g, names)
            if side == "eval":
                flat = flat * p_all
            out.append(_project(flat, sizes, k, seed))
        return torch.cat(out)

    return _rows_times(project(eval_batch, "eval"), project(update_batch, "update").T, seq_chunk)


def _rows_times(a: Tensor, b: Tensor, rows: int) -> Tensor:
    """``a @ b`` in blocks of ``rows`` rows of ``a`` (module docstring: a row's value does not depend on
    how many rows ``a`` has)."""
    return torch.cat([a[s : s + rows] @ b for s in range(0, a.shape[0], rows)]) if a.shape[0] else a @ b


def _project(flat: Tensor, sizes: Sequence[int], k: int, seed: int) -> Tensor:
    """CountSketch ``flat [n, P] → [n, k]``: coordinate ``α`` goes to bucket ``h(α)`` with sign ``s(α)``.

    ``h, s`` are generated per parameter block from ``seed`` (identical for both sides, never
    stored whole); ``E[<Sx, Sy>] = <x, y>`` and the error of a kernel entry shrinks like ``1/√k``.
    """
    out = torch.zeros(flat.shape[0], k, dtype=torch.float64)
    start = 0
    for j, size in enumerate(sizes):
        gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + j)
        bucket = torch.randint(0, k, (size,), generator=gen)
        sign = torch.randint(0, 2, (size,), generator=gen, dtype=torch.float64) * 2 - 1
        out.index_add_(1, bucket, flat[:, start : start + size] * sign)
        start += size
    return out


@dataclass(frozen=True)
class KernelSummary:
    """Mean, mean absolute value and count of kernel entries for same- and different-prompt pairs."""

    mean_same: float
    mean_diff: float
    abs_same: float
    abs_diff: float
    n_same: int
    n_diff: int


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
        return float(vals.mean() if f == "mean" else vals.abs().mean())

    return KernelSummary(
        mean_same=stat(same, "mean"),
        mean_diff=stat(~same, "mean"),
        abs_same=stat(same, "abs"),
        abs_diff=stat(~same, "abs"),
        n_same=int(same.sum()),
        n_diff=int((~same).sum()),
    )
