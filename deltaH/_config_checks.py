"""The validators and the YAML reader behind :mod:`deltaH.config` (standard library and PyYAML only).

A check is ``_Check(expected, fn)``: ``fn`` returns the stored value or raises ``_Invalid``, and the
check turns that into a one-line ``ConfigError`` naming the key, the value and ``expected``. The
YAML reader is PyYAML's safe loader with two changes: ``1e-5`` is a float and duplicate keys are
errors. ``parse_overrides`` and ``_set`` apply ``--set key.path=value`` overrides.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from deltaH._choices import BUILTIN_REWARDS, NAMED_TEMPLATES
from deltaH.errors import ConfigError


def _show(value: Any, limit: int = 80) -> str:
    """``value`` as a user would write it in YAML (strings quoted), on one line."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v, limit) for v in value) + "]"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}: {_show(v, limit)}" for k, v in value.items()) + "}"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error(key: str, value: Any, expected: str) -> ConfigError:
    hint = ""
    if isinstance(value, str) and value.strip():
        try:
            parsed = yaml.load(value, Loader=_Loader)
        except yaml.YAMLError:
            parsed = value
        if isinstance(parsed, (bool, int, float)) or parsed is None:
            hint = " (a quoted string; write the value without quotes)"
    return ConfigError(f"config key '{key}': got {_show(value)}{hint}; expected {expected}", key)


def _did_you_mean(word: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word).lower(), options, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# --------------------------------------------------------------------------------------------
# Checks: each is (what is allowed, a function that returns the stored value or raises _Invalid)


class _Invalid(Exception):
    """Raised inside a check; ``expected`` refines the message, ``index`` points into a list."""

    def __init__(self, expected: str = "", index: int | None = None) -> None:
        super().__init__(expected)
        self.expected = expected
        self.index = index


@dataclass(frozen=True)
class _Check:
    expected: str
    fn: Callable[[Any], Any]

    def __call__(self, key: str, value: Any) -> Any:
        try:
            return self.fn(value)
        except _Invalid as e:
            if e.index is not None:
                key, value = f"{key}[{e.index}]", value[e.index]
            raise _error(key, value, e.expected or self.expected) from None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            integer: bool = False, nullable: bool = False) -> _Check:
    """An int (``integer``) or a finite float in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        kind += f" in {'(' if lo_open else '['}{lo}, {hi}]"
    elif lo is not None:
        kind = ("an integer" if integer else "a finite number") + f" {'>' if lo_open else '>='} {lo}"

    def fn(v: Any) -> Any:
        if v is None and nullable:
            return None
        ok = isinstance(v, int) and not isinstance(v, bool) if integer else _is_number(v) and math.isfinite(v)
        if not ok or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise _Invalid
        return int(v) if integer else float(v)

    return _Check(kind + (" or null" if nullable else ""), fn)


def _boolean() -> _Check:
    def fn(v: Any) -> bool:
        if not isinstance(v, bool):
            raise _Invalid
        return v

    return _Check("true or false", fn)


def _choice(*allowed: str) -> _Check:
    expected = "one of: " + ", ".join(allowed)

    def fn(v: Any) -> str:
        if not isinstance(v, str) or v not in allowed:
            raise _Invalid(expected + _did_you_mean(v, allowed) if isinstance(v, str) else "")
        return v

    return _Check(expected, fn)


def _string(nullable: bool = False, empty: bool = False) -> _Check:
    """A string (non-blank unless ``empty``), or null with ``nullable``."""

    def fn(v: Any) -> str | None:
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not (empty or v.strip()):
            raise _Invalid
        return v

    return _Check(("a string" if empty else "a non-empty string") + (" or null" if nullable else ""), fn)


def _paths(v: Any) -> str | tuple[str, ...]:
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, (list, tuple)) and v:
        for i, p in enumerate(v):
            if not isinstance(p, str) or not p.strip():
                raise _Invalid("a non-empty string (a checkpoint folder)", index=i)
        return tuple(v)
    raise _Invalid


def _device(v: Any) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda|cuda:\d+", v):
        raise _Invalid
    return v


def _format_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}


def _template(v: Any) -> str:
    if isinstance(v, Mapping):
        raise _Invalid("a string; YAML read the unquoted braces as a mapping: quote the template")
    if not isinstance(v, str) or not v:
        raise _Invalid
    if v in NAMED_TEMPLATES:
        return v
    try:
        names = _format_fields(v)
    except ValueError as e:
        raise _Invalid(f"a valid format string ({e}); write literal braces as {{{{ }}}}") from None
    if "prompt" not in names or not names <= {"prompt", "system_prompt"}:
        raise _Invalid(
            "'plain', 'chat' or a format string with {prompt} and optionally {system_prompt} "
            f"(found fields {sorted(names)}); write literal braces as {{{{ }}}}"
        )
    return v


_DOTTED = r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*"


def _reward(v: Any) -> str:
    if not isinstance(v, str):
        raise _Invalid
    s = v.strip()
    if s.lower() in BUILTIN_REWARDS:
        return v
    if re.fullmatch(f"{_DOTTED}:{_DOTTED}", s) or (re.fullmatch(_DOTTED, s) and "." in s):
        return v
    raise _Invalid(
        f"one of: {', '.join(BUILTIN_REWARDS)}, or a dotted path 'package.module:function'"
        + _did_you_mean(s, BUILTIN_REWARDS)
    )


def _grid(v: Any) -> str | tuple[float, ...]:
    if v == "auto":
        return "auto"
    if not isinstance(v, (list, tuple)) or not v:
        raise _Invalid
    for i, x in enumerate(v):
        if not (_is_number(x) and math.isfinite(x) and x > 0):
            raise _Invalid("a finite number > 0", index=i)
    grid = tuple(sorted(float(x) for x in v))
    if len(set(grid)) < len(grid):
        raise _Invalid("a list of distinct finite numbers > 0 (it has duplicates)")
    return grid


def _reference(v: Any) -> str | float:
    if v == "lr":
        return "lr"
    if not (_is_number(v) and math.isfinite(v) and v > 0):
        raise _Invalid
    return float(v)


def _dir_chunk(v: Any) -> str | int:
    if v == "auto":
        return "auto"
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        raise _Invalid
    return int(v)


def _auto_on_off(v: Any) -> str:
    """``auto``, ``on`` or ``off``; YAML 1.1 reads unquoted ``on``/``off`` as booleans, so ``True``
    and ``False`` mean ``on`` and ``off``."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if v not in ("auto", "on", "off"):
        raise _Invalid
    return str(v)


