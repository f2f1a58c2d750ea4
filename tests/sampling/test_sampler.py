"""``deltaH.sampling.sampler.sample`` against exact enumeration, ``generate`` and its own contract."""

from __future__ import annotations

import copy
import math
from collections import Counter
from statistics import NormalDist

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2, with_lora
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

import deltaH as dh
from deltaH.sampling.sampler import pack, sample

V, EOS, PAD = 6, 5, 0
PROMPTS = [[1, 2, 3, 4], [2]]  # different lengths: padding is exercised
POLICIES = [dh.SamplingPolicy(1.0, 1.0), dh.SamplingPolicy(0.7, 0.8)]
ALPHA = 1e-3  # significance of the goodness-of-fit tests (fixed seeds: deterministic anyway)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _q(logits: torch.Tensor, policy: dh.SamplingPolicy) -> torch.Tensor:
    """Exact ``q`` ``[R, V]`` float64 from logits ``[R, V]``: kept set from HF's own warpers (float32)."""
    dummy = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    s32 = TemperatureLogitsWarper(policy.temperature)(dummy, logits.float())
    if policy.top_p < 1:
        s32 = TopPLogitsWarper(top_p=policy.top_p, min_tokens_to_keep=1)(dummy, s32)
    z = (logits.double() / policy.temperature).masked_fill(~torch.isfinite(s32), -math.inf)
    return torch.softmax(z, dim=-1)


def _enumerate(model: torch.nn.Module, prompt: list[int], policy: dh.SamplingPolicy, steps: int) -> dict:
    """Every response of at most ``steps`` tokens (stopping at EOS) with its exact probability,
    from full unpadded forwards of every prefix."""
    out: dict[tuple[int, ...], float] = {}
    frontier: list[tuple[tuple[int, ...], float]] = [((), 1.0)]
    for depth in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + list(r) for r, _ in frontier])).logits[:, -1]
        nxt = []
        for (resp, pr), row in zip(frontier, _q(logits, policy), strict=True):
            for v in range(V):
                if row[v] > 0:
                    item = (resp + (v,), pr * float(row[v]))
                    (out.__setitem__(*item) if v == EOS or depth == steps - 1 else nxt.append(item))
        frontier = nxt
    return out


def _responses(batch: dh.SequenceBatch) -> list[tuple[int, ...]]:
    return [tuple(r[m].tolist()) for r, m in zip(batch.input_ids, batch.response_mask, strict=True)]


def _chi2_quantile(df: int, alpha: float) -> float:
    """Upper ``alpha`` quantile of χ²(df), Wilson–Hilferty approximation."""
    z = NormalDist().inv_cdf(1 - alpha)
    a = 2 / (9 * df)
    return df * (1 - a + z * math.sqrt(a)) ** 3


