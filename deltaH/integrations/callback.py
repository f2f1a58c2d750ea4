"""``DeltaHCallback``: δH₁ of every optimizer step, logged with the trainer's metrics.

At ``on_pre_optimizer_step`` (after gradient clipping, before ``optimizer.step()``; gradients are
summed over the micro-batches of the step) the callback rebuilds the AdamW step exactly
(:func:`deltaH.adamw_step` on the clipped gradients and the live optimizer state) and measures,
on a fixed evaluation batch ``E`` (sampled once from the policy at ``on_train_begin``, or given)::

    deltah/delta_h1              δH₁ = d/dη ΔH(θ + η·Δθ)|₀ at η = 1: the predicted entropy change
    deltah/h                     H(θ) = mean_n entropy_n on E (RB, nats per sequence) before the step
    deltah/true_delta_h          SNIS ΔH of θ → θ + Δθ on E (every ``true_every`` steps), with
    deltah/ess, deltah/khat      its effective sample size and PSIS k̂
    deltah/proxy                 −lr·Cov(log π, A)·mean length on the step's GRPO batch (needs the
                                 :class:`~deltaH.integrations.trl.DeltaHGRPOMixin`)
    deltah/reconstruction_error  max|(θ_after − θ_before) − Δθ| / max|Δθ|, checked at ``on_step_end``:
                                 exactly 0 for plain/foreach AdamW; ~1e-6–1e-5 for fused AdamW
                                 (``adamw_torch_fused``, the default), which rounds θ' within 1 ulp
    deltah/time_s                wall time of the probe

Metrics reach ``trainer.state.log_history``: the Trainer appends a *copy* of the logs dict to
``log_history`` before calling ``on_log`` (transformers ``Trainer.log``), so ``on_log`` adds the
values both to the ``logs`` dict it receives (seen by every callback after this one, e.g. the
console printer) and to that ``log_history`` entry. Reporting integrations (``report_to``) run
*before* user callbacks; to have them see ``deltah/*`` too, put the callback first
(``trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(DeltaHCallback))``) or use
the GRPO mixin, whose ``log`` adds the values before any callback runs.

No effect on training: the probe runs on the main process only, on detached views of θ and
the gradients, with an explicit ``torch.Generator`` (no global RNG draw), every module's
``training`` flag restored; the trained parameters, optimizer state and RNG streams are bitwise
those of a run without it. Costs: one sampling pass at train begin, then per probed step one
teacher-forced forwards and one backward on E (``mode="reverse"``; the first forward gives H(θ)
and the SNIS weights' centring), one more forward on the steps ``true_every`` selects, one
forward on the GRPO batch for the proxy (with the mixin), and — with ``check_reconstruction`` —
θ before the step and Δθ (two copies of the trainable parameters) held from the hook to
``on_step_end``: small for LoRA, twice the trainable weights for full fine-tuning
(``check_reconstruction=False`` avoids it). A log at a logging step carries the latest probe's
values (with ``logging_steps > every`` the ones in between are in ``history`` only).

Failures: set-up problems raise at ``on_train_begin``, before the first step (an optimizer that is
not torch AdamW, fp16, DeepSpeed/FSDP, a model torch.func cannot run, an evaluation batch with
tokens outside the policy's nucleus). A probe that fails later (e.g. with top-p < 1, training
moved a nucleus so that E holds a token the policy no longer samples) skips that step with a
``RuntimeWarning``; training goes on untouched.

Precision: the probe runs in ``probe_dtype`` (float32). With ``bf16=True`` the Trainer keeps
float32 weights and autocasts the forward; the probe runs outside autocast on those weights. A
model whose weights are themselves bf16/fp16 is probed on a float32 copy made once at train
begin (frozen weights never change; trainable ones are passed live, cast): memory for one float32
copy of the model. ``probe_dtype=None`` probes in the model's own dtype without a copy.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from deltaH._choices import ENTROPY_MODES, FIRST_ORDER_MODES, check_choice
from deltaH._warn import warn
from deltaH.batch import SequenceBatch
from deltaH.errors import ArgumentError, BatchError
from deltaH.estimators._common import base_stats
from deltaH.estimators.first_order import delta_h_first_order
from deltaH.estimators.influence import covariance_proxy
from deltaH.estimators.true import delta_h_true
from deltaH.functional import FunctionalLM
from deltaH.integrations._probe import (
    PendingCheck,
    ProbeRecord,
    float32_copy,
    needs_float32_copy,
    pending_check,
    probing,
    reconstruct_step,
    reconstruction_error,
)
from deltaH.policy import SamplingPolicy
from deltaH.sampling.sampler import sample
from deltaH.updates.adamw import AdamWState

__all__ = ["DeltaHCallback", "ProbeRecord"]

logger = logging.getLogger(__name__)

PREFIX = "deltah/"


class DeltaHCallback(TrainerCallback):
    """Log δH₁ of each optimizer step on a fixed evaluation batch (see the module docstring).

    Args:
        eval_batch: the evaluation batch ``E``; or give ``prompts`` and it is sampled at train begin.
        prompts: prompts to sample ``E`` from at train begin: token-id lists, or strings tokenized
            by the trainer's ``processing_class`` as TRL tokenizes plain-text prompts.
        policy: the sampling policy ``q`` (temperature, top-p). Default: the trainer's
            ``temperature``/``top_p`` when its args have them (TRL's GRPOConfig), else (1.0, 1.0).
        every: probe the steps whose ``global_step`` (after the step) is a multiple of ``every``.
        true_every: also compute the true (SNIS) ΔH of the step on those multiples; None: never.
        n_per_prompt, max_new_tokens, seed: sampling of ``E`` (``max_new_tokens=None``: the
            trainer's ``max_completion_length`` if it has one, else 32); ``seed`` seeds a private
            ``torch.Generator``.
        mode: ``"reverse"`` (one backward on E, default) or ``"forward"`` (jvp) for δH₁.
        eos_token_id, pad_token_id: default from the tokenizer, then the model's generation config.
        check_reconstruction: compare the real parameter change with the rebuilt Δθ after the step.
        probe_dtype: dtype of the probe's forward passes (float32; None: the model's own).
        tf_batch_size, entropy_mode: passed to the estimators.

    Raises at ``on_train_begin`` (before any step) if the optimizer is not a torch AdamW
    (``TypeError``), for fp16 with a gradient scaler, DeepSpeed or FSDP (``ValueError``).

    >>> trainer = Trainer(model, args, train_dataset=ds,
    ...                   callbacks=[DeltaHCallback(prompts=["12+7=", "3-1="])])  # doctest: +SKIP
    """

    def __init__(
        self,
        eval_batch: SequenceBatch | None = None,
        *,
        prompts: Sequence[str | Sequence[int]] | None = None,
        policy: SamplingPolicy | None = None,
        every: int = 1,
        true_every: int | None = None,
        n_per_prompt: int = 4,
        max_new_tokens: int | None = None,
        seed: int = 0,
        mode: str = "reverse",
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        check_reconstruction: bool = True,
        probe_dtype: torch.dtype | None = torch.float32,
        tf_batch_size: int = 16,
        entropy_mode: str = "rb",
    ) -> None:
        if (eval_batch is None) == (prompts is None):
            raise ArgumentError(
                "DeltaHCallback needs exactly one of eval_batch= (a SequenceBatch) or prompts= "
                "(token-id lists or strings to sample the evaluation batch from)"
            )
        if eval_batch is not None and not isinstance(eval_batch, SequenceBatch):
            raise TypeError(f"eval_batch must be a deltaH.SequenceBatch, got {type(eval_batch).__name__}")
        if prompts is not None and (isinstance(prompts, str) or len(prompts) == 0):
            raise ArgumentError("prompts must be a non-empty list of prompts (strings or token-id lists)")
        for name, val in (("every", every), ("n_per_prompt", n_per_prompt), ("tf_batch_size", tf_batch_size),
                          ("true_every", true_every), ("max_new_tokens", max_new_tokens)):
            if val is None and name in ("true_every", "max_new_tokens"):
                continue
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ArgumentError(f"DeltaHCallback: {name} must be an int >= 1, got {val!r}")
        check_choice("DeltaHCallback: mode", mode, FIRST_ORDER_MODES)
        check_choice("DeltaHCallback: entropy_mode", entropy_mode, ENTROPY_MODES)
        if policy is not None and not isinstance(policy, SamplingPolicy):
            raise TypeError(f"policy must be a deltaH.SamplingPolicy, got {type(policy).__name__}")
        if probe_dtype not in (None, torch.float32):
            raise ArgumentError(f"probe_dtype must be torch.float32 or None, got {probe_dtype!r}")
        self.eval_batch = eval_batch
        self.prompts = None if prompts is None else list(prompts)
        self.policy = policy
        self.every, self.true_every = every, true_every
        self.n_per_prompt, self.max_new_tokens, self.seed = n_per_prompt, max_new_tokens, seed
        self.mode, self.entropy_mode, self.tf_batch_size = mode, entropy_mode, tf_batch_size
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.check_reconstruction, self.probe_dtype = check_reconstruction, probe_dtype
        self.history: list[ProbeRecord] = []
        self.last_update_batch: Any = None  # the GRPO step's recorded batch (set with the mixin)
        self._pending: dict[str, float] = {}
        self._lm: FunctionalLM | None = None
        self._copy: nn.Module | None = None
        self._expected: tuple[ProbeRecord, PendingCheck] | None = None
        self._recorder: Any = None

    # -- wiring ----------------------------------------------------------------------------------
    def attach_recorder(self, recorder: Any) -> None:
        """Called by the GRPO mixin: ``recorder.take(step)`` returns the step's recorded GRPO batch."""
        self._recorder = recorder

    def pop_pending(self) -> dict[str, float]:
        """The metrics not yet logged (and forget them): the GRPO mixin's ``log`` calls this."""
        out, self._pending = self._pending, {}
        return out

    @staticmethod
    def _main(state: Any) -> bool:
        return bool(getattr(state, "is_world_process_zero", True))

    def _wanted(self, step: int) -> tuple[bool, bool]:
        true = self.true_every is not None and step % self.true_every == 0
        return step % self.every == 0 or true, true

    # -- events ----------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, processing_class: Any = None, **kwargs: Any) -> None:
        if not self._main(state):
            return
        if model is None or optimizer is None:
            raise ArgumentError("DeltaHCallback needs the trainer's model and optimizer at on_train_begin")
        _check_args(args)
        try:
            AdamWState.from_optimizer(optimizer, model, copy=False)
        except (TypeError, ValueError) as e:
            raise type(e)(f"DeltaHCallback cannot reconstruct this optimizer's step: {e}") from e
        if self.policy is None:
            self.policy = SamplingPolicy(temperature=float(getattr(args, "temperature", 1.0) or 1.0),
                                         top_p=float(getattr(args, "top_p", 1.0) or 1.0))
            _warn_unmodelled_sampling(args)
        self._copy = None
        if needs_float32_copy(model, self.probe_dtype):
            self._copy = float32_copy(model, torch.float32)
        probe_model = self._copy if self._copy is not None else model
        with probing(model, probe_model):
            try:
                self._lm = FunctionalLM.from_model(probe_model)
            except (TypeError, ValueError, NotImplementedError) as e:
                raise type(e)(f"DeltaHCallback cannot probe this model: {e}") from e
            params = self._params(model)
            if self.eval_batch is None:
                self.eval_batch = self._sample(args, model, processing_class, params)
            self.eval_batch = self.eval_batch.to(self._lm.device)
            try:  # a given batch must be a sample of this policy: log q finite at θ
                with torch.no_grad():
                    base_stats(self._lm, params, self.eval_batch, self.policy, self.tf_batch_size)
            except ValueError as e:
                raise BatchError(f"DeltaHCallback: eval_batch does not fit the policy: {e}") from e
        logger.info("deltaH probe: evaluation batch of %d sequences (%d response tokens), policy %s",
                    len(self.eval_batch), int(self.eval_batch.n_tokens.sum()), self.policy)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                              optimizer: Any = None, **kwargs: Any) -> None:
        if not self._main(state) or self._lm is None or model is None:
            return
        step = state.global_step + 1
        wanted, want_true = self._wanted(step)
        if not wanted:
            return
        try:
            self._probe(args, step, want_true, model, optimizer)
        except Exception as e:  # a probe failure must not end the training run
            self._expected = None
            warn(f"deltaH probe skipped step {step}: {type(e).__name__}: {e}")

    def _probe(self, args: Any, step: int, want_true: bool, model: nn.Module, optimizer: Any) -> None:
        t0 = time.perf_counter()
        rebuilt = reconstruct_step(model, optimizer)
        if rebuilt is None:
            return
        assert self._lm is not None and self.eval_batch is not None and self.policy is not None
        lm, pol, dt = self._lm, self.policy, self._dtype()
        with probing(model, lm.model):
            params = self._params(model)
            delta = {n: d.to(dt) for n, d in rebuilt.delta.items()}
            kw: dict[str, Any] = {"tf_batch_size": self.tf_batch_size, "entropy_mode": self.entropy_mode}
            with torch.no_grad():
                base = base_stats(lm, params, self.eval_batch, pol, self.tf_batch_size)
            fo = delta_h_first_order(params, {n: d.unsqueeze(0) for n, d in delta.items()}, self.eval_batch,
                                     lm=lm, policy=pol, eta=1.0, mode=self.mode, base=base, **kw)
            rec = ProbeRecord(step=step, lr=rebuilt.lr, delta_h1=float(fo.delta_h[0]), h=float(fo.h_orig))
            if want_true:
                tr = delta_h_true(params, delta, self.eval_batch, lm=lm, policy=pol, eta=1.0, base=base, **kw)
                rec.true_delta_h, rec.ess, rec.khat = float(tr.delta_h), float(tr.ess), float(tr.khat)
            rec.proxy = self._proxy(args, step, params, rebuilt.lr)
        if self.check_reconstruction:
            self._expected = (rec, pending_check(rebuilt))
        rec.time_s = time.perf_counter() - t0
        self.history.append(rec)
        self._pending.update(_metrics(rec))

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    **kwargs: Any) -> None:
        if self._expected is None or model is None:
            return
        rec, check = self._expected
        self._expected = None
        rec.reconstruction_error = reconstruction_error(model, check)
        self._pending[PREFIX + "reconstruction_error"] = rec.reconstruction_error

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not self._pending or logs is None or any(str(k).startswith("eval_") for k in logs):
            return
        # The Trainer appended a copy of ``logs`` (plus "step") to log_history before calling on_log.
        last = state.log_history[-1] if state.log_history else None
        entry: dict[str, Any] | None = last if isinstance(last, dict) else None
        if entry is not None and not (entry.get("step") == state.global_step and logs.keys() <= entry.keys()):
            entry = None
        pending = self.pop_pending()
        logs.update(pending)
        if entry is not None:
            entry.update(pending)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._copy = None  # free the float32 copy; the evaluation batch and history stay
        self._lm = None
        self._expected = None

    # -- pieces ----------------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        assert self._lm is not None
        return torch.float32 if self._copy is not None else self._lm.dtype

    def _params(self, model: nn.Module) -> dict[str, Tensor]:
        """θ for the probe: the live trainable parameters (detached; cast when probing a copy)."""
        dt = self._dtype()
        return {n: p.detach().to(dt) for n, p in model.named_parameters() if p.requires_grad}

    def _sample(self, args: Any, model: nn.Module, processing_class: Any,
                params: dict[str, Tensor]) -> SequenceBatch:
        assert self._lm is not None and self.policy is not None and self.prompts is not None
        tok = getattr(processing_class, "tokenizer", processing_class)
        prompt_ids = _prompt_ids(self.prompts, processing_class)
        eos, pad = _special_ids(self.eos_token_id, self.pad_token_id, tok, model)
        max_new = self.max_new_tokens or int(getattr(args, "max_completion_length", None) or 32)
        gen = torch.Generator().manual_seed(int(self.seed))
        return sample(self._lm, params, prompt_ids, policy=self.policy, max_new_tokens=max_new,
                      n_per_prompt=self.n_per_prompt, eos_token_id=eos, pad_token_id=pad, generator=gen)

    def _proxy(self, args: Any, step: int, params: dict[str, Tensor], lr: float) -> float | None:
        if self._recorder is None:
            return None
        recorded = self._recorder.take(step)
        self.last_update_batch = recorded
        if recorded is None:
            return None
        u = recorded.sequence_batch()
        if u is None:
            return None
        batch, adv = u
        assert self._lm is not None
        temp = float(getattr(args, "temperature", None) or (self.policy.temperature if self.policy else 1.0))
        res = covariance_proxy(self._lm, params, batch.to(self._lm.device), adv, temperature=temp, eta=lr)
        return res.delta_h_per_sequence


