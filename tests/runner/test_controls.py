"""Controls (deltaH.controls, deltaH.runner.controls): the entropy-bonus coefficient c* puts δH₁ of the
step at the target, its standard error is the jackknife over E, and ΔH measured at c* misses the target
only at second order; for a replayed KL step the same holds for β.

The toy runs in float64 with HF's float32 islands replaced (conftest ``_float64_end_to_end``), so the
first-order identity holds to float64 round-off. References built here, independent of the stage: the
bonus gradient by plain HF autograd (``model(...).logits``, per-token entropy, ``backward``), δH₁ by
reverse mode (the stage uses forward mode), and leave-one-out slopes by re-running δH₁ on E without
each sequence (the stage derives them from per-sequence sums).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from _refs import trainable
from conftest import _float64_end_to_end

import deltaH as dh
from deltaH.config import load_config
from deltaH.controls import control_coefficient, jackknife_se
from deltaH.runner import stages as st
from deltaH.runner.controls import MEASURED, controls
from deltaH.runner.orchestrate import load_inputs, resolve_checkpoints

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = ["eval_batch.total_sequences=16", "eval_batch.group_size=4", "update_batch.n_prompts=4",
         "update_batch.group_size=4", "policy.max_new_tokens=6", "eta.grid=[1e-5, 1e-4]",
         "checkpoint.dtype=float64", "analyses.controls=true", "eval_batch.include_update_prompts=true"]
# float64 end to end: forward and reverse δH₁ of one direction agree to ~1e-15 relative of the slopes
# they add up (observed ≤ 3e-12 over seeds 0-3, where the two parts cancel); bound 1e-9.
ID_TOL = 1e-9


def _stages(sets: list[str], ckpt: str | None = None) -> dict[str, Any]:
    cfg = load_config("configs/toy.yaml", [*SHORT, *sets])
    path = ckpt or resolve_checkpoints(cfg.checkpoint.path)[0]
    inp = load_inputs(cfg, path, quiet=True)
    _float64_end_to_end(inp.ckpt.model)
    bt = st.build_batches(cfg, inp)
    dr = st.directions(cfg, inp, bt)
    base = st.theta_stats(cfg, inp, bt)
    fo = st.first_order(cfg, inp, bt, dr, base)
    return {"cfg": cfg, "inp": inp, "bt": bt, "dr": dr, "base": base, "fo": fo,
            "ctl": controls(cfg, inp, bt, dr, base, fo)}


def _hf_bonus_direction(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ĉ_H = clip·P·∇H_U with ∇H_U by plain autograd of the HF model: H_U = mean per-token entropy of
    softmax(logits/τ) over U's response tokens (one micro-batch, as loss.grad_accum_steps = 1)."""
    inp, bt, dr = s["inp"], s["bt"], s["dr"]
    model, up, tau = inp.ckpt.model, bt.update.batch, s["cfg"].policy.temperature
    named = trainable(model)
    model.zero_grad(set_to_none=True)
    total = up.n_tokens.sum()
    for i in range(len(up)):
        am = up.attention_mask[i]
        ids, resp = up.input_ids[i][am], up.response_mask[i][am]
        lsm = torch.log_softmax(model(input_ids=ids[None]).logits[0].double() / tau, -1)
        ent = -(lsm.exp() * lsm).sum(-1)[:-1][resp[1:]]
        (ent.sum() / total).backward()
    ud = dr.update
    return {n: (ud.clip_coef * ud.precond[n] * named[n].grad).detach() for n in ud.full}


def _delta_h1_reverse(s: dict[str, Any], v: dict[str, torch.Tensor], eta: float, batch: dh.SequenceBatch
                      ) -> float:
    inp = s["inp"]
    fo = dh.delta_h_first_order(inp.params, {n: t[None] for n, t in v.items()}, batch, lm=inp.lm,
                                policy=inp.policy, eta=eta, mode="reverse")
    return float(fo.delta_h[0])


@pytest.fixture(scope="module")
def toy(one_thread: None) -> dict[str, Any]:
    return _stages(["eta.reference=1.25e-4"])  # lr / 10: inside the toy's trusted range


def test_control_algebra() -> None:
    loo_b = torch.tensor([1.0, 1.2, 0.9, 1.1], dtype=torch.float64)
    loo_d = torch.tensor([-2.0, -2.1, -1.9, -2.2], dtype=torch.float64)
    c = control_coefficient(1.05, -2.05, loo_b, loo_d, eta=0.01, target=0.003)
    assert 0.01 * (1.05 + c.coef * -2.05) == pytest.approx(0.003, rel=1e-14)
    want = (0.3 - loo_b) / loo_d
    assert torch.allclose(c.loo, want, rtol=1e-15, atol=0)
    assert c.se == pytest.approx(math.sqrt(3 / 4 * float(((want - want.mean()) ** 2).sum())), rel=1e-14)
    assert jackknife_se(loo_b) == pytest.approx(math.sqrt(3 / 4 * float(((loo_b - 1.05) ** 2).sum())))
    assert math.isnan(control_coefficient(1.0, 0.0, loo_b, loo_d, eta=0.01, target=0.0).coef)


