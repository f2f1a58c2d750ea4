"""The runner and the `deltah` CLI end to end on the embedded toy (short settings)."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import deltaH.runner as runner
from deltaH.cli import main
from deltaH.config import load_config
from deltaH.errors import CheckpointError, OutputExistsError
from deltaH.estimators._sketch import fidelity
from deltaH.functional import FunctionalLM
from deltaH.io.compare import compare_results
from deltaH.io.results import ResultsDir, run_guard
from deltaH.io.schema import RunSummary
from deltaH.runner.controls import MEASURED

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


def test_projected_kernel_with_the_update_prompts(tmp_path: Path) -> None:
    """eval_batch.include_update_prompts populates the same-prompt pairs; a projected kernel reports its
    memory and its fidelity on the exact columns it saved; report and plot show both prompt splits. The
    controls ride along: summary.controls and their report section (their math: test_controls.py)."""
    rc, out = _run(tmp_path, "kern", "analyses.kernel=true", "analyses.kernel_method=projection",
                   "analyses.kernel_subspace=3", "analyses.kernel_proj_dim=64",
                   "analyses.kernel_check_columns=4", "eval_batch.include_update_prompts=true",
                   "analyses.influence=false", "analyses.controls=true", "analyses.entropy_target=1e-4")
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    arr = ResultsDir.open(out).load_arrays()
    k = arr["kernel"]
    assert k.shape == (16 + 4 * 4, 16) and s["batches"]["eval"]["n"] == 32
    # Same prompt = same prompt text in the saved batches (the toy tokenizer is character level).
    ev = [json.loads(x) for x in (out / "batches" / "eval.jsonl").read_text().splitlines()]
    up = [json.loads(x) for x in (out / "batches" / "update.jsonl").read_text().splitlines()]
    same = arr["kernel_prompt_eval"][:, None] == arr["kernel_prompt_update"][None, :]
    assert same.tolist() == [[e["prompt"] == u["prompt"] for u in up] for e in ev]
    assert [e["update_prompt"] for e in ev] == [False] * 16 + [True] * 16
    kn = s["kernel"]
    assert kn["n_same"] == int(same.sum()) >= 4 * 4 * 4 and kn["n_same"] + kn["n_diff"] == k.size
    assert kn["mean_same"] == pytest.approx(float(k[same].mean()), rel=1e-12)
    assert (kn["subspace"], kn["proj_dim"]) == (3, 64)
    n_params = s["checkpoint"]["n_trainable"]
    assert kn["memory_fraction"] == pytest.approx((3 * n_params + 48 * (3 + 64)) / (48 * n_params), rel=1e-12)
    cols, exact = arr["kernel_check_columns"], arr["kernel_check_exact"]
    assert cols.shape == (4,) and exact.shape == (32, 4)
    want = fidelity(torch.from_numpy(k[:, cols]), torch.from_numpy(exact))
    assert kn["fidelity"] == pytest.approx(want.__dict__, rel=1e-12)
    report = (out / "report.md").read_text()
    assert "Fidelity against the exact kernel on 128 pairs" in report and "plots/kernel.png" in report
    assert (out / "plots" / "kernel.png").is_file()
    c = RunSummary.from_json(s).controls
    assert c is not None and c.target == 1e-4 and c.eta == s["eta_reference"]
    (bonus,) = c.controls
    assert bonus.name == "entropy_coef" and [d.name for d in bonus.directions] == list(MEASURED)
    controlled = bonus.directions[MEASURED.index("controlled")]
    # float32 toy: δH₁ of u + c*·ĉ_H in float32 carries ~ε32 × (token sums) of the two parts it adds up
    # (observed 3e-7 relative); bound 1e-5 of their size
    size = c.eta * (abs(bonus.slope_base) + abs(bonus.coef * bonus.slope_term))
    assert abs(controlled.delta_h1 - 1e-4) <= 1e-5 * size
    section = report.split("## Controls")[1].split("\n## ")[0]
    assert "entropy_coef" in section and "trainer's AdamW step with c*" in section


def test_attribution_agrees_with_the_saved_arrays(full_run: Path) -> None:
    """summary.attribution, the per-sequence arrays and batches/update.jsonl tell one story: each group's ΔH
    is the sum of its rows' influence column sums, its SE the jackknife of the saved leave-one-out columns,
    the total adds the baseline's ΔH at η_ref, and the tags follow from the saved batch."""
    s = json.loads((full_run / "summary.json").read_text())
    a, arr = s["attribution"], ResultsDir.open(full_run).load_arrays()
    d, d1 = arr["update_delta_h"], arr["update_delta_h1"]
    np.testing.assert_allclose(d, arr["influence_true"].sum(0), rtol=1e-12, atol=1e-18)
    np.testing.assert_allclose(d1, arr["influence_first_order"].sum(0), rtol=1e-12, atol=1e-18)
    j = s["eta"].index(s["eta_reference"])
    base = s["decompositions"]["baseline"]
    assert a["baseline"]["true"]["delta_h"] == base["delta_h"][j]
    d1_base = base["first_order"]["delta_h"][j]
    assert a["baseline"]["first_order"]["delta_h"] == pytest.approx(d1_base, rel=1e-12)
    assert a["total"]["true"]["delta_h"] == pytest.approx(d.sum() + base["delta_h"][j], rel=1e-12)
    tags = {
        "advantage_sign": {"positive advantage": arr["update_advantages"] > 0,
                           "negative advantage": arr["update_advantages"] < 0},
        "truncation": {"truncated (no EOS)": arr["update_truncated"],
                       "finished (EOS)": ~arr["update_truncated"]},
    }
    n_checked = 0
    for fam in a["families"]:
        for g in fam["groups"]:
            if fam["name"] == "prompt_group":
                rows = arr["update_group"] == int(g["label"].split(":")[0].removeprefix("group "))
            elif fam["name"] in tags:
                rows = tags[fam["name"]][g["label"]]
            else:
                continue
            assert g["n"] == rows.sum()
            for kind, col, loo in (("true", d, "influence_true_loo"),
                                   ("first_order", d1, "influence_first_order_loo")):
                assert g[kind]["delta_h"] == pytest.approx(col[rows].sum(), rel=1e-12, abs=1e-18)
                g_loo = arr[loo][:, rows].sum(1)
                se = np.sqrt((len(g_loo) - 1) / len(g_loo) * ((g_loo - g_loo.mean()) ** 2).sum())
                assert g[kind]["se"] == pytest.approx(se, rel=1e-9)
            n_checked += 1
    assert n_checked >= 6  # advantage sign and the four prompt groups at least
    # the tags: a response shorter than max_new_tokens stopped at EOS; rows carry their contributions
    rows = [json.loads(ln) for ln in (full_run / "batches" / "update.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["n_tokens"] == arr["update_length"][r["row"]]
        assert r["truncated"] == bool(arr["update_truncated"][r["row"]])
        assert r["n_tokens"] == 6 or not r["truncated"]  # policy.max_new_tokens=6
        assert r["delta_h"] == d[r["row"]] and r["delta_h1_se"] == arr["update_delta_h1_se"][r["row"]]
    top = a["top_lower"][0]
    assert top["delta_h"] == d.min() and top["response"] == rows[top["row"]]["response"]
    report = (full_run / "report.md").read_text()
    assert "## What drove it" in report and "](plots/attribution.png)" in report
    assert (full_run / "plots" / "attribution.png").is_file()


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
    tokens = s["batches"]["eval"]["mean_tokens"]  # the statistics are float64: noise per token
    assert s["trust"]["noise"] == pytest.approx(rounding_noise("bfloat16", s["h_orig"], 8, tokens))
    assert s["trust"]["noise"] < rounding_noise("bfloat16", s["h_orig"], 8)
    assert "computed in bfloat16" in (out / "report.md").read_text()


def test_auto_dtype_computes_a_bfloat16_checkpoint_in_float32(tmp_path: Path) -> None:
    """checkpoint.dtype=auto: a checkpoint saved in bfloat16 runs in float32 (in half precision the
    entropy change of a realistic step is below rounding noise: benchmarks/bench_precision.py)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from deltaH.toy import toy_base_path, toy_checkpoint_path

    base = tmp_path / "base-bf16"
    AutoModelForCausalLM.from_pretrained(toy_base_path(), dtype=torch.bfloat16).save_pretrained(base)
    for f in toy_base_path().iterdir():  # tokenizer files beside the weights
        if f.is_file() and not (base / f.name).exists():
            shutil.copy(f, base / f.name)
    saved = json.loads((base / "config.json").read_text())
    assert "bfloat16" in (saved.get("dtype"), saved.get("torch_dtype"))
    tiny = ["eval_batch.total_sequences=8", "analyses.influence=false", "analyses.proxy=false",
            "eta.grid=[1e-4]", "output.plots=false", f"checkpoint.path={toy_checkpoint_path()}",
            f"checkpoint.base_model={base}"]
    rc, out = _run(tmp_path, "auto", *tiny)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["checkpoint"]["dtype"] == "float32" and s["trust"]["dtype"] == "float32"
    # the summary says so (the LoRA adapters were float32 already: no rounding of the step to explain)
    said = [w for w in s["warnings"] if w.startswith("checkpoint.dtype auto computed")]
    assert len(said) == 1 and "bfloat16 base weights" in said[0] and "replay error" not in said[0]
    rc, out = _run(tmp_path, "kept", *tiny, "checkpoint.dtype=bfloat16")  # asked for: kept
    kept = json.loads((out / "summary.json").read_text())
    assert rc == 0 and kept["checkpoint"]["dtype"] == "bfloat16"
    assert not any(w.startswith("checkpoint.dtype auto") for w in kept["warnings"])


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


def test_interrupt_then_resume_redoes_only_unfinished_stages(tmp_path: Path) -> None:
    cfg = load_config("configs/toy.yaml", SHORT)
    out = tmp_path / "r"

    def interrupt(name: str, event: str) -> None:
        if (name, event) == ("influence", "start"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg, out=out, quiet=True, on_stage=interrupt)
    prog = ResultsDir.open(out).progress()
    assert prog["status"] == "incomplete"
    assert (out / "cache" / "true_sweep.pt").is_file()  # what finished is saved
    assert not (out / "cache" / "influence.pt").exists()

    events: list[tuple[str, str]] = []
    runner.run(cfg, resume=out, quiet=True, on_stage=lambda n, e: events.append((n, e)))
    done = dict(e for e in events if e[1] != "start")
    for finished in ("batches", "theta_stats", "directions", "first_order", "eta_grid", "true_sweep"):
        assert done[finished] == "cached", finished  # not recomputed
    assert done["influence"] == done["attribution"] == done["proxy"] == "computed"
    assert ResultsDir.open(out).progress()["status"] == "complete"
    assert (out / "report.md").is_file() and not (out / "cache").exists()  # the cache served its purpose

    # The interrupted-and-resumed run equals a straight run with the same config.
    straight = runner.run(cfg, out=tmp_path / "straight", quiet=True)
    assert compare_results(straight, out) == []


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


# --------------------------------------------------------------------------------------------
# Errors: exit 2 and one line for bad input (found before a folder exists), exit 1 otherwise


def _cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], *sets: str) -> tuple[int, str, Path]:
    rc, out = _run(tmp_path, "out", *sets)
    return rc, capsys.readouterr().err, out


@pytest.fixture
def toy_copy(tmp_path: Path) -> Path:
    """A writable copy of the toy artifacts; returns its checkpoint folder (the adapter's base is ../base)."""
    from deltaH.toy import toy_checkpoint_path, toy_dir

    shutil.copytree(toy_dir(), tmp_path / "toy")
    return tmp_path / "toy" / toy_checkpoint_path().name


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("deltaH.io.checkpoint.load_checkpoint", boom)


def _one_line_error(rc: int, err: str, out: Path, *needles: str) -> None:
    assert rc == 2, err
    assert err.startswith("deltah: error: ") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()  # found before the results folder was created


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "optimizer.pt"])
def test_damaged_checkpoint_file_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_copy: Path, no_model_load: None, name: str
) -> None:
    data = (toy_copy / name).read_bytes()
    (toy_copy / name).write_bytes(data[: len(data) // 2])
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}")
    _one_line_error(rc, err, out, str(toy_copy / name), "is corrupt or truncated", "re-save")


def test_cuda_on_a_cpu_machine_fails_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_model_load: None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc, err, out = _cli(tmp_path, capsys, "checkpoint.device=cuda")
    _one_line_error(rc, err, out, "'cuda' is not available", "checkpoint.device")


@pytest.mark.parametrize(
    ("sets", "needles"),
    [
        (["data.reward=no_such_module_xyz.mod:score"], ["data.reward", "cannot import module"]),
        (["data.reward=deltaH.sampling.rewards:no_such_fn"], ["data.reward", "no attribute 'no_such_fn'"]),
        (["data.reward=math", "data.answer_field=null"], ["data.reward", "data.answer_field is null"]),
        (["data.prompt_field=nope"], ["has no field 'nope'", "set data.prompt_field"]),
        (["data.path=missing.jsonl"], ["missing.jsonl does not exist", "data.path"]),
        (["data.limit=2"], ["update_batch.n_prompts", "2 prompt(s)"]),
        (["data.limit=10", "eval_batch.group_size=1", "eval_batch.prompts=distinct"],
         ["eval_batch.prompts", "needs 16 prompts", "holds 10"]),
    ],
)
def test_bad_data_or_reward_is_found_before_loading(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_model_load: None,
    sets: list[str],
    needles: list[str],
) -> None:
    rc, err, out = _cli(tmp_path, capsys, *sets)
    _one_line_error(rc, err, out, *needles)


def test_missing_base_model_or_optimizer_names_the_config_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_copy: Path, no_model_load: None
) -> None:
    cfg = json.loads((toy_copy / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "nowhere")
    (toy_copy / "adapter_config.json").write_text(json.dumps(cfg))
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}")
    _one_line_error(rc, err, out, "nowhere", "--set checkpoint.base_model=")

    (toy_copy / "optimizer.pt").unlink()
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}",
                        f"checkpoint.base_model={toy_copy.parent / 'base'}")
    _one_line_error(rc, err, out, "without optimizer.pt", "checkpoint.path")


