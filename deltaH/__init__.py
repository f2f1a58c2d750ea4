"""deltaH: how does one optimizer step change an LLM policy's entropy?

Exactly (self-normalised importance sampling), to first order, and per update sequence.
See DESIGN.md for the math; the public surface is re-exported here.
"""

from deltaH.batch import SequenceBatch as SequenceBatch
from deltaH.estimators.first_order import FirstOrder as FirstOrder
from deltaH.estimators.first_order import delta_h_first_order as delta_h_first_order
from deltaH.estimators.true import TrueDeltaH as TrueDeltaH
from deltaH.estimators.true import delta_h_true as delta_h_true
from deltaH.estimators.true import delta_h_true_multi as delta_h_true_multi
from deltaH.functional import FunctionalLM as FunctionalLM
from deltaH.io.checkpoint import Checkpoint as Checkpoint
from deltaH.io.checkpoint import load_checkpoint as load_checkpoint
from deltaH.policy import SamplingPolicy as SamplingPolicy
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

__version__ = "0.1.0"
