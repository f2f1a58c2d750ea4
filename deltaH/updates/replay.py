"""The optimizer step a TRL ``GRPOTrainer`` took, replayed from its recorded micro-batches
(docs/math.md#replaying-a-recorded-step).

For every recorded micro-batch (every rank, in order): the completion tokens' log-probs ``logp``
(and entropies, for ``top_entropy_quantile < 1``) at θ by teacher forcing; the per-token weights
``w = ∂L/∂logp`` of TRL's loss (:mod:`deltaH.updates.trl_objective`), divided by ``world_size``
because DDP averages the ranks' gradients; per-sequence gradients ``g_i = ∇_θ Σ_t w_{i,t}·logp_{i,t}``
(``vmap``); and the AdamW step of ``Σ_i g_i`` decomposed per sequence
(:func:`~deltaH.updates.directions.directions_from_grads`)::

    ∇_θ L_step = Σ_ranks Σ_micro-batches ∇_θ L_mb / world_size = Σ_i g_i
    lr · update.full = the real Δθ   (same optimizer state, clipping and lr)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch, compact
from deltaH.errors import BatchError, CheckpointError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, trainer_logprob
from deltaH.stats import share_mode
from deltaH.updates._replay_checks import check_micro_batch, check_model, check_shift_invariance, check_steps
from deltaH.updates.adamw import AdamWState
from deltaH.updates.directions import UpdateDirections, directions_from_grads
from deltaH.updates.grads import sequence_logprob_grads
from deltaH.updates.recorded import RecordedStep
from deltaH.updates.trl_objective import MicroBatchWeights, micro_batch_weights

__all__ = ["ReplayDirections", "replay_directions"]


@dataclass(frozen=True)
class ReplayDirections:
    """A replayed optimizer step (module docstring); ``M`` update sequences, ``T`` their most loss tokens.

    ``update``: the step's directions per unit lr; its ``components [M, ...]`` are per sequence
    (``Σ_i ĉ_i + baseline = full``) and its ``coef [M]`` holds ``Σ_t w_{i,t}`` (the sequence's
    total token weight, ``world_size`` division included).

    ``batch``: the sequences that have at least one loss token (``completion_mask × tool_mask``),
    ranks then micro-batches in order, on the model's device; its scored tokens are the loss
    tokens. ``rows [M, 3]``: the ``(rank, micro-batch, row)`` each sequence came from.
    ``advantages [M]``: the recorded advantage (per-token advantages ``[B, T]``: their mean over
    the row's loss tokens).

    ``token_weights [M, T]`` and ``logp [M, T]`` (float64, CPU): ``w = w_pg + w_kl`` and
    ``log softmax(z/τ)`` at θ of the ``k``-th loss token of row ``i`` at ``[i, k]``, zero-padded
    (the layout :func:`~deltaH.updates.grads.sequence_logprob_grads` takes).

    ``grad_pg``, ``grad_kl``: the gradient part ``update.grad`` split into the policy term and the
    ``β·KL`` term (``grad_kl`` is None when ``β = 0``); ``grad_pg + grad_kl = update.grad``.

    ``clip``: TRL's logged ``clip_ratio/*`` (or ``cispo_clip_ratio``) for this step, each
    micro-batch's value reduced over ranks, then averaged over micro-batches, NaNs dropped.
    ``max_ratio_dev``: ``max |r − 1|`` of the importance ratio over all loss tokens (0 on-policy).
    ``loss``: the loss the Trainer logs for the step (Σ over micro-batches, mean over ranks).
    """

    update: UpdateDirections
    batch: SequenceBatch
    rows: Tensor
    advantages: Tensor
    token_weights: Tensor
    grad_pg: dict[str, Tensor]
    grad_kl: dict[str, Tensor] | None
    clip: dict[str, float]
    max_ratio_dev: float
    logp: Tensor
    loss: float


def replay_directions(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    steps: RecordedStep | Sequence[RecordedStep],
    state: AdamWState,
    *,
    seq_chunk: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
    share_prompts: str = "auto",
) -> ReplayDirections:
    """Directions of the recorded step ``steps`` (one :class:`RecordedStep`, or one per rank).

    ``params``: θ before the step (the checkpoint the step started from); ``state``: the AdamW
    state before it. Every input is validated before any forward pass. ``on_progress(done,
    total)`` reports the per-sequence gradients. ``share_prompts`` (``auto | on | off``,
    :func:`deltaH.stats.share_mode`): the teacher-forced log-probs run each repeated prompt once per
    chunk (the per-sequence gradients do not share).
    """
    share = share_mode(lm, share_prompts)
    ranks = check_steps(steps)
    o = ranks[0].options
    lm.check_names(params)
    missing = [n for n in params if n not in state.names]
    if missing:
        raise CheckpointError(
            f"optimizer state has no entry for trainable parameter '{missing[0]}' ({len(missing)} missing): "
            "the state does not belong to this model (or its trainable set differs)"
        )
    check_model(lm, o)
    for s in ranks:
        for j, mb in enumerate(s.micro_batches):
            check_micro_batch(mb, f"rank {s.rank} micro-batch {j}", o)

    if any(bool((mb["prompt_mask"] == 0).any()) for s in ranks for mb in s.micro_batches):
        check_shift_invariance(lm, params)
    if not any(bool(_loss_mask(mb).any()) for s in ranks for mb in s.micro_batches):
        raise BatchError(
            "the recorded step has no loss token (every completion_mask × tool_mask is zero): "
            "its gradient is zero and there is nothing to decompose"
        )

    n_acc = len(ranks[0].micro_batches)  # the Trainer's current_gradient_accumulation_steps
    parts: list[_Rows] = []
    mbw: list[list[MicroBatchWeights]] = []
    for s in ranks:
        mbw.append([])
        for j, mb_any in enumerate(s.micro_batches):
            mb = {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in mb_any.items()}
            logp, ent = _teacher_forced(
                lm, params, mb, o.temperature, o.top_entropy_quantile < 1.0, seq_chunk, share
            )
            w = micro_batch_weights(mb, logp, o, grad_accum=n_acc, entropies=ent)
            mbw[-1].append(w)
            parts.append(_rows(mb, s.rank, j, logp, w, o.world_size))
    batch, rows, adv, weights, logps = _stack(parts)
    batch = batch.to(lm.device)

    names = list(params)
    w_in = weights[0] if o.beta == 0.0 else torch.stack(weights, 1)  # [M, T] or [M, 2, T]: pg, kl
    g, _ = sequence_logprob_grads(
        lm,
        params,
        batch,
        temperature=o.temperature,
        names=names,
        seq_chunk=seq_chunk,
        on_progress=on_progress,
        token_weights=w_in,
    )
    per_seq = g if o.beta == 0.0 else {n: t[:, 0] + t[:, 1] for n, t in g.items()}
    total_w = weights[0] + weights[1]
    mgn = o.max_grad_norm if o.max_grad_norm is not None and o.max_grad_norm > 0 else None
    update = directions_from_grads(params, per_seq, state, coef=total_w.sum(1), max_grad_norm=mgn)
    if o.beta == 0.0:
        grad_pg, grad_kl = _unit_grad(g, update, state), None
    else:
        grad_pg = _unit_grad({n: t[:, 0] for n, t in g.items()}, update, state)
        grad_kl = _unit_grad({n: t[:, 1] for n, t in g.items()}, update, state)
    clip, max_dev, loss = _step_stats(mbw)
    return ReplayDirections(
        update=update,
        batch=batch,
        rows=rows,
        advantages=adv,
        token_weights=total_w,
        grad_pg=grad_pg,
        grad_kl=grad_kl,
        clip=clip,
        max_ratio_dev=max_dev,
        logp=logps,
        loss=loss,
    )


# ------------------------------------------------------------------------------------ the work
def _teacher_forced(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    mb: Mapping[str, Any],
    temperature: float,
    need_entropy: bool,
    seq_chunk: int,
    share: str = "off",
) -> tuple[Tensor, Tensor | None]:
    """``logp [B, T]`` and entropies ``[B, T]`` (or None) of ``softmax(z/τ)`` at the completion tokens
    (``completion_mask`` 1; 0 elsewhere, as TRL's fused head returns them), float64 on CPU."""
    pm, cm = mb["prompt_mask"].bool(), mb["completion_mask"].bool()
    b, p, t = cm.shape[0], pm.shape[1], cm.shape[1]
    logp = torch.zeros(b, t, dtype=torch.float64)
    ent = torch.zeros(b, t, dtype=torch.float64) if need_entropy else None
    live = cm.any(1).nonzero().flatten()
    if not live.numel():
        return logp, ent
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)[live].long()
    am = torch.cat([pm, cm], 1)[live]
    rm = torch.cat([torch.zeros_like(pm), cm], 1)[live]
    policy = SamplingPolicy(temperature=temperature)
    dev = lm.device
    with torch.no_grad():
        for s in range(0, len(live), seq_chunk):
            sub = SequenceBatch(ids[s : s + seq_chunk], am[s : s + seq_chunk], rm[s : s + seq_chunk]).to(dev)
            c = compact(sub, share)
            logits = lm.head(params, lm.hidden(params, c)[c.rows, c.pred_pos])
            r, col = rm[s : s + seq_chunk].nonzero(as_tuple=True)  # same row-major order as c.rows
            rows = live[s + r]
            logp[rows, col - p] = trainer_logprob(logits, c.targets, temperature).double().cpu()
            if ent is not None:
                ent[rows, col - p] = policy.token_stats(logits, c.targets)[1].double().cpu()
    return logp, ent


@dataclass(frozen=True)
class _Rows:
    """The rows of one micro-batch with at least one loss token, weights in loss-token order."""

    ids: Tensor
    am: Tensor
    rm: Tensor
    rows: Tensor
    adv: Tensor
    w_pg: Tensor
    w_kl: Tensor
    logp: Tensor


def _loss_mask(mb: Mapping[str, Any]) -> Tensor:
    """``[B, T]`` bool: the tokens TRL's loss reads (``completion_mask × tool_mask``)."""
    cm = mb["completion_mask"].bool()
    return cm if mb.get("tool_mask") is None else cm & mb["tool_mask"].bool()


def _rows(mb: Mapping[str, Any], rank: int, j: int, logp: Tensor, w: MicroBatchWeights, world: int) -> _Rows:
    pm, cm = mb["prompt_mask"].bool(), mb["completion_mask"].bool()
    lm_ = _loss_mask(mb)
    keep = lm_.any(1).nonzero().flatten()
    lmk = lm_[keep]
    n = lmk.sum(1)
    t_max = int(n.max()) if keep.numel() else 0
    slot = torch.arange(max(t_max, 1)).unsqueeze(0) < n.unsqueeze(1)  # [m, T_max] k < n_i

    def pack(x: Tensor) -> Tensor:  # [B, T] completion layout → [m, T_max] loss-token order
        out = torch.zeros(len(keep), max(t_max, 1), dtype=torch.float64)
        out[slot] = x[keep][lmk].double()
        return out

    adv = mb["advantages"].double()
    adv = adv[keep] if adv.dim() == 1 else (adv[keep] * lmk).sum(1) / n
    kl = w.kl if w.kl is not None else torch.zeros_like(w.pg)
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)[keep].long()
    rows = torch.stack([torch.full_like(keep, rank), torch.full_like(keep, j), keep], 1)
    return _Rows(
        ids=ids,
        am=torch.cat([pm, cm], 1)[keep],
        rm=torch.cat([torch.zeros_like(pm), lm_], 1)[keep],
        rows=rows,
        adv=adv,
        w_pg=pack(w.pg / world),
        w_kl=pack(kl / world),
        logp=pack(logp),
    )


