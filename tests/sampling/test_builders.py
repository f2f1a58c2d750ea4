"""E/U batch builders: prompt draws, GRPO advantages, degenerate-group re-draws, provenance."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from conftest import tiny_qwen2
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import deltaH as dh
from deltaH.sampling.builders import (
    EvalBatch,
    UpdateBatch,
    build_eval_batch,
    build_update_batch,
    grpo_advantages,
)
from deltaH.sampling.data import PromptRecord

STD_EPS = 1e-4  # TRL: A / (std + 1e-4)
POLICY = dh.SamplingPolicy(temperature=1.0, top_p=0.95)
CHARS = "0123456789+= "


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in code: <pad>=0, <eos>=1, <unk>=2, then CHARS (V = 16)."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    special = dict(eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return _char_tokenizer()


@pytest.fixture(scope="module")
def lm() -> dh.FunctionalLM:
    return dh.FunctionalLM.from_model(tiny_qwen2(vocab=16, seed=2))


def _records() -> list[PromptRecord]:
    prompts = ["1+2=", "3+4=", "10+7=", "9=", "2+2+2="]
    return [PromptRecord(id=f"r{i}", prompt=p, answer=None, raw={"q": p}) for i, p in enumerate(prompts)]


def _length_reward(completions: list[str], records: list[PromptRecord]) -> list[float]:
    return [float(len(c)) for c in completions]


def _responses_ids(batch: dh.SequenceBatch) -> list[list[int]]:
    return [r[m].tolist() for r, m in zip(batch.input_ids, batch.response_mask, strict=True)]


def _check_provenance(
    b: EvalBatch | UpdateBatch, recs: list[PromptRecord], tok: PreTrainedTokenizerFast
) -> None:
    g = b.group_size
    assert b.group.tolist() == [k // g for k in range(len(b))]
    for i in range(len(b)):
        rec = recs[int(b.prompt_index[i])]
        assert b.record_ids[i] == rec.id and b.prompts[i] == rec.prompt
        assert int(b.prompt_index[i]) == int(b.prompt_index[(i // g) * g])  # one prompt per group
        prompt_tokens = b.batch.input_ids[i][b.batch.attention_mask[i] & ~b.batch.response_mask[i]]
        assert prompt_tokens.tolist() == tok.encode(rec.prompt, add_special_tokens=False)
    assert b.responses == tok.batch_decode(_responses_ids(b.batch), skip_special_tokens=True)
    json.dumps(b.rows())  # JSON-ready


# -- advantages --------------------------------------------------------------------------------
def test_grpo_advantages_three_modes() -> None:
    r = torch.tensor([1.0, 0.0, 0.5, 2.0, 3.0, 3.0, 3.0, 1.0, 0.0, 4.0, 0.0, 0.0])
    G = 4
    groups = [r[k : k + G].tolist() for k in range(0, len(r), G)]
    want_none = [x - statistics.fmean(gr) for gr in groups for x in gr]
    want_group = [(x - statistics.fmean(gr)) / (statistics.stdev(gr) + STD_EPS) for gr in groups for x in gr]
    batch_std = statistics.stdev(r.tolist())
    want_batch = [(x - statistics.fmean(gr)) / (batch_std + STD_EPS) for gr in groups for x in gr]
    for mode, want in (("none", want_none), ("group", want_group), ("batch", want_batch)):
        got = grpo_advantages(r, G, mode)  # type: ignore[arg-type]
        assert got.dtype == torch.float32 and got.shape == r.shape
        want_t = torch.tensor(want, dtype=torch.float64)
        torch.testing.assert_close(got.double(), want_t, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_advantages(r, G, "std")  # type: ignore[arg-type]


# -- E ---------------------------------------------------------------------------------------
def test_eval_batch_draws_with_replacement(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    recs = _records()
    e = build_eval_batch(lm, lm.params, recs, tok, policy=POLICY, total_sequences=48, group_size=4,
                         max_new_tokens=5, seed=3, batch_size=20)
    assert len(e) == 48 and e.seed == 3 and e.group_size == 4 and e.max_new_tokens == 5
    drawn = e.prompt_index[::4].tolist()
    assert len(drawn) == 12 and len(set(drawn)) < len(drawn)  # 12 draws from 5 records repeat
    _check_provenance(e, recs, tok)
    st = dh.sequence_stats(lm, lm.params, e.batch, policy=POLICY)
    assert torch.isfinite(st.logq).all()
    # Deterministic by seed; another seed gives another batch.
    e2 = build_eval_batch(lm, lm.params, recs, tok, policy=POLICY, total_sequences=48, group_size=4,
                          max_new_tokens=5, seed=3)
    assert torch.equal(e2.batch.input_ids, e.batch.input_ids) and e2.responses == e.responses
    assert torch.equal(e2.prompt_index, e.prompt_index)
    e3 = build_eval_batch(lm, lm.params, recs, tok, policy=POLICY, total_sequences=48, group_size=4,
                          max_new_tokens=5, seed=4)
    assert e3.responses != e.responses


def test_eval_batch_errors(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    kw = dict(policy=POLICY, max_new_tokens=3, seed=0)
    with pytest.raises(ValueError, match="total_sequences=10 is not a multiple of group_size=4"):
        build_eval_batch(lm, lm.params, _records(), tok, total_sequences=10, group_size=4, **kw)
    with pytest.raises(ValueError, match="records is empty"):
        build_eval_batch(lm, lm.params, [], tok, total_sequences=4, group_size=4, **kw)
    with pytest.raises(ValueError, match="group_size"):
        build_eval_batch(lm, lm.params, _records(), tok, total_sequences=4, group_size=0, **kw)
    empty = [PromptRecord(id="blank", prompt="", answer=None, raw={})]
    with pytest.raises(ValueError, match="'blank'.*no tokens"):
        build_eval_batch(lm, lm.params, empty, tok, total_sequences=4, group_size=4, **kw)


def test_eval_batch_defaults_are_the_plain_recipe(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    """At its defaults E is what it always was: one generator seeded with ``seed``, ``randint`` prompt
    draws, then one ``sample`` call (written out here); the new options spelled at their defaults
    change nothing."""
    recs = _records()
    kw = dict(policy=POLICY, total_sequences=24, group_size=4, max_new_tokens=5, seed=9)
    g = torch.Generator().manual_seed(9)
    draws = torch.randint(len(recs), (6,), generator=g).tolist()
    ids = [tok.encode(recs[i].prompt, add_special_tokens=False) for i in draws]
    want = dh.sample(lm, lm.params, ids, policy=POLICY, max_new_tokens=5, n_per_prompt=4, eos_token_id=1,
                     pad_token_id=0, generator=g)
    for e in (build_eval_batch(lm, lm.params, recs, tok, **kw),  # type: ignore[arg-type]
              build_eval_batch(lm, lm.params, recs, tok, prompts="replacement", update_prompts_of=None,
                               **kw)):  # type: ignore[arg-type]
        for a, b in ((e.batch.input_ids, want.input_ids), (e.batch.attention_mask, want.attention_mask),
                     (e.batch.response_mask, want.response_mask)):
            assert torch.equal(a, b)
        assert e.prompt_index.tolist() == [i for i in draws for _ in range(4)] and e.update_prompt is None
        assert all("update_prompt" not in d for d in e.rows())  # batches/eval.jsonl unchanged too


def test_eval_batch_distinct_prompts(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    recs = _records()
    kw = dict(policy=POLICY, group_size=2, max_new_tokens=4)
    for seed in range(6):
        e = build_eval_batch(lm, lm.params, recs, tok, total_sequences=10, seed=seed, prompts="distinct",
                             **kw)  # type: ignore[arg-type]
        assert sorted(e.prompt_index[::2].tolist()) == [0, 1, 2, 3, 4]  # 5 groups: every record once
        _check_provenance(e, recs, tok)
    e = build_eval_batch(lm, lm.params, recs, tok, total_sequences=6, seed=0, prompts="distinct",
                         **kw)  # type: ignore[arg-type]
    assert len(set(e.prompt_index[::2].tolist())) == 3
    with pytest.raises(ValueError, match=r"6 distinct prompts .* 5 records.*eval_batch.prompts"):
        build_eval_batch(lm, lm.params, recs, tok, total_sequences=12, seed=0, prompts="distinct",
                         **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prompts must be one of"):
        build_eval_batch(lm, lm.params, recs, tok, total_sequences=4, seed=0, prompts="unique",
                         **kw)  # type: ignore[arg-type]


def test_eval_batch_with_the_update_prompts(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    """E's own rows are unchanged; then group_size fresh draws from q for each of U's prompts."""
    recs = _records()
    u = build_update_batch(lm, lm.params, recs, tok, _length_reward, policy=POLICY, n_prompts=3, group_size=4,
                           max_new_tokens=6, seed=1)
    kw = dict(policy=POLICY, total_sequences=8, group_size=2, max_new_tokens=6, seed=4)
    plain = build_eval_batch(lm, lm.params, recs, tok, **kw)  # type: ignore[arg-type]
    e = build_eval_batch(lm, lm.params, recs, tok, update_prompts_of=u, **kw)  # type: ignore[arg-type]
    assert len(e) == 8 + 3 * 2 and e.update_prompt is not None
    assert e.update_prompt.tolist() == [False] * 8 + [True] * 6
    _check_provenance(e, recs, tok)
    own = [(p, r) for p, r in zip(_prompt_ids(plain.batch), _responses_ids(plain.batch), strict=True)]
    assert list(zip(_prompt_ids(e.batch), _responses_ids(e.batch), strict=True))[:8] == own
    assert e.responses[:8] == plain.responses and torch.equal(e.prompt_index[:8], plain.prompt_index)
    assert e.prompt_index[8:].tolist() == [i for i in u.prompt_index[::4].tolist() for _ in range(2)]
    assert [d["update_prompt"] for d in e.rows()] == e.update_prompt.tolist()
    st = dh.sequence_stats(lm, lm.params, e.batch, policy=POLICY)
    assert torch.isfinite(st.logq).all()  # the new rows are draws from q (top-p): inside every nucleus
    # Same-prompt rows are fresh draws, not U's rows: with these seeds some response differs.
    assert set(e.responses[8:]) != set(u.responses)


def _prompt_ids(batch: dh.SequenceBatch) -> list[list[int]]:
    return [r[a & ~m].tolist() for r, a, m in
            zip(batch.input_ids, batch.attention_mask, batch.response_mask, strict=True)]


# -- U ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_update_batch(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast, scale: str) -> None:
    recs = _records()
    u = build_update_batch(lm, lm.params, recs, tok, _length_reward, policy=POLICY, n_prompts=4, group_size=6,
                           max_new_tokens=6, seed=1, scale_rewards=scale)  # type: ignore[arg-type]
    assert len(u) == 24 and u.scale_rewards == scale and u.seed == 1
    assert len(set(u.prompt_index[::6].tolist())) == 4  # distinct prompts
    _check_provenance(u, recs, tok)
    torch.testing.assert_close(u.rewards, torch.tensor([float(len(t)) for t in u.responses]))
    torch.testing.assert_close(u.advantages, grpo_advantages(u.rewards, 6, scale))  # type: ignore[arg-type]
    assert all(set(d) >= {"reward", "advantage", "record_id", "response"} for d in u.rows())
    u2 = build_update_batch(lm, lm.params, recs, tok, _length_reward, policy=POLICY, n_prompts=4,
                            group_size=6, max_new_tokens=6, seed=1, scale_rewards=scale)  # type: ignore[arg-type]
    assert torch.equal(u2.batch.input_ids, u.batch.input_ids) and torch.equal(u2.advantages, u.advantages)


def test_update_batch_redraws_degenerate_groups(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    """A reward that is constant for every group on its first call: each group is drawn again once."""
    recs = _records()
    calls: list[int] = []

    def reward(completions: list[str], records: list[PromptRecord]) -> list[float]:
        calls.append(len(completions))
        return [0.0] * len(completions) if len(calls) == 1 else _length_reward(completions, records)

    kw = dict(policy=POLICY, n_prompts=3, group_size=4, max_new_tokens=6, seed=5)
    u = build_update_batch(lm, lm.params, recs, tok, reward, **kw)  # type: ignore[arg-type]
    assert calls == [12, 12] and u.resampled.tolist() == [1, 1, 1]
    _check_provenance(u, recs, tok)
    torch.testing.assert_close(u.rewards, torch.tensor([float(len(t)) for t in u.responses]))
    assert u.advantages.abs().sum() > 0
    # The re-drawn responses are fresh draws: not those a reward-agnostic build returns.
    plain = build_update_batch(lm, lm.params, recs, tok, _length_reward, **kw)  # type: ignore[arg-type]
    assert plain.resampled.tolist() == [0, 0, 0]
    assert torch.equal(plain.prompt_index, u.prompt_index) and plain.responses != u.responses


def test_update_batch_degenerate_error(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    recs = _records()
    calls: list[int] = []

    def reward(completions: list[str], records: list[PromptRecord]) -> list[float]:
        calls.append(len(completions))
        return [0.0 if r.id == "r3" else float(len(c)) for c, r in zip(completions, records, strict=True)]

    kw = dict(policy=POLICY, n_prompts=5, group_size=4, max_new_tokens=6, seed=0)
    with pytest.raises(ValueError, match=r"1 of 5 groups .* after 2 re-draws .*'r3'.*larger group_size"):
        build_update_batch(lm, lm.params, recs, tok, reward, max_resample_attempts=2, **kw)  # type: ignore[arg-type]
    assert calls == [20, 4, 4]  # only the degenerate group is drawn again
    with pytest.raises(ValueError, match="after 0 re-draws"):
        build_update_batch(lm, lm.params, recs, tok, reward, max_resample_attempts=0, **kw)  # type: ignore[arg-type]


def test_update_batch_errors(lm: dh.FunctionalLM, tok: PreTrainedTokenizerFast) -> None:
    recs = _records()
    kw = dict(policy=POLICY, max_new_tokens=3, seed=0)
    with pytest.raises(ValueError, match="n_prompts=6 exceeds the 5 records"):
        build_update_batch(lm, lm.params, recs, tok, _length_reward, n_prompts=6, group_size=2, **kw)
    with pytest.raises(ValueError, match="group_size=1"):
        build_update_batch(lm, lm.params, recs, tok, _length_reward, n_prompts=2, group_size=1, **kw)
    with pytest.raises(ValueError, match="scale_rewards"):
        build_update_batch(lm, lm.params, recs, tok, _length_reward, n_prompts=2, group_size=2,
                           scale_rewards="std", **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_resample_attempts"):
        build_update_batch(lm, lm.params, recs, tok, _length_reward, n_prompts=2, group_size=2,
                           max_resample_attempts=-1, **kw)
    with pytest.raises(ValueError, match="returned 1 rewards for 4 completions"):
        build_update_batch(lm, lm.params, recs, tok, lambda c, r: [1.0], n_prompts=2, group_size=2, **kw)
    with pytest.raises(ValueError, match="non-finite"):
        build_update_batch(lm, lm.params, recs, tok, lambda c, r: [float("nan")] * len(c), n_prompts=2,
                           group_size=2, **kw)
