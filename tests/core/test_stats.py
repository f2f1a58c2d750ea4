"""sequence_stats against a plain per-row loop; invariances; SequenceBatch and FunctionalLM errors.

The slow twin is ``conftest.ref_sequence_stats``: ``model(row).logits`` on every *unpadded* row
(no masks, no position ids, no functional_call), transformers' warpers for the nucleus and a
float64 masked softmax. Models are float64 end to end (conftest replaces HF's float32 RMSNorm,
rotary and softmax islands), so the conftest's central ``ATOL/RTOL`` (1e-9 / 1e-7) hold with a wide
margin on every CPU kernel set (observed gaps are ~1e-15).
"""

from __future__ import annotations

import copy

import pytest
import torch
from _refs import ref_sequence_stats
from conftest import ATOL, RTOL, build_batch, sample_responses, tiny_llama, tiny_qwen2, with_lora
from hypothesis import given
from hypothesis import strategies as st

import deltaH as dh

EOS = 3
# (τ, p, topk_prefix): plain softmax; top-p through HF's sort (V = 32 < prefix); top-p through
# the topk-prefix fast path (prefix 2 < V).
POLICIES = [(1.0, 1.0, 64), (0.7, 0.9, 64), (1.3, 0.8, 2)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _prompts(g: torch.Generator, n: int, vocab: int = 32) -> list[list[int]]:
    lens = torch.randint(1, 5, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (k,), generator=g).tolist() for k in lens]


