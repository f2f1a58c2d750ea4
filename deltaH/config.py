"""Experiment configuration: YAML → validated, documented, frozen dataclasses.

A config file is a mapping of sections (``checkpoint``, ``data``, ``policy``, ``eval_batch``,
``update_batch``, ``loss``, ``eta``, ``analyses``, ``compute``, ``output``) plus ``seed``. Missing
keys take their defaults (``configs/toy.yaml`` spells every one out); unknown keys, wrong types and
impossible values raise ``ConfigError`` with a one-line message naming the key path, the value and
what is allowed — all before any model loads (this module imports only the standard library,
PyYAML and three light deltaH modules: ``errors``, ``_choices`` (the choice tuples the core shares)
and ``_config_checks`` (the validators and the YAML reader))::

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from deltaH._choices import BUILTIN_REWARDS as BUILTIN_REWARDS
from deltaH._choices import (
    DETAIL_LEVELS,
    DTYPES,
    ENTROPY_MODES,
    EVAL_PROMPTS,
    KERNEL_METHODS,
    LOSS_TYPES,
    NAMED_TEMPLATES,
    SCALE_REWARDS,
    UPDATE_SOURCES,
)
from deltaH._config_checks import (
    _auto_on_off,
    _boolean,
    _Check,
    _check_keys,
    _choice,
    _device,
    _dir_chunk,
    _error,
    _format_fields,
    _grid,
    _names,
    _number,
    _opt,
    _paths,
    _plain,
    _read_yaml,
    _reference,
    _related,
    _reward,
    _section_field,
    _set,
    _show,
    _string,
    _template,
    _validate,
)
from deltaH._config_checks import parse_overrides as parse_overrides
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
        "Model dtype: auto (as saved, but bfloat16/float16 weights are computed in float32: in half "
        "precision the entropy change of a realistic step is below rounding noise), float32, float64, "
        "bfloat16 or float16; sums are float64 whatever this is"), _choice(*DTYPES))
    device: str = _opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
                       _Check("one of: auto, cpu, cuda, cuda:N", _device))
    max_grad_norm: float | None = _opt(1.0, (
        "The trainer's gradient clipping norm (TrainingArguments.max_grad_norm; training_args.bin is "
        "never unpickled, so state it here); null = no clipping"), _number(0, lo_open=True, nullable=True))
    optimizer: str = _opt("saved", (
        "saved (the trainer's optimizer.pt: the step it would really take) or fresh (weights only: the "
        "first step of a new AdamW with betas (0.9, 0.999), eps 1e-8, weight decay 0, as the HF "
        "Trainer's defaults; needs a numeric eta.reference)"), _choice("saved", "fresh"))

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
        if (self.system_prompt is not None and self.template not in NAMED_TEMPLATES
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

    total_sequences: int = _opt(256, (
        "Sequences N_E drawn for E's own prompts; a multiple of group_size (include_update_prompts adds "
        "more)"), _number(1, integer=True))
    group_size: int = _opt(4, "Responses per prompt", _number(1, integer=True))
    prompts: str = _opt("replacement", (
        "How the total_sequences / group_size prompts of E are drawn from the records: replacement (a "
        "prompt may repeat) or distinct (needs that many records)"), _choice(*EVAL_PROMPTS))
    include_update_prompts: bool = _opt(False, (
        "Also draw group_size responses from q for each of U's prompts, after E's own rows (N_E = "
        "total_sequences + U's prompts × group_size): same-prompt (E, U) pairs for the kernel "
        "(docs/math.md#fisher-kernel); ΔH is then measured on that mix of prompts"), _boolean())

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
        _choice(*SCALE_REWARDS))
    max_resample_attempts: int = _opt(4, (
        "Times a group with all-equal rewards (no gradient) gets fresh responses before it is an error"),
        _number(0, integer=True))
    source: str = _opt("auto", (
        "Where U comes from: auto (the step the trainer recorded after this checkpoint when the run has "
        "one, else sampled), recorded (the trainer's recorded step; an error without one), sample (drawn "
        "from q here) or file (another trainer's rollouts in update_batch.path)"), _choice(*UPDATE_SOURCES))
    path: str | None = _opt(None, (
        "source recorded/auto: the folder of step files (null = deltah-steps beside the checkpoints); "
        "source file: the rollout file (.jsonl or .parquet)"), _string(nullable=True))

    def __post_init__(self) -> None:
        _validate(self, "update_batch")
        if self.source == "file" and self.path is None:
            raise _error("update_batch.path", None, "the rollout file (.jsonl or .parquet) when "
                         "update_batch.source is file")


@dataclass(frozen=True)
class LossConfig:
    """The trainer's RL loss and its normalisation (docs/math.md#rl-losses); match the run exactly."""

    type: str = _opt("dapo", (
        "grpo (per-sequence mean), dr_grpo (÷ B·G·L_max), dapo (token mean over U, TRL's default) or "
        "bnpo (token mean per micro-batch)"), _choice(*LOSS_TYPES))
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
        "η of the influence matrix, proxies and fits: 'lr' (the checkpoint's next-step learning rate; when "
        "that is 0, at the end of a schedule, the lr of the step that made the checkpoint, from its "
        "trainer_state.json log) or a positive number"), _Check("'lr' or a number > 0", _reference))

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
        "exact (streamed over parameter blocks) or projection (U's leading preconditioned-gradient "
        "directions exactly, a seeded CountSketch of the rest; fidelity checked); checked even when kernel "
        "is false"), _choice(*KERNEL_METHODS))
    kernel_proj_dim: int = _opt(768, (
        "CountSketch buckets k of kernel_method=projection (the residual outside kernel_subspace)"),
        _number(1, integer=True))
    kernel_subspace: int = _opt(16, (
        "kernel_method=projection: dimension of the subspace of U's preconditioned gradients kept "
        "exactly (0 = CountSketch only; >= N_U = exact)"), _number(0, integer=True))
    kernel_check_columns: int = _opt(8, (
        "kernel_method=projection: this many random update sequences also get their exact kernel column, "
        "and the projection's fidelity on those N_E × columns pairs (Spearman, Pearson, relative error) "
        "is reported; 0 = no check"), _number(0, integer=True))
    proxy: bool = _opt(True, (
        "Published proxies (covariance rule of Cui et al. 2025) beside ΔH (docs/math.md#covariance-proxy)"),
        _boolean())
    token_influence: bool = _opt(True, (
        "Each update token's exact first-order effect on the entropy, and a scoreboard of the published "
        "token-level rules (covariance, STEER, Wang et al., sign rule) against it "
        "(docs/math.md#token-influence)"), _boolean())
    controls: bool = _opt(False, (
        "Controls a user can set (docs/math.md#controls): the entropy-bonus coefficient (and, for a "
        "replayed step with a KL term, the KL coefficient) that makes δH₁ of the step entropy_target, "
        "with its ΔH measured"), _boolean())
    entropy_target: float = _opt(0.0, (
        "The δH₁ at the reference η (nats per sequence) the controls aim at; 0 = entropy unchanged to "
        "first order"), _number())
    entropy_mode: str = _opt("rb", (
        "Per-sequence entropy averaged by the estimators: rb (Rao-Blackwellised, lower variance) or "
        "naive (surprisal)"), _choice(*ENTROPY_MODES))

    def __post_init__(self) -> None:
        _validate(self, "analyses")


