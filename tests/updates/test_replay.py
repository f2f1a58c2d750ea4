"""Replaying a recorded TRL GRPO step (deltaH.updates.replay, trl_objective) against TRL's REAL loss code.

The reference is ``trl.GRPOTrainer._compute_loss`` itself, called unbound on a ``SimpleNamespace``
that provides the attributes it reads. Its only model access, ``_get_per_token_logps_and_entropies``,
is replaced by a plain HF forward written here (``model(input_ids, attention_mask).logits``, the
completion slice ``/ τ``, ``log_softmax``, gather, entropy; zero where the completion mask is 0, as
TRL's fused head returns them) — nothing of deltaH. Micro-batches are random: left-padded prompts,
right-padded completions with zero tails, one fully masked row (``mask_truncated_completions``),
``old_per_token_logps`` and ``ref_per_token_logps`` from perturbed copies of the model (ratios ≠ 1,
some outside the clip range: asserted). For each micro-batch ``loss.backward()`` accumulates the
real ``.grad``; then the HF Trainer's ``clip_grad_norm_`` and a real ``torch.optim.AdamW`` step
(warmed up by two real steps, weight decay) give the real Δθ.

Checked: (i) Σ_i per-sequence gradients of the replayed weights = the real accumulated ``.grad``;
(ii) ``lr · full`` = the real Δθ; (iii) per-token weights = the gradient of TRL's loss w.r.t. a leaf
log-prob tensor (and the KL part = the same with zero advantages, which removes the policy term);
TRL's logged clip metrics and loss; (iv) ``Σ components + baseline = full`` and
``grad_pg + grad_kl = grad``; (v) every unsupported option is refused by name.

Tolerances. Everything is float64 end to end (conftest ``exact64``). deltaH's logp comes from a
compacted, right-padded forward with position ids ``0..L−1``; TRL's from the left-padded batch with
``arange`` positions. RoPE is relative, so both are the same function, evaluated with different
rotation angles and summation orders: observed differences in logp ≤ 1e-14 absolute. Ratios
``exp(logp − old)`` and the two-layer backward carry that through with O(1) gain, so per-token
weights agree to ``W_TOL`` = 1e-11 relative (of max |w|) and gradient sums to ``GRAD_TOL`` = 1e-10
relative (of each tensor's max |g|); observed ≤ 3e-15 and ≤ 1e-14 (AVX-512, AVX2 and default
kernels), margins of ~1e3 and ~1e4 for CPUs and op orders not seen here. A wrong normaliser, a missing
mask or term is ≥ 1e-2 relative. AdamW divides by ``sqrt(v)``, which lifts round-off of tiny
entries to the scale of the step: ``STEP_REL`` = 1e-9 × max|Δθ| as in test_directions.
"""

from __future__ import annotations

import copy
import functools
from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from _refs import trainable
from conftest import tiny_qwen2
from test_directions import warmed_up
from trl import GRPOTrainer

import deltaH as dh
from deltaH.updates import AdamWState
from deltaH.updates.grads import sequence_logprob_grads
from deltaH.updates.recorded import RecordedStep, TrainerOptions
from deltaH.updates.replay import replay_directions
from deltaH.updates.trl_objective import check_supported, micro_batch_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TAU = 0.8
B, P, T = 4, 4, 6  # rows per micro-batch, prompt and completion widths (T = max_completion_length)
W_TOL = 1e-11
GRAD_TOL = 1e-10
STEP_REL = 1e-9


