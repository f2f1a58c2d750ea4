"""Step files: the micro-batches of every optimizer step of a training run, on disk.

The deltaH trainer mixins (:class:`~deltaH.integrations.trl.DeltaHGRPOMixin`,
:class:`~deltaH.integrations.recording.DeltaHTrainerMixin`) write one step file per optimizer step
into ``<output_dir>/deltah-steps/``; :func:`read_step` turns it back into
:class:`~deltaH.updates.recorded.RecordedStep` s for the replay. The format (also in
docs/step-files.md)::

    step-<N>.safetensors              the tensors of step N               (a run on one process)
    step-<N>.json                     its sidecar, written last: no sidecar = incomplete step
    step-<N>.rank<r>.safetensors      one pair per rank r when world_size > 1: each process writes
    step-<N>.rank<r>.json             the micro-batches it trained on; nothing is gathered
    step-<N>[.rank<r>].prev-<k>.*     earlier versions of the same step (see "Re-done steps")

``N`` is the Trainer's ``global_step`` after the step (as in its logs and ``checkpoint-N``): the
step that turned ``checkpoint-(N−1)`` into ``checkpoint-N``.

Tensors are keyed ``mb<k>.<field>`` (``k`` the micro-batch, 0-based, in the order the trainer
trained on them), on CPU, contiguous, in the dtype the trainer had. GRPO fields are
:data:`~deltaH.updates.recorded.MICRO_BATCH_FIELDS` plus those of
:data:`~deltaH.updates.recorded.OPTIONAL_FIELDS` the trainer produced; ``transformers.Trainer``
fields are :data:`SFT_FIELDS` (``input_ids`` always). ``num_items_in_batch`` is a 0-dim tensor.
The sidecar is JSON (``indent=2, sort_keys=True``)::

    format "deltah-step", version 1, step, rank, world_size, micro_batches (count), trainer,
    options (TrainerOptions.to_dict()), meta (eos_token_id, pad_token_id, learning_rate of the
    step, epoch, ...), deltah_version, bytes (size of the .safetensors), tensors ({key: {dtype, shape}})

Writes are atomic: each file goes to a temporary file in the same folder, is flushed to disk and
renamed over its name (``os.replace``); the ``.safetensors`` first, the sidecar last.

Re-done steps: a resumed run trains again the steps after its checkpoint. A file is never
replaced: before step N of rank r is written, an existing ``step-<N>[.rank<r>].*`` pair is renamed
to ``step-<N>[.rank<r>].prev-<k>.*`` with ``k`` one more than the largest ``k`` already there (the
oldest version is ``prev-1``). :func:`read_step` and :func:`list_steps` see the current version
only; rename a ``prev-<k>`` pair back to read an earlier one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaH.errors import ArgumentError, BatchError, DataError, NotFoundError
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, OPTIONAL_FIELDS, RecordedStep, TrainerOptions

__all__ = ["FORMAT", "SFT_FIELDS", "STEPS_DIRNAME", "VERSION", "find_steps_dir", "list_steps", "read_step",
           "write_step"]

logger = logging.getLogger(__name__)

FORMAT = "deltah-step"
VERSION = 1
#: The folder, beside a run's ``checkpoint-N/`` folders, the trainer mixins write into.
STEPS_DIRNAME = "deltah-steps"
#: ``transformers.Trainer`` fields: what its ``compute_loss`` receives (input_ids always).
SFT_FIELDS = ("input_ids", "attention_mask", "labels", "position_ids", "num_items_in_batch")

_NAME = re.compile(r"^step-(\d+)(?:\.rank(\d+))?(?:\.prev-(\d+))?\.(json|safetensors)$")
_KEY = re.compile(r"^mb(\d+)\.(.+)$")

# Per trainer: field -> (kind, allowed shapes as axis names). Kinds: "int" (token ids), "mask"
# (integer or bool), "float", "count" (any number). An axis given as an int must have that size.
_Spec = dict[str, tuple[str, tuple[tuple[str | int, ...], ...]]]
_BT = (("B", "T"),)
_GRPO: _Spec = {
    "prompt_ids": ("int", (("B", "P"),)), "prompt_mask": ("mask", (("B", "P"),)),
    "completion_ids": ("int", _BT), "completion_mask": ("mask", _BT),
    "advantages": ("float", (("B",), ("B", "T"))), "num_items_in_batch": ("count", ((),)),
    "old_per_token_logps": ("float", _BT), "sampling_per_token_logps": ("float", _BT),
    "importance_sampling_ratio": ("float", (("B", "T"), ("B", 1))), "ref_per_token_logps": ("float", _BT),
    "tool_mask": ("mask", _BT),
}
_SFT: _Spec = {
    "input_ids": ("int", (("B", "L"),)), "attention_mask": ("mask", (("B", "L"),)),
    "labels": ("int", (("B", "L"),)), "position_ids": ("int", (("B", "L"),)),
    "num_items_in_batch": ("count", ((),)),
}
#: trainer -> (required fields, field specs)
_TRAINERS: dict[str, tuple[tuple[str, ...], _Spec]] = {
    "GRPOTrainer": (MICRO_BATCH_FIELDS, _GRPO),
    "Trainer": (("input_ids",), _SFT),
}
assert set(_GRPO) == set(MICRO_BATCH_FIELDS) | set(OPTIONAL_FIELDS)


def _stem(step: int, rank: int, world_size: int) -> str:
    return f"step-{step}" if world_size == 1 else f"step-{step}.rank{rank}"


# ------------------------------------------------------------------------------------- writing
def write_step(steps_dir: str | Path, rec: RecordedStep) -> Path:
    """Write ``rec`` as ``steps_dir/step-<N>[.rank<r>].safetensors`` + ``.json``; return the sidecar's path.

    ``rec.options.world_size`` decides the name (``.rank<r>`` when > 1). Tensors are moved to CPU
    (a copy only where two fields share memory); Python numbers become 0-dim tensors; ``None``
    values are left out. An existing version of the step is kept as ``prev-<k>`` (module doc).
    """
    steps_dir = Path(steps_dir)
    ws, rank = int(rec.options.world_size), int(rec.rank)
    if not isinstance(rec.step, int) or rec.step < 0:
        raise ArgumentError(f"write_step: step must be an int >= 0, got {rec.step!r}")
    if ws < 1 or not 0 <= rank < ws:
        raise ArgumentError(f"write_step: rank {rank} is not in [0, world_size={ws})")
    if not rec.micro_batches:
        raise BatchError(f"write_step: step {rec.step} has no micro-batches to write")
    tensors = _flatten(rec)
    steps_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(rec.step, rank, ws)
    _keep_previous(steps_dir, stem)
    st = steps_dir / f"{stem}.safetensors"
    js = steps_dir / f"{stem}.json"

    def save(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})

    _atomic(st, save)
    from deltaH import __version__

    sidecar = {
        "format": FORMAT, "version": VERSION, "step": rec.step, "rank": rank, "world_size": ws,
        "micro_batches": len(rec.micro_batches), "trainer": rec.options.trainer,
        "options": rec.options.to_dict(), "meta": dict(rec.meta), "deltah_version": __version__,
        "bytes": st.stat().st_size,
        "tensors": {k: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for k, t in tensors.items()},
    }
    text = json.dumps(sidecar, indent=2, sort_keys=True, default=_json_default)
    _atomic(js, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))
    return js


def _flatten(rec: RecordedStep) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, mb in enumerate(rec.micro_batches):
        for name, v in mb.items():
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, Tensor | int | float):
                raise BatchError(f"write_step: micro-batch {k} field {name!r} is a {type(v).__name__}, "
                                 "not a tensor or a number; leave it out of the recorded step")
            t = torch.as_tensor(v).detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:  # safetensors refuses tensors that share memory (e.g. one num_items tensor)
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[f"mb{k}.{name}"] = t
    return out


def _keep_previous(steps_dir: Path, stem: str) -> None:
    old = [steps_dir / f"{stem}.{ext}" for ext in ("json", "safetensors")]
    if not any(p.exists() for p in old):
        return
    prev = [int(m.group(3)) for p in steps_dir.glob(f"{stem}.prev-*")
            if (m := _NAME.match(p.name)) and m.group(3) is not None]
    k = max(prev, default=0) + 1
    for p in old:  # the sidecar first: a crash in between leaves an incomplete step, never a mixed pair
        if p.exists():
            os.replace(p, p.with_name(f"{stem}.prev-{k}{p.suffix}"))
    logger.warning("%s: step file %s existed (a re-done step); kept as %s.prev-%d.*",
                   steps_dir, stem, stem, k)


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, flush it to disk, rename it over ``path``."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _json_default(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().cpu().tolist()
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return x.item()
    if isinstance(x, Path):
        return str(x)
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    if isinstance(x, set | frozenset):
        return sorted(x, key=str)
    return str(x)


# ------------------------------------------------------------------------------------- reading
def list_steps(steps_dir: str | Path) -> list[int]:
    """The steps with at least one sidecar in ``steps_dir`` (``prev-<k>`` versions left out), sorted."""
    steps_dir = Path(steps_dir)
    if not steps_dir.is_dir():
        raise NotFoundError(f"step folder {steps_dir} does not exist; pass the run's {STEPS_DIRNAME}/ folder")
    found = set()
    for p in steps_dir.iterdir():
        m = _NAME.match(p.name)
        if m and m.group(3) is None and m.group(4) == "json":
            found.add(int(m.group(1)))
    return sorted(found)


def find_steps_dir(checkpoint_dir: str | Path) -> Path | None:
    """``<run>/deltah-steps`` for a ``<run>/checkpoint-N`` folder, or None when the run recorded none."""
    d = Path(checkpoint_dir).parent / STEPS_DIRNAME
    return d if d.is_dir() else None


def read_step(steps_dir: str | Path, step: int) -> list[RecordedStep]:
    """Every rank's recorded micro-batches of ``step`` (rank order), each file checked.

    Checks: every rank's pair is present and complete, the sidecar matches its file name and the
    ``.safetensors`` (size, keys, dtypes, shapes), each micro-batch has the trainer's required
    fields with consistent shapes, and the ranks agree on trainer, options and fields. A problem is
    a one-line ``DataError`` naming the file and the field; a missing step a ``NotFoundError``.
    """
    steps_dir = Path(steps_dir)
    if not steps_dir.is_dir():
        raise NotFoundError(f"step folder {steps_dir} does not exist; pass the run's {STEPS_DIRNAME}/ folder")
    single = steps_dir / f"step-{step}.json"
    ranked = {int(m.group(2)): p for p in steps_dir.glob(f"step-{step}.rank*.json")
              if (m := _NAME.match(p.name)) and m.group(2) is not None and m.group(3) is None}
    if single.exists() and ranked:
        raise DataError(f"{steps_dir}: step {step} has both step-{step}.json (one process) and per-rank "
                        f"files (step-{step}.rank<r>.json); move the older set away (e.g. to a sub-folder)")
    if not single.exists() and not ranked:
        orphans = sorted(p.name for p in steps_dir.glob(f"step-{step}.*safetensors")
                         if (m := _NAME.match(p.name)) and m.group(3) is None)
        if orphans:
            raise DataError(f"{steps_dir / orphans[0]}: step {step} is incomplete (no .json sidecar: the "
                            "writer stopped before finishing it); re-record the step or skip it")
        have = list_steps(steps_dir)
        shown = f"{have[:3]}...{have[-3:]}" if len(have) > 6 else str(have)
        raise NotFoundError(f"{steps_dir}: no step file for step {step}; recorded steps: {shown}")
    if single.exists():
        recs = [_read_one(single, step, 0, 1)]
    else:
        first = ranked[min(ranked)]
        ws = int(_sidecar(first).get("world_size", 0) or 0)
        missing = [r for r in range(ws) if r not in ranked]
        extra = [r for r in ranked if r >= ws]
        if ws < 2 or missing or extra:
            raise DataError(f"{first}: step {step} of a run on world_size={ws} processes needs the files of "
                            f"ranks 0..{ws - 1}; missing ranks {missing}, unexpected ranks {extra} — copy "
                            "every rank's step files into one folder")
        recs = [_read_one(ranked[r], step, r, ws) for r in range(ws)]
    _check_ranks(recs, steps_dir, step)
    return recs


def _sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON sidecar ({type(e).__name__}: {e}); "
                        "re-record the step") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path}: not a deltaH step sidecar (format is not {FORMAT!r})")
    v = data.get("version")
    if not isinstance(v, int) or v > VERSION:
        raise DataError(f"{path}: step file version {v!r} is newer than this deltaH reads ({VERSION}); "
                        "upgrade deltaH")
    return data


def _read_one(js: Path, step: int, rank: int, ws: int) -> RecordedStep:
    meta = _sidecar(js)
    for key, want in (("step", step), ("rank", rank), ("world_size", ws)):
        if meta.get(key) != want:
            raise DataError(f"{js}: field '{key}': {meta.get(key)!r} but the file name says {want}; the file "
                            "was renamed or copied wrongly — restore its name")
    for key in ("micro_batches", "trainer", "options", "meta", "tensors", "bytes"):
        if key not in meta:
            raise DataError(f"{js}: field '{key}': missing; the sidecar is damaged — re-record the step")
    st = js.with_suffix(".safetensors")
    if not st.is_file():
        raise DataError(f"{st}: missing beside its sidecar {js.name}; copy it back or re-record the step")
    if st.stat().st_size != meta["bytes"]:
        raise DataError(f"{st}: {st.stat().st_size} bytes but its sidecar says {meta['bytes']}; the pair "
                        "does not belong together or the file is truncated — re-record the step")
    try:
        from safetensors.torch import load_file

        tensors = load_file(str(st))
    except Exception as e:  # SafetensorError (Rust-side type), OSError
        raise DataError(f"{st}: not a readable safetensors file ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]}); re-record the step") from e
    if not isinstance(meta["options"], Mapping):
        raise DataError(f"{js}: field 'options': not an object; the sidecar is damaged — re-record the step")
    try:
        options = TrainerOptions.from_dict(dict(meta["options"]))
    except TypeError as e:
        raise DataError(f"{js}: field 'options': {e}; the sidecar is damaged — re-record the step") from e
    mbs = _micro_batches(st, tensors, meta)
    return RecordedStep(step=step, micro_batches=mbs, options=options, rank=rank, meta=dict(meta["meta"]))


def _micro_batches(st: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> list[dict[str, Any]]:
    n = meta["micro_batches"]
    if not isinstance(n, int) or n < 1:
        raise DataError(f"{st}: sidecar field 'micro_batches' is {n!r}, not a count >= 1; re-record the step")
    listed = meta["tensors"]
    if not isinstance(listed, Mapping) or set(listed) != set(tensors):
        diff = sorted(set(tensors) ^ set(listed if isinstance(listed, Mapping) else {}))
        raise DataError(f"{st}: tensors {diff[:4]} are in only one of the file and its sidecar; the pair "
                        "does not belong together — re-record the step")
    mbs: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or int(m.group(1)) >= n:
            raise DataError(f"{st}: field '{key}': not mb<k>.<field> with k < {n}; re-record the step")
        want = listed[key]
        if not isinstance(want, Mapping) or want.get("dtype") != _dtype_name(t.dtype) or \
                want.get("shape") != list(t.shape):
            raise DataError(f"{st}: field '{key}': {_dtype_name(t.dtype)} {list(t.shape)} but the sidecar "
                            f"says {want!r}; the pair does not belong together — re-record the step")
        mbs[int(m.group(1))][m.group(2)] = t
    required, spec = _TRAINERS.get(str(meta["trainer"]), ((), {}))
    for k, mb in enumerate(mbs):
        if not mb:
            raise DataError(f"{st}: micro-batch {k}: no tensors; re-record the step")
        missing = [f for f in required if f not in mb]
        if missing:
            raise DataError(f"{st}: field 'mb{k}.{missing[0]}': missing (a {meta['trainer']} step needs "
                            f"{list(required)}); re-record the step")
        _check_shapes(st, k, mb, spec)
        if set(mb) != set(mbs[0]):
            raise DataError(f"{st}: micro-batch {k} has fields {sorted(mb)} but micro-batch 0 has "
                            f"{sorted(mbs[0])}; re-record the step")
    return mbs


def _kind_ok(kind: str, dt: torch.dtype) -> bool:
    if kind == "float":
        return dt.is_floating_point
    if kind == "int":
        return not dt.is_floating_point and not dt.is_complex and dt != torch.bool
    if kind == "mask":
        return not dt.is_floating_point and not dt.is_complex
    return not dt.is_complex


def _check_shapes(st: Path, k: int, mb: dict[str, Tensor], spec: _Spec) -> None:
    dims: dict[str, int] = {}
    for name in spec:
        if name not in mb:
            continue
        t = mb[name]
        kind, shapes = spec[name]
        if not _kind_ok(kind, t.dtype):
            raise DataError(f"{st}: field 'mb{k}.{name}': dtype {_dtype_name(t.dtype)} is not a {kind} "
                            "dtype; re-record the step")
        for axes in shapes:
            pairs = list(zip(axes, t.shape, strict=False))
            if len(axes) == t.dim() and all((a == s) if isinstance(a, int) else dims.get(a, s) == s
                                            for a, s in pairs):
                dims.update({a: s for a, s in pairs if isinstance(a, str)})
                break
        else:
            bound = ", ".join(f"{a}={v}" for a, v in dims.items())
            want = " or ".join("[" + ", ".join(map(str, a)) + "]" for a in shapes)
            given = f" with {bound} from the fields before it" if bound else ""
            raise DataError(f"{st}: field 'mb{k}.{name}': shape {list(t.shape)} is not {want}{given}; "
                            "re-record the step")


def _check_ranks(recs: list[RecordedStep], steps_dir: Path, step: int) -> None:
    first = recs[0]
    for r in recs[1:]:
        where = steps_dir / f"step-{step}.rank{r.rank}.json"
        if r.options != first.options:
            diff = sorted(k for k, v in r.options.to_dict().items() if first.options.to_dict().get(k) != v)
            raise DataError(f"{where}: field 'options': {diff[:4]} differ from rank 0's; the ranks' files "
                            "come from different runs — keep one run's files together")
        if len(r.micro_batches) != len(first.micro_batches) or r.options.trainer != first.options.trainer:
            raise DataError(f"{where}: {len(r.micro_batches)} micro-batches of a {r.options.trainer} step, "
                            f"rank 0 has {len(first.micro_batches)} of a {first.options.trainer} step; "
                            "keep one run's files together")
        if set(r.micro_batches[0]) != set(first.micro_batches[0]):
            raise DataError(f"{where}: fields {sorted(r.micro_batches[0])} differ from rank 0's "
                            f"{sorted(first.micro_batches[0])}; keep one run's files together")
