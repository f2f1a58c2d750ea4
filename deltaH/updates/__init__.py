"""Update directions: AdamW reconstruction and decomposition (docs/math.md#adamw-step)."""

from deltaH.updates.adamw import AdamWDecomposition as AdamWDecomposition
from deltaH.updates.adamw import AdamWHyper as AdamWHyper
from deltaH.updates.adamw import AdamWState as AdamWState
from deltaH.updates.adamw import adamw_decompose as adamw_decompose
from deltaH.updates.adamw import adamw_step as adamw_step
from deltaH.updates.adamw import unit_lr as unit_lr
from deltaH.updates.directions import UpdateDirections as UpdateDirections
from deltaH.updates.directions import update_directions as update_directions
from deltaH.updates.grads import logprob_sums as logprob_sums
from deltaH.updates.grads import sequence_logprob_grads as sequence_logprob_grads
from deltaH.updates.losses import advantages as advantages
from deltaH.updates.losses import loss_coefficients as loss_coefficients
from deltaH.updates.replay import ReplayDirections as ReplayDirections
from deltaH.updates.replay import replay_directions as replay_directions
