"""Other trainers' rollouts (``deltaH.io.rollouts.load_rollouts``): TRL-shaped micro-batches and bad rows.

The expected tensors are written out by hand (TRL's padding: prompts left, completions right) and
the expected advantages come from TRL's formula in numpy, so nothing here reuses the loader's code.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from deltaH.errors import ArgumentError, DataError, NotFoundError
from deltaH.io.rollouts import load_rollouts
from deltaH.updates.recorded import TrainerOptions

ROWS: list[dict[str, Any]] = [
    {"prompt_ids": [5, 6, 7], "completion_ids": [8, 1], "reward": 1.0, "group": "a",
     "old_logprobs": [-0.5, -0.25], "truncated": False},
    {"prompt_ids": [5, 6, 7], "completion_ids": [9, 9, 9], "reward": 0.0, "group": "a",
     "old_logprobs": [-1.0, -2.0, -3.0], "truncated": True},
    {"prompt_ids": [4], "completion_ids": [3], "reward": 2.0, "group": 7,
     "old_logprobs": [-0.125], "truncated": False},
    {"prompt_ids": [4], "completion_ids": [2, 2, 2, 1], "reward": 5.0, "group": 7,
     "old_logprobs": [-1.5, -1.5, -1.5, -0.5], "truncated": False, "other_field": "ignored"},
]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _trl_advantages(rewards: list[float], groups: list[Any], scale: str) -> np.ndarray:
    """TRL's rule: centre within the group; divide by the group's (or the batch's) unbiased std + 1e-4."""
    r = np.asarray(rewards, dtype=np.float64)
    out = np.empty_like(r)
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        out[idx] = r[idx] - r[idx].mean()
        if scale == "group":
            out[idx] /= r[idx].std(ddof=1) + 1e-4
    if scale == "batch":
        out /= r.std(ddof=1) + 1e-4
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_good_file_gives_trl_micro_batches(tmp_path: Path, scale: str) -> None:
    path = _write(tmp_path / "r.jsonl", ROWS)
    opts = TrainerOptions(scale_rewards=scale, gradient_accumulation_steps=2)
    rec = load_rollouts(path, options=opts, micro_batches=2, pad_token_id=0)
    assert rec.step == 0 and rec.rank == 0 and len(rec.micro_batches) == 2
    assert rec.options.steps_per_generation == 2 and rec.options.scale_rewards == scale
    assert rec.meta["rows"] == 4 and rec.meta["current_gradient_accumulation_steps"] == 2
    m0, m1 = rec.micro_batches
    assert torch.equal(m0["prompt_ids"], torch.tensor([[5, 6, 7], [5, 6, 7]]))
    assert torch.equal(m1["prompt_ids"], torch.tensor([[0, 0, 4], [0, 0, 4]]))  # left-padded to file width
    assert torch.equal(m1["prompt_mask"], torch.tensor([[0, 0, 1], [0, 0, 1]]))
    assert torch.equal(m0["completion_ids"], torch.tensor([[8, 1, 0, 0], [9, 9, 9, 0]]))
    assert torch.equal(m1["completion_ids"], torch.tensor([[3, 0, 0, 0], [2, 2, 2, 1]]))
    assert torch.equal(m0["completion_mask"], torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]]))
    for mb in (m0, m1):
        assert mb["prompt_ids"].dtype == mb["completion_mask"].dtype == torch.long
        assert mb["num_items_in_batch"].shape == () and int(mb["num_items_in_batch"]) == 2 + 3 + 1 + 4
        assert "ref_per_token_logps" not in mb
    assert torch.equal(m1["old_per_token_logps"], torch.tensor([[-0.125, 0, 0, 0], [-1.5, -1.5, -1.5, -0.5]]))
    assert m0["old_per_token_logps"].dtype == torch.float32
    want = _trl_advantages([r["reward"] for r in ROWS], [r["group"] for r in ROWS], scale)
    got = torch.cat([m0["advantages"], m1["advantages"]])
    assert got.dtype == torch.float32
    # float64 math on both sides, then one rounding to float32: at most 1 ulp of float32 apart.
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1.2e-7, atol=0)


