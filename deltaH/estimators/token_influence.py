"""Exact first-order influence of every update token on the entropy (docs/math.md#token-influence).

With AdamW's denominator ``D`` held at its full-batch value (docs/math.md#adamw-step), the gradient
part of the step per unit lr is a sum over the scored tokens ``(i, k)`` of the update batch U::

    Σ_i ĉ_i = −clip · P ⊙ Σ_{i,k} w_{i,k} ∇ℓ_{i,k}        P = (1−β1)/D   (the sign flips for maximize)

with ``ℓ_{i,k} = log softmax(z/τ)[y]`` the trainer's log-probability of the ``k``-th scored token of
row ``i`` (temperature ``τ``, no top-p) and ``w_{i,k} = ∂L/∂ℓ_{i,k}`` its loss weight. δH₁ along it
is ``X · Σ_i ĉ_i`` with ``X = ∇_θ F`` the reverse-mode gradient of the ΔH estimator on the evaluation
batch E (:func:`~deltaH.estimators.first_order.entropy_gradient`), so by linearity::

    v          = −clip · P ⊙ X = −(1−β1) · clip · X / D                       (one tangent)
    inner[i,k] = ⟨∇ℓ_{i,k}, v⟩                                                 [M, T]
    s[i, k]    = w_{i,k} · inner[i, k]                                         [M, T]  (per unit lr)
    Σ_{i,k} s  = slope of δH₁ along ``grad``;  Σ_k s[i, k] = slope along ĉ_i

Every ``inner`` comes from ONE forward-mode ``jvp`` of the network over U along ``v`` (no per-token
gradients): ``inner = ż_y − Σ_v p_v ż_v`` with ``ż`` the derivative of ``z = logits/τ`` and
``p = softmax(z)``. The same forward pass gives, per token, what the published token-level proxies
read (:mod:`deltaH.estimators.proxies`): ``log p(y)``, ``H = −Σ p log p``, ``Σ p²`` and ``Σ p² log p``.
Arrays are ``[M, T]``: the ``k``-th scored token of row ``i`` at ``[i, k]``, zero-padded (the layout
of :attr:`deltaH.updates.replay.ReplayDirections.token_weights`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH.batch import Compact, SequenceBatch
from deltaH.errors import BatchError
from deltaH.estimators.proxies import head_stats
from deltaH.functional import FunctionalLM
from deltaH.policy import compute_dtype
from deltaH.stats import chunks_of, head_rows, share_mode
from deltaH.updates.directions import UpdateDirections

__all__ = ["TokenInfluence", "sequence_token_weights", "token_influence"]


@dataclass(frozen=True)
class TokenInfluence:
    """Per-token results of :func:`token_influence`, all ``[M, T]`` float64 on the CPU, zero-padded.

    ``influence``: ``s = w · inner``, each token's share of the slope of δH₁ along ``grad`` (per unit
    lr: the token changes the entropy by ``η · s`` to first order). ``inner``: ``⟨∇ℓ, v⟩``.
    ``weights``: the loss weights ``w``. ``logp``, ``entropy``, ``sum_p2``, ``sum_p2_logp``: ``log p(y)``,
    ``H``, ``Σ_v p_v²`` and ``Σ_v p_v² log p_v`` of ``p = softmax(z/τ)`` at θ. ``mask``: the scored
    tokens. ``temperature``: the ``τ`` of ``p``.
    """

    influence: Tensor
    inner: Tensor
    weights: Tensor
    logp: Tensor
    entropy: Tensor
    sum_p2: Tensor
    sum_p2_logp: Tensor
    mask: Tensor
    temperature: float

    @property
    def per_sequence(self) -> Tensor:
        """``[M]``: ``Σ_k s[i, k]``, the slope of δH₁ along each update sequence's component ĉ_i."""
        return self.influence.sum(1)

    @property
    def total(self) -> float:
        """``Σ_{i,k} s``: the slope of δH₁ along the gradient part of the step."""
        return float(self.influence.sum())


def sequence_token_weights(coef: Tensor, n_tokens: Tensor, width: int | None = None) -> Tensor:
    """``[M, T]`` float64: ``coef_i`` at row ``i``'s first ``n_tokens_i`` columns, 0 beyond.

    The token weights of a loss ``Σ_i coef_i · Σ_t ℓ_{i,t}`` (a sampled U, docs/math.md#rl-losses),
    in the layout :func:`token_influence` takes; ``width`` defaults to ``max n_tokens``.
    """
    n = n_tokens.long().cpu()
    t = int(n.max()) if width is None else int(width)
    cols = torch.arange(t).unsqueeze(0) < n.unsqueeze(1)
    return coef.double().cpu().unsqueeze(1) * cols


def _check_weights(w: Tensor, batch: SequenceBatch) -> Tensor:
    n = batch.n_tokens.cpu()
    if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
        raise BatchError("token_weights must be a floating tensor [M, T] (the k-th scored token of row i "
                         f"at [i, k]), got {getattr(w, 'shape', type(w).__name__)}")
    if w.shape[0] != len(batch) or w.shape[1] < int(n.max()):
        raise BatchError(f"token_weights has shape {tuple(w.shape)} but the update batch has {len(batch)} "
                         f"rows with up to {int(n.max())} scored tokens: pass [M, T] with M = {len(batch)}, "
                         f"T >= {int(n.max())}")
    w = w.double().cpu()
    beyond = torch.arange(w.shape[1]).unsqueeze(0) >= n.unsqueeze(1)
    if bool((w * beyond).ne(0).any()):
        rows = (w * beyond).ne(0).any(1).nonzero().flatten()[:5].tolist()
        raise BatchError(f"token_weights rows {rows} have non-zero weights beyond their scored tokens: "
                         "column k is the k-th scored token of the row, and the padding must be zero")
    return w