# ------------------------------------------------------------------------------------ references
def hf_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep: int, tau: float):
    """TRL's per-token log-probs and entropies of the completion, by a plain HF forward."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    z = logits[:, -logits_to_keep - 1 : -1] / tau
    lsm = torch.log_softmax(z, dim=-1)
    lp = lsm.gather(-1, input_ids[:, -logits_to_keep:, None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    keep = attention_mask[:, -logits_to_keep:].bool()  # the fused head's labels are -100 elsewhere
    return torch.where(keep, lp, 0.0), torch.where(keep, ent, 0.0)


def fake_trainer(o: TrainerOptions, n_acc: int, tau: float, leaf: list | None = None) -> SimpleNamespace:
    """The attributes ``GRPOTrainer._compute_loss`` reads (TRL 1.16), one process per rank.

    ``leaf``: if a list, the log-probs are returned as a fresh leaf tensor (appended to it), so the
    gradient of TRL's loss w.r.t. them can be taken.
    """

    def logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, **kw):
        assert not kw.get("compute_aux_loss") and kw.get("pixel_values") is None
        lp, ent = hf_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, tau)
        if leaf is not None:
            lp = lp.detach().requires_grad_(True)
            leaf.append(lp)
        return lp, ent.detach(), None

    acc = SimpleNamespace(
        num_processes=o.world_size,
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        pad_across_processes=lambda x, dim=0, pad_index=0: x,
        reduce=lambda x, reduction="sum": x,
    )
    args = SimpleNamespace(
        delta=o.delta,
        use_bias_correction_kl=o.use_bias_correction_kl,
        steps_per_generation=o.steps_per_generation,
        sapo_temperature_pos=o.extra.get("sapo_temperature_pos"),
        sapo_temperature_neg=o.extra.get("sapo_temperature_neg"),
    )
    fake = SimpleNamespace(
        loss_type=o.loss_type,
        epsilon_low=o.epsilon_low,
        epsilon_high=o.epsilon_high,
        beta=o.beta,
        importance_sampling_level=o.importance_sampling_level,
        top_entropy_quantile=o.top_entropy_quantile,
        off_policy_mask_threshold=o.off_policy_mask_threshold,
        use_vllm=o.use_vllm,
        vllm_importance_sampling_correction=o.vllm_importance_sampling_correction,
        max_completion_length=o.max_completion_length,
        current_gradient_accumulation_steps=n_acc,
        args=args,
        model=SimpleNamespace(training=True),
        accelerator=acc,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        get_off_policy_mask=GRPOTrainer.get_off_policy_mask,
        _get_per_token_logps_and_entropies=logps_and_entropies,
    )
    fake.get_high_entropy_mask = functools.partial(GRPOTrainer.get_high_entropy_mask, fake)
    return fake


def perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable(m).values():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def micro_batches(
    model,
    o: TrainerOptions,
    n_mb: int,
    seed: int,
    *,
    tool: bool = False,
    vllm: str | None = None,
    per_token_adv: bool = False,
    extra_items: int = 0,
) -> list[dict]:
    """Random recorded micro-batches (what ``_prepare_inputs`` returns), as module docstring."""
    g = torch.Generator().manual_seed(seed)
    old_model = perturbed(model, 0.6, seed + 1)
    ref_model = perturbed(model, 0.6, seed + 2)
    mbs = []
    for j in range(n_mb):
        pl = torch.randint(1, P + 1, (B,), generator=g)
        cl = torch.randint(1, T + 1, (B,), generator=g)
        pm = (torch.arange(P) >= P - pl[:, None]).long()
        cm = (torch.arange(T) < cl[:, None]).long()
        if j == 0:
            cm[-1] = 0  # a truncated completion masked out (mask_truncated_completions)
        pi = torch.randint(4, 32, (B, P), generator=g) * pm
        ci = torch.randint(0, 32, (B, T), generator=g) * cm
        mb = {
            "prompt_ids": pi,
            "prompt_mask": pm,
            "completion_ids": ci,
            "completion_mask": cm,
            "advantages": torch.randn(B, T if per_token_adv else 1, generator=g).squeeze(-1).double(),
        }
        if tool:
            tm = (torch.rand(B, T, generator=g) > 0.3).long()
            tm[:, 0] = 1
            mb["tool_mask"] = tm
        ids, am = torch.cat([pi, ci], 1), torch.cat([pm, cm], 1)
        with torch.no_grad():
            if o.num_iterations > 1 or o.use_vllm:
                mb["old_per_token_logps"] = hf_logps_and_entropies(old_model, ids, am, T, TAU)[0]
            if o.beta != 0.0:
                mb["ref_per_token_logps"] = hf_logps_and_entropies(ref_model, ids, am, T, TAU)[0]
        if vllm is not None:
            old = mb["old_per_token_logps"]
            mb["sampling_per_token_logps"] = old + 0.3 * torch.randn(B, T, generator=g, dtype=old.dtype)
            shape = (B, T) if vllm == "token" else (B, 1)
            mb["importance_sampling_ratio"] = 0.5 + torch.rand(*shape, generator=g, dtype=torch.float64)
        mbs.append(mb)
    loss_tokens = sum(int((mb["completion_mask"] * mb.get("tool_mask", 1)).sum()) for mb in mbs)
    for mb in mbs:
        mb["num_items_in_batch"] = torch.tensor(loss_tokens + extra_items)
    return mbs


def real_backward(model, o: TrainerOptions, ranks: list[list[dict]]) -> tuple[float, list[SimpleNamespace]]:
    """TRL's loss on every micro-batch, ``backward`` each; DDP's average over ranks. Returns the logged
    loss (Σ over micro-batches, mean over ranks) and each rank's fake trainer (with its metrics)."""
    model.zero_grad(set_to_none=True)
    fakes, total = [], 0.0
    for mbs in ranks:
        fake = fake_trainer(o, len(mbs), TAU)
        for mb in mbs:
            loss = GRPOTrainer._compute_loss(fake, model, mb)
            loss.backward()
            total += float(loss.detach())
        fakes.append(fake)
    for p in trainable(model).values():
        p.grad /= len(ranks)
    return total / len(ranks), fakes


