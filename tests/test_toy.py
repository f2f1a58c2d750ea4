"""The embedded toy: task, tokenizer, the shipped artifact, and the script that makes it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch

import deltaH as dh
import deltaH.toy as toy
from deltaH.sampling import build_update_batch, load_prompts, load_reward_fn
from deltaH.sampling.rewards import math_reward
from deltaH.toy import make_toy as mt

TRAINER_FILES = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
                 "trainer_state.json", "tokenizer.json", "tokenizer_config.json", mt.CONFIG_FILE)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ckpt():
    return toy.load_toy()


# -- task and tokenizer ----------------------------------------------------------------------
def test_problems_are_exact_and_the_split_is_deterministic_and_disjoint():
    assert toy.Problem(12, "+", 7).prompt == "12+7=" and toy.Problem(12, "+", 7).answer == "19"
    assert toy.Problem(3, "-", 12).answer == "-9"
    with pytest.raises(ValueError, match="op"):
        toy.Problem(1, "*", 2)
    a = toy.split_problems(seed=3, max_operand=10, n_heldout=20)
    b = toy.split_problems(seed=3, max_operand=10, n_heldout=20)
    assert a == b and len(a[1]) == 20 and len(a[0]) + 20 == 200
    assert not set(a[0]) & set(a[1])
    assert a != toy.split_problems(seed=4, max_operand=10, n_heldout=20)


def test_write_prompts_loads_and_rewards(tmp_path):
    probs = [toy.Problem(12, "+", 7), toy.Problem(3, "-", 12)]
    path = toy.write_prompts(tmp_path / "p.jsonl", probs, [{"pass_rate": 0.5}, {"pass_rate": 0.25}])
    recs = load_prompts(path, id_field="id")
    assert [(r.id, r.prompt, r.answer) for r in recs] == [("toy-0", "12+7=", "19"), ("toy-1", "3-12=", "-9")]
    assert load_reward_fn("math")(["19", "9"], recs) == [1.0, 0.0]


def test_shipped_tokenizer_round_trips_prompts():
    from transformers import AutoTokenizer

    built = toy.build_tokenizer()
    for folder in (toy.toy_base_path(), toy.toy_checkpoint_path()):
        assert (folder / "tokenizer.json").is_file()
        tok = AutoTokenizer.from_pretrained(folder)
        assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, len(built))
        for rec in toy.load_toy_prompts()[:50] + [toy.records([toy.Problem(49, "-", 0)])[0]]:
            ids = tok.encode(rec.prompt, add_special_tokens=False)
            assert ids == built.encode(rec.prompt, add_special_tokens=False)
            assert len(ids) == len(rec.prompt) and tok.decode(ids) == rec.prompt
            full = ids + tok.encode(rec.answer, add_special_tokens=False) + [tok.eos_token_id]
            assert tok.decode(full, skip_special_tokens=True) == rec.prompt + rec.answer
    config = json.loads((toy.toy_base_path() / "config.json").read_text())
    assert config["vocab_size"] == len(built)


# -- the shipped artifact --------------------------------------------------------------------
def test_shipped_prompts_are_held_out_and_graded_by_the_math_reward():
    recs = load_prompts(toy.toy_prompts_path())
    assert len(recs) >= 100 and all(r.answer is not None for r in recs)
    cfg = toy.toy_config()
    lo, hi = cfg["pass_band"]
    _, heldout = toy.split_problems(seed=cfg["seed"], max_operand=cfg["max_operand"],
                                    n_heldout=cfg["n_heldout"])
    gold = {p.prompt: p.answer for p in heldout}
    for r in recs:
        assert gold[r.prompt] == r.answer and lo <= r.raw["pass_rate"] <= hi
        assert math_reward(r.answer, r.answer) == 1.0
        assert math_reward(str(int(r.answer) + 1), r.answer) == 0.0
    assert load_reward_fn("math")([r.answer for r in recs], recs) == [1.0] * len(recs)


def test_shipped_artifact_layout_and_size():
    ck = toy.toy_checkpoint_path()
    for f in TRAINER_FILES:
        assert (ck / f).is_file(), f
    for f in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (toy.toy_base_path() / f).is_file(), f
    files = [p for p in toy.toy_dir().rglob("*") if p.is_file()]
    assert not [p.name for p in files if p.suffix in (".bin", ".pth", ".pkl")]  # no pickles but torch.save
    assert sum(p.stat().st_size for p in files) < 5e6
    assert json.loads((ck / "adapter_config.json").read_text())["base_model_name_or_path"] == "../base"
    state = json.loads((ck / "trainer_state.json").read_text())
    n = int(ck.name.split("-")[1])
    assert state["global_step"] == n and [e["step"] for e in state["log_history"]] == list(range(1, n + 1))
    assert all(0 < e["reward"] < 1 for e in state["log_history"])
    sd = torch.load(ck / "optimizer.pt", weights_only=True)
    assert [g["weight_decay"] for g in sd["param_groups"]] == [toy.toy_config()["weight_decay"], 0.0]
    assert all("param_names" not in g for g in sd["param_groups"]) and sd["param_groups"][0]["fused"]
    torch.load(ck / "scheduler.pt", weights_only=True)


def test_shipped_settings_are_the_script_defaults():
    want = json.loads(json.dumps(dataclasses.asdict(mt.ToyConfig())))
    assert toy.toy_config() == want
    assert toy.toy_policy() == dh.SamplingPolicy(temperature=want["temperature"], top_p=want["top_p"])


def test_shipped_checkpoint_loads_through_load_checkpoint(ckpt):
    from peft import PeftModel

    cfg = toy.toy_config()
    assert ckpt.kind == "trainer" and isinstance(ckpt.model, PeftModel) and ckpt.tokenizer is not None
    assert Path(ckpt.base_model_path) == toy.toy_base_path()
    lm = dh.FunctionalLM.from_model(ckpt.model)
    n_lora = 2 * 7 * cfg["num_hidden_layers"]
    assert len(lm.params) == n_lora
    assert all(".lora_A.default." in k or ".lora_B.default." in k for k in lm.params)
    st = ckpt.optimizer_state
    assert isinstance(st, dh.AdamWState) and list(st.names) == list(lm.params) and not st.fresh
    assert set(st.step.values()) == {cfg["grpo_steps"]} and ckpt.global_step == cfg["grpo_steps"]
    # linear warm-up schedule: the lr the next (grpo_steps + 1) step uses
    n, w, total = cfg["grpo_steps"], cfg["warmup_steps"], cfg["max_steps"]
    assert ckpt.lr == pytest.approx(cfg["learning_rate"] * (total - n) / (total - w), rel=1e-12)
    assert all(h.weight_decay == cfg["weight_decay"] and h.betas == (0.9, 0.999) for h in st.hyper.values())
    assert all(bool(st.exp_avg_sq[k].abs().sum() > 0) for k in st.names)  # real moments, A and B
    b = [k for k in lm.params if "lora_B" in k]
    assert all(bool(lm.params[k].abs().sum() > 0) for k in b)  # B moved away from its zero init


def test_shipped_toy_samples_mixed_rewards(ckpt):
    lm = dh.FunctionalLM.from_model(ckpt.model)
    recs = toy.load_toy_prompts()
    cfg = toy.toy_config()
    reward = load_reward_fn("math")
    tok = ckpt.tokenizer
    prompts = [tok.encode(r.prompt, add_special_tokens=False) for r in recs[:4]]
    batch = dh.sample(lm, lm.params, prompts, policy=toy.toy_policy(), max_new_tokens=cfg["max_new_tokens"],
                      n_per_prompt=8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      generator=torch.Generator().manual_seed(0))
    texts = tok.batch_decode([ids[m].tolist() for ids, m in zip(batch.input_ids, batch.response_mask,
                                                                strict=True)], skip_special_tokens=True)
    r = reward(texts, [rec for rec in recs[:4] for _ in range(8)])
    assert 0 < sum(r) < len(r)
    # the GRPO update batch the demo builds: every group mixed (the builder raises otherwise)
    u = build_update_batch(lm, lm.params, recs, tok, reward, policy=toy.toy_policy(), n_prompts=8,
                           group_size=8, max_new_tokens=cfg["max_new_tokens"], seed=0)
    assert 0 < float(u.rewards.mean()) < 1 and bool((u.advantages != 0).any())


# -- the script ------------------------------------------------------------------------------
def test_trainer_param_groups_match_transformers_trainer(ckpt):
    trainer = pytest.importorskip("transformers.trainer", reason="transformers.Trainer needs accelerate")
    decay = set(trainer.Trainer.get_decay_parameter_names(None, ckpt.model))
    groups = mt.trainer_param_groups(ckpt.model, 0.01)
    by_id = {id(p): n for n, p in ckpt.model.named_parameters()}
    names = [[by_id[id(p)] for p in g["params"]] for g in groups]
    named = [(n, p) for n, p in ckpt.model.named_parameters() if p.requires_grad]
    assert names == [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]


def test_warm_up_is_deterministic(tmp_path):
    cfg = mt.ToyConfig(sft_steps=3, sft_batch_size=8, sft_warmup_steps=1)
    tok = toy.build_tokenizer()
    train, _ = toy.split_problems(seed=0, max_operand=cfg.max_operand, n_heldout=cfg.n_heldout)
    for name in ("a", "b"):
        with mt._one_thread():
            model, losses = mt.warm_up(cfg, tok, train)
        model.save_pretrained(tmp_path / name)
        assert len(losses) == 3 and losses[0] > 0
    assert _hashes(tmp_path / "a") == _hashes(tmp_path / "b")


def test_make_toy_is_deterministic(tmp_path):
    """A mini run from the shipped base (no warm-up): two runs give byte-identical files."""
    cfg = mt.ToyConfig(grpo_steps=1, pool_size=32, screen_samples=8, n_heldout=32, heldout_samples=8,
                       n_prompts=4)
    runs = [mt.make_toy(tmp_path / name, cfg, base=toy.toy_base_path()) for name in ("a", "b")]
    ha, hb = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert ha == hb
    assert ha["base/model.safetensors"] == _hashes(toy.toy_base_path())["model.safetensors"]
    assert {f"checkpoint-1/{f}" for f in TRAINER_FILES} <= set(ha)
    assert runs[0]["log_history"] == runs[1]["log_history"] and len(runs[0]["log_history"]) == 1
    with pytest.raises(FileExistsError, match="overwrite"):
        mt.make_toy(tmp_path / "a", cfg, base=toy.toy_base_path())
