"""Shared prompts: each prompt once per teacher-forcing chunk, its keys and values reused by the rows
that share it, equal to the plain forward.

The reference is the plain computation (``share_prompts="off"``: one causal forward of every
compacted row), which the rest of the suite checks against HF, TRL and autograd loops. The tiny
models run float64 end to end (conftest: no float32 islands), so the two paths differ only in the
order of float64 sums: the shared path's attention rows carry the other rows' masked prompt slots
(weight exactly 0 after ``exp`` of ``finfo.min``) and its products are blocked differently. Each
result is a short chain of such sums (two layers, D ≤ 32, L ≤ 16 keys, the head and the SNIS sums):
relative error ≲ (D + L)·eps per product, times a chain factor < 100 → ``REL = 1e-12`` of the
largest magnitude of the compared field. Any real sharing bug (a row given another group's keys,
a padded prompt slot left visible, a position off by one) changes results by O(1) of their scale;
``test_a_wrong_mask_is_seen`` checks the comparison sees one.
"""

from __future__ import annotations

import pytest
import torch
from conftest import _float64_end_to_end, build_batch, sample_responses, tiny_llama, tiny_qwen2, with_lora
from hypothesis import given
from hypothesis import strategies as st

import deltaH as dh
from deltaH.batch import SequenceBatch, compact, share_plan
from deltaH.errors import ArgumentError, ConfigError
from deltaH.stats import chunk_token_stats, chunks_of, share_mode

pytestmark = pytest.mark.usefixtures("one_thread")

REL = 1e-12
TAU, TOP_P, K, EOS = 0.8, 0.9, 4, 2


def close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> None:
    """Equal within ``rel`` of the largest finite magnitude; non-finite entries (log q = −inf where a
    shifted nucleus drops a token) equal exactly."""
    fin = torch.isfinite(a)
    assert torch.equal(fin, torch.isfinite(b)) and torch.equal(a[~fin], b[~fin])
    a, b = a[fin], b[fin]
    if not a.numel():
        return
    scale = max(float(a.abs().max()), float(b.abs().max()), 1e-300)
    assert float((a - b).abs().max()) <= rel * scale, float((a - b).abs().max()) / scale


def grouped_rows(model: torch.nn.Module, g: torch.Generator, n_prompts: int = 3, group: int = 3,
                 singles: int = 1) -> list[tuple[list[int], list[int]]]:
    """``n_prompts`` prompts of different lengths with ``group`` responses each sampled from q
    (adjacent, as E is sampled), then ``singles`` rows whose prompt appears once."""
    prompts = []
    for p in range(n_prompts + singles):
        prompt = torch.randint(3, 32, (2 + p,), generator=g).tolist()
        prompts += [prompt] * (group if p < n_prompts else 1)
    return sample_responses(model, prompts, TAU, TOP_P, 5, EOS, g)


MODELS = {
    "qwen2": lambda: tiny_qwen2(seed=11),
    "llama_tied": lambda: tiny_llama(tie=True, seed=12),
    "qwen2_lora": lambda: with_lora(tiny_qwen2(seed=13)),
    "qwen2_sdpa": lambda: tiny_qwen2(attn="sdpa", seed=14),
}
_LM: dict[str, dh.FunctionalLM] = {}


def lm_of(which: str) -> dh.FunctionalLM:
    if which not in _LM:
        _LM[which] = dh.FunctionalLM.from_model(MODELS[which]())
    return _LM[which]


def batch_of(side: str, seed: int = 0, which: str = "qwen2", **kw: int) -> SequenceBatch:
    g = torch.Generator().manual_seed(seed)
    return build_batch(grouped_rows(lm_of(which).model, g, **kw), side=side, pad=1, generator=g)


def dirs_of(lm: dh.FunctionalLM, k: int = K, scale: float = 0.05, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn((k, *p.shape), generator=g, dtype=p.dtype) for n, p in lm.params.items()}