def _metrics(rec: ProbeRecord) -> dict[str, float]:
    out = {"delta_h1": rec.delta_h1, "h": rec.h, "true_delta_h": rec.true_delta_h, "ess": rec.ess,
           "khat": rec.khat, "proxy": rec.proxy, "time_s": rec.time_s}
    # k̂ is NaN when the batch is too small to fit a tail; JSON loggers choke on NaN, so leave it out.
    return {PREFIX + k: float(v) for k, v in out.items()
            if v is not None and not (k == "khat" and math.isnan(v))}


def _check_args(args: Any) -> None:
    """Refuse set-ups whose pre-optimizer gradients or optimizer state the probe cannot read whole."""
    if getattr(args, "fp16", False):
        raise ArgumentError(
            "DeltaHCallback does not support fp16=True: with a gradient scaler the gradients at the "
            "pre-optimizer hook may still be scaled and the step may be skipped. Train with bf16=True or in "
            "float32."
        )
    if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
        raise ArgumentError("DeltaHCallback does not support DeepSpeed or FSDP (sharded parameters and "
                            "optimizer state); use DDP or a single device.")


def _warn_unmodelled_sampling(args: Any) -> None:
    extra = {k: getattr(args, k) for k in ("top_k", "min_p", "repetition_penalty") if hasattr(args, k)}
    neutral = {"top_k": (0, -1, None), "min_p": (None, 0.0), "repetition_penalty": (None, 1.0)}
    odd = {k: v for k, v in extra.items() if v not in neutral[k]}
    if odd:
        logger.warning("deltaH probe: the trainer samples with %s, which deltaH's policy (temperature, "
                       "top-p) does not model; δH₁ refers to the temperature/top-p policy only", odd)


