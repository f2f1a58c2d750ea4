"""``deltah run`` on the checkpoints of a real ``DeltaHGRPOTrainer`` run: U is the trainer's recorded
step, the step is proven equal to the next checkpoint, and the realised step is measured beside it.

The run (tests/_trl_runs.py) trains the toy 3 steps with the default linear schedule and records
every step. ``checkpoint-1`` and ``checkpoint-2`` replay steps 2 and 3 (recorded, next checkpoint
present); ``checkpoint-3`` has neither a recorded step 4 nor a next checkpoint, so ``auto`` samples U.
References: the next checkpoint's weights (``step_error``), and TRL's own recorded tensors written
out in the rollout format for the ``file`` source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from _trl_runs import grpo_run

import deltaH.runner as runner
from deltaH.cli import main
from deltaH.config import load_config
from deltaH.errors import DataError, NotFoundError
from deltaH.io.steps import read_step

pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")

# float32 training replayed in float32: see tests/integrations/test_replay.py for the derivation.
STEP_RTOL = 1e-5
SMALL = [
    "eval_batch.total_sequences=32",
    "eval_batch.group_size=4",
    "policy.max_new_tokens=8",
    "eta.grid=[1e-4, 1e-3]",
    "analyses.influence=false",
    "analyses.proxy=false",
    "output.detail=minimal",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return grpo_run(tmp_path_factory.mktemp("trl") / "out")


@pytest.fixture(scope="module")
def study(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(None, [f"checkpoint.path={run_dir}/checkpoint-*", *SMALL])
    return runner.run(cfg, out=tmp_path_factory.mktemp("study") / "s", quiet=True)


def _summary(folder: Path, i: int) -> dict[str, Any]:
    return dict(json.loads((folder / f"{i:02d}-checkpoint-{i + 1}" / "summary.json").read_text()))


def test_the_study_replays_every_recorded_step(study: Path) -> None:
    rows = json.loads((study / "study.json").read_text())["checkpoints"]
    assert [r["status"] for r in rows] == ["complete"] * 3
    assert [r["update_source"] for r in rows] == ["recorded", "recorded", "sampled"]
    assert [r["step"] for r in rows] == [2, 3, 4]
    for r in rows[:2]:
        assert r["step_error"] <= STEP_RTOL
        assert r["delta_h_realised"] is not None and r["delta_h_predicted"] is not None
    assert rows[2]["delta_h_realised"] is None  # no checkpoint-4: nothing realised to compare with
    s = _summary(study, 0)
    rp = s["replay"]
    assert rp["source"] == "recorded" and rp["trainer_options"]["loss_type"] == "dapo"
    assert [d["name"] for d in rp["directions"]] == ["realised", "replayed"]
    real, rep = rp["directions"]
    assert real["eta"] == 1.0 and rep["eta"] == pytest.approx(s["update"]["lr_ref"])
    # The realised step is the replayed one up to step_error (relative, in parameter space), so their
    # first-order ΔH agree to step_error × (a cosine factor ≤ ‖∇δH‖‖Δθ‖/|δH₁|); their true ΔH differ
    # by that plus the SNIS rounding floor of float32 sums. A sampled U would miss by O(1).
    assert abs(real["delta_h1"] - rep["delta_h1"]) <= 1e-3 * abs(rep["delta_h1"])
    assert abs(real["delta_h"] - rep["delta_h"]) <= 1e-3 * abs(rep["delta_h"]) + 1e-6
    assert "recorded" in (study / "00-checkpoint-1" / "report.md").read_text()
    last = _summary(study, 2)["replay"]
    assert last["source"] == "sampled" and "no record of step 4" in last["reason"]


def test_recorded_without_a_record_fails_before_any_folder(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "r"
    code = main(
        [
            "-q",
            "run",
            "--out",
            str(out),
            "--set",
            f"checkpoint.path={run_dir}/checkpoint-3",
            "--set",
            "update_batch.source=recorded",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert str(run_dir / "deltah-steps") in err and "step 4" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(NotFoundError, match="deltah-steps"):
        runner.run(
            load_config(None, [f"checkpoint.path={run_dir}/checkpoint-3", "update_batch.source=recorded"]),
            out=out,
            quiet=True,
        )


def _rollout_rows(run_dir: Path, step: int) -> list[dict[str, Any]]:
    """TRL's recorded micro-batches of ``step`` written in the rollout format (token ids, advantage)."""
    rows = []
    (rec,) = read_step(run_dir / "deltah-steps", step)
    for mb in rec.micro_batches:
        for r in range(mb["prompt_ids"].shape[0]):
            p = mb["prompt_ids"][r][mb["prompt_mask"][r].bool()].tolist()
            c = mb["completion_ids"][r][mb["completion_mask"][r].bool()].tolist()
            rows.append(
                {
                    "prompt_ids": p,
                    "completion_ids": c,
                    "advantage": float(mb["advantages"][r]),
                    "group": str(p),
                }
            )
    return rows


def test_another_trainers_rollouts_replay_the_same_step(run_dir: Path, tmp_path: Path) -> None:
    """The trainer's own batch in the documented rollout format gives the same step (same tokens, same
    advantages, the same dapo normaliser): the file source is as exact as the recorded one."""
    f = tmp_path / "rollouts.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _rollout_rows(run_dir, 2)))
    cfg = load_config(
        None,
        [
            f"checkpoint.path={run_dir}/checkpoint-1",
            "update_batch.source=file",
            f"update_batch.path={f}",
            "policy.max_new_tokens=8",
            *SMALL,
        ],
    )
    out = runner.run(cfg, out=tmp_path / "file", quiet=True)
    rp = json.loads((out / "summary.json").read_text())["replay"]
    assert rp["source"] == "file" and rp["step_error"] <= STEP_RTOL


def test_a_malformed_rollout_file_writes_nothing(run_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    rows = _rollout_rows(run_dir, 2)
    rows[3]["completion_ids"] = "not a list"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"checkpoint.path={run_dir}/checkpoint-1",
            "update_batch.source=file",
            f"update_batch.path={f}",
            *SMALL,
        ],
    )
    with pytest.raises(DataError, match=r"bad.jsonl:4: field 'completion_ids'"):
        runner.run(cfg, out=tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists()


def test_token_influence_of_a_replayed_step_sums_to_its_first_order_change(study: Path) -> None:
    """The replayed step's per-token loss weights (TRL's objective) go into the token influence: its
    sum is δH₁ along the replayed ``grad`` (float32 on both sides, two algorithms: see
    tests/runner/test_token_stages.py for the tolerance)."""
    import numpy as np

    s = _summary(study, 0)
    tok = np.load(study / "00-checkpoint-1" / "arrays" / "token_influence.npy")
    grad = s["eta_reference"] * s["decompositions"]["grad"]["first_order"]["slope"]
    assert s["replay"]["source"] == "recorded"
    assert tok.sum() == pytest.approx(grad, rel=1e-3)
    assert s["proxies"]["temperature"] == s["replay"]["trainer_options"]["temperature"]
