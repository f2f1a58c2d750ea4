"""Replay the optimizer step a training run took: ``dh.replay_step("runs/x/checkpoint-41")``.

A run trained with :class:`~deltaH.integrations.trl.DeltaHGRPOTrainer` (or any trainer that
recorded its steps in the step-file format, :mod:`deltaH.io.steps`) has, beside its
``checkpoint-N/`` folders, ``deltah-steps/step-N.safetensors``: the micro-batches step ``N``
trained on and the trainer options its loss read. From checkpoint ``N−1`` (weights, adapter,
AdamW state, the lr of the next step) and that record, :func:`replay_step` rebuilds step ``N``
exactly — the gradient of the trainer's own objective (ratios against the recorded old log-probs,
clipping, KL, IS corrections, the loss normalisers; :mod:`deltaH.updates.trl_objective`) and the
AdamW update — as the directions :func:`~deltaH.updates.directions.update_directions` returns.

When checkpoint ``N`` exists too, ``step_error`` compares the replay with what really happened:
``‖lr·full − (θ_N − θ_{N−1})‖ / ‖θ_N − θ_{N−1}‖`` over every trainable tensor. It is the run's own
proof that the replay is exact (float32 training: ~1e-6; see docs/math.md#replaying-a-recorded-step).
This module reads files; the computation is the pure :func:`deltaH.updates.replay.replay_directions`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deltaH.batch import SequenceBatch
from deltaH.errors import CheckpointError, NotFoundError
from deltaH.updates.directions import UpdateDirections
from deltaH.updates.recorded import RecordedStep, TrainerOptions

__all__ = ["ReplayedStep", "realised_step", "replay_step", "step_error"]

log = logging.getLogger(__name__)
_CKPT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True, eq=False)
class ReplayedStep:
    """Step ``step`` of a run, replayed from checkpoint ``step − 1`` and its recorded batch.

    ``directions``: the step's :class:`UpdateDirections` per unit lr, keyed by the model's in-memory
    parameter names (``full``, ``baseline``, ``grad``, per-sequence ``components [M, ...]``);
    ``lr``: the step's learning rate (``η = lr`` along ``full`` is the step); ``batch``/``advantages``:
    U (``M`` sequences that had loss tokens) and ``rows [M, 3]`` its provenance (rank, micro-batch,
    row); ``grad_pg``/``grad_kl``: the gradient part split into the policy-gradient and β·KL terms
    (``grad_kl`` None without a KL term); ``clip``: the ratio-clipping statistics of the step;
    ``realised``: ``θ_N − θ_{N−1}`` when checkpoint ``N`` exists (else None) and ``step_error`` the
    replay's relative error against it; ``checkpoint``: the loaded checkpoint ``N − 1``.
    """

    step: int
    lr: float
    directions: UpdateDirections
    batch: SequenceBatch
    advantages: Tensor
    rows: Tensor
    token_weights: Tensor
    grad_pg: dict[str, Tensor]
    grad_kl: dict[str, Tensor] | None
    clip: dict[str, float]
    options: TrainerOptions
    recorded: list[RecordedStep]
    checkpoint: Any
    checkpoint_path: Path
    next_checkpoint_path: Path | None
    realised: dict[str, Tensor] | None
    step_error: float | None


def _global_step(folder: Path) -> int:
    from deltaH.io.checkpoint import _trainer_state

    step = _trainer_state(folder)[0]
    if step is None:
        m = _CKPT.match(folder.name)
        if m is None:
            raise CheckpointError(
                f"{folder} has no trainer_state.json and its name is not checkpoint-N: the step it was "
                "saved after is unknown; replay needs a Trainer checkpoint folder"
            )
        step = int(m.group(1))
    return step


def next_checkpoint(folder: Path, step: int) -> Path | None:
    """The sibling ``checkpoint-<step+1>`` folder, if it exists."""
    cand = folder.parent / f"checkpoint-{step + 1}"
    return cand if cand.is_dir() else None


def trainable_weights(path: Path, *, base_model: str | None, dtype: Any, device: str) -> dict[str, Tensor]:
    """The trainable parameters of a checkpoint folder, keyed by in-memory name (loads the model)."""
    from deltaH.io.checkpoint import load_checkpoint

    ck = load_checkpoint(path, base_model=base_model, dtype=dtype, device=device, optimizer=False)
    return {n: p.detach().clone() for n, p in ck.model.named_parameters() if p.requires_grad}


def realised_step(before: dict[str, Tensor], after: dict[str, Tensor]) -> dict[str, Tensor]:
    """``θ_N − θ_{N−1}`` per name (in the promoted dtype); the names must agree."""
    if set(before) != set(after):
        extra = sorted(set(before) ^ set(after))[:3]
        raise CheckpointError(f"the two checkpoints have different trainable parameters (e.g. {extra})")
    return {n: after[n] - before[n].to(after[n].dtype) for n in before}


def step_error(full: dict[str, Tensor], lr: float, realised: dict[str, Tensor]) -> float:
    """``‖lr·full − realised‖₂ / ‖realised‖₂`` over every tensor (float64 sums)."""
    num = sum(float(((lr * full[n].double()) - realised[n].double()).pow(2).sum()) for n in realised)
    den = sum(float(realised[n].double().pow(2).sum()) for n in realised)
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


def replay_step(
    checkpoint_dir: str | os.PathLike[str],
    *,
    steps_dir: str | os.PathLike[str] | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    seq_chunk: int = 8,
    compare_next: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> ReplayedStep:
    """Replay step ``N`` from checkpoint ``N − 1`` (``checkpoint_dir``) and step ``N``'s record.

    ``steps_dir``: where the step files are (default: ``deltah-steps`` beside the checkpoint
    folders); ``compare_next``: load checkpoint ``N`` when present and compute ``step_error``.
    ``dtype=None`` keeps the saved dtype (replay in the training dtype to compare with the next
    checkpoint). Raises ``NotFoundError`` when the step was not recorded and
    ``UnsupportedOptionError`` for a trainer option deltaH does not reproduce.
    """
    from deltaH.functional import FunctionalLM
    from deltaH.io.checkpoint import load_checkpoint
    from deltaH.io.steps import find_steps_dir, read_step
    from deltaH.updates.replay import replay_directions
    from deltaH.updates.trl_objective import check_supported

    folder = Path(checkpoint_dir).expanduser()
    if not folder.is_dir():
        raise NotFoundError(f"checkpoint folder {folder} does not exist (argument checkpoint_dir)")
    n = _global_step(folder) + 1
    sdir = Path(steps_dir).expanduser() if steps_dir is not None else find_steps_dir(folder)
    if sdir is None or not sdir.is_dir():
        where = sdir if sdir is not None else folder.parent / "deltah-steps"
        raise NotFoundError(
            f"no recorded steps for {folder}: looked in {where}. Train with DeltaHGRPOTrainer (it records "
            "every step), or pass steps_dir= the folder that holds step-<N>.safetensors"
        )
    recorded = read_step(sdir, n)
    options = recorded[0].options
    check_supported(options, recorded)  # before any model loads
    ckpt = load_checkpoint(folder, base_model=base_model, dtype=dtype, device=device,
                           max_grad_norm=options.max_grad_norm)
    if ckpt.optimizer_state is None:
        raise CheckpointError(
            f"{folder} has no optimizer.pt: the step cannot be rebuilt without the AdamW state (train "
            "with save_only_model=False)"
        )
    lm = FunctionalLM.from_model(ckpt.model)
    rep = replay_directions(lm, lm.params, recorded, ckpt.optimizer_state, seq_chunk=seq_chunk,
                            on_progress=on_progress)
    ud = rep.update
    lr = float(ud.lr_ref)
    rec_lr = recorded[0].meta.get("learning_rate")
    if rec_lr is not None and lr > 0 and not math.isclose(float(rec_lr), lr, rel_tol=1e-6):
        raise CheckpointError(
            f"{folder}'s optimizer says the next step's lr is {lr:g} but step {n} was recorded with lr "
            f"{float(rec_lr):g}: the record and the checkpoint are not from the same run"
        )
    nxt = next_checkpoint(folder, n - 1) if compare_next else None
    realised = err = None
    if nxt is not None:
        after = trainable_weights(nxt, base_model=base_model, dtype=dtype, device=device)
        realised = realised_step({k: v.detach() for k, v in lm.params.items()}, after)
        err = step_error(ud.full, lr, realised)
    return ReplayedStep(
        step=n, lr=lr, directions=ud, batch=rep.batch, advantages=rep.advantages, rows=rep.rows,
        token_weights=rep.token_weights, grad_pg=rep.grad_pg, grad_kl=rep.grad_kl, clip=dict(rep.clip),
        options=options, recorded=recorded, checkpoint=ckpt, checkpoint_path=folder,
        next_checkpoint_path=nxt, realised=realised, step_error=err,
    )