def _prompt_ids(prompts: Sequence[str | Sequence[int]], processing_class: Any) -> list[list[int]]:
    strings = [p for p in prompts if isinstance(p, str)]
    if strings and len(strings) != len(prompts):
        raise ArgumentError("prompts must be all strings or all token-id lists, not a mix")
    if not strings:
        return [[int(t) for t in p] for p in prompts]
    if processing_class is None:
        raise ArgumentError("prompts are strings but the trainer has no processing_class (tokenizer) to "
                            "tokenize them; pass token-id lists instead")
    return [list(ids) for ids in processing_class(text=list(strings))["input_ids"]]


def _special_ids(eos: int | Sequence[int] | None, pad: int | None, tok: Any,
                 model: nn.Module) -> tuple[int | Sequence[int], int]:
    gen = getattr(model, "generation_config", None)
    cfg = getattr(model, "config", None)
    for source in (tok, gen, cfg):
        if eos is None and source is not None:
            eos = getattr(source, "eos_token_id", None)
        if pad is None and source is not None:
            pad = getattr(source, "pad_token_id", None)
    if eos is None:
        raise ArgumentError("DeltaHCallback cannot tell the EOS token id (no tokenizer, generation config or "
                            "config names one): pass eos_token_id=")
    if pad is None:
        pad = eos if isinstance(eos, int) else int(list(eos)[0])
    return eos, int(pad)
