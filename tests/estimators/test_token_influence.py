"""Token influence (deltaH.estimators.token_influence) against plain references.

References, none calling deltaH's estimators:

* ``ref_x``: the E-gradient ``X = ∇_θ mean_n [e_n + logq_n · sg(e_n − H)]`` by ordinary autograd over
  one unpadded row of E at a time (``model(...).logits``, the nucleus from transformers' own warpers,
  float64 math).
* ``ref_token_grad``: ``∇_θ log softmax(z/τ)[y]`` of ONE update token by ordinary autograd.
* δH₁ along ``grad`` and along each component ``ĉ_i`` by forward mode
  (:func:`deltaH.delta_h_first_order`, ``mode="forward"``): tested against its own references in
  ``test_first_order.py``, and a different algorithm from the reverse gradient + jvp here.

Tolerances: the tiny models are float64 end to end (conftest), so both sides differ by float64
round-off only, amplified by the cancellations in ``ż_y − Σ p ż`` and in ``e + logq·(e − H)``:
observed ≤ 1e-13 relative to the largest term on AVX-512, AVX2 and default kernels; ``REL`` = 1e-9.
A wrong sign, clip, preconditioner or temperature is an O(1) error.
"""

from __future__ import annotations

import pytest
import torch
from _refs import hf_keep
from conftest import tiny_llama, tiny_qwen2, with_lora

import deltaH as dh
from deltaH.errors import BatchError
from deltaH.estimators.first_order import entropy_gradient
from deltaH.estimators.token_influence import sequence_token_weights, token_influence
from deltaH.updates.directions import directions_from_grads
from deltaH.updates.grads import logprob_sums, sequence_logprob_grads

TAU = 0.8
REL = 1e-9

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _close_rel(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    scale = float(ref.abs().max())
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=rel * max(scale, 1e-300))


def _update_batch(n: int, seed: int, vocab: int = 32) -> dh.SequenceBatch:
    """Random prompts and responses of different lengths, left-padded (the trainer's log π has no
    top-p, so any token is legal in U)."""
    g = torch.Generator().manual_seed(seed)
    t = 10
    ids = torch.randint(0, vocab, (n, t), generator=g)
    am = torch.zeros(n, t, dtype=torch.bool)
    rm = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):
        p, r = 2 + i % 3, 1 + (3 * i) % 5
        am[i, t - p - r :] = True
        rm[i, t - r :] = True
    return dh.SequenceBatch(ids, am, rm)


def _model(kind: str) -> torch.nn.Module:
    return with_lora(tiny_qwen2()) if kind == "lora" else tiny_llama(tie=True)  # full FT, tied head


