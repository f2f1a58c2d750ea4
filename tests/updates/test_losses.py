"""RL loss normalisation (deltaH.updates.losses) against a literal re-implementation of TRL.

References written here, never calling deltaH:

* ``ref_advantages``: TRL's reward rule in plain Python floats (``statistics.mean`` / ``stdev``,
  the unbiased std, ``+ 1e-4``; the mean is always per group, the std per group, over the batch,
  or not used).
* ``trl_step_loss``: TRL 1.16 ``GRPOTrainer._compute_loss`` for every micro-batch of one optimizer
  step (U split into consecutive micro-batches, as the trainer feeds them), on-policy
  (``old_per_token_logps = per_token_logps.detach()``), summed over the micro-batches the way the
  trainer's successive ``backward`` calls accumulate them. ``grpo``/``bnpo``/``dr_grpo`` are
  divided by the accumulation steps; ``dapo`` divides by ``num_items_in_batch`` (the active tokens
  of the whole generation batch) and nothing else (NOTES.md, "TRL loss normalisation").

The contract checked: with ``S_i = Σ_t log π(y_t)``, ``Σ_i coef_i S_i`` equals the summed
micro-batch losses in value (``per_token_loss = −A·logp``) and in gradient (TRL's clipped
surrogate at ratio 1, whose gradient is ``−A·∇logp``). Everything is float64 arithmetic on the
same numbers in a different order: tolerances are float64 round-off (``rtol=1e-12``).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from conftest import tiny_qwen2, with_lora
from hypothesis import given
from hypothesis import strategies as st

from deltaH._choices import LOSS_TYPES
from deltaH.updates import advantages, loss_coefficients

EXACT64 = dict(rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------- references
def ref_advantages(rewards: list[list[float]], scale_rewards: str) -> list[list[float]]:
    """TRL's advantages in plain Python (``rewards`` is B lists of G floats)."""
    flat = [r for group in rewards for r in group]
    out = []
    for group in rewards:
        mean = statistics.mean(group)
        if scale_rewards == "group":
            std = statistics.stdev(group) if len(group) > 1 else 0.0
        elif scale_rewards == "batch":
            std = statistics.stdev(flat) if len(flat) > 1 else 0.0
        else:
            std = None
        out.append([(r - mean) / (std + 1e-4) if std is not None else r - mean for r in group])
    return out


def trl_micro_batch_loss(
    logps: torch.Tensor,
    completion_mask: torch.Tensor,
    adv: torch.Tensor,
    loss_type: str,
    grad_accum_steps: int,
    num_items_in_batch: torch.Tensor,
    max_completion_length: int | None = None,
    surrogate: bool = False,
) -> torch.Tensor:
    """TRL's ``_compute_loss`` on ONE micro-batch: ``logps [n_mb, C]``, ``completion_mask``, ``adv [n_mb]``.

    ``surrogate=False``: ``per_token_loss = −A·logp`` (the loss whose value is ``Σ coef S``);
    ``surrogate=True``: TRL's clipped PPO surrogate with ``old = logp.detach()`` (value ``−A`` per
    token, gradient ``−A·∇logp``).
    """
    mask = completion_mask.to(logps.dtype)
    a = adv.unsqueeze(1)
    if surrogate:
        coef_1 = torch.exp(logps - logps.detach())
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
        per_token_loss = -torch.min(coef_1 * a, coef_2 * a)
    else:
        per_token_loss = -a * logps
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        return loss / grad_accum_steps
    if loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        return loss / grad_accum_steps
    if loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
        return loss / grad_accum_steps
    if loss_type == "dapo":
        return (per_token_loss * mask).sum() / num_items_in_batch  # one process: no further division
    raise AssertionError(loss_type)


def trl_step_loss(
    per_token_logps: torch.Tensor,
    completion_mask: torch.Tensor,
    adv: torch.Tensor,
    loss_type: str,
    grad_accum_steps: int,
    max_completion_length: int | None = None,
    surrogate: bool = False,
) -> torch.Tensor:
    """Σ over the consecutive micro-batches of :func:`trl_micro_batch_loss` for one optimizer step.

    ``per_token_logps [N, C]`` (right-padded completions), ``completion_mask [N, C]``, ``adv [N]``;
    ``num_items_in_batch`` is the active-token count of the whole generation batch.
    """
    n = per_token_logps.shape[0]
    n_mb = n // grad_accum_steps
    num_items_in_batch = completion_mask.sum()
    total = per_token_logps.new_zeros(())
    for s in range(0, n, n_mb):
        sl = slice(s, s + n_mb)
        total = total + trl_micro_batch_loss(
            per_token_logps[sl],
            completion_mask[sl],
            adv[sl],
            loss_type,
            grad_accum_steps,
            num_items_in_batch,
            max_completion_length,
            surrogate,
        )
    return total


