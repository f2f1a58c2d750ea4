"""TRL 1.16 ``GRPOTrainer``'s loss on one recorded micro-batch as per-token weights
(docs/math.md#replaying-a-recorded-step).

Every term of TRL's GRPO loss depends on θ only through the per-token log-probs ``logp [B, T]``
of the completion tokens (the masks are computed from detached values), so the gradient of one
micro-batch's loss ``L`` is a weighted sum of token log-prob gradients::

    ∇_θ L = Σ_{b,t} w[b, t] · ∇_θ logp[b, t],     w[b, t] = ∂L / ∂logp[b, t]

:func:`micro_batch_weights` gets ``w`` by autograd through a literal transcription of
``GRPOTrainer._compute_loss`` (``trl/trainer/grpo_trainer.py``, TRL 1.16, lines 3020–3290) on a
leaf tensor of log-probs, split into the policy-gradient part and the ``β·KL`` part. Options the
transcription does not cover are refused by :func:`check_supported` with an
:class:`~deltaH.errors.UnsupportedOptionError` naming them, never replaced by another gradient.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from deltaH.errors import UnsupportedOptionError
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, OPTIONAL_FIELDS, RecordedStep, TrainerOptions

__all__ = [
    "CLIP_LOSS_TYPES",
    "SUPPORTED_LOSS_TYPES",
    "MicroBatchWeights",
    "check_supported",
    "micro_batch_weights",
]

#: ``loss_type`` values whose TRL 1.16 formula is reproduced literally.
SUPPORTED_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo")
#: Loss types with the PPO clipped surrogate (and TRL's ``clip_ratio/*`` metrics).
CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _refuse(option: str, value: Any, supported: str) -> UnsupportedOptionError:
    return UnsupportedOptionError(
        f"trainer option {option}={value!r} is not reproduced by deltaH's replay: {supported}"
    )


def check_supported(options: TrainerOptions, steps: RecordedStep | Sequence[RecordedStep] = ()) -> None:
    """Raise :class:`~deltaH.errors.UnsupportedOptionError` for any option the replay would get wrong.

    ``steps`` (one :class:`RecordedStep` per rank, optional) are checked for what the options alone
    cannot tell: their number against ``world_size``, extra micro-batch inputs (images, ...), and
    the number of micro-batches against ``gradient_accumulation_steps``.
    """
    o = options
    if o.trainer != "GRPOTrainer":
        raise _refuse("trainer", o.trainer, "only TRL's GRPOTrainer is supported")
    if o.loss_type == "vespo":
        raise _refuse(
            "loss_type",
            o.loss_type,
            f"VESPO's gamma weights are not reproduced yet; supported: {', '.join(SUPPORTED_LOSS_TYPES)}",
        )
    if o.loss_type not in SUPPORTED_LOSS_TYPES:
        raise _refuse("loss_type", o.loss_type, f"supported: {', '.join(SUPPORTED_LOSS_TYPES)}")
    if o.importance_sampling_level not in ("token", "sequence"):
        raise _refuse("importance_sampling_level", o.importance_sampling_level, "supported: token, sequence")
    if o.entropy_coef != 0.0 or o.use_adaptive_entropy:
        name, val = (
            ("use_adaptive_entropy", True) if o.use_adaptive_entropy else ("entropy_coef", o.entropy_coef)
        )
        raise _refuse(
            name,
            val,
            "the entropy bonus is not reproduced yet; supported: entropy_coef=0 and "
            "use_adaptive_entropy=False",
        )
    aux = o.extra.get("router_aux_loss_coef")
    if aux not in (None, 0, 0.0):
        raise _refuse(
            "router_aux_loss_coef", aux, "the MoE load-balancing loss is not reproduced; supported: None or 0"
        )
    if o.extra.get("disable_dropout") is False:
        raise _refuse(
            "disable_dropout",
            False,
            "with dropout the trainer's forward passes were random; "
            "supported: disable_dropout=True (TRL's default)",
        )
    if o.loss_type == "sapo":
        missing = [k for k in ("sapo_temperature_pos", "sapo_temperature_neg") if o.extra.get(k) is None]
        if missing:
            raise _refuse(
                "loss_type",
                "sapo",
                f"sapo needs {' and '.join(missing)} in the recorded options "
                "(TrainerOptions.extra); record them with the step",
            )
    if o.loss_type == "dr_grpo" and not (o.max_completion_length or 0) >= 1:
        raise _refuse(
            "max_completion_length",
            o.max_completion_length,
            "dr_grpo divides by it: record the trainer's max_completion_length (>= 1)",
        )
    if o.loss_type in ("dapo", "cispo") and not (o.steps_per_generation or 0) >= 1:
        raise _refuse(
            "steps_per_generation",
            o.steps_per_generation,
            f"{o.loss_type} rescales num_items_in_batch by it: record the trainer's resolved value (>= 1)",
        )
    if not 0.0 <= o.top_entropy_quantile <= 1.0:
        raise _refuse("top_entropy_quantile", o.top_entropy_quantile, "must lie in [0, 1]")
    if o.top_entropy_quantile < 1.0 and o.world_size > 1:
        raise _refuse(
            "top_entropy_quantile",
            o.top_entropy_quantile,
            f"with world_size={o.world_size} the "
            "entropy threshold is a quantile over every rank's tokens; supported: one process",
        )
    for name in ("epsilon_low", "epsilon_high", "beta"):
        val = getattr(o, name)
        if val is not None and not math.isfinite(float(val)):
            raise _refuse(name, val, "must be finite")
    steps = [steps] if isinstance(steps, RecordedStep) else list(steps)
    if not steps:
        return
    if len(steps) != o.world_size:
        raise _refuse(
            "world_size",
            o.world_size,
            f"{len(steps)} recorded rank(s) were given: pass one RecordedStep per rank of the run",
        )
    known = set(MICRO_BATCH_FIELDS) | set(OPTIONAL_FIELDS)
    for s in steps:
        n_mb = len(s.micro_batches)
        if not 1 <= n_mb <= o.gradient_accumulation_steps:
            raise _refuse(
                "gradient_accumulation_steps",
                o.gradient_accumulation_steps,
                f"rank {s.rank} recorded {n_mb} micro-batches for step {s.step}; an optimizer step "
                "has between 1 and gradient_accumulation_steps of them",
            )
        for j, mb in enumerate(s.micro_batches):
            other = sorted(set(mb) - known)
            if other:
                raise _refuse(
                    f"micro-batch input '{other[0]}'",
                    "present",
                    f"rank {s.rank} micro-batch {j} has inputs deltaH does not feed the model "
                    f"({', '.join(other)}); supported: text-only batches with "
                    f"{', '.join(MICRO_BATCH_FIELDS + OPTIONAL_FIELDS)}",
                )


@dataclass(frozen=True)
class MicroBatchWeights:
    """Per-token weights of one micro-batch's loss (all ``[B, T]`` float64, zero outside the loss mask).

    ``pg``: ``∂L/∂logp`` of everything but the KL term; ``kl``: of ``β·KL`` (None when ``β = 0``);
    ``w = pg + kl`` exactly. ``loss``: the value TRL's ``_compute_loss`` returns. ``stats``: the
    inputs of TRL's ``clip_ratio/*`` (or ``cispo_clip_ratio``) metrics — ``name → [sum, count]``
    for the means and ``name → [B]`` per-sequence means (NaN for rows without loss tokens) for
    ``clip_ratio/low_min`` and ``clip_ratio/high_max``. ``max_ratio_dev``: ``max |r − 1|`` of the
    raw importance ratio ``r = exp(log_importance_weights)`` over the loss tokens (sequences
    for ``importance_sampling_level="sequence"``), 0.0 when there are none.
    """

    pg: Tensor
    kl: Tensor | None
    loss: float
    stats: dict[str, Tensor]
    max_ratio_dev: float

    @property
    def total(self) -> Tensor:
        """``w = pg + kl`` ``[B, T]``."""
        return self.pg if self.kl is None else self.pg + self.kl


def micro_batch_weights(
    mb: Mapping[str, Any],
    logp: Tensor,
    options: TrainerOptions,
    *,
    grad_accum: int,
    entropies: Tensor | None = None,
) -> MicroBatchWeights:
    """Weights ``w[b, t] = ∂L/∂logp[b, t]`` of one micro-batch ``mb`` (a validated recorded micro-batch).

    ``logp [B, T]``: per-token log-probs of the completion tokens at θ (``log softmax(z/τ)``; any
    value where ``completion_mask`` is 0). ``grad_accum``: the trainer's
    ``current_gradient_accumulation_steps`` (micro-batches in this optimizer step). ``entropies
    [B, T]``: per-token entropies of ``softmax(z/τ)`` at θ, needed when ``top_entropy_quantile < 1``.
    ``L`` is the loss ``_compute_loss`` returns on one rank (with ``options.world_size`` processes);
    DDP's average over ranks is the caller's.
    """
    o = options
    dev = logp.device

    def f64(x: Tensor) -> Tensor:
        return x.to(device=dev, dtype=torch.float64)

    lp = f64(logp.detach()).requires_grad_(True)
    per_token_logps = lp
    completion_mask = f64(mb["completion_mask"])
    mask = completion_mask if mb.get("tool_mask") is None else completion_mask * f64(mb["tool_mask"])  # 3027
    if o.top_entropy_quantile < 1.0:  # 3049-3052, get_high_entropy_mask 1380-1416 (one process)
        if entropies is None:
            raise ValueError("top_entropy_quantile < 1 needs the per-token entropies at θ")
        entropy_mask: Tensor | None = _high_entropy_mask(
            f64(entropies.detach()), mask, 1 - o.top_entropy_quantile
        )
    else:
        entropy_mask = None
    advantages = f64(mb["advantages"])  # 3055-3059
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = mb.get("old_per_token_logps")  # 3065-3066
    old_per_token_logps = per_token_logps.detach() if old is None else f64(old)
    if o.off_policy_mask_threshold is not None:  # 3068-3081, get_off_policy_mask 2945-2969
        sampling = mb.get("sampling_per_token_logps")
        sampling = old_per_token_logps if sampling is None else f64(sampling)
        kl_div = torch.nan_to_num(sampling - per_token_logps.detach(), nan=0.0)
        seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (seq_kl <= o.off_policy_mask_threshold)).to(mask.dtype)
    log_ratio = per_token_logps - old_per_token_logps  # 3083-3093
    if o.importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)  # 3095
    ratio = coef_1.detach()
    per_token_kl = None
    if o.beta != 0.0:  # 3098-3105
        ref = f64(mb["ref_per_token_logps"])
        per_token_kl = torch.exp(ref - per_token_logps) - (ref - per_token_logps) - 1
        if o.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    eps_low = float(o.epsilon_low)
    eps_high = eps_low if o.epsilon_high is None else float(o.epsilon_high)
    if o.loss_type == "cispo":  # 3109-3111
        clamped_ratios = torch.clamp(coef_1, max=eps_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif o.loss_type in CLIP_LOSS_TYPES:  # 3112-3120
        coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
        if o.delta is not None:
            coef_1 = torch.clamp(coef_1, max=o.delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    else:  # sapo, 3121-3124
        temps = torch.where(
            advantages > 0, float(o.extra["sapo_temperature_pos"]), float(o.extra["sapo_temperature_neg"])
        )
        per_token_loss = -(torch.sigmoid(temps * (coef_1 - 1)) * 4 / temps) * advantages
    if o.off_policy_mask_threshold is not None:  # 3140-3147
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if o.use_vllm and o.vllm_importance_sampling_correction:
        per_token_loss = per_token_loss * f64(mb["importance_sampling_ratio"])
    # 3149-3150: per_token_loss + β·KL; the aggregation below (3153-3184) is linear in it, so the
    # KL part's weights come from the same aggregation of β·KL alone.
    kl_term = None if per_token_kl is None else o.beta * per_token_kl
    total = per_token_loss if kl_term is None else per_token_loss + kl_term
    loss = _aggregate(total, mask, mb, o, grad_accum)
    (w,) = torch.autograd.grad(loss, lp, retain_graph=kl_term is not None)
    w_kl = None
    if kl_term is not None:
        (w_kl,) = torch.autograd.grad(_aggregate(kl_term, mask, mb, o, grad_accum), lp)
    live = (
        mask.bool().expand(ratio.shape[0], mask.shape[1]) if ratio.shape[1] > 1 else mask.bool().any(1, True)
    )
    dev_r = (ratio - 1).abs()[live]
    return MicroBatchWeights(
        pg=w if w_kl is None else w - w_kl,
        kl=w_kl,
        loss=float(loss.detach()),
        stats=_clip_stats(coef_1.detach(), advantages, mask, o.loss_type, eps_low, eps_high),
        max_ratio_dev=float(dev_r.max()) if dev_r.numel() else 0.0,
    )


def _aggregate(
    ptl: Tensor, mask: Tensor, mb: Mapping[str, Any], o: TrainerOptions, grad_accum: int
) -> Tensor:
    """TRL's loss-type normalisation in train mode (grpo_trainer.py 3153-3184)."""
    if o.loss_type in ("grpo", "sapo"):
        return ((ptl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    if o.loss_type == "bnpo":
        return (ptl * mask).sum() / mask.sum().clamp(min=1.0) / grad_accum
    if o.loss_type == "dr_grpo":
        assert o.max_completion_length is not None  # check_supported
        return (ptl * mask).sum() / (ptl.size(0) * o.max_completion_length) / grad_accum
    if o.loss_type in ("dapo", "cispo"):
        assert o.steps_per_generation is not None  # check_supported
        n_items = torch.as_tensor(mb["num_items_in_batch"], dtype=torch.float64, device=ptl.device)
        normalizer = n_items.clamp(min=1.0) / o.world_size
        normalizer = normalizer * grad_accum / o.steps_per_generation
        return (ptl * mask).sum() / normalizer
    return (ptl * mask).sum(-1).mean() / grad_accum  # luspo


def _high_entropy_mask(entropies: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """``GRPOTrainer.get_high_entropy_mask`` (1380-1416) with one process: quantile in float32, as TRL."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, threshold)
    return ((entropies * mask.float()) >= entropy_threshold) & mask.bool()


def _clip_stats(
    coef_1: Tensor, adv: Tensor, mask: Tensor, loss_type: str, eps_low: float, eps_high: float
) -> dict[str, Tensor]:
    """Inputs of TRL's clip metrics (3254-3286): ``[sum, count]`` per mean, per-sequence means."""

    def sum_count(x: Tensor) -> Tensor:  # global_masked_mean before its cross-rank reduce
        if x.shape[1] == 1:
            return torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype, device=x.device)])
        return torch.stack([(x * mask).sum(), mask.sum()])

    def seq_mean(x: Tensor) -> Tensor:  # masked_seq_mean (0/0 = NaN for empty rows, as TRL)
        return x.squeeze(1) if x.shape[1] == 1 else (x * mask).sum(-1) / mask.sum(-1)

    if loss_type == "cispo":
        return {"cispo_clip_ratio": sum_count(((coef_1 > eps_high) & (adv > 0)).double())}
    if loss_type not in CLIP_LOSS_TYPES:
        return {}
    low = ((coef_1 < 1 - eps_low) & (adv < 0)).double()
    high = ((coef_1 > 1 + eps_high) & (adv > 0)).double()
    region = torch.maximum(low, high)
    return {
        "clip_ratio/low_mean": sum_count(low),
        "clip_ratio/high_mean": sum_count(high),
        "clip_ratio/region_mean": sum_count(region),
        "clip_ratio/low_min": seq_mean(low),
        "clip_ratio/high_max": seq_mean(high),
    }
