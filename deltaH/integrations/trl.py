"""TRL ``GRPOTrainer`` support: record the GRPO batch of each optimizer step for the probe.

Callbacks never see the batch a step trains on. ``GRPOTrainer._prepare_inputs`` returns it, one
micro-batch at a time (``prompt_ids, prompt_mask, completion_ids, completion_mask, advantages,
...``) to ``compute_loss``; :class:`DeltaHGRPOMixin` records those dicts for the current optimizer
step (all micro-batches of the step, gradient accumulation included) and hands them to every
:class:`~deltaH.integrations.DeltaHCallback` of the trainer, which then also logs the covariance
proxy on the step's real batch. Its ``log`` adds the probe's pending metrics to the logs *before*
any callback runs, so every ``report_to`` integration sees them::

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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch

__all__ = ["DeltaHGRPOMixin", "RecordedStep", "StepRecorder", "make_grpo_trainer_class"]

_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages", "tool_mask",
         "num_items_in_batch")
_INSTALL = "pip install 'deltaH[trl]'"


@dataclass
class RecordedStep:
    """The micro-batches (``_prepare_inputs`` outputs, tensors detached) of one optimizer step.

    ``step`` is the Trainer's ``global_step`` after that step (as in its logs and checkpoint names).
    """

    step: int
    micro_batches: list[dict[str, Any]] = field(default_factory=list)

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


class StepRecorder:
    """Keeps the micro-batches of the current optimizer step (a new step replaces the old one)."""

    def __init__(self) -> None:
        self.current: RecordedStep | None = None

    def record(self, step: int, inputs: dict[str, Any]) -> None:
        if self.current is None or self.current.step != step:
            self.current = RecordedStep(step)
        kept = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in inputs.items() if k in _KEYS}
        self.current.micro_batches.append(kept)

    def take(self, step: int) -> RecordedStep | None:
        """The recorded micro-batches of ``step`` (the step being taken), or None."""
        cur = self.current
        return cur if cur is not None and cur.step == step and cur.micro_batches else None


class DeltaHGRPOMixin:
    """Mixin for TRL's ``GRPOTrainer``: records each step's GRPO batch for ``DeltaHCallback``.

    Put it first: ``class MyTrainer(DeltaHGRPOMixin, GRPOTrainer): pass``. It changes nothing the
    trainer computes: ``_prepare_inputs`` returns its parent's result untouched.
    """

    state: Any
    model: Any
    callback_handler: Any

    @property
    def deltah_recorder(self) -> StepRecorder:
        rec = self.__dict__.get("_deltah_recorder")
        if rec is None:
            rec = self.__dict__["_deltah_recorder"] = StepRecorder()
        return rec

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
