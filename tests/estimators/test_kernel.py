"""Cross Fisher kernel, influence matrices and the covariance proxy against plain references."""

from __future__ import annotations

import pytest
import torch
from _refs import hf_keep
from conftest import tiny_qwen2, with_lora

import deltaH as dh
from deltaH.estimators._sketch import fidelity, sketch_kernel
from deltaH.estimators.influence import covariance_proxy, influence_matrix
from deltaH.estimators.kernel import fisher_kernel, kernel_summary, projected_kernel
from deltaH.updates.grads import logprob_sums

TAU = 0.8


def _batch(n: int, seed: int, vocab: int = 32) -> dh.SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, 9), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    am[0, :2] = False  # one left-padded row
    rm = am.clone()
    rm[:, :5] = False
    return dh.SequenceBatch(ids, am, rm)


def _row_grad(
    model: torch.nn.Module, names: list[str], ids: torch.Tensor, resp: torch.Tensor, top_p: float | None
) -> torch.Tensor:
    """∇ of Σ_t log q(y_t) for one unpadded row by plain autograd (nucleus from HF's warpers)."""
    named = dict(model.named_parameters())
    model.zero_grad()
    logits = model(input_ids=ids.unsqueeze(0)).logits[0].double() / TAU
    if top_p is not None:
        logits = logits.masked_fill(~hf_keep(logits.detach() * TAU, TAU, top_p), float("-inf"))
    lp = torch.log_softmax(logits, -1)[:-1].gather(-1, ids[1:].unsqueeze(-1)).squeeze(-1)
    lp[resp[1:]].sum().backward()
    return torch.cat([named[n].grad.reshape(-1).double() for n in names])


@pytest.fixture(scope="module")
def setup() -> dict[str, object]:
    model = with_lora(tiny_qwen2())
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(TAU, 0.9)
    # E must be sampled from q (top-p): random tokens would fall outside the nucleus.
    ev = dh.sample(lm, lm.params, [[3, 4, 5], [7, 8]], policy=pol, max_new_tokens=4, n_per_prompt=3,
                   eos_token_id=1, pad_token_id=0, generator=torch.Generator().manual_seed(11))
    up = _batch(6, 2)
    g = torch.Generator().manual_seed(3)
    precond = {n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in lm.params.items()}
    names = list(lm.params)

    def dense(batch: dh.SequenceBatch, top_p: float | None) -> torch.Tensor:
        rows = []
        for i in range(len(batch)):
            am = batch.attention_mask[i]
            rows.append(_row_grad(model, names, batch.input_ids[i][am], batch.response_mask[i][am], top_p))
        return torch.stack(rows)

    p_flat = torch.cat([precond[n].reshape(-1).double() for n in names])
    dense_e, dense_u = dense(ev, 0.9), dense(up, None)
    ref = (dense_e * p_flat) @ dense_u.T
    return {"model": model, "lm": lm, "ev": ev, "up": up, "precond": precond, "pol": pol, "ref": ref,
            "dense_e": dense_e, "dense_u": dense_u}


def test_exact_kernel_matches_dense_reference_for_any_block_size(setup: dict) -> None:
    lm, ev, up, pc, pol, ref = (setup[k] for k in ("lm", "ev", "up", "precond", "pol", "ref"))
    scale = ref.abs().max()
    for block in (1, 300, 10**9):
        k = fisher_kernel(lm, lm.params, ev, up, pc, policy=pol, method="exact", block_size=block)
        torch.testing.assert_close(k, ref, rtol=1e-6, atol=1e-9 * float(scale))


def test_preconditioner_applied_once(setup: dict) -> None:
    lm, ev, up, pc, pol, ref = (setup[k] for k in ("lm", "ev", "up", "precond", "pol", "ref"))
    doubled = {n: 2 * p for n, p in pc.items()}
    k2 = fisher_kernel(lm, lm.params, ev, up, doubled, policy=pol)
    torch.testing.assert_close(
        k2, 2 * ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max())
    )  # linear in P, not P²


