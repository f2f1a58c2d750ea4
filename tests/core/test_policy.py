"""SamplingPolicy: the nucleus equals transformers' warpers; token_stats equals a float64 masked softmax.

References (``tests/conftest.py``): ``hf_keep`` runs transformers' ``TemperatureLogitsWarper`` and
``TopPLogitsWarper`` on float32 scores (what ``generate`` does); ``ref_token_stats`` is a plain
float64 masked log-softmax over that kept set. The nucleus must match *exactly* (booleans);
values match to float64 round-off for float64 logits and to float32 round-off otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _refs import hf_keep, ref_token_stats
from hypothesis import given
from hypothesis import strategies as st

from deltaH.policy import SamplingPolicy

PS = (0.05, 0.3, 0.5, 0.9, 0.95, 0.999)
TAUS = (0.25, 0.7, 1.0, 2.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def assert_rows_close(got: torch.Tensor, want: torch.Tensor, z: torch.Tensor, dtype: torch.dtype) -> None:
    """``|got − want| ≤ ε·(8·a² + V·a)`` per row, ``a = 1 + log V + max|z|``, ε the compute dtype's
    epsilon (float32 for float32/bf16/fp16 logits, float64 for float64), ``z = logits / τ``.

    A loose, implementation-agnostic bound: ``H = lse_S(z) − Σ q·z`` errs by ~ε·a² when ``lse``
    carries a relative error ε·a that scales every ``q``; a sequential (non-pairwise) sum over V
    terms adds up to V·ε·a. With float64 logits this is still ~1e-12, so a wrong kept set or a
    wrong formula cannot hide; float32 precision itself is pinned down by
    ``test_float32_entropy_precision_at_llm_shapes``.
    """
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    a = 1 + math.log(z.shape[-1]) + z.double().abs().amax(-1)
    tol = eps * (8 * a**2 + z.shape[-1] * a)
    err = (got.double() - want.double()).abs()
    bad = (err > tol).nonzero().flatten().tolist()
    assert not bad, f"rows {bad[:5]}: errors {err[bad[:5]].tolist()} > tolerances {tol[bad[:5]].tolist()}"


def _rows(v: int, r: int, g: torch.Generator) -> torch.Tensor:
    """``r`` rows of each kind: Gaussian at many scales (flat → peaked), integer ties, constant rows,
    one-peak rows, and rows with a few equal top tokens.

    Near-flat rows whose distinct logits are closer than float32 probability resolution (scale
    1e-3) are in ``test_nucleus_near_tie_equal_probs_different_logits``."""
    out = []
    for scale in (0.3, 1.0, 3.0, 10.0, 30.0):
        out.append(scale * torch.randn(r, v, generator=g))
    out.append(torch.randint(-3, 4, (r, v), generator=g).float())  # many exact ties
    out.append(torch.zeros(2, v))  # perfectly flat
    peak = torch.zeros(r, v)
    peak[torch.arange(r), torch.randint(0, v, (r,), generator=g)] = torch.linspace(0.5, 12.0, r)
    out.append(peak)
    top_ties = torch.randn(r, v, generator=g)
    top_ties[:, : min(4, v)] = 4.0  # several equal top tokens
    out.append(top_ties)
    return torch.cat(out)


@pytest.mark.parametrize("v", [6, 7, 33, 64, 65, 100, 1000, 4096])
def test_nucleus_matches_hf_warpers(v: int) -> None:
    g = torch.Generator().manual_seed(v)
    logits = _rows(v, 6, g)
    for p in PS:
        for tau in TAUS:
            want = hf_keep(logits, tau, p)
            for prefix in (1, 5, 64):  # a performance knob only: never changes the kept set
                got = SamplingPolicy(tau, p, topk_prefix=prefix).nucleus_mask(logits)
                assert got is not None and got.dtype == torch.bool
                bad = (got != want).any(-1).nonzero().flatten().tolist()
                assert not bad, f"V={v} p={p} τ={tau} prefix={prefix}: rows {bad} differ from HF"


def test_nucleus_matches_hf_warpers_large_vocab() -> None:
    """V = 50,257: long nuclei (flat rows) need the exact sort, short ones take the topk prefix."""
    g = torch.Generator().manual_seed(1)
    v = 50257
    logits = torch.cat([s * torch.randn(3, v, generator=g) for s in (0.05, 1.0, 4.0, 15.0)])
    sizes = []
    for p, tau in ((0.3, 1.0), (0.9, 0.7), (0.95, 1.0), (0.999, 1.5)):
        want = hf_keep(logits, tau, p)
        got = SamplingPolicy(tau, p).nucleus_mask(logits)
        assert torch.equal(got, want), f"p={p} τ={tau}"
        sizes.append(want.sum(-1))
    # The kept sets span from a handful of tokens (prefix path) to most of the vocabulary (sort).
    sizes = torch.cat(sizes)
    assert sizes.min() < 64 and sizes.max() > 16 * 64 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_nucleus_is_decided_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    logits = torch.cat([(s * torch.randn(40, 100, generator=g)).to(dtype) for s in (0.5, 2.0, 8.0)])
    for p in (0.3, 0.9, 0.97):
        for tau in (0.6, 1.0):
            want = hf_keep(logits.float(), tau, p)  # generate: float32 scores, then the warpers
            got = SamplingPolicy(tau, p).nucleus_mask(logits)
            assert torch.equal(got, want), f"{dtype} p={p} τ={tau}"


def test_float64_rows_where_float64_and_float32_rules_disagree() -> None:
    """Near-tied float64 rows: HF's rule in float64 differs from float32; deltaH follows float32."""
    from transformers.generation.logits_process import TopPLogitsWarper

    g = torch.Generator().manual_seed(3)
    base = torch.randint(-2, 3, (300, 8), generator=g).double()
    logits = base + 1e-9 * torch.randn(300, 8, generator=g, dtype=torch.float64)
    p = 0.5
    keep64 = torch.isfinite(TopPLogitsWarper(p)(None, logits.clone()))
    keep32 = hf_keep(logits, 1.0, p)
    differs = (keep64 != keep32).any(-1)
    assert differs.sum() > 10  # the test has power: the two rules really disagree on these rows
    got = SamplingPolicy(1.0, p).nucleus_mask(logits)
    assert torch.equal(got, keep32)