# -- the plan ---------------------------------------------------------------------------------
def test_plan_finds_groups_from_the_data() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 9, 9], [5, 6, 8, 8, 8], [5, 6, 7, 8, 3]])
    resp = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]).bool()
    b = SequenceBatch(ids, torch.ones_like(resp) & ~torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
                                                                   [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).bool(),
                      resp)
    plan = compact(b, "on").share
    assert plan is not None and plan.n_groups == 2
    assert plan.prompt_len.tolist() == [3, 3, 2, 3]
    assert plan.group[0] == plan.group[1] == plan.group[3] != plan.group[2]
    # row 2's prompt [5, 6] is a prefix of the others' but a different prompt: its own group, and
    # its keep mask hides the third prompt slot
    assert plan.keep[2, 0, :, 2].logical_not().all() and plan.keep[0, 0, :, 2].all()
    assert compact(b).share is None  # off: the plain path
    assert compact(b.select([0, 2]), "on").share is None  # no prompt repeats: nothing to share


def test_auto_shares_only_where_it_saves() -> None:
    # two rows, a long prompt each but different lengths' suffixes: g·Lp + n·Ls vs n·L
    long_p = list(range(3, 13))
    rows = [(long_p, [3, 4]), (long_p, [5, 6, 7])]
    b = build_batch(rows, side="right")
    assert compact(b, "auto").share is not None  # 10 + 2·3 = 16 ≤ 0.9 · 2·13
    rows = [([3], [4] * 10), ([3], [5] * 9)]  # a one-token prompt: 1 + 2·10 = 21 > 0.9 · 2·11
    b = build_batch(rows, side="right")
    assert compact(b, "auto").share is None and compact(b, "on").share is not None


def test_share_mode_resolves_per_model() -> None:
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=4, max_window_layers=0)
    cfg._attn_implementation = "eager"
    sliding = dh.FunctionalLM.from_model(transformers.Qwen2ForCausalLM(cfg).double().eval())
    assert "sliding_attention" in sliding.share_unsupported
    assert share_mode(sliding, "auto") == "off"
    with pytest.raises(ArgumentError, match="share_prompts='on'.*sliding_attention"):
        share_mode(sliding, "on")
    with pytest.raises(ArgumentError, match="share_prompts must be one of"):
        share_mode(lm_of("qwen2"), "yes")
    for which in MODELS:
        assert lm_of(which).share_unsupported == ""
        assert share_mode(lm_of(which), "on") == "on"


def test_config_key() -> None:
    from deltaH.config import load_config

    assert load_config(None, []).compute.share_prompts == "auto"
    # YAML 1.1 reads unquoted on/off as booleans: they still mean on/off
    for text, want in (("off", "off"), ("on", "on"), ("'on'", "on"), ("auto", "auto")):
        assert load_config(None, [f"compute.share_prompts={text}"]).compute.share_prompts == want
    msg = "compute.share_prompts': got 'sometimes'; expected one of: auto, on, off"
    with pytest.raises(ConfigError, match=msg):
        load_config(None, ["compute.share_prompts=sometimes"])


def test_sharing_runs_fewer_tokens() -> None:
    """The saving is real: the embedding sees g·Lp + n·Ls tokens instead of n·L."""
    lm = lm_of("qwen2")
    b = batch_of("right", group=4, singles=0)
    seen: list[int] = []
    emb = lm.model.get_input_embeddings()
    hook = emb.register_forward_hook(lambda m, i, o: seen.append(int(i[0].numel())))
    try:
        for mode in ("off", "on"):
            c = compact(b, mode)
            with torch.no_grad():
                lm.hidden(lm.params, c)
        plan = compact(b, "on").share
        assert plan is not None
        n, length = compact(b).ids.shape
        # the plain pass; then the prompt pass and the suffix pass
        assert seen == [n * length, plan.prompt_ids.numel(), plan.suffix_ids.numel()]
        assert seen[1] + seen[2] < seen[0]
    finally:
        hook.remove()


