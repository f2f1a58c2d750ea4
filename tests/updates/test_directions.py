"""Update directions (deltaH.updates.directions) against a REAL ``torch.optim.AdamW`` step.

A tiny LoRA model gets a real AdamW that has already taken two real steps (real gradients of a
policy-gradient loss on other batches, so ``m``, ``v`` and the step counts are non-trivial). Then,
on an update batch U, TRL's per-micro-batch loss of :mod:`test_losses` (``trl_micro_batch_loss``,
written without deltaH) is built from per-row ``model(...).logits``; one ``backward`` per
micro-batch accumulates the gradient; ``clip_grad_norm_`` when ``max_grad_norm`` is set (as the HF
Trainer does); and ``optimizer.step()``. The real ``Δθ`` must equal ``lr × update_directions(...).full``,
and ``baseline``/``components`` must equal DESIGN.md §1.6 written out by hand (``D`` rebuilt from the
real optimizer's second moment after the step, ``∇S_i`` from per-row autograd).

Tolerances: the model is float64 end to end (conftest), so the real loss (``coef_i`` applied per
token) and ``Σ coef_i ∇S_i`` differ by float64 round-off only (``GRAD_RTOL`` = 1e-9 for the
gradient norm). AdamW divides every entry by its own ``sqrt(v)``, which lifts the round-off of
entries with tiny gradients towards the scale of the step: observed ≤ 2.4e-14 × max|Δθ| per tensor
on AVX-512, AVX2 and default kernels; ``STEP_REL`` = 1e-9 × max|Δθ| (a wrong normalisation, clip
or lr is ≥ 1e-2 relative).
"""

from __future__ import annotations

import pytest
import torch
from _refs import ref_row_grads, trainable
from conftest import tiny_qwen2, with_lora
from test_losses import completion_logps, random_update_batch, trl_micro_batch_loss

import deltaH as dh
from deltaH.updates import AdamWState, advantages, loss_coefficients, update_directions

TAU = 0.8
LMAX = 8
GRAD_RTOL = 1e-9
STEP_REL = 1e-9


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _close_step(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=STEP_REL, atol=STEP_REL * float(want.abs().max()))


def _batch(prompts: list[list[int]], completions: list[list[int]]) -> dh.SequenceBatch:
    """The same rows as a SequenceBatch, left-padded (TRL pads prompts on the left)."""
    t = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    am = torch.zeros(len(prompts), t, dtype=torch.bool)
    rm = torch.zeros_like(am)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        s = t - len(p) - len(c)
        ids[i, s:] = torch.tensor(p + c)
        am[i, s:] = True
        rm[i, s + len(p) :] = True
    return dh.SequenceBatch(ids, am, rm)


def trl_backward(
    model: torch.nn.Module, prompts, completions, adv: torch.Tensor, loss_type: str, grad_accum: int
) -> None:
    """The trainer's accumulation: one ``backward`` per micro-batch, gradients summed in ``.grad``."""
    logps, mask = completion_logps(model, prompts, completions, TAU)
    n_mb = len(prompts) // grad_accum
    for s in range(0, len(prompts), n_mb):
        sl = slice(s, s + n_mb)
        loss = trl_micro_batch_loss(
            logps[sl], mask[sl], adv[sl], loss_type, grad_accum, mask.sum(), LMAX, surrogate=True
        )
        loss.backward(retain_graph=True)


def make_optimizer(model: torch.nn.Module, two_groups: bool) -> torch.optim.AdamW:
    named = trainable(model)
    if not two_groups:
        return torch.optim.AdamW(list(named.values()), lr=2e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    a = [p for n, p in named.items() if "lora_A" in n]
    b = [p for n, p in named.items() if "lora_B" in n]
    return torch.optim.AdamW(
        [
            {"params": a, "lr": 2e-2, "weight_decay": 0.1},
            {"params": b, "lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.95)},
        ],
        betas=(0.9, 0.99),
        eps=1e-8,
    )


def warmed_up(two_groups: bool = False, seed: int = 0) -> tuple[torch.nn.Module, torch.optim.AdamW]:
    """A LoRA model and an AdamW after two real policy-gradient steps on other batches."""
    model = with_lora(tiny_qwen2(seed=seed))
    opt = make_optimizer(model, two_groups)
    for k in range(2):
        prompts, completions = random_update_batch(4, seed=100 + k)
        adv = torch.tensor([1.0, -0.5, 0.3, -0.8], dtype=torch.float64)
        trl_backward(model, prompts, completions, adv, "grpo", 1)
        opt.step()
        opt.zero_grad()
    return model, opt


def real_step(model, opt, prompts, completions, adv, loss_type, grad_accum, clip_frac):
    """θ before, and the accumulated gradients in ``.grad``; ``max_norm = clip_frac × ‖g‖`` (None: no
    clipping). Returns (θ before, max_norm, ‖g‖)."""
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    trl_backward(model, prompts, completions, adv, loss_type, grad_accum)
    norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in trainable(model).values())))
    max_norm = None if clip_frac is None else clip_frac * norm
    return before, max_norm, norm


