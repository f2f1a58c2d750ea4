"""``DeltaHCallback`` inside real ``transformers.Trainer`` and TRL ``GRPOTrainer`` runs (tiny models, CPU).

The reference for every logged δH₁ is an offline recomputation from the saved checkpoints: the
step is ``Δθ = θ_k − θ_{k−1}`` read from ``checkpoint-k`` and ``checkpoint-(k−1)`` (the initial
weights are saved as ``checkpoint-0``), and δH₁ along it on the callback's evaluation batch is
computed in *forward* mode (jvp), while the callback used the reconstructed AdamW step and reverse
mode. Agreement therefore checks the reconstruction, the hook's timing and the estimator at once.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_qwen2
from torch import nn

import deltaH as dh
from deltaH.integrations import DeltaHCallback, ProbeRecord

pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

LR, STEPS, MAX_GRAD_NORM = 1e-2, 3, 1.0
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
# Float32 training; fused AdamW rounds θ' within 1 ulp of the reconstruction; forward vs reverse mode.
# Observed: relative gaps of 1e-8 to 4e-6.
RTOL, ATOL = 3e-5, 1e-7


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


class _Rows(torch.utils.data.Dataset):
    """Fixed random token rows as the Trainer's default collator expects them."""

    def __init__(self, n: int = 16, t: int = 10, vocab: int = 32) -> None:
        self.ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


class _SeenLogs(TrainerCallback):
    """What a later (or earlier) callback receives in ``on_log``, e.g. a reporting integration."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kw: Any) -> None:
        self.keys |= set(logs or {})


def _lora(model: nn.Module, dropout: float = 0.0) -> nn.Module:
    """LoRA on q/v/gate with B non-zero (so A moves from the first step); dropout makes training random."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                          target_modules=["q_proj", "v_proj", "gate_proj"]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pm