# -- hidden states and token statistics ----------------------------------------------------------
@pytest.mark.parametrize("which", list(MODELS))
@pytest.mark.parametrize("side", ["left", "right", "mixed"])
def test_hidden_states_equal(which: str, side: str) -> None:
    lm = lm_of(which)
    b = batch_of(side, seed=len(side), which=which)
    c0, c1 = compact(b), compact(b, "on")
    assert c1.share is not None and c1.share.n_groups == 4  # three prompts of different lengths + one single
    with torch.no_grad():
        h0 = lm.backbone(lm.params, c0.ids, c0.position_ids)[c0.rows, c0.pred_pos]
        h1 = lm.hidden(lm.params, c1)[c1.rows, c1.pred_pos]
    close(h0, h1)


@pytest.mark.parametrize("which", ["qwen2_lora", "llama_tied"])
@pytest.mark.parametrize("k", [1, K])
def test_token_stats_loop_and_vmap(which: str, k: int) -> None:
    """chunk_token_stats: θ itself, one direction (the plain loop call) and K directions under vmap."""
    lm = lm_of(which)
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("mixed", seed=3, which=which)
    c0, c1 = compact(b), compact(b, "on")
    shifted = {n: lm.params[n] + 0.05 * d for n, d in dirs_of(lm, k).items()}
    with torch.no_grad():
        for sh in (None, shifted):
            a = chunk_token_stats(lm, lm.params, sh, c0, pol, keyed=True)
            z = chunk_token_stats(lm, lm.params, sh, c1, pol, keyed=True)
            close(a[0], z[0])
            close(a[1], z[1])
            assert a[2] is not None and z[2] is not None and torch.equal(a[2], z[2])


def test_a_wrong_mask_is_seen() -> None:
    """The comparison can fail: letting rows see their group's padded prompt slots changes h."""
    lm = lm_of("qwen2")
    b = batch_of("right", seed=4)
    c0, c1 = compact(b), compact(b, "on")
    assert c1.share is not None
    import dataclasses

    bad = dataclasses.replace(c1.share, keep=torch.ones_like(c1.share.keep))
    bad_group = dataclasses.replace(c1.share, group=c1.share.group.roll(1))
    with torch.no_grad():
        h0 = lm.backbone(lm.params, c0.ids, c0.position_ids)[c0.rows, c0.pred_pos]
        for plan in (bad, bad_group):
            h = lm.hidden(lm.params, dataclasses.replace(c1, share=plan))[c1.rows, c1.pred_pos]
            assert float((h - h0).abs().max()) > 1e-3 * float(h0.abs().max())


def test_no_shared_prompt_is_the_plain_path_bit_for_bit() -> None:
    lm = lm_of("qwen2_lora")
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("left", seed=6, which="qwen2_lora", n_prompts=0, singles=4)  # four different prompts
    dirs = dirs_of(lm)
    kw = {"lm": lm, "policy": pol, "eta": 0.05, "dir_chunk": 2}
    assert all(c.share is None for c in chunks_of(b, 16, "on"))
    off = dh.delta_h_true_multi(lm.params, dirs, b, share_prompts="off", **kw)
    on = dh.delta_h_true_multi(lm.params, dirs, b, share_prompts="on", **kw)
    assert torch.equal(off.delta_h, on.delta_h) and torch.equal(off.per_sequence, on.per_sequence)


# -- through the public API ------------------------------------------------------------------------
TRUE_FIELDS = ("delta_h", "per_sequence", "ess", "h_upd", "nucleus_changed", "retained_mass")


