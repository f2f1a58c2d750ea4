"""Training-time integrations: a ``transformers`` callback that logs δH₁ of every optimizer step.

>>> from deltaH.integrations import DeltaHCallback
>>> trainer.add_callback(DeltaHCallback(prompts=["12+7=", "3-1="]))   # doctest: +SKIP
>>> trainer.train()        # logs deltah/delta_h1, deltah/h, ... beside loss   # doctest: +SKIP

TRL's ``GRPOTrainer``: add :class:`deltaH.integrations.trl.DeltaHGRPOMixin` (or use
``DeltaHGRPOTrainer``) so the probe also sees each step's GRPO batch. See
:mod:`deltaH.integrations.callback` for what is logged and what it costs.
"""

from __future__ import annotations

from deltaH.integrations._probe import ProbeRecord as ProbeRecord
from deltaH.integrations.callback import DeltaHCallback as DeltaHCallback

__all__ = ["DeltaHCallback", "ProbeRecord"]
