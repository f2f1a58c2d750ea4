"""Config: defaults == configs/toy.yaml, the GPU example validates, overrides, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from deltaH.config import (
    DEFAULT_CONFIG_FILE,
    Config,
    ConfigError,
    EtaConfig,
    PolicyConfig,
    describe_config,
    load_config,
    parse_overrides,
)

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "configs" / "toy.yaml"
QWEN = ROOT / "configs" / "qwen2.5-1.5b-lora-gsm8k.yaml"


def flat_keys(d: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= flat_keys(v, key + ".") if isinstance(v, dict) else {key}
    return out


def commented_keys(path: Path) -> dict[str, bool]:
    """``section.key`` (or top-level ``key``) → whether its line carries a ``#`` comment."""
    out: dict[str, bool] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^( *)([A-Za-z_]\w*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = m.groups()
        value = rest.split("#")[0].strip()
        if not indent:
            section = key if not value else ""
            if value:
                out[key] = "#" in rest
        else:
            out[f"{section}.{key}"] = "#" in rest
    return out


# --------------------------------------------------------------------------------------------
# The shipped configs


def test_defaults_equal_toy_yaml() -> None:
    assert DEFAULT_CONFIG_FILE == TOY
    assert load_config(TOY) == Config() == load_config(None)
    assert yaml.safe_load(TOY.read_text(encoding="utf-8")) == Config().to_dict()


@pytest.mark.parametrize("path", [TOY, QWEN], ids=["toy", "qwen"])
def test_shipped_configs_spell_out_and_comment_every_key(path: Path) -> None:
    keys = commented_keys(path)
    assert set(keys) == flat_keys(Config().to_dict())
    assert all(keys.values()), [k for k, ok in keys.items() if not ok]


def test_qwen_example_validates() -> None:
    cfg = load_config(QWEN)
    assert cfg.checkpoint.path == "runs/qwen2.5-1.5b-grpo/checkpoint-*"
    assert cfg.checkpoint.base_model == "Qwen/Qwen2.5-1.5B-Instruct"
    assert (cfg.checkpoint.dtype, cfg.checkpoint.device) == ("auto", "cuda")  # bf16 weights run in float32
    assert (cfg.data.path, cfg.data.template) == ("data/gsm8k_test.jsonl", "chat")
    assert cfg.policy.max_new_tokens == 512
    assert (cfg.eval_batch.total_sequences, cfg.eval_batch.group_size) == (512, 8)
    assert (cfg.update_batch.n_prompts, cfg.update_batch.group_size) == (16, 8)
    assert (cfg.loss.type, cfg.loss.grad_accum_steps) == ("dapo", 4)
    assert (cfg.compute.tf_batch_size, cfg.compute.dir_chunk) == (8, "auto")
    assert "\\boxed{}" in (cfg.data.system_prompt or "")


def test_every_key_documented() -> None:
    table = describe_config()
    for key in flat_keys(Config().to_dict()):
        assert f"| `{key}` |" in table
    for section in dataclasses.fields(Config):
        assert section.metadata["help"]
        if section.name != "seed":
            for f in dataclasses.fields(getattr(Config(), section.name)):
                assert len(f.metadata["help"]) > 10, f"{section.name}.{f.name}"


# --------------------------------------------------------------------------------------------
# Round trips and type rules


@pytest.mark.parametrize("path", [TOY, QWEN], ids=["toy", "qwen"])
def test_round_trip(path: Path) -> None:
    cfg = load_config(path, ["eta.grid=[1e-4, 1e-6]", "checkpoint.path=[a/checkpoint-1, a/checkpoint-2]"])
    d = cfg.to_dict()
    assert Config.from_dict(d) == cfg
    assert Config.from_dict(json.loads(json.dumps(d))) == cfg
    assert Config.from_dict(yaml.safe_load(yaml.safe_dump(d))) == cfg
    assert d["eta"]["grid"] == [1e-6, 1e-4]
    assert d["checkpoint"]["path"] == ["a/checkpoint-1", "a/checkpoint-2"]
    assert hash(cfg) == hash(Config.from_dict(d))


def test_type_rules(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("policy: {temperature: 2}\nanalyses: {kernel: yes}\n"
                 "eta: {grid: [1e-4, 3e-5], reference: 5e-4}\n")
    cfg = load_config(p)
    assert cfg.policy.temperature == 2.0 and isinstance(cfg.policy.temperature, float)  # ints ok for floats
    assert cfg.analyses.kernel is True  # YAML 1.1 `yes` is a boolean
    assert cfg.eta.grid == (3e-5, 1e-4) and cfg.eta.reference == 5e-4  # 1e-4 is a float, not a string
    assert load_config(None, ["eta.reference=1"]).eta.reference == 1.0


def test_missing_keys_take_defaults_and_sections_accept_mappings() -> None:
    assert Config.from_dict({}) == Config()
    assert Config.from_dict({"policy": {"top_p": 0.5}}).policy == PolicyConfig(top_p=0.5)
    assert Config(policy={"top_p": 0.5}) == Config(policy=PolicyConfig(top_p=0.5))  # type: ignore[arg-type]


def test_frozen_and_validated_on_construction() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"'policy\.top_p': got 2"):
        PolicyConfig(top_p=2)
    with pytest.raises(ConfigError, match=r"'eta\.grid\[0\]': got 0"):
        EtaConfig(grid=(0.0,))


# --------------------------------------------------------------------------------------------
# Overrides


def test_parse_overrides() -> None:
    got = parse_overrides(["policy.top_p=0.9", "eta.grid=[1e-5,1e-4]", "checkpoint.base_model=null",
                           "data.template='Q: {prompt}'", " seed = 3", "output.dir=", "policy.top_p=0.8"])
    assert got == {"policy.top_p": 0.8, "eta.grid": [1e-5, 1e-4], "checkpoint.base_model": None,
                   "data.template": "Q: {prompt}", "seed": 3, "output.dir": None}


def test_overrides_apply_over_the_file() -> None:
    cfg = load_config(QWEN, ["policy.top_p=0.95", "checkpoint.base_model=null", "eta.grid=[1e-5, 1e-6]",
                             "update_batch={n_prompts: 8}", "analyses.kernel=true", "seed=7"])
    assert cfg.policy.top_p == 0.95 and cfg.checkpoint.base_model is None
    assert cfg.eta.grid == (1e-6, 1e-5)
    assert cfg.update_batch.n_prompts == 8 and cfg.update_batch.group_size == 8  # a mapping merges
    assert cfg.analyses.kernel is True and cfg.seed == 7
    assert cfg.policy.max_new_tokens == 512  # untouched keys keep the file's values


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["foo"], ["'foo'", "key.path=value"]),
        (["=3"], ["'=3'"]),
        (["policy..top_p=1"], ["'policy..top_p=1'"]),
        (["eta.grid=[1e-5"], ["'eta.grid=[1e-5'", "YAML"]),
        (["policy.top_p=1.5"], ["'policy.top_p'", "1.5", "--set policy.top_p=1.5"]),
        (["policy.top_k=3"], ["'policy.top_k'", "did you mean 'top_p'", "--set policy.top_k=3"]),
        (["seed.x=1"], ["'seed'", "seed.x"]),
        (["data.template={prompt}"], ["'data.template'", "quote"]),
    ],
)
def test_bad_overrides(overrides: list[str], needles: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_overrides_must_be_a_list() -> None:
    with pytest.raises(ConfigError, match="list"):
        parse_overrides("policy.top_p=0.9")


# --------------------------------------------------------------------------------------------
# Bad configs: every one is a one-line ConfigError naming the key path and the value

BAD_CONFIGS: list[tuple[str, str, str]] = [  # (YAML, key path in the message, value as shown)
    ("policy: {top_p: 1.5}", "policy.top_p", "1.5"),
    ("policy: {top_p: 0}", "policy.top_p", "0"),
    ("policy: {top_k: 50}", "policy.top_k", "top_k"),
    ("policy: {temperature: 0}", "policy.temperature", "0"),
    ("policy: {temperature: .inf}", "policy.temperature", "inf"),
    ("policy: {max_new_tokens: 16.0}", "policy.max_new_tokens", "16.0"),
    ("policy: 0.9", "policy", "0.9"),
    ("polcy: {top_p: 0.5}", "polcy", "did you mean 'policy'"),
    ("analysis: {kernel: true}", "analysis", "did you mean 'analyses'"),
    ("analyses: {kernel: 'true'}", "analyses.kernel", "'true'"),
    ("analyses: {first_order: 1}", "analyses.first_order", "1"),
    ("analyses: {kernel_method: random}", "analyses.kernel_method", "'random'"),
    ("analyses: {kernel_proj_dim: 0}", "analyses.kernel_proj_dim", "0"),
    ("analyses: {entropy_mode: RB}", "analyses.entropy_mode", "'RB'"),
    ("output: {plots: 'no'}", "output.plots", "'no'"),
    ("output: {detail: verbose}", "output.detail", "'verbose'"),
    ("output: {dir: ''}", "output.dir", "''"),
    ("eta: {grid: [1.0e-5, -1]}", "eta.grid[1]", "-1"),
    ("eta: {grid: []}", "eta.grid", "[]"),
    ("eta: {grid: [1e-4, .nan]}", "eta.grid[1]", "nan"),
    ("eta: {grid: [1e-4, 1e-4]}", "eta.grid", "[0.0001, 0.0001]"),
    ("eta: {grid: automatic}", "eta.grid", "'automatic'"),
    ("eta: {n_points: 2}", "eta.n_points", "2"),
    ("eta: {reference: 0}", "eta.reference", "0"),
    ("eta: {reference: LR}", "eta.reference", "'LR'"),
    ("loss: {type: DAPO}", "loss.type", "did you mean 'dapo'"),
    ("loss: {grad_accum_steps: 3}", "loss.grad_accum_steps", "3"),
    ("loss: {grad_accum_steps: 0}", "loss.grad_accum_steps", "0"),
    ("loss: {max_completion_length: 0}", "loss.max_completion_length", "0"),
    ("eval_batch: {total_sequences: 65}", "eval_batch.total_sequences", "65"),
    ("eval_batch: {group_size: 0}", "eval_batch.group_size", "0"),
    ("update_batch: {group_size: 1}", "update_batch.group_size", "1"),
    ("update_batch: {scale_rewards: std}", "update_batch.scale_rewards", "'std'"),
    ("update_batch: {max_resample_attempts: -1}", "update_batch.max_resample_attempts", "-1"),
    ("update_batch: {n_prompts: true}", "update_batch.n_prompts", "true"),
    ("data: {template: 'Q: {question}'}", "data.template", "'Q: {question}'"),
    ("data: {template: 'Q: {prompt'}", "data.template", "'Q: {prompt'"),
    ("data: {template: 'Q: {prompt}', system_prompt: Be brief.}", "data.system_prompt", "'Be brief.'"),
    ("data: {reward: accuracy}", "data.reward", "'accuracy'"),
    ("data: {reward: 'pkg.mod:'}", "data.reward", "'pkg.mod:'"),
    ("data: {limit: 0}", "data.limit", "0"),
    ("data: {prompt_field: null}", "data.prompt_field", "null"),
    ("data: {answer_field: 3}", "data.answer_field", "3"),
    ("checkpoint: {device: gpu}", "checkpoint.device", "'gpu'"),
    ("checkpoint: {device: 'cuda:x'}", "checkpoint.device", "'cuda:x'"),
    ("checkpoint: {dtype: fp16}", "checkpoint.dtype", "'fp16'"),
    ("checkpoint: {path: []}", "checkpoint.path", "[]"),
    ("checkpoint: {path: [runs/a, 3]}", "checkpoint.path[1]", "3"),
    ("checkpoint: {max_grad_norm: -1}", "checkpoint.max_grad_norm", "-1"),
    ("checkpoint: {base_model: ''}", "checkpoint.base_model", "''"),
    ("compute: {tf_batch_size: 0}", "compute.tf_batch_size", "0"),
    ("compute: {dir_chunk: 2.5}", "compute.dir_chunk", "2.5"),
    ("compute: {dir_chunk: 0}", "compute.dir_chunk", "0"),
    ("compute: {dir_chunk: fast}", "compute.dir_chunk", "'fast'"),
    ("compute: {dir_chunk: true}", "compute.dir_chunk", "true"),
    ("compute: {head_chunk: 0}", "compute.head_chunk", "0"),
    ("seed: -1", "seed", "-1"),
    ("seed: 1.5", "seed", "1.5"),
    ("seed: '0'", "seed", "'0'"),
]


@pytest.mark.parametrize(("text", "key", "shown"), BAD_CONFIGS, ids=[f"{i:02d}-{k}" for i, (_, k, _) in
                                                                    enumerate(BAD_CONFIGS)])
def test_bad_config(tmp_path: Path, text: str, key: str, shown: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg
    assert f"config key '{key}'" in msg, msg
    assert shown in msg, msg
    assert e.value.key == key
    assert msg.endswith(f"(in {path})"), msg
    assert ("expected" in msg) or ("allowed keys" in msg), msg


def test_bad_configs_are_many_and_distinct() -> None:
    assert len({text for text, _, _ in BAD_CONFIGS}) == len(BAD_CONFIGS) >= 20
    assert len({key for _, key, _ in BAD_CONFIGS}) >= 20


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("", ["is empty"]),
        ("# only a comment\n", ["is empty"]),
        ("- policy\n", ["got ['policy']", "expected a mapping"]),
        ("just text\n", ["got 'just text'"]),
        ("policy:\n  top_p: 0.9\n  top_p: 0.8\n", ["line 3", "duplicate key 'top_p'"]),
        ("policy:\n  top_p: [0.9\nseed: 0\n", ["line ", "invalid YAML"]),
        ("policy: {top_p: 0.9\n", ["line 2", "invalid YAML"]),
        ("\tseed: 0\n", ["line 1", "invalid YAML"]),
    ],
)
def test_bad_files(tmp_path: Path, text: str, needles: list[str]) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "\n" not in msg and f"config file '{path}'" in msg, msg
    for needle in needles:
        assert needle in msg, msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_mapping_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    assert load_config(path) == Config()