def _stack(parts: list[_Rows]) -> tuple[SequenceBatch, Tensor, Tensor, tuple[Tensor, Tensor], Tensor]:
    parts = [p for p in parts if len(p.rows)]
    width = max(int(p.ids.shape[1]) for p in parts)
    t = max(int(p.w_pg.shape[1]) for p in parts)

    def cat(get: Callable[[_Rows], Tensor], to: int) -> Tensor:
        return torch.cat([torch.nn.functional.pad(get(p), (0, to - get(p).shape[1])) for p in parts])

    batch = SequenceBatch(cat(lambda p: p.ids, width), cat(lambda p: p.am, width), cat(lambda p: p.rm, width))
    return (
        batch,
        torch.cat([p.rows for p in parts]),
        torch.cat([p.adv for p in parts]),
        (cat(lambda p: p.w_pg, t), cat(lambda p: p.w_kl, t)),
        cat(lambda p: p.logp, t),
    )


def _unit_grad(
    per_seq: Mapping[str, Tensor], update: UpdateDirections, state: AdamWState
) -> dict[str, Tensor]:
    """``Σ_i ĉ_i`` of the gradients ``per_seq``: ``−(1−β1)·clip·Σ_i g_i / D`` (negated if maximize),
    with ``D`` and ``clip`` of the full step (``update.precond = (1−β1)/D``)."""
    out = {}
    for n, g in per_seq.items():
        sign = -1.0 if state.hyper[n].maximize else 1.0
        pre = update.precond[n]
        out[n] = g.sum(0).to(pre.dtype) * (-sign * update.clip_coef) * pre
    return out


def _step_stats(mbw: list[list[MicroBatchWeights]]) -> tuple[dict[str, float], float, float]:
    """TRL's logged clip metrics, ``max |r − 1|`` and the logged loss of one step (``mbw[rank][j]``)."""
    nan = float("nan")
    clip: dict[str, float] = {}
    for key in mbw[0][0].stats:
        vals = []
        for j in range(len(mbw[0])):
            xs = [r[j].stats[key] for r in mbw]
            if key.endswith(("_min", "_max")):  # nanmin / nanmax of every rank's per-sequence means
                x = torch.cat(xs)
                x = x[~x.isnan()]
                vals.append((x.min() if key.endswith("_min") else x.max()).item() if x.numel() else nan)
            else:  # global_masked_mean: Σ sums / Σ counts over ranks
                tot = torch.stack(xs).sum(0)
                vals.append(float(tot[0] / tot[1].clamp(min=1.0)))
        ok = [v for v in vals if v == v]
        clip[key] = sum(ok) / len(ok) if ok else nan
    max_dev = max(w.max_ratio_dev for r in mbw for w in r)
    loss = sum(w.loss for r in mbw for w in r) / len(mbw)
    return clip, max_dev, loss
