"""The embedded toy: arithmetic prompts, a character tokenizer and a tiny trained Qwen2 + LoRA checkpoint.

The artifact in ``deltaH/toy/artifacts/`` is made by ``python -m deltaH.toy.make_toy --out
deltaH/toy/artifacts`` (see that module and ``artifacts/README.md``) and is laid out like a real
run: ``base/`` (an HF model folder), ``checkpoint-N/`` (an HF Trainer checkpoint of a peft LoRA
adapter with its AdamW state) and ``prompts.jsonl`` (held-out prompts with answers).

>>> import deltaH.toy as toy
>>> ckpt = toy.load_toy()                        # doctest: +SKIP  (deltaH.io.load_checkpoint)
>>> records = toy.load_toy_prompts()             # doctest: +SKIP
>>> policy = toy.toy_policy()                    # the temperature / top-p the toy was trained with

The script itself is the module ``deltaH.toy.make_toy`` (``make_toy(out, ToyConfig(...))``); it is
not imported here, so that ``python -m deltaH.toy.make_toy`` runs it fresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaH.toy.task import OPS as OPS
from deltaH.toy.task import Problem as Problem
from deltaH.toy.task import all_problems as all_problems
from deltaH.toy.task import records as records
from deltaH.toy.task import split_problems as split_problems
from deltaH.toy.task import write_prompts as write_prompts
from deltaH.toy.tokenizer import build_tokenizer as build_tokenizer

if TYPE_CHECKING:
    from deltaH.policy import SamplingPolicy
    from deltaH.sampling.data import PromptRecord

__all__ = [
    "OPS",
    "Problem",
    "all_problems",
    "build_tokenizer",
    "load_toy",
    "load_toy_prompts",
    "records",
    "split_problems",
    "toy_base_path",
    "toy_checkpoint_path",
    "toy_config",
    "toy_dir",
    "toy_policy",
    "toy_prompts_path",
    "write_prompts",
]

_ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
_REMAKE = "remake it with: python -m deltaH.toy.make_toy --out deltaH/toy/artifacts --overwrite"


def toy_dir() -> Path:
    """The folder that holds the shipped artifact (``base/``, ``checkpoint-N/``, ``prompts.jsonl``)."""
    if not _ARTIFACTS.is_dir():
        raise FileNotFoundError(f"the toy artifact folder {_ARTIFACTS} is missing; {_REMAKE}")
    return _ARTIFACTS


def toy_base_path() -> Path:
    """``artifacts/base``: the warmed-up base model (HF model folder with its tokenizer)."""
    return _existing(toy_dir() / "base")


def toy_checkpoint_path() -> Path:
    """``artifacts/checkpoint-N``: the Trainer checkpoint (LoRA adapter, optimizer.pt, scheduler.pt, ...)."""
    found = sorted(p for p in toy_dir().glob("checkpoint-*") if p.is_dir())
    if len(found) != 1:
        raise FileNotFoundError(
            f"expected exactly one checkpoint-N folder in {toy_dir()}, found {[p.name for p in found]}; "
            + _REMAKE
        )
    return found[0]


def toy_prompts_path() -> Path:
    """``artifacts/prompts.jsonl``: held-out prompts (``question``, ``answer``, ``pass_rate``, ``id``)."""
    return _existing(toy_dir() / "prompts.jsonl")


def _settings() -> dict[str, Any]:
    from deltaH.toy.make_toy import CONFIG_FILE

    path = _existing(toy_checkpoint_path() / CONFIG_FILE)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def toy_config() -> dict[str, Any]:
    """Every setting the shipped toy was made with (``ToyConfig`` fields, from ``deltah_toy.json``).

    Useful keys: ``temperature``, ``top_p``, ``max_new_tokens``, ``group_size``, ``n_prompts``,
    ``loss_type``, ``scale_rewards``, ``reward``, ``max_grad_norm``.
    """
    return dict(_settings()["config"])


def toy_policy() -> SamplingPolicy:
    """The sampling policy (temperature, top-p) the toy's GRPO steps used."""
    from deltaH.policy import SamplingPolicy

    cfg = toy_config()
    return SamplingPolicy(temperature=float(cfg["temperature"]), top_p=float(cfg["top_p"]))


def load_toy(**kwargs: Any) -> Any:
    """The shipped checkpoint through ``deltaH.io.load_checkpoint`` (keyword arguments passed on).

    Returns its ``Checkpoint``: ``model`` (peft LoRA model, eval mode), ``tokenizer``,
    ``optimizer_state`` (``AdamWState`` after the checkpoint's steps), ``lr`` (the next step's).
    """
    from deltaH.io.checkpoint import load_checkpoint

    return load_checkpoint(toy_checkpoint_path(), **kwargs)


def load_toy_prompts(**kwargs: Any) -> list[PromptRecord]:
    """The held-out prompts as ``PromptRecord`` s (``deltaH.sampling.load_prompts`` on ``prompts.jsonl``).

    Ids are the file's ``id`` field unless ``id_field`` is given.
    """
    from deltaH.sampling.data import load_prompts

    kwargs.setdefault("id_field", "id")
    return load_prompts(toy_prompts_path(), **kwargs)


def _existing(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"toy artifact file {path} is missing; {_REMAKE}")
    return path