@pytest.mark.parametrize(
    "loss_type,grad_accum,clip_frac",
    [
        ("dapo", 1, None),
        ("dapo", 2, 0.5),
        ("grpo", 1, 0.3),
        ("grpo", 2, None),
        ("bnpo", 2, 0.5),
    ],
)
def test_directions_match_the_real_adamw_step(loss_type: str, grad_accum: int, clip_frac) -> None:
    """``lr·full`` = the real Δθ; ``baseline`` and ``components`` = the §1.6 formulas with ``D`` rebuilt
    from the real optimizer's ``exp_avg_sq`` after the step and ``∇S_i`` from per-row autograd."""
    model, opt = warmed_up()
    prompts, completions = random_update_batch(6, seed=7)
    adv = advantages(torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9, 0.4]]), "group").flatten()
    batch = _batch(prompts, completions)
    state = AdamWState.from_optimizer(opt, model)
    assert all(s == 2 for s in state.step.values())
    ref_g, _ = ref_row_grads(model, batch, TAU)  # ∇S_i at θ, before the step

    before, max_norm, norm = real_step(
        model, opt, prompts, completions, adv, loss_type, grad_accum, clip_frac
    )
    lm = dh.FunctionalLM.from_model(model)
    dirs = update_directions(
        lm,
        {n: t.clone() for n, t in lm.params.items()},
        batch,
        adv,
        state,
        loss_type=loss_type,
        temperature=TAU,
        grad_accum_steps=grad_accum,
        max_completion_length=LMAX,
        max_grad_norm=max_norm,
        seq_chunk=4,
    )
    if max_norm is not None:
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert abs(float(total) - norm) <= 1e-9 * norm
    opt.step()

    lr, (b1, b2), eps, wd, t = 2e-2, (0.9, 0.99), 1e-8, 0.1, 3
    assert dirs.lr_ref == lr and set(dirs.lr.values()) == {lr}
    assert dirs.grad_norm == pytest.approx(norm, rel=GRAD_RTOL)
    clip = 1.0 if max_norm is None else max_norm / (norm + 1e-6)
    assert dirs.clip_coef == pytest.approx(clip, rel=GRAD_RTOL)

    coef = loss_coefficients(
        batch.n_tokens, adv, loss_type=loss_type, grad_accum_steps=grad_accum, max_completion_length=LMAX
    )
    torch.testing.assert_close(dirs.coef, coef, rtol=1e-14, atol=0)
    for n, p in trainable(model).items():
        delta = p.detach() - before[n]
        assert delta.abs().max() > 1e-4
        _close_step(dirs.full[n] * lr, delta)
        # §1.6 by hand: D from the real second moment after the step, m from the state before it
        d = (1 - b1**t) * ((opt.state[p]["exp_avg_sq"] / (1 - b2**t)).sqrt() + eps)
        g_i = coef.view(-1, *[1] * delta.dim()) * ref_g[n]
        ref_c = -(1 - b1) * clip * g_i / d
        torch.testing.assert_close(
            dirs.components[n], ref_c, rtol=STEP_REL, atol=STEP_REL * float(ref_c.abs().max())
        )
        base = (-lr * wd * before[n] - lr * b1 * state.exp_avg[n] / d) / lr
        _close_step(dirs.baseline[n], base)
    _check_decomposition(dirs)


def _check_decomposition(dirs) -> None:
    m = len(dirs.coef)
    for n in dirs.full:
        assert dirs.components[n].shape == (m, *dirs.full[n].shape)
        scale = float(dirs.full[n].abs().max())
        torch.testing.assert_close(
            dirs.baseline[n] + dirs.grad[n], dirs.full[n], rtol=1e-10, atol=1e-12 * scale
        )
        torch.testing.assert_close(dirs.components[n].sum(0), dirs.grad[n], rtol=1e-12, atol=1e-14 * scale)
        stacked = dirs.stacked()[n]
        assert stacked.shape == (4, *dirs.full[n].shape)
        assert torch.equal(stacked[0], dirs.full[n]) and torch.equal(stacked[1], dirs.baseline[n])
        assert torch.equal(stacked[2], dirs.grad[n])
        torch.testing.assert_close(stacked[3], dirs.full[n], rtol=1e-10, atol=1e-12 * scale)
    # the decomposition is not trivial: both parts matter
    b = torch.cat([t.flatten() for t in dirs.baseline.values()])
    g = torch.cat([t.flatten() for t in dirs.grad.values()])
    assert b.abs().max() > 1e-2 * g.abs().max() and g.abs().max() > 1e-2 * b.abs().max()


