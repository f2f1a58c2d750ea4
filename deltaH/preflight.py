"""Checks of a run's inputs before its results folder exists (cheap: no weights load, no sampling).

``preflight(cfg, paths)`` raises, up front, the bad-input errors a run would otherwise hit after
loading a model for seconds or minutes: an unavailable device, a checkpoint folder that is missing,
corrupt or incomplete (no ``optimizer.pt``, no tokenizer), a base model that cannot be found, a
prompt file that does not parse, a reward that does not resolve. ``runner.run`` calls it before
``ResultsDir.create``, so bad input leaves no folder behind and the same ``--out`` works again.
Every error is a ``deltaH.errors.DeltaHError`` that names the config key.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deltaH.config import BUILTIN_REWARDS, Config
from deltaH.errors import CheckpointError, ConfigError

__all__ = ["preflight"]


def preflight(cfg: Config, paths: Sequence[str]) -> None:
    """Check device, checkpoint folders ``paths``, data and reward of ``cfg``; raise the first problem."""
    from deltaH.io.checkpoint import check_checkpoint, check_device, tokenizer_folder
    from deltaH.runner.recorded import check_source

    if cfg.checkpoint.device != "auto":
        check_device(cfg.checkpoint.device)
    for p in paths:
        saved = cfg.checkpoint.optimizer == "saved"
        _, base = check_checkpoint(p, base_model=cfg.checkpoint.base_model, optimizer=saved)
        if saved and not (Path(p) / "optimizer.pt").is_file():
            raise CheckpointError(
                f"checkpoint {p} has no optimizer state (optimizer.pt): deltaH needs it to rebuild the AdamW "
                "step; point checkpoint.path at a trainer checkpoint-N folder, or set "
                "checkpoint.optimizer=fresh (and a numeric eta.reference) for the first step of a new AdamW"
            )
        tok_dir = tokenizer_folder([p] + ([base] if base else []))
        if tok_dir is None:
            raise CheckpointError(
                f"checkpoint {p} has no tokenizer files (nor has its base model); save the tokenizer beside "
                "the model (tokenizer.save_pretrained)"
            )
        check_source(cfg, p, tok_dir)  # source recorded/file: the record or rollout file is there
    n_records = _check_data(cfg)
    if cfg.update_batch.n_prompts > n_records:
        raise ConfigError(
            f"config key 'update_batch.n_prompts': got {cfg.update_batch.n_prompts}, but data.path holds "
            f"{n_records} prompt(s) (after data.limit); U needs distinct prompts: lower it or load more",
            "update_batch.n_prompts",
        )
    e = cfg.eval_batch
    n_groups = e.total_sequences // e.group_size
    if e.prompts == "distinct" and n_groups > n_records:
        raise ConfigError(
            f"config key 'eval_batch.prompts': distinct needs {n_groups} prompts "
            f"(eval_batch.total_sequences / eval_batch.group_size) but data.path holds {n_records} "
            "(after data.limit); use replacement, fewer sequences, a larger group_size, or more prompts",
            "eval_batch.prompts",
        )
    _check_reward(cfg)


def _check_data(cfg: Config) -> int:
    """Parse the prompt file as the run will (without the tokenizer: ``chat`` is checked as plain)."""
    from deltaH.sampling.data import load_prompts

    d = cfg.data
    path = d.path
    if path == "toy":
        from deltaH.toy import toy_prompts_path

        path = str(toy_prompts_path())
    records = load_prompts(
        path,
        prompt_field=d.prompt_field,
        answer_field=d.answer_field,
        id_field=d.id_field,
        template="plain" if d.template == "chat" else d.template,
        system_prompt=d.system_prompt,
        limit=d.limit,
    )
    return len(records)


def _check_reward(cfg: Config) -> None:
    """The reward resolves to a function; a built-in one has reference answers to compare with."""
    from deltaH.sampling.rewards import load_reward_fn

    spec = cfg.data.reward
    try:
        load_reward_fn(spec)
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config key 'data.reward': {first}", "data.reward") from e
    if spec.strip().lower() in BUILTIN_REWARDS and cfg.data.answer_field is None:
        raise ConfigError(
            f"config key 'data.reward': the built-in reward {spec!r} compares each response with the "
            "reference answer, but data.answer_field is null; set data.answer_field to the column that "
            "holds the answers, or use a reward 'package.module:function'",
            "data.reward",
        )