def _chi2(counts: Counter, probs: dict, n: int) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom; cells with expected count < 5 are pooled."""
    assert set(counts) <= set(probs), f"sampled responses with zero probability: {set(counts) - set(probs)}"
    assert abs(sum(probs.values()) - 1) < 1e-9
    stat, cells, pool_e, pool_o = 0.0, 0, 0.0, 0
    for resp, p in probs.items():
        e, o = n * p, counts.get(resp, 0)
        if e < 5:
            pool_e, pool_o = pool_e + e, pool_o + o
        else:
            stat, cells = stat + (o - e) ** 2 / e, cells + 1
    if pool_e > 0:
        stat, cells = stat + (pool_o - pool_e) ** 2 / pool_e, cells + 1
    return stat, cells - 1


@pytest.fixture(scope="module")
def model6() -> torch.nn.Module:
    return tiny_qwen2(vocab=V, seed=3)


@pytest.mark.parametrize("policy", POLICIES, ids=["t1-p1", "t0.7-p0.8"])
def test_frequencies_match_exact_enumeration(model6: torch.nn.Module, policy: dh.SamplingPolicy) -> None:
    steps, n_per = 3, 2000
    lm = dh.FunctionalLM.from_model(model6)
    batch = sample(lm, lm.params, PROMPTS, policy=policy, max_new_tokens=steps, n_per_prompt=n_per,
                   eos_token_id=EOS, pad_token_id=PAD, generator=_gen(11), batch_size=1500)
    resp = _responses(batch)
    stat, df = 0.0, 0
    for i, prompt in enumerate(PROMPTS):
        exact = _enumerate(model6, prompt, policy, steps)
        s, d = _chi2(Counter(resp[i * n_per : (i + 1) * n_per]), exact, n_per)
        stat, df = stat + s, df + d
    assert df >= 10
    assert stat < _chi2_quantile(df, ALPHA), (stat, df)


def _assert_inverse_cdf(ref_model: torch.nn.Module, batch: dh.SequenceBatch, prompts: list[list[int]],
                        n_per: int, steps: int, policy: dh.SamplingPolicy, seed: int) -> None:
    """Contract of the sampler's docstring: row r, step t inverts q's CDF at u = rand([N, T])[r, t]."""
    u = torch.rand(len(batch), steps, generator=_gen(seed), dtype=torch.float64)
    for r, got in enumerate(_responses(batch)):
        prompt = prompts[r // n_per]
        with torch.no_grad():  # logits of every prefix prompt + got[:t], one unpadded forward
            logits = ref_model(input_ids=torch.tensor([prompt + list(got)])).logits[0, len(prompt) - 1 :]
        cdf = _q(logits, policy).cumsum(-1)  # [len(got), V]
        want = [int((cdf[t] <= u[r, t] * cdf[t, -1]).sum()) for t in range(len(got))]
        assert list(got) == want, (r, got, want)
        assert got[-1] == EOS or len(got) == steps


@pytest.mark.parametrize("policy", POLICIES, ids=["t1-p1", "t0.7-p0.8"])
def test_draws_are_inverse_cdf_of_reference(model6: torch.nn.Module, policy: dh.SamplingPolicy) -> None:
    """Exact draws, also at parameters other than the module's own."""
    steps, n_per = 3, 24
    lm = dh.FunctionalLM.from_model(model6)
    g = _gen(5)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in lm.params.items()}
    ref_model = copy.deepcopy(model6)
    ref_model.load_state_dict(params, strict=False)
    batch = sample(lm, params, PROMPTS, policy=policy, max_new_tokens=steps, n_per_prompt=n_per,
                   eos_token_id=EOS, pad_token_id=PAD, generator=_gen(7), batch_size=7)
    _assert_inverse_cdf(ref_model, batch, PROMPTS, n_per, steps, policy, seed=7)