def test_nucleus_near_tie_equal_probs_different_logits() -> None:
    """Logits one float32 ulp apart have the *same* float32 probability; HF sorts by the logit and
    keeps only the larger one when the boundary falls between them (a prefix ordered by
    probability instead of by logit keeps both).

    Row 0/1: a constructed pair (the larger logit second / first). Rows 2+: near-flat Gaussian
    rows (scale 1e-3, V = 4096), which hit the same case by chance."""
    v = 4096
    z = torch.full((2, v), -20.0)
    lo = torch.tensor(0.001)
    hi = torch.nextafter(lo, torch.tensor(1.0))
    z[0, 0], z[0, 1] = lo, hi
    z[1, 0], z[1, 1] = hi, lo
    prob = torch.softmax(z, -1)
    assert prob[0, 0] == prob[0, 1] and z[0, 0] != z[0, 1]
    assert hf_keep(z, 1.0, 0.3)[:, :2].sum(-1).tolist() == [1, 1]
    g = torch.Generator().manual_seed(4096)
    logits = torch.cat([z, 1e-3 * torch.randn(6, v, generator=g)])
    failures = []
    for p, tau, prefix in ((0.3, 1.0, 64), (0.05, 1.0, 1), (0.05, 2.0, 1), (0.05, 2.0, 64)):
        want = hf_keep(logits, tau, p)
        got = SamplingPolicy(tau, p, topk_prefix=prefix).nucleus_mask(logits)
        failures += [(p, tau, prefix, r) for r in (got != want).any(-1).nonzero().flatten().tolist()]
    assert not failures, f"(p, τ, prefix, row) differing from HF: {failures}"


# -- the sort-free selection (deltaH._nucleus) at LLM vocabulary sizes --------------------------------

_V_LLM = 151936  # Qwen2's vocabulary