def test_projection_is_unbiased_and_error_shrinks(setup: dict) -> None:
    lm, ev, up, pc, pol, ref = (setup[k] for k in ("lm", "ev", "up", "precond", "pol", "ref"))
    errs = []
    for k in (16, 256, 4096):  # the CountSketch alone (subspace 0): a subspace of 6 dims would span U
        est = torch.stack(
            [
                fisher_kernel(lm, lm.params, ev, up, pc, policy=pol, method="projection", proj_dim=k, seed=s,
                              subspace=0)
                for s in range(3)
            ]
        )
        errs.append(float((est - ref).norm(dim=(1, 2)).mean() / ref.norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.35 * errs[0]  # ~1/√k: 16× more buckets → ~4× smaller error (16 → 4096: 16×)
    same = fisher_kernel(lm, lm.params, ev, up, pc, policy=pol, method="projection", proj_dim=64, seed=7)
    again = fisher_kernel(lm, lm.params, ev, up, pc, policy=pol, method="projection", proj_dim=64, seed=7)
    assert torch.equal(same, again)  # seeded


def test_projected_kernel_is_the_sketch_of_the_dense_gradients(setup: dict) -> None:
    """projected_kernel streams per-sequence gradients through the same steps as sketch_kernel on
    the dense autograd reference rows x = P^{1/2}·∇ (float64 model: only round-off of the two
    gradient paths, ≤ 2e-14 relative observed, separates them; bound 1e-9); its check columns are
    the exact columns of the reference, and a subspace as large as U makes it exact."""
    lm, ev, up, pc, pol, ref = (setup[k] for k in ("lm", "ev", "up", "precond", "pol", "ref"))
    names = list(lm.params)
    root = torch.cat([pc[n].reshape(-1).double() for n in names]).sqrt()
    dense_e, dense_u = setup["dense_e"], setup["dense_u"]
    sizes = [lm.params[n].numel() for n in names]
    tol = 1e-9 * float(ref.abs().max())
    for sub, k in ((0, 64), (3, 32)):
        pk = projected_kernel(lm, lm.params, ev, up, pc, policy=pol, proj_dim=k, subspace=sub, seed=5,
                              seq_chunk=4, check_columns=2)
        want = sketch_kernel(dense_e * root, dense_u * root, sizes, proj_dim=k, subspace=sub, seed=5)
        torch.testing.assert_close(pk.kernel, want, rtol=0, atol=tol)
        assert pk.check_columns is not None and pk.check_exact is not None and pk.fidelity is not None
        cols = pk.check_columns
        assert len(set(cols.tolist())) == 2 and pk.subspace == sub and pk.proj_dim == k
        torch.testing.assert_close(pk.check_exact, ref[:, cols], rtol=0, atol=tol)
        assert pk.fidelity == fidelity(pk.kernel[:, cols], pk.check_exact)
        p = sum(sizes)
        assert pk.exact_floats == (len(ev) + len(up)) * p
        assert pk.stored_floats == sub * p + (len(ev) + len(up)) * (sub + k)
    exact = projected_kernel(lm, lm.params, ev, up, pc, policy=pol, proj_dim=4, subspace=len(up), seed=0)
    torch.testing.assert_close(exact.kernel, ref, rtol=0, atol=tol)
    assert exact.fidelity is None and exact.check_columns is None
    with pytest.raises(ValueError, match="subspace must be an int >= 0"):
        projected_kernel(lm, lm.params, ev, up, pc, policy=pol, subspace=-1)


def test_kernel_relates_to_the_adamw_components() -> None:
    """∂ logq(t) along ĉ_i = −clip·coef_i·K[t, i], with P = (1−β1)/D of the real optimizer state."""
    model = with_lora(tiny_qwen2())
    lm = dh.FunctionalLM.from_model(model)
    up, ev = _batch(8, 4), _batch(5, 5)
    adv = dh.advantages(torch.tensor([[1.0, 0, 0, 1], [0, 1, 1, 1]])).flatten()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt.zero_grad()
    (0.01 * logprob_sums(lm, dict(model.named_parameters()), up).sum()).backward()
    opt.step()
    lm = dh.FunctionalLM.from_model(model)
    ud = dh.update_directions(
        lm, lm.params, up, adv, dh.AdamWState.from_optimizer(opt, model), temperature=TAU, max_grad_norm=0.5
    )
    pol = dh.SamplingPolicy(TAU, 1.0)
    kern = fisher_kernel(lm, lm.params, ev, up, ud.precond, policy=pol)
    names = list(lm.params)
    a = torch.stack(
        [
            _row_grad(
                model,
                names,
                ev.input_ids[i][ev.attention_mask[i]],
                ev.response_mask[i][ev.attention_mask[i]],
                None,
            )
            for i in range(len(ev))
        ]
    )
    comps = torch.cat([ud.components[n].reshape(8, -1).double() for n in names], dim=1)
    # float64 end to end (conftest): only round-off separates the two sides, observed ≤ 1e-14
    # relative on AVX-512, AVX2 and default kernels; a wrong P, clip or coef is O(1).
    torch.testing.assert_close(
        a @ comps.T,
        -ud.clip_coef * ud.coef[None, :] * kern,
        rtol=1e-9,
        atol=1e-9 * float((a @ comps.T).abs().max()),
    )


def test_kernel_summary_splits_prompts() -> None:
    k = torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    s = kernel_summary(k, [0, 1], [0, 0, 1])
    assert s.n_same == 3 and s.n_diff == 3
    assert s.mean_same == pytest.approx((1 - 2 - 6) / 3) and s.mean_diff == pytest.approx((3 + 4 + 5) / 3)
    assert s.abs_same == pytest.approx((1 + 2 + 6) / 3)
    assert s.median_abs_same == 2.0 and s.median_abs_diff == 4.0
    with pytest.raises(ValueError, match="do not match"):
        kernel_summary(k, [0], [0, 0, 1])


def test_influence_columns_are_delta_h_along_components(setup: dict) -> None:
    lm, ev, pol = setup["lm"], setup["ev"], setup["pol"]
    g = torch.Generator().manual_seed(9)
    comps = {n: 0.05 * torch.randn(4, *p.shape, generator=g, dtype=p.dtype) for n, p in lm.params.items()}
    inf = influence_matrix(lm.params, comps, ev, lm=lm, policy=pol, eta=1e-3)
    assert inf.matrix.shape == (len(ev), 4)
    res = dh.delta_h_true_multi(lm.params, comps, ev, lm=lm, policy=pol, eta=1e-3)
    torch.testing.assert_close(inf.matrix.sum(0), res.delta_h, rtol=1e-12, atol=1e-15)
    fo = influence_matrix(lm.params, comps, ev, lm=lm, policy=pol, eta=1e-3, kind="first_order")
    ref = dh.delta_h_first_order(lm.params, comps, ev, lm=lm, policy=pol, eta=1e-3)
    torch.testing.assert_close(fo.matrix, ref.per_sequence.T, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="kind"):
        influence_matrix(lm.params, comps, ev, lm=lm, policy=pol, eta=1e-3, kind="exact")


def test_covariance_proxy_matches_plain_token_covariance(setup: dict) -> None:
    model, lm, up = setup["model"], setup["lm"], setup["up"]
    adv = torch.linspace(-1, 1, len(up), dtype=torch.float64)
    px = covariance_proxy(lm, lm.params, up, adv, temperature=TAU, eta=1e-3)
    lps, advs = [], []
    with torch.no_grad():
        for i in range(len(up)):
            am = up.attention_mask[i]
            ids, resp = up.input_ids[i][am], up.response_mask[i][am]
            lp = torch.log_softmax(model(input_ids=ids[None]).logits[0].double() / TAU, -1)
            tok = lp[:-1].gather(-1, ids[1:, None]).squeeze(-1)[resp[1:]]
            lps.append(tok)
            advs.append(torch.full_like(tok, float(adv[i])))
    lp_all, a_all = torch.cat(lps), torch.cat(advs)
    cov = float(((lp_all - lp_all.mean()) * (a_all - a_all.mean())).mean())
    assert px.cov == pytest.approx(cov, rel=1e-6)
    assert px.delta_h_per_token == pytest.approx(-1e-3 * cov, rel=1e-6)
    assert px.delta_h_per_sequence == pytest.approx(
        -1e-3 * cov * float(up.n_tokens.double().mean()), rel=1e-6
    )
