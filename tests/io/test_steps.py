"""Step files (``deltaH.io.steps``): round trip, re-done steps, ranks, and every damaged-file case."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltaH
from deltaH.errors import ArgumentError, BatchError, DataError, NotFoundError
from deltaH.io import steps as st
from deltaH.io.steps import find_steps_dir, list_steps, read_step, write_step
from deltaH.updates.recorded import RecordedStep, TrainerOptions


def _mb(seed: int, b: int = 2, p: int = 3, t: int = 4, **extra: Any) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    mb: dict[str, Any] = {
        "prompt_ids": torch.randint(0, 50, (b, p), generator=g),
        "prompt_mask": torch.ones(b, p, dtype=torch.long),
        "completion_ids": torch.randint(0, 50, (b, t), generator=g),
        "completion_mask": (torch.rand(b, t, generator=g) > 0.3).int(),
        "advantages": torch.randn(b, generator=g),
        "num_items_in_batch": torch.tensor(11),
    }
    mb.update(extra)
    return mb


def _rec(step: int = 3, seed: int = 0, rank: int = 0, world_size: int = 1, n_mb: int = 2,
         **opts: Any) -> RecordedStep:
    return RecordedStep(step=step, micro_batches=[_mb(seed + k) for k in range(n_mb)],
                        options=TrainerOptions(world_size=world_size, beta=0.04, extra={"note": "x"}, **opts),
                        rank=rank, meta={"learning_rate": 1e-3, "eos_token_id": [2, 7], "pad_token_id": 0})


def _same(a: RecordedStep, b: RecordedStep) -> None:
    assert (a.step, a.rank, a.options, a.meta) == (b.step, b.rank, b.options, b.meta)
    assert len(a.micro_batches) == len(b.micro_batches)
    for x, y in zip(a.micro_batches, b.micro_batches, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            want = torch.as_tensor(x[k])
            assert y[k].dtype == want.dtype and torch.equal(y[k], want), k


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ------------------------------------------------------------------------------------- the format
def test_round_trip_and_sidecar(tmp_path: Path) -> None:
    rec = _rec()
    logps = torch.randn(2, 4, dtype=torch.bfloat16)
    rec.micro_batches[0]["old_per_token_logps"] = logps
    rec.micro_batches[1]["old_per_token_logps"] = torch.randn(4, 2, dtype=torch.bfloat16).T  # not contiguous
    rec.micro_batches[1]["tool_mask"] = None  # left out
    rec.micro_batches[0]["tool_mask"] = None
    js = write_step(tmp_path, rec)
    assert js == tmp_path / "step-3.json" and (tmp_path / "step-3.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-3.json", "step-3.safetensors"]  # no temp file

    side = json.loads(js.read_text())
    assert side["format"] == "deltah-step" and side["version"] == 1
    assert (side["step"], side["rank"], side["world_size"], side["micro_batches"]) == (3, 0, 1, 2)
    assert side["trainer"] == "GRPOTrainer" and side["deltah_version"] == deltaH.__version__
    assert side["options"] == rec.options.to_dict() and side["meta"] == rec.meta
    assert side["bytes"] == (tmp_path / "step-3.safetensors").stat().st_size
    raw = load_file(tmp_path / "step-3.safetensors")
    assert set(raw) == {f"mb{k}.{f}" for k in (0, 1) for f in [*_mb(0), "old_per_token_logps"]}
    assert raw["mb0.num_items_in_batch"].shape == ()
    assert raw["mb0.old_per_token_logps"].dtype == torch.bfloat16
    assert side["tensors"]["mb1.prompt_ids"] == {"dtype": "int64", "shape": [2, 3]}

    (back,) = read_step(tmp_path, 3)
    for mb in rec.micro_batches:
        mb.pop("tool_mask")
    _same(rec, back)
    assert back.options.extra == {"note": "x"} and back.options.beta == 0.04


def test_shared_memory_and_python_numbers_are_written(tmp_path: Path) -> None:
    """TRL hands every micro-batch the same 0-dim num_items tensor and slices of one buffer."""
    buf = torch.arange(24).reshape(4, 6)
    n = torch.tensor(9)
    mbs = [_mb(0, num_items_in_batch=n, prompt_ids=buf[:2, :3], completion_ids=buf[:2, 2:]),
           _mb(1, num_items_in_batch=n, prompt_ids=buf[2:, :3], completion_ids=buf[2:, 2:])]
    mbs[1]["num_items_in_batch"] = 9  # a Python int becomes a 0-dim tensor
    write_step(tmp_path, RecordedStep(1, mbs))
    (back,) = read_step(tmp_path, 1)
    assert torch.equal(back.micro_batches[1]["completion_ids"], buf[2:, 2:])
    n_back = back.micro_batches[1]["num_items_in_batch"]
    assert n_back.shape == () and n_back.dtype == torch.int64 and int(n_back) == 9


def test_sft_fields_round_trip(tmp_path: Path) -> None:
    ids = torch.randint(0, 30, (2, 5))
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
          "num_items_in_batch": torch.tensor(8)}
    rec = RecordedStep(2, [mb], options=TrainerOptions(trainer="Trainer", gradient_accumulation_steps=1))
    write_step(tmp_path, rec)
    _same(rec, read_step(tmp_path, 2)[0])


def test_find_and_list_steps(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    assert find_steps_dir(run / "checkpoint-2") is None
    for s in (2, 10, 1):
        write_step(run / "deltah-steps", _rec(step=s))
    assert find_steps_dir(run / "checkpoint-2") == run / "deltah-steps"
    assert list_steps(run / "deltah-steps") == [1, 2, 10]
    with pytest.raises(NotFoundError):
        list_steps(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------- re-done steps
def test_a_redone_step_keeps_every_earlier_version(tmp_path: Path) -> None:
    first, second, third = _rec(seed=0), _rec(seed=10), _rec(seed=20)
    for r in (first, second, third):
        write_step(tmp_path, r)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-3.json", "step-3.prev-1.json", "step-3.prev-1.safetensors", "step-3.prev-2.json",
                     "step-3.prev-2.safetensors", "step-3.safetensors"]
    assert list_steps(tmp_path) == [3]
    _same(third, read_step(tmp_path, 3)[0])
    for k, want in ((1, first), (2, second)):  # renamed back into a folder of their own, they read as written
        d = tmp_path / f"v{k}"
        d.mkdir()
        for ext in ("json", "safetensors"):
            shutil.copy(tmp_path / f"step-3.prev-{k}.{ext}", d / f"step-3.{ext}")
        _same(want, read_step(d, 3)[0])


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_step(tmp_path, _rec(seed=0))

    def broken(tensors: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        write_step(tmp_path, _rec(seed=1))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["step-3.prev-1.json", "step-3.prev-1.safetensors"]  # the old version, nothing else
    with pytest.raises(NotFoundError):
        read_step(tmp_path, 3)


# ------------------------------------------------------------------------------------- ranks
def test_one_file_per_rank(tmp_path: Path) -> None:
    recs = [_rec(rank=r, world_size=2, seed=10 * r) for r in (1, 0)]
    for r in recs:
        write_step(tmp_path, r)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-3.rank0.json", "step-3.rank0.safetensors", "step-3.rank1.json", "step-3.rank1.safetensors"]
    assert list_steps(tmp_path) == [3]
    back = read_step(tmp_path, 3)
    assert [b.rank for b in back] == [0, 1]
    _same(recs[1], back[0])
    _same(recs[0], back[1])


def test_rank_problems(tmp_path: Path) -> None:
    write_step(tmp_path, _rec(rank=0, world_size=3))
    write_step(tmp_path, _rec(rank=2, world_size=3))
    with pytest.raises(DataError, match=r"world_size=3.*missing ranks \[1\]") as e:
        read_step(tmp_path, 3)
    _one_line(e)
    write_step(tmp_path, _rec(rank=1, world_size=3, loss_type="grpo"))
    with pytest.raises(DataError, match=r"step-3\.rank1\.json: field 'options': \['loss_type'\]"):
        read_step(tmp_path, 3)
    write_step(tmp_path, _rec(rank=1, world_size=3, n_mb=1))
    with pytest.raises(DataError, match=r"1 micro-batches"):
        read_step(tmp_path, 3)
    write_step(tmp_path, _rec(rank=1, world_size=3))
    assert len(read_step(tmp_path, 3)) == 3
    write_step(tmp_path, _rec())  # a one-process file of the same step beside them
    with pytest.raises(DataError, match="both step-3.json"):
        read_step(tmp_path, 3)
    with pytest.raises(ArgumentError):
        write_step(tmp_path, _rec(rank=3, world_size=3))


# ------------------------------------------------------------------------------------- damaged files
def _damage(tmp_path: Path, how: str) -> str:
    """Write step 3 and damage it; returns a regex the DataError must match."""
    js, sf = tmp_path / "step-3.json", tmp_path / "step-3.safetensors"
    rec = _rec()
    if how == "missing_field":
        del rec.micro_batches[1]["advantages"]
    if how == "shape":
        rec.micro_batches[0]["completion_mask"] = torch.ones(2, 5, dtype=torch.long)
    if how == "adv_shape":
        rec.micro_batches[0]["advantages"] = torch.ones(3)
    if how == "dtype":
        rec.micro_batches[0]["prompt_ids"] = rec.micro_batches[0]["prompt_ids"].float()
    if how == "fields_differ":
        rec.micro_batches[1]["tool_mask"] = torch.ones(2, 4, dtype=torch.long)
    if how == "num_items_shape":
        rec.micro_batches[0]["num_items_in_batch"] = torch.tensor([3, 4])
    write_step(tmp_path, rec)
    side = json.loads(js.read_text())
    if how == "truncated":
        sf.write_bytes(sf.read_bytes()[:-7])
        return r"step-3\.safetensors: \d+ bytes but its sidecar says"
    if how == "garbage":
        n = sf.stat().st_size
        sf.write_bytes(b"\x00" * n)
        return r"step-3\.safetensors: not a readable safetensors file"
    if how == "no_sidecar":
        js.unlink()
        return r"step-3\.safetensors: step 3 is incomplete"
    if how == "no_tensors":
        sf.unlink()
        return r"step-3\.safetensors: missing beside its sidecar"
    if how == "bad_json":
        js.write_text("{not json")
        return r"step-3\.json: not a readable JSON sidecar"
    if how == "wrong_format":
        side["format"] = "something-else"
    if how == "newer":
        side["version"] = 2
    if how == "renamed":
        side["step"] = 4
    if how == "no_options":
        del side["options"]
    if how == "options_not_object":
        side["options"] = [1, 2]
    if how == "bad_mb_count":
        side["micro_batches"] = 0
    if how == "swapped":  # a safetensors of the same size but other tensors
        t = load_file(sf)
        t["mb0.advantages"] = t["mb0.advantages"][:1].clone()
        t["mb0.advantagez"] = t.pop("mb0.advantages")
        save_file(t, sf)
        side["bytes"] = sf.stat().st_size
    if how == "listed_dtype":
        side["tensors"]["mb0.advantages"]["dtype"] = "float64"
    if how == "bad_key":
        t = load_file(sf)
        t["mb7.prompt_ids"] = t["mb0.prompt_ids"].clone()
        save_file(t, sf)
        side["bytes"] = sf.stat().st_size
        side["tensors"]["mb7.prompt_ids"] = side["tensors"]["mb0.prompt_ids"]
    js.write_text(json.dumps(side))
    return {
        "wrong_format": "not a deltaH step sidecar", "newer": "version 2 is newer",
        "renamed": "field 'step': 4 but the file name says 3",
        "no_options": "field 'options': missing", "options_not_object": "field 'options': not an object",
        "bad_mb_count": "'micro_batches' is 0", "swapped": "in only one of the file and its sidecar",
        "listed_dtype": r"field 'mb0.advantages': float32 \[2\] but the sidecar says",
        "bad_key": r"field 'mb7.prompt_ids': not mb<k>.<field> with k < 2",
        "missing_field": r"field 'mb1.advantages': missing",
        "shape": r"field 'mb0.completion_mask': shape \[2, 5\] is not \[B, T\] with B=2, P=3, T=4",
        "adv_shape": r"field 'mb0.advantages': shape \[3\] is not \[B\] or \[B, T\]",
        "dtype": r"field 'mb0.prompt_ids': dtype float32 is not a int dtype",
        "fields_differ": r"micro-batch 1 has fields .*tool_mask",
        "num_items_shape": r"field 'mb0.num_items_in_batch': shape \[2\] is not \[\]",
    }[how]


DAMAGES = ["truncated", "garbage", "no_sidecar", "no_tensors", "bad_json", "wrong_format", "newer", "renamed",
           "no_options", "options_not_object", "bad_mb_count", "swapped", "listed_dtype", "bad_key",
           "missing_field", "shape", "adv_shape", "dtype", "fields_differ", "num_items_shape"]


@pytest.mark.parametrize("how", DAMAGES)
def test_damaged_step_files_are_one_line_data_errors(tmp_path: Path, how: str) -> None:
    pattern = _damage(tmp_path, how)
    with pytest.raises(DataError, match=pattern) as e:
        read_step(tmp_path, 3)
    _one_line(e)


def test_missing_step_and_folder(tmp_path: Path) -> None:
    for s in (1, 2):
        write_step(tmp_path, _rec(step=s))
    with pytest.raises(NotFoundError, match=r"no step file for step 5; recorded steps: \[1, 2\]"):
        read_step(tmp_path, 5)
    with pytest.raises(NotFoundError, match="does not exist"):
        read_step(tmp_path / "nope", 1)
    (tmp_path / "step-9.safetensors").write_bytes(b"")  # the writer stopped before the sidecar
    assert list_steps(tmp_path) == [1, 2]


@pytest.mark.parametrize("bad", ["no_mbs", "string_field", "negative_step"])
def test_write_step_refuses_bad_records(tmp_path: Path, bad: str) -> None:
    rec = _rec()
    if bad == "no_mbs":
        rec.micro_batches = []
    if bad == "string_field":
        rec.micro_batches[0]["prompt"] = "12+7="
    if bad == "negative_step":
        rec.step = -1
    with pytest.raises((BatchError, ArgumentError)):
        write_step(tmp_path, rec)
    assert not any(p.suffix in (".json", ".safetensors") for p in tmp_path.iterdir())


def test_unknown_trainer_is_read_without_field_rules(tmp_path: Path) -> None:
    rec = RecordedStep(1, [{"x": torch.ones(3)}], options=TrainerOptions(trainer="MyTrainer"))
    write_step(tmp_path, rec)
    _same(rec, read_step(tmp_path, 1)[0])
    assert os.path.basename(st.STEPS_DIRNAME) == "deltah-steps"


def test_docs_page_lists_every_sidecar_key_and_field(tmp_path: Path) -> None:
    """docs/step-files.md describes what write_step writes: each sidecar key and GRPO field by name."""
    from deltaH.updates.recorded import MICRO_BATCH_FIELDS, OPTIONAL_FIELDS

    doc = (Path(__file__).resolve().parents[2] / "docs" / "step-files.md").read_text(encoding="utf-8")
    side = json.loads(write_step(tmp_path, _rec()).read_text())
    names = [*side, *MICRO_BATCH_FIELDS, *OPTIONAL_FIELDS, *st.SFT_FIELDS]
    missing = [k for k in names if f"`{k}`" not in doc]
    assert not missing, f"docs/step-files.md does not name {missing}"
