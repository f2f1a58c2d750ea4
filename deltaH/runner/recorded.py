"""Where the update batch U comes from: a trainer's recorded step, another trainer's rollouts, or
sampling here (``update_batch.source``).

``auto`` (the default) replays the step the trainer took right after the checkpoint when the run
recorded it (``deltah-steps/step-<N+1>.*`` beside ``checkpoint-N``, written by
:class:`~deltaH.integrations.trl.DeltaHGRPOTrainer`), else samples U from ``q`` as before;
``recorded`` insists on the record; ``file`` reads another trainer's rollouts
(:mod:`deltaH.io.rollouts`). A recorded U keeps the trainer's options (loss type, clipping, KL,
temperature, clipping norm); the config's ``loss.*`` keys then do not apply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltaH.config import Config
from deltaH.errors import NotFoundError
from deltaH.policy import SamplingPolicy
from deltaH.sampling.builders import UpdateBatch
from deltaH.updates.recorded import RecordedStep, TrainerOptions

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class UpdateSource:
    """The resolved source of U for one checkpoint.

    ``kind``: ``sampled``, ``recorded`` or ``file``; ``recorded``: the step's records (one per rank)
    or the rollouts as one record; ``step``: the optimizer step U trained (the checkpoint's global
    step + 1); ``where``: the step file or rollout file; ``reason``: why (for ``auto``);
    ``next_checkpoint``: the folder saved after that step, when it exists (the realised step).
    """

    kind: str
    recorded: list[RecordedStep] | None
    step: int | None
    where: str | None
    reason: str
    next_checkpoint: str | None

    @property
    def options(self) -> TrainerOptions | None:
        return None if not self.recorded else self.recorded[0].options


def checkpoint_step(path: str | Path) -> int | None:
    """The global step a checkpoint was saved after: ``trainer_state.json``, else ``checkpoint-N``."""
    from deltaH.io.checkpoint import _trainer_state

    p = Path(path)
    if not p.is_dir():
        return None
    step = _trainer_state(p)[0]
    if step is None:
        m = _CKPT.match(p.name)
        step = int(m.group(1)) if m else None
    return step


def steps_dir_for(cfg: Config, ckpt_path: str | Path) -> Path:
    """The folder of step files: ``update_batch.path``, else ``deltah-steps`` beside the checkpoint."""
    if cfg.update_batch.path is not None and cfg.update_batch.source != "file":
        return Path(cfg.update_batch.path).expanduser()
    return Path(ckpt_path).expanduser().parent / "deltah-steps"


def next_checkpoint(ckpt_path: str | Path, step: int | None) -> str | None:
    if step is None:
        return None
    cand = Path(ckpt_path).parent / f"checkpoint-{step + 1}"
    return str(cand) if cand.is_dir() else None


def has_record(sdir: Path, step: int) -> bool:
    return (sdir / f"step-{step}.json").is_file() or (sdir / f"step-{step}.rank0.json").is_file()


def check_source(cfg: Config, ckpt_path: str | Path, tokenizer_dir: Path | None = None) -> None:
    """Pre-flight check (no weights load): ``recorded`` needs the record of the step after the
    checkpoint; ``file`` needs a rollout file that parses (with the tokenizer of ``tokenizer_dir``)."""
    if cfg.update_batch.source == "file":
        p = Path(str(cfg.update_batch.path)).expanduser()
        if not p.is_file():
            raise NotFoundError(
                f"config key 'update_batch.path': the rollout file {p} does not exist (update_batch.source "
                "is file)"
            )
        from deltaH.io.rollouts import load_rollouts

        tok = None
        if tokenizer_dir is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        load_rollouts(
            p, tokenizer=tok, options=options_from_config(cfg), micro_batches=cfg.loss.grad_accum_steps
        )
        return
    if cfg.update_batch.source != "recorded":
        return
    step = checkpoint_step(ckpt_path)
    sdir = steps_dir_for(cfg, ckpt_path)
    if step is None or not has_record(sdir, step + 1):
        what = "the step after it" if step is None else f"step {step + 1}"
        raise NotFoundError(
            f"update_batch.source is recorded but {sdir} holds no record of {what} (checkpoint {ckpt_path}): "
            "train with DeltaHGRPOTrainer (it records every step), point update_batch.path at the step "
            "files, or set update_batch.source=auto/sample"
        )


def resolve_update_source(cfg: Config, ckpt_path: str | Path, tokenizer: Any) -> UpdateSource:
    """The source of U for ``ckpt_path`` (reads the step or rollout file)."""
    step = checkpoint_step(ckpt_path)
    nxt = next_checkpoint(ckpt_path, step)
    src = cfg.update_batch.source
    u_step = None if step is None else step + 1
    if src == "sample":
        return UpdateSource("sampled", None, u_step, None, "update_batch.source is sample", nxt)
    if src == "file":
        from deltaH.io.rollouts import load_rollouts

        path = str(cfg.update_batch.path)
        rec = load_rollouts(
            path,
            tokenizer=tokenizer,
            options=options_from_config(cfg),
            micro_batches=cfg.loss.grad_accum_steps,
        )
        return UpdateSource("file", [rec], u_step, path, f"rollouts from {path}", nxt)
    sdir = steps_dir_for(cfg, ckpt_path)
    if u_step is not None and has_record(sdir, u_step):
        from deltaH.io.steps import read_step

        recs = read_step(sdir, u_step)
        return UpdateSource("recorded", recs, u_step, str(sdir), f"the trainer recorded step {u_step}", nxt)
    check_source(cfg, ckpt_path)  # recorded: the error naming the folder
    why = (
        f"no record of step {u_step} in {sdir}"
        if u_step is not None
        else f"{ckpt_path} does not say which step it was saved after"
    )
    return UpdateSource("sampled", None, u_step, None, f"{why}: U was sampled from q", nxt)


def options_from_config(cfg: Config) -> TrainerOptions:
    """The trainer options a rollout file is replayed with (the config's loss and clipping keys)."""
    return TrainerOptions(
        trainer="GRPOTrainer",
        loss_type=cfg.loss.type,
        scale_rewards=cfg.update_batch.scale_rewards,
        max_completion_length=cfg.loss.max_completion_length or cfg.policy.max_new_tokens,
        gradient_accumulation_steps=cfg.loss.grad_accum_steps,
        temperature=cfg.policy.temperature,
        top_p=cfg.policy.top_p,
        max_grad_norm=cfg.checkpoint.max_grad_norm,
    )


def _strip(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return [int(t) for t, m in zip(ids.tolist(), mask.tolist(), strict=True) if m]


def recorded_update_batch(
    recorded: Sequence[RecordedStep], tokenizer: Any, policy: SamplingPolicy, kind: str
) -> UpdateBatch:
    """U of a recorded step (or rollouts) as an :class:`UpdateBatch`, rows in replay order.

    Rows are every rank's ``RecordedStep.sequence_batch()`` rows (sequences with loss tokens),
    ranks in order. Rewards are not part of a trainer's batch: NaN unless the record carries them
    (``meta["rewards"]``). Groups are the distinct prompts (same prompt ids = same group).
    """
    from deltaH.batch import SequenceBatch

    ids_l: list[torch.Tensor] = []
    am_l: list[torch.Tensor] = []
    rm_l: list[torch.Tensor] = []
    adv_l: list[torch.Tensor] = []
    prov: list[tuple[int, int, int]] = []
    prompt_keys: list[tuple[int, ...]] = []
    prompts: list[str] = []
    responses: list[str] = []
    rewards: list[float] = []
    for rec in recorded:
        sb = rec.sequence_batch()
        if sb is None:
            continue
        batch, adv = sb
        ids_l.append(batch.input_ids)
        am_l.append(batch.attention_mask)
        rm_l.append(batch.response_mask)
        adv_l.append(adv.double())
        rec_rewards = rec.meta.get("rewards")
        for k, mb in enumerate(rec.micro_batches):
            cm = mb["completion_mask"].bool()
            if mb.get("tool_mask") is not None:
                cm = cm & mb["tool_mask"].bool()
            for r in range(int(mb["prompt_ids"].shape[0])):
                if not bool(cm[r].any()):
                    continue
                p_ids = _strip(mb["prompt_ids"][r], mb["prompt_mask"][r])
                c_ids = _strip(mb["completion_ids"][r], mb["completion_mask"][r])
                prov.append((rec.rank, k, r))
                prompt_keys.append(tuple(p_ids))
                prompts.append(tokenizer.decode(p_ids, skip_special_tokens=True) if tokenizer else "")
                responses.append(tokenizer.decode(c_ids, skip_special_tokens=True) if tokenizer else "")
                rewards.append(float("nan"))
        if isinstance(rec_rewards, list) and len(rec_rewards) == len(prov):
            rewards = [float(x) for x in rec_rewards]
    if not ids_l:
        raise NotFoundError("the recorded step has no sequence with loss tokens: nothing to replay")
    t = max(int(x.shape[1]) for x in ids_l)

    def pad(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    batch = SequenceBatch(
        torch.cat([pad(x) for x in ids_l]),
        torch.cat([pad(x) for x in am_l]),
        torch.cat([pad(x) for x in rm_l]),
    )
    keys: dict[tuple[int, ...], int] = {}
    group = torch.tensor([keys.setdefault(p, len(keys)) for p in prompt_keys], dtype=torch.long)
    sizes = torch.bincount(group)
    opts = recorded[0].options
    return UpdateBatch(
        batch=batch,
        prompt_index=torch.full((len(batch),), -1, dtype=torch.long),
        group=group,
        record_ids=[f"rank{a}-mb{b}-row{c}" for a, b, c in prov],
        prompts=prompts,
        responses=responses,
        group_size=int(sizes.max()),
        seed=-1,
        policy=policy,
        max_new_tokens=int(opts.max_completion_length or batch.n_tokens.max()),
        rewards=torch.tensor(rewards, dtype=torch.float32),
        advantages=torch.cat(adv_l).float(),
        resampled=torch.zeros(len(keys), dtype=torch.long),
        scale_rewards=opts.scale_rewards,
        source=kind,
    )