def test_advantages_given_directly_and_truncation_masked(tmp_path: Path) -> None:
    rows = [{**{k: v for k, v in r.items() if k != "reward"}, "advantage": a,
             "ref_logprobs": r["old_logprobs"]} for r, a in zip(ROWS, [0.5, -0.5, 1.5, -1.5], strict=True)]
    path = _write(tmp_path / "r.jsonl", rows)
    opts = TrainerOptions(mask_truncated_completions=True, beta=0.04)
    rec = load_rollouts(path, options=opts)
    (mb,) = rec.micro_batches
    assert torch.equal(mb["advantages"], torch.tensor([0.5, -0.5, 1.5, -1.5]))
    assert torch.equal(mb["completion_mask"][1], torch.zeros(4, dtype=torch.long))  # truncated row
    assert int(mb["num_items_in_batch"]) == 2 + 1 + 4
    assert torch.equal(mb["ref_per_token_logps"], mb["old_per_token_logps"])
    assert rec.meta["pad_token_id"] == 0


def test_text_rows_are_tokenised_with_one_warning(tmp_path: Path) -> None:
    from deltaH.toy import build_tokenizer

    tok = build_tokenizer()
    rows = [{"prompt": "12+7=", "completion": "19", "advantage": 1.0},
            {"prompt": "3-1=", "completion_ids": [6, tok.eos_token_id], "advantage": -1.0}]
    path = _write(tmp_path / "r.jsonl", rows)
    with pytest.warns(RuntimeWarning, match="tokenised again") as caught:
        rec = load_rollouts(path, tokenizer=tok, options=TrainerOptions())
    assert len(caught) == 1
    (mb,) = rec.micro_batches
    p0, p1 = tok(text="12+7=")["input_ids"], tok(text="3-1=")["input_ids"]
    c0 = tok(text="19", add_special_tokens=False)["input_ids"]
    assert mb["prompt_ids"][0, -len(p0):].tolist() == p0 and mb["prompt_ids"][1, -len(p1):].tolist() == p1
    assert mb["completion_ids"][0, :len(c0)].tolist() == c0
    assert rec.meta["pad_token_id"] == tok.pad_token_id and rec.meta["eos_token_id"] == tok.eos_token_id


