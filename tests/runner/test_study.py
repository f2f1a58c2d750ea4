"""A study over the checkpoints of a real TRL ``GRPOTrainer`` run (LoRA, 3 steps, the default linear
schedule): the last checkpoint's next-step lr is 0, and one checkpoint that fails neither discards
the others nor survives ``--resume``.

The references are the trainer's own: the ``learning_rate`` it logged at each step (``log_history``
in memory, not the files deltaH reads) and a straight study of the same checkpoints.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import deltaH.runner as runner
from deltaH.cli import main
from deltaH.config import load_config
from deltaH.errors import ConfigError
from deltaH.io.results import ResultsDir
from deltaH.runner.stages import eta_reference

pytestmark = pytest.mark.usefixtures("one_thread")

LR, STEPS = 1e-3, 3
PROMPTS = ["12+7=", "3-1=", "5+5=", "9-2="]
NAMES = [f"checkpoint-{k}" for k in range(1, STEPS + 1)]


def reward(completions: list[str], records: list[Any]) -> list[float]:
    """Digits and length: varied rewards for a random tiny model (deltaH's form: ``data.reward``)."""
    return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]


def _trl_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return reward(completions, [])


@dataclass(frozen=True)
class TrlRun:
    root: Path  # base/ (model + tokenizer), out/checkpoint-{1,2,3}/, prompts.jsonl
    logged_lr: dict[int, float]  # step -> the learning_rate the trainer logged for it


@pytest.fixture(scope="module")
def trl_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> TrlRun:
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from deltaH.toy import build_tokenizer

    root = tmp_path_factory.mktemp("trl")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")  # the adapter checkpoints name this folder as their base model
    model = get_peft_model(Qwen2ForCausalLM.from_pretrained(root / "base", attn_implementation="eager"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    args = GRPOConfig(
        output_dir=str(root / "out"), per_device_train_batch_size=4, num_generations=4,
        max_completion_length=6, max_steps=STEPS, learning_rate=LR, bf16=False, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="steps", save_steps=1, save_only_model=False, seed=0,
        disable_tqdm=True,
    )
    assert args.lr_scheduler_type == "linear" and args.warmup_steps == 0  # the default schedule
    tr = GRPOTrainer(model=model, reward_funcs=_trl_reward, args=args, processing_class=tok,
                     train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}))
    tr.train()
    (root / "prompts.jsonl").write_text("".join(json.dumps({"question": p}) + "\n" for p in PROMPTS))
    logged = {e["step"]: e["learning_rate"] for e in tr.state.log_history if "learning_rate" in e}
    assert sorted(logged) == [1, 2, 3]
    return TrlRun(root, logged)


def _overrides(checkpoints: Path, run: TrlRun) -> list[str]:
    return [
        f"checkpoint.path={checkpoints}/checkpoint-*",
        f"data.path={run.root / 'prompts.jsonl'}",
        "data.answer_field=null",
        "data.reward=test_study:reward",
        "eval_batch.total_sequences=8",
        "update_batch.n_prompts=2",
        "update_batch.group_size=4",
        "policy.max_new_tokens=6",
        "eta.grid=[1e-4, 1e-3]",
        "analyses.influence=false",
        "output.plots=false",
        "output.detail=minimal",
    ]


def _sets(items: list[str]) -> list[str]:
    return [a for o in items for a in ("--set", o)]


def _rows(folder: Path) -> list[dict[str, Any]]:
    return list(json.loads((folder / "study.json").read_text())["checkpoints"])


def _summary(folder: Path, i: int) -> dict[str, Any]:
    return dict(json.loads((folder / f"{i:02d}-{NAMES[i]}" / "summary.json").read_text()))


