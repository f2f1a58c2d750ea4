"""deltaH: how does one optimizer step change an LLM policy's entropy?

Exactly (self-normalised importance sampling), to first order, and per update sequence.
The math is in docs/math.md (in the source repository). The public surface below is imported
lazily (PEP 562), so that ``import deltaH.config`` (config validation) does not pay for torch and
transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "SequenceBatch": "deltaH.batch",
    "FirstOrder": "deltaH.estimators.first_order",
    "delta_h_first_order": "deltaH.estimators.first_order",
    "entropy_gradient": "deltaH.estimators.first_order",
    "TokenInfluence": "deltaH.estimators.token_influence",
    "token_influence": "deltaH.estimators.token_influence",
    "TrueDeltaH": "deltaH.estimators.true",
    "delta_h_true": "deltaH.estimators.true",
    "delta_h_true_multi": "deltaH.estimators.true",
    "FunctionalLM": "deltaH.functional",
    "Checkpoint": "deltaH.io.checkpoint",
    "load_checkpoint": "deltaH.io.checkpoint",
    "SamplingPolicy": "deltaH.policy",
    "ReplayedStep": "deltaH.replay",
    "replay_step": "deltaH.replay",
    "sample": "deltaH.sampling.sampler",
    "SequenceStats": "deltaH.stats",
    "sequence_stats": "deltaH.stats",
    "AdamWDecomposition": "deltaH.updates.adamw",
    "AdamWState": "deltaH.updates.adamw",
    "adamw_decompose": "deltaH.updates.adamw",
    "adamw_step": "deltaH.updates.adamw",
    "UpdateDirections": "deltaH.updates.directions",
    "update_directions": "deltaH.updates.directions",
    "advantages": "deltaH.updates.losses",
    "influence_matrix": "deltaH.estimators.influence",
    "covariance_proxy": "deltaH.estimators.influence",
    "fisher_kernel": "deltaH.estimators.kernel",
    "ArgumentError": "deltaH.errors",
    "BatchError": "deltaH.errors",
    "CheckpointError": "deltaH.errors",
    "ConfigError": "deltaH.errors",
    "DataError": "deltaH.errors",
    "DeltaHError": "deltaH.errors",
    "DeviceError": "deltaH.errors",
    "NotFoundError": "deltaH.errors",
    "OutputExistsError": "deltaH.errors",
    "ResumeError": "deltaH.errors",
    "RewardError": "deltaH.errors",
    "ParameterNameError": "deltaH.errors",
    "UnsupportedOptionError": "deltaH.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deltaH' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from deltaH.batch import SequenceBatch as SequenceBatch
    from deltaH.errors import ArgumentError as ArgumentError
    from deltaH.errors import BatchError as BatchError
    from deltaH.errors import CheckpointError as CheckpointError
    from deltaH.errors import ConfigError as ConfigError
    from deltaH.errors import DataError as DataError
    from deltaH.errors import DeltaHError as DeltaHError
    from deltaH.errors import DeviceError as DeviceError
    from deltaH.errors import NotFoundError as NotFoundError
    from deltaH.errors import OutputExistsError as OutputExistsError
    from deltaH.errors import ParameterNameError as ParameterNameError
    from deltaH.errors import ResumeError as ResumeError
    from deltaH.errors import RewardError as RewardError
    from deltaH.errors import UnsupportedOptionError as UnsupportedOptionError
    from deltaH.estimators.first_order import FirstOrder as FirstOrder
    from deltaH.estimators.first_order import delta_h_first_order as delta_h_first_order
    from deltaH.estimators.first_order import entropy_gradient as entropy_gradient
    from deltaH.estimators.influence import covariance_proxy as covariance_proxy
    from deltaH.estimators.influence import influence_matrix as influence_matrix
    from deltaH.estimators.kernel import fisher_kernel as fisher_kernel
    from deltaH.estimators.token_influence import TokenInfluence as TokenInfluence
    from deltaH.estimators.token_influence import token_influence as token_influence
    from deltaH.estimators.true import TrueDeltaH as TrueDeltaH
    from deltaH.estimators.true import delta_h_true as delta_h_true
    from deltaH.estimators.true import delta_h_true_multi as delta_h_true_multi
    from deltaH.functional import FunctionalLM as FunctionalLM
    from deltaH.io.checkpoint import Checkpoint as Checkpoint
    from deltaH.io.checkpoint import load_checkpoint as load_checkpoint
    from deltaH.policy import SamplingPolicy as SamplingPolicy
    from deltaH.replay import ReplayedStep as ReplayedStep
    from deltaH.replay import replay_step as replay_step
    from deltaH.sampling.sampler import sample as sample
    from deltaH.stats import SequenceStats as SequenceStats
    from deltaH.stats import sequence_stats as sequence_stats
    from deltaH.updates.adamw import AdamWDecomposition as AdamWDecomposition
    from deltaH.updates.adamw import AdamWState as AdamWState
    from deltaH.updates.adamw import adamw_decompose as adamw_decompose
    from deltaH.updates.adamw import adamw_step as adamw_step
    from deltaH.updates.directions import UpdateDirections as UpdateDirections
    from deltaH.updates.directions import update_directions as update_directions
    from deltaH.updates.losses import advantages as advantages
