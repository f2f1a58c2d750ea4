"""Training-time integrations: a ``transformers`` callback that logs δH₁ of every optimizer step,
and trainer mixins that write every optimizer step's batch to disk.

>>> from deltaH.integrations import DeltaHCallback
>>> trainer.add_callback(DeltaHCallback(prompts=["12+7=", "3-1="]))   # doctest: +SKIP
>>> trainer.train()        # logs deltah/delta_h1, deltah/h, ... beside loss   # doctest: +SKIP

TRL's ``GRPOTrainer``: add :class:`deltaH.integrations.trl.DeltaHGRPOMixin` (or use
``DeltaHGRPOTrainer``) so the probe also sees each step's GRPO batch; it also records each step to
``<output_dir>/deltah-steps/``. Plain ``transformers.Trainer``: :class:`DeltaHTrainerMixin`
records the same way (:mod:`deltaH.integrations.recording`, format :mod:`deltaH.io.steps`). See
:mod:`deltaH.integrations.callback` for what is logged and what it costs.
"""

from __future__ import annotations

from deltaH.integrations._probe import ProbeRecord as ProbeRecord
from deltaH.integrations.callback import DeltaHCallback as DeltaHCallback
from deltaH.integrations.recording import DeltaHTrainerMixin as DeltaHTrainerMixin

__all__ = ["DeltaHCallback", "DeltaHTrainerMixin", "ProbeRecord"]
