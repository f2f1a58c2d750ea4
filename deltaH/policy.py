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

The kept set is decided without sorting the vocabulary (``deltaH._nucleus``: an exact top-``k``
prefix for peaked rows, a histogram of the masses for flat ones, HF's own sort for rows too close to
the threshold or tied at the boundary), so it is HF's in every row. Without autograd the statistics
take one ``softmax`` per row, a few rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH._nucleus import Nucleus, Scores, Workspace, decide, nucleus, row_step
from deltaH.errors import ArgumentError

_Stats = tuple[Tensor, Tensor, "Tensor | None"]  # (log q, H, nucleus key)


# The dtype of :meth:`SamplingPolicy.token_stats` (module docstring, "Precision"); ``None`` would mean
# :func:`compute_dtype` of the logits, this project's earlier choice (benchmarks/bench_precision.py
# measures both).
_STATS_DTYPE: torch.dtype | None = torch.float64


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of :meth:`SamplingPolicy.token_stats`: ``_STATS_DTYPE``, or :func:`compute_dtype`."""
    return compute_dtype(dtype) if _STATS_DTYPE is None else _STATS_DTYPE


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
            keep = nucleus(z, self.top_p, self._prefix(shape[-1])).mask(z)
        return keep.reshape(shape)

    def _prefix(self, vocab: int) -> int:
        return min(int(self.topk_prefix), vocab)

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

        Without autograd (no grad needed, no ``torch.func`` transform) rows are processed a few at a
        time with one ``softmax`` each: with ``P = softmax(z)``, ``m = max z``, ``r = max P``
        (``= 1 / Σ_v e^{z_v − m}``), ``s_S = Σ_S P`` and ``d_S = Σ_S P·(z − m)``, ``logsumexp_S(z) =
        m + log s_S − log r`` and ``H = log s_S − log r − d_S / s_S``.
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

    def _stats(self, logits: Tensor, targets: Tensor, keyed: bool) -> _Stats:
        wrapped = torch._C._functorch.is_functorch_wrapped_tensor(logits)
        if wrapped or (logits.requires_grad and torch.is_grad_enabled()):
            return self._stats_autograd(logits, targets, keyed)
        with torch.no_grad():
            return self._stats_fast(logits, targets, keyed)

    def _stats_autograd(self, logits: Tensor, targets: Tensor, keyed: bool) -> _Stats:
        """The differentiable twin of :meth:`_stats_fast` (plain masked log-sum-exps)."""
        cd = _stats_dtype(logits.dtype)  # float64 (module docstring, precision)
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
            ent = lse - (e * zs.clamp(min=torch.finfo(zs.dtype).min)).sum(-1) / s  # e·(−inf) = 0
            return (zs.gather(-1, y).squeeze(-1) - lse).reshape(shape), ent.reshape(shape), None
        with torch.no_grad():
            z32 = z.detach() if cd == torch.float32 else self.scaled32(logits).reshape(z.shape)
            nuc = nucleus(z32, self.top_p, self._prefix(z.shape[-1]))
        ninf = torch.full_like(zy, float("-inf"))
        logq, ent = ninf, torch.zeros_like(zy)
        for rows, idx, n_keep in nuc.sparse:
            zs = z[rows.unsqueeze(-1), idx]  # [r, k] prefix values (differentiable; no row copies)
            in_s = torch.arange(idx.shape[1], device=z.device) < n_keep.unsqueeze(-1)
            lq, en = _masked_stats(zs, in_s, zy[rows])
            inside = ((idx == y[rows]) & in_s).any(-1)
            logq = logq.index_copy(0, rows, torch.where(inside, lq, ninf[rows]))
            ent = ent.index_copy(0, rows, en)
        dense = [(r, z32[r] >= c.unsqueeze(-1)) for r, c in zip(nuc.cut_rows, nuc.cut, strict=True)]
        for rows, keep in dense + list(zip(nuc.dense_rows, nuc.dense_keep, strict=True)):
            lq, en = _masked_stats(z[rows], keep, zy[rows])
            inside = keep.gather(-1, y[rows]).squeeze(-1)
            logq = logq.index_copy(0, rows, torch.where(inside, lq, ninf[rows]))
            ent = ent.index_copy(0, rows, en)
        key = _nucleus_keys(nuc, z32).reshape(*shape, 2) if keyed else None
        return logq.reshape(shape), ent.reshape(shape), key

    def _stats_fast(self, logits: Tensor, targets: Tensor, keyed: bool) -> _Stats:
        """:meth:`token_stats` without autograd, a few rows at a time (see the docstring there)."""
        cd, v = _stats_dtype(logits.dtype), logits.shape[-1]  # float64 (module docstring, precision)
        x, y = logits.reshape(-1, v), targets.reshape(-1)
        n = x.shape[0]
        logq = torch.empty(n, dtype=cd, device=x.device)
        ent = torch.empty(n, dtype=cd, device=x.device)
        key = torch.empty(n, 2, dtype=torch.int64, device=x.device) if keyed and self.top_p < 1 else None
        table = nucleus_key_table(v, x.device) if key is not None else None
        step = max(1, min(row_step(v), n))
        ws = Workspace(step, v, torch.float32, x.device)
        scaled = x.dtype != torch.float32 or self.temperature != 1.0
        z32_buf = torch.empty(step, v, device=x.device) if scaled else None
        # float64 buffers reused chunk after chunk (fresh ones of a few MB cost page faults)
        buf64 = torch.empty(4, step, v, dtype=cd, device=x.device) if cd != torch.float32 else None
        for s in range(0, n, step):
            xc = x[s : s + step]
            z32 = xc
            if z32_buf is not None:  # HF's scores: logits.float() / τ
                z32 = z32_buf[: xc.shape[0]].copy_(xc)
                if self.temperature != 1.0:
                    z32.div_(self.temperature)
            sc: Scores | None
            prob: Tensor | None
            w: Tensor | None
            tmp: Tensor | None
            if cd == torch.float32:
                sc = ws.scores(z32, with_mass=self.top_p < 1)
                z, prob, w, tmp = z32, sc.prob, sc.w, ws.tmp[: xc.shape[0]]
            else:
                assert buf64 is not None
                sc = ws.scores(z32) if self.top_p < 1 else None
                c = xc.shape[0]
                z = buf64[0, :c].copy_(xc)  # the logits' values in float64 (exact), then / τ
                if self.temperature != 1.0:
                    z.div_(self.temperature)
                b64 = buf64[:, :c]

                def scores64(z: Tensor = z, b64: Tensor = b64) -> tuple[Tensor, Tensor, Tensor]:
                    """``softmax(z)``, ``max z − z`` and scratch, float64 ``[c, V]``."""
                    prob = torch.ops.aten._softmax.out(z, -1, False, out=b64[1])
                    return prob, torch.sub(z.amax(-1, keepdim=True), z, out=b64[2]), b64[3]

                # top-p: only rows cut by value need the whole row's softmax; rows decided from their
                # top-k prefix or by a mask use the values z alone (no float64 pass over [c, V])
                prob, w, tmp = scores64() if sc is None else (None, None, None)
            yc = y[s : s + step]
            if prob is None:
                lq, en, kc = _chunk_stats(sc, z, None, None, None, yc, self.top_p, self._prefix(v), table,
                                          scores64)
            else:
                lq, en, kc = _chunk_stats(sc, z, prob, w, tmp, yc, self.top_p, self._prefix(v), table)
            logq[s : s + step], ent[s : s + step] = lq, en
            if key is not None and kc is not None:
                key[s : s + step] = kc
        shape = targets.shape
        return logq.reshape(shape), ent.reshape(shape), None if key is None else key.reshape(*shape, 2)


def _chunk_stats(
    sc: Scores | None, z: Tensor, prob: Tensor | None, w: Tensor | None, tmp: Tensor | None, y: Tensor,
    top_p: float, k0: int, table: Tensor | None,
    scores: Callable[[], tuple[Tensor, Tensor, Tensor]] | None = None,
) -> _Stats:
    """``(log q(y), H, key)`` of a chunk ``z [c, V]`` (compute dtype) without autograd, from ``prob =
    softmax(z)`` and ``w = max z − z``; ``sc`` are the float32 scores the nucleus is decided on (``None``
    when ``p = 1``), ``tmp`` a ``[c, V]`` scratch buffer; keys only with the key ``table``. With top-p,
    ``prob, w, tmp`` may be ``None`` and ``scores()`` gives them when a row needs them."""
    if top_p >= 1.0 or sc is None:
        assert prob is not None and w is not None and tmp is not None
        wy = w.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        log_r = prob.amax(-1).log()  # − log Σ_v e^{z_v − max z}
        s = prob.sum(-1)
        lse = s.log() - log_r  # logsumexp(z) − max z
        return -wy - lse, lse + torch.mul(prob, w, out=tmp).nansum(-1) / s, None  # 0·inf (z = −inf): 0
    nuc = decide(sc, top_p, k0)
    logq = torch.full(y.shape, float("-inf"), dtype=z.dtype, device=z.device)
    ent = torch.empty(y.shape, dtype=z.dtype, device=z.device)
    for rows, idx, n_keep in nuc.sparse:
        in_s = torch.arange(idx.shape[1], device=z.device) < n_keep.unsqueeze(-1)
        lq, en = _masked_stats(z[rows.unsqueeze(-1), idx], in_s, z[rows, y[rows]])
        inside = ((idx == y[rows].unsqueeze(-1)) & in_s).any(-1)
        logq[rows] = torch.where(inside, lq, logq[rows])
        ent[rows] = en
    if nuc.cut_rows:
        if prob is None or w is None or tmp is None:
            assert scores is not None
            prob, w, tmp = scores()
        log_r = prob.amax(-1).log()  # − log Σ_v e^{z_v − max z}
        rows = torch.cat(nuc.cut_rows)
        logq[rows], ent[rows] = _cut_stats(prob, w, tmp, sc.z, y, log_r, rows, torch.cat(nuc.cut))
    for rows, keep in zip(nuc.dense_rows, nuc.dense_keep, strict=True):
        lq, en = _masked_stats(z[rows], keep, z[rows, y[rows]])
        logq[rows] = torch.where(keep.gather(-1, y[rows].unsqueeze(-1)).squeeze(-1), lq, logq[rows])
        ent[rows] = en
    return logq, ent, None if table is None else _nucleus_keys(nuc, sc.z, table)


def _cut_stats(
    prob: Tensor, w: Tensor, tmp: Tensor, z32: Tensor, y: Tensor, log_r: Tensor, rows: Tensor, cut: Tensor
) -> tuple[Tensor, Tensor]:
    """``(log q(y), H)`` of ``rows`` whose kept set is ``{z32 ≥ cut}``, from ``prob = softmax(z)``,
    ``w = max z − z`` and ``log_r = log max prob`` of the whole chunk (``[c, V]`` / ``[c]``)."""
    if 2 * rows.numel() < prob.shape[0]:  # a few rows: copy them out
        prob, w, z32, y, log_r = prob[rows], w[rows], z32[rows], y[rows], log_r[rows]
        tmp, full = tmp[: rows.numel()], cut
    else:  # most rows: mask the whole chunk (+inf keeps nothing in the other rows)
        full = torch.full_like(log_r, float("inf"), dtype=z32.dtype)
        full[rows] = cut
    pk = torch.ge(z32, full.unsqueeze(-1), out=tmp).mul_(prob)  # prob on S, 0 elsewhere
    s = pk.sum(-1)
    lse = s.log() - log_r  # logsumexp_S(z) − max z
    inside = z32.gather(-1, y.unsqueeze(-1)).squeeze(-1) >= full
    lq = torch.where(inside, -w.gather(-1, y.unsqueeze(-1)).squeeze(-1) - lse, float("-inf"))
    en = lse + pk.mul_(w).nansum(-1) / s  # 0·inf (z = −inf) counts as 0
    return (lq, en) if full is cut else (lq[rows], en[rows])


def _masked_stats(z: Tensor, keep: Tensor, zy: Tensor) -> tuple[Tensor, Tensor]:
    """``(z_y − lse_S, H_S)`` per row for values ``z [r, m]`` and kept mask ``keep [r, m]``."""
    # Shift by the (constant) row max so lse − Σ q·z does not cancel two large numbers.
    zmax = z.detach().masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    zs = (z - zmax).masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(zs, dim=-1)
    prob = torch.exp(zs - lse.unsqueeze(-1))  # exactly 0 outside S
    ent = lse - (prob * zs.masked_fill(~keep, 0.0)).sum(-1)
    return zy - zmax.squeeze(-1) - lse, ent


def nucleus_key_table(vocab: int, device: torch.device | str = "cpu") -> Tensor:
    """The fixed integers ``r_v ∈ [0, 2^63 // V)`` ``[V]`` int64 of the nucleus key (seeded, device-free)."""
    g = torch.Generator().manual_seed(0x5EED_D1A)
    return torch.randint(0, (2**63 - 1) // max(int(vocab), 1), (int(vocab),), generator=g,
                         dtype=torch.int64).to(device)


def _nucleus_keys(nuc: Nucleus, z32: Tensor, table: Tensor | None = None) -> Tensor:
    """``(|S|, Σ_{v∈S} r_v)`` per row ``[R, 2]`` of the kept sets in ``nuc`` (decided on ``z32 [R, V]``;
    no ``[R, V]`` mask for rows decided from a prefix); ``table``: :func:`nucleus_key_table`."""
    n_rows, vocab = z32.shape
    table = nucleus_key_table(vocab, z32.device) if table is None else table
    key = torch.zeros(n_rows, 2, dtype=torch.int64, device=z32.device)
    for rows, idx, n_keep in nuc.sparse:
        in_s = torch.arange(idx.shape[1], device=z32.device) < n_keep.unsqueeze(-1)
        total = torch.where(in_s, table[idx], torch.zeros_like(idx)).sum(-1)
        key[rows] = torch.stack([n_keep.to(torch.int64), total], dim=-1)
    masks = [(r, z32[r] >= c.unsqueeze(-1)) for r, c in zip(nuc.cut_rows, nuc.cut, strict=True)]
    for rows, keep in masks + list(zip(nuc.dense_rows, nuc.dense_keep, strict=True)):
        total = torch.where(keep, table, torch.zeros_like(table)).sum(-1)
        key[rows] = torch.stack([keep.sum(-1).to(torch.int64), total], dim=-1)
    return key