@pytest.mark.parametrize("which", ["qwen2_lora", "llama_tied"])
@pytest.mark.parametrize("tf_batch_size", [16, 4])  # 16: one chunk; 4: groups of 3 split across chunks
def test_true_delta_h(which: str, tf_batch_size: int) -> None:
    lm = lm_of(which)
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("mixed", seed=7, which=which)
    if tf_batch_size == 4:
        plans = [c.share for c in chunks_of(b, 4, "on")]
        assert sum(p is not None for p in plans) >= 2  # split groups still share within each chunk
    dirs = dirs_of(lm)
    for dc in (1, K):  # the loop path and vmap over K directions
        kw = {"lm": lm, "policy": pol, "eta": [0.02, 0.1], "dir_chunk": dc, "tf_batch_size": tf_batch_size}
        off = dh.delta_h_true_multi(lm.params, dirs, b, share_prompts="off", **kw)
        on = dh.delta_h_true_multi(lm.params, dirs, b, share_prompts="on", **kw)
        for f in TRUE_FIELDS:
            close(getattr(off, f), getattr(on, f))
        close(off.h_orig, on.h_orig)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_first_order(mode: str) -> None:
    lm = lm_of("qwen2_lora")
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("left", seed=8, which="qwen2_lora")
    dirs = dirs_of(lm)
    kw = {"lm": lm, "policy": pol, "eta": 1.0, "mode": mode, "per_sequence": True, "tf_batch_size": 5,
          "second_order": mode == "forward"}
    off = dh.delta_h_first_order(lm.params, dirs, b, share_prompts="off", **kw)
    on = dh.delta_h_first_order(lm.params, dirs, b, share_prompts="on", **kw)
    for f in ("delta_h", "per_sequence", "stderr", "loo") + (("second_order",) if mode == "forward" else ()):
        close(getattr(off, f), getattr(on, f))


def test_reverse_through_a_differentiated_head() -> None:
    """The tied Llama differentiates its embedding = head: reverse mode runs autograd end to end."""
    lm = lm_of("llama_tied")
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("right", seed=9, which="llama_tied")
    kw = {"lm": lm, "policy": pol}
    off = dh.entropy_gradient(lm.params, b, share_prompts="off", **kw)
    on = dh.entropy_gradient(lm.params, b, share_prompts="on", **kw)
    for n in off:
        close(off[n], on[n])


@pytest.mark.parametrize("kind", ["true", "first_order"])
def test_influence_matrix(kind: str) -> None:
    lm = lm_of("qwen2_lora")
    pol = dh.SamplingPolicy(TAU, TOP_P)
    b = batch_of("mixed", seed=10, which="qwen2_lora")
    comps = dirs_of(lm, k=3, scale=0.1, seed=6)
    kw = {"lm": lm, "policy": pol, "eta": 0.05, "kind": kind, "tf_batch_size": 6}
    off = dh.influence_matrix(lm.params, comps, b, share_prompts="off", **kw)
    on = dh.influence_matrix(lm.params, comps, b, share_prompts="on", **kw)
    close(off.matrix, on.matrix)
    close(off.column_delta_h, on.column_delta_h)


def test_token_influence_jvp() -> None:
    from types import SimpleNamespace

    from deltaH.estimators.token_influence import token_influence

    lm = lm_of("qwen2_lora")
    b = batch_of("left", seed=12, which="qwen2_lora")
    g = torch.Generator().manual_seed(1)
    x = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in lm.params.items()}
    pre = {n: torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in lm.params.items()}
    ud = SimpleNamespace(precond=pre, clip_coef=0.5)  # the two fields token_influence reads
    w = torch.rand(len(b), int(b.n_tokens.max()), generator=g, dtype=torch.float64)
    w = w * (torch.arange(w.shape[1]) < b.n_tokens.unsqueeze(1))
    off = token_influence(lm, lm.params, b, x, ud, w, temperature=TAU, share_prompts="off")
    on = token_influence(lm, lm.params, b, x, ud, w, temperature=TAU, share_prompts="on")
    for f in ("inner", "logp", "entropy"):
        close(getattr(off, f), getattr(on, f))


