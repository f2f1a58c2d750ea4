"""RL losses on the update batch U, normalised exactly as the trainer does (docs/math.md#rl-losses).

U holds ``B`` prompts × ``G`` responses, rows prompt-major. Advantages (TRL's rule)::

    A[b, g] = r[b, g] − mean_g r[b, g]          then ÷ (std + 1e-4) with the unbiased std over
                                                the group ("group", TRL's default), over the whole
                                                batch ("batch"), or not at all ("none")

The update is taken at the checkpoint, on-policy, so PPO ratios are 1 and the clipped surrogate's
gradient is the policy gradient. Token log-probs are ``log softmax(z/τ)`` (temperature, no top-p).
Every loss is ``L = Σ_i coef_i · S_i`` with ``S_i = Σ_{t∈R_i} log π(y_t)`` and one coefficient per
sequence (``n_acc`` = gradient-accumulation steps; U split into ``n_acc`` consecutive, equal
micro-batches of ``n_mb`` sequences and ``T_mb`` response tokens):

| loss_type | ``coef_i``                                   |
| --------- | -------------------------------------------- |
| grpo      | ``−A_i / (|o_i| · n_mb · n_acc)``            |
| dr_grpo   | ``−A_i / (n_mb · L_max · n_acc)``            |
| dapo      | ``−A_i / Σ_j |o_j|``  (whole generation batch) |
| bnpo      | ``−A_i / (T_mb(i) · n_acc)``                 |

With ``n_acc = 1`` these are the formulas of docs/math.md#rl-losses (``n_mb = B·G``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltaH._choices import LOSS_TYPES as LOSS_TYPES
from deltaH._choices import SCALE_REWARDS as SCALE_REWARDS
from deltaH._choices import check_choice
from deltaH.errors import ArgumentError, BatchError


def advantages(rewards: Tensor, scale_rewards: str = "group") -> Tensor:
    """Group-relative advantages ``[B, G]`` from rewards ``[B, G]`` (TRL's rule, see module doc)."""
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if rewards.dim() != 2:
        raise BatchError(f"rewards must be [B, G] (prompts × responses), got shape {tuple(rewards.shape)}")
    r = rewards.double()
    adv = r - r.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        std = r.std(dim=1, keepdim=True) if r.shape[1] > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + 1e-4)
    elif scale_rewards == "batch":
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype)
        adv = adv / (std + 1e-4)
    return adv


def loss_coefficients(
    n_tokens: Tensor,
    adv: Tensor,
    *,
    loss_type: str = "dapo",
    grad_accum_steps: int = 1,
    max_completion_length: int | None = None,
) -> Tensor:
    """Per-sequence coefficients ``coef [N]`` with ``L = Σ_i coef_i · Σ_t log π(y_t)`` (module doc).

    ``n_tokens [N]`` response lengths, ``adv [N]`` advantages (flattened prompt-major).
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    n = int(n_tokens.shape[0])
    if adv.shape != n_tokens.shape:
        raise BatchError(f"advantages have shape {tuple(adv.shape)} but n_tokens has {tuple(n_tokens.shape)}")
    if bool((adv == 0).all()):
        raise BatchError(
            "every advantage in the update batch is zero (all groups have equal rewards): the policy "
            "gradient is zero; sample more responses per prompt or use other prompts"
        )
    acc = int(grad_accum_steps)
    if acc < 1 or n % acc:
        raise ArgumentError(
            f"grad_accum_steps={grad_accum_steps!r} must be >= 1 and divide the number of update "
            f"sequences ({n}) into equal micro-batches"
        )
    tok = n_tokens.double()
    a = adv.double()
    n_mb = n // acc
    if loss_type == "grpo":
        return -a / (tok * n_mb * acc)
    if loss_type == "dr_grpo":
        if max_completion_length is None or int(max_completion_length) < 1:
            raise ArgumentError(
                "loss_type='dr_grpo' needs max_completion_length (the trainer's max new tokens)"
            )
        return -a / (n_mb * int(max_completion_length) * acc)
    if loss_type == "dapo":
        return -a / tok.sum()
    t_mb = tok.view(acc, n_mb).sum(1).repeat_interleave(n_mb)  # bnpo
    return -a / (t_mb * acc)