def test_parquet_reads_like_jsonl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{k: v for k, v in r.items() if k != "other_field"} for r in ROWS]
    for r in rows:
        r["group"] = str(r["group"])  # one type per Parquet column
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    a = load_rollouts(tmp_path / "r.parquet", options=TrainerOptions())
    b = load_rollouts(_write(tmp_path / "r.jsonl", rows), options=TrainerOptions())
    for k in b.micro_batches[0]:
        assert torch.equal(a.micro_batches[0][k], b.micro_batches[0][k]), k

    bad = dict(rows[1], completion_ids=[9, -1, 9])
    pq.write_table(pa.Table.from_pylist([rows[0], bad]), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: field 'completion_ids': -1 is not a token id"):
        load_rollouts(tmp_path / "bad.parquet", options=TrainerOptions())
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rollouts(tmp_path / "garbage.parquet", options=TrainerOptions())
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install pyarrow"):
        load_rollouts(tmp_path / "r.parquet", options=TrainerOptions())


# ------------------------------------------------------------------------------------- malformed rows
GOOD = {"prompt_ids": [1, 2], "completion_ids": [3, 4], "advantage": 1.0}
# (name, rows, line of the error, field, words of the problem)
BAD: list[tuple[str, list[Any], int, str | None, str]] = [
    ("not_json", [GOOD, '{"prompt_ids": [1,'], 2, None, "not valid JSON"),
    ("not_object", [GOOD, "[1, 2]"], 2, None, "a JSON list, not an object"),
    ("no_prompt", [GOOD, {"completion_ids": [3], "advantage": 1.0}], 2, "prompt_ids", "missing"),
    ("prompt_not_list", [{**GOOD, "prompt_ids": "1 2"}], 1, "prompt_ids", "not a non-empty list"),
    ("prompt_empty", [{**GOOD, "prompt_ids": []}], 1, "prompt_ids", "not a non-empty list"),
    ("prompt_str_id", [{**GOOD, "prompt_ids": [1, "2"]}], 1, "prompt_ids", "'2' is not a token id"),
    ("prompt_negative", [{**GOOD, "prompt_ids": [1, -2]}], 1, "prompt_ids", "-2 is not a token id"),
    ("prompt_bool", [{**GOOD, "prompt_ids": [True]}], 1, "prompt_ids", "True is not a token id"),
    ("prompt_float", [{**GOOD, "prompt_ids": [1.0]}], 1, "prompt_ids", "1.0 is not a token id"),
    ("prompt_null_id", [{**GOOD, "prompt_ids": [1, None]}], 1, "prompt_ids", "None is not a token id"),
    ("prompt_huge", [{**GOOD, "prompt_ids": [2**64]}], 1, "prompt_ids", "is not a token id"),
    ("no_completion", [{"prompt_ids": [1], "advantage": 0.0}], 1, "completion_ids", "missing"),
    ("completion_empty", [{**GOOD, "completion_ids": []}], 1, "completion_ids", "not a non-empty list"),
    ("text_no_tokenizer", [{**GOOD, "prompt_ids": None, "prompt": "1+1="}], 1, "prompt", "needs a tokenizer"),
    ("text_empty", [{"prompt": "", "completion_ids": [1], "advantage": 0.0}], 1, "prompt",
     "not a non-empty string"),
    ("text_not_str", [{"prompt": 12, "completion_ids": [1], "advantage": 0.0}], 1, "prompt",
     "not a non-empty string"),
    ("adv_str", [{**GOOD, "advantage": "1.0"}], 1, "advantage", "not a finite number"),
    ("adv_nan", [GOOD, '{"prompt_ids": [1], "completion_ids": [2], "advantage": NaN}'], 2, "advantage",
     "not a finite number"),
    ("adv_inf", ['{"prompt_ids": [1], "completion_ids": [2], "advantage": Infinity}'], 1, "advantage",
     "not a finite number"),
    ("adv_bool", [{**GOOD, "advantage": True}], 1, "advantage", "not a finite number"),
    ("reward_str", [{"prompt_ids": [1], "completion_ids": [2], "reward": "x", "group": 1}], 1, "reward",
     "not a finite number"),
    ("no_adv_no_reward", [{"prompt_ids": [1], "completion_ids": [2]}], 1, "advantage", "missing"),
    ("reward_no_group", [{"prompt_ids": [1], "completion_ids": [2], "reward": 1.0, "group": 0},
                         {"prompt_ids": [1], "completion_ids": [2], "reward": 1.0}], 2, "group", "missing"),
    ("group_float", [{"prompt_ids": [1], "completion_ids": [2], "reward": 1.0, "group": 1.5}], 1, "group",
     "not a string or an int"),
    ("group_bool", [{**GOOD, "group": False}], 1, "group", "not a string or an int"),
    ("group_list", [{**GOOD, "group": [1]}], 1, "group", "not a string or an int"),
    ("adv_then_reward", [GOOD, {"prompt_ids": [1], "completion_ids": [2], "reward": 1.0, "group": 0}], 2,
     "advantage", "missing, but"),
    ("reward_then_adv", [{"prompt_ids": [1], "completion_ids": [2], "reward": 1.0, "group": 0}, GOOD], 2,
     "reward", "missing, but"),
    ("old_wrong_length", [{**GOOD, "old_logprobs": [-1.0]}], 1, "old_logprobs", "1 values for 2 completion"),
    ("old_null", [{**GOOD, "old_logprobs": [-1.0, None]}], 1, "old_logprobs", "None is not a finite number"),
    ("old_not_list", [{**GOOD, "old_logprobs": -1.0}], 1, "old_logprobs", "not a list of floats"),
    ("old_some_rows", [{**GOOD, "old_logprobs": [-1.0, -1.0]}, GOOD], 2, "old_logprobs", "missing, but"),
    ("old_later_rows", [GOOD, {**GOOD, "old_logprobs": [-1.0, -1.0]}], 1, "old_logprobs", "missing, but"),
    ("ref_some_rows", [{**GOOD, "ref_logprobs": [-1.0, -1.0]}, GOOD], 2, "ref_logprobs", "missing, but"),
    ("truncated_str", [{**GOOD, "truncated": "yes"}], 1, "truncated", "not true or false"),
]


@pytest.mark.parametrize("name, rows, line, field, words", BAD, ids=[b[0] for b in BAD])
def test_malformed_rows_are_one_line_errors(tmp_path: Path, name: str, rows: list[Any], line: int,
                                            field: str | None, words: str) -> None:
    path = _write(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_rollouts(path, options=TrainerOptions())
    msg = str(e.value)
    assert "\n" not in msg
    head = f"{path}:{line}: " + (f"field '{field}': " if field else "")
    assert msg.startswith(head), msg
    assert words in msg and re.search(r"; \w", msg), msg  # the problem, then the fix


@pytest.mark.parametrize("case", ["beta_needs_ref", "mask_needs_truncated", "not_divisible", "empty",
                                  "suffix", "not_utf8", "missing"])
def test_file_level_problems(tmp_path: Path, case: str) -> None:
    path = _write(tmp_path / "r.jsonl", [GOOD, GOOD, GOOD])
    opts, mbs, err, words = TrainerOptions(), 1, DataError, ""
    if case == "beta_needs_ref":
        opts, words = TrainerOptions(beta=0.04), f"{path}:1: field 'ref_logprobs': missing; options.beta=0.04"
    if case == "mask_needs_truncated":
        opts, words = TrainerOptions(mask_truncated_completions=True), f"{path}:1: field 'truncated': missing"
    if case == "not_divisible":
        opts, mbs, words = TrainerOptions(gradient_accumulation_steps=2), 2, "3 rows do not split"
    if case == "empty":
        path.write_text("\n\n")
        words = "no rows"
    if case == "suffix":
        path = path.rename(tmp_path / "r.csv")
        words = "unknown rollout file type '.csv'"
    if case == "not_utf8":
        path.write_bytes(b"\xff\xfe\x00bad")
        words = "not UTF-8"
    if case == "missing":
        path, err, words = tmp_path / "nope.jsonl", NotFoundError, "does not exist"
    with pytest.raises(err, match=re.escape(words)) as e:
        load_rollouts(path, options=opts, micro_batches=mbs)
    assert "\n" not in str(e.value)


def test_argument_checks(tmp_path: Path) -> None:
    path = _write(tmp_path / "r.jsonl", [GOOD, GOOD])
    with pytest.raises(ArgumentError, match="micro_batches must be an int >= 1"):
        load_rollouts(path, options=TrainerOptions(), micro_batches=0)
    with pytest.raises(ArgumentError, match="gradient_accumulation_steps=1 but micro_batches=2"):
        load_rollouts(path, options=TrainerOptions(), micro_batches=2)
    with pytest.raises(ArgumentError, match="steps_per_generation=4"):
        load_rollouts(path, options=TrainerOptions(steps_per_generation=4))
    with pytest.raises(ArgumentError, match="options.trainer"):
        load_rollouts(path, options=TrainerOptions(trainer="Trainer"))
    with pytest.raises(ArgumentError, match="scale_rewards"):
        load_rollouts(path, options=TrainerOptions(scale_rewards="rank"))
    with pytest.raises(TypeError, match="TrainerOptions"):
        load_rollouts(path, options={"loss_type": "dapo"})  # type: ignore[arg-type]
    rec = load_rollouts(path, options=TrainerOptions(gradient_accumulation_steps=2, steps_per_generation=2),
                        micro_batches=2)
    assert [len(mb["advantages"]) for mb in rec.micro_batches] == [1, 1]
    assert not math.isnan(float(rec.micro_batches[0]["advantages"][0]))