# -- random group layouts ----------------------------------------------------------------------------
@given(
    layout=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4)), min_size=1, max_size=4),
    side=st.sampled_from(["left", "right", "mixed"]),
    tf=st.integers(2, 8),
    seed=st.integers(0, 2**16),
)
def test_random_layouts(layout: list[tuple[int, int]], side: str, tf: int, seed: int) -> None:
    """Prompts of random lengths, groups of random sizes, any padding and chunk size: the per-sequence
    log q and entropy at θ and along two directions (vmap) equal the plain path's."""
    lm = lm_of("qwen2")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for plen, size in layout:
        prompt = torch.randint(3, 32, (plen,), generator=g).tolist()
        rows += [(prompt, torch.randint(3, 32, (int(torch.randint(1, 5, (1,), generator=g)),),
                                        generator=g).tolist()) for _ in range(size)]
    b = build_batch(rows, side=side, pad=1, generator=g)
    pol = dh.SamplingPolicy(TAU, 1.0)
    shifted = {n: lm.params[n] + 0.05 * d for n, d in dirs_of(lm, 2, seed=seed).items()}
    from deltaH.stats import stats_of_chunks

    with torch.no_grad():
        for sh in (None, shifted):
            a = stats_of_chunks(lm, lm.params, sh, chunks_of(b, tf, "off"), pol)
            z = stats_of_chunks(lm, lm.params, sh, chunks_of(b, tf, "on"), pol)
            close(a[0], z[0])
            close(a[1], z[1])


def test_share_plan_is_none_without_repeats_property() -> None:
    """share_plan on a compacted chunk of distinct prompts is None whatever ``always`` says."""
    b = batch_of("right", seed=13, n_prompts=0, singles=5)
    c = compact(b)
    lengths = torch.tensor([int(x) for x in b.attention_mask.sum(1)])
    resp = torch.zeros_like(c.ids, dtype=torch.bool)
    resp[c.rows, c.pred_pos + 1] = True
    assert share_plan(c.ids, resp, lengths, always=True) is None


def _long_prompt_short_response_rows() -> SequenceBatch:
    """Two 20-token prompts with 5-token responses, two 2-token prompts with 25-token responses: the
    longest suffix (25) starts at 2 in one row and at 20 in the other."""
    rows = [([3] * 20, [1, 2, 3, 4, 5]), ([3] * 20, [5, 4, 3, 2, 1]), ([7, 8], list(range(1, 26))),
            ([7, 8], list(range(2, 27)))]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(4, width, dtype=torch.long)
    am = torch.zeros_like(ids, dtype=torch.bool)
    rm = am.clone()
    for i, (p, r) in enumerate(rows):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        am[i, : len(p) + len(r)] = True
        rm[i, len(p) : len(p) + len(r)] = True
    return SequenceBatch(ids, am, rm)


def _llama(max_pos: int, rope: dict | None = None) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    kw = {} if rope is None else {"rope_parameters": rope}
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, **kw)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).double().eval()
    if rope is None:
        _float64_end_to_end(model)  # no float32 islands: the two paths differ by float64 sums only
    return model


def test_positions_stay_within_the_plain_forwards() -> None:
    """A row's suffix slots past its end keep positions < L (the plain forward's range): with learned
    or length-dependent position embeddings a larger position would change or break the real tokens."""
    c = compact(_long_prompt_short_response_rows(), share="on")
    assert c.share is not None and int(c.share.suffix_pos.max()) == c.ids.shape[1] - 1
    lm = dh.FunctionalLM.from_model(_llama(c.ids.shape[1]))  # no position beyond max_position_embeddings
    assert lm.share_unsupported == ""
    with torch.no_grad():
        close(lm.hidden(lm.params, c)[c.rows, c.pred_pos], lm.backbone(lm.params, c.ids, c.position_ids)[
            c.rows, c.pred_pos])


def test_length_dependent_rope_is_not_shared() -> None:
    """Dynamic-NTK RoPE rescales its frequencies by the longest position of a call: the prompt pass
    alone would be rotated differently from the whole rows, so such models do not share."""
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    lm = dh.FunctionalLM.from_model(_llama(16, rope))
    assert "sequence length" in lm.share_unsupported
    with pytest.raises(ArgumentError):
        share_mode(lm, "on")
    assert share_mode(lm, "auto") == "off"


def test_compact_refuses_an_unknown_mode() -> None:
    with pytest.raises(ArgumentError, match="share_prompts"):
        compact(_long_prompt_short_response_rows(), share="yes")
