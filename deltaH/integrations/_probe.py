"""Helpers of the training-time probe: the exact AdamW step at the hook, and a model view for torch.func.

Everything here leaves the trainer's model, optimizer and RNG streams as it found them:

* :func:`eval_mode` switches every module to ``eval()`` (dropout off; HF only checkpoints
  activations in training mode) and restores each module's own ``training`` flag afterwards;
* :func:`plain_forward` temporarily removes accelerate's mixed-precision wrapper from
  ``model.forward`` (``accelerator.prepare`` replaces it with an autocast version and keeps the
  original as ``model._original_forward``), so the sampler draws from the float32 policy that
  the estimators score, not from a bf16-autocast one;
* :func:`no_input_grad_hooks` lifts the embedding hooks that gradient checkpointing adds
  (``output.requires_grad_(True)``, which torch.func transforms refuse);
* :func:`rank_local` keeps deltaH's distributed reductions local while only the main process probes;
* :func:`reconstruct_step` reads the clipped gradients and the live AdamW state without copying
  them and returns the step ``Δθ`` that ``optimizer.step()`` is about to take
  (:func:`deltaH.adamw_step`, no further clipping: the Trainer already clipped).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from deltaH import _dist
from deltaH.updates.adamw import AdamWState, adamw_step

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class ProbeRecord:
    """One probed optimizer step (``step`` is the ``global_step`` after it, as in the Trainer's logs).

    ``delta_h1``: first-order prediction δH₁ of the step's entropy change on the evaluation batch;
    ``h``: mean sequence entropy there before the step; ``true_delta_h`` / ``ess`` / ``khat``: the
    SNIS ΔH of the step and its diagnostics (steps that ``true_every`` selects, else None);
    ``proxy``: Cui et al.'s ``−lr·Cov(log π, A)·mean length`` on the step's GRPO batch (None
    without one); ``reconstruction_error``: ``max|θ_after − θ_before − Δθ| / max|Δθ|`` measured
    after ``optimizer.step()`` (None when not checked); ``time_s``: the probe's wall time.
    """

    step: int
    lr: float
    delta_h1: float
    h: float
    true_delta_h: float | None = None
    ess: float | None = None
    khat: float | None = None
    proxy: float | None = None
    reconstruction_error: float | None = None
    time_s: float = 0.0


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside, every module's ``training`` flag restored exactly on exit."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def plain_forward(model: nn.Module) -> Iterator[None]:
    """Run with ``model.forward`` as it was before accelerate wrapped it in autocast (if it did)."""
    patched = model.__dict__.get("forward")
    original = model.__dict__.get("_original_forward")
    if patched is None or original is None:
        yield
        return
    model.__dict__["forward"] = original
    try:
        yield
    finally:
        model.__dict__["forward"] = patched


# transformers' ``enable_input_require_grads`` and peft's kbit preparation register these forward hooks
# on the input embeddings (for gradient checkpointing); ``requires_grad_`` fails under torch.func.
_INPUT_GRAD_HOOKS = frozenset({"make_inputs_require_grads", "make_inputs_require_grad"})


def _drop_input_grad_hooks(model: nn.Module) -> list[tuple[nn.Module, dict[int, Any]]]:
    """Remove those hooks; return each module touched with its forward-hook dict as it was (ordered)."""
    saved: list[tuple[nn.Module, dict[int, Any]]] = []
    for m in model.modules():
        ids = [h for h, fn in m._forward_hooks.items() if getattr(fn, "__name__", "") in _INPUT_GRAD_HOOKS]
        if ids:
            saved.append((m, m._forward_hooks.copy()))
            for h in ids:
                del m._forward_hooks[h]
    return saved


@contextlib.contextmanager
def no_input_grad_hooks(model: nn.Module) -> Iterator[None]:
    """Without the input-embedding ``requires_grad_`` hooks inside; every hook dict restored in order."""
    saved = _drop_input_grad_hooks(model)
    try:
        yield
    finally:
        for m, hooks in saved:
            m._forward_hooks.clear()
            m._forward_hooks.update(hooks)


@contextlib.contextmanager
def probing(model: nn.Module, probe_model: nn.Module) -> Iterator[None]:
    """Everything the probe's computations need, undone on exit: eval mode (both models), autocast off,
    accelerate's forward wrapper and the input-grad hooks out of the way, reductions rank-local."""
    p = next(probe_model.parameters(), None)
    device_type = p.device.type if p is not None else "cpu"
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        if probe_model is not model:
            stack.enter_context(eval_mode(probe_model))
        stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        stack.enter_context(plain_forward(probe_model))
        stack.enter_context(no_input_grad_hooks(probe_model))
        stack.enter_context(rank_local())
        yield


@contextlib.contextmanager
def rank_local() -> Iterator[None]:
    """deltaH's reductions stay on this rank inside: only the main process probes, so under
    ``torch.distributed`` the other ranks would never join an all-reduce (a hang)."""
    saved = _dist.active
    _dist.active = lambda: False
    try:
        yield
    finally:
        _dist.active = saved


def needs_float32_copy(model: nn.Module, dtype: torch.dtype | None) -> bool:
    """Whether a float32 probe must run on a copy: some parameter is bf16/fp16 (``dtype=None``: never)."""
    return dtype is not None and any(p.dtype in LOW_PRECISION for p in model.parameters())


def float32_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A ``dtype`` (float32) deep copy of ``model`` for the probe (eval mode, no gradients, plain forward).

    Its frozen weights equal the live ones forever (they never change); its trainable weights are
    never read: every probe call passes the live trainable parameters, cast to ``dtype``.
    """
    with plain_forward(model):
        clone = copy.deepcopy(model)
    clone.__dict__.pop("forward", None)  # accelerate's autocast wrapper, bound to the copy
    clone.__dict__.pop("_original_forward", None)
    for p in clone.parameters():
        p.grad = None
    _drop_input_grad_hooks(clone)  # the copy is never trained: drop them for good
    return clone.to(dtype).eval()


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The ``requires_grad`` parameters by de-duplicated name (the names FunctionalLM uses)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class Step:
    """The step ``optimizer.step()`` is about to take: ``θ`` and ``Δθ`` of the parameters with
    gradients (optimizer dtype), and the step's learning rate (param group 0's)."""

    theta: dict[str, Tensor]
    delta: dict[str, Tensor]
    lr: float


def reconstruct_step(model: nn.Module, optimizer: object) -> Step | None:
    """``Δθ`` of the coming ``optimizer.step()`` from the (already clipped) gradients; None if none."""
    params = trainable(model)
    grads = {n: p.grad.detach() for n, p in params.items() if p.grad is not None}
    if not grads:
        return None
    state = AdamWState.from_optimizer(optimizer, model, copy=False)  # adamw_step never writes to it
    theta = {n: params[n].detach() for n in grads}
    with torch.no_grad():
        delta, _ = adamw_step(theta, grads, state, max_grad_norm=None)
    lr = state.hyper[next(iter(grads))].lr
    return Step(theta=theta, delta=delta, lr=lr)


@dataclass(frozen=True)
class PendingCheck:
    """What :func:`reconstruction_error` needs after ``optimizer.step()``: θ before it (a copy) and
    the rebuilt ``Δθ``, both in the optimizer's dtype."""

    theta_before: dict[str, Tensor]
    delta: dict[str, Tensor]


def pending_check(step: Step) -> PendingCheck:
    return PendingCheck({n: t.clone() for n, t in step.theta.items()}, step.delta)


def reconstruction_error(model: nn.Module, check: PendingCheck) -> float:
    """``max|(θ_after − θ_before) − Δθ| / max|Δθ|``: 0 when ``optimizer.step()`` did exactly ``Δθ``.

    The real change is formed as ``adamw_step`` forms ``Δθ`` (``θ' − θ`` in the same dtype), so
    an exact reconstruction gives exactly 0, not the rounding of ``θ + Δθ``.
    """
    params = trainable(model)
    err, scale = 0.0, 0.0
    with torch.no_grad():
        for n, d in check.delta.items():
            real = params[n].detach().to(d.dtype) - check.theta_before[n].to(d.dtype)
            err = max(err, float((real - d).abs().max()))
            scale = max(scale, float(d.abs().max()))
    if scale == 0.0:
        return 0.0 if err == 0.0 else float("inf")
    return err / scale
