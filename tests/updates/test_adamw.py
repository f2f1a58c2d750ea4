"""AdamW reconstruction (deltaH.updates.adamw) against real ``torch.optim.AdamW.step()``.

Every check builds real optimizer state by taking a few real steps first (with per-parameter step
counts that differ), then compares one more real step with the pure reconstruction.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from deltaH import _trees
from deltaH.updates import AdamWState, adamw_decompose, adamw_step, unit_lr

# "skip" has state from earlier steps but no gradient in the step compared (its group decays);
# "never" never gets a gradient (no torch state at all). "c" misses one earlier step.
SHAPES: dict[str, tuple[int, ...]] = {"a": (3, 4), "b": (5,), "skip": (4, 2), "c": (2, 3, 2), "d": (6,),
                                      "never": (4,)}
GROUP0 = {"names": ["a", "b", "skip"], "lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.99), "eps": 1e-8}
GROUP1 = {"names": ["c", "d", "never"], "lr": 3e-3, "weight_decay": 0.05, "betas": (0.8, 0.95), "eps": 1e-6}
ORDER = GROUP0["names"] + GROUP1["names"]
STEPPED = ["a", "b", "c", "d"]  # parameters with a gradient in the step compared
IMPLS = {"plain": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
# fused=True reorders the arithmetic: ≤ a few ulp. plain/foreach are bit-exact.
FUSED_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-8), torch.float64: dict(rtol=1e-14, atol=1e-16)}
EXACT = dict(rtol=0.0, atol=0.0)


class Toy(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.randn(shape, generator=g, dtype=dtype)))


def _groups(model: nn.Module, named: bool = False) -> list[dict]:
    p = dict(model.named_parameters())
    out = []
    for g in (GROUP0, GROUP1):
        params = [(n, p[n]) if named else p[n] for n in g["names"]]
        out.append({"params": params, **{k: v for k, v in g.items() if k != "names"}})
    return out


def _rand_grads(model: nn.Module, names: list[str], seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = dict(model.named_parameters())
    return {n: scale * torch.randn(p[n].shape, generator=g, dtype=p[n].dtype) for n in names}


def _real_step(model: nn.Module, opt: torch.optim.Optimizer, grads: dict[str, torch.Tensor],
               max_norm: float | None) -> None:
    for n, p in model.named_parameters():
        p.grad = grads[n].clone() if n in grads else None
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    opt.step()


def build(impl: str = "plain", amsgrad: bool = False, maximize: bool = False,
          dtype: torch.dtype = torch.float32, named: bool = False, opt_cls: type = torch.optim.AdamW,
          **extra: bool) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A Toy model and an optimizer with three real prior steps ("c" sits out the second one)."""
    model = Toy(dtype)
    opt = opt_cls(_groups(model, named), amsgrad=amsgrad, maximize=maximize, **IMPLS[impl], **extra)
    for k in range(3):
        names = [n for n in ["a", "b", "skip", "c", "d"] if not (k == 1 and n == "c")]
        _real_step(model, opt, _rand_grads(model, names, seed=100 + k), None)
    return model, opt


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _clip_value(grads: dict[str, torch.Tensor], clip: str) -> float | None:
    if clip == "none":
        return None
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    return 0.5 * norm if clip == "active" else 1e3 * norm


