"""The entropy bonus (deltaH.updates.entropy_bonus) against TRL's REAL ``_compute_loss`` and a real AdamW.

References. (i) ``trl.GRPOTrainer._compute_loss`` with ``entropy_coef = c`` on recorded micro-batches
(the fake trainer of test_replay, with entropies left differentiable), zero advantages and β = 0 so
that the bonus is the whole loss: ``Σ`` of its ``backward`` over micro-batches, averaged over ranks as
DDP does, is ``−c·∇H_U``. (ii) A real ``torch.optim.AdamW.step()`` (after ``clip_grad_norm_``) on the
gradient ``Σ_i g_i − c·∇H_U``: the "trainer" step the controls measure.

Tolerances. float64 end to end (conftest exact64). deltaH's entropies come from a compacted,
right-padded forward, TRL's from the left-padded batch (RoPE is relative: the same function at other
rotation angles), so gradients agree to ``GRAD_TOL`` = 1e-10 relative of each tensor's largest entry,
as derived in test_replay (observed ≤ 1e-14). AdamW divides by ``sqrt(v)``, which lifts round-off of
tiny entries to the scale of the step: ``STEP_REL`` = 1e-9 × max|Δθ| as in test_directions.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from _refs import trainable
from test_directions import warmed_up
from test_replay import BASE, TAU, fake_trainer, hf_logps_and_entropies, micro_batches
from trl import GRPOTrainer

import deltaH as dh
from deltaH.updates import AdamWState
from deltaH.updates.directions import directions_from_grads, update_directions
from deltaH.updates.entropy_bonus import (
    bonus_direction,
    bonus_token_weights,
    entropy_bonus_grad,
    gradient_sum,
    micro_batch_labels,
)
from deltaH.updates.grads import logprob_sums
from deltaH.updates.recorded import RecordedStep

pytestmark = pytest.mark.usefixtures("one_thread")

GRAD_TOL = 1e-10
STEP_REL = 1e-9
C = 0.37


def _bonus_trainer(o, n_acc: int):
    """TRL's ``_compute_loss`` attributes with the entropy bonus on (``entropy_coef = C``) and the
    entropies differentiable, as TRL's fused head returns them."""
    fake = fake_trainer(o, n_acc, TAU)

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        lp, ent = hf_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, TAU)
        return lp, ent, None

    fake._get_per_token_logps_and_entropies = logps_and_entropies
    fake._entropy_bonus_enabled, fake.entropy_coef, fake.use_adaptive_entropy = True, C, False
    fake.accelerator.sync_gradients = False  # only decides when TRL logs the coefficient
    return fake


@pytest.mark.parametrize("world", [1, 2])
def test_bonus_gradient_is_trls_entropy_term(world: int) -> None:
    """Two micro-batches per rank (accumulation 2, unequal token counts, a masked-out row)."""
    model, _ = warmed_up()
    o = replace(BASE, world_size=world)
    ranks = [micro_batches(model, o, 2, seed=31 + r) for r in range(world)]
    for mbs in ranks:
        for mb in mbs:
            mb["advantages"] = torch.zeros_like(mb["advantages"])  # the bonus is the whole loss
    model.zero_grad(set_to_none=True)
    logged = 0.0
    for mbs in ranks:
        fake = _bonus_trainer(o, len(mbs))
        for mb in mbs:
            loss = GRPOTrainer._compute_loss(fake, model, mb)
            loss.backward()
            logged += float(loss.detach())
    want = {n: p.grad / world for n, p in trainable(model).items()}  # DDP averages the ranks

    lm = dh.FunctionalLM.from_model(model)
    batches, labels = [], []
    for r, mbs in enumerate(ranks):
        sb = RecordedStep(step=1, micro_batches=mbs, options=o, rank=r).sequence_batch()
        assert sb is not None
        batches.append(sb[0])
        sizes = [int((mb["completion_mask"].bool()).any(1).sum()) for mb in mbs]
        labels.append(micro_batch_labels(sizes) + 10 * r)
    width = max(b.input_ids.shape[1] for b in batches)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    batch = dh.SequenceBatch(*(torch.cat([pad(getattr(b, k)) for b in batches])
                               for k in ("input_ids", "attention_mask", "response_mask")))
    w = bonus_token_weights(batch.n_tokens, torch.cat(labels), 2, world)
    grad, h_u = entropy_bonus_grad(lm, lm.params, batch, w, temperature=TAU, seq_chunk=3)
    for n, g in want.items():
        scale = float(g.abs().max())
        assert scale > 0
        torch.testing.assert_close(-C * grad[n], g.double(), rtol=0, atol=GRAD_TOL * scale)
    assert -C * h_u == pytest.approx(logged / world, rel=1e-12)  # Σ of the logged losses: −c·H_U