def test_two_param_groups_use_their_own_lr() -> None:
    model, opt = warmed_up(two_groups=True, seed=1)
    prompts, completions = random_update_batch(6, seed=8)
    adv = advantages(torch.tensor([[0.0, 1.0, 1.0], [0.5, 0.0, 0.1]]), "group").flatten()
    batch = _batch(prompts, completions)
    state = AdamWState.from_optimizer(opt, model)
    before, max_norm, _ = real_step(model, opt, prompts, completions, adv, "dapo", 1, 0.5)
    lm = dh.FunctionalLM.from_model(model)
    dirs = update_directions(
        lm,
        {n: t.clone() for n, t in lm.params.items()},
        batch,
        adv,
        state,
        loss_type="dapo",
        temperature=TAU,
        max_grad_norm=max_norm,
    )
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()
    n_b = 0
    for n, p in trainable(model).items():
        lr = 3e-3 if "lora_B" in n else 2e-2
        n_b += "lora_B" in n
        assert dirs.lr[n] == lr
        delta = p.detach() - before[n]
        _close_step(dirs.full[n] * lr, delta)
        _close_step((dirs.baseline[n] + dirs.grad[n]) * lr, delta)
        torch.testing.assert_close(dirs.components[n].sum(0) * lr, dirs.grad[n] * lr, rtol=1e-12, atol=1e-16)
    assert n_b == 6 and dirs.lr_ref in (2e-2, 3e-3)
    _check_decomposition(dirs)


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture
def no_grads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if update_directions gets as far as computing a gradient."""

    def boom(*args, **kwargs):
        raise AssertionError("sequence_logprob_grads was called before the inputs were validated")

    monkeypatch.setattr("deltaH.updates.directions.sequence_logprob_grads", boom)


def test_errors_happen_before_any_gradient(no_grads: None) -> None:
    model, opt = warmed_up()
    lm = dh.FunctionalLM.from_model(model)
    state = AdamWState.from_optimizer(opt, model)
    prompts, completions = random_update_batch(4, seed=3)
    batch = _batch(prompts, completions)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)

    other = tiny_qwen2(seed=4)  # a full-parameter model: no LoRA names in its optimizer state
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    other_state = AdamWState.from_optimizer(other_opt, other)
    with pytest.raises(ValueError, match="does not belong to this model"):
        update_directions(lm, lm.params, batch, adv, other_state)
    with pytest.raises(ValueError, match="every advantage .* is zero"):
        update_directions(lm, lm.params, batch, torch.zeros(4, dtype=torch.float64), state)
    with pytest.raises(ValueError, match=r"advantages must have shape \[4\]"):
        update_directions(lm, lm.params, batch, adv[:3], state)
    with pytest.raises(ValueError, match="loss_type"):
        update_directions(lm, lm.params, batch, adv, state, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        update_directions(lm, lm.params, batch, adv, state, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="grad_accum_steps=3"):
        update_directions(lm, lm.params, batch, adv, state, grad_accum_steps=3)
    with pytest.raises(KeyError, match="not a trainable parameter"):
        update_directions(lm, {**lm.params, "lm_head.weight": torch.zeros(32, 32)}, batch, adv, state)
    # the valid call reaches the gradient (and the patched function)
    with pytest.raises(AssertionError, match="was called"):
        update_directions(lm, lm.params, batch, adv, state)


def test_zero_lr_still_has_a_direction_per_unit_lr() -> None:
    """The last step of a linear schedule has lr = 0: the real step is zero, but the direction per
    unit lr (``−λθ − m′/D``, independent of lr) exists and equals the one of the same state at any
    lr > 0 (only the rounding of ``θ + lr·u`` differs: STEP_REL of the direction)."""
    model, opt = warmed_up()
    prompts, completions = random_update_batch(6, seed=7)
    adv = advantages(torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.9, 0.4]]), "group").flatten()
    batch = _batch(prompts, completions)
    lm = dh.FunctionalLM.from_model(model)
    kw = {"loss_type": "dapo", "temperature": TAU, "max_grad_norm": 0.5}
    got = {}
    for lr in (0.0, 2e-2):
        for g in opt.param_groups:
            g["lr"] = lr
        state = AdamWState.from_optimizer(opt, model)
        got[lr] = update_directions(lm, lm.params, batch, adv, state, **kw)
    assert got[0.0].lr_ref == 0.0 and got[2e-2].lr_ref == 2e-2
    for n in got[0.0].full:
        for part in ("full", "baseline", "grad", "components"):
            _close_step(getattr(got[0.0], part)[n], getattr(got[2e-2], part)[n])
    _check_decomposition(got[0.0])