def ref_token_weights(model, o: TrainerOptions, mb: dict, n_acc: int, zero_adv: bool = False) -> torch.Tensor:
    """``∂L/∂logp [B, T]`` of TRL's loss on a leaf log-prob tensor (``zero_adv``: the KL part alone)."""
    leaf: list = []
    fake = fake_trainer(o, n_acc, TAU, leaf)
    inputs = {**mb, "advantages": torch.zeros_like(mb["advantages"])} if zero_adv else mb
    (w,) = torch.autograd.grad(GRPOTrainer._compute_loss(fake, model, inputs), leaf)
    return w


def ref_max_ratio_dev(model, o: TrainerOptions, mbs: list[dict]) -> float:
    """``max |r − 1|`` over loss tokens (sequences with one, at sequence level), by hand."""
    devs = [0.0]
    for mb in mbs:
        ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
        am = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
        with torch.no_grad():
            lp = hf_logps_and_entropies(model, ids, am, T, TAU)[0]
        old = mb.get("old_per_token_logps", lp)
        m = (mb["completion_mask"] * mb.get("tool_mask", 1)).bool()
        for b in range(B):
            if m[b].any():
                lr = (lp[b] - old[b])[m[b]]
                r = lr.mean().exp() if o.importance_sampling_level == "sequence" else lr.exp()
                devs.append(float((r - 1).abs().max()))
    return max(devs)


def loss_token_layout(w: torch.Tensor, mb: dict) -> list[torch.Tensor]:
    """Per row with loss tokens: its weights in loss-token order (the replay's layout)."""
    lm = mb["completion_mask"].bool() & mb.get("tool_mask", torch.ones_like(mb["completion_mask"])).bool()
    return [w[b][lm[b]] for b in range(w.shape[0]) if lm[b].any()]


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * float(want.abs().max()))