@pytest.fixture(scope="module")
def study(trl_run: TrlRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(None, _overrides(trl_run.root / "out", trl_run))
    return runner.run(cfg, out=tmp_path_factory.mktemp("study") / "study", quiet=True)


def test_every_checkpoint_of_the_run_is_in_the_study(study: Path) -> None:
    rows = _rows(study)
    assert [r["checkpoint"] for r in rows] == NAMES
    assert [r["status"] for r in rows] == ["complete"] * STEPS
    assert [r["global_step"] for r in rows] == [1, 2, 3]
    assert ResultsDir.open(study).progress()["status"] == "complete"
    assert json.loads((study / "study.json").read_text())["status"] == "complete"


def test_eta_ref_is_the_next_step_lr_and_at_the_end_of_the_schedule_the_last_steps(
    study: Path, trl_run: TrlRun
) -> None:
    lr = trl_run.logged_lr
    assert lr[3] == pytest.approx(LR / 3, rel=1e-12)  # linear decay to 0 over 3 steps: the step-3 lr
    for i in (0, 1):  # checkpoint-k holds the lr the trainer then logged for step k + 1: the same float
        s = _summary(study, i)
        assert s["checkpoint"]["lr"] == lr[i + 2] and s["update"]["lr_ref"] == lr[i + 2]
        assert s["eta_reference"] == lr[i + 2] and s["eta_reference_source"] == "checkpoint_lr"
        assert not any("next-step lr" in w for w in s["warnings"])
    last = _summary(study, 2)
    assert last["checkpoint"]["lr"] == 0.0 and last["update"]["lr_ref"] == 0.0  # the step after the last
    assert last["checkpoint"]["logged_lr"] == lr[3]
    assert last["eta_reference"] == lr[3] and last["eta_reference_source"] == "logged_lr"
    j = last["eta"].index(last["eta_reference"])  # η_ref joins the grid
    full = last["decompositions"]["full"]
    assert np.isfinite(full["delta_h"][j]) and full["delta_h"][j] != 0.0  # a direction per unit lr exists
    assert sum("next-step lr is 0" in w for w in last["warnings"]) == 1
    report = (study / "02-checkpoint-3" / "report.md").read_text()
    assert "the lr of the step that produced the checkpoint" in report and "next-step lr is 0" in report
    row = _rows(study)[2]
    assert row["eta_reference"] == lr[3] and row["eta_reference_source"] == "logged_lr"


def test_lr_zero_without_a_logged_lr_is_a_one_line_error_naming_eta_reference(
    trl_run: TrlRun, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(trl_run.root / "out" / "checkpoint-3", ckpt)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    for entry in state["log_history"]:
        entry.pop("learning_rate", None)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    out = tmp_path / "r"
    sets = [*_overrides(tmp_path, trl_run), f"checkpoint.path={ckpt}"]
    assert main(["-q", "run", "--out", str(out), *_sets(sets)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deltah: error: config key 'eta.reference'"), err
    assert "--set eta.reference=" in err
    assert not out.exists()  # bad input found while loading: before any result, no folder is left


def test_eta_reference_sources() -> None:
    assert eta_reference(2e-5, 1e-3, 5e-4, "c") == (2e-5, "config")
    assert eta_reference("lr", 1e-3, 5e-4, "c") == (1e-3, "checkpoint_lr")
    assert eta_reference("lr", 0.0, 5e-4, "c") == (5e-4, "logged_lr")
    with pytest.raises(ConfigError, match="eta.reference") as e:
        eta_reference("lr", 0.0, None, "out/checkpoint-3")
    assert e.value.key == "eta.reference" and "out/checkpoint-3" in str(e.value)


def test_a_failing_checkpoint_is_recorded_and_resume_retries_only_it(
    trl_run: TrlRun,
    study: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import deltaH.io.plots as plots

    trajectories: list[list[str]] = []
    monkeypatch.setattr(plots, "make_plots", lambda *a, **k: [])  # per-checkpoint plots: not under test
    monkeypatch.setattr(
        plots, "make_trajectory_plot", lambda rows, out: trajectories.append([r["checkpoint"] for r in rows])
    )
    ckpts = tmp_path / "out"
    shutil.copytree(trl_run.root / "out", ckpts)
    opt = ckpts / "checkpoint-2" / "optimizer.pt"
    saved = opt.read_bytes()
    # An intact archive (the cheap checks before the run pass) that is not this model's optimizer.
    torch.save({"state": {}, "param_groups": [{"lr": LR, "params": []}]}, opt)
    res = tmp_path / "res"
    sets = [*_overrides(ckpts, trl_run), "output.plots=true"]
    assert main(["-q", "run", "--out", str(res), *_sets(sets)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("deltah: partial: 1 checkpoint(s) failed: checkpoint-2 "), err
    assert f"--resume {res}" in err[-1]

    rows = _rows(res)
    assert [r["status"] for r in rows] == ["complete", "failed", "complete"]
    failed = rows[1]
    assert set(failed) == {"checkpoint", "status", "error"} and failed["checkpoint"] == "checkpoint-2"
    assert failed["error"].startswith("CheckpointError: ") and "\n" not in failed["error"]
    # The others are the straight study's rows: same checkpoints, same seeds.
    assert [rows[0], rows[2]] == [_rows(study)[0], _rows(study)[2]]
    prog = ResultsDir.open(res).progress()
    assert prog["status"] == "partial" and "checkpoint-2" in prog["error"]
    assert json.loads((res / "study.json").read_text())["status"] == "partial"
    assert ResultsDir.open(res / "01-checkpoint-2").progress()["status"] == "failed"
    log_text = (res / "run.log").read_text()
    assert "checkpoint-2 failed: CheckpointError" in log_text
    assert "Traceback (most recent call last)" in log_text
    assert trajectories == [["checkpoint-1", "checkpoint-3"]]  # the trajectory of those that succeeded

    opt.write_bytes(saved)
    done = {i: (res / f"{i:02d}-{NAMES[i]}" / "summary.json").read_bytes() for i in (0, 2)}
    assert main(["-q", "run", "--resume", str(res)]) == 0
    for i, before in done.items():  # not analysed again
        assert (res / f"{i:02d}-{NAMES[i]}" / "summary.json").read_bytes() == before
    assert _rows(res) == _rows(study)
    assert ResultsDir.open(res).progress() == {"done": [], "error": None, "status": "complete"}
    assert trajectories[-1] == NAMES


def test_a_study_whose_every_checkpoint_fails_raises_the_first_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from deltaH.runner import orchestrate
    from deltaH.toy import toy_checkpoint_path

    def broken(cfg: Any, path: str, quiet: bool) -> None:
        raise RuntimeError(f"cannot load {Path(path).name}")

    monkeypatch.setattr(orchestrate, "load_inputs", broken)
    p = str(toy_checkpoint_path())
    cfg = load_config(None, [f"checkpoint.path=[{p}, {p}]", "output.plots=false"])
    with pytest.raises(RuntimeError, match="cannot load checkpoint-5"):
        runner.run(cfg, out=tmp_path / "r", quiet=True)
    rows = _rows(tmp_path / "r")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert rows[0]["error"] == "RuntimeError: cannot load checkpoint-5"
    assert ResultsDir.open(tmp_path / "r").progress()["status"] == "failed"