def _args(out: Path, **kw: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=LR, max_grad_norm=MAX_GRAD_NORM, weight_decay=0.01, report_to=[], use_cpu=True,
        bf16=False, seed=0, logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _offline_delta_h1(prev: Path, cur: Path, cb: DeltaHCallback, base: Path | None) -> float:
    """δH₁ along θ_k − θ_{k−1} from two saved folders, forward mode, on the callback's batch."""
    a = dh.load_checkpoint(prev, base_model=base, optimizer=False)
    b = dh.load_checkpoint(cur, base_model=base, optimizer=False)
    lm = dh.FunctionalLM.from_model(a.model)
    theta_b = _trainable(b.model)
    assert set(theta_b) == set(lm.params)
    dirs = {n: (theta_b[n] - t).unsqueeze(0) for n, t in lm.params.items()}
    assert cb.eval_batch is not None and cb.policy is not None
    fo = dh.delta_h_first_order(lm.params, dirs, cb.eval_batch, lm=lm, policy=cb.policy, eta=1.0,
                                mode="forward")
    return float(fo.delta_h[0])


def _logged(trainer: Trainer, key: str) -> dict[int, float]:
    return {int(e["step"]): float(e[key]) for e in trainer.state.log_history if key in e}


@dataclass
class Run:
    trainer: Trainer
    cb: DeltaHCallback
    root: Path
    base: Path | None
    seen_after: _SeenLogs


def _train_with_checkpoints(root: Path, lora: bool) -> Run:
    model = tiny_qwen2(dtype=torch.float32)
    base: Path | None = None
    if lora:
        base = root / "base"
        model.save_pretrained(base)
        model = _lora(model)
    out = root / "out"
    model.save_pretrained(out / "checkpoint-0")  # θ_0 (an adapter folder for LoRA)
    cb = DeltaHCallback(prompts=PROMPTS, max_new_tokens=6, n_per_prompt=3, eos_token_id=0, true_every=2)
    seen = _SeenLogs()
    tr = Trainer(model=model, args=_args(out, save_strategy="steps", save_steps=1), train_dataset=_Rows(),
                 callbacks=[cb, seen])
    tr.train()
    return Run(tr, cb, out, base, seen)


@pytest.fixture(scope="module", params=["lora", "full"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _train_with_checkpoints(tmp_path_factory.mktemp(request.param), request.param == "lora")


# ----------------------------------------------------------------------------------- plain Trainer
def test_logged_delta_h1_matches_checkpoints(run: Run) -> None:
    logged = _logged(run.trainer, "deltah/delta_h1")
    assert sorted(logged) == list(range(1, STEPS + 1))
    for k in range(1, STEPS + 1):
        prev, cur = run.root / f"checkpoint-{k - 1}", run.root / f"checkpoint-{k}"
        want = _offline_delta_h1(prev, cur, run.cb, run.base)
        assert abs(want) > 1e-4  # the step moves the entropy measurably
        assert logged[k] == pytest.approx(want, rel=RTOL, abs=ATOL), k


def test_logged_metrics_and_history(run: Run) -> None:
    hist = run.cb.history
    assert [r.step for r in hist] == [1, 2, 3] and all(isinstance(r, ProbeRecord) for r in hist)
    for key in ("deltah/h", "deltah/reconstruction_error", "deltah/time_s"):
        assert sorted(_logged(run.trainer, key)) == [1, 2, 3], key
    assert sorted(_logged(run.trainer, "deltah/true_delta_h")) == [2]  # true_every=2
    assert {"deltah/delta_h1", "deltah/h", "deltah/true_delta_h"} <= run.seen_after.keys
    lrs = _logged(run.trainer, "learning_rate")
    for r in hist:
        assert r.lr == pytest.approx(lrs[r.step])  # the lr the step used
        assert r.reconstruction_error is not None and r.reconstruction_error < 1e-4  # fused AdamW: ~1 ulp
        assert np.isfinite(r.h) and r.h > 0 and r.proxy is None  # no GRPO batch with the plain Trainer
    r2 = hist[1]
    assert r2.true_delta_h is not None and r2.ess is not None and r2.ess > 1
    assert r2.delta_h1 is not None
    assert r2.true_delta_h == pytest.approx(r2.delta_h1, rel=0.5)  # the prediction, checked during training


def test_no_effect_on_training(tmp_path: Path) -> None:
    """Same seed with and without the probe: bitwise-equal parameters, optimizer state, RNG streams.

    LoRA dropout makes training draw from the RNG; gradient checkpointing adds the input-embedding
    hook that the probe lifts while it runs (it must be back, in place, afterwards).
    """
    init = _lora(tiny_qwen2(dtype=torch.float32), dropout=0.1)

    def train(with_probe: bool) -> tuple[Trainer, tuple[Any, ...], list[Any]]:
        model = copy.deepcopy(init)
        cbs = [DeltaHCallback(prompts=PROMPTS, max_new_tokens=6, eos_token_id=0, true_every=1)]
        args = _args(tmp_path / str(with_probe), gradient_checkpointing=True)
        tr = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=cbs if with_probe else [])
        tr.train()
        rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        flags = [(m.training, [getattr(f, "__name__", "") for f in m._forward_hooks.values()])
                 for m in model.modules()]
        return tr, rng, flags

    a, rng_a, flags_a = train(False)
    b, rng_b, flags_b = train(True)
    assert any(k.startswith("deltah/") for e in b.state.log_history for k in e)
    for (na, pa), (nb, pb) in zip(a.model.named_parameters(), b.model.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for key, val in st.items():
            assert torch.equal(val, sb["state"][i][key]), (i, key)
    assert torch.equal(rng_a[0], rng_b[0]) and rng_a[1] == rng_b[1]
    assert rng_a[2][0] == rng_b[2][0] and np.array_equal(rng_a[2][1], rng_b[2][1])
    assert rng_a[2][2:] == rng_b[2][2:]
    assert flags_a == flags_b and any("make_inputs_require_grads" in hooks for _, hooks in flags_b)
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (a, b)]
    assert losses[0] == losses[1]


def test_reconstruction_is_exact_for_unfused_adamw(tmp_path: Path) -> None:
    cb = DeltaHCallback(prompts=PROMPTS, eos_token_id=0, max_new_tokens=4)
    args = _args(tmp_path, optim="adamw_torch", max_steps=2)  # the foreach / for-loop kernels
    model = _lora(tiny_qwen2(dtype=torch.float32))
    Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb]).train()
    assert [r.reconstruction_error for r in cb.history] == [0.0, 0.0]  # bit for bit


def test_every_and_given_eval_batch(tmp_path: Path) -> None:
    model = tiny_qwen2(dtype=torch.float32)
    lm = dh.FunctionalLM.from_model(model)
    batch = dh.sample(lm, lm.params, PROMPTS, policy=dh.SamplingPolicy(), max_new_tokens=5, n_per_prompt=2,
                      eos_token_id=0, pad_token_id=0, generator=torch.Generator().manual_seed(3))
    cb = DeltaHCallback(batch, every=2, check_reconstruction=False, mode="forward")
    tr = Trainer(model=model, args=_args(tmp_path, max_steps=4), train_dataset=_Rows(), callbacks=[cb])
    tr.train()
    assert cb.eval_batch is batch or torch.equal(cb.eval_batch.input_ids, batch.input_ids)
    assert sorted(_logged(tr, "deltah/delta_h1")) == [2, 4]
    assert not _logged(tr, "deltah/reconstruction_error")