# ----------------------------------------------------------------------------------------- cases
BASE = TrainerOptions(
    epsilon_low=0.2,
    epsilon_high=0.28,
    max_completion_length=T,
    gradient_accumulation_steps=2,
    steps_per_generation=2,
    temperature=TAU,
    num_iterations=2,
)
CASES = {
    "grpo-clip": (dict(loss_type="grpo"), {}),
    "dr_grpo-kl": (dict(loss_type="dr_grpo", beta=0.04), {}),
    "dapo-delta-spg4": (dict(loss_type="dapo", delta=1.3, steps_per_generation=4), dict(extra_items=17)),
    "bnpo-tool-per-token-adv": (dict(loss_type="bnpo"), dict(tool=True, per_token_adv=True)),
    "grpo-kl-bias-corr": (dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=True), {}),
    "grpo-sequence-is-kl": (dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.05), {}),
    "dapo-entropy-quantile": (dict(loss_type="dapo", top_entropy_quantile=0.4), {}),
    "dapo-vllm-token-opsm": (
        dict(
            loss_type="dapo",
            use_vllm=True,
            vllm_importance_sampling_correction=True,
            off_policy_mask_threshold=0.05,
        ),
        dict(vllm="token"),
    ),
    "grpo-vllm-sequence": (
        dict(loss_type="grpo", use_vllm=True, vllm_importance_sampling_correction=True),
        dict(vllm="sequence"),
    ),
    "dapo-on-policy-kl": (dict(loss_type="dapo", beta=0.2, num_iterations=1), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_replay_matches_the_real_trl_step(case: str) -> None:
    kw_opt, kw_mb = CASES[case]
    o = replace(BASE, **kw_opt)
    model, opt = warmed_up()
    mbs = micro_batches(model, o, 2, seed=10 * list(CASES).index(case), **kw_mb)
    state = AdamWState.from_optimizer(opt, model)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}

    loss, (fake,) = real_backward(model, o, [mbs])
    real_g = {n: p.grad.detach().clone() for n, p in trainable(model).items()}
    norm = float(torch.sqrt(sum((g**2).sum() for g in real_g.values())))
    o = replace(o, max_grad_norm=0.5 * norm)  # clipping active
    lm = dh.FunctionalLM.from_model(model)
    params = {n: t.clone() for n, t in lm.params.items()}
    rd = replay_directions(lm, params, RecordedStep(step=3, micro_batches=mbs, options=o), state, seq_chunk=3)

    # (i) the per-sequence gradients of the replayed weights sum to the real accumulated gradient
    g_seq, _ = sequence_logprob_grads(lm, params, rd.batch, temperature=TAU, token_weights=rd.token_weights)
    for n, g in real_g.items():
        _close(g_seq[n].sum(0), g, GRAD_TOL)
    assert rd.update.grad_norm == pytest.approx(norm, rel=GRAD_TOL)
    torch.testing.assert_close(rd.update.coef, rd.token_weights.sum(1), rtol=0, atol=0)

    # (iii) per-token weights = ∂(TRL's loss)/∂logp on a leaf; the KL part = the same with A = 0
    want, want_kl = [], []
    for mb in mbs:
        want += loss_token_layout(ref_token_weights(model, o, mb, len(mbs)), mb)
        if o.beta:
            want_kl += loss_token_layout(ref_token_weights(model, o, mb, len(mbs), zero_adv=True), mb)
    assert len(want) == len(rd.batch)
    _check_rows(rd, mbs, model)
    scale = max(float(w.abs().max()) for w in want)
    for i, w in enumerate(want):
        k = len(w)
        assert int(rd.batch.n_tokens[i]) == k and not rd.token_weights[i, k:].any()
        torch.testing.assert_close(rd.token_weights[i, :k], w, rtol=W_TOL, atol=W_TOL * scale)
    # TRL's logged numbers: the loss, and the clip metrics averaged over the step's micro-batches
    assert rd.loss == pytest.approx(loss, rel=W_TOL, abs=1e-14)
    for key, vals in fake._metrics["train"].items():
        if key.startswith("clip_ratio/"):
            # TRL divides float32 counts (`.float()`): 6e-8 relative
            assert rd.clip[key] == pytest.approx(sum(vals) / len(vals), rel=1e-7, abs=1e-12), key
    assert rd.max_ratio_dev == pytest.approx(ref_max_ratio_dev(model, o, mbs), rel=W_TOL, abs=1e-15)
    if o.num_iterations > 1 or o.use_vllm:  # off-policy: ratios ≠ 1 and some clipped
        assert rd.max_ratio_dev > o.epsilon_high
        assert rd.clip["clip_ratio/region_mean"] > 0
    else:
        assert rd.max_ratio_dev == 0.0

    # (iv) decompositions; the KL split
    _check_split(rd, model, o, want_kl)

    # (ii) the real AdamW step: clip_grad_norm_, then step
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
    opt.step()
    for n, p in trainable(model).items():
        delta = p.detach() - before[n]
        assert delta.abs().max() > 1e-4
        _close(rd.update.full[n] * rd.update.lr[n], delta, STEP_REL)


def _check_rows(rd, mbs: list[dict], model: torch.nn.Module) -> None:
    """Provenance, tokens, advantages and logp of every update sequence, from the recorded batch."""
    assert rd.rows.shape == (len(rd.batch), 3) and (rd.rows[:, 0] == 0).all()
    assert len(rd.batch) == 2 * B - 1  # the masked-out row is not an update sequence
    for i, (_, j, b) in enumerate(rd.rows.tolist()):
        mb = mbs[j]
        lm = (mb["completion_mask"] * mb.get("tool_mask", 1)).bool()[b]
        k = int(lm.sum())
        scored = rd.batch.input_ids[i][rd.batch.response_mask[i]]
        assert torch.equal(scored, mb["completion_ids"][b][lm])
        adv = mb["advantages"][b]
        adv = adv[lm].mean() if adv.dim() else adv  # per-token advantages: their mean over the loss tokens
        assert float(rd.advantages[i]) == pytest.approx(float(adv), rel=1e-14)
        ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)[b : b + 1]
        am = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)[b : b + 1]
        with torch.no_grad():
            lp = hf_logps_and_entropies(model, ids, am, T, TAU)[0][0][lm]
        torch.testing.assert_close(rd.logp[i, :k], lp, rtol=0, atol=1e-12)  # logp ≤ ~5 in size
        assert not rd.logp[i, k:].any()


