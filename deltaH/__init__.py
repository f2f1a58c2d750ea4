"""deltaH: how does one optimizer step change an LLM policy's entropy?

Exactly (self-normalised importance sampling), to first order, and per update sequence.
See DESIGN.md for the math; the public surface is re-exported here.
"""

from deltaH.batch import SequenceBatch as SequenceBatch
from deltaH.estimators.true import TrueDeltaH as TrueDeltaH
from deltaH.estimators.true import delta_h_true as delta_h_true
from deltaH.estimators.true import delta_h_true_multi as delta_h_true_multi
from deltaH.functional import FunctionalLM as FunctionalLM
from deltaH.policy import SamplingPolicy as SamplingPolicy
from deltaH.stats import SequenceStats as SequenceStats
from deltaH.stats import sequence_stats as sequence_stats

__version__ = "0.1.0"
