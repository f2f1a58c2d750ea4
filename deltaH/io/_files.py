"""Checkpoint files read safely: a truncated or garbage file is a ``CheckpointError`` naming it.

Without these wrappers a cut-off ``adapter_model.safetensors`` surfaces as ``SafetensorError: Error
while deserializing header`` from deep inside peft, and a cut-off ``optimizer.pt`` as a miniz or
``OSError: [Errno 22]`` message that does not say which file is broken.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from deltaH.errors import CheckpointError

__all__ = ["check_safetensors", "check_torch_archive", "corrupt", "safetensors_files", "torch_load"]

# What torch.load raises for a damaged archive (miniz: RuntimeError; mmap/seek: OSError; a cut pickle:
# EOFError / UnpicklingError); zipfile's own error for a missing central directory.
_DAMAGED = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, zipfile.BadZipFile)


def corrupt(path: Path, exc: BaseException) -> CheckpointError:
    """The error for a file that exists but cannot be read: which file, why, and what to do."""
    first = (str(exc).splitlines() or [""])[0][:200]
    return CheckpointError(
        f"{path} is corrupt or truncated ({type(exc).__name__}: {first}); re-save the checkpoint or copy "
        "the file again"
    )


def check_safetensors(path: Path) -> None:
    """Read only the header of a ``.safetensors`` file; it also checks that the data fills the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError (a Rust-side type), OSError
        raise corrupt(path, e) from e


def safetensors_files(folder: Path) -> list[Path]:
    """The ``.safetensors`` weight files a model or adapter folder uses (shards of an index included)."""
    out = [folder / n for n in ("adapter_model.safetensors", "model.safetensors") if (folder / n).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise corrupt(index, e) from e
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shards that are not in {folder}: {missing[:3]}; copy them "
                                  "beside the index")
        out += [folder / s for s in shards]
    return out


def check_torch_archive(path: Path) -> None:
    """A cheap check of a ``torch.save`` file: its zip central directory (at the end) must be readable."""
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise corrupt(path, e) from e


def torch_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a damaged file is a ``CheckpointError``.

    A readable archive whose pickle the weights-only loader refuses (a custom class) re-raises the
    ``pickle.UnpicklingError`` for the caller to judge.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except _DAMAGED as e:
        if isinstance(e, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise
        raise corrupt(path, e) from e