def _check_split(rd, model, o: TrainerOptions, want_kl: list[torch.Tensor]) -> None:
    up = rd.update
    for n in up.full:
        scale = float(up.full[n].abs().max())
        torch.testing.assert_close(
            up.baseline[n] + up.components[n].sum(0), up.full[n], rtol=1e-10, atol=1e-12 * scale
        )
        kl = 0 if rd.grad_kl is None else rd.grad_kl[n]
        torch.testing.assert_close(rd.grad_pg[n] + kl, up.grad[n], rtol=1e-10, atol=1e-12 * scale)
    if o.beta == 0.0:
        assert rd.grad_kl is None
        return
    # grad_kl is the direction of TRL's KL weights alone (the reference's, recomputed here); the
    # policy part is there too (w − w_kl ≠ 0) and the KL direction is not negligible
    lm = dh.FunctionalLM.from_model(model)
    wk = torch.zeros_like(rd.token_weights)
    for i, w in enumerate(want_kl):
        wk[i, : len(w)] = w
    g, _ = sequence_logprob_grads(lm, lm.params, rd.batch, temperature=TAU, token_weights=wk)
    for n, t in rd.grad_kl.items():
        _close(t, -rd.update.clip_coef * rd.update.precond[n] * g[n].sum(0), GRAD_TOL)
    assert (rd.token_weights - wk).abs().max() > 1e-3 * wk.abs().max()
    g_kl = torch.cat([t.flatten() for t in rd.grad_kl.values()])
    assert g_kl.abs().max() > 1e-3 * torch.cat([t.flatten() for t in rd.grad_pg.values()]).abs().max()


# ------------------------------------------------------------------- weights only: more loss types
@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="cispo", epsilon_high=1.1),
        dict(loss_type="sapo", extra={"sapo_temperature_pos": 1.0, "sapo_temperature_neg": 1.05}),
        dict(loss_type="luspo", importance_sampling_level="sequence", beta=0.05),
        dict(loss_type="bnpo", delta=1.25, off_policy_mask_threshold=0.0, beta=0.02),
    ],
    ids=["cispo", "sapo", "luspo-sequence-kl", "bnpo-delta-opsm-kl"],
)
def test_micro_batch_weights_match_trl(kw: dict, qwen2_lora: torch.nn.Module) -> None:
    """:func:`micro_batch_weights` on TRL's own log-probs = autograd of the real ``_compute_loss``."""
    o = replace(BASE, **kw)
    model = qwen2_lora
    for mb in micro_batches(model, o, 2, seed=5):
        ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], 1)
        am = torch.cat([mb["prompt_mask"], mb["completion_mask"]], 1)
        with torch.no_grad():
            lp, ent = hf_logps_and_entropies(model, ids, am, T, TAU)
        got = micro_batch_weights(mb, lp, o, grad_accum=2, entropies=ent)
        want = ref_token_weights(model, o, mb, 2)
        torch.testing.assert_close(got.total, want, rtol=W_TOL, atol=W_TOL * float(want.abs().max()))
        assert want.abs().max() > 0
        fake = fake_trainer(o, 2, TAU)
        assert got.loss == pytest.approx(
            float(GRPOTrainer._compute_loss(fake, model, mb).detach()), rel=W_TOL
        )
        for key, (val,) in fake._metrics["train"].items():
            if key.endswith("_mean") or key == "cispo_clip_ratio":
                s, c = got.stats[key]
                assert float(s / c.clamp(min=1)) == pytest.approx(val, rel=1e-7, abs=1e-12), (
                    key
                )  # float32 in TRL
            elif key.endswith(("_min", "_max")):
                x = got.stats[key][~got.stats[key].isnan()]
                got_v = float(x.min() if key.endswith("_min") else x.max())
                assert got_v == pytest.approx(val, rel=1e-7, abs=1e-12), key