def _state(model: torch.nn.Module, lm: dh.FunctionalLM, batch: dh.SequenceBatch) -> dh.AdamWState:
    """A real AdamW after one real step, so that D differs from parameter to parameter."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    (0.01 * logprob_sums(lm, dict(model.named_parameters()), batch).sum()).backward()
    opt.step()
    opt.zero_grad()
    return dh.AdamWState.from_optimizer(opt, model)


def ref_x(
    model: torch.nn.Module, names: list[str], ev: dh.SequenceBatch, top_p: float
) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    e, lq = [], []
    for i in range(len(ev)):
        am = ev.attention_mask[i]
        ids, resp = ev.input_ids[i][am], ev.response_mask[i][am]
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].double() / TAU
        keep = hf_keep(logits.detach() * TAU, TAU, top_p)
        lp = torch.log_softmax(logits.masked_fill(~keep, float("-inf")), -1)
        pos = resp.nonzero().flatten()
        lq.append(lp[pos - 1].gather(-1, ids[pos].unsqueeze(-1)).sum())
        e.append(-(lp.exp() * lp.masked_fill(~keep, 0.0))[pos - 1].sum())  # no 0·(−inf) in the backward
    e_t, lq_t = torch.stack(e), torch.stack(lq)
    f = (e_t + lq_t * (e_t - e_t.mean()).detach()).mean()
    return dict(zip(names, torch.autograd.grad(f, [named[n] for n in names]), strict=True))


def ref_token_grad(
    model: torch.nn.Module, names: list[str], up: dh.SequenceBatch, i: int, k: int
) -> list[torch.Tensor]:
    named = dict(model.named_parameters())
    am = up.attention_mask[i]
    ids, resp = up.input_ids[i][am], up.response_mask[i][am]
    pos = int(resp.nonzero().flatten()[k])
    logits = model(input_ids=ids[:pos].unsqueeze(0)).logits[0, -1].double()
    lp = torch.log_softmax(logits / TAU, -1)[ids[pos]]
    return list(torch.autograd.grad(lp, [named[n] for n in names]))


@pytest.fixture(scope="module", params=[("lora", 1.0), ("lora", 0.9), ("full", 0.9)],
                ids=["lora-p1", "lora-p0.9", "full-p0.9"])
def setup(request: pytest.FixtureRequest) -> dict:
    kind, top_p = request.param
    model = _model(kind)
    lm = dh.FunctionalLM.from_model(model)
    up = _update_batch(6, seed=2)
    state = _state(model, lm, _update_batch(4, seed=9))
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(TAU, top_p)
    ev = dh.sample(lm, lm.params, [[3, 4, 5], [7, 8]], policy=pol, max_new_tokens=4, n_per_prompt=3,
                   eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(11))
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, -0.4], dtype=torch.float64)
    ud = dh.update_directions(lm, lm.params, up, adv, state, temperature=TAU, max_grad_norm=0.5)
    assert ud.clip_coef < 1.0  # clipping active: its factor must reach every token
    x = entropy_gradient(lm.params, ev, lm=lm, policy=pol, tf_batch_size=4)
    return {"model": model, "lm": lm, "up": up, "ev": ev, "pol": pol, "ud": ud, "x": x, "state": state,
            "top_p": top_p}


def test_entropy_gradient_matches_plain_autograd(setup: dict) -> None:
    lm, model = setup["lm"], setup["model"]
    names = list(lm.params)
    ref = ref_x(model, names, setup["ev"], setup["top_p"])
    for n in names:
        _close_rel(setup["x"][n], ref[n])


def test_tokens_sum_to_first_order_along_grad_and_components(setup: dict) -> None:
    lm, up, ev, pol, ud, x = (setup[k] for k in ("lm", "up", "ev", "pol", "ud", "x"))
    w = sequence_token_weights(ud.coef, up.n_tokens)
    ti = token_influence(lm, lm.params, up, x, ud, w, temperature=TAU, tf_batch_size=4)
    fo = dh.delta_h_first_order(lm.params, {n: g[None] for n, g in ud.grad.items()}, ev, lm=lm, policy=pol,
                                eta=1.0, mode="forward")
    comps = dh.delta_h_first_order(lm.params, ud.components, ev, lm=lm, policy=pol, eta=1.0, mode="forward")
    _close_rel(torch.tensor(ti.total, dtype=torch.float64), fo.slope[0])
    _close_rel(ti.per_sequence, comps.slope)
    assert ti.influence.shape == (len(up), int(up.n_tokens.max()))
    assert bool((ti.influence[~ti.mask] == 0).all()) and bool(ti.mask.sum() == up.n_tokens.sum())


def test_one_token_matches_per_token_autograd(setup: dict) -> None:
    """Random per-token weights (as a replayed step has): s[i, k] = −clip·w·⟨∇ℓ_ik, P·X⟩."""
    model, lm, up, ud, x = (setup[k] for k in ("model", "lm", "up", "ud", "x"))
    names = list(lm.params)
    w = torch.randn(len(up), 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w = w * (torch.arange(6).unsqueeze(0) < up.n_tokens.unsqueeze(1))
    ti = token_influence(lm, lm.params, up, x, ud, w, temperature=TAU, tf_batch_size=4)
    for i, k in [(0, 0), (3, 1), (5, int(up.n_tokens[5]) - 1)]:
        g = ref_token_grad(model, names, up, i, k)
        inner = sum((gn.double() * ud.precond[n].double() * x[n].double()).sum() for n, gn in zip(names, g,
                                                                                                  strict=True))
        want = -ud.clip_coef * w[i, k] * inner
        _close_rel(ti.influence[i, k], want)
        _close_rel(ti.inner[i, k], -ud.clip_coef * inner)
    # the per-token statistics are those of softmax(z/τ) at the token
    am = up.attention_mask[1]
    ids, resp = up.input_ids[1][am], up.response_mask[1][am]
    pos = int(resp.nonzero().flatten()[0])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids[:pos].unsqueeze(0)).logits[0, -1].double() / TAU, -1)
    _close_rel(ti.logp[1, 0], lp[ids[pos]])
    _close_rel(ti.entropy[1, 0], -(lp.exp() * lp).sum())
    _close_rel(ti.sum_p2[1, 0], (lp.exp() ** 2).sum())


def test_replayed_token_weights_sum_to_the_weighted_step(setup: dict) -> None:
    """Per-token weights w [M, T]: Σ_k s[i, k] is δH₁ along the component of Σ_k w_ik ∇ℓ_ik."""
    lm, up, ev, pol, x, state = (setup[k] for k in ("lm", "up", "ev", "pol", "x", "state"))
    w = torch.randn(len(up), 6, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 0.05
    w = w * (torch.arange(6).unsqueeze(0) < up.n_tokens.unsqueeze(1))
    g, _ = sequence_logprob_grads(lm, lm.params, up, temperature=TAU, token_weights=w)
    ud = directions_from_grads(lm.params, g, state, coef=w.sum(1), max_grad_norm=0.5)
    ti = token_influence(lm, lm.params, up, x, ud, w, temperature=TAU)
    comps = dh.delta_h_first_order(lm.params, ud.components, ev, lm=lm, policy=pol, eta=1.0, mode="forward")
    _close_rel(ti.per_sequence, comps.slope)


def test_maximize_flips_the_sign(setup: dict) -> None:
    lm, up, ud, x = (setup[k] for k in ("lm", "up", "ud", "x"))
    w = sequence_token_weights(ud.coef, up.n_tokens)
    a = token_influence(lm, lm.params, up, x, ud, w, temperature=TAU)
    b = token_influence(lm, lm.params, up, x, ud, w, temperature=TAU, maximize=set(lm.params))
    torch.testing.assert_close(b.influence, -a.influence, rtol=0, atol=0)


def test_bad_weights_are_refused(setup: dict) -> None:
    lm, up, ud, x = (setup[k] for k in ("lm", "up", "ud", "x"))
    with pytest.raises(BatchError, match="token_weights has shape"):
        token_influence(lm, lm.params, up, x, ud, torch.zeros(len(up) + 1, 6), temperature=TAU)
    w = torch.ones(len(up), 6, dtype=torch.float64)
    with pytest.raises(BatchError, match="beyond their scored tokens"):
        token_influence(lm, lm.params, up, x, ud, w, temperature=TAU)
    with pytest.raises(BatchError, match="x has no entry"):
        w = sequence_token_weights(ud.coef, up.n_tokens)
        token_influence(lm, lm.params, up, {}, ud, w, temperature=TAU)
