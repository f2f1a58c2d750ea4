"""Resuming a run: the folder's own ``config.yaml`` is the config; result-affecting changes are refused.

Keys that never change results (chunk sizes, the device, the parent output folder) may differ on
resume; any other difference is an error that names each key, and the folder is left untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deltaH.config import Config, load_config
from deltaH.errors import ResumeError

FREE_PREFIXES = ("compute.", "checkpoint.device", "output.dir")


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = list(v) if isinstance(v, tuple) else v
    return out


def saved_config(folder: str | Path) -> Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise ResumeError(f"--resume {folder}: no config.yaml in that folder, so it cannot be resumed")
    return load_config(path)


def resume_config(
    folder: str | Path, config: str | Path | None = None, overrides: Sequence[str] = ()
) -> Config:
    """The config to resume ``folder`` with: its saved ``config.yaml``, or ``config`` and ``overrides``
    when given (then :func:`check_same_results` decides whether they are allowed)."""
    if config is None and not overrides:
        return saved_config(folder)
    return load_config(config if config is not None else Path(folder) / "config.yaml", overrides)


def result_differences(saved: Config, cfg: Config) -> list[str]:
    """``key (saved → given)`` for each result-affecting key that differs."""
    a, b = _flat(saved.to_dict()), _flat(cfg.to_dict())
    return [
        f"{k} ({a.get(k)!r} → {b.get(k)!r})"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and not k.startswith(FREE_PREFIXES)
    ]


def check_same_results(folder: str | Path, cfg: Config) -> None:
    diffs = result_differences(saved_config(folder), cfg)
    if diffs:
        raise ResumeError(
            f"--resume {folder}: the given config changes result-affecting keys of that run: "
            f"{'; '.join(diffs)}. Resume without them, or start a new run (--out NEW_FOLDER)"
        )
