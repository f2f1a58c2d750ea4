"""Record every optimizer step's micro-batches to disk while a ``transformers`` Trainer trains.

A callback never sees the batch a step trains on, so a small mixin captures what the trainer's
loss receives, one micro-batch at a time, for the current optimizer step (:class:`StepRecorder`),
and an internal callback writes the step when it ends (``on_step_end``, ``global_step`` = N) to
``<output_dir>/deltah-steps/step-<N>.safetensors`` + ``.json`` (format: :mod:`deltaH.io.steps`)
with the learning rate the optimizer used (read at ``on_pre_optimizer_step``) and the trainer's
loss-relevant options. Every process writes its own file (``.rank<r>`` when there are several).

* :class:`DeltaHTrainerMixin` — plain ``transformers.Trainer`` (e.g. SFT): records what
  ``compute_loss`` receives (``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` when
  present, and ``num_items_in_batch``), ``trainer="Trainer"``;
* :class:`~deltaH.integrations.trl.DeltaHGRPOMixin` — TRL's ``GRPOTrainer`` (what
  ``_prepare_inputs`` returns to ``compute_loss``).

::

    from transformers import Trainer
    from deltaH.integrations import DeltaHTrainerMixin

    class MyTrainer(DeltaHTrainerMixin, Trainer):
        pass

    MyTrainer(model=..., args=..., train_dataset=...)                     # records every step
    MyTrainer(..., deltah_record_steps=False)                              # records nothing
    MyTrainer(..., deltah_steps_dir="/data/run7-steps")                   # another folder

Recording never changes training: it keeps references to tensors the trainer made anyway, copies
them to CPU after the optimizer step, reads no random numbers and computes nothing the trainer
uses. A step file that cannot be written (disk full, permissions) is a ``RuntimeWarning``;
training goes on and that step is missing from the folder.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor
from transformers import TrainerCallback

from deltaH._warn import warn
from deltaH.io.steps import SFT_FIELDS, STEPS_DIRNAME, list_steps, write_step
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, OPTIONAL_FIELDS, RecordedStep, TrainerOptions

__all__ = ["DeltaHTrainerMixin", "StepRecorder"]

logger = logging.getLogger(__name__)


class StepRecorder:
    """Keeps the micro-batches of the current optimizer step (a new step replaces the old one).

    ``fields``: the keys of each micro-batch dict kept (others are dropped; default: the GRPO
    fields of :mod:`deltaH.updates.recorded`); ``start(step)`` makes
    the ``RecordedStep`` a new step's micro-batches go into (its options and meta as of the
    step's first micro-batch).
    """

    def __init__(self, fields: Sequence[str] = MICRO_BATCH_FIELDS + OPTIONAL_FIELDS,
                 start: Callable[[int], RecordedStep] | None = None) -> None:
        self.fields = tuple(fields)
        self.start = start or RecordedStep
        self.current: RecordedStep | None = None

    def record(self, step: int, inputs: dict[str, Any]) -> None:
        if self.current is None or self.current.step != step:
            self.current = self.start(step)
        kept = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in inputs.items()
                if k in self.fields and v is not None}
        self.current.micro_batches.append(kept)

    def take(self, step: int) -> RecordedStep | None:
        """The recorded micro-batches of ``step`` (the step being taken), or None."""
        cur = self.current
        return cur if cur is not None and cur.step == step and cur.micro_batches else None


class _StepWriter(TrainerCallback):
    """Writes the trainer's recorded step at ``on_step_end`` (added by the recording mixins)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)
        self._lr: tuple[int, list[float]] | None = None
        self.steps_dir: Path | None = None
        self._warned_empty = False

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self._trainer()
        if tr is None:
            return
        self.steps_dir = Path(tr.deltah_steps_dir or os.path.join(args.output_dir, STEPS_DIRNAME))
        if self.steps_dir.is_dir():
            later = [s for s in list_steps(self.steps_dir) if s > state.global_step]
            if later:
                logger.warning("%s already holds step files %d..%d; the steps this run trains again are "
                               "written anew and the old files kept as step-<N>.prev-<k>.*",
                               self.steps_dir, later[0], later[-1])

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        if optimizer is not None:
            self._lr = (state.global_step + 1, [float(g["lr"]) for g in optimizer.param_groups])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        tr = self._trainer()
        if tr is None or self.steps_dir is None:
            return
        step = state.global_step
        rec = tr.deltah_recorder.take(step)
        if rec is None:
            if not self._warned_empty:
                self._warned_empty = True
                warn(f"deltaH recorded no micro-batches for step {step} (the trainer's loss inputs never "
                     f"reached the mixin's hook); no step files are written for such steps")
            return
        lrs = self._lr[1] if self._lr is not None and self._lr[0] == step else []
        rec.meta.update({
            "learning_rate": lrs[0] if lrs else None,
            "epoch": state.epoch,
            "global_step": step,
            "optimizer_step_skipped": bool(getattr(tr.accelerator, "optimizer_step_was_skipped", False)),
        })
        if len(set(lrs)) > 1:
            rec.meta["learning_rates"] = lrs
        try:
            write_step(self.steps_dir, rec)
        except OSError as e:
            warn(f"deltaH could not write the step file of step {step} to {self.steps_dir}: "
                 f"{type(e).__name__}: {e}; training goes on without it")


