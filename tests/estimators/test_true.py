"""True ΔH (SNIS, DESIGN.md §1.3): exact enumeration, a plain-loop reference, invariances, edge cases, PSIS.

(a) A vocab-6 LM after a fixed prompt has only 781 responses (≤ 4 new tokens, EOS = 5 stops):
    every expectation is an exact finite sum, computed from ``model(...).logits`` and
    transformers' warpers in float64 (``conftest.ref_token_stats``).
(b) ``ref_snis``: θ + ηv written into a *copy* of the model, per-row ``model(row).logits``, every
    §1.3 field by hand in float64, one direction and one η at a time.
(c)-(e) Invariances, edge cases and the PSIS k̂ (against an independent Zhang–Stephens fit).

Tolerances: the conftest's ``ATOL/RTOL`` (1e-9 / 1e-7) wherever both sides run the same HF
kernels on float64 models (observed gaps ~1e-14); statistical checks use standard errors.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from _refs import ref_khat, ref_sequence_stats, ref_snis, ref_token_stats, shifted_copy
from conftest import ATOL, RTOL, build_batch, sample_responses, tiny_llama, tiny_qwen2, with_lora

import deltaH as dh
from deltaH.estimators._psis import khat_threshold, psis_khat
from deltaH.stats import chunks_of, stats_of_chunks

EOS = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _close(a: torch.Tensor, b: torch.Tensor, **kw: float) -> None:
    torch.testing.assert_close(a, b, atol=kw.get("atol", ATOL), rtol=kw.get("rtol", RTOL), equal_nan=True)


def _random_dirs(lm: dh.FunctionalLM, k: int, seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn((k, *p.shape), generator=g, dtype=p.dtype) for n, p in lm.params.items()}


# =====================================================================================================
# Independent PSIS k̂ (Vehtari et al. 2024 tail rule; Zhang & Stephens 2009 fit; arviz/loo prior)
# =====================================================================================================


# =====================================================================================================
# (b) plain-loop SNIS reference
# =====================================================================================================


PER_DIR = ("delta_h", "h_upd", "ess", "khat", "logw_max", "logw_min", "retained_mass",
           "h_upd_per_token", "delta_h_per_token", "nucleus_changed")


def _check_fields(res: dh.TrueDeltaH, ref: dict, idx: tuple) -> None:
    """Every field at index ``idx`` (k̂: atol 1e-7, a GPD fit amplifies ~1e-14 log-weight gaps)."""
    for f in PER_DIR:
        _close(getattr(res, f)[idx], ref[f], **({"atol": 1e-7} if f == "khat" else {}))
    _close(res.per_sequence[idx], ref["per_sequence"])
    _close(res.h_orig, ref["h_orig"])
    _close(res.h_orig_per_token, ref["h_orig_per_token"])


class Setup:
    """A model, a policy, a batch sampled from it (mixed padding) and K = 3 directions."""

    def __init__(self, model: torch.nn.Module, pol: tuple, dirs_scale: float, n: int = 24,
                 seed: int = 0) -> None:
        self.model = model
        self.lm = dh.FunctionalLM.from_model(model)
        self.tau, self.p = pol[0], pol[1]
        self.policy = dh.SamplingPolicy(pol[0], pol[1], topk_prefix=pol[2])
        g = torch.Generator().manual_seed(seed)
        lens = torch.randint(1, 5, (n,), generator=g).tolist()
        prompts = [torch.randint(4, 32, (k,), generator=g).tolist() for k in lens]
        self.rows = sample_responses(model, prompts, self.tau, self.p, 5, EOS, g)
        self.batch = build_batch(self.rows, side="mixed", pad=1, generator=g)
        self.dirs = _random_dirs(self.lm, 3, seed + 1, dirs_scale)

    def run(self, **kw) -> dh.TrueDeltaH:
        kw.setdefault("eta", 0.05)
        batch = kw.pop("batch", self.batch)
        dirs = kw.pop("dirs", self.dirs)
        return dh.delta_h_true_multi(self.lm.params, dirs, batch, lm=self.lm, policy=self.policy, **kw)

    def direction(self, k: int) -> dict:
        return {n: t[k] for n, t in self.dirs.items()}


@pytest.fixture(scope="module")
def lora_setup() -> Setup:
    return Setup(with_lora(tiny_qwen2(seed=11)), (0.8, 0.9, 4), dirs_scale=1.0)


@pytest.fixture(scope="module")
def tied_setup() -> Setup:
    """Full-parameter directions on a tied-embedding Llama (an embedding step also moves the head)."""
    return Setup(tiny_llama(tie=True, seed=12), (1.0, 0.95, 64), dirs_scale=0.05, seed=3)


@pytest.mark.parametrize("mode", ["rb", "naive"])
@pytest.mark.parametrize("which", ["lora", "tied"])
def test_matches_plain_loop_reference(which: str, mode: str, lora_setup: Setup, tied_setup: Setup) -> None:
    s = lora_setup if which == "lora" else tied_setup
    etas = [1e-3, 0.05, 0.2]
    res = s.run(eta=etas, entropy_mode=mode, dir_chunk=2)
    assert res.delta_h.shape == (3, 3) and res.per_sequence.shape == (3, 3, len(s.batch))
    assert res.n_sequences == len(s.batch) and res.khat_threshold == khat_threshold(len(s.batch))
    _close(res.eta, torch.tensor(etas, dtype=torch.float64))
    for i, eta in enumerate(etas):
        for k in range(3):
            ref = ref_snis(s.model, s.direction(k), eta, s.batch, s.tau, s.p, mode)
            _check_fields(res, ref, (i, k))
    # per_sequence sums to ΔH; h_upd = h_orig + ΔH
    _close(res.per_sequence.sum(-1), res.delta_h)
    _close(res.h_upd, res.h_orig + res.delta_h)
    # the references are not degenerate: weights vary, ΔH moves with η, k̂ is defined, and the
    # directions move some nuclei but not all (so nucleus_changed is checked on both outcomes)
    assert (res.ess[-1] < len(s.batch) - 1).all() and torch.isfinite(res.khat).any()
    assert (res.delta_h[2] - res.delta_h[0]).abs().min() > 1e-3
    assert ((res.nucleus_changed[0] > 0) & (res.nucleus_changed[0] < 0.5)).all()


@pytest.mark.parametrize("mode", ["rb", "naive"])
def test_leave_one_out_is_snis_without_that_sequence(mode: str, lora_setup: Setup, tied_setup: Setup) -> None:
    """``loo[k, n]`` is the SNIS estimate on E without sequence n, computed here by dropping the row and
    redoing the literal formula on the per-row statistics at θ and θ + ηv (float64 plain loops). The
    tied setup's larger η moves nuclei, so some weights are exactly 0 there (a dropped sequence that
    carried no weight)."""
    for s, eta in ((lora_setup, 0.2), (tied_setup, 0.2)):
        res = s.run(eta=eta, entropy_mode=mode)
        args = (s.batch.input_ids, s.batch.attention_mask, s.batch.response_mask, s.tau, s.p)
        lq0, ent0 = ref_sequence_stats(s.model, *args)
        e0 = ent0 if mode == "rb" else -lq0
        n = len(s.batch)
        for k in range(3):
            lq1, ent1 = ref_sequence_stats(shifted_copy(s.model, s.direction(k), eta), *args)
            e1 = ent1 if mode == "rb" else -lq1
            want = []
            for j in range(n):
                keep = [m for m in range(n) if m != j]
                w = torch.softmax(lq1[keep] - lq0[keep], 0)
                we1 = torch.where(w > 0, w * e1[keep], torch.zeros_like(w))
                want.append(we1.sum() - e0[keep].mean())
            _close(res.loo[k], torch.stack(want))
        # not degenerate: the weights vary and the leave-one-out values differ
        assert (res.ess < n - 1e-3).all() and (res.loo.std(-1) > 1e-6).all()


def test_eta_zero_and_zero_direction_are_exact(lora_setup: Setup) -> None:
    s = lora_setup
    dirs = {n: t.clone() for n, t in s.dirs.items()}
    for t in dirs.values():
        t[1] = 0
    res = s.run(dirs=dirs, eta=[0.0, 0.05])
    n = len(s.batch)
    for r, k in ((0, 0), (0, 1), (0, 2), (1, 1)):
        assert res.delta_h[r, k] == 0 and res.delta_h_per_token[r, k] == 0
        assert res.ess[r, k] == n and res.retained_mass[r, k] == 1
        assert res.logw_max[r, k] == 0 and res.logw_min[r, k] == 0
        assert res.nucleus_changed[r, k] == 0
        assert (res.per_sequence[r, k] == 0).all() and (res.loo[r, k] == 0).all()
        assert torch.isnan(res.khat[r, k])  # k̂ of equal weights is NaN
    assert (res.delta_h[1, [0, 2]] != 0).all()


def test_delta_h_true_is_the_k1_slice(lora_setup: Setup) -> None:
    s = lora_setup
    multi = s.run(eta=[0.01, 0.1])
    one = dh.delta_h_true(s.lm.params, s.direction(2), s.batch, lm=s.lm, policy=s.policy, eta=[0.01, 0.1])
    assert one.delta_h.shape == (2,) and one.per_sequence.shape == (2, len(s.batch))
    assert one.loo.shape == (2, len(s.batch))
    for f in (*PER_DIR, "per_sequence", "loo"):
        _close(getattr(one, f), getattr(multi, f)[:, 2])
    scalar = dh.delta_h_true(s.lm.params, s.direction(2), s.batch, lm=s.lm, policy=s.policy, eta=0.1)
    assert scalar.delta_h.shape == () and scalar.per_sequence.shape == (len(s.batch),)
    _close(scalar.delta_h, multi.delta_h[1, 2])


def test_eta_sweep_equals_separate_calls(lora_setup: Setup) -> None:
    s = lora_setup
    sweep = s.run(eta=torch.tensor([0.02, 0.3], dtype=torch.float64))
    for i, eta in enumerate((0.02, 0.3)):
        single = s.run(eta=eta)
        assert single.delta_h.shape == (3,)
        for f in (*PER_DIR, "per_sequence", "loo"):
            _close(getattr(sweep, f)[i], getattr(single, f))


# =====================================================================================================
# (c) invariances
# =====================================================================================================


@pytest.fixture(scope="module")
def lora_base(lora_setup: Setup) -> dh.TrueDeltaH:
    return lora_setup.run(eta=0.1, tf_batch_size=16, dir_chunk=8)


@pytest.mark.parametrize("kw", [{"dir_chunk": 1}, {"dir_chunk": 2}, {"tf_batch_size": 1},
                                {"tf_batch_size": 7}, {"head_chunk": 3}])
def test_chunking_invariance(kw: dict, lora_setup: Setup, lora_base: dh.TrueDeltaH) -> None:
    got = lora_setup.run(eta=0.1, **kw)
    for f in (*PER_DIR, "per_sequence", "loo", "h_orig", "h_orig_per_token"):
        _close(getattr(got, f), getattr(lora_base, f))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_and_permutation_invariance(side: str, lora_setup: Setup, lora_base: dh.TrueDeltaH) -> None:
    s = lora_setup
    perm = torch.randperm(len(s.rows), generator=torch.Generator().manual_seed(5))
    batch = build_batch([s.rows[i] for i in perm], side=side, pad=7, extra=3)
    got = s.run(eta=0.1, batch=batch, tf_batch_size=5)
    for f in PER_DIR:
        _close(getattr(got, f), getattr(lora_base, f), **({"atol": 1e-7} if f == "khat" else {}))
    _close(got.per_sequence, lora_base.per_sequence[:, perm])
    _close(got.loo, lora_base.loo[:, perm])


def test_direction_on_a_subset_of_parameters(lora_setup: Setup) -> None:
    """Missing names are zero: a one-matrix direction equals the full tree with zeros elsewhere,
    and the plain-loop reference."""
    s = lora_setup
    name = next(n for n in s.lm.params if "lora_B" in n)
    sub = {name: s.dirs[name]}
    full = {n: (t if n == name else torch.zeros_like(t)) for n, t in s.dirs.items()}
    a, b = s.run(dirs=sub, eta=0.3), s.run(dirs=full, eta=0.3)
    for f in (*PER_DIR, "per_sequence"):
        _close(getattr(a, f), getattr(b, f))
    ref = ref_snis(s.model, {name: sub[name][0]}, 0.3, s.batch, s.tau, s.p, "rb")
    _check_fields(a, ref, (0,))
    assert a.delta_h.abs().min() > 1e-4


def test_theta_side_stats_are_reused(lora_setup: Setup) -> None:
    """Passing precomputed θ-side stats (``base``) gives the same result as recomputing them."""
    from deltaH.estimators.true import base_stats

    s = lora_setup
    base = base_stats(s.lm, s.lm.params, s.batch, s.policy)
    st = dh.sequence_stats(s.lm, s.lm.params, s.batch, policy=s.policy)
    assert torch.equal(base.logq, st.logq) and torch.equal(base.entropy, st.entropy)
    a, b = s.run(eta=0.05, base=base), s.run(eta=0.05)
    for f in (*PER_DIR, "per_sequence"):
        _close(getattr(a, f), getattr(b, f))


def test_nucleus_changed_at_p1_and_without_theta_keys(lora_setup: Setup) -> None:
    """p = 1 computes no keys and the fraction is exactly 0 even for a large step; under top-p, a
    hand-made ``base`` without θ's keys gives NaN (unknown), never a silent 0."""
    from deltaH.estimators.true import base_stats

    s = lora_setup
    pol1 = dh.SamplingPolicy(s.tau, 1.0)
    base1 = base_stats(s.lm, s.lm.params, s.batch, pol1)
    assert base1.nucleus_key is None
    res1 = dh.delta_h_true_multi(s.lm.params, s.dirs, s.batch, lm=s.lm, policy=pol1, eta=[0.0, 0.2],
                                 base=base1)
    assert (res1.nucleus_changed == 0).all() and (res1.ess[1] < len(s.batch) - 1).all()
    base = base_stats(s.lm, s.lm.params, s.batch, s.policy)
    assert base.nucleus_key is not None and base.nucleus_key.shape == (int(s.batch.n_tokens.sum()), 2)
    bare = dataclasses.replace(base, nucleus_key=None)
    assert torch.isnan(s.run(eta=0.2, base=bare).nucleus_changed).all()


