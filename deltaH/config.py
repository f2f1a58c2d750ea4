"""Experiment configuration: YAML → validated, documented, frozen dataclasses.

A config file is a mapping of sections (``checkpoint``, ``data``, ``policy``, ``eval_batch``,
``update_batch``, ``loss``, ``eta``, ``analyses``, ``compute``, ``output``) plus ``seed``. Missing
keys take their defaults (``configs/toy.yaml`` spells every one out); unknown keys, wrong types and
impossible values raise ``ConfigError`` with a one-line message naming the key path, the value and
what is allowed — all before any model loads (this module imports only the standard library,
PyYAML and ``deltaH.errors``, itself standard library only)::

    config key 'policy.top_p': got 1.5; expected a number in (0, 1]

Type rules: booleans must be YAML booleans (``true``/``yes``; the string ``"true"`` is an error);
integer keys reject floats and booleans; number keys accept integers and store floats. YAML is read
with one change from PyYAML's YAML 1.1 rules: ``1e-5`` (no dot) is a float, not a string. Duplicate
keys are errors. ``--set key.path=value`` overrides (``parse_overrides``) take YAML values and are
applied to the file's mapping before validation; a mapping value merges into a section.

>>> cfg = load_config(None, ["policy.top_p=0.9", "eta.grid=[1e-4, 1e-5]"])
>>> cfg.policy.top_p, cfg.eta.grid
(0.9, (1e-05, 0.0001))
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

from deltaH.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_FILE",
    "AnalysesConfig",
    "CheckpointConfig",
    "ComputeConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EtaConfig",
    "EvalBatchConfig",
    "LossConfig",
    "OutputConfig",
    "PolicyConfig",
    "UpdateBatchConfig",
    "describe_config",
    "load_config",
    "parse_overrides",
]

#: ``configs/toy.yaml`` of a source checkout (absent from an installed wheel). ``load_config(None)``
#: never reads it: the defaults live in the dataclasses below, and a test keeps the two equal.
DEFAULT_CONFIG_FILE = Path(__file__).resolve().parent.parent / "configs" / "toy.yaml"

BUILTIN_REWARDS = ("math", "gsm8k", "exact")


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
    if v in ("plain", "chat"):
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


def _opt(default: Any, help: str, check: _Check) -> Any:
    return field(default=default, metadata={"help": help, "check": check})


def _validate(obj: Any, section: str) -> None:
    """Check and normalise every field of a frozen section in place (``object.__setattr__``)."""
    for f in fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        object.__setattr__(obj, f.name, f.metadata["check"](key, getattr(obj, f.name)))


# --------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class CheckpointConfig:
    """Which checkpoint(s) to analyse and how to load them."""

    path: str | tuple[str, ...] = _opt("toy", (
        "'toy' (the embedded toy checkpoint), a folder (HF model, peft adapter or Trainer checkpoint-N), "
        "a list of folders, or a glob like 'runs/x/checkpoint-*'; several folders make a study along "
        "the run"), _Check("'toy', a folder, a glob, or a non-empty list of folders", _paths))
    base_model: str | None = _opt(None, (
        "Base model path or hub name for a peft adapter, overriding the adapter's "
        "base_model_name_or_path; null = the adapter's own"), _string(nullable=True))
    dtype: str = _opt("auto", (
        "Model dtype: auto (as saved), float32, float64, bfloat16 or float16; sums are float64 "
        "whatever this is"), _choice("auto", "float32", "float64", "bfloat16", "float16"))
    device: str = _opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
                       _Check("one of: auto, cpu, cuda, cuda:N", _device))
    max_grad_norm: float | None = _opt(1.0, (
        "The trainer's gradient clipping norm (TrainingArguments.max_grad_norm; training_args.bin is "
        "never unpickled, so state it here); null = no clipping"), _number(0, lo_open=True, nullable=True))

    def __post_init__(self) -> None:
        _validate(self, "checkpoint")


@dataclass(frozen=True)
class DataConfig:
    """Prompts for both batches, how they become model input, and the reward."""

    path: str = _opt("toy", (
        "'toy' (the toy task's prompts), a .jsonl/.json/.csv/.parquet file, or a folder written by "
        "datasets' save_to_disk"), _string())
    prompt_field: str = _opt("question", "Field holding the prompt text", _string())
    answer_field: str | None = _opt("answer", (
        "Field holding the reference answer (reduced to its final answer, e.g. GSM8K '#### 72' -> '72'); "
        "null = no answers"), _string(nullable=True))
    id_field: str | None = _opt(None, "Field used as the record id; null = the row number",
                                _string(nullable=True))
    template: str = _opt("plain", (
        "Prompt → model input: plain (as is), chat (the tokenizer's chat template, one user turn), or a "
        "format string containing {prompt} (optionally {system_prompt}; literal braces as {{ }})"),
        _Check("'plain', 'chat', or a format string containing {prompt}", _template))
    system_prompt: str | None = _opt(None, (
        "System message (chat), text before the prompt and a blank line (plain), or the "
        "{system_prompt} field of a format string; null = none"), _string(nullable=True, empty=True))
    limit: int | None = _opt(None, "Use only the first N rows; null = all rows",
                             _number(1, integer=True, nullable=True))
    reward: str = _opt("math", (
        "Reward of the update batch: a built-in (math, gsm8k, exact) or a dotted path "
        "'package.module:function' to a function (completions, records) -> list[float]"),
        _Check("one of: math, gsm8k, exact, or a dotted path 'package.module:function'", _reward))

    def __post_init__(self) -> None:
        _validate(self, "data")
        if (self.system_prompt is not None and self.template not in ("plain", "chat")
                and "system_prompt" not in _format_fields(self.template)):
            raise _error("data.system_prompt", self.system_prompt,
                         "null, because data.template has no {system_prompt} field (add it or drop this)")


@dataclass(frozen=True)
class PolicyConfig:
    """The sampling policy q (docs/math.md#policy): both batches are drawn from it, its entropy measured."""

    temperature: float = _opt(1.0, "Sampling temperature τ", _number(0, lo_open=True))
    top_p: float = _opt(1.0, "Nucleus mass p; 1.0 = no truncation", _number(0, 1, lo_open=True))
    max_new_tokens: int = _opt(16, "Most generated tokens per response (EOS included)",
                               _number(1, integer=True))

    def __post_init__(self) -> None:
        _validate(self, "policy")


@dataclass(frozen=True)
class EvalBatchConfig:
    """The evaluation batch E on which entropy and ΔH are estimated."""

    total_sequences: int = _opt(256, "Sequences N_E in E; a multiple of group_size", _number(1, integer=True))
    group_size: int = _opt(4, "Responses per prompt (prompts are drawn with replacement)",
                           _number(1, integer=True))

    def __post_init__(self) -> None:
        _validate(self, "eval_batch")
        if self.total_sequences % self.group_size:
            raise _error("eval_batch.total_sequences", self.total_sequences,
                         f"a multiple of eval_batch.group_size ({self.group_size})")


@dataclass(frozen=True)
class UpdateBatchConfig:
    """The update batch U: the GRPO generation batch of the one optimizer step."""

    n_prompts: int = _opt(8, "Distinct prompts B in U", _number(1, integer=True))
    group_size: int = _opt(8, "Responses G per prompt (the GRPO group; >= 2 so advantages exist)",
                           _number(2, integer=True))
    scale_rewards: str = _opt("group", (
        "Advantage scaling: group (÷ group std + 1e-4, TRL's default), batch (÷ batch std + 1e-4) or none"),
        _choice("group", "batch", "none"))
    max_resample_attempts: int = _opt(4, (
        "Times a group with all-equal rewards (no gradient) gets fresh responses before it is an error"),
        _number(0, integer=True))

    def __post_init__(self) -> None:
        _validate(self, "update_batch")


@dataclass(frozen=True)
class LossConfig:
    """The trainer's RL loss and its normalisation (docs/math.md#rl-losses); match the run exactly."""

    type: str = _opt("dapo", (
        "grpo (per-sequence mean), dr_grpo (÷ B·G·L_max), dapo (token mean over U, TRL's default) or "
        "bnpo (token mean per micro-batch)"), _choice("grpo", "dr_grpo", "dapo", "bnpo"))
    grad_accum_steps: int = _opt(1, (
        "The trainer's gradient-accumulation steps: U splits into this many equal micro-batches; must "
        "divide update_batch.n_prompts × update_batch.group_size"), _number(1, integer=True))
    max_completion_length: int | None = _opt(None, (
        "L_max of dr_grpo (the trainer's max_completion_length); null = policy.max_new_tokens"),
        _number(1, integer=True, nullable=True))

    def __post_init__(self) -> None:
        _validate(self, "loss")


@dataclass(frozen=True)
class EtaConfig:
    """Step sizes η per unit learning rate: η = lr is the real step (docs/math.md#directions-and-eta)."""

    grid: str | tuple[float, ...] = _opt("auto", (
        "'auto' (n_points log-spaced values around the reference) or a non-empty list of positive "
        "numbers (sorted ascending on load)"), _Check("'auto' or a non-empty list of numbers > 0", _grid))
    n_points: int = _opt(9, "Number of η values in the auto grid", _number(3, integer=True))
    reference: str | float = _opt("lr", (
        "η of the influence matrix, proxies and fits: 'lr' (the checkpoint's next-step learning rate) "
        "or a positive number"), _Check("'lr' or a number > 0", _reference))

    def __post_init__(self) -> None:
        _validate(self, "eta")


@dataclass(frozen=True)
class AnalysesConfig:
    """Which analyses run beside ΔH along the update decompositions (always computed)."""

    first_order: bool = _opt(True, "First-order prediction δH₁ beside each ΔH (docs/math.md#first-order)",
                             _boolean())
    second_order: bool = _opt(False, "Second-order term along each decomposition (slower)", _boolean())
    influence: bool = _opt(True, (
        "Influence matrix [N_E, N_U]: each update sequence's ΔH on each evaluation sequence at the "
        "reference η (docs/math.md#influence-matrices)"), _boolean())
    kernel: bool = _opt(False, (
        "Cross Fisher kernel [N_E, N_U] with the AdamW preconditioner (docs/math.md#fisher-kernel)"),
        _boolean())
    kernel_method: str = _opt("exact", (
        "exact (streamed over parameter blocks) or projection (seeded random projection to "
        "kernel_proj_dim); checked even when kernel is false"), _choice("exact", "projection"))
    kernel_proj_dim: int = _opt(1024, "Projection dimension k of kernel_method=projection",
                                _number(1, integer=True))
    proxy: bool = _opt(True, (
        "Published proxies (covariance rule of Cui et al. 2025) beside ΔH (docs/math.md#covariance-proxy)"),
        _boolean())
    entropy_mode: str = _opt("rb", (
        "Per-sequence entropy averaged by the estimators: rb (Rao-Blackwellised, lower variance) or "
        "naive (surprisal)"), _choice("rb", "naive"))

    def __post_init__(self) -> None:
        _validate(self, "analyses")


@dataclass(frozen=True)
class ComputeConfig:
    """Chunk sizes: they change speed and peak memory, never results (benchmarks/ finds good ones)."""

    tf_batch_size: int = _opt(16, "Sequences per teacher-forcing forward pass", _number(1, integer=True))
    dir_chunk: int = _opt(8, "Directions per vmap call", _number(1, integer=True))
    seq_chunk: int = _opt(8, "Sequences per vmap(grad) call for per-sequence gradients",
                          _number(1, integer=True))
    head_chunk: int | None = _opt(None, (
        "Scored positions per LM-head call; null = sized from the vocabulary and directions"),
        _number(1, integer=True, nullable=True))

    def __post_init__(self) -> None:
        _validate(self, "compute")


@dataclass(frozen=True)
class OutputConfig:
    """Where results go and how much is written (docs/results-schema.md)."""

    dir: str = _opt("results", (
        "Parent folder; each run writes a new timestamped subfolder in it unless --out is given"), _string())
    detail: str = _opt("standard", (
        "How much is saved (docs/results-schema.md): minimal (summary, report, arrays), standard "
        "(+ batches/*.jsonl), detailed (+ per_sequence_full) or debug (+ per-token eval_token_* arrays)"),
        _choice("minimal", "standard", "detailed", "debug"))
    plots: bool = _opt(True, "Write plots (needs matplotlib)", _boolean())

    def __post_init__(self) -> None:
        _validate(self, "output")


_SECTIONS: dict[str, type] = {
    "checkpoint": CheckpointConfig, "data": DataConfig, "policy": PolicyConfig,
    "eval_batch": EvalBatchConfig, "update_batch": UpdateBatchConfig, "loss": LossConfig,
    "eta": EtaConfig, "analyses": AnalysesConfig, "compute": ComputeConfig, "output": OutputConfig,
}


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


def _section(name: str, value: Any) -> Any:
    cls = _SECTIONS[name]
    if is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _error(name, value, f"a mapping with keys {', '.join(_names(cls))}")
    _check_keys(value, cls, name)
    return cls(**value)


def _section_field(cls: type, help: str) -> Any:
    return field(default_factory=cls, metadata={"help": help, "check": _Check("", lambda v: v)})


@dataclass(frozen=True)
class Config:
    """A whole experiment: every section validated on construction (a mapping is accepted per section).

    Build one with ``load_config`` (YAML + overrides) or ``Config.from_dict``; ``Config()`` holds the
    defaults, which equal ``configs/toy.yaml``.
    """

    checkpoint: CheckpointConfig = _section_field(CheckpointConfig, "Checkpoint(s) and how to load them")
    data: DataConfig = _section_field(DataConfig, "Prompts, template and reward")
    policy: PolicyConfig = _section_field(PolicyConfig, "The sampling policy q")
    eval_batch: EvalBatchConfig = _section_field(EvalBatchConfig, "The evaluation batch E")
    update_batch: UpdateBatchConfig = _section_field(UpdateBatchConfig, "The update batch U")
    loss: LossConfig = _section_field(LossConfig, "The trainer's RL loss")
    eta: EtaConfig = _section_field(EtaConfig, "Step sizes η")
    analyses: AnalysesConfig = _section_field(AnalysesConfig, "Which analyses run")
    compute: ComputeConfig = _section_field(ComputeConfig, "Chunk sizes")
    seed: int = _opt(0, "Seed of every random draw (batches, projections); one run = one seed",
                     _number(0, 2**32 - 1, integer=True))
    output: OutputConfig = _section_field(OutputConfig, "Results folder and detail")

    def __post_init__(self) -> None:
        for name in _SECTIONS:
            object.__setattr__(self, name, _section(name, getattr(self, name)))
        _validate(self, "")
        n_u = self.update_batch.n_prompts * self.update_batch.group_size
        if n_u % self.loss.grad_accum_steps:
            raise _error("loss.grad_accum_steps", self.loss.grad_accum_steps,
                         f"a divisor of update_batch.n_prompts * update_batch.group_size ({n_u})")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Config:
        """Validate a plain nested mapping (missing keys take their defaults)."""
        if not isinstance(d, Mapping):
            keys = ", ".join(_names(cls))
            raise ConfigError(f"config: got {_show(d)}; expected a mapping with keys {keys}")
        _check_keys(d, cls, "")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists, not tuples): YAML- and JSON-serialisable; ``from_dict`` inverts it."""
        return _plain(self)


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


def _read_yaml(path: Path) -> dict[str, Any]:
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
    sections = ", ".join(_names(Config))
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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config; ``path=None`` = the defaults (``configs/toy.yaml``).

    Every problem is a ``ConfigError``; its message names the file or the ``--set`` override it
    came from.
    """
    sets = parse_overrides(overrides)
    raw = {} if path is None else _read_yaml(Path(path))
    for key, value in sets.items():
        _set(raw, key, value)
    try:
        return Config.from_dict(raw)
    except ConfigError as e:
        src = [str(o).strip() for o in overrides
               if e.key is not None and _related(e.key, str(o).partition("=")[0].strip())]
        where = f" (from --set {src[-1]})" if src else f" (in {path})" if path is not None else ""
        raise ConfigError(str(e) + where, e.key) from None


def describe_config() -> str:
    """A markdown table of every key: default, allowed values and help (for the README)."""
    rows = ["| key | default | allowed | meaning |", "| --- | --- | --- | --- |"]

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    for top in fields(Config):
        if top.name in _SECTIONS:
            items = [(f"{top.name}.{f.name}", f) for f in fields(_SECTIONS[top.name])]
        else:
            items = [(top.name, top)]
        for key, f in items:
            rows.append(f"| `{key}` | `{esc(_show(f.default, 200))}` | {esc(f.metadata['check'].expected)} "
                        f"| {esc(f.metadata['help'])} |")
    return "\n".join(rows) + "\n"