def _opt(default: Any, help: str, check: _Check) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _validate(obj: Any, section: str) -> None:
    """Check and normalise every field of a frozen section in place (``object.__setattr__``)."""
    for f in fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        object.__setattr__(obj, f.name, f.metadata["check"](key, getattr(obj, f.name)))


# --------------------------------------------------------------------------------------------
# Sections: frozen dataclasses whose fields carry (help, check) metadata


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _check_keys(d: Mapping[Any, Any], cls: type, section: str) -> None:
    allowed = _names(cls)
    for k in d:
        if k not in allowed:
            where = f"in '{section}'" if section else "at the top level"
            path = f"{section}.{k}" if section else str(k)
            raise ConfigError(f"config key '{path}' is not known; allowed keys {where}: "
                              f"{', '.join(allowed)}{_did_you_mean(k, allowed)}", path)


def _section_field(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "check": _Check("", lambda v: v)})


def _plain(v: Any) -> Any:
    if is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# YAML, overrides, loading


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-5`` as a float and rejects duplicate keys."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: Any, node: Any) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=True)  # type: ignore[no-any-return]


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def _read_yaml(path: Path, sections: str) -> dict[str, Any]:
    """The mapping in a YAML config file; ``sections`` (the allowed top-level keys) for messages."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file '{path}' cannot be read as UTF-8 text ({e})") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"config file '{path}'{where}: invalid YAML: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}': invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(f"config file '{path}' is empty; expected a mapping with keys {sections} "
                          "(write {} for all defaults)")
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}': got {_show(data)}; expected a mapping with keys {sections}")
    return data


_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["policy.top_p=0.9", "eta.grid=[1e-5,1e-4]"]`` → ``{"policy.top_p": 0.9, "eta.grid": [...]}``.

    Values are YAML (``null``, lists, ``{a: 1}`` mappings; quote strings with YAML syntax in them,
    e.g. ``data.template='"Q: {prompt}"'``); an empty value is null; a later override of one key wins.
    """
    if isinstance(overrides, str):
        raise ConfigError(f"overrides: got {overrides!r}; expected a list of 'key.path=value' strings")
    out: dict[str, Any] = {}
    for item in overrides:
        key, eq, text = str(item).partition("=")
        key = key.strip()
        if not eq or not _KEY.fullmatch(key):
            raise ConfigError(f"override {str(item)!r}: expected 'key.path=value' (e.g. policy.top_p=0.9)")
        try:
            out[key] = yaml.load(text, Loader=_Loader)
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e)
            raise ConfigError(f"override {str(item)!r}: the value is not valid YAML ({problem}); "
                              "quote it, e.g. key='\"text\"'", key) from None
    return out


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for i, p in enumerate(parents):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            path = ".".join(parents[: i + 1])
            raise _error(path, child, f"a mapping, to set '{key}' inside it")
        node = child
    if isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for k, v in value.items():
            _set(node[leaf], str(k), v)
    else:
        node[leaf] = value


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or a.startswith(b + "[") or b.startswith(a + ".")
