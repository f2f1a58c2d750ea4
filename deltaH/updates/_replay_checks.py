"""Input checks of :func:`deltaH.updates.replay.replay_directions`: one-line errors before any forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from deltaH.errors import ArgumentError, BatchError, UnsupportedOptionError
from deltaH.functional import FunctionalLM
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, RecordedStep, TrainerOptions
from deltaH.updates.trl_objective import check_supported


def check_steps(steps: RecordedStep | Sequence[RecordedStep]) -> list[RecordedStep]:
    ranks = [steps] if isinstance(steps, RecordedStep) else list(steps)
    if not ranks or not all(isinstance(s, RecordedStep) for s in ranks):
        raise ArgumentError("steps must be a RecordedStep or a non-empty sequence of them (one per rank)")
    ranks = sorted(ranks, key=lambda s: s.rank)
    o = ranks[0].options
    for s in ranks[1:]:
        if s.options.to_dict() != o.to_dict():
            diff = sorted(k for k, v in s.options.to_dict().items() if o.to_dict().get(k) != v)
            raise ArgumentError(
                f"ranks {ranks[0].rank} and {s.rank} recorded different trainer options "
                f"({', '.join(diff)}): they must come from the same run"
            )
        if s.step != ranks[0].step:
            raise ArgumentError(
                f"rank {s.rank} recorded step {s.step}, rank {ranks[0].rank} step {ranks[0].step}: "
                "pass the same optimizer step of every rank"
            )
        if len(s.micro_batches) != len(ranks[0].micro_batches):
            raise ArgumentError(
                f"rank {s.rank} recorded {len(s.micro_batches)} micro-batches, rank "
                f"{ranks[0].rank} {len(ranks[0].micro_batches)}: every rank takes the same number"
            )
    check_supported(o, ranks)
    if [s.rank for s in ranks] != list(range(len(ranks))):
        raise ArgumentError(
            f"recorded ranks are {[s.rank for s in ranks]}; expected 0..{len(ranks) - 1}, once each"
        )
    if not o.temperature > 0:
        raise ArgumentError(f"recorded temperature={o.temperature!r} must be > 0")
    n_acc = ranks[0].meta.get("current_gradient_accumulation_steps")
    if n_acc is not None and int(n_acc) != len(ranks[0].micro_batches):
        raise ArgumentError(
            f"step {ranks[0].step}: meta says current_gradient_accumulation_steps={n_acc} but "
            f"{len(ranks[0].micro_batches)} micro-batches were recorded (some are missing)"
        )
    return ranks


def check_model(lm: FunctionalLM, o: TrainerOptions) -> None:
    """Refuse what TRL derives from the model: the MoE load-balancing loss (grpo_trainer.py 823-832)."""
    cfg = getattr(lm.model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    if text is not None and hasattr(text, "output_router_logits"):
        coef = o.extra.get("router_aux_loss_coef")
        coef = getattr(text, "router_aux_loss_coef", 0.0) if coef is None else coef
        if coef:
            raise UnsupportedOptionError(
                f"trainer option router_aux_loss_coef={coef!r} (from the MoE model's config) is not "
                "reproduced by deltaH's replay: the load-balancing loss adds to the gradient; supported: 0"
            )


def check_shift_invariance(lm: FunctionalLM, params: Mapping[str, Tensor]) -> None:
    """TRL's training forward passes no position ids, so HF numbers the left-padded rows from 0 at
    the first pad; deltaH's forward numbers each row's tokens from 0. Equal for relative (rotary)
    positions only: a model whose logits change when every position is shifted is refused."""
    ids = torch.arange(4, device=lm.device).unsqueeze(0) % max(lm.vocab_size, 1)
    pos = torch.arange(4, device=lm.device).unsqueeze(0)
    with torch.no_grad():
        a, b = (lm.head(params, lm.backbone(params, ids, pos + k)).float() for k in (0, 3))
    if not torch.allclose(a, b, rtol=1e-3, atol=1e-4):
        raise UnsupportedOptionError(
            f"{type(lm.model).__name__} uses absolute positions: TRL's training forward shifts them by each "
            "row's left padding, which deltaH's replay does not reproduce; supported: rotary (relative) "
            "position models such as Llama or Qwen, or recordings without left padding"
        )


def check_micro_batch(mb: Mapping[str, Any], where: str, o: TrainerOptions) -> None:
    """One-line errors naming the micro-batch and the field, before any forward pass."""
    for f in MICRO_BATCH_FIELDS:
        if f not in mb or mb[f] is None:
            raise BatchError(
                f"{where} has no '{f}': the recording is incomplete (every micro-batch needs "
                f"{', '.join(MICRO_BATCH_FIELDS)})"
            )
    needed = []
    if o.beta != 0.0:
        needed.append(("ref_per_token_logps", f"beta={o.beta}"))
    if o.use_vllm and o.vllm_importance_sampling_correction:
        needed.append(("importance_sampling_ratio", "use_vllm with vllm_importance_sampling_correction"))
    for f, why in needed:
        if mb.get(f) is None:
            raise BatchError(
                f"{where} has no '{f}', which the loss reads with {why}: record it with the step"
            )
    for f, v in mb.items():
        if v is not None and not isinstance(v, Tensor):
            raise BatchError(f"{where} field '{f}' must be a torch.Tensor, got {type(v).__name__}")
    pi, pm, ci, cm = (mb[f] for f in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"))
    if (
        pi.dim() != 2
        or ci.dim() != 2
        or pm.shape != pi.shape
        or cm.shape != ci.shape
        or pi.shape[0] != ci.shape[0]
    ):
        raise BatchError(
            f"{where}: prompt_ids/prompt_mask must be [B, P] and completion_ids/completion_mask "
            f"[B, T] with the same B, got {tuple(pi.shape)}, {tuple(pm.shape)}, {tuple(ci.shape)}, "
            f"{tuple(cm.shape)}"
        )
    if pi.is_floating_point() or ci.is_floating_point():
        raise BatchError(f"{where}: prompt_ids and completion_ids must be integer token ids")
    b, t = ci.shape
    for name, m in (("prompt_mask", pm), ("completion_mask", cm), ("tool_mask", mb.get("tool_mask"))):
        if m is not None and not bool(((m == 0) | (m == 1)).all()):
            raise BatchError(f"{where}: {name} must hold only 0 and 1")
    if bool((pm.long().diff(dim=1) < 0).any()):
        raise BatchError(
            f"{where}: prompt_mask is not left-padded (a 0 after a 1); TRL pads prompts on the left"
        )
    if bool((cm.long().diff(dim=1) > 0).any()):
        raise BatchError(f"{where}: completion_mask is not right-padded (a 1 after a 0); TRL masks after EOS")
    if bool((cm.bool().any(1) & ~pm.bool().any(1)).any()):
        raise BatchError(
            f"{where}: a row has completion tokens but no prompt token; the first completion "
            "token needs an attended token before it"
        )
    adv = mb["advantages"]
    if not (adv.shape == (b,) or adv.shape == (b, t)):
        raise BatchError(
            f"{where}: advantages must be [B] or [B, T] = [{b}] or [{b}, {t}], got {tuple(adv.shape)}"
        )
    if mb["num_items_in_batch"].numel() != 1:
        raise BatchError(
            f"{where}: num_items_in_batch must be one number, got shape "
            f"{tuple(mb['num_items_in_batch'].shape)}"
        )
    for f in ("old_per_token_logps", "sampling_per_token_logps", "ref_per_token_logps", "tool_mask"):
        if mb.get(f) is not None and tuple(mb[f].shape) != (b, t):
            raise BatchError(
                f"{where}: {f} must be [B, T] = [{b}, {t}] like completion_ids, got {tuple(mb[f].shape)}"
            )
    isr = mb.get("importance_sampling_ratio")
    if isr is not None and tuple(isr.shape) not in ((b, t), (b, 1)):
        raise BatchError(
            f"{where}: importance_sampling_ratio must be [B, T] (token modes) or [B, 1] (sequence "
            f"modes) = [{b}, {t}] or [{b}, 1], got {tuple(isr.shape)}"
        )