# ------------------------------------------------------------------------------------------ adamw_step
@pytest.mark.parametrize("clip", ["none", "active", "inactive"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_step_matches_torch(impl: str, amsgrad: bool, maximize: bool, clip: str) -> None:
    model, opt = build(impl, amsgrad, maximize)
    state = AdamWState.from_optimizer(opt, model)
    assert state.fresh == {"never"} and state.step["never"] == 0 and state.step["c"] == 2
    assert not state.exp_avg["never"].any()
    params = _params(model)
    grads = _rand_grads(model, STEPPED, seed=7)
    max_norm = _clip_value(grads, clip)
    m_before = {n: t.clone() for n, t in state.exp_avg.items()}

    delta, new = adamw_step(params, grads, state, max_grad_norm=max_norm)
    _real_step(model, opt, grads, max_norm)

    tol = FUSED_TOL[torch.float32] if impl == "fused" else EXACT
    assert set(delta) == set(STEPPED)  # no gradient: skipped entirely (no decay on "skip")
    pmap = dict(model.named_parameters())
    for n in STEPPED:
        p = pmap[n]
        torch.testing.assert_close(delta[n], p.detach() - params[n], **tol)
        torch.testing.assert_close(params[n] + delta[n], p.detach(), **tol)
        s = opt.state[p]
        torch.testing.assert_close(new.exp_avg[n], s["exp_avg"], **tol)
        torch.testing.assert_close(new.exp_avg_sq[n], s["exp_avg_sq"], **tol)
        if amsgrad:
            torch.testing.assert_close(new.max_exp_avg_sq[n], s["max_exp_avg_sq"], **tol)
        assert new.step[n] == int(s["step"])
    assert torch.equal(pmap["skip"].detach(), params["skip"])
    assert new.step["skip"] == state.step["skip"] == int(opt.state[pmap["skip"]]["step"])
    assert new.fresh == {"never"} and pmap["never"] not in opt.state
    for n, t in m_before.items():  # the input state is untouched
        assert torch.equal(state.exp_avg[n], t)


@pytest.mark.parametrize("impl", ["plain", "fused"])
def test_step_float64_and_first_step(impl: str) -> None:
    """float64 parameters, and a first real step from fresh state ("never" gets its first gradient)."""
    model, opt = build(impl, dtype=torch.float64)
    state = AdamWState.from_optimizer(opt, model)
    params = _params(model)
    grads = _rand_grads(model, ["a", "never"], seed=3)
    delta, new = adamw_step(params, {**grads, "b": None}, state, max_grad_norm=0.1)
    _real_step(model, opt, grads, 0.1)
    tol = FUSED_TOL[torch.float64] if impl == "fused" else EXACT
    pmap = dict(model.named_parameters())
    for n in ("a", "never"):
        assert delta[n].dtype == torch.float64
        torch.testing.assert_close(delta[n], pmap[n].detach() - params[n], **tol)
    assert new.step["never"] == 1 and new.fresh == frozenset()


def test_adam_variants() -> None:
    """Adam(decoupled_weight_decay=True) is AdamW; Adam with weight_decay=0 is equivalent; L2 Adam is not."""
    for extra in ({"decoupled_weight_decay": True}, {}):
        model, opt = build(opt_cls=torch.optim.Adam, **extra)
        if not extra:
            for g in opt.param_groups:
                g["weight_decay"] = 0.0
        state = AdamWState.from_optimizer(opt, model)
        params, grads = _params(model), _rand_grads(model, STEPPED, seed=5)
        delta, _ = adamw_step(params, grads, state)
        _real_step(model, opt, grads, None)
        for n, p in model.named_parameters():
            if n in delta:
                torch.testing.assert_close(delta[n], p.detach() - params[n], **EXACT)
    model, opt = build(opt_cls=torch.optim.Adam)  # weight_decay > 0, not decoupled: L2
    with pytest.raises(ValueError, match="L2 penalty"):
        AdamWState.from_optimizer(opt, model)
    with pytest.raises(ValueError, match="L2 penalty"):
        AdamWState.from_state_dict(opt.state_dict(), ORDER, shapes=SHAPES)


def test_refuses_other_optimizers_and_foreign_params() -> None:
    model = Toy()
    with pytest.raises(TypeError, match="SGD"):
        AdamWState.from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model)
    other = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="not a parameter of the model"):
        AdamWState.from_optimizer(torch.optim.AdamW([*model.parameters(), other]), model)
    with pytest.raises(ValueError, match="'never'.*no param group"):
        AdamWState.from_optimizer(torch.optim.AdamW([p for n, p in model.named_parameters() if n != "never"]),
                                  model)
    model.never.requires_grad_(False)  # frozen parameters are not part of the state
    state = AdamWState.from_optimizer(torch.optim.AdamW(model.parameters()), model)
    assert "never" not in state.names
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    sgd.step()
    with pytest.raises(ValueError, match="not a torch Adam/AdamW"):
        AdamWState.from_state_dict(sgd.state_dict(), list(SHAPES))


