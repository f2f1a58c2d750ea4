"""The runner and the `deltah` CLI end to end on the embedded toy (short settings)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import deltaH.runner as runner
from deltaH.cli import main
from deltaH.config import load_config
from deltaH.io.results import ResultsDir

SHORT = [
    "eval_batch.total_sequences=16",
    "eval_batch.group_size=4",
    "update_batch.n_prompts=4",
    "update_batch.group_size=4",
    "policy.max_new_tokens=6",
    "eta.grid=[1e-5, 1e-4, 1e-3]",
]


def _run(tmp_path: Path, name: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / name
    args = ["-q", "run", "configs/toy.yaml", "--out", str(out)]
    for o in [*SHORT, *extra]:
        args += ["--set", o]
    return main(args), out


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rc, out = _run(
        tmp_path_factory.mktemp("runs"),
        "full",
        "analyses.kernel=true",
        "analyses.second_order=true",
        "policy.top_p=0.9",
        "output.detail=detailed",
    )
    assert rc == 0
    return out


def test_results_folder_is_complete(full_run: Path) -> None:
    for rel in (
        "summary.json",
        "report.md",
        "config.yaml",
        "progress.json",
        "arrays/manifest.json",
        "batches/eval.jsonl",
        "batches/update.jsonl",
        "plots/delta_h_vs_eta.png",
        "plots/influence.png",
    ):
        assert (full_run / rel).is_file(), rel
    prog = json.loads((full_run / "progress.json").read_text())
    assert prog["status"] == "complete"
    manifest = json.loads((full_run / "arrays" / "manifest.json").read_text())
    for name, entry in manifest.items():
        arr = np.load(full_run / "arrays" / entry["file"])
        assert list(arr.shape) == entry["shape"], name
    report = (full_run / "report.md").read_text()
    assert "ΔH" in report and "![" in report


def test_summary_is_consistent(full_run: Path) -> None:
    s = json.loads((full_run / "summary.json").read_text())
    assert s["status"] == "complete"
    dec = s["decompositions"]
    # The decomposition is exact: baseline + grad is the full update, so ΔH agrees (float32 model).
    full = np.asarray(dec["full"]["delta_h"])
    both = np.asarray(dec["baseline+grad"]["delta_h"])
    np.testing.assert_allclose(both, full, rtol=1e-3, atol=1e-7)
    eta = np.asarray(s["eta"])
    assert s["eta_reference"] in s["eta"]  # η_ref = the checkpoint's next-step lr joins the grid
    d1 = np.asarray(dec["full"]["first_order"]["delta_h"])
    np.testing.assert_allclose(d1, eta * dec["full"]["first_order"]["slope"], rtol=1e-12)
    assert dec["full"]["second_order"] is not None
    # Influence: column sums are ΔH along each update sequence's component.
    inf = np.load(full_run / "arrays" / "influence_true.npy")
    assert inf.shape == (16, 16)
    np.testing.assert_allclose(inf.sum(0), s["influence"]["column_delta_h"], rtol=1e-9, atol=1e-15)
    k = np.load(full_run / "arrays" / "kernel.npy")
    assert k.shape == (16, 16) and s["kernel"]["n_same"] + s["kernel"]["n_diff"] == 256
    assert s["proxy"] is not None and np.isfinite(s["proxy"]["cov"])
    assert s["checkpoint"]["kind"] == "trainer" and s["checkpoint"]["global_step"] == 5


def test_trust_verdicts_are_stored_and_reported(full_run: Path) -> None:
    """top-p run: the nucleus-changed fraction sits beside ESS/k̂/retained mass for every η and
    decomposition; every decomposition has per-η verdicts; every untrusted η is in the warnings of
    summary.json, report.md and `deltah inspect` alike."""
    from deltaH.analysis import trust_warnings

    s = json.loads((full_run / "summary.json").read_text())
    n_eta = len(s["eta"])
    for name, d in s["decompositions"].items():
        moved = np.asarray(d["nucleus_changed"], dtype=float)
        assert moved.shape == (n_eta,) and ((moved >= 0) & (moved <= 1)).all(), name
        assert len(s["trust"]["decompositions"][name]["trusted"]) == n_eta
    assert np.load(full_run / "arrays" / "nucleus_changed.npy").shape == (n_eta, 4)
    tr = s["trust"]
    assert len(tr["per_eta"]) == n_eta and tr["top_p"] is True and tr["dtype"] == "float32"
    assert tr["khat_threshold"] == pytest.approx(1 - 1 / np.log10(16))
    flags = trust_warnings(tr)
    assert all(w in s["warnings"] for w in flags)
    report = (full_run / "report.md").read_text()
    assert all(w in report for w in flags)
    assert ("No warnings were raised" in report) == (not s["warnings"])
    assert s["checkpoint"]["max_grad_norm"] == 1.0 and s["checkpoint"]["dtype"] == "float32"


def test_bfloat16_run_reports_bfloat16(tmp_path: Path) -> None:
    """A bfloat16 run says bfloat16 (not the float32 of its LoRA adapters) and its precision floor
    uses bfloat16's rounding noise."""
    from deltaH.analysis import rounding_noise

    tiny = ["eval_batch.total_sequences=8", "analyses.influence=false", "analyses.proxy=false",
            "eta.grid=[1e-4]", "output.plots=false", "checkpoint.dtype=bfloat16"]
    rc, out = _run(tmp_path, "bf16", *tiny)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["checkpoint"]["dtype"] == "bfloat16" and s["checkpoint"]["trainable_dtype"] == "float32"
    assert s["trust"]["dtype"] == "bfloat16"
    assert s["trust"]["noise"] == pytest.approx(rounding_noise("bfloat16", s["h_orig"], 8))
    assert "computed in bfloat16" in (out / "report.md").read_text()


