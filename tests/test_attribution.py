"""Attribution of ΔH to tagged groups of U (``deltaH.attribution``): sums and shares on numbers with
known answers, the tag families' edge cases, and the standard errors against a brute-force jackknife
(evaluation sequence n dropped from E and the estimators run again) on a tiny float64 model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_batch, sample_responses, tiny_qwen2, with_lora

import deltaH as dh
from deltaH.attribution import Contributions, UpdateTags, attribute, jackknife_se, tags_from_batch
from deltaH.errors import ArgumentError

pytestmark = pytest.mark.usefixtures("one_thread")


def tags(n: int = 8, **over: object) -> UpdateTags:
    """Two prompt groups of 4; alternating rewards 1/0; advantages +/−; lengths 1..n; none truncated."""
    d: dict = {
        "advantage": np.tile([1.0, -1.0], n // 2),
        "reward": np.tile([1.0, 0.0], n // 2),
        "group": np.repeat([0, 1], n // 2),
        "truncated": np.zeros(n, dtype=bool),
        "length": np.arange(1, n + 1),
        "text": [f"r{i}" for i in range(n)],
    }
    d.update(over)
    return UpdateTags(**d)


def exact(d: np.ndarray, baseline: float) -> Contributions:
    return Contributions(d, None, baseline)


# ============================================================================================ sums, shares
def test_group_sums_and_shares_have_known_values() -> None:
    d = np.array([1.0, 2.0, 3.0, 4.0])
    t = UpdateTags(advantage=[0.5, -1.0, 2.0, 0.0], reward=[1, 0, 1, 0], group=[0, 0, 1, 1],
                   truncated=[False, True, False, True], length=[3, 1, 2, 5])
    a = attribute(exact(d, 10.0), exact(2 * d, 0.0), t)  # total 20 (true) and 20 (first order)
    sign = a.family("advantage_sign")
    assert sign is not None
    got = {g.label: (g.n, g.rows, g.true.delta_h, g.true.share, g.first_order.share) for g in sign.groups}
    assert got == {"positive advantage": (2, [0, 2], 4.0, 0.2, 0.4),
                   "negative advantage": (1, [1], 2.0, 0.1, 0.2),
                   "zero advantage": (1, [3], 4.0, 0.2, 0.4)}
    rew = a.family("reward")
    assert rew is not None and [(g.label, g.true.delta_h) for g in rew.groups] == [
        ("correct (reward 1)", 4.0), ("incorrect (reward 0)", 6.0)]
    tr = a.family("truncation")
    assert tr is not None and [(g.label, g.true.delta_h) for g in tr.groups] == [
        ("truncated (no EOS)", 6.0), ("finished (EOS)", 4.0)]
    assert a.baseline.true.share == 0.5 and a.baseline.first_order.share == 0.0 and a.baseline.n == 0
    assert a.update.true.delta_h == 10.0 and a.update.true.share == 0.5 and a.update.first_order.share == 1.0
    assert a.total.true.delta_h == 20.0 and a.total.true.share == 1.0 and a.total.n == 4
    for fam in a.families:  # each family partitions U: its shares and the baseline's add up to 1
        assert sorted(r for g in fam.groups for r in g.rows) == [0, 1, 2, 3], fam.name
        assert sum(g.true.share for g in fam.groups) + a.baseline.true.share == pytest.approx(1.0, abs=1e-15)
    # without leave-one-out values there are no standard errors
    assert np.isnan(a.baseline.true.se) and np.isnan(sign.groups[0].true.share_se)
    assert np.isnan(a.delta_h_se).all()
    assert a.rank_true == [3, 2, 1, 0] and a.rank_first_order == [3, 2, 1, 0]


def test_ranking_puts_nan_last_and_keeps_ties_in_row_order() -> None:
    d = np.array([0.5, np.nan, -1.0, 0.5, 2.0])
    a = attribute(exact(d, 0.0), exact(d, 0.0), tags(5, advantage=np.ones(5), reward=None,
                                                      group=np.zeros(5), length=np.ones(5)))
    assert a.rank_true == [4, 0, 3, 2, 1]


# ================================================================================================= families
def test_length_quartiles_keep_ties_together() -> None:
    """N = 8: lengths with 0, 4, 6, 7 strictly shorter responses fall in Q1, Q3, Q4, Q4 (4s/N rounded down);
    Q2 is empty because four responses tie at the shortest length."""
    t = tags(8, length=np.array([1, 1, 2, 1, 9, 1, 2, 3]))
    fam = attribute(exact(np.arange(8.0), 0.0), exact(np.zeros(8), 0.0), t).family("length_quartile")
    assert fam is not None
    assert [(g.label, g.rows) for g in fam.groups] == [
        ("Q1: 1 tokens", [0, 1, 3, 5]), ("Q3: 2 tokens", [2, 6]), ("Q4: 3–9 tokens", [4, 7])]
    # distinct lengths: two per quartile, in length order
    fam = attribute(exact(np.arange(8.0), 0.0), exact(np.zeros(8), 0.0), tags(8)).family("length_quartile")
    assert fam is not None and [g.rows for g in fam.groups] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize(("over", "family", "reason"), [
    ({"reward": None}, "reward", "rewards are unknown"),
    ({"reward": np.array([0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0])}, "reward", "3 distinct values"),
    ({"reward": np.full(8, 1.0)}, "reward", "1 distinct value;"),
    ({}, "truncation", "every response ended with EOS (none was truncated)"),
    ({"truncated": np.ones(8, dtype=bool)}, "truncation", "every response was truncated (no EOS)"),
    ({"length": np.full(8, 16)}, "length_quartile", "same length (16 tokens)"),
    ({"group": np.zeros(8)}, "prompt_group", "the same prompt"),
    ({"advantage": np.zeros(8)}, "advantage_sign", "zero advantage"),
])
def test_a_family_that_does_not_split_U_is_left_out_with_its_reason(over: dict, family: str,
                                                                       reason: str) -> None:
    a = attribute(exact(np.ones(8), 0.0), exact(np.ones(8), 0.0), tags(8, **over))
    assert a.family(family) is None
    assert reason in a.omitted[family]
    assert all(f.name != family for f in a.families) and len(a.families) >= 1


def test_advantages_within_rounding_of_zero_count_as_zero() -> None:
    adv = np.array([1.5, -1.5, 3e-7, -1e-9, 0.0, 1.5, -1.5, 0.0])  # |A| ≤ 1e-6·max|A| is zero
    a = attribute(exact(np.ones(8), 0.0), exact(np.ones(8), 0.0), tags(8, advantage=adv))
    fam = a.family("advantage_sign")
    assert fam is not None and [(g.label, g.rows) for g in fam.groups] == [
        ("positive advantage", [0, 5]), ("negative advantage", [1, 6]), ("zero advantage", [2, 3, 4, 7])]


def test_bad_tags_name_the_field() -> None:
    with pytest.raises(ArgumentError, match="UpdateTags.length has 3 entries"):
        tags(4, length=[1, 2, 3])
    with pytest.raises(ArgumentError, match="UpdateTags.reward has non-finite"):
        tags(4, reward=[1.0, np.nan, 0.0, 1.0])
    with pytest.raises(ArgumentError, match="UpdateTags.text has 2 entries"):
        tags(4, text=["a", "b"])
    with pytest.raises(ArgumentError, match="true.delta_h has 3 entries for 4"):
        attribute(exact(np.ones(3), 0.0), exact(np.ones(4), 0.0), tags(4))
    with pytest.raises(ArgumentError, match=r"Contributions.loo must be \[N_E, 4\]"):
        Contributions(np.ones(4), np.ones((5, 3)), 0.0)


def test_tags_from_a_sequence_batch() -> None:
    """Truncated = the last response token is not an EOS id; length counts response tokens (EOS included)."""
    rows = [([5, 6], [7, 3]), ([5], [8, 9, 10]), ([6, 7, 8], [2]), ([4], [3])]
    batch = build_batch(rows, side="left", pad=0)
    t = tags_from_batch(batch, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5]),
                        group=torch.tensor([0, 0, 1, 1]), eos_token_ids=[3, 2], texts=["a", "b", "c", "d"])
    assert t.truncated.tolist() == [False, True, False, False]
    assert t.length.tolist() == [2, 3, 1, 1] and t.reward is None and t.text == ["a", "b", "c", "d"]
    assert t.advantage.dtype == np.float64 and t.group.tolist() == [0, 0, 1, 1]


# ======================================================================== standard errors vs brute force
N_E, N_U, ETA = 12, 6, 0.3


@pytest.fixture(scope="module")
def problem() -> dict:
    """A LoRA model, E of 12 sampled sequences, 6 random "update components" and a baseline direction."""
    model = with_lora(tiny_qwen2(seed=31))
    lm = dh.FunctionalLM.from_model(model)
    policy = dh.SamplingPolicy(0.8, 1.0)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 32, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_E)]
    batch = build_batch(sample_responses(model, prompts, 0.8, 1.0, 5, 3, g), side="right", pad=1)
    dirs = {n: 0.2 * torch.randn((N_U + 1, *t.shape), generator=g, dtype=t.dtype)
            for n, t in lm.params.items()}
    return {"lm": lm, "policy": policy, "batch": batch, "comps": {n: t[:N_U] for n, t in dirs.items()},
            "base": {n: t[N_U:] for n, t in dirs.items()}}


def _true(p: dict, dirs: dict, batch: dh.SequenceBatch) -> dh.TrueDeltaH:
    return dh.delta_h_true_multi(p["lm"].params, dirs, batch, lm=p["lm"], policy=p["policy"], eta=ETA)


def _first(p: dict, dirs: dict, batch: dh.SequenceBatch) -> dh.FirstOrder:
    return dh.delta_h_first_order(p["lm"].params, dirs, batch, lm=p["lm"], policy=p["policy"], eta=ETA)


def test_standard_errors_are_the_jackknife_of_group_sums(problem: dict) -> None:
    """Each group's SE equals the jackknife computed the long way: E without sequence n, every estimator
    run again, the group's ΔH (and its share of ΔH over U + baseline) summed from those runs. First order
    also has an independent route: δH₁ is linear in the direction, so a group's sum is δH₁ along the
    summed direction, whose SE the estimator reports itself."""
    p = problem
    kw = {"lm": p["lm"], "policy": p["policy"], "eta": ETA}
    inf_t = dh.influence_matrix(p["lm"].params, p["comps"], p["batch"], kind="true", **kw)
    inf_f = dh.influence_matrix(p["lm"].params, p["comps"], p["batch"], kind="first_order", **kw)
    bt, bf = _true(p, p["base"], p["batch"]), _first(p, p["base"], p["batch"])
    assert inf_t.loo is not None and inf_f.loo is not None and bf.loo is not None
    t = UpdateTags(advantage=[1.0, -1.0, 1.0, -1.0, 0.5, -2.0], reward=[1, 0, 1, 0, 1, 0],
                   group=[0, 0, 0, 1, 1, 1], truncated=[0, 1, 0, 0, 1, 0], length=[1, 2, 3, 4, 5, 6])
    a = attribute(Contributions(inf_t.column_delta_h, inf_t.loo, float(bt.delta_h[0]), bt.loo[0]),
                  Contributions(inf_f.column_delta_h, inf_f.loo, float(bf.delta_h[0]), bf.loo[0]), t)

    # brute force: drop sequence n, rerun the estimators on the other N_E − 1
    loo_t, loo_f, loo_bt, loo_bf = [], [], [], []
    for n in range(N_E):
        sub = p["batch"].select([m for m in range(N_E) if m != n])
        loo_t.append(_true(p, p["comps"], sub).delta_h)
        loo_f.append(_first(p, p["comps"], sub).delta_h)
        loo_bt.append(_true(p, p["base"], sub).delta_h[0])
        loo_bf.append(_first(p, p["base"], sub).delta_h[0])
    lt, lf = torch.stack(loo_t).numpy(), torch.stack(loo_f).numpy()  # [N_E, N_U]
    ltot_t, ltot_f = lt.sum(1) + torch.stack(loo_bt).numpy(), lf.sum(1) + torch.stack(loo_bf).numpy()

    checked = 0
    for fam in a.families:
        for grp in fam.groups:
            for est, lo, tot in ((grp.true, lt, ltot_t), (grp.first_order, lf, ltot_f)):
                g_loo = lo[:, grp.rows].sum(1)
                # float64 model end to end: both sides are sums of the same float64 terms (~1e-15);
                # the SEs are ~1e-3, so 1e-9 relative leaves room for the leave-one-out algebra
                np.testing.assert_allclose(est.se, jackknife_se(g_loo), rtol=1e-9)
                np.testing.assert_allclose(est.share_se, jackknife_se(g_loo / tot), rtol=1e-9)
                checked += 1
            summed = {k: v[grp.rows].sum(0, keepdim=True) for k, v in p["comps"].items()}
            fo = _first(p, summed, p["batch"])
            assert fo.stderr is not None
            np.testing.assert_allclose(grp.first_order.se, float(fo.stderr[0]), rtol=1e-9)
            np.testing.assert_allclose(grp.first_order.delta_h, float(fo.delta_h[0]), rtol=1e-9)
    assert checked == 2 * sum(len(f.groups) for f in a.families) and len(a.families) == 5
    np.testing.assert_allclose(a.baseline.true.se, jackknife_se(np.array(loo_bt)), rtol=1e-9)
    np.testing.assert_allclose(a.total.true.se, jackknife_se(ltot_t), rtol=1e-9)
    np.testing.assert_allclose(a.total.first_order.se, jackknife_se(ltot_f), rtol=1e-9)
    np.testing.assert_allclose(a.delta_h1_se, inf_f_stderr(p), rtol=1e-9)
    # not degenerate: the errors are comparable to the values and differ between groups
    ses = [g.true.se for f in a.families for g in f.groups]
    assert min(ses) > 0 and max(ses) > 1.5 * min(ses)


def inf_f_stderr(p: dict) -> np.ndarray:
    """Each component's own first-order SE, as the estimator reports it."""
    fo = _first(p, p["comps"], p["batch"])
    assert fo.stderr is not None
    return fo.stderr.numpy()