def test_accelerated_optimizer() -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    model, opt = build()
    try:
        wrapped = accelerate.Accelerator(cpu=True).prepare(opt)
        assert type(wrapped).__name__ == "AcceleratedOptimizer"
        state = AdamWState.from_optimizer(wrapped, model)
        params, grads = _params(model), _rand_grads(model, STEPPED, seed=9)
        delta, _ = adamw_step(params, grads, state, max_grad_norm=0.3)
        _real_step(model, wrapped, grads, 0.3)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for n, p in model.named_parameters():
        if n in delta:
            torch.testing.assert_close(delta[n], p.detach() - params[n], **EXACT)


def test_adamw_step_input_errors() -> None:
    model, opt = build()
    state, params = AdamWState.from_optimizer(opt, model), _params(model)
    with pytest.raises(ValueError, match="max_grad_norm=0"):
        adamw_step(params, {"a": torch.zeros(3, 4)}, state, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="'zz'"):
        adamw_step({**params, "zz": torch.zeros(2)}, {"zz": torch.zeros(2)}, state)
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(4, 3\)"):
        adamw_step(params, {"a": torch.zeros(4, 3)}, state)


# ------------------------------------------------------------------------------------- from_state_dict
def _assert_same_state(x: AdamWState, y: AdamWState) -> None:
    assert x.names == y.names and x.fresh == y.fresh and dict(x.step) == dict(y.step)
    assert dict(x.hyper) == dict(y.hyper)
    for f in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        a, b = getattr(x, f), getattr(y, f)
        assert set(a) == set(b)
        for n in a:
            torch.testing.assert_close(a[n], b[n], **EXACT)


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_state_dict_round_trip(named: bool, amsgrad: bool) -> None:
    model, opt = build(amsgrad=amsgrad, named=named)
    live = AdamWState.from_optimizer(opt, model)
    sd = opt.state_dict()
    assert ("param_names" in sd["param_groups"][0]) == named
    _assert_same_state(live, AdamWState.from_state_dict(sd, ORDER, shapes=SHAPES))
    _assert_same_state(live, AdamWState.from_state_dict(sd, {n: SHAPES[n] for n in ORDER}))
    if named:
        _assert_same_state(live, AdamWState.from_state_dict(sd, shapes={"never": (4,)}))
        with pytest.raises(ValueError, match="disagree with the param_names.*id 0"):
            AdamWState.from_state_dict(sd, ORDER[::-1], shapes=SHAPES)
    else:
        with pytest.raises(ValueError, match="no 'param_names'"):
            AdamWState.from_state_dict(sd)
    with pytest.raises(ValueError, match="'never'.*Pass shapes"):  # no state, unknown shape
        AdamWState.from_state_dict(sd, ORDER)
    # the mapped file gives the same next step as the live optimizer
    params, grads = _params(model), _rand_grads(model, STEPPED, seed=11)
    d1, _ = adamw_step(params, grads, live, 1.0)
    d2, _ = adamw_step(params, grads, AdamWState.from_state_dict(sd, ORDER, shapes=SHAPES), 1.0)
    for n in d1:
        assert torch.equal(d1[n], d2[n])


def test_state_dict_mismatches_are_errors() -> None:
    model, opt = build()
    sd = opt.state_dict()
    bad = {**{n: SHAPES[n] for n in ORDER}, "b": (6,)}
    with pytest.raises(ValueError, match=r"'b' expects shape \(6,\).*cannot be mapped"):
        AdamWState.from_state_dict(sd, bad)
    # wrong order, detectable because the shapes differ: the first misfit is named
    with pytest.raises(ValueError, match=r"'never' expects shape \(4,\).*cannot be mapped"):
        AdamWState.from_state_dict(sd, ORDER[::-1], shapes=SHAPES)
    with pytest.raises(ValueError, match="hold 6 parameters but 5 names"):
        AdamWState.from_state_dict(sd, ORDER[:-1], shapes=SHAPES)
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        AdamWState.from_state_dict({"state": {}}, ORDER)
    # without shapes a swapped order maps, but the step refuses the misfit against θ
    sd2 = {"state": {k: v for k, v in sd["state"].items() if k in (0, 1)},
           "param_groups": [{**sd["param_groups"][0], "params": [0, 1]}]}
    swapped = AdamWState.from_state_dict(sd2, ["b", "a"])
    with pytest.raises(ValueError, match="state of 'a' has shape \\(5,\\).*other parameters"):
        adamw_step(_params(model), _rand_grads(model, ["a"], seed=0), swapped)