def test_eval_batch_matches_saved_stats(full_run: Path) -> None:
    rows = [json.loads(line) for line in (full_run / "batches" / "eval.jsonl").read_text().splitlines()]
    logq = np.load(full_run / "arrays" / "eval_logq.npy")
    np.testing.assert_allclose([r["logq"] for r in rows], logq)
    assert all(np.isfinite(logq))  # sampled from q itself, top-p included


def test_inspect_prints_a_table(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(full_run)]) == 0
    out = capsys.readouterr().out
    for name in ("full", "baseline", "grad"):
        assert name in out


def test_never_overwrites(full_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (full_run / "summary.json").read_bytes()
    rc = main(["-q", "run", "configs/toy.yaml", "--out", str(full_run)])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (full_run / "summary.json").read_bytes() == before


def test_bad_config_is_one_line_before_any_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("deltaH.io.checkpoint.load_checkpoint", boom)
    rc = main(["run", "configs/toy.yaml", "--set", "policy.top_p=1.5", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "policy.top_p" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_missing_checkpoint_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "run",
            "configs/toy.yaml",
            "--set",
            f"checkpoint.path={tmp_path / 'nope'}",
            "--out",
            str(tmp_path / "y"),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint.path" in err


def test_interrupt_then_resume_skips_finished_analyses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config("configs/toy.yaml", SHORT)
    real = runner.influence_matrix

    def interrupted(*a: object, **k: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "influence_matrix", interrupted)
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, out=out, quiet=True)
    prog = ResultsDir.open(out).progress()
    assert prog["status"] == "incomplete" and "true" in prog["done"]
    assert (out / "arrays" / "delta_h.npy").is_file()  # what finished is saved and valid

    calls = []
    real_true = runner.delta_h_true_multi

    def counting(*a: object, **k: object) -> object:
        calls.append(1)
        return real_true(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(runner, "influence_matrix", real)
    monkeypatch.setattr(runner, "delta_h_true_multi", counting)
    runner.run(cfg, resume=out, quiet=True)
    assert calls == []  # the η sweep was not redone
    assert ResultsDir.open(out).progress()["status"] == "complete"
    assert (out / "report.md").is_file()


def test_study_of_several_checkpoints(tmp_path: Path) -> None:
    from deltaH.toy import toy_checkpoint_path

    p = str(toy_checkpoint_path())
    rc, out = _run(
        tmp_path,
        "study",
        f"checkpoint.path=[{p}, {p}]",
        "analyses.influence=false",
        "analyses.first_order=true",
    )
    assert rc == 0
    study = json.loads((out / "study.json").read_text())
    assert len(study["checkpoints"]) == 2
    assert (
        study["checkpoints"][0]["h_orig"] == study["checkpoints"][1]["h_orig"]
    )  # same seed, same checkpoint
    assert (out / "plots" / "trajectory.png").is_file()


def test_detail_levels(tmp_path: Path) -> None:
    tiny = ["eval_batch.total_sequences=8", "analyses.influence=false", "eta.grid=[1e-4]"]
    rc, minimal = _run(tmp_path, "minimal", *tiny, "output.detail=minimal", "output.plots=false")
    assert rc == 0
    assert (minimal / "summary.json").is_file() and (minimal / "report.md").is_file()
    assert not (minimal / "batches" / "eval.jsonl").exists()
    assert not (minimal / "arrays" / "per_sequence_full.npy").exists()
    rc, debug = _run(tmp_path, "debug", *tiny, "output.detail=debug")
    assert rc == 0
    arrays = ResultsDir.open(debug).load_arrays()
    assert "per_sequence_full" in arrays
    # Per-token diagnostics add up to the per-sequence statistics saved beside them.
    rows = arrays["eval_token_row"].astype(int)
    per_seq = np.bincount(rows, weights=arrays["eval_token_logq"], minlength=8)
    np.testing.assert_allclose(per_seq, arrays["eval_logq"], rtol=1e-5, atol=1e-5)
    assert ((arrays["eval_token_top1"] > 0) & (arrays["eval_token_top1"] <= 1)).all()
    assert (arrays["eval_token_nucleus"] >= 1).all() and (arrays["eval_token_eos"] >= 0).all()