def test_other_ranks_do_nothing(tmp_path: Path) -> None:
    model = tiny_qwen2(dtype=torch.float32)
    cb = DeltaHCallback(prompts=PROMPTS, eos_token_id=0, max_new_tokens=4)
    tr = Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=_Rows(), callbacks=[cb])
    tr.is_world_process_zero = lambda: False  # type: ignore[method-assign]  # as on rank 1 of a DDP run
    tr.train()
    assert cb.eval_batch is None and not cb.history
    assert not any(k.startswith("deltah/") for e in tr.state.log_history for k in e)


def test_main_rank_probe_stays_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.distributed only rank 0 probes: deltaH's all-reduces must not run (they would hang)."""
    import torch.distributed as dist

    from deltaH import _dist

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the probe called a collective that the other ranks never join")

    monkeypatch.setattr(_dist, "active", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", refuse)
    monkeypatch.setattr(dist, "all_gather", refuse)
    cb = DeltaHCallback(prompts=PROMPTS, eos_token_id=0, max_new_tokens=4, true_every=1)
    args = _args(tmp_path, max_steps=1)
    tr = Trainer(model=tiny_qwen2(dtype=torch.float32), args=args, train_dataset=_Rows(), callbacks=[cb])
    tr.train()
    assert [r.step for r in cb.history] == [1] and _dist.active()  # restored after each probe


def test_sgd_is_refused_at_train_begin(tmp_path: Path) -> None:
    model = tiny_qwen2(dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = DeltaHCallback(prompts=PROMPTS, eos_token_id=0)
    tr = Trainer(model=model, args=_args(tmp_path, optim="sgd"), train_dataset=_Rows(), callbacks=[cb])
    with pytest.raises(TypeError, match="DeltaHCallback cannot reconstruct.*AdamW"):
        tr.train()
    assert tr.state.global_step == 0 and not cb.history
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_off_policy_eval_batch_is_refused_at_train_begin(tmp_path: Path) -> None:
    model = tiny_qwen2(dtype=torch.float32)
    lm = dh.FunctionalLM.from_model(model)
    batch = dh.sample(lm, lm.params, PROMPTS, policy=dh.SamplingPolicy(), max_new_tokens=8, n_per_prompt=4,
                      eos_token_id=0, pad_token_id=0, generator=torch.Generator().manual_seed(0))
    cb = DeltaHCallback(batch, policy=dh.SamplingPolicy(top_p=0.2))  # E was drawn without top-p
    tr = Trainer(model=model, args=_args(tmp_path), train_dataset=_Rows(), callbacks=[cb])
    with pytest.raises(ValueError, match="eval_batch does not fit the policy.*-inf"):
        tr.train()
    assert tr.state.global_step == 0


def test_failure_mid_training_skips_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltaH.integrations import callback

    calls = []
    real = callback.delta_h_first_order

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(callback, "delta_h_first_order", flaky)
    cb = DeltaHCallback(prompts=PROMPTS, eos_token_id=0, max_new_tokens=4)
    tr = Trainer(model=tiny_qwen2(dtype=torch.float32), args=_args(tmp_path), train_dataset=_Rows(),
                 callbacks=[cb])
    with pytest.warns(RuntimeWarning, match="deltaH probe skipped step 2: RuntimeError: boom"):
        tr.train()
    assert tr.state.global_step == STEPS and [r.step for r in cb.history] == [1, 3]
    assert sorted(_logged(tr, "deltah/delta_h1")) == [1, 3] and not cb._expected


@pytest.mark.parametrize("bad", [dict(), dict(eval_batch=None, prompts=PROMPTS, every=0),
                                 dict(prompts=PROMPTS, mode="sideways")])
def test_constructor_validates(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DeltaHCallback(**bad)


@pytest.mark.parametrize("how", ["autocast", "bf16_weights"])
def test_bf16_training_probes_in_float32(tmp_path: Path, how: str) -> None:
    model = _lora(tiny_qwen2(dtype=torch.float32))
    if how == "bf16_weights":
        model = model.to(torch.bfloat16)  # pure bf16 training: the probe works on a float32 copy
    cb = DeltaHCallback(prompts=PROMPTS, max_new_tokens=6, eos_token_id=0, true_every=1)
    args = _args(tmp_path, bf16=how == "autocast", max_steps=2)
    tr = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb])
    tr.train()
    assert [r.step for r in cb.history] == [1, 2]
    for r in cb.history:
        vals = [r.delta_h1, r.h, r.true_delta_h, r.reconstruction_error]
        assert all(v is not None and np.isfinite(v) for v in vals), r
    assert cb.eval_batch is not None and len(cb.eval_batch) == len(PROMPTS) * 4
    if how == "autocast":  # float32 master weights: the reconstruction is as exact as in float32 training
        assert max(r.reconstruction_error or 0.0 for r in cb.history) < 1e-4


# ----------------------------------------------------------------------------------- TRL GRPOTrainer
def _reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]