def test_two_ranks_average_as_ddp() -> None:
    """world_size = 2: each rank's loss (dapo: normaliser ÷ num_processes) and DDP's mean of gradients."""
    o = replace(BASE, loss_type="dapo", world_size=2, beta=0.03)
    model, opt = warmed_up()
    ranks = [micro_batches(model, o, 2, seed=40 + r) for r in range(2)]
    total = sum(int(mbs[0]["num_items_in_batch"]) for mbs in ranks)
    for mbs in ranks:
        for mb in mbs:
            mb["num_items_in_batch"] = torch.tensor(total)  # gathered over both processes
    state = AdamWState.from_optimizer(opt, model)
    loss, _ = real_backward(model, o, ranks)
    lm = dh.FunctionalLM.from_model(model)
    steps = [RecordedStep(step=1, micro_batches=ranks[r], options=o, rank=r) for r in (1, 0)]  # any order
    rd = replay_directions(lm, lm.params, steps, state)
    g_seq, _ = sequence_logprob_grads(
        lm, lm.params, rd.batch, temperature=TAU, token_weights=rd.token_weights
    )
    for n, p in trainable(model).items():
        _close(g_seq[n].sum(0), p.grad, GRAD_TOL)
    assert rd.rows[:, 0].tolist() == sorted(rd.rows[:, 0].tolist()) and set(rd.rows[:, 0].tolist()) == {0, 1}
    assert rd.loss == pytest.approx(loss, rel=W_TOL)
    with pytest.raises(dh.UnsupportedOptionError, match="world_size=2"):
        replay_directions(lm, lm.params, steps[:1], state)


# ---------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(loss_type="vespo"), "loss_type='vespo'.*VESPO"),
        (dict(loss_type="ppo"), "loss_type='ppo'"),
        (dict(entropy_coef=0.01), "entropy_coef=0.01.*entropy bonus"),
        (dict(use_adaptive_entropy=True), "use_adaptive_entropy=True"),
        (dict(importance_sampling_level="group"), "importance_sampling_level='group'"),
        (dict(extra={"router_aux_loss_coef": 0.01}), "router_aux_loss_coef=0.01"),
        (dict(extra={"disable_dropout": False}), "disable_dropout=False"),
        (dict(trainer="RLOOTrainer"), "trainer='RLOOTrainer'"),
        (dict(loss_type="sapo"), "sapo_temperature_pos"),
        (dict(loss_type="dr_grpo", max_completion_length=None), "max_completion_length=None"),
        (dict(steps_per_generation=None), "steps_per_generation=None"),
        (dict(top_entropy_quantile=0.5, world_size=2), "top_entropy_quantile=0.5.*world_size=2"),
        (dict(world_size=2), "world_size=2.*1 recorded rank"),
        (dict(gradient_accumulation_steps=1), "gradient_accumulation_steps=1.*2 micro-batches"),
    ],
)
def test_unsupported_options_are_refused_by_name(kw: dict, match: str) -> None:
    o = replace(BASE, **{"loss_type": "dapo", **kw})
    step = RecordedStep(step=1, micro_batches=[{}, {}], options=o)
    with pytest.raises(dh.UnsupportedOptionError, match=match):
        check_supported(o, step)


