"""Prompt datasets: every format, fields, templates, and errors that name the file, row and field."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from deltaH.sampling.data import DatasetError, PromptRecord, load_prompts

GSM8K_ROWS: list[dict[str, Any]] = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
               "Altogether 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "What is 1,000 + 234?", "answer": "1000 + 234 = 1234\n#### 1,234"},
    {"question": "Say hi, politely.", "answer": "hi"},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def check_gsm8k(records: list[PromptRecord]) -> None:
    assert [r.id for r in records] == ["0", "1", "2"]
    assert [r.prompt for r in records] == [row["question"] for row in GSM8K_ROWS]
    assert [r.answer for r in records] == ["72", "1,234", "hi"]
    assert [r.raw for r in records] == GSM8K_ROWS  # the full reasoning stays in raw


# --------------------------------------------------------------------------------------------
# Formats


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in GSM8K_ROWS) + "\n\n", encoding="utf-8")  # blank line ok
    check_gsm8k(load_prompts(path))
    check_gsm8k(load_prompts(str(path)))


def test_json_list_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GSM8K_ROWS, indent=2), encoding="utf-8")
    check_gsm8k(load_prompts(path))


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"question": "a\u2028b\u0085c", "answer": "1"}, ensure_ascii=False) + "\r\n",
                    encoding="utf-8")
    (r,) = load_prompts(path)
    assert r.prompt == "a\u2028b\u0085c"


def test_json_file_may_hold_jsonl_or_one_object(tmp_path: Path) -> None:
    check_gsm8k(load_prompts(write_jsonl(tmp_path / "lines.json", GSM8K_ROWS)))
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GSM8K_ROWS[0], indent=2), encoding="utf-8")
    assert [r.answer for r in load_prompts(one)] == ["72"]


def test_csv_round_trip(tmp_path: Path) -> None:
    check_gsm8k(load_prompts(write_csv(tmp_path / "train.csv", GSM8K_ROWS)))  # multi-line, quoted cells


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    path.write_text("\ufeffquestion,answer\nWhat is 2+2?,4\n", encoding="utf-8")
    (r,) = load_prompts(path)
    assert (r.prompt, r.answer, r.raw) == ("What is 2+2?", "4", {"question": "What is 2+2?", "answer": "4"})


def test_parquet_round_trip(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), path)
    check_gsm8k(load_prompts(path))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        load_prompts(path)


def test_corrupt_parquet_is_a_dataset_error(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match="bad.parquet: not a readable Parquet file"):
        load_prompts(path)


def test_hf_datasets_folder_round_trip(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(GSM8K_ROWS).save_to_disk(str(folder))
    check_gsm8k(load_prompts(folder))


def test_hf_datasets_folder_through_a_stub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The glue around ``datasets.load_from_disk``, without needing ``datasets`` installed."""

    class Dataset(list):  # type: ignore[type-arg]
        pass

    stub = types.ModuleType("datasets")
    stub.Dataset = Dataset  # type: ignore[attr-defined]
    stub.load_from_disk = lambda p: Dataset(GSM8K_ROWS)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", stub)
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    check_gsm8k(load_prompts(folder))


def test_hf_folder_without_datasets_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "dataset_info.json").write_text("{}")
    with pytest.raises(ImportError, match="pip install datasets"):
        load_prompts(tmp_path)


def test_hf_dataset_dict_folder_asks_for_a_split(tmp_path: Path) -> None:
    (tmp_path / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(DatasetError, match=r"DatasetDict with splits \['train', 'test'\].*train"):
        load_prompts(tmp_path)


# --------------------------------------------------------------------------------------------
# Fields, ids, limit


def test_custom_fields_ids_and_boxed_answers(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"uid": "a7", "problem": "Half of 3?", "solution": "It is $\\boxed{\\frac{3}{2}}$."},
        {"uid": 12, "problem": "2*21?", "solution": 42},
    ]
    recs = load_prompts(write_jsonl(tmp_path / "m.jsonl", rows), prompt_field="problem",
                        answer_field="solution", id_field="uid")
    assert [(r.id, r.prompt, r.answer) for r in recs] == [("a7", "Half of 3?", "\\frac{3}{2}"),
                                                         ("12", "2*21?", "42")]
    assert recs[1].raw == rows[1]