# ------------------------------------------------------------------------------------- decomposition
@functools.cache
def _prepared(amsgrad: bool, maximize: bool, dtype: torch.dtype) -> tuple[dict, AdamWState]:
    model, opt = build(amsgrad=amsgrad, maximize=maximize, dtype=dtype)
    return _params(model), AdamWState.from_optimizer(opt, model)


def _per_seq(params: dict, m: int, seed: int, scale: float = 1.0, names: list[str] = STEPPED) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn((m, *params[n].shape), generator=g, dtype=params[n].dtype) for n in names}


def _check_exact(dec, params, gi, state, max_norm, tol) -> None:  # noqa: ANN001
    full, _ = adamw_step(params, {n: g.sum(0) for n, g in gi.items()}, state, max_norm)
    recon = _trees.add(dec.baseline, {n: c.sum(0) for n, c in dec.components.items()})
    for n in gi:
        assert torch.equal(dec.full[n], full[n])
        assert dec.components[n].shape == gi[n].shape
        torch.testing.assert_close(recon[n], dec.full[n], **tol)


@pytest.mark.parametrize("clip", ["none", "active"])
@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_decompose_against_torch(amsgrad: bool, maximize: bool, clip: str) -> None:
    model, opt = build(amsgrad=amsgrad, maximize=maximize, dtype=torch.float64)
    state, params = AdamWState.from_optimizer(opt, model), _params(model)
    gi = _per_seq(params, m=5, seed=1)
    g = {n: v.sum(0) for n, v in gi.items()}
    max_norm = _clip_value(g, clip)
    dec = adamw_decompose(params, gi, state, max_grad_norm=max_norm)
    _check_exact(dec, params, gi, state, max_norm, dict(rtol=1e-12, atol=1e-15))
    norm = math.sqrt(sum(float((v**2).sum()) for v in g.values()))
    assert dec.grad_norm == pytest.approx(norm, rel=1e-12)
    assert dec.clip_coef == (1.0 if max_norm is None else pytest.approx(max_norm / (norm + 1e-6), rel=1e-12))
    _real_step(model, opt, g, max_norm)
    pmap = dict(model.named_parameters())
    for n in STEPPED:
        torch.testing.assert_close(dec.full[n], pmap[n].detach() - params[n], **EXACT)
        # D of DESIGN §1.6, written out: (1 − β1^t)(sqrt(v̂'/(1 − β2^t)) + ε)
        h, t = state.hyper[n], state.step[n] + 1
        v_hat = opt.state[pmap[n]]["max_exp_avg_sq" if amsgrad else "exp_avg_sq"]
        d = (1 - h.betas[0] ** t) * ((v_hat / (1 - h.betas[1] ** t)).sqrt() + h.eps)
        torch.testing.assert_close(dec.denom[n], d, rtol=1e-13, atol=0.0)
        sign = -1.0 if maximize else 1.0
        c0 = -h.lr * (1 - h.betas[0]) * dec.clip_coef * sign * gi[n][0] / d
        torch.testing.assert_close(dec.components[n][0], c0, rtol=1e-12, atol=1e-18)
        b = -h.lr * h.weight_decay * params[n] - h.lr * h.betas[0] * state.exp_avg[n] / d
        torch.testing.assert_close(dec.baseline[n], b, rtol=1e-12, atol=1e-18)
    assert set(dec.full) == set(dec.baseline) == set(dec.components) == set(STEPPED)


def test_decompose_float32_tolerance() -> None:
    """In float32, ``full`` is the real θ' − θ, so b + Σ c matches it to ~ulp(θ)."""
    params, state = _prepared(False, False, torch.float32)
    gi = _per_seq(params, m=8, seed=2)
    dec = adamw_decompose(params, gi, state, max_grad_norm=1.0)
    ulp = {n: 4 * torch.finfo(torch.float32).eps * float(params[n].abs().max()) for n in gi}
    recon = _trees.add(dec.baseline, {n: c.sum(0) for n, c in dec.components.items()})
    for n in gi:
        torch.testing.assert_close(recon[n], dec.full[n], rtol=1e-5, atol=ulp[n])