@pytest.fixture
def failing_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's reward module whose function raises."""
    code = "def score(completions, records):\n    return [1 / 0 for _ in completions]\n"
    (tmp_path / "rw_fails.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rw_fails:score"
    sys.modules.pop("rw_fails", None)


def test_a_reward_that_raises_is_a_failure_with_its_name_and_a_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], failing_reward: str
) -> None:
    rc, err, out = _cli(tmp_path, capsys, f"data.reward={failing_reward}", "eval_batch.total_sequences=4")
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(
        "deltah: failed: RewardError: the reward function 'rw_fails:score' raised ZeroDivisionError: "
        "division by zero"
    ), err
    assert f"(traceback in {out / 'run.log'})" in err and "Traceback" not in err
    log_text = (out / "run.log").read_text()
    assert "Traceback (most recent call last)" in log_text and "ZeroDivisionError" in log_text
    assert ResultsDir.open(out).progress()["status"] == "failed"
    # The folder holds no result: the same --out is usable again, and the old log is kept (appended to).
    ResultsDir.create(tmp_path, out)
    assert (out / "run.log").read_text().startswith(log_text)


@pytest.mark.parametrize("error", [ValueError, KeyError, TypeError])
def test_an_internal_error_is_a_failure_not_bad_input(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    error: type[Exception],
) -> None:
    def broken(*a: object, **k: object) -> None:
        raise error("an invariant broke")

    monkeypatch.setattr(FunctionalLM, "from_model", broken)
    rc, err, out = _cli(tmp_path, capsys)
    assert rc == 1 and err.startswith(f"deltah: failed: {error.__name__}: "), err
    assert "an invariant broke" in err and f"traceback in {out / 'run.log'}" in err
    assert "Traceback" in (out / "run.log").read_text()