def test_prompts_without_answers(tmp_path: Path) -> None:
    recs = load_prompts(write_jsonl(tmp_path / "p.jsonl", [{"question": "hello"}]), answer_field=None)
    assert recs == [PromptRecord(id="0", prompt="hello", answer=None, raw={"question": "hello"})]


def test_limit_keeps_first_rows_and_stops_reading(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", GSM8K_ROWS)
    with path.open("a") as f:
        f.write("{broken\n")  # never reached with limit=2
    recs = load_prompts(path, limit=2)
    assert [r.id for r in recs] == ["0", "1"]


def test_prompt_record_is_frozen_and_hashable() -> None:
    r = PromptRecord(id="0", prompt="p", answer="1", raw={"x": [1]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt = "q"  # type: ignore[misc]
    assert hash(r) == hash(PromptRecord(id="0", prompt="p", answer="1", raw={}))


# --------------------------------------------------------------------------------------------
# Templates


@pytest.fixture
def chat_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    hf.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return hf


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "p.jsonl", [{"question": "What is 2+2?", "answer": "4"}])


def test_plain_template(small_file: Path) -> None:
    assert load_prompts(small_file)[0].prompt == "What is 2+2?"
    assert load_prompts(small_file, system_prompt="Be brief.")[0].prompt == "Be brief.\n\nWhat is 2+2?"


def test_format_string_template(small_file: Path) -> None:
    (r,) = load_prompts(small_file, template="Q: {prompt}\nA: {{think}}")
    assert r.prompt == "Q: What is 2+2?\nA: {think}"
    (r,) = load_prompts(small_file, template="[{system_prompt}] {prompt}", system_prompt="S")
    assert r.prompt == "[S] What is 2+2?"


def test_chat_template(small_file: Path, chat_tokenizer: Any) -> None:
    (r,) = load_prompts(small_file, template="chat", tokenizer=chat_tokenizer)
    assert r.prompt == "<|user|>What is 2+2?\n<|assistant|>"
    (r,) = load_prompts(small_file, template="chat", tokenizer=chat_tokenizer, system_prompt="Be brief.")
    assert r.prompt == "<|system|>Be brief.\n<|user|>What is 2+2?\n<|assistant|>"


def test_chat_template_errors(small_file: Path, chat_tokenizer: Any) -> None:
    with pytest.raises(ValueError, match=r"template='chat' needs tokenizer=.*template='plain'"):
        load_prompts(small_file, template="chat")
    chat_tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"template='chat': tokenizer \w+ has no chat_template"):
        load_prompts(small_file, template="chat", tokenizer=chat_tokenizer)


@pytest.mark.parametrize(
    ("template", "system", "pattern"),
    [
        ("Question: {question}", None, r"format string with \{prompt\}.*found fields \['question'\]"),
        ("no fields at all", None, r"found fields \[\]"),
        ("{prompt} {0}", None, r"found fields \['0', 'prompt'\]"),
        ("{prompt", None, "not a valid format string"),
        ("Q: {prompt}", "Be brief.",
         r"system_prompt is set but template 'Q: \{prompt\}' has no \{system_prompt\}"),
    ],
)
def test_bad_format_templates(small_file: Path, template: str, system: str | None, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_prompts(small_file, template=template, system_prompt=system)


# --------------------------------------------------------------------------------------------
# Errors name the file, row and field


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        load_prompts(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(("name", "text"), [("e.jsonl", ""), ("b.jsonl", "\n  \n"), ("e.json", "[]"),
                                            ("h.csv", "question,answer\n"), ("z.csv", "")])
def test_empty_dataset(tmp_path: Path, name: str, text: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=f"{name}: the dataset has no rows"):
        load_prompts(tmp_path / name)


def test_malformed_json_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "1"}\n\n{"question": "b", "answer": \n')
    with pytest.raises(DatasetError, match=r"bad.jsonl: line 3 \(row 1\) is not valid JSON"):
        load_prompts(path)


def test_malformed_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"question": "a"},\n {"question": }\n]')
    with pytest.raises(DatasetError, match=r"bad.json: invalid JSON at line 3"):
        load_prompts(path)


@pytest.mark.parametrize(("name", "text", "pattern"), [
    ("s.jsonl", '{"question": "a", "answer": "1"}\n["question"]\n',
     r"row 1 \(line 2\) is a JSON list, not an object"),
    ("s.json", '[{"question": "a", "answer": "1"}, 7]', r"row 1 is a JSON int, not an object"),
])
def test_rows_must_be_objects(tmp_path: Path, name: str, text: str, pattern: str) -> None:
    (tmp_path / name).write_text(text)
    with pytest.raises(DatasetError, match=pattern):
        load_prompts(tmp_path / name)


def test_missing_field_names_row_field_and_available_fields(tmp_path: Path) -> None:
    rows = [{"question": "a", "answer": "1"}, {"problem": "b", "answer": "2"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DatasetError, match=r"m.jsonl: row 1 \(line 2\) has no field 'question' "
                                           r"\(available: \['answer', 'problem'\]\); "
                                           r"set data.prompt_field \(API: prompt_field=\)"):
        load_prompts(path)
    with pytest.raises(DatasetError, match=r"row 0 \(line 1\) has no field 'solution'.*answer_field="):
        load_prompts(path, answer_field="solution")
    with pytest.raises(DatasetError, match=r"row 0 \(line 1\) has no field 'uid'.*id_field="):
        load_prompts(path, prompt_field="answer", answer_field=None, id_field="uid")


def test_missing_csv_column_names_row_and_field(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", [{"q": "a", "answer": "1"}])
    pattern = r"m.csv: row 0 \(line 2\) has no field 'question' \(available: \['answer', 'q'\]\)"
    with pytest.raises(DatasetError, match=pattern):
        load_prompts(path)


@pytest.mark.parametrize(("row", "kwargs", "pattern"), [
    ({"question": 7, "answer": "1"}, {}, r"row 0 \(line 1\) field 'question' \(prompt_field\) is int 7; "
                                         r"it must be a non-empty string"),
    ({"question": ["a"], "answer": "1"}, {}, r"field 'question' \(prompt_field\) is list \['a'\]"),
    ({"question": "  ", "answer": "1"}, {}, r"field 'question' \(prompt_field\) is empty"),
    ({"question": "a", "answer": None}, {},
     r"field 'answer' \(answer_field\) is NoneType None.*string or a number"),
    ({"question": "a", "answer": True}, {}, r"field 'answer' \(answer_field\) is bool True"),
    ({"question": "a", "answer": {"x": 1}}, {}, r"field 'answer' \(answer_field\) is dict"),
    ({"question": "a", "id": None}, {"id_field": "id", "answer_field": None},
     r"field 'id' \(id_field\) is None"),
])
def test_bad_field_values_name_row_and_field(tmp_path: Path, row: dict[str, Any], kwargs: dict[str, Any],
                                             pattern: str) -> None:
    path = write_jsonl(tmp_path / "v.jsonl", [row])
    with pytest.raises(DatasetError, match=pattern):
        load_prompts(path, **kwargs)


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = [{"id": "x", "question": "a"}, {"id": "y", "question": "b"}, {"id": "x", "question": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DatasetError, match=r"row 2 \(line 3\) repeats id 'x' of row 0 \(line 1\)"):
        load_prompts(path, id_field="id", answer_field=None)


def test_csv_structure_errors(tmp_path: Path) -> None:
    ragged = tmp_path / "r.csv"
    ragged.write_text("question,answer\na,1\nb,2,extra\n")
    with pytest.raises(DatasetError, match=r"r.csv: row 1 \(line 3\) has 3 cells but the header has 2 col"):
        load_prompts(ragged)
    dup = tmp_path / "d.csv"
    dup.write_text("question,question\na,b\n")
    with pytest.raises(DatasetError, match=r"repeats columns \['question'\]"):
        load_prompts(dup)


def test_file_type_errors(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("hello")
    with pytest.raises(DatasetError, match=r"p.txt: unknown prompt file type '.txt'"):
        load_prompts(tmp_path / "p.txt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DatasetError, match="is a directory but not a datasets.save_to_disk folder"):
        load_prompts(tmp_path / "folder")
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.jsonl: not UTF-8 text"):
        load_prompts(tmp_path / "latin1.jsonl")


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"limit": 0}, "limit must be a positive integer or None, got 0"),
    ({"limit": 1.5}, "limit must be a positive integer"),
    ({"prompt_field": ""}, "prompt_field must be a non-empty field name"),
    ({"answer_field": 3}, "answer_field must be a non-empty field name, got 3"),
])
def test_bad_arguments(small_file: Path, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_prompts(small_file, **kwargs)