def _slot(c: Compact) -> Tensor:
    """``[P]``: the index ``k`` of each scored position within its row (rows are in order)."""
    counts = torch.bincount(c.rows, minlength=c.n)
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(c.rows.numel(), device=c.rows.device) - starts[c.rows]


def _chunk(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    tang: Mapping[str, Tensor],
    c: Compact,
    temperature: float,
    head_chunk: int | None,
) -> tuple[Tensor, ...]:
    """Per scored position of one chunk ``[P]``: ``inner, log p(y), H, Σp², Σp² log p``."""
    prim = {n: params[n] for n in tang}
    rest = {n: t for n, t in params.items() if n not in tang}

    def backbone(p: Mapping[str, Tensor]) -> Tensor:
        return lm.hidden({**rest, **p}, c)

    hidden, hdot = torch.func.jvp(backbone, (prim,), (dict(tang),))  # type: ignore[misc]
    h, hd = hidden[c.rows, c.pred_pos], hdot[c.rows, c.pred_pos]  # [P, D]
    head_t = {n: t for n, t in tang.items() if n in lm.head_names}
    head_rest = {n: t for n, t in params.items() if n not in head_t}
    head_prim = {n: params[n] for n in head_t}

    def head(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return lm.head({**head_rest, **p}, x)

    parts: list[tuple[Tensor, ...]] = []
    step = head_rows(lm, 2, head_chunk)
    for s in range(0, h.shape[0], step):
        primals, tangents = (head_prim, h[s : s + step]), (head_t, hd[s : s + step])
        logits, ldot = torch.func.jvp(head, primals, tangents)  # type: ignore[misc]
        y = c.targets[s : s + step]
        cd = compute_dtype(logits.dtype)
        z, zd = logits.to(cd) / temperature, ldot.to(cd) / temperature
        inner = zd.gather(-1, y.unsqueeze(-1)).squeeze(-1) - (torch.softmax(z, dim=-1) * zd).sum(-1)
        parts.append((inner, *head_stats(logits, y, temperature)))
    return tuple(torch.cat([q[j] for q in parts]) for j in range(5))


def token_influence(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    x: Mapping[str, Tensor],
    update: UpdateDirections,
    token_weights: Tensor,
    *,
    temperature: float,
    maximize: Collection[str] = (),
    tf_batch_size: int = 16,
    head_chunk: int | None = None,
    share_prompts: str = "auto",
) -> TokenInfluence:
    """Each update token's exact first-order effect on the entropy of E (module docstring).

    ``batch``: U (``M`` rows); ``x``: ``X = ∇_θ F`` on E, from
    :func:`~deltaH.estimators.first_order.entropy_gradient` (float64, keyed like ``update.precond``);
    ``update``: the step's directions (``precond = (1−β1)/D`` and ``clip_coef``); ``token_weights
    [M, T]``: ``w_{i,k}``, e.g. :func:`sequence_token_weights` of ``update.coef`` for a sampled U, or a
    replayed step's ``token_weights``; ``temperature``: the trainer's ``τ`` (the loss's log π is
    ``log softmax(z/τ)``); ``maximize``: names of parameters whose optimizer group has
    ``maximize=True`` (their step, so their tangent, changes sign).

    Cost: one ``jvp`` over U (about two forward passes), plus the gradient ``x`` (one forward and
    one backward over E, shared with nothing else). ``Σ s`` equals ``x · update.grad`` to float
    rounding. ``share_prompts`` (``auto | on | off``, :func:`deltaH.stats.share_mode`): U's repeated
    prompts run once per chunk.
    """
    lm.check_names(params)
    w = _check_weights(token_weights, batch)
    share = share_mode(lm, share_prompts)
    missing = [n for n in update.precond if n not in x]
    if missing:
        raise BatchError(f"x has no entry for parameter {missing[0]!r}: pass the E-gradient of every "
                         "trainable parameter (entropy_gradient(params, ...))")
    tang = {}
    for n, pre in update.precond.items():
        sign = 1.0 if n in maximize else -1.0  # ĉ = −clip·P·g (maximize: +clip·P·g)
        v = x[n].to(pre.device, torch.float64) * pre.double() * (sign * float(update.clip_coef))
        tang[n] = v.to(params[n].dtype)
    m, t = w.shape
    out = {k: torch.zeros(m, t, dtype=torch.float64) for k in ("inner", "logp", "entropy", "p2", "p2lp")}
    start = 0
    with torch.no_grad():
        for c in chunks_of(batch.to(lm.device), tf_batch_size, share):
            vals = _chunk(lm, params, tang, c, float(temperature), head_chunk)
            rows, cols = (start + c.rows).cpu(), _slot(c).cpu()
            for key, val in zip(out, vals, strict=True):
                out[key][rows, cols] = val.double().cpu()
            start += c.n
    mask = torch.arange(t).unsqueeze(0) < batch.n_tokens.cpu().unsqueeze(1)
    return TokenInfluence(
        influence=w * out["inner"],
        inner=out["inner"],
        weights=w,
        logp=out["logp"],
        entropy=out["entropy"],
        sum_p2=out["p2"],
        sum_p2_logp=out["p2lp"],
        mask=mask,
        temperature=float(temperature),
    )
