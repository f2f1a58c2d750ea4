"""TRL ``GRPOTrainer`` support: record the GRPO batch of each optimizer step, to disk and for the probe.

Callbacks never see the batch a step trains on. ``GRPOTrainer._prepare_inputs`` returns it, one
micro-batch at a time (``prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
...``) to ``compute_loss``; :class:`DeltaHGRPOMixin` records those dicts for the current optimizer
step (all micro-batches of the step, gradient accumulation included) and hands them to every
:class:`~deltaH.integrations.DeltaHCallback` of the trainer, which then also logs the covariance
proxy on the step's real batch. Its ``log`` adds the probe's pending metrics to the logs *before*
any callback runs, so every ``report_to`` integration sees them. It also writes every step to
``<output_dir>/deltah-steps/`` (:mod:`deltaH.io.steps`; ``deltah_record_steps=False`` turns that
off), with or without the callback::

    from trl import GRPOTrainer
    from deltaH.integrations import DeltaHCallback
    from deltaH.integrations.trl import DeltaHGRPOMixin

    class MyGRPOTrainer(DeltaHGRPOMixin, GRPOTrainer):
        pass

    trainer = MyGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                            callbacks=[DeltaHCallback(prompts=["12+7=", "3-1="])])

or ``make_grpo_trainer_class()`` (``DeltaHGRPOTrainer`` is that class for ``trl.GRPOTrainer``).
``trl`` is imported only by those two; without it they raise ``ImportError`` with the install line.
"""

from __future__ import annotations

from typing import Any

from deltaH.integrations.recording import StepRecorder, _RecordingMixin
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, OPTIONAL_FIELDS, RecordedStep, TrainerOptions

__all__ = ["DeltaHGRPOMixin", "RecordedStep", "StepRecorder", "make_grpo_trainer_class"]

_INSTALL = "pip install 'deltaH[trl]'"


