"""The named choices that both the config and the core accept, each spelled once.

``deltaH.config`` validates YAML against these tuples before any model loads, and the core
functions check their arguments against the same tuples, so the two can never disagree. This
module imports only the standard library and ``deltaH.errors`` (``import deltaH.config`` must
not pay for torch).
"""

from __future__ import annotations

from typing import Literal, get_args

from deltaH.errors import ArgumentError

#: ``update_batch.source``: where the update batch U comes from (:mod:`deltaH.runner.stages`).
UPDATE_SOURCES = ("auto", "recorded", "sample", "file")

#: ``loss.type``: the trainer's loss normalisation (:mod:`deltaH.updates.losses`).
LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")

#: ``update_batch.scale_rewards``: TRL's advantage scaling (:func:`deltaH.updates.losses.advantages`).
ScaleRewards = Literal["group", "batch", "none"]
SCALE_REWARDS: tuple[str, ...] = get_args(ScaleRewards)

#: ``analyses.entropy_mode``: the per-sequence entropy the estimators average
#: (:meth:`deltaH.stats.SequenceStats.e`): Rao–Blackwellised entropy or surprisal.
ENTROPY_MODES = ("rb", "naive")

#: ``mode`` of :func:`deltaH.estimators.first_order.delta_h_first_order`.
FIRST_ORDER_MODES = ("forward", "reverse")

#: ``kind`` of :func:`deltaH.estimators.influence.influence_matrix`.
INFLUENCE_KINDS = ("true", "first_order")

#: ``eval_batch.prompts``: how E's prompts are drawn from the records
#: (:func:`deltaH.sampling.builders.build_eval_batch`): with replacement, or distinct.
EVAL_PROMPTS = ("replacement", "distinct")

#: ``analyses.kernel_method``: :func:`deltaH.estimators.kernel.fisher_kernel`'s ``method``.
KERNEL_METHODS = ("exact", "projection")

#: The decompositions of the AdamW step, in the order of ``UpdateDirections.stacked()``.
DECOMPOSITIONS = ("full", "baseline", "grad", "baseline+grad")

#: ``compute.share_prompts`` / ``share_prompts=``: run repeated prompts once per teacher-forcing
#: chunk (:func:`deltaH.stats.share_mode`).
SHARE_PROMPTS = ("off", "auto", "on")

#: ``output.detail``: how much a run writes.
DETAIL_LEVELS = ("minimal", "standard", "detailed", "debug")

#: ``checkpoint.dtype``: ``auto`` keeps the saved dtype, except that half precision (bfloat16,
#: float16) is computed in float32; the others are ``torch`` dtype names.
DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")

#: ``data.template`` values that are not format strings.
NAMED_TEMPLATES = ("plain", "chat")

#: ``data.reward`` built-ins (the functions live in :data:`deltaH.sampling.rewards.BUILTIN_REWARDS`).
BUILTIN_REWARDS = ("math", "gsm8k", "exact")


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise ``ArgumentError`` naming ``name``, the allowed values and ``value`` unless it is allowed."""
    if value not in allowed:
        raise ArgumentError(f"{name} must be one of {allowed}, got {value!r}")
