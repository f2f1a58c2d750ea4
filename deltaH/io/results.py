"""The results folder: created fresh (never overwritten), written incrementally, resumable.

Layout and ``summary.json`` schema: ``docs/results-schema.md``. Every write goes to a temporary
file first and is renamed into place, so an interrupted run leaves valid files; ``progress.json``
records which analyses are done so ``--resume`` can skip them, and the run's status: ``running``,
``complete``, ``partial`` (a study of several checkpoints some of which failed; ``--resume`` retries
them), ``incomplete`` (interrupted) or ``failed``. ``run_guard`` wraps a run: its log
goes to ``run.log`` (with the traceback of a failure), and a folder that a failed run created but
wrote no result into never blocks the same ``--out``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deltaH import _dist
from deltaH.errors import DeltaHError, OutputExistsError, ResumeError

SUMMARY_GZIP_BYTES = 1 << 20
RUN_LOG = "run.log"
# What creating a folder and starting a run write before any analysis finishes: a folder holding only
# these (sub-folders empty) and no finished step holds no result.
_SCAFFOLD = frozenset({"config.yaml", "progress.json", RUN_LOG, "arrays", "batches", "plots"})


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

    def __init__(self, path: Path, owned: bool = False) -> None:
        self.path = Path(path)
        #: ``create`` made the folder itself (it did not exist): a failed run may remove it again.
        self.owned = owned

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, parent: str | Path, out: str | Path | None = None, name: str = "run") -> ResultsDir:
        """A new folder: ``out`` if given (must not exist or be empty), else ``parent/<name>-<timestamp>``."""
        if out is not None:
            path = Path(out)
            if path.exists() and any(path.iterdir()) and not cls(path)._failed_without_results():
                raise OutputExistsError(
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
        owned = not path.exists()
        for sub in ("", "arrays", "batches", "plots"):
            (path / sub).mkdir(parents=True, exist_ok=True)
        rd = cls(path, owned=owned)
        rd.set_progress(status="running", done=[], error=None)
        return rd

    @classmethod
    def open(cls, path: str | Path, action: str = "resume") -> ResultsDir:
        """An existing results folder; ``action`` (``resume``, ``inspect``) words the error."""
        p = Path(path)
        if not (p / "progress.json").is_file():
            what = "does not exist" if not p.exists() else "is not a deltaH results folder (no progress.json)"
            raise ResumeError(f"{p} {what}; cannot {action} it (pass a folder written by 'deltah run')")
        return cls(p)

    def holds_no_results(self) -> bool:
        """Whether the folder holds only what creating it and starting a run wrote (no finished step)."""
        if self.progress().get("done"):
            return False
        for p in self.path.iterdir():
            if p.name not in _SCAFFOLD or (p.is_dir() and any(p.iterdir())):
                return False
        return True

    def _failed_without_results(self) -> bool:
        """A folder left by a run that failed before its first result (kept for its run.log): reusable."""
        return (self.path / "progress.json").is_file() and self.progress().get("status") == "failed" and (
            self.holds_no_results()
        )

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


def _log_file(path: Path) -> logging.FileHandler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


def log_traceback(path: Path, what: str) -> None:
    """Append ``"<what>: <Type>: <message>"`` and the traceback of the exception being handled to the
    log file ``path`` only: through the ``deltaH`` logger it would also reach the console's handlers."""
    exc = sys.exc_info()[1]
    handler = _log_file(path)
    logger = logging.getLogger("deltaH")
    try:
        handler.handle(logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s: %s: %s",
                                         (what, type(exc).__name__, exc), sys.exc_info()))
    finally:
        handler.close()


# Folders whose run_guard is open, or was left by an exception: where the process group's failure
# handling (deltaH.runner.distributed) records another rank's error.
_GUARDS: list[ResultsDir] = []


def open_guards() -> list[ResultsDir]:
    """The folders of the open :func:`run_guard` blocks (outermost first), and those left by an exception."""
    return list(_GUARDS)


def record_failure(
    rd: ResultsDir, error: str, traceback_text: str, bad_input: bool, status: str = "failed"
) -> None:
    """Mark ``rd`` as :func:`run_guard` marks a failed run, for an error raised elsewhere (another
    rank of a distributed run): its status and one-line ``error``, the traceback text appended to
    ``run.log``, and a folder this run created that holds no result yet removed after bad input."""
    if not rd.path.is_dir():
        return
    rd.set_progress(status=status, error=error)
    with open(rd.path / RUN_LOG, "a", encoding="utf-8") as f:
        f.write(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} ERROR deltaH: run failed: {error}\n{traceback_text}")
    if rd.owned and bad_input and rd.holds_no_results():
        shutil.rmtree(rd.path, ignore_errors=True)


@contextlib.contextmanager
def run_guard(rd: ResultsDir) -> Iterator[None]:
    """The edge around a run's work in ``rd``: its log file, its status, and what a failure leaves.

    * The ``deltaH`` loggers also write to ``rd/run.log`` (appended) while the block runs.
    * Ctrl-C: status ``incomplete`` (continue with ``--resume``).
    * Any other exception: status ``failed``; the traceback goes to ``run.log`` only (not the
      console) and the exception gets ``run_log`` (its path) for the caller's message. If
      ``ResultsDir.create`` made the folder (``rd.owned``) and nothing was produced yet, a
      ``DeltaHError`` (bad input: its message says it all) removes the folder, so the same ``--out``
      works again; after any other failure the folder stays for its ``run.log`` and a later
      ``ResultsDir.create`` may reuse it. A folder given to ``--resume``, one that existed before, and
      one with results are never removed.
    """
    logger = logging.getLogger("deltaH")
    handler = _log_file(rd.path / RUN_LOG)
    logger.addHandler(handler)
    _GUARDS.append(rd)
    keep = False  # a distributed run's failure handling may yet record another rank's error here
    try:
        yield
    except KeyboardInterrupt:
        rd.set_progress(status="incomplete", error="interrupted (Ctrl-C); continue with --resume")
        keep = _dist.active()
        raise
    except Exception as exc:
        keep = _dist.active()
        rd.set_progress(status="failed", error=f"{type(exc).__name__}: {exc}")
        logger.removeHandler(handler)
        handler.close()
        log_traceback(rd.path / RUN_LOG, "run failed")
        if rd.owned and isinstance(exc, DeltaHError) and rd.holds_no_results():
            shutil.rmtree(rd.path, ignore_errors=True)
        else:
            with contextlib.suppress(AttributeError):  # exceptions with __slots__ cannot take it
                exc.run_log = str(rd.path / RUN_LOG)  # type: ignore[attr-defined]
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        if not keep:
            _GUARDS.remove(rd)


def to_numpy(x: Any) -> Any:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return x