# =====================================================================================================
# (d) edge cases
# =====================================================================================================


class DeadSetup:
    """Untied Qwen2 under p = 0.9, 4 sampled sequences (16 scored positions < hidden size 32).

    A direction on the LM head's row ``j0`` (a token no response uses) with ``u`` solving
    ``H u = t`` on the final hidden states ``H`` of the scored positions makes token ``j0``'s logit
    rise by ``η·t`` there: with ``t = 1`` and η = 200 the nucleus becomes ``{j0}`` and the
    sequence's log q(θ') is −inf; with ``t = 0`` its logits are unchanged.
    """

    def __init__(self) -> None:
        self.model = tiny_qwen2(seed=13)
        self.lm = dh.FunctionalLM.from_model(self.model)
        self.policy = dh.SamplingPolicy(1.0, 0.9)
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(4, 32, (3,), generator=g).tolist() for _ in range(4)]
        self.rows = sample_responses(self.model, prompts, 1.0, 0.9, 4, EOS, g)
        self.batch = build_batch(self.rows, side="left")
        self.j0 = min(set(range(32)) - {t for _, r in self.rows for t in r})
        h, rowid = [], []
        for i, (p, r) in enumerate(self.rows):
            with torch.no_grad():
                hid = self.model.model(input_ids=torch.tensor([p + r])).last_hidden_state[0]
            h += [hid[len(p) + k - 1] for k in range(len(r))]
            rowid += [i] * len(r)
        self.h, self.rowid = torch.stack(h), torch.tensor(rowid)

    def direction(self, dead_rows: list[int]) -> dict:
        t = torch.isin(self.rowid, torch.tensor(dead_rows, dtype=torch.long)).double()
        u = torch.linalg.lstsq(self.h, t[:, None]).solution[:, 0]
        assert (self.h @ u - t).abs().max() < 1e-10
        w = torch.zeros_like(self.lm.params["lm_head.weight"])
        w[self.j0] = u
        return {"lm_head.weight": w}


