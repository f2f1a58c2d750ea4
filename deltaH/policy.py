"""The sampling distribution ``q`` (temperature + nucleus) and its per-token statistics.

For logits ``z_t`` at a position, temperature ``τ`` and nucleus mass ``p`` (docs/math.md#policy)::

    q(· | y_<t) = TopP_p( softmax(z_t / τ) )

``TopP_p`` keeps exactly the tokens that ``transformers``' ``TopPLogitsWarper(top_p=p,
min_tokens_to_keep=1)`` keeps after ``TemperatureLogitsWarper(τ)``: sort ascending, drop the
tokens whose ascending float32 cumulative mass is ``<= 1 - p``, always keep the top token. The
nucleus is decided in float32 whatever the logits' dtype (what ``generate`` does).

Precision. The per-token statistics of :meth:`SamplingPolicy.token_stats` (``log q`` and ``H``) are
computed in float64 from the logits, whatever their dtype. True ΔH differences per-sequence sums
of these values at θ and θ' (hundreds of nats for long responses): in float32 every token's ``H``
and ``log q`` would carry a rounding error of ~ulp(H) ≈ 1e-6 that changes at random as soon as any
logit changes by one ulp, i.e. noise of ~1e-5 nats per sequence at every η — the precision floor.
In float64 that part is gone and what is left is the logits' own rounding, which a small step
changes only slightly. The cost is small beside the LM head (a few float64 passes over ``[rows,
V]`` against the head's ``D`` multiply-adds per logit). Other uses (the trainer's log-prob of a
gradient, the first-order derivatives, the sampler) use :func:`compute_dtype`.

Fast path: a full-vocabulary sort costs ~20x a log-softmax at V = 152k, so each row first takes
a ``topk`` prefix. A row whose nucleus ends inside the prefix, clearly away from the threshold
(``> _MARGIN`` in cumulative mass) and with no tie at its boundary, is decided from the prefix;
every other row (prefix too short, boundary within the margin, a tie) is decided by HF's own
sort-and-cumsum code, so the kept set is HF's in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH.errors import ArgumentError

# Rows whose nucleus boundary lies within this cumulative mass of the threshold are decided by
# the exact (sorting) rule. On CPU, float32 cumsum accumulates in float64, so the prefix estimate
# differs from HF's cumsum by ~1e-7 at most; 1e-5 leaves a wide safety factor.
_MARGIN = 1e-5


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the log-prob and entropy math for logits of ``dtype``: float64 for float64
    logits, float32 for everything else (float32, and bf16/fp16, which are upcast)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scaled_logits(logits: Tensor, temperature: float, keep: Tensor | None = None) -> Tensor:
    """``z = logits / τ`` in the compute dtype, ``−inf`` outside the kept mask ``keep`` (if given).

    ``softmax(z)`` is then the nucleus softmax with the kept set held fixed.
    """
    z = logits.to(compute_dtype(logits.dtype)) / temperature
    if keep is not None:
        z = z.masked_fill(~keep, float("-inf"))
    return z


def trainer_logprob(
    logits: Tensor, targets: Tensor, temperature: float, keep: Tensor | None = None
) -> Tensor:
    """The trainer's token log-prob ``log softmax(logits / τ)[target]`` (temperature, no top-p).

    ``logits [..., V]``, ``targets [...]``; the result has the shape of ``targets``, in the compute
    dtype. With a kept mask ``keep [..., V]`` the softmax runs over the kept tokens only: the
    sampling policy's ``log q`` with its nucleus held fixed.
    """
    z = scaled_logits(logits, temperature, keep)
    return torch.log_softmax(z, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass(frozen=True)
class SamplingPolicy:
    """Temperature ``τ`` and nucleus mass ``p`` of the sampler; ``p = 1`` means no truncation.

    ``topk_prefix`` is the prefix length of the nucleus fast path (a performance knob only: the
    kept set never depends on it).

    >>> pol = SamplingPolicy(temperature=0.7, top_p=0.9)
    >>> logq, ent = pol.token_stats(torch.randn(3, 11), torch.tensor([0, 4, 7]))
    """

    temperature: float = 1.0
    top_p: float = 1.0
    topk_prefix: int = 64

    def __post_init__(self) -> None:
        t, p = float(self.temperature), float(self.top_p)
        if not (math.isfinite(t) and t > 0):
            raise ArgumentError(
                f"SamplingPolicy.temperature must be a finite number > 0, got {self.temperature!r}"
            )
        if not (0 < p <= 1):
            raise ArgumentError(
                f"SamplingPolicy.top_p must be in (0, 1], got {self.top_p!r} (1 = no truncation)"
            )
        if int(self.topk_prefix) < 1:
            raise ArgumentError(f"SamplingPolicy.topk_prefix must be >= 1, got {self.topk_prefix!r}")

    # -- nucleus ---------------------------------------------------------------------------
    def scaled32(self, logits: Tensor) -> Tensor:
        """``logits / τ`` in float32, exactly as ``generate`` feeds them to the top-p warper."""
        return logits.detach().float() / self.temperature

    def nucleus_mask(self, logits: Tensor) -> Tensor | None:
        """Boolean ``[..., V]`` mask of the kept tokens, or ``None`` when ``p = 1`` (all kept)."""
        if self.top_p >= 1.0:
            return None
        shape = logits.shape
        with torch.no_grad():
            z = self.scaled32(logits).reshape(-1, shape[-1])
            nuc = _nucleus(z, self.top_p, min(int(self.topk_prefix), shape[-1]))
            keep = torch.zeros_like(z, dtype=torch.bool)
            for rows, idx, n_keep in nuc.sparse:
                in_s = torch.arange(idx.shape[1], device=z.device) < n_keep.unsqueeze(-1)
                keep[rows.unsqueeze(-1), idx] = in_s
            keep[nuc.dense_rows] = nuc.dense_keep
        return keep.reshape(shape)

    # -- per-token statistics --------------------------------------------------------------
    def token_stats(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``log q(target)`` and the entropy ``H(q)`` for every row of ``logits [..., V]``.

        Returns two tensors shaped like ``targets`` (``[...]``), in float64 whatever the logits'
        dtype (module docstring, "Precision"). ``log q`` is ``-inf`` for a target outside the
        nucleus (a legal value: it makes an importance weight exactly zero). Both are
        differentiable w.r.t. the logits inside the nucleus; the nucleus itself is a constant of
        the logits' values.

        With kept set ``S`` and ``z = logits / τ``::

            log q(y) = z_y − logsumexp_S(z)                       (y ∈ S, else −inf)
            H        = logsumexp_S(z) − Σ_{v∈S} softmax_S(z)_v · z_v

        Rows whose nucleus was decided from a ``topk`` prefix do this math on the prefix only.
        """
        lq, ent, _ = self._stats(logits, targets, keyed=False)
        return lq, ent

    def token_stats_keyed(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """:meth:`token_stats` plus each row's nucleus key ``[..., 2]`` int64 (``None`` when ``p = 1``).

        The key of a kept set ``S`` is ``(|S|, Σ_{v∈S} r_v)`` with fixed pseudo-random integers
        ``r_v ∈ [0, 2^63 / V)`` (:func:`nucleus_key_table`; the sum cannot overflow). Equal sets have
        equal keys; two different sets share a key with probability ≤ V / 2^63 (< 2^-45 at
        V = 152k), and never when they differ in size (a token entering or leaving alone).
        Comparing keys at θ and θ' tells whether a position's nucleus moved without storing masks.
        """
        return self._stats(logits, targets, keyed=True)

    def _stats(self, logits: Tensor, targets: Tensor, keyed: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        cd = torch.float64  # not compute_dtype(): see the module docstring (precision)
        shape = targets.shape
        z = logits.reshape(-1, logits.shape[-1]).to(cd)
        if self.temperature != 1.0:
            z = z / self.temperature
        y = targets.reshape(-1, 1)
        zy = z.gather(-1, y).squeeze(-1)
        if self.top_p >= 1.0:
            # Not torch.log_softmax: on CPU its float32 normaliser is a plain running sum per SIMD
            # lane, off by ~3e-5 relative at V = 152k on AVX2 (1.3e-4 in H, 3e-5 in log q). Here
            # every sum over V is torch.sum (cascaded), on logits shifted by their row max.
            zs = z - z.detach().amax(-1, keepdim=True)
            e = zs.exp()
            s = e.sum(-1)
            lse = s.log()
            ent = lse - (e * zs).sum(-1) / s
            return (zs.gather(-1, y).squeeze(-1) - lse).reshape(shape), ent.reshape(shape), None
        with torch.no_grad():
            z32 = self.scaled32(logits)
            nuc = _nucleus(z32.reshape(-1, z.shape[-1]), self.top_p, min(int(self.topk_prefix), z.shape[-1]))
        ninf = torch.full_like(zy, float("-inf"))
        logq, ent = ninf, torch.zeros_like(zy)
        for rows, idx, n_keep in nuc.sparse:
            zs = z[rows.unsqueeze(-1), idx]  # [r, k] prefix values (differentiable; no row copies)
            in_s = torch.arange(idx.shape[1], device=z.device) < n_keep.unsqueeze(-1)
            lq, en = _masked_stats(zs, in_s, zy[rows])
            inside = ((idx == y[rows]) & in_s).any(-1)
            logq = logq.index_copy(0, rows, torch.where(inside, lq, ninf[rows]))
            ent = ent.index_copy(0, rows, en)
        if nuc.dense_rows.numel():
            rows, keep = nuc.dense_rows, nuc.dense_keep
            lq, en = _masked_stats(z[rows], keep, zy[rows])
            inside = keep.gather(-1, y[rows]).squeeze(-1)
            logq = logq.index_copy(0, rows, torch.where(inside, lq, ninf[rows]))
            ent = ent.index_copy(0, rows, en)
        key = _nucleus_keys(nuc, z.shape[0], z.shape[-1], z.device).reshape(*shape, 2) if keyed else None
        return logq.reshape(shape), ent.reshape(shape), key


def _masked_stats(z: Tensor, keep: Tensor, zy: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_y − lse_S, H_S)`` per row for values ``z [r, m]`` and kept mask ``keep [r, m]``."""
    # Shift by the (constant) row max so lse − Σ q·z does not cancel two large numbers.
    zmax = z.detach().masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    zs = (z - zmax).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(zs, dim=-1)
    prob = torch.exp(zs - lse.unsqueeze(-1))  # exactly 0 outside S
    ent = lse - (prob * zs.masked_fill(~keep, 0.0)).sum(-1)
    return zy - zmax.squeeze(-1) - lse, ent


def hf_top_p_keep(z32: Tensor, top_p: float) -> Tensor:
    """HF's ``TopPLogitsWarper`` rule (min_tokens_to_keep=1) on float32 scores ``[R, V]``."""
    sorted_z, sorted_idx = torch.sort(z32, descending=False)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_idx, remove)


@dataclass
class _Nucleus:
    """Kept sets of ``R`` rows: ``sparse`` groups ``(rows [r], idx [r, k], n_keep [r])`` keep the
    first ``n_keep`` of their top-``k`` indices; ``dense_rows`` have a full mask ``dense_keep``."""

    sparse: list[tuple[Tensor, Tensor, Tensor]]
    dense_rows: Tensor
    dense_keep: Tensor


def _nucleus(z32: Tensor, top_p: float, k0: int) -> _Nucleus:
    """HF's top-p kept sets of ``z32 [R, V]``, from ``topk`` prefixes where that is safe.

    Prefix lengths grow ``k0, 16·k0, 256·k0`` for rows whose nucleus is longer than the prefix;
    rows still undecided (or too close to the threshold, or tied at the boundary) take HF's sort.
    """
    v = z32.shape[-1]
    # HF compares the float32 cumsum with the Python float (1 - p), which torch rounds to float32.
    thr = float(torch.tensor(1 - top_p, dtype=torch.float32))
    lse = torch.logsumexp(z32, dim=-1).double()
    todo = torch.arange(z32.shape[0], device=z32.device)
    sparse = []
    k = k0
    while todo.numel() and k < v:
        rows_z = z32 if todo.numel() == z32.shape[0] else z32[todo]  # avoid copying every row
        top_z, top_idx = torch.topk(rows_z, k, dim=-1)  # descending
        n_keep, decided = _prefix_rule(top_z, lse[todo], thr)
        if bool(decided.any()):
            sparse.append((todo[decided], top_idx[decided], n_keep[decided]))
        todo = todo[~decided]
        k = 16 * k if 16 * k < v // 2 else v
    dense = hf_top_p_keep(z32[todo], top_p) if todo.numel() else z32.new_zeros((0, v), dtype=torch.bool)
    return _Nucleus(sparse=sparse, dense_rows=todo, dense_keep=dense)


def _prefix_rule(top_z: Tensor, lse: Tensor, thr: float) -> tuple[Tensor, Tensor]:
    """Decide each row's nucleus from its top-``k`` prefix ``top_z [R, k]``: ``(n_keep, decided)``.

    A row is decided when its nucleus ends inside the prefix, the prefix positions next to the
    boundary are more than ``_MARGIN`` from the threshold, and the boundary is not a tie; the
    kept set is then the first ``n_keep`` tokens of the prefix.
    """
    k = top_z.shape[-1]
    top_prob = torch.exp(top_z.double() - lse.unsqueeze(-1))
    # Ascending cumulative mass at the j-th largest token = 1 − mass strictly above it.
    asc = 1.0 - (torch.cumsum(top_prob, dim=-1) - top_prob)  # [R, k]
    kept = asc > thr
    kept[:, 0] = True
    n_keep = kept.sum(-1)  # kept is a prefix: asc decreases along j
    last = top_z.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
    nxt = top_z.gather(-1, n_keep.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
    decided = ~kept[:, -1]  # the nucleus ends inside the prefix
    decided &= ~((asc - thr).abs() < _MARGIN).any(-1)  # clearly away from the threshold
    decided &= last != nxt  # no tie at the boundary (HF's sort order would decide it)
    return n_keep, decided


def nucleus_key_table(vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """The fixed integers ``r_v ∈ [0, 2^63 // V)`` ``[V]`` int64 of the nucleus key (seeded, device-free)."""
    g = torch.Generator().manual_seed(0x5EED_D1A)
    return torch.randint(0, (2**63 - 1) // max(int(vocab), 1), (int(vocab),), generator=g,
                         dtype=torch.int64).to(device)


def _nucleus_keys(nuc: _Nucleus, n_rows: int, vocab: int, device: torch.device) -> Tensor:
    """``(|S|, Σ_{v∈S} r_v)`` per row ``[R, 2]`` of the kept sets in ``nuc`` (no ``[R, V]`` mask for
    rows decided from a prefix)."""
    table = nucleus_key_table(vocab, device)
    key = torch.zeros(n_rows, 2, dtype=torch.int64, device=device)
    for rows, idx, n_keep in nuc.sparse:
        in_s = torch.arange(idx.shape[1], device=device) < n_keep.unsqueeze(-1)
        total = torch.where(in_s, table[idx], torch.zeros_like(idx)).sum(-1)
        key[rows] = torch.stack([n_keep.to(torch.int64), total], dim=-1)
    if nuc.dense_rows.numel():
        keep = nuc.dense_keep
        total = torch.where(keep, table, torch.zeros_like(table)).sum(-1)
        key[nuc.dense_rows] = torch.stack([keep.sum(-1).to(torch.int64), total], dim=-1)
    return key
