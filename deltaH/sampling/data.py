"""Prompt datasets: JSONL / JSON / CSV / Parquet files or a ``datasets.save_to_disk`` folder.

``load_prompts`` reads rows, takes the prompt and (optionally) the reference answer from named
fields, applies a template and returns ``PromptRecord`` s. Rows are numbered from 0 in file order;
the row number is the record id unless ``id_field`` names one. Every problem with the data is a
``DataError`` (``deltaH.errors``) naming the file, the row (and line, for JSONL) and the field.

Answers are reduced to their final answer at load time (GSM8K's ``"... #### 72"`` → ``"72"``,
``"... \\boxed{3}"`` → ``"3"``); text without ``####`` or ``\\boxed{}`` is kept as written
(stripped), and numbers are converted with ``str``. The row as read stays in ``raw``.

Parquet needs ``pyarrow`` and ``save_to_disk`` folders need ``datasets``; both are imported only
when such a path is loaded.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltaH._choices import NAMED_TEMPLATES
from deltaH.errors import ArgumentError, DataError, NotFoundError
from deltaH.sampling.rewards import extract_answer

__all__ = ["DataError", "DatasetError", "PromptRecord", "load_prompts"]

Row = tuple[dict[str, Any], str]  # (row, where it is: "row 3" or "row 3 (line 5)")


#: The data family's error (``deltaH.errors.DataError``); the old name stays importable.
DatasetError = DataError


@dataclass(frozen=True)
class PromptRecord:
    """One prompt: ``id`` (stable: row number or ``id_field``), templated ``prompt``, final ``answer``."""

    id: str
    prompt: str
    answer: str | None
    raw: dict[str, Any] = field(hash=False, compare=False, repr=False)


# --------------------------------------------------------------------------------------------
# Readers: each yields (row dict, location) in file order.


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from e


def _check_object(path: Path, obj: Any, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: {where} is a JSON {type(obj).__name__}, not an object; every row must be "
            '{"field": value, ...}'
        )
    return obj


def _iter_jsonl(path: Path, text: str) -> Iterator[Row]:
    row = 0
    # split on "\n" only: str.splitlines would also cut at U+2028 etc., which JSON strings may contain
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {lineno} (row {row}) is not valid JSON: {e.msg} at column {e.colno}; "
                "JSONL needs one JSON object per line"
            ) from e
        where = f"row {row} (line {lineno})"
        yield _check_object(path, obj, where), where
        row += 1


def _iter_json(path: Path) -> Iterator[Row]:
    """A ``.json`` list of objects (or one object, or JSONL); a ``.jsonl`` file line by line."""
    text = _read_text(path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(
                    f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}; "
                    "a .json file must hold a list of objects (or one object per line)"
                ) from e
        else:
            rows = data if isinstance(data, list) else [data]
            for i, obj in enumerate(rows):
                yield _check_object(path, obj, f"row {i}"), f"row {i}"
            return
    yield from _iter_jsonl(path, text)


def _iter_csv(path: Path) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header):
            dup = sorted({h for h in header if header.count(h) > 1})
            raise DataError(f"{path}: the CSV header repeats columns {dup}; column names must be unique")
        i = 0
        for cells in reader:
            if not cells:
                continue  # blank line
            where = f"row {i} (line {reader.line_num})"
            if len(cells) != len(header):
                raise DataError(
                    f"{path}: {where} has {len(cells)} cells but the header has {len(header)} columns; "
                    "quote cells that contain commas"
                )
            yield dict(zip(header, cells, strict=True)), where
            i += 1
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV at line {reader.line_num}: {e}") from e


def _iter_parquet(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    for i, rec in enumerate(rows):
        yield rec, f"row {i}"


def _iter_hf_folder(path: Path) -> Iterator[Row]:
    if (path / "dataset_dict.json").is_file():
        try:
            splits = list(json.loads(_read_text(path / "dataset_dict.json"))["splits"])
        except (ValueError, KeyError, TypeError):
            splits = []
        raise DataError(
            f"{path} holds a DatasetDict with splits {splits}; pass one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading the saved dataset folder {path} needs datasets: pip install datasets"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"{path}: load_from_disk returned a {type(ds).__name__}; pass one split's folder")
    for i, rec in enumerate(ds):
        yield dict(rec), f"row {i}"


_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _iter_rows(path: Path) -> Iterator[Row]:
    if not path.exists():
        raise NotFoundError(f"prompt dataset {path} does not exist; check the path (config key data.path)")
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file() or (
            path / "dataset_dict.json"
        ).is_file():
            return _iter_hf_folder(path)
        raise DataError(
            f"{path} is a directory but not a datasets.save_to_disk folder (no state.json or "
            f"dataset_info.json); pass a {'/'.join(_SUFFIXES)} file or a saved dataset folder"
        )
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _iter_json(path)
    if suffix == ".csv":
        return _iter_csv(path)
    if suffix == ".parquet":
        return _iter_parquet(path)
    raise DataError(
        f"{path}: unknown prompt file type {suffix!r}; use one of {list(_SUFFIXES)} "
        "or a datasets.save_to_disk folder"
    )


# --------------------------------------------------------------------------------------------
# Templates and fields


def _check_template(template: str, system_prompt: str | None) -> None:
    if not isinstance(template, str):
        raise TypeError(f"template must be 'plain', 'chat' or a format string, got {type(template).__name__}")
    if template in NAMED_TEMPLATES:
        return
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ArgumentError(
            f"template {template!r} is not a valid format string ({e}); write literal braces as {{{{ }}}}"
        ) from e
    if "prompt" not in names or not names <= {"prompt", "system_prompt"}:
        raise ArgumentError(
            f"template {template!r} must be 'plain', 'chat' or a format string with {{prompt}} "
            f"(and optionally {{system_prompt}}); found fields {sorted(names)}. "
            "Write literal braces as {{ }}"
        )
    if system_prompt is not None and "system_prompt" not in names:
        raise ArgumentError(
            f"system_prompt is set but template {template!r} has no {{system_prompt}} field; add it or "
            "drop system_prompt"
        )


def _check_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ArgumentError(
            "template='chat' needs tokenizer=...: pass the model's tokenizer, or use template='plain'"
        )
    if not hasattr(tokenizer, "apply_chat_template") or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"template='chat': tokenizer {type(tokenizer).__name__} has no chat_template; set "
            "tokenizer.chat_template, or use template 'plain' or a format string (config key data.template)"
        )


def _apply_template(prompt: str, template: str, system_prompt: str | None, tokenizer: Any) -> str:
    if template == "plain":
        return prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
    if template == "chat":
        messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        messages.append({"role": "user", "content": prompt})
        out = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not isinstance(out, str):
            raise TypeError(f"tokenizer.apply_chat_template returned {type(out).__name__}, expected str")
        return out
    return template.format(prompt=prompt, system_prompt=system_prompt or "")


def _get(path: Path, rec: dict[str, Any], where: str, name: str, arg: str) -> Any:
    if name not in rec:
        raise DataError(
            f"{path}: {where} has no field {name!r} (available: {sorted(rec)}); set data.{arg} (API: {arg}=) "
            "to one of them"
        )
    return rec[name]


def _text(path: Path, value: Any, where: str, name: str, arg: str, numbers: bool) -> str:
    """``value`` as a non-empty string; numbers allowed (and converted) only if ``numbers``."""
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else f"{type(value).__name__} {value!r}"[:80]
        kind = "string or a number" if numbers else "string"
        raise DataError(
            f"{path}: {where} field {name!r} ({arg}) is {what}; it must be a non-empty {kind}. "
            f"Fix the row or choose another field (data.{arg}; API: {arg}=)"
        )
    return value


def _record(path: Path, rec: dict[str, Any], where: str, index: int, opts: _Options) -> PromptRecord:
    prompt = _text(path, _get(path, rec, where, opts.prompt_field, "prompt_field"), where,
                   opts.prompt_field, "prompt_field", numbers=False)
    answer: str | None = None
    if opts.answer_field is not None:
        text = _text(path, _get(path, rec, where, opts.answer_field, "answer_field"), where,
                     opts.answer_field, "answer_field", numbers=True)
        answer = extract_answer(text, last_number=False) or text.strip()
    rid = str(index)
    if opts.id_field is not None:
        value = _get(path, rec, where, opts.id_field, "id_field")
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value) == "":
            raise DataError(
                f"{path}: {where} field {opts.id_field!r} (id_field) is {value!r}; ids must be "
                "non-empty strings or integers"
            )
        rid = str(value)
    text = _apply_template(prompt, opts.template, opts.system_prompt, opts.tokenizer)
    return PromptRecord(id=rid, prompt=text, answer=answer, raw=dict(rec))


@dataclass(frozen=True)
class _Options:
    prompt_field: str
    answer_field: str | None
    id_field: str | None
    template: str
    system_prompt: str | None
    tokenizer: Any


def load_prompts(
    path: str | os.PathLike[str],
    *,
    prompt_field: str = "question",
    answer_field: str | None = "answer",
    id_field: str | None = None,
    template: str = "plain",
    system_prompt: str | None = None,
    tokenizer: Any = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Read prompts from ``path`` (``.jsonl``, ``.json``, ``.csv``, ``.parquet`` or a saved folder).

    ``template``: ``"plain"`` (the prompt; ``system_prompt`` + blank line before it if given),
    ``"chat"`` (``tokenizer.apply_chat_template([system?, user], tokenize=False,
    add_generation_prompt=True)``) or a format string with ``{prompt}`` and optionally
    ``{system_prompt}``. ``answer_field=None`` loads prompts without answers. ``limit`` keeps the
    first ``limit`` rows; rows after them are not parsed or checked. Ids must be unique.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ArgumentError(f"limit must be a positive integer or None, got {limit!r}")
    fields = {"prompt_field": prompt_field, "answer_field": answer_field, "id_field": id_field}
    for arg, value in fields.items():
        if value is not None and (not isinstance(value, str) or not value):
            raise ArgumentError(f"{arg} must be a non-empty field name, got {value!r}")
    _check_template(template, system_prompt)
    if template == "chat":
        _check_tokenizer(tokenizer)
    opts = _Options(prompt_field, answer_field, id_field, template, system_prompt, tokenizer)
    p = Path(path)
    records: list[PromptRecord] = []
    seen: dict[str, str] = {}
    for i, (rec, where) in enumerate(itertools.islice(_iter_rows(p), limit)):
        r = _record(p, rec, where, i, opts)
        if r.id in seen:
            raise DataError(
                f"{p}: {where} repeats id {r.id!r} of {seen[r.id]} (id_field={id_field!r}); ids must be "
                "unique: fix the data or choose another id field (data.id_field; API: id_field=)"
            )
        seen[r.id] = where
        records.append(r)
    if not records:
        raise DataError(f"{p}: the dataset has no rows; point at a file with at least one prompt")
    return records