@pytest.fixture(scope="module")
def dead() -> DeadSetup:
    return DeadSetup()


def test_every_sequence_out_of_the_nucleus(dead: DeadSetup) -> None:
    ok = {"lm_head.weight": 0.01 * torch.ones_like(dead.lm.params["lm_head.weight"])}
    all_dead = dead.direction([0, 1, 2, 3])["lm_head.weight"]
    dirs = {"lm_head.weight": torch.stack([all_dead, ok["lm_head.weight"]])}
    with pytest.warns(RuntimeWarning, match="zero weight on every evaluation sequence"):
        res = dh.delta_h_true_multi(dead.lm.params, dirs, dead.batch, lm=dead.lm, policy=dead.policy,
                                    eta=200.0)
    for f in ("delta_h", "h_upd", "delta_h_per_token", "h_upd_per_token"):
        assert torch.isnan(getattr(res, f)[0]), f
    assert res.ess[0] == 0 and res.retained_mass[0] == 0
    assert torch.isneginf(res.logw_max[0]) and torch.isneginf(res.logw_min[0])
    assert torch.isnan(res.per_sequence[0]).all()
    # the other direction in the same call is unaffected
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = dh.delta_h_true(dead.lm.params, ok, dead.batch, lm=dead.lm, policy=dead.policy, eta=200.0)
    for f in (*PER_DIR, "per_sequence"):
        _close(getattr(res, f)[1], getattr(alone, f))
    assert torch.isfinite(alone.delta_h)