def test_bad_input_found_after_the_folder_exists_removes_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise CheckpointError("this model cannot be used: fix it")

    monkeypatch.setattr(FunctionalLM, "from_model", refuse)
    rc, err, out = _cli(tmp_path, capsys)
    _one_line_error(rc, err, out, "this model cannot be used: fix it")


# -- run_guard: what a failed run leaves behind -------------------------------------------------


def _fail_in(rd: ResultsDir, exc: Exception) -> Exception:
    with pytest.raises(type(exc)) as e, run_guard(rd):
        logging.getLogger("deltaH.runner").warning("a warning for the log")
        raise exc
    return e.value


def test_run_guard_removes_only_an_empty_folder_it_created(tmp_path: Path) -> None:
    rd = ResultsDir.create(tmp_path, tmp_path / "a")
    _fail_in(rd, CheckpointError("bad"))
    assert not rd.path.exists()

    rd = ResultsDir.create(tmp_path, tmp_path / "b")
    rd.save_array("eta", np.ones(3), "a result")
    _fail_in(rd, CheckpointError("bad"))
    assert (rd.path / "arrays" / "eta.npy").is_file() and rd.progress()["status"] == "failed"

    pre = tmp_path / "c"
    pre.mkdir()  # the user made it: not ours to remove
    _fail_in(ResultsDir.create(tmp_path, pre), CheckpointError("bad"))
    assert pre.is_dir()

    resumed = ResultsDir.open(rd.path)  # --resume never deletes
    _fail_in(resumed, CheckpointError("bad"))
    assert rd.path.is_dir()


