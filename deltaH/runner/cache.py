"""One cache for every expensive stage of a run, so ``--resume`` redoes only unfinished stages.

A stage's output is a frozen dataclass (or a tree of them) of tensors, arrays and plain values. It
is saved to ``<run>/cache/<stage>.pt`` with ``torch.save`` and read back with
``torch.load(weights_only=True)``: dataclasses are packed as ``{"__dc__": "module:Name", ...}`` and
only deltaH's own classes are rebuilt. A tensor that lived on an accelerator is stored on the CPU
with a mark (``{"__dev__": tensor}``) and comes back on the run's device
(``StageCache(device=...)``), so a resumed GPU run gets its cached values where it computed them;
CPU tensors stay on the CPU. Each entry carries its **key**: a hash of the part of the resolved
config the stage reads, the checkpoint's fingerprint (file names, sizes and mtimes) and the keys of
the stages it consumes. An entry whose key differs is a miss, never a wrong hit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
# 2: accelerator tensors marked (they come back on the run's device) and checkpoint.dtype "auto"
# computing half-precision checkpoints in float32: entries of format 1 are misses
FORMAT = 2


def fingerprint(path: str | Path) -> str:
    """A cheap identity of a checkpoint folder: every file's relative name, size and mtime."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    items = [
        (str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns)
        for f in files
    ]
    return hashlib.sha256(json.dumps([str(p.resolve()), items]).encode()).hexdigest()[:16]


def stage_key(name: str, config: Mapping[str, Any], upstream: Iterable[str] = ()) -> str:
    """The key of stage ``name``: its config slice (JSON, sorted) and the keys it depends on."""
    blob = json.dumps(
        {"stage": name, "format": FORMAT, "config": config, "upstream": list(upstream)},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pack(x: Any) -> Any:
    """A tree of deltaH dataclasses, tensors and arrays as plain containers ``weights_only`` can load."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        cls = type(x)
        out: dict[str, Any] = {"__dc__": f"{cls.__module__}:{cls.__qualname__}"}
        for f in dataclasses.fields(x):
            if f.init:
                out[f.name] = pack(getattr(x, f.name))
        return out
    if isinstance(x, np.ndarray):
        return {"__np__": torch.from_numpy(np.ascontiguousarray(x))}
    if isinstance(x, torch.Tensor):
        return x.detach() if x.device.type == "cpu" else {"__dev__": x.detach().cpu()}
    if isinstance(x, Mapping):
        return {"__map__": [[pack(k), pack(v)] for k, v in x.items()]}
    if isinstance(x, tuple):
        return {"__tuple__": [pack(v) for v in x]}
    if isinstance(x, list):
        return [pack(v) for v in x]
    if x is None or isinstance(x, bool | int | float | str):
        return x
    raise TypeError(f"cache: cannot store a {type(x).__name__}")


def unpack(x: Any, device: torch.device | str | None = None) -> Any:
    """Inverse of :func:`pack`; rebuilds only classes defined in the ``deltaH`` package. Tensors
    packed from an accelerator go to ``device`` (this process's device; ``None``: stay on the CPU)."""
    if isinstance(x, list):
        return [unpack(v, device) for v in x]
    if not isinstance(x, dict):
        return x
    if "__dev__" in x:
        return x["__dev__"] if device is None else x["__dev__"].to(device)
    if "__np__" in x:
        return x["__np__"].numpy()
    if "__tuple__" in x:
        return tuple(unpack(v, device) for v in x["__tuple__"])
    if "__map__" in x:
        return {unpack(k, device): unpack(v, device) for k, v in x["__map__"]}
    mod, _, qual = x["__dc__"].partition(":")
    if mod.split(".")[0] != "deltaH":
        raise TypeError(f"cache: refusing to rebuild {x['__dc__']} (not a deltaH class)")
    cls: Any = importlib.import_module(mod)
    for part in qual.split("."):
        cls = getattr(cls, part)
    return cls(**{k: unpack(v, device) for k, v in x.items() if k != "__dc__"})


MAX_BYTES = 2 << 30  # a stage output larger than this (e.g. N_U directions of a large model) is recomputed


def _nbytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    if isinstance(x, list):
        return sum(_nbytes(v) for v in x)
    return 0


class StageCache:
    """Stage outputs of one run folder (``<run>/cache``); ``None`` folder = no caching.

    Outputs over ``max_bytes`` are not stored (a resumed run recomputes them); the folder is removed
    by :meth:`clear` when the run completes, since the results then hold everything.
    """

    def __init__(
        self,
        folder: str | Path | None,
        on_stage: Callable[[str, str], None] | None = None,
        max_bytes: int = MAX_BYTES,
        device: torch.device | str | None = None,
    ):
        self.folder = None if folder is None else Path(folder)
        self.device = device  # where accelerator tensors of a hit (or a broadcast) come back
        self.on_stage = on_stage
        self.max_bytes = max_bytes
        self.events: list[tuple[str, str]] = []

    def clear(self) -> None:
        if self.folder is not None and self.folder.is_dir():
            shutil.rmtree(self.folder)

    def _event(self, name: str, what: str) -> None:
        self.events.append((name, what))
        if self.on_stage is not None:
            self.on_stage(name, what)

    def get(self, name: str, key: str) -> Any | None:
        """The stored value of ``name`` if its key matches, else None."""
        blob = self._blob(name, key)
        return None if blob is None else unpack(blob, self.device)

    def _blob(self, name: str, key: str) -> Any | None:
        """The packed value of ``name`` if its key matches (:func:`pack`'s form), else None."""
        if self.folder is None:
            return None
        path = self.folder / f"{name}.pt"
        if not path.is_file():
            return None
        blob = torch.load(path, weights_only=True)
        if blob.get("key") != key:
            log.info("cache: %s is stale (its inputs changed); recomputing", name)
            return None
        return blob["value"]

    def put(self, name: str, key: str, value: Any) -> None:
        if self.folder is None:
            return
        packed = pack(value)
        size = _nbytes(packed)
        if size > self.max_bytes:
            log.info("cache: %s is %.1f GB, not stored (a resumed run recomputes it)", name, size / 1e9)
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "value": packed}, tmp)
        os.replace(tmp, path)

    def stage(self, name: str, key: str, compute: Callable[[], T], where: str = "all") -> T:
        """``compute()`` once per key: a cached value is returned as it was saved.

        In a distributed run only rank 0 has a cache folder; it decides hit or miss for every rank.
        ``where`` says who computes on a miss: ``all`` (every rank: the estimators' collectives run
        inside), ``main`` (rank 0, its value then broadcast) or ``main_only`` (rank 0; the others get
        None). A hit reaches every rank but, for ``main_only``, rank 0 alone.
        """
        from deltaH.runner import distributed

        assert where in ("all", "main", "main_only"), where
        self._event(name, "start")
        hit = self._blob(name, key)  # packed: it travels to the other ranks as it was stored
        if distributed.broadcast(hit is not None):
            if where != "main_only":
                hit = distributed.broadcast_packed(hit)
            hit = unpack(hit, self.device)
            log.info("%s: loaded from the run's cache", name)
            self._event(name, "cached")
            return hit  # type: ignore[return-value,no-any-return]
        value = compute() if where == "all" or distributed.is_main() else None
        if where != "all":
            distributed.after_main()  # the others wait for rank 0 outside the collective timeout
        if where == "main":
            value = distributed.broadcast(value, self.device)
        self.put(name, key, value)
        self._event(name, "computed")
        return value  # type: ignore[return-value,no-any-return]
