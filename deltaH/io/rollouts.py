"""Other trainers' rollouts as one recorded GRPO step: JSONL (or Parquet) rows to TRL micro-batches.

One row per completion; a file is one optimizer step (one generation batch). Row fields::

    prompt_ids      list[int]   the prompt's token ids            (or prompt: str, tokenised)
    completion_ids  list[int]   the completion's token ids        (or completion: str, tokenised)
    advantage       float       the completion's advantage        (or reward: float, with group)
    group           str | int   the prompt group (required with reward)
    old_logprobs    list[float] optional: log π_old of each completion token
    ref_logprobs    list[float] optional: log π_ref of each completion token (needed when beta != 0)
    truncated       bool        optional: the completion hit the length limit (needed with
                                mask_truncated_completions)

Other fields are ignored. Text is tokenised with ``tokenizer`` as TRL does for plain-text prompts
(``tokenizer(text=prompt)``; completions with ``add_special_tokens=False``): a warning says that
re-tokenised text need not give the ids the trainer trained on, and text completions carry no EOS
token. With ``reward``, advantages follow TRL's rule (:func:`deltaH.updates.losses.advantages`
within each ``group``; ``options.scale_rewards`` "group", "batch" or "none"), computed in float64.

The micro-batches are built as TRL builds them: every prompt left-padded and every completion
right-padded to the longest of the file (pad id: ``pad_token_id``, else the tokenizer's, else 0),
``prompt_mask``/``completion_mask`` 1 on real tokens (a ``truncated`` row's completion mask all 0
with ``mask_truncated_completions``), ``advantages`` float32 ``[B]``, ``num_items_in_batch`` the
file's total of completion-mask tokens (a 0-dim long tensor in every micro-batch),
``old_per_token_logps``/``ref_per_token_logps`` float32 ``[B, T]`` (0 on padding). Rows stay in
file order and are split into ``micro_batches`` equal, consecutive parts (TRL would shuffle them
first).

Every problem with the file is one ``DataError`` line ``file:line: field 'x': problem; fix``
(``file:row i`` for Parquet), raised after reading and before any tensor is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaH._choices import SCALE_REWARDS, check_choice
from deltaH._warn import warn
from deltaH.errors import ArgumentError, DataError, NotFoundError
from deltaH.updates.losses import advantages as group_advantages
from deltaH.updates.recorded import RecordedStep, TrainerOptions

__all__ = ["load_rollouts"]

_MAX_ID = 2**63


@dataclass
class _Row:
    where: str
    prompt: list[int]
    completion: list[int]
    advantage: float | None
    reward: float | None
    group: str | int | None
    old: list[float] | None
    ref: list[float] | None
    truncated: bool | None
    text: bool


def load_rollouts(path: str | Path, *, tokenizer: Any = None, options: TrainerOptions, micro_batches: int = 1,
                  pad_token_id: int | None = None) -> RecordedStep:
    """The rollouts in ``path`` as a ``RecordedStep`` (step 0, rank 0) of ``micro_batches`` micro-batches.

    ``options`` describe the trainer's loss; its ``gradient_accumulation_steps`` must equal
    ``micro_batches`` (one optimizer step trains on that many micro-batches) and its
    ``steps_per_generation`` be None (then set to ``micro_batches``) or equal to it, since the file
    is one whole generation batch. ``meta`` holds ``source``, ``rows``, ``pad_token_id``,
    ``eos_token_id`` (the tokenizer's) and ``current_gradient_accumulation_steps``.
    """
    if not isinstance(options, TrainerOptions):
        raise TypeError(f"options must be a deltaH TrainerOptions, got {type(options).__name__}")
    if options.trainer != "GRPOTrainer":
        raise ArgumentError(f"load_rollouts builds GRPO micro-batches; options.trainer is "
                            f"{options.trainer!r}, use TrainerOptions(trainer='GRPOTrainer', ...)")
    if isinstance(micro_batches, bool) or not isinstance(micro_batches, int) or micro_batches < 1:
        raise ArgumentError(f"micro_batches must be an int >= 1, got {micro_batches!r}")
    if options.gradient_accumulation_steps != micro_batches:
        raise ArgumentError(
            f"options.gradient_accumulation_steps={options.gradient_accumulation_steps} but micro_batches="
            f"{micro_batches}: one optimizer step trains on gradient_accumulation_steps micro-batches; make "
            "them equal")
    if options.steps_per_generation not in (None, micro_batches):
        raise ArgumentError(
            f"options.steps_per_generation={options.steps_per_generation}: a rollout file is one generation "
            f"batch trained in one step, so it must be None or micro_batches={micro_batches}")
    check_choice("options.scale_rewards", options.scale_rewards, SCALE_REWARDS)
    if pad_token_id is not None and (isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int)):
        raise ArgumentError(f"pad_token_id must be an int, got {pad_token_id!r}")
    path = Path(path)
    rows = [_parse_row(where, obj, tokenizer) for obj, where in _iter_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows; one JSON object per completion is needed")
    if any(r.text for r in rows):
        warn(f"{path}: rows give text (prompt/completion) that was tokenised again with the tokenizer; that "
             "need not give the ids the trainer trained on (and text completions carry no EOS token) — give "
             "prompt_ids/completion_ids for an exact replay")
    _check_rows(rows, options)
    if len(rows) % micro_batches:
        raise DataError(f"{path}: {len(rows)} rows do not split into micro_batches={micro_batches} equal "
                        "parts; give a multiple of micro_batches rows")
    adv = _advantages(rows, options.scale_rewards)
    pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else 0
    full = _tensors(rows, adv, pad, options.mask_truncated_completions)
    n = len(rows) // micro_batches
    mbs = [{k: (v if v.dim() == 0 else v[i * n:(i + 1) * n]) for k, v in full.items()}
           for i in range(micro_batches)]
    meta = {"source": str(path), "rows": len(rows), "pad_token_id": pad,
            "eos_token_id": getattr(tokenizer, "eos_token_id", None),
            "current_gradient_accumulation_steps": micro_batches}
    opts = dataclasses.replace(options, steps_per_generation=micro_batches)
    return RecordedStep(step=0, micro_batches=mbs, options=opts, rank=0, meta=meta)


# ------------------------------------------------------------------------------------- reading
def _iter_rows(path: Path) -> Iterator[tuple[Any, str]]:
    if not path.is_file():
        raise NotFoundError(f"rollout file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _iter_parquet(path)
        return
    if suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: unknown rollout file type {suffix!r}; use .jsonl (one JSON object per "
                        "line) or .parquet")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e}); re-encode the file as UTF-8") from e
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); write one JSON "
                            "object per line") from e
        yield obj, f"{path}:{lineno}"


def _iter_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow, which is not installed: pip install pyarrow "
                        "(or pip install 'deltaH[data]'), or convert the file to JSONL") from e
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    for i, rec in enumerate(rows):
        yield rec, f"{path}:row {i}"


# ------------------------------------------------------------------------------------- one row
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _ids(where: str, rec: dict[str, Any], ids_key: str, text_key: str, tokenizer: Any,
         prompt: bool) -> tuple[list[int], bool]:
    if rec.get(ids_key) is not None:
        ids = rec[ids_key]
        if not isinstance(ids, list) or not ids:
            raise DataError(f"{where}: field '{ids_key}': {_show(ids)} is not a non-empty list of token ids; "
                            "give a JSON list of ints")
        bad = [t for t in ids if not (_is_int(t) and 0 <= t < _MAX_ID)]
        if bad:
            raise DataError(f"{where}: field '{ids_key}': {_show(bad[0])} is not a token id (an int >= 0); "
                            "give a JSON list of ints")
        return list(ids), False
    text = rec.get(text_key)
    if text is None:
        raise DataError(f"{where}: field '{ids_key}': missing; give {ids_key} (a list of token ids) or "
                        f"{text_key} (a string, with tokenizer=)")
    if not isinstance(text, str) or not text:
        raise DataError(f"{where}: field '{text_key}': {_show(text)} is not a non-empty string; give text or "
                        f"{ids_key}")
    if tokenizer is None:
        raise DataError(f"{where}: field '{text_key}': text needs a tokenizer; pass tokenizer= to "
                        f"load_rollouts or give {ids_key}")
    kw = {} if prompt else {"add_special_tokens": False}
    ids = [int(t) for t in tokenizer(text=text, **kw)["input_ids"]]
    if not ids:
        raise DataError(f"{where}: field '{text_key}': the tokenizer gives no tokens for {_show(text)}; give "
                        f"{ids_key}")
    return ids, True


def _logprobs(where: str, rec: dict[str, Any], key: str, n: int) -> list[float] | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise DataError(f"{where}: field '{key}': {_show(v)} is not a list of floats; give one "
                        "log-probability per completion token")
    if len(v) != n:
        raise DataError(f"{where}: field '{key}': {len(v)} values for {n} completion tokens; give one "
                        "log-probability per completion token")
    bad = [x for x in v if not _is_number(x)]
    if bad:
        raise DataError(f"{where}: field '{key}': {_show(bad[0])} is not a finite number; give finite "
                        "log-probabilities")
    return [float(x) for x in v]


def _parse_row(where: str, rec: Any, tokenizer: Any) -> _Row:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a JSON {type(rec).__name__}, not an object; write one "
                        '{"field": value, ...} object per completion')
    prompt, t1 = _ids(where, rec, "prompt_ids", "prompt", tokenizer, prompt=True)
    completion, t2 = _ids(where, rec, "completion_ids", "completion", tokenizer, prompt=False)
    adv, reward, group = rec.get("advantage"), rec.get("reward"), rec.get("group")
    for key, v in (("advantage", adv), ("reward", reward)):
        if v is not None and not _is_number(v):
            raise DataError(f"{where}: field '{key}': {_show(v)} is not a finite number; give a number")
    if adv is None and reward is None:
        raise DataError(f"{where}: field 'advantage': missing; give 'advantage', or 'reward' and 'group'")
    if group is not None and (isinstance(group, bool) or not isinstance(group, str | int)):
        raise DataError(f"{where}: field 'group': {_show(group)} is not a string or an int; name the prompt "
                        "group with a string or an int")
    truncated = rec.get("truncated")
    if truncated is not None and not isinstance(truncated, bool):
        raise DataError(f"{where}: field 'truncated': {_show(truncated)} is not true or false; give a JSON "
                        "boolean")
    return _Row(where, prompt, completion, None if adv is None else float(adv),
                None if reward is None else float(reward), group,
                _logprobs(where, rec, "old_logprobs", len(completion)),
                _logprobs(where, rec, "ref_logprobs", len(completion)), truncated, t1 or t2)


def _short(where: str) -> str:
    """``line 3`` (JSONL) or ``row 3`` (Parquet) of a ``file:3`` / ``file:row 3`` location."""
    tail = where.rsplit(":", 1)[1]
    return tail if tail.startswith("row") else f"line {tail}"


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ------------------------------------------------------------------------------------- all rows
def _check_rows(rows: list[_Row], options: TrainerOptions) -> None:
    first = rows[0]
    by_adv = first.advantage is not None
    for r in rows:
        if by_adv and r.advantage is None:
            raise DataError(f"{r.where}: field 'advantage': missing, but {_short(first.where)} gives "
                            "advantages; give 'advantage' on every row, or 'reward' and 'group' on every row")
        if not by_adv and r.reward is None:
            raise DataError(f"{r.where}: field 'reward': missing, but {_short(first.where)} gives rewards; "
                            "give 'reward' and 'group' on every row, or 'advantage' on every row")
        if not by_adv and r.group is None:
            raise DataError(f"{r.where}: field 'group': missing; rewards become advantages within their "
                            "prompt group, so give 'group' on every row (or give 'advantage')")
        for key, attr in (("old_logprobs", "old"), ("ref_logprobs", "ref")):
            if (getattr(r, attr) is None) != (getattr(first, attr) is None):
                has, lacks = (first, r) if getattr(r, attr) is None else (r, first)
                raise DataError(f"{lacks.where}: field '{key}': missing, but {_short(has.where)} has it; "
                                "give it on every row or on none")
        if options.mask_truncated_completions and r.truncated is None:
            raise DataError(f"{r.where}: field 'truncated': missing; options.mask_truncated_completions=True "
                            "needs it on every row")
    if options.beta != 0.0 and first.ref is None:
        raise DataError(f"{first.where}: field 'ref_logprobs': missing; options.beta={options.beta} needs "
                        "the reference model's log-probabilities on every row (or use beta=0)")


def _advantages(rows: list[_Row], scale_rewards: str) -> Tensor:
    if rows[0].advantage is not None:
        return torch.tensor([r.advantage for r in rows], dtype=torch.float64)
    rewards = torch.tensor([r.reward for r in rows], dtype=torch.float64)
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((type(r.group).__name__, r.group), []).append(i)
    adv = torch.empty_like(rewards)
    within = "none" if scale_rewards == "batch" else scale_rewards
    for idx in groups.values():
        adv[idx] = group_advantages(rewards[idx].unsqueeze(0), within)[0]
    if scale_rewards == "batch":  # TRL: centred within the group, scaled by the whole batch's std
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        adv = adv / (std + 1e-4)
    return adv


def _tensors(rows: list[_Row], adv: Tensor, pad: int, mask_truncated: bool) -> dict[str, Tensor]:
    n = len(rows)
    p = max(len(r.prompt) for r in rows)
    t = max(len(r.completion) for r in rows)
    prompt_ids = torch.full((n, p), pad, dtype=torch.long)
    prompt_mask = torch.zeros((n, p), dtype=torch.long)
    completion_ids = torch.full((n, t), pad, dtype=torch.long)
    completion_mask = torch.zeros((n, t), dtype=torch.long)
    for i, r in enumerate(rows):
        lp, lc = len(r.prompt), len(r.completion)
        prompt_ids[i, p - lp:] = torch.tensor(r.prompt, dtype=torch.long)
        prompt_mask[i, p - lp:] = 1
        completion_ids[i, :lc] = torch.tensor(r.completion, dtype=torch.long)
        completion_mask[i, :lc] = 0 if (mask_truncated and r.truncated) else 1
    out = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
           "completion_mask": completion_mask, "advantages": adv.to(torch.float32),
           "num_items_in_batch": completion_mask.sum()}
    for key, attr in (("old_per_token_logps", "old"), ("ref_per_token_logps", "ref")):
        if getattr(rows[0], attr) is not None:
            lp_t = torch.zeros((n, t), dtype=torch.float32)
            for i, r in enumerate(rows):
                vals = getattr(r, attr)
                lp_t[i, :len(vals)] = torch.tensor(vals, dtype=torch.float32)
            out[key] = lp_t
    return out
