"""The sampling distribution ``q`` (temperature + nucleus) and its per-token statistics.

For logits ``z_t`` at a position, temperature ``τ`` and nucleus mass ``p`` (DESIGN.md §1.1)::

    q(· | y_<t) = TopP_p( softmax(z_t / τ) )

``TopP_p`` keeps exactly the tokens that ``transformers``' ``TopPLogitsWarper(top_p=p,
min_tokens_to_keep=1)`` keeps after ``TemperatureLogitsWarper(τ)``: sort ascending, drop the
tokens whose ascending float32 cumulative mass is ``<= 1 - p``, always keep the top token. The
nucleus is decided in float32 whatever the logits' dtype (what ``generate`` does); the log-prob
and entropy math then runs in float32, or float64 for float64 logits.

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

# Rows whose nucleus boundary lies within this cumulative mass of the threshold are decided by
# the exact (sorting) rule. On CPU, float32 cumsum accumulates in float64, so the prefix estimate
# differs from HF's cumsum by ~1e-7 at most; 1e-5 leaves a wide safety factor.
_MARGIN = 1e-5


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
            raise ValueError(
                f"SamplingPolicy.temperature must be a finite number > 0, got {self.temperature!r}"
            )
        if not (0 < p <= 1):
            raise ValueError(
                f"SamplingPolicy.top_p must be in (0, 1], got {self.top_p!r} (1 = no truncation)"
            )
        if int(self.topk_prefix) < 1:
            raise ValueError(f"SamplingPolicy.topk_prefix must be >= 1, got {self.topk_prefix!r}")

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
            keep = _nucleus(z, self.top_p, min(int(self.topk_prefix), shape[-1]))
        return keep.reshape(shape)

    # -- per-token statistics --------------------------------------------------------------
    def token_stats(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``log q(target)`` and the entropy ``H(q)`` for every row of ``logits [..., V]``.

        Returns two tensors shaped like ``targets`` (``[...]``), in float32 (float64 for float64
        logits). ``log q`` is ``-inf`` for a target outside the nucleus (a legal value: it makes
        an importance weight exactly zero). Both are differentiable w.r.t. the logits inside the
        nucleus; the nucleus itself is a constant of the logits' values.

        With kept set ``S`` and ``z = logits / τ``::

            log q(y) = z_y − logsumexp_S(z)                       (y ∈ S, else −inf)
            H        = logsumexp_S(z) − Σ_{v∈S} softmax_S(z)_v · z_v
        """
        cd = torch.float64 if logits.dtype == torch.float64 else torch.float32
        keep = self.nucleus_mask(logits)
        z = logits.to(cd) / self.temperature
        y = targets.unsqueeze(-1)
        zy = z.gather(-1, y).squeeze(-1)
        if keep is None:
            lse = torch.logsumexp(z, dim=-1)
            prob = torch.exp(z - lse.unsqueeze(-1))
            ent = lse - (prob * z).sum(-1)
            return zy - lse, ent
        zm = z.masked_fill(~keep, float("-inf"))
        lse = torch.logsumexp(zm, dim=-1)
        prob = torch.exp(zm - lse.unsqueeze(-1))  # exactly 0 outside S
        ent = lse - (prob * z.masked_fill(~keep, 0.0)).sum(-1)
        inside = keep.gather(-1, y).squeeze(-1)
        logq = torch.where(inside, zy - lse, torch.full_like(lse, float("-inf")))
        return logq, ent


def hf_top_p_keep(z32: Tensor, top_p: float) -> Tensor:
    """HF's ``TopPLogitsWarper`` rule (min_tokens_to_keep=1) on float32 scores ``[R, V]``."""
    sorted_z, sorted_idx = torch.sort(z32, descending=False)
    cum = sorted_z.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - top_p)
    remove[..., -1:] = False
    return ~remove.scatter(1, sorted_idx, remove)


def _nucleus(z32: Tensor, top_p: float, k0: int) -> Tensor:
    """Kept-token mask ``[R, V]`` of HF's top-p rule, via ``topk`` prefixes where that is safe.

    Prefix lengths grow ``k0, 16·k0, 256·k0`` for rows whose nucleus is longer than the prefix;
    rows still undecided (or too close to the threshold, or tied at the boundary) take HF's sort.
    """
    v = z32.shape[-1]
    # HF compares the float32 cumsum with the Python float (1 - p), which torch rounds to float32.
    thr = float(torch.tensor(1 - top_p, dtype=torch.float32))
    prob = torch.softmax(z32, dim=-1)
    total = prob.sum(-1, dtype=torch.float64)  # ≈ HF's last cumulative value
    keep = torch.zeros_like(z32, dtype=torch.bool)
    todo = torch.arange(z32.shape[0], device=z32.device)
    k = k0
    while todo.numel() and k < v:
        thr_z, decided = _prefix_rule(z32[todo], prob[todo], total[todo], thr, k)
        rows = todo[decided]
        keep[rows] = z32[rows] >= thr_z[decided].unsqueeze(-1)
        todo = todo[~decided]
        k = min(16 * k, v) if 16 * k < v // 2 else v
    if todo.numel():
        keep[todo] = hf_top_p_keep(z32[todo], top_p)
    return keep


def _prefix_rule(z: Tensor, prob: Tensor, total: Tensor, thr: float, k: int) -> tuple[Tensor, Tensor]:
    """Decide each row's nucleus from its top-``k`` prefix: ``(threshold logit [R], decided [R])``.

    A row is decided when its nucleus ends inside the prefix, no prefix position is within
    ``_MARGIN`` of the threshold, and the boundary is not a tie; then the kept set is
    ``{v : z_v >= threshold}``.
    """
    top_prob, top_idx = torch.topk(prob, k, dim=-1)  # descending
    top_z = z.gather(-1, top_idx)
    top_prob = top_prob.double()
    # Ascending cumulative mass at the j-th largest token = total − mass strictly above it.
    asc = total.unsqueeze(-1) - (torch.cumsum(top_prob, dim=-1) - top_prob)  # [R, k]
    kept = asc > thr
    kept[:, 0] = True
    n_keep = kept.sum(-1)  # kept is a prefix: asc decreases along j
    last = top_z.gather(-1, (n_keep - 1).unsqueeze(-1)).squeeze(-1)
    nxt = top_z.gather(-1, n_keep.clamp(max=k - 1).unsqueeze(-1)).squeeze(-1)
    decided = ~kept[:, -1]  # the nucleus ends inside the prefix
    decided &= ~((asc - thr).abs() < _MARGIN).any(-1)  # clearly away from the threshold
    decided &= last != nxt  # no tie at the boundary (HF's sort order would decide it)
    return last, decided