def test_per_sequence_grads_sum_to_backward_grad() -> None:
    """Σ_i g_i equals the backward gradient of L = Σ_i ℓ_i; the decomposition then matches a real step."""
    model, opt = build(dtype=torch.float64)
    x = torch.randn(7, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def losses(p: dict[str, torch.Tensor], xb: torch.Tensor) -> torch.Tensor:  # [M]
        h = torch.tanh(xb @ p["a"].reshape(12))  # [M]
        return h * p["b"].sum() + (xb[:, :6] @ p["d"]) ** 2 + p["c"].sum() * xb[:, 0]

    params = {n: params_n for n, params_n in _params(model).items() if n in STEPPED}
    grad_one = torch.func.grad(lambda p, xb: losses(p, xb[None]).sum())
    per_seq = torch.func.vmap(grad_one, in_dims=(None, 0))(params, x)  # [M, *s] per name
    pmap = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    losses({n: pmap[n] for n in STEPPED}, x).sum().backward()
    for n in STEPPED:
        torch.testing.assert_close(per_seq[n].sum(0), pmap[n].grad, rtol=1e-12, atol=1e-12)
    state = AdamWState.from_optimizer(opt, model)
    theta = _params(model)
    dec = adamw_decompose(theta, per_seq, state, max_grad_norm=0.5)
    assert dec.clip_coef < 1.0
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    for n in STEPPED:
        torch.testing.assert_close(dec.full[n], pmap[n].detach() - theta[n], rtol=1e-10, atol=1e-15)


@given(m=st.integers(1, 6), seed=st.integers(0, 10_000), scale=st.floats(1e-3, 1e2),
       amsgrad=st.booleans(), maximize=st.booleans(), clip=st.sampled_from([None, 0.05, 1e3]))
def test_decomposition_exact_property(m: int, seed: int, scale: float, amsgrad: bool, maximize: bool,
                                      clip: float | None) -> None:
    params, state = _prepared(amsgrad, maximize, torch.float64)
    gi = _per_seq(params, m, seed, scale)
    dec = adamw_decompose(params, gi, state, max_grad_norm=clip)
    _check_exact(dec, params, gi, state, clip, dict(rtol=1e-11, atol=1e-15))
    assert 0.0 < dec.clip_coef <= 1.0


@given(m=st.integers(2, 6), seed=st.integers(0, 10_000), a=st.floats(-2.0, 2.0),
       clip=st.sampled_from([None, 0.05]))
def test_components_linear_in_g_i(m: int, seed: int, a: float, clip: float | None) -> None:
    """Splitting g_0 into a·g_0 and (1−a)·g_0 (same Σ, so same D and clip) splits c_0 the same way;
    permuting the sequences permutes the components."""
    params, state = _prepared(True, False, torch.float64)
    gi = _per_seq(params, m, seed)
    split = {n: torch.cat([a * g[:1], (1 - a) * g[:1], g[1:]]) for n, g in gi.items()}
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    dec = adamw_decompose(params, gi, state, clip)
    dec_s = adamw_decompose(params, split, state, clip)
    dec_p = adamw_decompose(params, _trees.index(gi, perm), state, clip)
    tol = dict(rtol=1e-9, atol=1e-16)
    for n, c in dec.components.items():
        torch.testing.assert_close(dec_s.components[n][0], a * c[0], **tol)
        torch.testing.assert_close(dec_s.components[n][1], (1 - a) * c[0], **tol)
        torch.testing.assert_close(dec_s.components[n][2:], c[1:], **tol)
        torch.testing.assert_close(dec_p.components[n], c[perm], **tol)
        torch.testing.assert_close(dec_s.denom[n], dec.denom[n], **tol)


def test_unit_lr() -> None:
    params, state = _prepared(False, False, torch.float64)
    gi = _per_seq(params, m=3, seed=4)
    dec = adamw_decompose(params, gi, state)
    u, b_hat, c_hat = unit_lr(dec.full, state), unit_lr(dec.baseline, state), unit_lr(dec.components, state)
    for n in gi:
        lr = (GROUP0 if n in GROUP0["names"] else GROUP1)["lr"]
        torch.testing.assert_close(u[n], dec.full[n] / lr, rtol=1e-15, atol=0.0)
        torch.testing.assert_close(b_hat[n] + c_hat[n].sum(0), u[n], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="'zz'"):
        unit_lr({"zz": torch.zeros(1)}, state)
