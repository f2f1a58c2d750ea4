"""The entropy bonus of a trainer's loss as one more AdamW component (docs/math.md#controls).

TRL 1.16 (``GRPOTrainer._compute_loss``, the ``entropy_coef`` lines) and verl (``entropy_coeff``)
subtract ``c · H`` from the loss, with ``H`` the mean per-token entropy of ``softmax(z/τ)`` (no
top-p) over a micro-batch's loss tokens, divided by the gradient-accumulation steps ``A``; DDP then
averages the ``W`` ranks' gradients. Over the optimizer step::

    H_U = Σ_{ranks} Σ_{micro-batches m} (1/(W·A)) · Σ_{t∈m} H_t / |m|        |m|: m's loss tokens
        = Σ_{i,k} w_{i,k} · H(softmax(z_{i,t_k}/τ))                           w [M, T_max]

so the step's loss is ``L − c·H_U`` and its gradient ``Σ_i g_i − c·∇H_U``. Through AdamW with the
denominator ``D`` and the clipping factor ``clip`` held at this step's values (as for the update
sequences' components ĉ_i), the bonus adds ``c · ĉ_H`` to the direction per unit lr, with::

    ĉ_H = −(1−β1)·clip·(−∇H_U)/D = clip · P · ∇H_U      (P = (1−β1)/D; negated if maximize)

The real trainer's step is not linear in ``c``: ``v`` (hence ``D``) and ``clip`` depend on the
total gradient. :func:`gradient_sum` recovers ``Σ_i g_i`` from the directions, so the exact AdamW
step at any ``c`` can be rebuilt (:func:`deltaH.updates.directions.directions_from_grads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch, compact
from deltaH.errors import ArgumentError, BatchError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.updates.adamw import AdamWState
from deltaH.updates.directions import UpdateDirections

__all__ = ["bonus_direction", "bonus_token_weights", "entropy_bonus_grad", "gradient_sum"]


def bonus_token_weights(
    n_tokens: Tensor, micro_batch: Tensor, grad_accum_steps: int, world_size: int = 1
) -> Tensor:
    """``w [M, T_max]`` (float64): ``1/(W·A·|m|)`` at each of row ``i``'s ``n_tokens[i]`` loss tokens.

    ``micro_batch [M]``: any integer label of the (rank, micro-batch) each row was in; ``|m|`` is the
    total of ``n_tokens`` over the rows sharing the label (TRL clamps it at 1; an empty micro-batch has
    no rows). ``grad_accum_steps`` ``A``: micro-batches per rank per step; ``world_size`` ``W``.
    """
    if int(grad_accum_steps) < 1 or int(world_size) < 1:
        raise ArgumentError(
            f"grad_accum_steps and world_size must be >= 1, got {grad_accum_steps}, {world_size}")
    if micro_batch.shape != n_tokens.shape:
        raise BatchError(
            f"micro_batch {tuple(micro_batch.shape)} and n_tokens {tuple(n_tokens.shape)} differ")
    tok = n_tokens.double().cpu()
    _, label = torch.unique(micro_batch.cpu(), return_inverse=True)
    n_mb = int(label.max()) + 1 if label.numel() else 0
    per_mb = torch.zeros(n_mb, dtype=torch.float64).index_add_(0, label, tok)
    scale = 1.0 / (int(grad_accum_steps) * int(world_size) * per_mb.clamp(min=1.0)[label])  # [M]
    t_max = max(int(tok.max()) if tok.numel() else 0, 1)
    live = torch.arange(t_max).unsqueeze(0) < n_tokens.cpu().unsqueeze(1)
    return live.double() * scale.unsqueeze(1)


def entropy_bonus_grad(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    weights: Tensor,
    *,
    temperature: float = 1.0,
    seq_chunk: int = 8,
) -> tuple[dict[str, Tensor], float]:
    """``(∇_θ H_U, H_U)`` for ``H_U = Σ_{i,k} w_{i,k} H_{i,k}`` (module docstring).

    ``weights [M, T_max]``: the ``k``-th scored token of row ``i`` at ``[i, k]`` (the layout of
    :func:`bonus_token_weights`); gradients are float64 trees over ``params`` (summed over chunks of
    ``seq_chunk`` sequences by ordinary backward).
    """
    n_tok = batch.n_tokens.cpu()
    if weights.dim() != 2 or weights.shape[0] != len(batch) or weights.shape[1] < int(n_tok.max()):
        raise BatchError(f"weights must be [{len(batch)}, >= {int(n_tok.max())}], got {tuple(weights.shape)}")
    policy = SamplingPolicy(temperature=float(temperature))
    names = list(params)
    grad = {n: torch.zeros(params[n].shape, dtype=torch.float64, device=params[n].device) for n in names}
    total = 0.0
    for s in range(0, len(batch), seq_chunk):
        c = compact(batch.select(slice(s, s + seq_chunk)))
        counts = torch.bincount(c.rows, minlength=c.n)
        k = torch.arange(c.rows.numel(), device=c.rows.device) - (counts.cumsum(0) - counts)[c.rows]
        w = weights[s + c.rows.cpu(), k.cpu()].to(c.ids.device)  # row-major, as compact lists them
        p = {n: t.detach().requires_grad_(True) for n, t in params.items()}
        with torch.enable_grad():
            logits = lm.head(p, lm.backbone(p, c.ids, c.position_ids)[c.rows, c.pred_pos])
            h = (policy.token_stats(logits, c.targets)[1].double() * w.double()).sum()
            gs = torch.autograd.grad(h, [p[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs, strict=True):
            if g is not None:
                grad[n] += g.double()
        total += float(h.detach())
    return grad, total


def bonus_direction(
    grad_h: Mapping[str, Tensor], update: UpdateDirections, state: AdamWState
) -> dict[str, Tensor]:
    """``ĉ_H = clip · P · ∇H_U`` per unit lr and unit coefficient (negated for ``maximize``), in the
    parameters' dtype, with ``P = update.precond`` and ``clip = update.clip_coef`` of this step."""
    out = {}
    for n, pre in update.precond.items():
        sign = -1.0 if state.hyper[n].maximize else 1.0
        out[n] = (sign * update.clip_coef * pre.double() * grad_h[n].to(pre.device).double()).to(
            update.full[n].dtype)
    return out


def gradient_sum(
    grad_part: Mapping[str, Tensor], update: UpdateDirections, state: AdamWState
) -> dict[str, Tensor]:
    """The loss gradient ``Σ_i g_i`` (float64) behind a gradient part of the directions: inverts
    ``grad_part = −clip · P · Σ_i g_i`` (× −1 if maximize), e.g. ``update.grad`` → the step's
    gradient, ``replay.grad_kl`` → its KL term's."""
    out = {}
    for n, part in grad_part.items():
        sign = -1.0 if state.hyper[n].maximize else 1.0
        out[n] = -part.double() / (sign * update.clip_coef * update.precond[n].double())
    return out


def micro_batch_labels(sizes: Sequence[int]) -> Tensor:
    """``[Σ sizes]`` labels ``0, 0, …, 1, …``: the micro-batch of each row of a batch whose
    micro-batches hold ``sizes`` rows, in order."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.as_tensor(list(sizes), dtype=torch.long))