def test_grpo_trainer_with_mixin(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig

    from deltaH.integrations.trl import DeltaHGRPOTrainer, RecordedStep
    from deltaH.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "eager"
    base = tmp_path / "base"
    Qwen2ForCausalLM(cfg).save_pretrained(base)
    model = _lora(Qwen2ForCausalLM.from_pretrained(base, attn_implementation="eager"))
    out = tmp_path / "out"
    model.save_pretrained(out / "checkpoint-0")
    args = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=8, max_steps=2, learning_rate=LR, bf16=False, report_to=[], use_cpu=True,
        logging_steps=1, save_strategy="steps", save_steps=1, seed=0, disable_tqdm=True,
    )
    ds = Dataset.from_dict({"prompt": ["12+7=", "3-1=", "5+5=", "9-2="] * 4})
    # GRPOConfig turns gradient checkpointing on (input-embedding hooks that torch.func refuses): the
    # true ΔH (vmap over directions) runs anyway.
    cb = DeltaHCallback(prompts=["12+7=", "40-8="], n_per_prompt=4, true_every=1)
    seen_before = _SeenLogs()  # like a report_to integration: runs before user callbacks
    tr = DeltaHGRPOTrainer(model=model, reward_funcs=_reward, args=args, train_dataset=ds,
                           processing_class=tok, callbacks=[seen_before, cb])
    tr.train()

    assert cb.policy == dh.SamplingPolicy(temperature=args.temperature, top_p=args.top_p)
    assert cb.eval_batch is not None and int(cb.eval_batch.n_tokens.max()) <= 8  # max_completion_length
    logged = _logged(tr, "deltah/delta_h1")
    assert sorted(logged) == [1, 2]
    assert args.gradient_checkpointing
    # The mixin's log adds the values before any callback runs, so earlier callbacks see them too.
    assert {"deltah/delta_h1", "deltah/proxy", "deltah/reconstruction_error"} <= seen_before.keys
    for key in ("deltah/h", "deltah/proxy", "deltah/true_delta_h", "deltah/reconstruction_error"):
        assert sorted(_logged(tr, key)) == [1, 2], key
    rec = cb.last_update_batch
    assert isinstance(rec, RecordedStep) and rec.step == 2 and len(rec.micro_batches) == 2  # accumulation
    assert rec.advantages.shape == (8,) and bool(rec.advantages.abs().sum() > 0)
    u = rec.sequence_batch()  # U as deltaH sees it: prompt ⧺ completion, scored where the loss is
    assert u is not None and len(u[0]) == 8 and torch.equal(u[1], rec.advantages)
    n_loss_tokens = sum(int(mb["completion_mask"].sum()) for mb in rec.micro_batches)
    assert int(u[0].n_tokens.sum()) == n_loss_tokens
    # With the probe attached, the mixin also wrote every step to disk: the same micro-batches.
    from deltaH.io.steps import list_steps, read_step

    assert list_steps(out / "deltah-steps") == [1, 2]
    (on_disk,) = read_step(out / "deltah-steps", 2)
    for got, want in zip(on_disk.micro_batches, rec.micro_batches, strict=True):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    for k in (1, 2):
        want = _offline_delta_h1(out / f"checkpoint-{k - 1}", out / f"checkpoint-{k}", cb, base)
        assert logged[k] == pytest.approx(want, rel=RTOL, abs=ATOL), k


def test_grpo_mixin_without_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from deltaH.integrations import trl as integ

    cls = integ.make_grpo_trainer_class(Trainer)  # any Trainer subclass works as the base
    assert issubclass(cls, integ.DeltaHGRPOMixin) and issubclass(cls, Trainer)
    monkeypatch.setitem(sys.modules, "trl", None)  # as if TRL were not installed
    monkeypatch.delitem(integ.__dict__, "DeltaHGRPOTrainer", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'deltaH\[trl\]'"):
        integ.make_grpo_trainer_class()
    with pytest.raises(ImportError, match="TRL"):
        integ.DeltaHGRPOTrainer  # noqa: B018