def test_bonus_weights() -> None:
    """1/(W·A·tokens of the row's micro-batch) at each loss token, zero beyond; labels need not be sorted."""
    n = torch.tensor([2, 3, 1, 4])
    w = bonus_token_weights(n, torch.tensor([5, 7, 5, 7]), grad_accum_steps=2, world_size=3)
    assert w.shape == (4, 4)
    want = [[1 / 18] * 2 + [0] * 2, [1 / 42] * 3 + [0], [1 / 18] + [0] * 3, [1 / 42] * 4]
    torch.testing.assert_close(w, torch.tensor(want, dtype=torch.float64), rtol=1e-15, atol=0)
    assert micro_batch_labels([2, 0, 3]).tolist() == [0, 0, 2, 2, 2]
    with pytest.raises(ValueError, match="grad_accum_steps"):
        bonus_token_weights(n, n, grad_accum_steps=0)


def test_trainer_step_with_the_bonus_is_a_real_adamw_step() -> None:
    """The gradient behind the directions (gradient_sum) is the real loss gradient; adding −c·∇H_U and
    taking the AdamW step from it (clipping recomputed) is what torch.optim.AdamW does; and
    bonus_direction is the bonus's component with D and clipping held at the step's values."""
    model, opt = warmed_up()
    lm = dh.FunctionalLM.from_model(model)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 32, (6, 9), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = am.clone()
    rm[:, :4] = False
    batch = dh.SequenceBatch(ids, am, rm)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.2, -0.2], dtype=torch.float64)
    state = AdamWState.from_optimizer(opt, model)
    ud = update_directions(lm, lm.params, batch, adv, state, temperature=TAU, max_grad_norm=0.05)
    assert ud.clip_coef < 1  # clipping active
    # (a) Σ_i g_i by ordinary backward of L = Σ_i coef_i·S_i
    model.zero_grad(set_to_none=True)
    (ud.coef * logprob_sums(lm, dict(model.named_parameters()), batch, temperature=TAU)).sum().backward()
    real_g = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    got = gradient_sum(ud.grad, ud, state)
    for n, t in real_g.items():
        torch.testing.assert_close(got[n], t.double(), rtol=0, atol=1e-9 * float(t.abs().max()))
    # (b) the trainer's step with the bonus: real clip_grad_norm_ + AdamW.step on Σ g_i − c·∇H_U
    w = bonus_token_weights(batch.n_tokens, torch.zeros(6, dtype=torch.long), 1)
    grad_h, _ = entropy_bonus_grad(lm, lm.params, batch, w, temperature=TAU)
    total = {n: got[n] - C * grad_h[n] for n in got}
    mine = directions_from_grads(lm.params, {n: t.unsqueeze(0) for n, t in total.items()}, state,
                                 coef=torch.ones(1), max_grad_norm=0.05)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    for n, p in trainable(model).items():
        p.grad = total[n].to(p.dtype)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
    opt.step()
    for n, p in trainable(model).items():
        delta = p.detach() - before[n]
        torch.testing.assert_close(mine.full[n] * mine.lr[n], delta, rtol=0,
                                   atol=STEP_REL * float(delta.abs().max()))
    # (c) ĉ_H: the component of an extra "sequence" whose gradient is −c·∇H_U, in the limit c → 0
    # (D and clip then stay at the step's values): relative change of D and clip is O(c·∇H/g) ≈ 1e-6.
    eps = 1e-8
    both = {n: torch.stack([got[n], -eps * grad_h[n]]) for n in got}  # Σ g_i, then −ε·∇H_U alone
    dec = directions_from_grads(lm.params, both, state, coef=torch.ones(2), max_grad_norm=0.05)
    d_h = bonus_direction(grad_h, ud, state)
    for n, t in d_h.items():
        torch.testing.assert_close(dec.components[n][1] / eps, t, rtol=1e-4, atol=1e-4 * float(t.abs().max()))