def _llm_rows(v: int, g: torch.Generator) -> torch.Tensor:
    """Rows of every kind the selection routes differently, at vocabulary ``v``: Zipf-like rows
    (log-prob falling with log rank, plus noise, randomly permuted) from peaked (α = 2.5: nuclei of a
    few tokens) to flat (α = 0.8: nuclei of tens of thousands), Gaussian rows around +20 (LLM logits),
    bf16-rounded rows (exact ties everywhere), rows with −inf entries, rows with a tied top, and
    plateaus (hundreds to thousands of heavy tokens above a light tail: long nuclei, heavy boundary)."""
    ranks = torch.arange(1, v + 1, dtype=torch.float32)
    out = [(-a * ranks.log() + 0.5 * torch.randn(v, generator=g))[torch.randperm(v, generator=g)]
           for a in (0.8, 1.1, 1.5, 2.5)]
    out.append(20.0 + 3.0 * torch.randn(v, generator=g))
    out.append((4.0 * torch.randn(v, generator=g)).bfloat16().float())
    x = (-1.5 * ranks.log())[torch.randperm(v, generator=g)]
    x[torch.randperm(v, generator=g)[: v // 3]] = float("-inf")
    out.append(x)
    x = (-2.0 * ranks.log())[torch.randperm(v, generator=g)]
    x[torch.randperm(v, generator=g)[:3]] = x.max()
    out.append(x)
    for n_top in (min(700, v // 3), v // 50):  # plateaus: nuclei of hundreds to thousands of tokens
        x = -12.0 + torch.randn(v, generator=g)
        x[torch.randperm(v, generator=g)[:n_top]] = 0.5 * torch.randn(n_top, generator=g)
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("v", [50257, _V_LLM])
def test_nucleus_matches_hf_at_llm_vocabularies(v: int) -> None:
    """Peaked rows end in the top-k prefix, longer nuclei in the histogram, flat rows (boundary
    tokens lighter than the margin) and ties in HF's own arithmetic: every kept set is HF's."""
    g = torch.Generator().manual_seed(v)
    logits = _llm_rows(v, g)
    for p in (0.5, 0.9, 0.95, 0.999):
        for tau in (0.7, 1.0):
            want = hf_keep(logits, tau, p)
            got = SamplingPolicy(tau, p).nucleus_mask(logits)
            bad = (got != want).any(-1).nonzero().flatten().tolist()
            assert not bad, f"V={v} p={p} τ={tau}: rows {bad} differ from HF"


def _hf_cumsum(z32: torch.Tensor) -> torch.Tensor:
    """HF's ascending float32 cumulative mass of scores ``[R, V]`` (TopPLogitsWarper's arithmetic)."""
    return torch.sort(z32, descending=False).values.softmax(-1).cumsum(-1)


@pytest.mark.parametrize("v", [7, 300, 4096, _V_LLM])
def test_nucleus_when_the_mass_lands_exactly_on_the_threshold(v: int) -> None:
    """``p = 1 − c`` with ``c`` one of HF's own float32 cumulative masses makes ``1 − p == c``
    exactly, so HF drops that token (``cum ≤ 1 − p``); one float32 ulp below ``c`` it keeps it. Also
    one ulp above. These rows sit inside the margin: they exercise the exact rule (and HF's code for
    ties)."""
    g = torch.Generator().manual_seed(v + 1)
    logits = torch.cat([_llm_rows(v, g)[:5], torch.randn(3, v, generator=g)]) if v > 64 else \
        torch.randn(8, v, generator=g)
    cum = _hf_cumsum(logits)
    failures, on_threshold = [], 0
    for row in range(logits.shape[0]):
        finite = cum[row][torch.isfinite(cum[row]) & (cum[row] > 0) & (cum[row] < 1)]
        picks = finite[torch.linspace(0, finite.numel() - 1, 3).long()] if finite.numel() else finite
        for c in picks.tolist():
            for c32 in (c, float(torch.nextafter(torch.tensor(c), torch.tensor(2.0))),
                        float(torch.nextafter(torch.tensor(c), torch.tensor(-1.0)))):
                p = 1.0 - c32
                if not (0 < p < 1 and float(torch.tensor(1 - p, dtype=torch.float32)) == c32):
                    continue  # 1 − (1 − c) is not c in double for c below ~2^-29
                on_threshold += c32 == c
                x = logits[row : row + 1]
                if not torch.equal(SamplingPolicy(1.0, p).nucleus_mask(x), hf_keep(x, 1.0, p)):
                    failures.append((row, p))
    assert not failures, f"(row, p) differing from HF: {failures[:5]}"
    assert on_threshold >= logits.shape[0]  # the test has power: many cases land exactly on 1 − p


@pytest.mark.parametrize("v", [33, 1000, 50257])
def test_each_rule_alone_matches_hf(v: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row through one rule: the exact rule alone (a margin of 1 certifies nothing), and the
    histogram alone (a one-token prefix decides only one-token nuclei). Both must equal HF."""
    from deltaH import _nucleus

    g = torch.Generator().manual_seed(v + 2)
    logits = torch.cat([_rows(v, 3, g), _llm_rows(v, g)]) if v >= 1000 else _rows(v, 3, g)
    for p, tau in ((0.3, 1.0), (0.9, 0.7), (0.95, 1.3)):
        want = hf_keep(logits, tau, p)
        assert torch.equal(SamplingPolicy(tau, p, topk_prefix=1).nucleus_mask(logits), want)
        with monkeypatch.context() as m:
            m.setattr(_nucleus, "_MARGIN", 1.0)
            assert torch.equal(SamplingPolicy(tau, p).nucleus_mask(logits), want)


def test_group_topk_equals_torch_topk() -> None:
    """The top-k from group maxima returns torch.topk's values (indices may differ only among ties)."""
    from deltaH._nucleus import topk

    g = torch.Generator().manual_seed(9)
    for v in (1000, 4099, 65536):
        z = torch.cat([torch.randn(4, v, generator=g), torch.randint(-3, 4, (4, v), generator=g).float(),
                       _llm_rows(v, g)])
        for k in (1, 7, 16, 64):
            vals, idx = topk(z, k)
            want = torch.topk(z, k).values
            assert torch.equal(vals, want) and torch.equal(z.gather(-1, idx), vals), (v, k)
            rows = torch.tensor([1, 5, 9])
            r_vals, r_idx = topk(z, k, rows)
            assert torch.equal(r_vals, want[rows]) and torch.equal(z[rows].gather(-1, r_idx), r_vals)


def test_fast_stats_equal_their_autograd_twin() -> None:
    """token_stats without autograd (one softmax per row, chunked) equals the differentiable path
    (masked log-sum-exps) to float32 round-off, with the same keys, on rows of every kind."""
    g = torch.Generator().manual_seed(10)
    logits = torch.cat([_llm_rows(4096, g), _rows(4096, 2, g)])
    targets = torch.randint(0, 4096, (logits.shape[0],), generator=g)
    targets[0] = logits[0].argmax()
    for p, tau in ((1.0, 1.0), (0.9, 0.7), (0.95, 1.0), (0.5, 1.3)):
        pol = SamplingPolicy(tau, p)
        lq, en, key = pol.token_stats_keyed(logits, targets)
        lq_g, en_g, key_g = pol.token_stats_keyed(logits.clone().requires_grad_(True), targets)
        assert (key is None) == (p == 1.0) and (key is None or torch.equal(key, key_g))
        assert torch.equal(torch.isneginf(lq), torch.isneginf(lq_g))
        fin = torch.isfinite(lq)
        z = logits / tau
        assert_rows_close(lq[fin], lq_g.detach()[fin], z[fin], torch.float32)
        assert_rows_close(en, en_g.detach(), z, torch.float32)


def test_entropy_with_minus_inf_logits_is_finite() -> None:
    """Logits masked to −inf (banned tokens) contribute 0 to H and log q, also at p = 1 (0·inf)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 500, generator=g, dtype=torch.float64)
    logits[:, ::4] = float("-inf")
    targets = torch.full((6,), 1)
    for p in (1.0, 0.9):
        want_lq, want_h = ref_token_stats(logits, targets, 1.0, p)
        for x in (logits, logits.float(), logits.clone().requires_grad_(True)):
            lq, ent = SamplingPolicy(1.0, p).token_stats(x, targets)
            assert torch.isfinite(ent).all()
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            assert_rows_close(ent.detach(), want_h, logits, dtype)
            fin = torch.isfinite(want_lq)
            assert_rows_close(lq.detach()[fin], want_lq[fin], logits[fin], dtype)


_seed_rows = st.tuples(st.integers(0, 2**31 - 1), st.sampled_from([300, 5000, 20000]),
                       st.floats(0.6, 3.0), st.floats(0.0, 2.0))


@given(spec=_seed_rows, p=st.floats(0.05, 0.999), tau=st.floats(0.3, 2.0))
def test_property_nucleus_equals_hf_on_zipf_rows(spec: tuple[int, int, float, float], p: float,
                                                 tau: float) -> None:
    """Continuous rows (no grid, no ties by construction): Zipf exponent α, noise scale σ, V."""
    seed, v, alpha, sigma = spec
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, v + 1, dtype=torch.float32)
    logits = torch.stack([(-alpha * ranks.log() + sigma * torch.randn(v, generator=g))[
        torch.randperm(v, generator=g)] for _ in range(3)])
    assert torch.equal(SamplingPolicy(tau, p).nucleus_mask(logits), hf_keep(logits, tau, p))


def test_top_p_one_keeps_everything_and_is_log_softmax() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.cat([s * torch.randn(20, 300, generator=g, dtype=torch.float64) for s in (0.1, 3.0, 40.0)])
    targets = torch.randint(0, 300, (60,), generator=g)
    for tau in TAUS:
        pol = SamplingPolicy(tau, 1.0)
        assert pol.nucleus_mask(logits) is None
        logq, ent = pol.token_stats(logits, targets)
        logp = torch.log_softmax(logits / tau, -1)
        z = logits / tau
        assert_rows_close(logq, logp.gather(-1, targets[:, None])[:, 0], z, torch.float64)
        assert_rows_close(ent, -(logp.exp() * logp).sum(-1), z, torch.float64)
        # float32 logits: the statistics of those (rounded) values, in float64; no tail dropped by an
        # early-saturating cumsum
        lq32, en32 = pol.token_stats(logits.float(), targets)
        assert lq32.dtype == torch.float64 and torch.isfinite(lq32).all()
        rlq32, ren32 = ref_token_stats(logits.float(), targets, tau, 1.0)
        assert_rows_close(lq32, rlq32, z, torch.float64)
        assert_rows_close(en32, ren32, z, torch.float64)


# Regression: the statistics of float32 logits must be float64-accurate at LLM shapes (V = 152k, logits
# with a large common offset): true ΔH differences sums of them at θ and θ', and float32 rounding of
# every token's H and log q was the precision floor (deltaH.policy, "Precision"). Sums are cascaded and
# lse − Σ q·z is evaluated on max-shifted logits.


def rounding_bounds(logits: torch.Tensor, tau: float, top_p: float,
                    u: float) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order worst-case error of ``(log q(y), H)`` per row computed with unit round-off ``u``
    from max-shifted logits and cascaded sums, with kept set ``S`` (``n = |S|``), ``z = logits/τ``,
    ``Z = max|z|``:

    * rounding ``z`` (and ``z − max``) moves each ``z_v`` by ``≤ 2u·Z``; since
      ``∂H/∂z_v = −q_v(log q_v + H)``, H moves by ``≤ 2u·Z·Σ q|log q + H| ≤ 2u·Z·σ``
      (Cauchy–Schwarz; ``σ² = Var_q(log q)``);
    * ``torch.sum`` is a cascade of 16-term running sums (log₁₆ n levels): relative error
      ``≤ c·u``, ``c = 4⌈log₂ n⌉``; with exp/log/multiply round-off the normaliser and ``Σ e·(z−m)``
      carry ``≤ (c+5)u``, which moves H by ``≤ (c+5)u·(1 + 2H)`` and ``lse`` by ``≤ (c+5)u + u·log n``.

    So ``|ΔH| ≤ u·(2Zσ + (c+5)(1+2H))`` and ``|Δlog q| ≤ u·(2Z + c + 5 + log n)``. A plain running
    sum instead (torch.log_softmax's normaliser) has ``c ~ n / SIMD lanes``.
    """
    keep = hf_keep(logits, tau, top_p)
    z = logits.double() / tau
    logq = torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
    q = logq.exp()
    h = -torch.where(keep, q * logq, torch.zeros_like(q)).sum(-1)
    sigma = torch.where(keep, q * (logq + h.unsqueeze(-1)) ** 2, torch.zeros_like(q)).sum(-1).sqrt()
    n = keep.sum(-1).double()
    c = 4 * torch.ceil(torch.log2(n))
    zmax = z.abs().amax(-1)
    return u * (2 * zmax + c + 5 + n.log()), u * (2 * zmax * sigma + (c + 5) * (1 + 2 * h))


def extended_token_stats(logits: torch.Tensor, targets: torch.Tensor, tau: float,
                         top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log q(y), H)`` over HF's kept set in numpy's extended precision (x87 80-bit on x86: 11 more
    bits than float64), so that its own round-off is far below float64's; ``ref_token_stats`` uses
    ``torch.log_softmax``, whose sequential normaliser errs by more than the float64 bound at V = 152k."""
    keep = hf_keep(logits, tau, top_p).numpy()
    z = logits.double().numpy().astype(np.longdouble) / np.longdouble(tau)
    z = np.where(keep, z, -np.inf)
    m = z.max(-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(-1, keepdims=True)
    logp = (z - m) - np.log(s)
    ent = -np.where(keep, np.exp(logp) * np.where(keep, logp, 0), 0).sum(-1)
    lq = np.take_along_axis(logp, targets.numpy()[:, None], -1)[:, 0]
    return torch.from_numpy(lq.astype(np.float64)), torch.from_numpy(ent.astype(np.float64))


@pytest.mark.skipif(np.finfo(np.longdouble).nmant < 60,
                    reason="numpy's longdouble is not extended precision on this platform")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_statistics_of_low_precision_logits_are_float64_accurate(dtype: torch.dtype) -> None:
    """LLM logits sit around +20 with a spread of a few units, over V up to 151,936 (Qwen2). The
    statistics of float32 (and bf16) logits must be those of the logits' exact values within the bound
    of ``rounding_bounds`` at float64's ``u = 2⁻⁵³`` (about 1e-14 here), on every CPU kernel set. The
    same math in float32 (this project's earlier code) used 1-14% of the bound at float32's
    ``u = 2⁻²⁴``, i.e. ~1e7 times the float64 bound: per-token errors of ~1e-6 nats, which summed
    over a response's tokens made the precision floor of ΔH."""
    g = torch.Generator().manual_seed(8)
    cases = [25.0 + 3.0 * torch.randn(100, 1000, generator=g),
             20.0 + 0.3 * torch.randn(2, 151936, generator=g),
             20.0 + 3.0 * torch.randn(2, 151936, generator=g)]
    errors = []
    for logits in cases:
        logits = logits.to(dtype)
        targets = torch.zeros(logits.shape[0], dtype=torch.long)
        for p in (1.0, 0.9):
            lq, ent = SamplingPolicy(0.7, p).token_stats(logits, targets)
            rlq, ren = extended_token_stats(logits, targets, 0.7, p)
            lq_bound, h_bound = rounding_bounds(logits, 0.7, p, 2.0**-53)
            inside = torch.isfinite(rlq)
            for what, err, bound in (("H", (ent.double() - ren).abs(), h_bound),
                                     ("log q", (lq.double() - rlq)[inside].abs(), lq_bound[inside])):
                if (err > bound).any():
                    errors.append((logits.shape[-1], p, what, float((err / bound).max())))
    assert not errors, f"(V, p, quantity, max error / bound) over the bound: {errors}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [6, 100, 2000])
def test_token_stats_match_float64_masked_softmax(dtype: torch.dtype, v: int) -> None:
    g = torch.Generator().manual_seed(v)
    logits = _rows(v, 5, g).to(dtype)
    targets = torch.randint(0, v, (logits.shape[0],), generator=g)
    for p in (0.3, 0.9, 1.0):
        for tau in (0.5, 1.0, 1.7):
            logq, ent = SamplingPolicy(tau, p).token_stats(logits, targets)
            assert logq.dtype == torch.float64 and ent.dtype == torch.float64  # whatever the logits' dtype
            # the reference sees the same values (logits.float() for the low-precision dtypes)
            src = logits if dtype == torch.float64 else logits.float()
            rlq, ren = ref_token_stats(src, targets, tau, p)
            assert torch.equal(torch.isneginf(logq), torch.isneginf(rlq))
            fin = torch.isfinite(rlq)
            assert fin.any()
            z = src / tau
            assert_rows_close(logq[fin], rlq[fin], z[fin], torch.float64)
            assert_rows_close(ent, ren, z, torch.float64)
            assert not torch.isnan(logq).any() and not torch.isnan(ent).any()


def test_logq_is_minus_inf_outside_nucleus_with_finite_gradients_inside() -> None:
    g = torch.Generator().manual_seed(5)
    v, tau, p = 50, 0.8, 0.6
    base = torch.cat([2.0 * torch.randn(30, v, generator=g, dtype=torch.float64),
                      torch.randint(-2, 3, (10, v), generator=g).double()])
    logits = base.clone().requires_grad_(True)
    targets = torch.randint(0, v, (40,), generator=g)
    pol = SamplingPolicy(tau, p)
    keep = hf_keep(base, tau, p)
    inside = keep.gather(-1, targets[:, None])[:, 0]
    assert inside.any() and (~inside).any()

    logq, ent = pol.token_stats(logits, targets)
    assert torch.isneginf(logq[~inside]).all() and torch.isfinite(logq[inside]).all()
    assert torch.isfinite(ent).all()

    # d log q / d logits (all rows, -inf rows included) and d H / d logits: finite, and equal to
    # the closed forms (δ_vy − q_v)/τ and −q_v (log q_v + H)/τ on the kept set, 0 outside it.
    (g_lq,) = torch.autograd.grad(logq, logits, torch.ones_like(logq), retain_graph=True)
    (g_en,) = torch.autograd.grad(ent.sum(), logits)
    assert torch.isfinite(g_lq).all() and torch.isfinite(g_en).all()

    z = (base / tau).masked_fill(~keep, float("-inf"))
    q = torch.softmax(z, -1)
    logq_all = torch.where(keep, torch.log_softmax(z, -1), torch.zeros_like(z))
    h = -(q * logq_all).sum(-1, keepdim=True)
    onehot = torch.nn.functional.one_hot(targets, v).double()
    want_lq = torch.where(inside[:, None] & keep, (onehot - q) / tau, torch.zeros_like(q))
    want_en = torch.where(keep, -q * (logq_all + h) / tau, torch.zeros_like(q))
    torch.testing.assert_close(g_lq, want_lq, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g_en, want_en, atol=1e-12, rtol=1e-10)


def test_gradcheck_inside_nucleus() -> None:
    """Finite differences agree with autograd for rows away from the nucleus boundary."""
    g = torch.Generator().manual_seed(6)
    logits = (3.0 * torch.randn(4, 12, generator=g, dtype=torch.float64)).requires_grad_(True)
    pol = SamplingPolicy(0.9, 0.8)
    keep = pol.nucleus_mask(logits)
    targets = torch.where(keep, logits, torch.tensor(-1e9, dtype=torch.float64)).argmax(-1).detach()

    def f(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return pol.token_stats(x, targets)

    assert torch.autograd.gradcheck(f, (logits,), eps=1e-7, atol=1e-6)


def test_probabilities_sum_to_one_over_the_vocabulary() -> None:
    g = torch.Generator().manual_seed(7)
    v = 300
    logits = torch.cat([s * torch.randn(8, v, generator=g, dtype=torch.float64) for s in (0.2, 2.0, 9.0)])
    for p in (0.2, 0.8, 1.0):
        pol = SamplingPolicy(1.3, p)
        rows = logits.repeat_interleave(v, 0)
        targets = torch.arange(v).repeat(logits.shape[0])
        logq, ent = pol.token_stats(rows, targets)
        q = logq.exp().reshape(-1, v)
        torch.testing.assert_close(q.sum(-1), torch.ones(q.shape[0], dtype=torch.float64), atol=1e-12, rtol=0)
        # RB entropy = −Σ q log q over the support
        h = -(q * torch.where(q > 0, logq.reshape(-1, v), torch.zeros_like(q))).sum(-1)
        torch.testing.assert_close(ent.reshape(-1, v)[:, 0], h, atol=1e-12, rtol=1e-12)


# -- hypothesis: rows on a 1/8 grid (exact ties, never near-ties) -------------------------------------

_grid_rows = st.integers(min_value=2, max_value=80).flatmap(
    lambda v: st.lists(st.lists(st.integers(-40, 40), min_size=v, max_size=v), min_size=1, max_size=6)
)
_p = st.sampled_from([0.01, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99, 1.0]) | st.floats(0.01, 1.0)
_tau = st.floats(0.2, 3.0)


@given(rows=_grid_rows, p=_p, tau=_tau, prefix=st.integers(1, 70))
def test_property_nucleus_equals_hf(rows: list[list[int]], p: float, tau: float, prefix: int) -> None:
    logits = torch.tensor(rows, dtype=torch.float32) / 8
    got = SamplingPolicy(tau, p, topk_prefix=prefix).nucleus_mask(logits)
    want = hf_keep(logits, tau, p)
    if got is None:
        assert p == 1.0
    else:
        assert torch.equal(got, want)


@given(rows=_grid_rows, p=_p, tau=_tau)
def test_property_nucleus_is_the_smallest_top_set_reaching_p(rows: list[list[int]], p: float,
                                                              tau: float) -> None:
    """Independent of HF: the kept set is a top set, holds mass ≥ p, and is minimal (dropping its
    smallest token leaves mass < p) — i.e. the token crossing the threshold is kept (§1.8)."""
    logits = torch.tensor(rows, dtype=torch.float64) / 8
    keep = SamplingPolicy(tau, p).nucleus_mask(logits)
    if keep is None:
        return
    prob = torch.softmax(logits / tau, -1)
    slack = 1e-6  # float32 cumsum vs float64 probabilities
    for k, z, pr in zip(keep, logits, prob, strict=True):
        assert k.any()
        if (~k).any():
            assert z[k].min() >= z[~k].max()
        mass = pr[k].sum()
        assert mass >= p - slack
        if k.sum() > 1:
            assert mass - pr[k].min() < p + slack


@given(rows=_grid_rows, p1=_p, p2=_p, tau=_tau)
def test_property_nucleus_grows_with_p(rows: list[list[int]], p1: float, p2: float, tau: float) -> None:
    lo, hi = sorted((p1, p2))
    logits = torch.tensor(rows, dtype=torch.float32) / 8
    k_lo = SamplingPolicy(tau, lo).nucleus_mask(logits)
    k_hi = SamplingPolicy(tau, hi).nucleus_mask(logits)
    if k_hi is None:
        return
    assert k_lo is not None and not (k_lo & ~k_hi).any()


@given(rows=_grid_rows, p=_p, tau=_tau, seed=st.integers(0, 2**16))
def test_property_token_stats(rows: list[list[int]], p: float, tau: float, seed: int) -> None:
    logits = torch.tensor(rows, dtype=torch.float64) / 8
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=g)
    logq, ent = SamplingPolicy(tau, p).token_stats(logits, targets)
    rlq, ren = ref_token_stats(logits, targets, tau, p)
    assert not torch.isnan(logq).any()
    assert torch.equal(torch.isneginf(logq), torch.isneginf(rlq))
    fin = torch.isfinite(rlq)
    assert_rows_close(logq[fin], rlq[fin], logits[fin] / tau, torch.float64)
    assert_rows_close(ent, ren, logits / tau, torch.float64)
    assert (logq <= 1e-15).all()
    n_kept = hf_keep(logits, tau, p).sum(-1).double()
    assert (ent >= -1e-12).all() and (ent <= torch.log(n_kept) + 1e-12).all()


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.0001}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"topk_prefix": 0}, "topk_prefix"),
    ],
)
def test_sampling_policy_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingPolicy(**kwargs)


def test_sampling_policy_accepts_boundaries() -> None:
    assert SamplingPolicy(temperature=1e-3, top_p=1.0, topk_prefix=1).top_p == 1.0
    assert SamplingPolicy(top_p=1e-9).nucleus_mask(torch.tensor([[0.0, 1.0, 3.0]])).tolist() == [
        [False, False, True]
    ]


@pytest.mark.parametrize("prefix", [1, 4, 64])
def test_nucleus_key_changes_exactly_where_hf_kept_set_changes(prefix: int) -> None:
    """``token_stats_keyed``: keys of θ- and θ'-logits differ exactly in the rows where transformers'
    kept sets differ (checked on rows decided from a prefix and by the sort fallback, V = 500, with
    perturbations that move some boundaries and not others); keys do not depend on the prefix."""
    g = torch.Generator().manual_seed(77)
    logits = torch.cat([s * torch.randn(40, 500, generator=g) for s in (0.3, 2.0, 8.0)])
    targets = torch.randint(0, 500, (120,), generator=g)
    bumped = logits + 0.05 * torch.randn(logits.shape, generator=g)
    for p, tau in ((0.5, 1.0), (0.9, 0.7), (0.95, 1.3)):
        pol = SamplingPolicy(tau, p, topk_prefix=prefix)
        lq, ent, k0 = pol.token_stats_keyed(logits, targets)
        _, _, k1 = pol.token_stats_keyed(bumped, targets)
        assert k0 is not None and k1 is not None and k0.shape == (120, 2) and k0.dtype == torch.int64
        moved_hf = (hf_keep(logits, tau, p) != hf_keep(bumped, tau, p)).any(-1)
        assert torch.equal((k0 != k1).any(-1), moved_hf)
        assert 0 < int(moved_hf.sum()) < 120  # both outcomes occur
        assert torch.equal(k0[:, 0], hf_keep(logits, tau, p).sum(-1))  # first entry: the set size
        plain = pol.token_stats(logits, targets)
        assert torch.equal(lq, plain[0]) and torch.equal(ent, plain[1])
        other = SamplingPolicy(tau, p, topk_prefix=3 * prefix)
        assert torch.equal(k0, other.token_stats_keyed(logits, targets)[2])
    assert SamplingPolicy(1.0, 1.0).token_stats_keyed(logits, targets)[2] is None


# The trainer's log π and the compute dtype: one rule (deltaH.policy) used by the losses, the
# per-sequence gradients, the covariance proxy and the sampler.


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_trainer_logprob_is_the_temperature_log_softmax(dtype: torch.dtype) -> None:
    from deltaH.policy import compute_dtype, trainer_logprob

    g = torch.Generator().manual_seed(11)
    logits = (3 * torch.randn(4, 3, 13, generator=g, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, 13, (4, 3), generator=g)
    keep = torch.rand(4, 3, 13, generator=g) < 0.6
    keep.scatter_(-1, y.unsqueeze(-1), True)  # every target kept
    tau = 0.7
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    assert compute_dtype(dtype) == cd
    plain, masked = trainer_logprob(logits, y, tau), trainer_logprob(logits, y, tau, keep)
    assert plain.shape == y.shape and plain.dtype == cd and masked.dtype == cd
    # Reference: float64 Python sums over the (kept) vocabulary of the same (upcast) logits.
    z = logits.double() / tau
    cells = torch.cartesian_prod(torch.arange(4), torch.arange(3)).tolist()
    for (i, j), t in zip(cells, y.flatten().tolist(), strict=True):
        row = z[i, j].tolist()
        lse = math.log(sum(math.exp(v) for v in row))
        lse_s = math.log(sum(math.exp(v) for v, k in zip(row, keep[i, j].tolist(), strict=True) if k))
        # float64: rounding only (|log π| < 30); float32: the log-softmax's own float32 rounding,
        # a few ulp of the largest |z| (~12 here).
        tol = 1e-12 if cd == torch.float64 else 1e-5
        assert abs(float(plain[i, j]) - (row[t] - lse)) < tol
        assert abs(float(masked[i, j]) - (row[t] - lse_s)) < tol
