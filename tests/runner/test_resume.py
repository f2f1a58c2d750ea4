"""``deltah run --resume``: the folder's own config, refusals that name keys, nothing rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import deltaH.runner as runner
from deltaH.cli import main
from deltaH.config import load_config
from deltaH.io.compare import compare_results
from deltaH.io.results import ResultsDir

TINY = [
    "eval_batch.total_sequences=8",
    "eval_batch.group_size=4",
    "update_batch.n_prompts=2",
    "update_batch.group_size=4",
    "policy.max_new_tokens=5",
    "eta.grid=[1e-5, 1e-4]",
    "analyses.influence=false",
    "output.plots=false",
]


def _sets(items: list[str]) -> list[str]:
    return [a for o in items for a in ("--set", o)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "complete"
    assert main(["-q", "run", "configs/toy.yaml", "--out", str(out), *_sets(TINY)]) == 0
    return out


def _interrupted(tmp_path: Path, *extra: str) -> Path:
    cfg = load_config("configs/toy.yaml", [*TINY, *extra])
    out = tmp_path / "interrupted"

    def stop(name: str, event: str) -> None:
        if (name, event) == ("true_sweep", "start"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, out=out, quiet=True, on_stage=stop)
    assert ResultsDir.open(out).progress()["status"] == "incomplete"
    return out


def test_resume_uses_the_folders_own_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Started with an override that is not in configs/toy.yaml: resuming with no config at all must
    # take it from the folder (the built-in defaults have top_p = 1.0).
    out = _interrupted(tmp_path, "policy.top_p=0.9")
    saved = (out / "config.yaml").read_bytes()
    assert main(["-q", "run", "--resume", str(out)]) == 0
    assert (out / "config.yaml").read_bytes() == saved  # never rewritten
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["policy"]["top_p"] == 0.9 and s["status"] == "complete"
    straight = tmp_path / "straight"
    assert (
        main(["-q", "run", "configs/toy.yaml", "--out", str(straight), *_sets([*TINY, "policy.top_p=0.9"])])
        == 0
    )
    assert compare_results(straight, out) == []


@pytest.mark.parametrize(("override", "key"), [("policy.top_p=0.9", "policy.top_p"), ("seed=7", "seed")])
def test_changing_a_result_key_is_refused_and_nothing_changes(
    complete: Path, capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    before = _files(complete)
    rc = main(["-q", "run", "--resume", str(complete), "--set", override])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and key in err and "Traceback" not in err
    assert _files(complete) == before
    assert ResultsDir.open(complete).progress()["status"] == "complete"


def test_a_config_file_that_changes_results_is_refused(
    complete: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # configs/toy.yaml has the default sizes, not TINY's: every differing key is named.
    rc = main(["-q", "run", "configs/toy.yaml", "--resume", str(complete)])
    err = capsys.readouterr().err
    assert rc == 2 and "eval_batch.total_sequences" in err and "policy.max_new_tokens" in err


def test_a_complete_run_is_reported_complete_and_left_alone(
    complete: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = _files(complete)
    assert main(["-q", "run", "--resume", str(complete), "--set", "compute.tf_batch_size=3"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert _files(complete) == before


def test_out_with_resume_is_an_error(
    complete: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["-q", "run", "--resume", str(complete), "--out", str(tmp_path / "other")])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and "--resume" in err
    assert not (tmp_path / "other").exists()


def test_chunk_sizes_may_change_on_resume(tmp_path: Path) -> None:
    out = _interrupted(tmp_path)
    assert main(["-q", "run", "--resume", str(out), "--set", "compute.tf_batch_size=3"]) == 0
    assert ResultsDir.open(out).progress()["status"] == "complete"


def test_a_folder_that_is_not_a_run_cannot_be_resumed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["-q", "run", "--resume", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot resume it" in err