def _sampled_rows(model: torch.nn.Module, pol: tuple, n: int = 7, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return sample_responses(model, _prompts(g, n), pol[0], pol[1], 5, EOS, g)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _check_against_loop(model: torch.nn.Module, lm: dh.FunctionalLM, params: dict, batch: dh.SequenceBatch,
                        pol: tuple) -> dh.SequenceStats:
    policy = dh.SamplingPolicy(pol[0], pol[1], topk_prefix=pol[2])
    got = dh.sequence_stats(lm, params, batch, policy=policy)
    lq, en = ref_sequence_stats(model, batch.input_ids, batch.attention_mask, batch.response_mask,
                                pol[0], pol[1])
    assert got.logq.dtype == got.entropy.dtype == got.surprisal.dtype == torch.float64
    assert torch.equal(torch.isneginf(got.logq), torch.isneginf(lq))
    fin = torch.isfinite(lq)
    _close(got.logq[fin], lq[fin])
    _close(got.entropy, en)
    assert torch.equal(got.surprisal, -got.logq)
    assert torch.equal(got.n_tokens, batch.response_mask.sum(1))
    return got


MODELS = {
    "qwen2": lambda: tiny_qwen2(),
    "llama_tied": lambda: tiny_llama(tie=True),
    "qwen2_lora": lambda: with_lora(tiny_qwen2()),
}


@pytest.mark.parametrize("pol", POLICIES, ids=["p1", "top_p_sort", "top_p_prefix"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_per_row_loop(name: str, pol: tuple) -> None:
    model = MODELS[name]()
    lm = dh.FunctionalLM.from_model(model)
    g = torch.Generator().manual_seed(1)
    batch = build_batch(_sampled_rows(model, pol), side="mixed", pad=5, generator=g)
    got = _check_against_loop(model, lm, lm.params, batch, pol)
    assert torch.isfinite(got.logq).all()  # sampled from q: every token is inside the nucleus


def test_out_of_nucleus_rows_are_minus_inf_like_the_loop(qwen2) -> None:
    """Sampled rows plus random rows under p = 0.5: the random ones leave the nucleus."""
    lm = dh.FunctionalLM.from_model(qwen2)
    g = torch.Generator().manual_seed(2)
    pol = (1.0, 0.5, 4)
    rows = [(p, torch.randint(0, 32, (3,), generator=g).tolist()) for p in _prompts(g, 4)]
    rows += _sampled_rows(qwen2, pol, n=4, seed=2)
    got = _check_against_loop(qwen2, lm, lm.params, build_batch(rows, side="left"), pol)
    assert torch.isneginf(got.logq).any() and torch.isfinite(got.logq).any()
    assert not torch.isnan(got.entropy).any() and torch.isfinite(got.entropy).all()


@pytest.mark.parametrize("name", list(MODELS))
def test_params_are_used_functionally(name: str) -> None:
    """θ + δ through functional_call equals a copied model with θ + δ written into it (a tied
    embedding moves the LM head too; LoRA factors act through peft's scaling)."""
    model = MODELS[name]()
    lm = dh.FunctionalLM.from_model(model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    delta = {n: 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in lm.params.items()}
    shifted = {n: lm.params[n] + delta[n] for n in lm.params}
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n in delta:
                p.add_(delta[n])
    pol = (0.8, 0.95, 4)
    batch = build_batch(_sampled_rows(ref, pol, seed=4), side="right")
    got = _check_against_loop(ref, lm, shifted, batch, pol)
    # ... and differs from θ itself (the shift is not silently ignored)
    at_theta = dh.sequence_stats(lm, lm.params, batch, policy=dh.SamplingPolicy(*pol))
    assert (at_theta.entropy - got.entropy).abs().max() > 1e-3
    # nothing was mutated
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_trainable_names(qwen2_lora, llama_tied) -> None:
    lm = dh.FunctionalLM.from_model(qwen2_lora)
    want = {n for n, p in qwen2_lora.named_parameters() if p.requires_grad}
    assert set(lm.params) == want and all("lora_" in n for n in want)
    lt = dh.FunctionalLM.from_model(llama_tied)
    assert "lm_head.weight" not in lt.params
    assert lt.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert lt.vocab_size == 32


# -- invariances ------------------------------------------------------------------------------------

_INV = {}


def _inv_setup() -> tuple:
    """One model, policy and sampled rows shared by the hypothesis examples (built once)."""
    if not _INV:
        model = tiny_qwen2(seed=5)
        pol = (0.9, 0.85, 3)
        rows = _sampled_rows(model, pol, n=9, seed=6)
        lm = dh.FunctionalLM.from_model(model)
        policy = dh.SamplingPolicy(*pol)
        batch = build_batch(rows, side="right")
        ref = dh.sequence_stats(lm, lm.params, batch, policy=policy, tf_batch_size=16)
        _INV.update(model=model, rows=rows, lm=lm, policy=policy, ref=ref)
    return _INV["rows"], _INV["lm"], _INV["policy"], _INV["ref"]


@given(
    perm=st.permutations(range(9)),
    tf_batch_size=st.integers(1, 10),
    head_chunk=st.none() | st.integers(1, 9),
    side=st.sampled_from(["left", "right", "mixed"]),
    pad=st.integers(0, 31),
    extra=st.integers(0, 3),
    seed=st.integers(0, 1000),
)
def test_invariances(perm: list[int], tf_batch_size: int, head_chunk: int | None, side: str, pad: int,
                     extra: int, seed: int) -> None:
    """Row order, chunk sizes, padding side/amount and the pad token never change a result."""
    rows, lm, policy, ref = _inv_setup()
    batch = build_batch([rows[i] for i in perm], side=side, pad=pad, extra=extra,
                        generator=torch.Generator().manual_seed(seed))
    got = dh.sequence_stats(lm, lm.params, batch, policy=policy, tf_batch_size=tf_batch_size,
                            head_chunk=head_chunk)
    idx = torch.tensor(perm)
    _close(got.logq, ref.logq[idx])
    _close(got.entropy, ref.entropy[idx])
    assert torch.equal(got.n_tokens, ref.n_tokens[idx])


def test_integer_masks_and_int32_ids_equal_bool_masks(qwen2) -> None:
    lm = dh.FunctionalLM.from_model(qwen2)
    b = build_batch(_sampled_rows(qwen2, (1.0, 1.0, 64)), side="left")
    b2 = dh.SequenceBatch(b.input_ids.int(), b.attention_mask.long(), b.response_mask.to(torch.uint8))
    assert b2.attention_mask.dtype == b2.response_mask.dtype == torch.bool
    assert b2.input_ids.dtype == torch.int64
    pol = dh.SamplingPolicy()
    s1, s2 = dh.sequence_stats(lm, lm.params, b, policy=pol), dh.sequence_stats(lm, lm.params, b2, policy=pol)
    assert torch.equal(s1.logq, s2.logq) and torch.equal(s1.entropy, s2.entropy)


def test_eager_and_sdpa_agree() -> None:
    """Same weights; SDPA's math kernel vs eager attention, both float64: the logits differ by
    float64 round-off only (observed ~1e-15), so the central tolerances apply."""
    eager, sdpa = tiny_qwen2(attn="eager", seed=7), tiny_qwen2(attn="sdpa", seed=7)
    pol = (0.9, 0.9, 4)
    g = torch.Generator().manual_seed(0)
    batch = build_batch(_sampled_rows(eager, pol, seed=8), side="mixed", generator=g)
    policy = dh.SamplingPolicy(*pol)
    le, ls = dh.FunctionalLM.from_model(eager), dh.FunctionalLM.from_model(sdpa)
    se = dh.sequence_stats(le, le.params, batch, policy=policy)
    ss = dh.sequence_stats(ls, ls.params, batch, policy=policy)
    torch.testing.assert_close(se.logq, ss.logq, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(se.entropy, ss.entropy, atol=ATOL, rtol=RTOL)
    # the SDPA path is itself exact against its own per-row loop
    _check_against_loop(sdpa, ls, ls.params, batch, pol)


def test_generate_samples_have_finite_logq_equal_to_generate_scores(qwen2) -> None:
    """§1.1: sequences from ``model.generate(do_sample=True, temperature, top_p)`` are inside the
    nucleus, and log q equals log_softmax of generate's own processed (warped) float32 scores."""
    tau, p = 0.7, 0.8
    torch.manual_seed(9)
    prompts = torch.randint(4, 32, (12, 3))
    out = qwen2.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                         temperature=tau, top_p=p, top_k=0, max_new_tokens=5, eos_token_id=EOS,
                         pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    seq = out.sequences
    gen = seq[:, 3:]
    done_before = torch.cumsum((gen == EOS).long(), 1) - (gen == EOS).long() > 0  # after the first EOS
    resp = torch.cat([torch.zeros_like(prompts, dtype=torch.bool), ~done_before], 1)
    am = torch.cat([torch.ones_like(prompts, dtype=torch.bool), ~done_before], 1)
    batch = dh.SequenceBatch(seq, am, resp)
    lm = dh.FunctionalLM.from_model(qwen2)
    got = dh.sequence_stats(lm, lm.params, batch, policy=dh.SamplingPolicy(tau, p))
    assert torch.isfinite(got.logq).all()
    scores = torch.stack(out.scores, 1).double()  # [N, new, V], -inf outside the nucleus
    tok = torch.log_softmax(scores, -1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
    want = torch.where(~done_before, tok, torch.zeros_like(tok)).sum(1)
    torch.testing.assert_close(got.logq, want, atol=1e-5, rtol=1e-5)  # generate's scores are float32


# -- SequenceBatch validation ------------------------------------------------------------------------


def _good() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[0, 5, 6, 7, 8], [9, 10, 11, 12, 0]])
    am = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rm = torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.bool)
    return ids, am, rm


def _bad(kind: str) -> tuple:
    ids, am, rm = _good()
    if kind == "not_tensor":
        return ids.tolist(), am, rm
    if kind == "not_2d":
        return ids[0], am[0], rm[0]
    if kind == "float_ids":
        return ids.float(), am, rm
    if kind == "shape":
        return ids, am[:, :4], rm
    if kind == "empty":
        return ids[:0], am[:0], rm[:0]
    if kind == "mask_values":
        return ids, am.long() * 2, rm
    if kind == "response_not_attended":
        rm = rm.clone()
        rm[0, 0] = True
        return ids, am, rm
    if kind == "no_response":
        rm = rm.clone()
        rm[1] = False
        return ids, am, rm
    if kind == "response_first":
        rm = rm.clone()
        rm[1, 0] = True
        return ids, am, rm
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, exc, match",
    [
        ("not_tensor", TypeError, "input_ids must be a torch.Tensor"),
        ("not_2d", ValueError, r"must be 2-D \[N, T\]"),
        ("float_ids", TypeError, "input_ids must be an integer tensor"),
        ("shape", ValueError, "must have the same shape"),
        ("empty", ValueError, "empty"),
        ("mask_values", ValueError, "attention_mask must be boolean or 0/1"),
        ("response_not_attended", ValueError,
         r"response_mask marks tokens that attention_mask excludes \(rows \[0\]"),
        ("no_response", ValueError, r"rows \[1\] have no response token"),
        ("response_first", ValueError, r"rows \[1\] start with a response token"),
    ],
)
def test_sequence_batch_validation(kind: str, exc: type, match: str) -> None:
    dh.SequenceBatch(*_good())  # the unmodified batch is fine
    with pytest.raises(exc, match=match):
        dh.SequenceBatch(*_bad(kind))


def test_sequence_batch_helpers() -> None:
    b = dh.SequenceBatch(*_good())
    assert len(b) == 2 and b.n_tokens.tolist() == [2, 2]
    s = b.select([1])
    assert torch.equal(s.input_ids, b.input_ids[1:]) and torch.equal(s.response_mask, b.response_mask[1:])


# -- FunctionalLM / boundary errors ------------------------------------------------------------------


def _batch() -> dh.SequenceBatch:
    return dh.SequenceBatch(*_good())


def test_unknown_parameter_name(qwen2) -> None:
    lm = dh.FunctionalLM.from_model(qwen2)
    w = lm.params["model.layers.0.self_attn.q_proj.weight"]
    wrong_layer = {**lm.params, "model.layers.9.self_attn.q_proj.weight": w}
    with pytest.raises(KeyError, match=r"layers.9.self_attn.q_proj.weight'\] is not a trainable parameter.*"
                       r"did you mean \['model.layers.0.self_attn.q_proj.weight'"):
        dh.sequence_stats(lm, wrong_layer, _batch(), policy=dh.SamplingPolicy())
    typo = {**lm.params, "model.layers.0.self_attn.q_projj.weight": w}
    with pytest.raises(KeyError, match=r"q_projj.weight'\] is not a trainable parameter.*names look like"):
        dh.sequence_stats(lm, typo, _batch(), policy=dh.SamplingPolicy())


def test_frozen_parameter_name_is_not_trainable(qwen2_lora) -> None:
    lm = dh.FunctionalLM.from_model(qwen2_lora)
    frozen = next(n for n, p in qwen2_lora.named_parameters() if not p.requires_grad)
    with pytest.raises(KeyError, match="is not a trainable parameter"):
        dh.sequence_stats(lm, {frozen: dict(qwen2_lora.named_parameters())[frozen].detach()}, _batch(),
                          policy=dh.SamplingPolicy())


def test_tied_alias_name(llama_tied) -> None:
    lm = dh.FunctionalLM.from_model(llama_tied)
    w = lm.params["model.embed_tokens.weight"]
    with pytest.raises(ValueError, match=r"'lm_head.weight'\] is tied to 'model.embed_tokens.weight'"):
        dh.sequence_stats(lm, {**lm.params, "lm_head.weight": w + 1}, _batch(), policy=dh.SamplingPolicy())


def test_wrong_shape(qwen2) -> None:
    lm = dh.FunctionalLM.from_model(qwen2)
    name = "model.norm.weight"
    bad = {**lm.params, name: torch.ones(7, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"'model.norm.weight'\] has shape \(7,\); the parameter has shape "
                                         r"\(32,\)"):
        dh.sequence_stats(lm, bad, _batch(), policy=dh.SamplingPolicy())


def test_training_mode_is_refused() -> None:
    model = tiny_qwen2().train()
    with pytest.raises(ValueError, match="training mode.*model.eval"):
        dh.FunctionalLM.from_model(model)


def test_merged_and_disabled_adapters_are_refused(qwen2_lora) -> None:
    qwen2_lora.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        dh.FunctionalLM.from_model(qwen2_lora)
    qwen2_lora.unmerge_adapter()
    dh.FunctionalLM.from_model(qwen2_lora)  # fine again
    with qwen2_lora.disable_adapter(), pytest.raises(ValueError, match="is disabled"):
        dh.FunctionalLM.from_model(qwen2_lora)


def test_other_construction_errors() -> None:
    with pytest.raises(TypeError, match="expects a torch.nn.Module"):
        dh.FunctionalLM.from_model("Qwen/Qwen2-0.5B")  # type: ignore[arg-type]
    frozen = tiny_qwen2().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        dh.FunctionalLM.from_model(frozen)
    flex = tiny_qwen2()
    flex.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'flex_attention' cannot run under torch.func"):
        dh.FunctionalLM.from_model(flex)


def test_chunk_size_errors(qwen2) -> None:
    lm = dh.FunctionalLM.from_model(qwen2)
    with pytest.raises(ValueError, match="tf_batch_size must be >= 1"):
        dh.sequence_stats(lm, lm.params, _batch(), policy=dh.SamplingPolicy(), tf_batch_size=0)
    with pytest.raises(ValueError, match="head_chunk must be >= 1"):
        dh.sequence_stats(lm, lm.params, _batch(), policy=dh.SamplingPolicy(), head_chunk=0)


def test_compact_per_sequence_sums_each_rows_scored_tokens() -> None:
    """Compact.per_sequence is the token → sequence scatter every estimator uses: compare it with
    a loop over the scored positions (integer-valued floats, so every sum is exact)."""
    from deltaH.batch import compact

    c = compact(_batch())
    p = int(c.rows.numel())
    tok = torch.arange(2 * p, dtype=torch.float32).reshape(2, p) - p
    want = torch.zeros(2, c.n, dtype=torch.float64)
    for k in range(2):
        for j, r in enumerate(c.rows.tolist()):
            want[k, r] += float(tok[k, j])
    got = c.per_sequence(tok)
    assert got.dtype == torch.float64 and torch.equal(got, want)
    kept = c.per_sequence(tok[0], dtype=None)
    assert kept.dtype == torch.float32 and torch.equal(kept.double(), want[0])
    leaf = tok[0].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(c.per_sequence(leaf).sum(), leaf)
    assert torch.equal(grad, torch.ones_like(leaf))


def test_sequence_stats_pick_is_the_entropy_mode_rule() -> None:
    st = dh.SequenceStats(logq=torch.tensor([-2.0]), entropy=torch.tensor([1.5]),
                          surprisal=torch.tensor([2.0]), n_tokens=torch.tensor([3]))
    assert st.e("rb") is st.entropy and st.e("naive") is st.surprisal
    a, b = torch.tensor([0.25]), torch.tensor([-0.5])
    assert dh.SequenceStats.pick(b, -a, "rb") is b
    assert torch.equal(dh.SequenceStats.pick(b, -a, "naive"), -a)