def test_run_guard_keeps_the_log_of_a_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rd = ResultsDir.create(tmp_path, tmp_path / "a")
    exc = _fail_in(rd, RuntimeError("boom"))
    log_text = (rd.path / "run.log").read_text()
    assert "a warning for the log" in log_text and "RuntimeError: boom" in log_text
    assert "Traceback" in log_text
    assert exc.run_log == str(rd.path / "run.log")  # type: ignore[attr-defined]
    assert "Traceback" not in capsys.readouterr().err  # the traceback goes to the file only
    assert not logging.getLogger("deltaH").handlers  # detached after the run
    again = ResultsDir.create(tmp_path, rd.path)  # a failed run without results does not block --out
    again.save_array("eta", np.ones(3), "a result")
    again.set_progress(status="failed")
    with pytest.raises(OutputExistsError):  # ... but one with results does
        ResultsDir.create(tmp_path, rd.path)


def test_inspect_a_folder_that_is_not_a_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a deltaH results folder" in err and "cannot inspect it" in err and "resume" not in err
    rd = ResultsDir.create(tmp_path, tmp_path / "running")
    assert main(["inspect", str(rd.path)]) == 2
    assert "no summary.json yet (status: running)" in capsys.readouterr().err


# -- checkpoint.optimizer: fresh (weights only) ------------------------------------------------------