class DeltaHGRPOMixin(_RecordingMixin):
    """Mixin for TRL's ``GRPOTrainer``: records each step's GRPO batch, to disk and for ``DeltaHCallback``.

    Put it first: ``class MyTrainer(DeltaHGRPOMixin, GRPOTrainer): pass``. It changes nothing the
    trainer computes: ``_prepare_inputs`` returns its parent's result untouched. Each optimizer
    step is written to ``<output_dir>/deltah-steps/step-<N>.safetensors`` + ``.json``
    (:mod:`deltaH.io.steps`; one file per rank); ``deltah_record_steps=False`` (constructor keyword
    or class attribute) turns that off, ``deltah_steps_dir=`` picks another folder. The options
    (``TrainerOptions``) are the trainer's as the step's first micro-batch is prepared, so
    ``entropy_coef`` is the one the step applies; ``meta`` adds ``eos_token_id`` (TRL's list),
    ``pad_token_id``, ``learning_rate``, ``epoch``, ``current_gradient_accumulation_steps``,
    ``entropy_coef_applied`` (0 when adaptive entropy control gates the bonus off) and ``num_generations``.
    """

    _deltah_fields = MICRO_BATCH_FIELDS + OPTIONAL_FIELDS

    state: Any
    model: Any
    callback_handler: Any

    def _deltah_callbacks(self) -> list[Any]:
        from deltaH.integrations.callback import DeltaHCallback

        handler = getattr(self, "callback_handler", None)
        return [cb for cb in getattr(handler, "callbacks", []) if isinstance(cb, DeltaHCallback)]

    def _prepare_inputs(self, generation_batch: Any) -> Any:
        inputs = super()._prepare_inputs(generation_batch)  # type: ignore[misc]
        if self.model.training and isinstance(inputs, dict):
            self.deltah_recorder.record(self.state.global_step + 1, inputs)
            for cb in self._deltah_callbacks():
                cb.attach_recorder(self.deltah_recorder)
        return inputs

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if not any(str(k).startswith("eval_") for k in logs):
            for cb in self._deltah_callbacks():
                logs.update(cb.pop_pending())
        super().log(logs, start_time)  # type: ignore[misc]

    def _deltah_options(self) -> TrainerOptions:
        a, g = self.args, self.__dict__.get
        aux = bool(g("aux_loss_enabled", False))
        return TrainerOptions(
            trainer="GRPOTrainer", loss_type=g("loss_type", a.loss_type),
            epsilon_low=g("epsilon_low", a.epsilon), epsilon_high=g("epsilon_high", a.epsilon_high),
            delta=a.delta, beta=g("beta", a.beta),
            importance_sampling_level=g("importance_sampling_level", a.importance_sampling_level),
            scale_rewards=g("scale_rewards", a.scale_rewards),
            max_completion_length=g("max_completion_length", a.max_completion_length),
            gradient_accumulation_steps=int(a.gradient_accumulation_steps),
            steps_per_generation=a.steps_per_generation, num_iterations=g("num_iterations", a.num_iterations),
            temperature=g("temperature", a.temperature), top_p=g("top_p", a.top_p), top_k=g("top_k", a.top_k),
            max_grad_norm=a.max_grad_norm,
            mask_truncated_completions=g("mask_truncated_completions", a.mask_truncated_completions),
            top_entropy_quantile=g("top_entropy_quantile", a.top_entropy_quantile),
            use_vllm=g("use_vllm", a.use_vllm),
            vllm_importance_sampling_correction=g("vllm_importance_sampling_correction",
                                                  a.vllm_importance_sampling_correction),
            vllm_importance_sampling_mode=g("vllm_importance_sampling_mode", a.vllm_importance_sampling_mode),
            vllm_importance_sampling_clip_min=g("vllm_importance_sampling_clip_min",
                                                a.vllm_importance_sampling_clip_min),
            vllm_importance_sampling_clip_max=g("vllm_importance_sampling_clip_max",
                                                a.vllm_importance_sampling_clip_max),
            off_policy_mask_threshold=g("off_policy_mask_threshold", a.off_policy_mask_threshold),
            use_bias_correction_kl=a.use_bias_correction_kl, entropy_coef=g("entropy_coef", a.entropy_coef),
            use_adaptive_entropy=g("use_adaptive_entropy", a.use_adaptive_entropy),
            cast_lm_head_to_fp32=a.cast_lm_head_to_fp32,
            sapo_temperature_pos=a.sapo_temperature_pos, sapo_temperature_neg=a.sapo_temperature_neg,
            vespo_k_pos=a.vespo_k_pos, vespo_lambda_pos=a.vespo_lambda_pos, vespo_k_neg=a.vespo_k_neg,
            vespo_lambda_neg=a.vespo_lambda_neg, entropy_target=a.entropy_target,
            entropy_coef_min=a.entropy_coef_min, entropy_coef_max=a.entropy_coef_max,
            entropy_coef_delta=a.entropy_coef_delta,
            router_aux_loss_coef=float(g("router_aux_loss_coef", 0.0) or 0.0) if aux else 0.0,
            world_size=self._deltah_world_size(),
            extra={"multi_objective_aggregation": getattr(a, "multi_objective_aggregation", None),
                   "num_generations": g("num_generations", getattr(a, "num_generations", None)),
                   "pad_to_multiple_of": getattr(a, "pad_to_multiple_of", None)},
        )

    def _deltah_meta(self) -> dict[str, Any]:
        meta = super()._deltah_meta()
        g = self.__dict__.get
        eos = g("eos_token_ids")
        if eos:
            meta["eos_token_id"] = list(eos) if len(eos) > 1 else eos[0]
        pad = getattr(g("_tokenizer"), "pad_token_id", None)
        if pad is not None:
            meta["pad_token_id"] = pad
        coef = float(g("entropy_coef", 0.0) or 0.0)
        last_entropy = g("_last_world_entropy", float("inf"))
        if g("use_adaptive_entropy", False) and last_entropy > self.args.entropy_target:
            coef = 0.0
        meta["entropy_coef_applied"] = coef
        meta["num_generations"] = g("num_generations")
        return meta


def make_grpo_trainer_class(base: type | None = None) -> type:
    """``class DeltaHGRPOTrainer(DeltaHGRPOMixin, base)``; ``base`` defaults to ``trl.GRPOTrainer``."""
    if base is None:
        base = _grpo_trainer()
    return type(f"DeltaH{base.__name__}", (DeltaHGRPOMixin, base), {"__module__": __name__})


def _grpo_trainer() -> type:
    try:
        from trl import GRPOTrainer
    except ImportError as e:
        raise ImportError(f"deltaH's GRPO integration needs TRL: {_INSTALL}") from e
    return GRPOTrainer  # type: ignore[no-any-return]


def __getattr__(name: str) -> Any:
    if name == "DeltaHGRPOTrainer":
        cls = make_grpo_trainer_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