class _RecordingMixin:
    """Shared by the recording mixins: the recorder, the options and ``deltah_record_steps``."""

    #: Write each step to disk (a constructor keyword ``deltah_record_steps=`` overrides it).
    deltah_record_steps: bool = True
    #: Where (None: ``<args.output_dir>/deltah-steps``); constructor keyword ``deltah_steps_dir=``.
    deltah_steps_dir: str | os.PathLike[str] | None = None
    _deltah_fields: tuple[str, ...] = ()

    state: Any
    args: Any
    accelerator: Any
    model: Any

    def __init__(self, *args: Any, deltah_record_steps: bool | None = None,
                 deltah_steps_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if deltah_record_steps is not None:
            self.deltah_record_steps = bool(deltah_record_steps)
        if deltah_steps_dir is not None:
            self.deltah_steps_dir = deltah_steps_dir
        if self.deltah_record_steps:
            self.add_callback(_StepWriter(self))  # type: ignore[attr-defined]

    @property
    def deltah_recorder(self) -> StepRecorder:
        rec = self.__dict__.get("_deltah_recorder")
        if rec is None:
            rec = self.__dict__["_deltah_recorder"] = StepRecorder(self._deltah_fields, self._deltah_new_step)
        return rec

    def _deltah_new_step(self, step: int) -> RecordedStep:
        acc = getattr(self, "accelerator", None)
        return RecordedStep(step, options=self._deltah_options(),
                            rank=int(getattr(acc, "process_index", 0)), meta=self._deltah_meta())

    def _deltah_world_size(self) -> int:
        return int(getattr(getattr(self, "accelerator", None), "num_processes", 1))

    def _deltah_options(self) -> TrainerOptions:
        raise NotImplementedError

    def _deltah_meta(self) -> dict[str, Any]:
        tok = getattr(self, "processing_class", None)
        tok = getattr(tok, "tokenizer", tok)
        cfg = getattr(getattr(self, "model", None), "config", None)
        meta: dict[str, Any] = {"trainer_class": type(self).__qualname__}
        for key in ("eos_token_id", "pad_token_id"):
            val = getattr(tok, key, None)
            meta[key] = val if val is not None else getattr(cfg, key, None)
        meta["current_gradient_accumulation_steps"] = getattr(self, "current_gradient_accumulation_steps",
                                                              None)
        return meta


def _compute_loss_owners(cls: type) -> list[str]:
    """The classes of ``cls``'s MRO that define ``compute_loss`` (not deltaH's mixins nor ``Trainer``)."""
    return [c.__qualname__ for c in cls.__mro__ if "compute_loss" in vars(c)
            and not issubclass(c, _RecordingMixin) and not (c.__module__ == "transformers.trainer")]


class DeltaHTrainerMixin(_RecordingMixin):
    """Mixin for ``transformers.Trainer``: writes each optimizer step's loss inputs to disk.

    Put it first: ``class MyTrainer(DeltaHTrainerMixin, Trainer): pass``. Each micro-batch keeps
    the fields of :data:`deltaH.io.steps.SFT_FIELDS` that ``compute_loss`` received (and its
    ``num_items_in_batch``). Options: ``trainer="Trainer"``, ``gradient_accumulation_steps``,
    ``max_grad_norm``, ``world_size``; the other ``TrainerOptions`` fields keep their (GRPO)
    defaults and mean nothing here. ``extra`` holds ``label_smoothing_factor``,
    ``average_tokens_across_devices``, ``model_accepts_loss_kwargs``, ``compute_loss_func`` (one was
    given) and ``compute_loss_overridden_by`` (classes that override ``compute_loss``: a loss deltaH
    cannot know).
    """

    _deltah_fields = SFT_FIELDS

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.model.training and isinstance(inputs, dict):
            kept = {k: v for k, v in inputs.items() if k != "num_items_in_batch"}
            if num_items_in_batch is not None:
                kept["num_items_in_batch"] = num_items_in_batch
            self.deltah_recorder.record(self.state.global_step + 1, kept)
        return super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _deltah_options(self) -> TrainerOptions:
        a = self.args
        return TrainerOptions(
            trainer="Trainer", gradient_accumulation_steps=int(a.gradient_accumulation_steps),
            max_grad_norm=a.max_grad_norm, world_size=self._deltah_world_size(),
            extra={
                "label_smoothing_factor": getattr(a, "label_smoothing_factor", 0.0),
                "average_tokens_across_devices": getattr(a, "average_tokens_across_devices", None),
                "model_accepts_loss_kwargs": getattr(self, "model_accepts_loss_kwargs", None),
                "compute_loss_func": getattr(self, "compute_loss_func", None) is not None,
                "compute_loss_overridden_by": _compute_loss_owners(type(self)),
            },
        )