def test_weights_without_optimizer_state_say_how_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_copy: Path, no_model_load: None
) -> None:
    (toy_copy / "optimizer.pt").unlink()
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}")
    _one_line_error(rc, err, out, "optimizer.pt", "checkpoint.optimizer=fresh")
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}", "checkpoint.optimizer=fresh")
    _one_line_error(rc, err, out, "eta.reference")  # a fresh optimizer has no saved lr


def test_fresh_optimizer_runs_the_first_step_of_a_new_adamw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toy_copy: Path
) -> None:
    (toy_copy / "optimizer.pt").unlink()
    rc, err, out = _cli(tmp_path, capsys, f"checkpoint.path={toy_copy}", "checkpoint.optimizer=fresh",
                        "eta.reference=0.001", "analyses.influence=false", "output.plots=false")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["eta_reference"] == 0.001 and s["update"]["lr_ref"] == 0.001
    assert any("first one of a new AdamW" in w for w in s["warnings"])
    assert "first one of a new AdamW" in (out / "report.md").read_text()


def test_fresh_adamw_is_torchs_first_step() -> None:
    from conftest import tiny_qwen2, with_lora

    from deltaH.runner.orchestrate import fresh_adamw
    from deltaH.updates.adamw import adamw_step

    model = with_lora(tiny_qwen2(dtype=torch.float32))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = fresh_adamw(model, lr=1e-3)
    assert state.fresh == frozenset(named) and all(v == 0 for v in state.step.values())
    g = torch.Generator().manual_seed(0)
    grads = {n: torch.randn(p.shape, generator=g) for n, p in named.items()}
    delta, _ = adamw_step({n: p.detach() for n, p in named.items()}, grads, state)
    before = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(list(named.values()), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for n, p in named.items():
        p.grad = grads[n].clone()
    opt.step()
    for n, p in named.items():
        torch.testing.assert_close(before[n] + delta[n], p.detach(), rtol=0, atol=1e-7)  # float32 ulps


def test_upcast_warning_names_the_step_rounding_of_full_weight_training() -> None:
    """A full-weight half-precision checkpoint: the trainer rounded its step to bf16, deltaH analyses
    the float32 step, so a replay error against the next checkpoint includes that rounding."""
    from types import SimpleNamespace

    from deltaH.runner.summary import source_warnings

    src = SimpleNamespace(kind="sampled", options=None)
    full = source_warnings(None, SimpleNamespace(source=src, upcast_from="bfloat16", upcast_trainable=True),
                           None)  # type: ignore[arg-type]
    assert len(full) == 1 and "its bfloat16 weights" in full[0] and "replay error" in full[0]
    none = source_warnings(None, SimpleNamespace(source=src, upcast_from="", upcast_trainable=False),
                           None)  # type: ignore[arg-type]
    assert none == []