def test_absolute_position_models_are_refused_with_left_padding() -> None:
    """TRL's forward numbers left-padded rows from the first pad; only relative positions hide that."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                  bos_token_id=1, eos_token_id=1)
    cfg._attn_implementation = "eager"
    gpt2 = transformers.GPT2LMHeadModel(cfg).double().eval()
    lm = dh.FunctionalLM.from_model(gpt2)
    state = AdamWState.from_optimizer(torch.optim.AdamW(gpt2.parameters()), gpt2)
    o = replace(BASE, num_iterations=1)
    mbs = micro_batches(gpt2, o, 2, seed=1)
    with pytest.raises(dh.UnsupportedOptionError, match="GPT2LMHeadModel uses absolute positions"):
        replay_directions(lm, lm.params, RecordedStep(step=1, micro_batches=mbs, options=o), state)


def test_moe_load_balancing_loss_is_refused() -> None:
    """TRL adds the router loss when the model returns router logits and its coefficient is not 0
    (the model config's own, 0.001 for Mixtral, when router_aux_loss_coef is not set)."""
    import transformers

    cfg = transformers.MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=2,
                                     num_experts_per_tok=1, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    moe = transformers.MixtralForCausalLM(cfg).eval()
    lm = dh.FunctionalLM.from_model(moe)
    state = AdamWState.from_optimizer(torch.optim.AdamW(moe.parameters()), moe)
    step = RecordedStep(step=1, micro_batches=[{}], options=BASE)
    with pytest.raises(dh.UnsupportedOptionError, match=r"router_aux_loss_coef=0\.001 \(from the MoE"):
        replay_directions(lm, lm.params, step, state)


def test_extra_model_inputs_are_refused() -> None:
    step = RecordedStep(step=1, micro_batches=[{"pixel_values": torch.zeros(1)}], options=BASE)
    with pytest.raises(dh.UnsupportedOptionError, match="pixel_values"):
        check_supported(BASE, step)


# ------------------------------------------------------------------------------------------ errors
@pytest.fixture
def no_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if the replay gets as far as a forward pass."""

    def boom(*args, **kwargs):
        raise AssertionError("a forward pass ran before the inputs were validated")

    monkeypatch.setattr("deltaH.updates.replay._teacher_forced", boom)


def test_bad_recordings_fail_before_any_forward(no_forward: None) -> None:
    o = replace(BASE, beta=0.1, loss_type="dapo")
    model, opt = warmed_up()
    lm = dh.FunctionalLM.from_model(model)
    state = AdamWState.from_optimizer(opt, model)
    mbs = micro_batches(model, o, 2, seed=9)

    def run(mutate, opts: TrainerOptions = o):
        bad = [dict(mb) for mb in mbs]
        mutate(bad)
        replay_directions(lm, lm.params, RecordedStep(step=1, micro_batches=bad, options=opts), state)

    with pytest.raises(dh.BatchError, match="micro-batch 1 has no 'advantages'"):
        run(lambda m: m[1].pop("advantages"))
    with pytest.raises(dh.BatchError, match="micro-batch 0 has no 'ref_per_token_logps'.*beta=0.1"):
        run(lambda m: m[0].pop("ref_per_token_logps"))
    with pytest.raises(dh.BatchError, match="micro-batch 0 has no 'importance_sampling_ratio'"):
        run(lambda m: None, replace(o, use_vllm=True, vllm_importance_sampling_correction=True))
    with pytest.raises(dh.BatchError, match="old_per_token_logps must be"):
        run(lambda m: m[0].update(old_per_token_logps=m[0]["old_per_token_logps"][:, :3]))
    with pytest.raises(dh.BatchError, match=r"advantages must be \[B\] or \[B, T\]"):
        run(lambda m: m[0].update(advantages=m[0]["advantages"][:2]))
    with pytest.raises(dh.BatchError, match="completion_mask is not right-padded"):
        run(lambda m: m[0].update(completion_mask=m[0]["completion_mask"].flip(1)))
    with pytest.raises(dh.BatchError, match="prompt_mask is not left-padded"):
        run(lambda m: m[0].update(prompt_mask=m[0]["prompt_mask"].flip(1)))
    with pytest.raises(dh.UnsupportedOptionError, match="entropy_coef"):
        run(lambda m: None, replace(o, entropy_coef=0.1))
    with pytest.raises(dh.BatchError, match="no loss token"):
        run(lambda m: [mb.update(completion_mask=torch.zeros_like(mb["completion_mask"])) for mb in m])
    o2 = replace(o, world_size=2)
    twice = [RecordedStep(step=1, micro_batches=mbs, options=o2, rank=0) for _ in range(2)]
    with pytest.raises(dh.ArgumentError, match=r"ranks are \[0, 0\]; expected 0..1"):
        replay_directions(lm, lm.params, twice, state)
    meta = {"current_gradient_accumulation_steps": 2}
    step = RecordedStep(step=1, micro_batches=mbs[:1], options=o, meta=meta)
    with pytest.raises(dh.ArgumentError, match="micro-batches were recorded"):
        replay_directions(lm, lm.params, step, state)
    other = tiny_qwen2(seed=4)  # a full-parameter model: no LoRA names in its optimizer state
    other_state = AdamWState.from_optimizer(torch.optim.AdamW(other.parameters(), lr=1e-3), other)
    with pytest.raises(ValueError, match="does not belong to this model"):
        replay_directions(lm, lm.params, RecordedStep(step=1, micro_batches=mbs, options=o), other_state)
    with pytest.raises(AssertionError, match="forward pass ran"):
        run(lambda m: None)  # the valid recording reaches the (patched) forward