def test_sliding_window_model() -> None:
    """A window of 3 cache columns: the sampler never pads such models (a padded gap would shrink
    the window, and fully masked pad queries give NaN in float64)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                      use_sliding_window=True, sliding_window=3, max_window_layers=0)
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).double().eval()
    assert "sliding_attention" in cfg.layer_types
    lm = dh.FunctionalLM.from_model(model)
    prompts, steps, n_per = [[1, 2, 3, 4, 1], [2], [3, 3]], 5, 12
    batch = sample(lm, lm.params, prompts, policy=POLICIES[1], max_new_tokens=steps, n_per_prompt=n_per,
                   eos_token_id=EOS, pad_token_id=PAD, generator=_gen(3), batch_size=5)
    _assert_inverse_cdf(model, batch, prompts, n_per, steps, POLICIES[1], seed=3)


@pytest.mark.parametrize("policy", POLICIES, ids=["t1-p1", "t0.7-p0.8"])
def test_sampled_sequences_have_finite_logq(model6: torch.nn.Module, policy: dh.SamplingPolicy) -> None:
    lm = dh.FunctionalLM.from_model(model6)
    batch = sample(lm, lm.params, PROMPTS, policy=policy, max_new_tokens=4, n_per_prompt=64,
                   eos_token_id=EOS, pad_token_id=PAD, generator=_gen(2))
    st = dh.sequence_stats(lm, lm.params, batch, policy=policy)
    assert torch.isfinite(st.logq).all() and torch.isfinite(st.entropy).all()
    # log q of each response equals the exact enumeration's probability.
    exact = [_enumerate(model6, p, policy, 4) for p in PROMPTS]
    want = torch.tensor([math.log(exact[i // 64][r]) for i, r in enumerate(_responses(batch))],
                        dtype=torch.float64)
    torch.testing.assert_close(st.logq, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_sequences_have_finite_logq(attn: str) -> None:
    """``model.generate`` output (left-padded prompts, float32 model) gets finite log q from deltaH."""
    model = tiny_qwen2(vocab=32, dtype=torch.float32, attn=attn, seed=4)
    lm = dh.FunctionalLM.from_model(model)
    eos, pad, n_new = 7, 0, 8
    prompts = [[3, 9, 12, 4, 30], [5], [17, 2, 8]]
    p_len = max(map(len, prompts))
    ids = torch.tensor([[pad] * (p_len - len(p)) + p for p in prompts]).repeat_interleave(16, 0)
    pmask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts]).repeat_interleave(16, 0)
    for policy in POLICIES:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            out = model.generate(input_ids=ids, attention_mask=pmask, do_sample=True,
                                 temperature=policy.temperature, top_p=policy.top_p, top_k=0,
                                 max_new_tokens=n_new, pad_token_id=pad, eos_token_id=eos)
        gen = out[:, p_len:]
        is_eos = (gen == eos).int()
        before_eos = (is_eos.cumsum(1) - is_eos) == 0  # up to and including the first EOS
        am = torch.cat([pmask.bool(), before_eos], dim=1)
        rm = torch.cat([torch.zeros_like(pmask, dtype=torch.bool), before_eos], dim=1)
        batch = dh.SequenceBatch(out, am, rm)
        st = dh.sequence_stats(lm, lm.params, batch, policy=policy, tf_batch_size=16)
        assert torch.isfinite(st.logq).all(), st.logq


def test_determinism_and_batch_size_invariance() -> None:
    model = with_lora(tiny_llama(vocab=16))
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(0.9, 0.9)
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    kw = dict(policy=pol, max_new_tokens=6, n_per_prompt=5, eos_token_id=[0, 15], pad_token_id=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ref = sample(lm, lm.params, prompts, generator=_gen(0), **kw)
    for bs in (None, 1, 7):
        b = sample(lm, lm.params, prompts, generator=_gen(0), batch_size=bs, **kw)
        for name in ("input_ids", "attention_mask", "response_mask"):
            assert torch.equal(getattr(b, name), getattr(ref, name)), (bs, name)
    other = sample(lm, lm.params, prompts, generator=_gen(1), **kw)
    assert not torch.equal(other.input_ids, ref.input_ids)
    # Row r depends only on its prompt and u[r]: the first prompt's rows are unchanged alone.
    alone = sample(lm, lm.params, prompts[:1], generator=_gen(0), **kw)
    assert _responses(alone) == _responses(ref)[:5]
    # Pure: no parameter, buffer or global RNG state changed.
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_layout_prompt_major_and_eos(model6: torch.nn.Module) -> None:
    lm = dh.FunctionalLM.from_model(model6)
    prompts = [[1, 2, 3], [4], [2, 2]]
    b = sample(lm, lm.params, prompts, policy=POLICIES[0], max_new_tokens=5, n_per_prompt=3,
               eos_token_id=[EOS, 4], pad_token_id=PAD, generator=_gen(3), batch_size=4)
    assert len(b) == 9
    p_len = 3
    for r in range(9):
        p = prompts[r // 3]
        prompt_part = b.input_ids[r, :p_len][b.attention_mask[r, :p_len]].tolist()
        assert prompt_part == p and not b.response_mask[r, :p_len].any()
        assert b.attention_mask[r, : p_len - len(p)].sum() == 0  # left-padded prompt
        resp, am = b.input_ids[r, p_len:], b.attention_mask[r, p_len:]
        k = int(b.response_mask[r].sum())
        assert torch.equal(b.response_mask[r, p_len:], am) and am[:k].all() and not am[k:].any()
        assert (resp[k:] == PAD).all()
        ends = [i for i, t in enumerate(resp[:k].tolist()) if t in (EOS, 4)]
        if ends:  # finished at its first EOS
            assert ends == [k - 1]
        else:  # ran to max_new_tokens
            assert k == 5
    assert b.input_ids.shape[1] == p_len + int(b.response_mask.sum(1).max())  # trimmed


def test_stops_when_all_rows_finish(model6: torch.nn.Module) -> None:
    lm = dh.FunctionalLM.from_model(model6)
    b = sample(lm, lm.params, PROMPTS, policy=POLICIES[1], max_new_tokens=50, n_per_prompt=4,
               eos_token_id=list(range(V)), pad_token_id=PAD, generator=_gen(0))
    assert b.input_ids.shape == (8, 5) and b.response_mask[:, -1].all() and b.n_tokens.eq(1).all()


def test_pack_cuts_after_first_eos() -> None:
    b = pack([[1, 2], [3]], [[4, 5, 6], [6, 5]], pad_token_id=0, eos_token_id=5)
    assert b.input_ids.tolist() == [[1, 2, 4, 5], [0, 3, 6, 5]]
    assert b.attention_mask.tolist() == [[True] * 4, [False, True, True, True]]
    assert b.response_mask.tolist() == [[False, False, True, True], [False, False, True, True]]


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        (dict(prompt_ids=[]), ValueError, "prompt_ids is empty"),
        (dict(prompt_ids=[[1], []]), ValueError, r"prompt_ids\[1\] is empty"),
        (dict(prompt_ids=[[1, V]]), ValueError, r"prompt_ids\[0\].*outside the vocabulary"),
        (dict(prompt_ids=[[-1]]), ValueError, r"prompt_ids\[0\].*outside the vocabulary"),
        (dict(prompt_ids=[[1.5]]), TypeError, r"prompt_ids\[0\]"),
        (dict(prompt_ids="abc"), TypeError, "prompt_ids"),
        (dict(n_per_prompt=0), ValueError, "n_per_prompt"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(batch_size=0), ValueError, "batch_size"),
        (dict(eos_token_id=V), ValueError, "eos_token_id"),
        (dict(eos_token_id=[]), ValueError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(generator=0), TypeError, "generator"),
        (dict(params={"nope": torch.zeros(1)}), KeyError, "nope"),
    ],
)
def test_validation(model6: torch.nn.Module, kwargs: dict, err: type, match: str) -> None:
    lm = dh.FunctionalLM.from_model(model6)
    args = dict(params=lm.params, prompt_ids=[[1, 2]], policy=POLICIES[0], max_new_tokens=2, n_per_prompt=2,
                eos_token_id=EOS, pad_token_id=PAD, generator=_gen(0))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        sample(lm, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "peft-lora"])
def test_kv_cache_uses_the_supported_transformers_api(model6: torch.nn.Module, lora: bool) -> None:
    """No ``past_key_values`` deprecation from transformers while sampling (plain and peft models).

    The suite ignores FutureWarning (pyproject) and transformers' ``warning_once`` goes to its own
    non-propagating logger, so both channels are recorded here explicitly, with the once-cache cleared.
    """
    import logging
    import warnings

    from transformers.utils import logging as hf_logging

    model = with_lora(copy.deepcopy(model6)) if lora else model6
    lm = dh.FunctionalLM.from_model(model)
    hf_logging.warning_once.cache_clear()
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    hf_root = logging.getLogger("transformers")
    hf_root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            batch = sample(lm, lm.params, PROMPTS, policy=POLICIES[1], max_new_tokens=4, n_per_prompt=2,
                           eos_token_id=EOS, pad_token_id=PAD, generator=_gen(0))
    finally:
        hf_root.removeHandler(handler)
    assert len(batch) == 4
    texts = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    stale = [t for t in texts if "past_key_values" in t or "cache_params" in t]
    assert not stale, stale


def test_cache_keyword_follows_the_model_signature() -> None:
    """Older transformers (no ``cache`` keyword yet) keep getting ``past_key_values``."""
    from deltaH.functional import _cache_kwarg

    class Old(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, past_key_values: object = None) -> None: ...

    class New(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor, cache: object = None) -> None: ...

    assert _cache_kwarg(Old()) == "past_key_values"
    assert _cache_kwarg(New()) == "cache"