def test_entropy_coef_puts_delta_h1_at_the_target(toy: dict[str, Any]) -> None:
    ctl = toy["ctl"]
    (o,) = ctl.outcomes
    assert o.name == "entropy_coef" and o.current == 0.0 and math.isfinite(o.control.coef)
    ud, eta = toy["dr"].update, ctl.eta
    scale = eta * (abs(o.control.slope_base) + abs(o.control.coef * o.control.slope_dir))
    assert abs(float(o.delta_h1[MEASURED.index("controlled")]) - ctl.target) <= ID_TOL * scale
    # Independently: ĉ_H by HF autograd, δH₁ by reverse mode along u + c*·ĉ_H.
    d_h = _hf_bonus_direction(toy)
    v = {n: ud.full[n] + o.control.coef * d_h[n] for n in ud.full}
    assert abs(_delta_h1_reverse(toy, v, eta, toy["bt"].eval.batch) - ctl.target) <= ID_TOL * scale
    # Each unit of c moves δH₁ by η·s_d: the slope of the HF-autograd ĉ_H is the stage's s_d.
    s_d = _delta_h1_reverse(toy, d_h, 1.0, toy["bt"].eval.batch)
    assert s_d == pytest.approx(o.control.slope_dir, rel=1e-9)
    assert ctl.entropy_u > 0


def test_the_standard_error_is_the_jackknife_over_e(toy: dict[str, Any]) -> None:
    """c* recomputed on E without each sequence (fresh δH₁ runs): its jackknife SE is the stage's."""
    ev, ud = toy["bt"].eval.batch, toy["dr"].update
    d_h = _hf_bonus_direction(toy)
    (o,) = toy["ctl"].outcomes
    n = len(ev)
    loo = []
    for k in range(n):
        rest = ev.select([i for i in range(n) if i != k])
        s0 = _delta_h1_reverse(toy, ud.full, 1.0, rest)
        sd = _delta_h1_reverse(toy, d_h, 1.0, rest)
        loo.append((toy["ctl"].target / toy["ctl"].eta - s0) / sd)
    assert o.control.se == pytest.approx(jackknife_se(torch.tensor(loo, dtype=torch.float64)), rel=1e-8)
    assert torch.allclose(o.control.loo, torch.tensor(loo, dtype=torch.float64), rtol=1e-8, atol=0)


def test_delta_h_at_c_star_misses_the_target_at_second_order(toy: dict[str, Any]) -> None:
    """Along v = u + c*·ĉ_H, δH₁(η) = target·η/η_ref, so the miss m(η) = ΔH − target·η/η_ref is the
    second-order term ½η²f'' plus O(η³): m/(½η²f'') − 1 shrinks like η (bound: halved when η is
    quartered; a first-order error left in c* would make the ratio grow 4× instead). At η_ref, inside
    the trusted range, the miss is below max_dev = 0.25 (the trust rule's tolerance) of the step's own
    ΔH − target."""
    inp, ev, ud, ctl = toy["inp"], toy["bt"].eval.batch, toy["dr"].update, toy["ctl"]
    (o,) = ctl.outcomes
    d_h = _hf_bonus_direction(toy)
    v = {n: (ud.full[n] + o.control.coef * d_h[n])[None] for n in ud.full}
    kw: dict[str, Any] = {"lm": inp.lm, "policy": inp.policy}
    j = MEASURED.index("controlled")
    err = []
    for eta in (ctl.eta, ctl.eta / 4):
        dh_true = float(dh.delta_h_true_multi(inp.params, v, ev, eta=eta, **kw).delta_h[0])
        fo2 = dh.delta_h_first_order(inp.params, v, ev, eta=eta, second_order=True, **kw)
        assert fo2.second_order is not None
        so = float(fo2.second_order[0])
        if eta == ctl.eta:  # the stage measured the same direction
            assert dh_true == pytest.approx(float(o.delta_h[j]), rel=1e-9)
            assert so == pytest.approx(float(o.second_order[j]), rel=1e-9)
        err.append(abs((dh_true - ctl.target * eta / ctl.eta) / so - 1))
    assert err[1] <= 0.5 * err[0] + 1e-6
    miss = abs(float(o.delta_h[j]) - ctl.target)
    assert miss < 0.25 * abs(float(o.delta_h[MEASURED.index("step")]) - ctl.target)


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    pytest.importorskip("trl")
    from _trl_runs import grpo_run

    return grpo_run(tmp_path_factory.mktemp("kl") / "out", steps=2, beta=0.04, gradient_accumulation_steps=2,
                    per_device_train_batch_size=4)


def test_target_at_the_steps_own_delta_h1_recovers_the_current_coefficients(kl_run: Path) -> None:
    """A replayed TRL step with β = 0.04 (two micro-batches): both controls exist, and aiming at the
    step's own δH₁ gives entropy_coef* = 0 and β* = β, where 'controlled' and 'trainer' are the step
    itself. Any target: β* makes δH₁ equal it (float64 identity)."""
    first = _stages(["update_batch.source=recorded"], ckpt=str(kl_run / "checkpoint-1"))
    s1 = float(first["fo"].slope[0]) * first["dr"].eta_ref
    s = _stages(["update_batch.source=recorded", f"analyses.entropy_target={s1!r}"],
                ckpt=str(kl_run / "checkpoint-1"))
    bonus, beta = s["ctl"].outcomes
    assert (bonus.name, beta.name) == ("entropy_coef", "beta") and beta.current == pytest.approx(0.04)
    scale = abs(s1)
    assert abs(bonus.control.coef * bonus.control.slope_dir * s["ctl"].eta) <= ID_TOL * scale
    assert beta.control.coef == pytest.approx(0.04, rel=1e-9)
    step, ctl_, trainer = (MEASURED.index(k) for k in ("step", "controlled", "trainer"))
    for o in (bonus, beta):
        assert float(o.delta_h[ctl_]) == pytest.approx(float(o.delta_h[step]), rel=1e-9)
        assert float(o.delta_h[trainer]) == pytest.approx(float(o.delta_h[step]), rel=1e-6)  # float32 record
    for o in first["ctl"].outcomes:
        target, j = first["ctl"].target, MEASURED.index("controlled")
        size = first["ctl"].eta * (abs(o.control.slope_base) + abs(o.control.coef * o.control.slope_dir))
        assert abs(float(o.delta_h1[j]) - target) <= ID_TOL * size