def test_dead_warning_points_at_the_caller(dead: DeadSetup) -> None:
    with pytest.warns(RuntimeWarning) as rec:
        dh.delta_h_true_multi(dead.lm.params, {n: t[None] for n, t in dead.direction([0, 1, 2, 3]).items()},
                              dead.batch, lm=dead.lm, policy=dead.policy, eta=200.0)
    assert rec[0].filename == __file__


@pytest.mark.parametrize("mode", ["rb", "naive"])
def test_some_sequences_out_of_the_nucleus_get_weight_zero(dead: DeadSetup, mode: str) -> None:
    d = dead.direction([0, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: not every weight is zero
        res = dh.delta_h_true(dead.lm.params, d, dead.batch, lm=dead.lm, policy=dead.policy, eta=200.0,
                              entropy_mode=mode)
    for f in (*PER_DIR, "per_sequence"):
        if f not in ("khat", "logw_min"):
            assert torch.isfinite(getattr(res, f)).all(), f
    assert torch.isneginf(res.logw_min) and abs(float(res.logw_max)) < 1e-9
    ref = ref_snis(dead.model, d, 200.0, dead.batch, 1.0, 0.9, mode)
    assert ref["retained_mass"] == pytest.approx(0.5, abs=1e-9)  # the construction worked
    _check_fields(res, ref, ())
    st = dh.sequence_stats(dead.lm, dead.lm.params, dead.batch, policy=dead.policy)
    e0 = st.entropy if mode == "rb" else st.surprisal
    assert torch.equal(res.per_sequence[[0, 2]], -e0[[0, 2]] / 4)


def test_batch_with_a_token_outside_the_nucleus_is_refused(dead: DeadSetup) -> None:
    rows = list(dead.rows)
    p, r = rows[1]
    with torch.no_grad():
        logits = dead.model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1]
    rows[1] = (p, [int(logits.argmin())] + r[1:])  # the least likely token: outside p = 0.9
    batch = build_batch(rows, side="right")
    d = dead.direction([0])
    with pytest.raises(ValueError, match=r"evaluation sequences \[1\] have log q = -inf under θ.*"
                                         r"outside the nucleus"):
        dh.delta_h_true(dead.lm.params, d, batch, lm=dead.lm, policy=dead.policy, eta=1e-3)


def test_argument_errors(lora_setup: Setup) -> None:
    s = lora_setup
    with pytest.raises(ValueError, match="entropy_mode must be one of"):
        s.run(entropy_mode="plugin")
    with pytest.raises(ValueError, match="dir_chunk must be >= 1"):
        s.run(dir_chunk=0)
    with pytest.raises(ValueError, match="eta is an empty sequence"):
        s.run(eta=[])
    with pytest.raises(ValueError, match="eta must be finite"):
        s.run(eta=[0.1, math.nan])
    with pytest.raises(ValueError, match="dirs is empty"):
        s.run(dirs={})
    name = next(iter(s.dirs))
    one = s.dirs[name][0]  # one direction without its K axis (what UpdateDirections.full holds)
    want = ", ".join(str(n) for n in one.shape)
    with pytest.raises(ValueError, match=rf"has shape \({want}\), the parameter's own shape, .* "
                                         rf"expected shape \(K, {want}\)\. For one direction use "
                                         r"delta_h_true\(\.\.\.\).*UpdateDirections\.stacked\(\)"):
        s.run(dirs={name: one})
    with pytest.raises(ValueError, match=rf"has shape \(4, 3, {want}\); expected \(K, {want}\)"):
        s.run(dirs={name: one.expand(4, 3, *one.shape)})
    other = next(n for n in s.dirs if n != name)
    with pytest.raises(ValueError, match="inconsistent leading sizes"):
        s.run(dirs={name: s.dirs[name], other: s.dirs[other][:2]})
    with pytest.raises(KeyError, match="not a trainable parameter"):
        s.run(dirs={"base_model.model.lm_head.weight": torch.zeros(3, 32, 32)})


# =====================================================================================================
# (a) exact enumeration
# =====================================================================================================

V6, PROMPT, MAX_NEW, EOS6 = 6, [1, 2, 0], 4, 5


def _all_responses() -> list[list[int]]:
    """Every response: non-EOS tokens, then EOS (stop) — or MAX_NEW tokens of anything."""
    out = []
    body_tokens = [t for t in range(V6) if t != EOS6]
    for n in range(1, MAX_NEW + 1):
        for body in itertools.product(body_tokens, repeat=n - 1):
            if n < MAX_NEW:
                out.append([*body, EOS6])
            else:
                out.extend([*body, last] for last in range(V6))
    return out


class Enum:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.lm = dh.FunctionalLM.from_model(model)
        self.batch = build_batch([(PROMPT, r) for r in _all_responses()], side="right", extra=0)

    def ref(self, model: torch.nn.Module, tau: float, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (log q(y), RB entropy_y) of every response from one model(...) call (causal: right
        padding cannot reach the earlier positions) and transformers' warpers."""
        ids, m = self.batch.input_ids, self.batch.response_mask[:, 1:]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        lq, en = ref_token_stats(logits, ids[:, 1:], tau, p)
        zero = torch.zeros_like(lq)
        return torch.where(m, lq, zero).sum(1), torch.where(m, en, zero).sum(1)


def _exact_entropy(logq: torch.Tensor) -> torch.Tensor:
    q = logq.exp()
    return -(q * torch.where(q > 0, logq, torch.zeros_like(logq))).sum()


@pytest.fixture(scope="module")
def enum_plain() -> Enum:
    return Enum(tiny_qwen2(vocab=V6, seed=21))


@pytest.fixture(scope="module")
def enum_lora() -> Enum:
    return Enum(with_lora(tiny_qwen2(vocab=V6, seed=22)))


def test_enumeration_covers_every_response() -> None:
    r = _all_responses()
    assert len(r) == 1 + 5 + 25 + 125 * 6 and len({tuple(x) for x in r}) == len(r)


@pytest.mark.parametrize("pol", [(1.0, 1.0), (0.9, 0.8), (1.4, 0.95)])
@pytest.mark.parametrize("which", ["plain", "lora"])
def test_exact_normalisation_and_entropy(which: str, pol: tuple, enum_plain: Enum, enum_lora: Enum) -> None:
    e = enum_plain if which == "plain" else enum_lora
    tau, p = pol
    st = dh.sequence_stats(e.lm, e.lm.params, e.batch, policy=dh.SamplingPolicy(tau, p, topk_prefix=2))
    rlq, ren = e.ref(e.model, tau, p)
    q = st.logq.exp()
    # Σ_y q(y) = 1 under deltaH's log q (float64 sums of 781 terms)
    assert float(q.sum()) == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(torch.isneginf(st.logq), torch.isneginf(rlq))
    if p < 1:
        assert torch.isneginf(st.logq).sum() > 100  # top-p really removes responses
    fin = torch.isfinite(rlq)
    _close(st.logq[fin], rlq[fin])
    # E_q[RB entropy_y] = exact entropy over whole responses (chain rule)
    h_exact = _exact_entropy(rlq)
    _close((q * st.entropy).sum(), h_exact)
    _close(st.entropy, ren)


def _dir(lm: dh.FunctionalLM, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in lm.params.items()}


@pytest.mark.parametrize("pol", [(1.0, 1.0), (0.9, 0.8)])
@pytest.mark.parametrize("which, eta", [("plain", 0.01), ("lora", 0.1)])
def test_snis_expectation_form_is_exact(which: str, eta: float, pol: tuple, enum_plain: Enum,
                                        enum_lora: Enum) -> None:
    """Σ_y q_θ w e(θ') / Σ_y q_θ w over the old support = E_{q_θ'}[e(θ') | Y ∈ supp q_θ]; with p = 1 that
    is H(θ'). θ' stats come from deltaH's vmapped direction path; H(θ') from a copied model."""
    e = enum_plain if which == "plain" else enum_lora
    tau, p = pol
    policy = dh.SamplingPolicy(tau, p)
    v = _dir(e.lm, 31)
    stacked = {n: torch.stack([eta * t, -eta * t]) for n, t in v.items()}  # θ ± ηv in one vmap call
    chunks = chunks_of(e.batch, 256)
    shifted = {n: e.lm.params[n] + d for n, d in stacked.items()}
    lq1, en1, _ = stats_of_chunks(e.lm, e.lm.params, shifted, chunks, policy)
    st0 = dh.sequence_stats(e.lm, e.lm.params, e.batch, policy=policy)
    q0 = st0.logq.exp()
    for k, sign in enumerate((1.0, -1.0)):
        rlq1, ren1 = e.ref(shifted_copy(e.model, v, sign * eta), tau, p)
        _close(en1[k], ren1)
        old = torch.isfinite(st0.logq)
        w = torch.where(old, torch.exp(lq1[k] - st0.logq), torch.zeros_like(q0))
        retained = (q0 * w).sum()
        q1 = rlq1.exp()
        _close(retained, q1[old].sum())  # Σ_y q_θ w = mass of q_θ' on supp q_θ
        snis_form = (q0 * w * en1[k]).sum() / retained
        target = (q1[old] * ren1[old]).sum() / q1[old].sum()
        _close(snis_form, target)
        if p == 1.0:
            _close(snis_form, _exact_entropy(rlq1))
            assert retained == pytest.approx(1.0, abs=1e-12)
        else:
            assert retained < 0.99  # mass really leaks out of the old nuclei: the restricted target
        assert abs(float(_exact_entropy(rlq1) - _exact_entropy(st0.logq))) > 1e-3  # a real change


@pytest.mark.parametrize("which, eta, seed", [("plain", 0.003, 42), ("lora", 0.03, 41)])
def test_snis_on_a_large_sample_agrees_with_exact_delta_h(which: str, eta: float, seed: int, enum_plain: Enum,
                                                          enum_lora: Enum) -> None:
    """N = 2000 responses drawn (seeded) from the enumerated q_θ: SNIS ΔH is within 4 standard
    errors (delta method) of the exact ΔH; the unweighted difference of means is not."""
    e = enum_plain if which == "plain" else enum_lora
    policy = dh.SamplingPolicy(1.0, 1.0)
    v = _dir(e.lm, seed)
    lq0, en0 = e.ref(e.model, 1.0, 1.0)
    lq1, en1 = e.ref(shifted_copy(e.model, v, eta), 1.0, 1.0)
    exact = float(_exact_entropy(lq1) - _exact_entropy(lq0))
    n = 2000
    idx = torch.multinomial(lq0.exp(), n, replacement=True, generator=torch.Generator().manual_seed(7))
    res = dh.delta_h_true(e.lm.params, v, e.batch.select(idx), lm=e.lm, policy=policy, eta=eta)
    w = torch.exp(lq1[idx] - lq0[idx])
    w = w / w.mean()
    h_upd, h_orig = (w * en1[idx]).mean(), en0[idx].mean()
    psi = w * (en1[idx] - h_upd) - (en0[idx] - h_orig)  # influence function of the SNIS ratio
    se = float(psi.std() / math.sqrt(n))
    assert abs(float(res.delta_h) - exact) < 4 * se
    assert abs(float(en1[idx].mean() - h_orig) - exact) > 4 * se  # the weights matter here
    assert abs(exact) > 10 * se


# =====================================================================================================
# (e) PSIS k̂
# =====================================================================================================


@pytest.mark.parametrize("mu, lo, hi", [(0.5, -0.2, 0.3), (2.0, 0.55, 0.8), (3.0, 0.85, 1.2)])
def test_khat_gaussian_shift(mu: float, lo: float, hi: float) -> None:
    """Proposal N(0,1), target N(μ,1): log w = μx − μ²/2. Known k̂ ≈ 0.16 / 0.67 / 1.0 (S = 4000)."""
    s = 4000
    ks = []
    for seed in range(6):
        x = torch.randn(s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        ks.append(float(psis_khat((mu * x - mu**2 / 2)[None], s)[0]))
    assert lo < np.mean(ks) < hi, ks


def _random_logw(rng: np.random.Generator, kind: str, s: int) -> np.ndarray:
    if kind == "normal":
        return rng.normal(0, rng.uniform(0.1, 3), s)
    if kind == "student":
        return np.log(np.abs(rng.standard_t(rng.uniform(0.7, 5), s)) + 1e-3)
    if kind == "pareto":
        return np.log(rng.pareto(rng.uniform(0.5, 4), s) + 1)
    if kind == "with_zeros":
        lw = rng.normal(0, 1, s)
        lw[rng.random(s) < 0.3] = -np.inf
        return lw
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["normal", "student", "pareto", "with_zeros"])
def test_khat_matches_independent_zhang_stephens(kind: str) -> None:
    rng = np.random.default_rng(["normal", "student", "pareto", "with_zeros"].index(kind))
    for s in (30, 100, 257, 1000, 4000):
        for _ in range(3):
            lw = _random_logw(rng, kind, s)
            got = float(psis_khat(torch.from_numpy(lw)[None], s)[0])
            want = ref_khat(lw)
            assert math.isfinite(want)
            assert got == pytest.approx(want, abs=1e-9), (kind, s)


def test_khat_uses_only_the_tail() -> None:
    """Any subset holding the M + 1 largest log-weights, in any order, gives the same k̂; rows are
    independent; fewer than 5 exceedances or equal weights give NaN."""
    rng = np.random.default_rng(0)
    s = 500
    lw = torch.from_numpy(rng.standard_t(2, s))
    full = psis_khat(lw[None], s)
    m = math.ceil(min(0.2 * s, 3 * math.sqrt(s)))
    top = lw.topk(m + 1).values
    shuffled = top[torch.randperm(m + 1, generator=torch.Generator().manual_seed(0))]
    rows = torch.stack([lw[: m + 4], torch.cat([shuffled, torch.full((3,), -1e9, dtype=torch.float64)])])
    both = psis_khat(rows, s)
    assert both[1] == full[0] and psis_khat(top[None], s)[0] == full[0]
    assert both[0] != full[0]  # a different sample really differs
    assert torch.isnan(psis_khat(torch.zeros(1, s, dtype=torch.float64), s)).all()
    assert torch.isnan(psis_khat(torch.randn(1, 20, dtype=torch.float64), 20)).all()  # M = 4
    assert torch.isnan(psis_khat(torch.full((1, s), -math.inf, dtype=torch.float64), s)).all()


def test_khat_threshold() -> None:
    assert khat_threshold(256) == pytest.approx(1 - 1 / math.log10(256))
    assert khat_threshold(256) == pytest.approx(0.585, abs=1e-3)
    assert khat_threshold(2048) == pytest.approx(0.698, abs=1e-3)
    assert khat_threshold(10**6) == 0.7
    assert math.isnan(khat_threshold(1))