# --------------------------------------------------------------------------------------------
# Import cost: validation runs before (and without) torch

_BLOCK_HEAVY = textwrap.dedent(
    """
    import sys
    HEAVY = ("torch", "transformers", "peft", "numpy")

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HEAVY:
                raise ImportError(f"{name} imported while loading the config")

    sys.meta_path.insert(0, Block())
    """
)

_STANDALONE = _BLOCK_HEAVY + textwrap.dedent(
    """
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg_standalone", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod.load_config(sys.argv[2], ["policy.top_p=0.9"])
    mod.describe_config()
    """
)


def test_config_module_imports_nothing_heavy() -> None:
    r = subprocess.run([sys.executable, "-c", _STANDALONE, str(ROOT / "deltaH" / "config.py"), str(QWEN)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_import_deltaH_config_does_not_import_torch() -> None:
    code = _BLOCK_HEAVY + "import deltaH.config\ndeltaH.config.load_config(None)\n"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------------------------------
# One list of choices for the config and the core (deltaH._choices)


def test_config_accepts_exactly_the_core_choices() -> None:
    from deltaH import _choices

    keys = {
        "loss.type": _choices.LOSS_TYPES,
        "update_batch.scale_rewards": _choices.SCALE_REWARDS,
        "analyses.entropy_mode": _choices.ENTROPY_MODES,
        "analyses.kernel_method": _choices.KERNEL_METHODS,
        "output.detail": _choices.DETAIL_LEVELS,
        "checkpoint.dtype": _choices.DTYPES,
    }
    for key, allowed in keys.items():
        section, name = key.split(".")
        for v in allowed:
            assert getattr(getattr(load_config(None, [f"{key}={v}"]), section), name) == v
        with pytest.raises(ConfigError, match=re.escape("expected one of: " + ", ".join(allowed))):
            load_config(None, [f"{key}=nope"])


def test_choice_tuples_match_what_the_core_implements() -> None:
    import torch

    from deltaH import _choices
    from deltaH.sampling.rewards import BUILTIN_REWARDS

    assert tuple(BUILTIN_REWARDS) == _choices.BUILTIN_REWARDS
    assert all(isinstance(getattr(torch, d), torch.dtype) for d in _choices.DTYPES if d != "auto")
    want = r"loss_type must be one of \('grpo', 'dr_grpo', 'dapo', 'bnpo'\), got 'x'"
    with pytest.raises(ValueError, match=want):
        _choices.check_choice("loss_type", "x", _choices.LOSS_TYPES)
