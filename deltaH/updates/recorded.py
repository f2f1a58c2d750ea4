"""A trainer's optimizer step as recorded: its micro-batches and the options its loss read.

Pure data (torch only, no files): :mod:`deltaH.io.steps` reads and writes it, the TRL mixin fills
it during training, and :func:`deltaH.updates.replay.replay_directions` turns it into the step's
directions. One ``RecordedStep`` holds what ``GRPOTrainer._prepare_inputs`` handed to
``compute_loss`` for every micro-batch of one optimizer step (gradient accumulation included), on
one rank.

Micro-batch fields (tensors, detached, on CPU once written; ``B`` rows, ``P`` prompt and ``T``
completion positions)::

    prompt_ids [B, P] long, prompt_mask [B, P]          (left-padded, as TRL pads prompts)
    completion_ids [B, T] long, completion_mask [B, T]   (right-padded; 0 after EOS, and for the
                                                          whole row with mask_truncated_completions)
    advantages [B] (or [B, T] for per-token advantages)
    num_items_in_batch []                                 (active tokens of the generation batch)
    old_per_token_logps, sampling_per_token_logps, importance_sampling_ratio,
    ref_per_token_logps, tool_mask [B, T]                 (only when the trainer produced them)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch

__all__ = ["MICRO_BATCH_FIELDS", "OPTIONAL_FIELDS", "RecordedStep", "TrainerOptions"]

#: Fields every recorded GRPO micro-batch has.
MICRO_BATCH_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                      "num_items_in_batch")
#: Fields recorded when the trainer's batch has them.
OPTIONAL_FIELDS = ("old_per_token_logps", "sampling_per_token_logps", "importance_sampling_ratio",
                   "ref_per_token_logps", "tool_mask")


@dataclass(frozen=True)
class TrainerOptions:
    """The trainer arguments the step's loss and update depend on (TRL ``GRPOConfig`` names).

    Defaults are TRL 1.16's ``GRPOConfig`` defaults (``epsilon_low`` is its ``epsilon``;
    ``epsilon_high`` defaults to it). ``extra`` keeps any other recorded argument as provenance.
    ``entropy_coef`` is the coefficient in effect when the step began (it moves between steps with
    ``use_adaptive_entropy``); ``router_aux_loss_coef`` the weight TRL resolved for a MoE model's
    auxiliary loss (0: none). ``world_size``: processes that trained (DDP averages their gradients).
    """

    trainer: str = "GRPOTrainer"
    loss_type: str = "dapo"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    beta: float = 0.0
    importance_sampling_level: str = "token"
    scale_rewards: str = "group"
    max_completion_length: int | None = 512
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    num_iterations: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = 0
    max_grad_norm: float | None = 1.0
    mask_truncated_completions: bool = False
    top_entropy_quantile: float = 1.0
    use_vllm: bool = False
    vllm_importance_sampling_correction: bool = True
    vllm_importance_sampling_mode: str | None = "sequence_mask"
    vllm_importance_sampling_clip_min: float | None = None
    vllm_importance_sampling_clip_max: float | None = 3.0
    off_policy_mask_threshold: float | None = None
    use_bias_correction_kl: bool = True
    entropy_coef: float = 0.0
    use_adaptive_entropy: bool = False
    cast_lm_head_to_fp32: bool = False
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    entropy_target: float = 0.2
    entropy_coef_min: float = 0.0
    entropy_coef_max: float = 1.0
    entropy_coef_delta: float = 0.005
    router_aux_loss_coef: float = 0.0
    world_size: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainerOptions:
        """Known names to fields, everything else to ``extra``."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in d.items() if k in names}
        extra = {**d.get("extra", {}), **{k: v for k, v in d.items() if k not in names and k != "extra"}}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RecordedStep:
    """The micro-batches of one optimizer step (``_prepare_inputs`` outputs, tensors detached).

    ``step`` is the Trainer's ``global_step`` after that step (as in its logs and checkpoint names);
    ``options`` the trainer's loss-relevant arguments; ``rank`` the process that recorded it;
    ``meta`` anything else the recorder knew (e.g. ``eos_token_id``, ``pad_token_id``).
    """

    step: int
    micro_batches: list[dict[str, Any]] = field(default_factory=list)
    options: TrainerOptions = field(default_factory=TrainerOptions)
    rank: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def advantages(self) -> Tensor:
        """``[N_U]`` advantages of every recorded sequence, micro-batches in order."""
        return torch.cat([mb["advantages"] for mb in self.micro_batches])

    def sequence_batch(self) -> tuple[SequenceBatch, Tensor] | None:
        """The step's update batch ``U`` as a ``SequenceBatch`` and its advantages ``[N_U]``.

        Rows are ``prompt ⧺ completion`` with the scored tokens those of the loss
        (``completion_mask``, times ``tool_mask`` when present); rows with none are dropped. None
        when advantages are per token (``[B, T]``), which the covariance proxy does not take.
        """
        rows: list[tuple[Tensor, Tensor, Tensor]] = []
        advs: list[Tensor] = []
        for mb in self.micro_batches:
            adv = mb["advantages"]
            if adv.dim() != 1:
                return None
            pm, cm = mb["prompt_mask"].bool(), mb["completion_mask"].bool()
            if "tool_mask" in mb and mb["tool_mask"] is not None:
                cm_scored = cm & mb["tool_mask"].bool()
            else:
                cm_scored = cm
            ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
            am = torch.cat([pm, cm], 1)
            rm = torch.cat([torch.zeros_like(pm), cm_scored], 1)
            keep = rm.any(1)
            rows.append((ids[keep], am[keep], rm[keep]))
            advs.append(adv[keep])
        if not rows or sum(int(r[0].shape[0]) for r in rows) == 0:
            return None
        t = max(int(r[0].shape[1]) for r in rows)
        pad = [tuple(torch.nn.functional.pad(x, (0, t - x.shape[1])) for x in r) for r in rows]
        ids, am, rm = (torch.cat([p[i] for p in pad]) for i in range(3))
        return SequenceBatch(ids.long(), am.bool(), rm.bool()), torch.cat(advs)