@dataclass(frozen=True)
class ComputeConfig:
    """Chunk sizes: they change speed and peak memory, never results (benchmarks/ finds good ones)."""

    tf_batch_size: int = _opt(16, "Sequences per teacher-forcing forward pass", _number(1, integer=True))
    dir_chunk: int | str = _opt("auto", (
        "Directions per vmap call (1 = a plain loop, no vmap); auto = the fastest of 1, 2, 4, 8, 16 "
        "(capped at K), timed on one teacher-forcing chunk of E once per checkpoint and recorded "
        "in summary.json"), _Check("'auto' or an integer >= 1", _dir_chunk))
    seq_chunk: int = _opt(8, "Sequences per vmap(grad) call for per-sequence gradients",
                          _number(1, integer=True))
    head_chunk: int | None = _opt(None, (
        "Scored positions per LM-head call; null = sized from the vocabulary and directions"),
        _number(1, integer=True, nullable=True))
    share_prompts: str = _opt("auto", (
        "Teacher forcing runs each prompt once per chunk and reuses its keys and values for the rows "
        "that share it (same results up to rounding): auto = where a chunk's rows repeat a prompt "
        "and that saves a tenth of the token-forwards, on = wherever a prompt repeats (an error on a "
        "model without a plain KV cache), off = never"), _Check("one of: auto, on, off", _auto_on_off))

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
        _choice(*DETAIL_LEVELS))
    plots: bool = _opt(True, "Write plots (needs matplotlib)", _boolean())

    def __post_init__(self) -> None:
        _validate(self, "output")


_SECTIONS: dict[str, type] = {
    "checkpoint": CheckpointConfig, "data": DataConfig, "policy": PolicyConfig,
    "eval_batch": EvalBatchConfig, "update_batch": UpdateBatchConfig, "loss": LossConfig,
    "eta": EtaConfig, "analyses": AnalysesConfig, "compute": ComputeConfig, "output": OutputConfig,
}


def _section(name: str, value: Any) -> Any:
    cls = _SECTIONS[name]
    if is_dataclass(value) and isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise _error(name, value, f"a mapping with keys {', '.join(_names(cls))}")
    _check_keys(value, cls, name)
    return cls(**value)


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
        if self.checkpoint.optimizer == "fresh" and self.eta.reference == "lr":
            raise _error("eta.reference", "lr", "a number (the learning rate of the step) when "
                         "checkpoint.optimizer is fresh: a fresh optimizer has no saved lr")

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


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a config; ``path=None`` = the defaults (``configs/toy.yaml``).

    Every problem is a ``ConfigError``; its message names the file or the ``--set`` override it
    came from.
    """
    sets = parse_overrides(overrides)
    raw = {} if path is None else _read_yaml(Path(path), ", ".join(_names(Config)))
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
