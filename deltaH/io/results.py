"""The results folder: created fresh (never overwritten), written incrementally, resumable.

Layout and ``summary.json`` schema: ``docs/results-schema.md``. Every write goes to a temporary
file first and is renamed into place, so an interrupted run leaves valid files; ``progress.json``
records which analyses are done so ``--resume`` can skip them.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SUMMARY_GZIP_BYTES = 1 << 20


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def to_jsonable(x: Any) -> Any:
    """Tensors, numpy values and dataclass-like objects to plain JSON values (NaN/inf → null)."""
    try:
        import torch

        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        return to_jsonable(x.item())
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_jsonable(v) for v in x]
    return x


class ResultsDir:
    """A run's folder. ``create`` refuses an existing non-empty folder; ``open`` resumes one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, parent: str | Path, out: str | Path | None = None, name: str = "run") -> ResultsDir:
        """A new folder: ``out`` if given (must not exist or be empty), else ``parent/<name>-<timestamp>``."""
        if out is not None:
            path = Path(out)
            if path.exists() and any(path.iterdir()):
                raise FileExistsError(
                    f"--out {path} already exists and is not empty: deltaH never overwrites results; "
                    "choose a new folder or pass --resume to continue that run"
                )
        else:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(parent) / f"{name}-{stamp}"
            i = 1
            while path.exists():
                path = Path(parent) / f"{name}-{stamp}-{i}"
                i += 1
        for sub in ("", "arrays", "batches", "plots"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        rd = cls(path)
        rd.set_progress(status="running", done=[])
        return rd

    @classmethod
    def open(cls, path: str | Path) -> ResultsDir:
        p = Path(path)
        if not (p / "progress.json").is_file():
            raise FileNotFoundError(
                f"{p} is not a deltaH results folder (no progress.json); cannot resume it"
            )
        return cls(p)

    # -- progress -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        f = self.path / "progress.json"
        return json.loads(f.read_text()) if f.is_file() else {"status": "missing", "done": []}

    def set_progress(self, **kw: Any) -> None:
        cur = self.progress() if (self.path / "progress.json").is_file() else {"done": [], "error": None}
        cur.update(kw)
        self.write_json("progress.json", cur)

    def mark_done(self, name: str) -> None:
        done = list(self.progress().get("done", []))
        if name not in done:
            done.append(name)
        self.set_progress(done=done)

    def is_done(self, name: str) -> bool:
        return name in self.progress().get("done", [])

    # -- files -------------------------------------------------------------------------------
    def write_json(self, rel: str, obj: Any, gzip_large: bool = False) -> Path:
        data = json.dumps(to_jsonable(obj), indent=2, sort_keys=True).encode()
        path = self.path / rel
        if gzip_large and len(data) > SUMMARY_GZIP_BYTES:
            path = path.with_name(path.name + ".gz")
            _atomic_write(path, gzip.compress(data))
        else:
            _atomic_write(path, data)
        return path

    def read_json(self, rel: str) -> Any:
        path = self.path / rel
        if path.is_file():
            return json.loads(path.read_text())
        gz = path.with_name(path.name + ".gz")
        if gz.is_file():
            return json.loads(gzip.decompress(gz.read_bytes()))
        return None

    def write_text(self, rel: str, text: str) -> Path:
        path = self.path / rel
        _atomic_write(path, text.encode())
        return path

    def write_jsonl(self, rel: str, rows: Iterable[Mapping[str, Any]]) -> Path:
        lines = [json.dumps(to_jsonable(r), sort_keys=True) for r in rows]
        path = self.path / rel
        data = ("\n".join(lines) + "\n").encode()
        if len(data) > SUMMARY_GZIP_BYTES:
            path = path.with_name(path.name + ".gz")
            data = gzip.compress(data)
        _atomic_write(path, data)
        return path

    def save_array(self, name: str, arr: Any, description: str) -> None:
        """``arrays/<name>.npy`` plus its manifest entry."""
        a = np.asarray(to_numpy(arr))
        path = self.path / "arrays" / f"{name}.npy"
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, a)
        os.replace(tmp, path)
        manifest = self.read_json("arrays/manifest.json") or {}
        manifest[name] = {
            "file": path.name,
            "shape": list(a.shape),
            "dtype": str(a.dtype),
            "description": description,
        }
        self.write_json("arrays/manifest.json", manifest)

    def load_arrays(self) -> dict[str, np.ndarray]:
        manifest = self.read_json("arrays/manifest.json") or {}
        return {k: np.load(self.path / "arrays" / v["file"]) for k, v in manifest.items()}


def to_numpy(x: Any) -> Any:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return x