def _masked_logps(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c = max(lengths)
    logps = -torch.rand(len(lengths), c, generator=g, dtype=torch.float64) * 3
    mask = torch.arange(c).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return logps.masked_fill(~mask, 0.0), mask  # padded entries are 0, as TRL's are after masking


# ------------------------------------------------------------------------------------- advantages
rewards_st = st.integers(1, 4).flatmap(
    lambda b: st.integers(2, 6).flatmap(
        lambda g: st.lists(
            st.lists(
                st.one_of(st.sampled_from([0.0, 1.0]), st.floats(-5, 5, allow_nan=False)),
                min_size=g,
                max_size=g,
            ),
            min_size=b,
            max_size=b,
        )
    )
)


@given(rewards=rewards_st, scale=st.sampled_from(["group", "batch", "none"]))
def test_advantages_match_trl_rule(rewards: list[list[float]], scale: str) -> None:
    got = advantages(torch.tensor(rewards, dtype=torch.float64), scale)
    assert got.shape == (len(rewards), len(rewards[0])) and got.dtype == torch.float64
    torch.testing.assert_close(
        got, torch.tensor(ref_advantages(rewards, scale), dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


def test_advantages_hand_values() -> None:
    """One group [0, 0, 1, 1]: mean ½, unbiased std 1/√3 → ±(½)/(1/√3 + 1e-4)."""
    r = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = 0.5 / (3**-0.5 + 1e-4)
    want = torch.tensor([[-a, -a, a, a], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(advantages(r, "group"), want, rtol=1e-14, atol=0)
    # batch: the same group mean, the std of all eight rewards
    std_all = statistics.stdev([0, 0, 1, 1, 2, 2, 2, 2])
    torch.testing.assert_close(
        advantages(r, "batch")[0],
        torch.tensor([-0.5, -0.5, 0.5, 0.5]).double() / (std_all + 1e-4),
        rtol=1e-14,
        atol=0,
    )
    torch.testing.assert_close(advantages(r, "none")[0], torch.tensor([-0.5, -0.5, 0.5, 0.5]).double())


def test_advantages_errors() -> None:
    with pytest.raises(ValueError, match="scale_rewards"):
        advantages(torch.zeros(2, 3), "std")
    with pytest.raises(ValueError, match=r"\[B, G\]"):
        advantages(torch.zeros(6), "group")


# ------------------------------------------------------------------------ coefficients (no model)
@st.composite
def update_batches(draw):
    n_acc = draw(st.integers(1, 3))
    n_mb = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, 7), min_size=n_acc * n_mb, max_size=n_acc * n_mb))
    adv = draw(
        st.lists(st.floats(-3, 3, allow_nan=False), min_size=len(lengths), max_size=len(lengths)).filter(
            lambda a: any(x != 0 for x in a)
        )
    )
    return n_acc, lengths, adv, draw(st.integers(0, 10_000))


@given(case=update_batches(), loss_type=st.sampled_from(LOSS_TYPES))
def test_coefficients_match_trl_micro_batch_loop(case, loss_type: str) -> None:
    """Random per-token log-probs: value and gradient of Σ coef·S equal TRL's summed micro-batch loss."""
    n_acc, lengths, adv_l, seed = case
    lmax = max(lengths) + 3
    logps, mask = _masked_logps(lengths, seed)
    adv = torch.tensor(adv_l, dtype=torch.float64)
    coef = loss_coefficients(
        torch.tensor(lengths), adv, loss_type=loss_type, grad_accum_steps=n_acc, max_completion_length=lmax
    )
    assert coef.shape == (len(lengths),) and coef.dtype == torch.float64

    lp = logps.clone().requires_grad_(True)
    ours = (coef * (lp * mask).sum(1)).sum()
    ref = trl_step_loss(lp, mask, adv, loss_type, n_acc, lmax)
    torch.testing.assert_close(ours, ref, **EXACT64)
    (g_ours,) = torch.autograd.grad(ours, lp)
    lp2 = logps.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(trl_step_loss(lp2, mask, adv, loss_type, n_acc, lmax, surrogate=True), lp2)
    torch.testing.assert_close(g_ours, g_ref, **EXACT64)


def test_coefficients_depend_on_the_micro_batch_split() -> None:
    """The normalisations really differ (so the comparisons above can fail): bnpo with two unequal
    micro-batches is not dapo, and grpo/dr_grpo/dapo do not change with the split."""
    n_tok = torch.tensor([1, 2, 6, 7])
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    bnpo2 = loss_coefficients(n_tok, adv, loss_type="bnpo", grad_accum_steps=2)
    torch.testing.assert_close(bnpo2, -adv / (torch.tensor([3.0, 3, 13, 13]).double() * 2))
    torch.testing.assert_close(loss_coefficients(n_tok, adv, loss_type="bnpo"), -adv / 16)
    for lt in ("grpo", "dr_grpo", "dapo"):
        kw = {"max_completion_length": 9}
        torch.testing.assert_close(
            loss_coefficients(n_tok, adv, loss_type=lt, grad_accum_steps=2, **kw),
            loss_coefficients(n_tok, adv, loss_type=lt, **kw),
        )
    torch.testing.assert_close(
        loss_coefficients(n_tok, adv, loss_type="dr_grpo", max_completion_length=9), -adv / (4 * 9)
    )


# ------------------------------------------------------------------------ coefficients on a model
@pytest.fixture(scope="module")
def lora_model() -> torch.nn.Module:
    return with_lora(tiny_qwen2(seed=3))


def completion_logps(
    model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's ``per_token_logps [N, C]`` (right-padded completions) and ``completion_mask``, computed one
    unpadded row at a time with ``model(...).logits`` and ``log_softmax(logits / τ)``."""
    c = max(len(x) for x in completions)
    rows, masks = [], []
    for p, y in zip(prompts, completions, strict=True):
        ids = torch.tensor([p + y])
        logits = model(input_ids=ids).logits[0, len(p) - 1 : len(p) - 1 + len(y)]
        lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, torch.tensor(y)[:, None])[:, 0]
        rows.append(torch.nn.functional.pad(lp, (0, c - len(y))))
        masks.append(torch.arange(c) < len(y))
    return torch.stack(rows), torch.stack(masks)


def random_update_batch(n: int, seed: int, vocab: int = 32) -> tuple[list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)

    def draw(lo: int, max_len: int) -> list[int]:
        length = int(torch.randint(1, max_len + 1, (1,), generator=g))
        return torch.randint(lo, vocab, (length,), generator=g).tolist()

    prompts = [draw(4, 3) for _ in range(n)]
    completions = [draw(0, 6) for _ in range(n)]
    return prompts, completions


@pytest.mark.parametrize("grad_accum", [1, 2])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_coefficients_on_a_model_match_trl(
    lora_model: torch.nn.Module, loss_type: str, grad_accum: int
) -> None:
    """B = 2 prompts × G = 3 responses on a tiny LoRA model, τ = 0.7: Σ coef_i S_i and TRL's summed
    micro-batch loss agree in value and in their gradients w.r.t. every LoRA parameter."""
    model, tau, lmax = lora_model, 0.7, 8
    prompts, completions = random_update_batch(6, seed=11)
    rewards = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 1.0]])
    adv = advantages(rewards, "group").flatten()
    n_tok = torch.tensor([len(y) for y in completions])
    coef = loss_coefficients(
        n_tok, adv, loss_type=loss_type, grad_accum_steps=grad_accum, max_completion_length=lmax
    )
    params = [p for p in model.parameters() if p.requires_grad]

    logps, mask = completion_logps(model, prompts, completions, tau)
    ours = (coef * (logps * mask).sum(1)).sum()
    ref = trl_step_loss(logps, mask, adv, loss_type, grad_accum, lmax)
    torch.testing.assert_close(ours, ref, **EXACT64)
    g_ours = torch.autograd.grad(ours, params)
    logps2, mask2 = completion_logps(model, prompts, completions, tau)
    ref2 = trl_step_loss(logps2, mask2, adv, loss_type, grad_accum, lmax, surrogate=True)
    g_ref = torch.autograd.grad(ref2, params)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, **EXACT64)
    assert max(float(g.abs().max()) for g in g_ours) > 1e-3  # a real, non-zero gradient


# ------------------------------------------------------------------------------------------ errors
def test_coefficient_errors() -> None:
    n_tok = torch.tensor([3, 4, 5, 6, 7, 8])
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0, 2.0, -2.0])
    with pytest.raises(ValueError, match="every advantage .* is zero"):
        loss_coefficients(n_tok, torch.zeros(6))
    with pytest.raises(ValueError, match="loss_type"):
        loss_coefficients(n_tok, adv, loss_type="sapo")
    with pytest.raises(ValueError, match="grad_accum_steps=4"):
        loss_coefficients(n_tok, adv, grad_accum_steps=4)
    with pytest.raises(ValueError, match="grad_accum_steps=0"):
        loss_coefficients(n_tok, adv, grad_accum_steps=0)
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_coefficients(n_tok, adv, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_coefficients(n_tok, adv, loss_type="dr_grpo", max_completion_length=0)
    with pytest.raises(ValueError, match="shape"):
        loss_coefficients(n_tok, adv[:5])
    # accepted: a divisor of N, and dr_grpo with its length
    assert loss_coefficients(n_tok, adv, grad_accum_steps=3).shape == (6,)
    assert loss_coefficients(n_tok, adv, loss_type="dr_grpo", max_completion_length=8).shape == (6,)
