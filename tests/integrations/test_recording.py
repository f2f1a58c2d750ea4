"""Step recording inside real TRL ``GRPOTrainer`` and ``transformers.Trainer`` runs (tiny models, CPU).

The reference run is the same trainer *without* deltaH, whose ``compute_loss`` keeps a copy of every
micro-batch it receives. Recording must leave training bitwise unchanged (parameters, optimizer
state, RNG streams, every logged number) and the step files must hold exactly what the reference's
``compute_loss`` saw, grouped by optimizer step.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_qwen2
from torch import nn

from deltaH.io.steps import SFT_FIELDS, list_steps, read_step
from deltaH.updates.recorded import MICRO_BATCH_FIELDS, RecordedStep

pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["12+7=", "3-1=", "5+5=", "9-2="]
# Keys of log_history that measure wall time: the only values two identical runs may differ in.
TIMING = ("runtime", "per_second", "time")


def _reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [float(sum(ch.isdigit() for ch in c)) + 0.1 * len(c) for c in completions]


class _Capture:
    """Mixed into the reference trainer: a clone of every training micro-batch ``compute_loss`` gets."""

    seen: list[tuple[int, dict[str, Any]]]

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self.model.training:  # type: ignore[attr-defined]
            kept = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            if num_items_in_batch is not None:
                kept["hf_num_items_in_batch"] = num_items_in_batch
            self.__dict__.setdefault("seen", []).append((self.state.global_step + 1, kept))  # type: ignore
        return super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                    num_items_in_batch=num_items_in_batch)


def _state(tr: Trainer) -> dict[str, Any]:
    """Everything training produced: θ, optimizer state, RNG streams, logs without wall times."""
    logs = [{k: v for k, v in e.items() if not any(t in k for t in TIMING)} for e in tr.state.log_history]
    return {
        "params": {n: p.detach().clone() for n, p in tr.model.named_parameters()},
        "opt": tr.optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "py_rng": random.getstate(),
        "np_rng": np.random.get_state()[1].copy(),
        "logs": logs,
    }


def _assert_bitwise(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        for k in sa[i]:
            assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k])), (i, k)
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert a["py_rng"] == b["py_rng"]
    assert np.array_equal(a["np_rng"], b["np_rng"])
    assert a["logs"] == b["logs"] and len(a["logs"]) > 1


def _by_step(seen: list[tuple[int, dict[str, Any]]]) -> dict[int, list[dict[str, Any]]]:
    out: dict[int, list[dict[str, Any]]] = {}
    for step, mb in seen:
        out.setdefault(step, []).append(mb)
    return out


# ----------------------------------------------------------------------------------- TRL GRPOTrainer
@pytest.fixture(scope="module")
def grpo_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("trl")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from deltaH.toy import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    cfg._attn_implementation = "eager"
    base = tmp_path_factory.mktemp("grpo") / "base"
    Qwen2ForCausalLM(cfg).save_pretrained(base)
    return base, tok


def _grpo_model(base: Path) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)  # LoRA A is drawn from the global stream
    model = Qwen2ForCausalLM.from_pretrained(base, attn_implementation="eager")
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "gate_proj"]))


def _grpo_run(out: Path, base_tok: tuple[Path, Any], trainer_cls: type, steps: int = 3,
              **kw: Any) -> Trainer:
    from datasets import Dataset
    from trl import GRPOConfig

    base, tok = base_tok
    cfg: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, num_generations=4,
        max_completion_length=8, max_steps=steps, learning_rate=0.05, bf16=False, report_to=[],
        use_cpu=True, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True,
        lr_scheduler_type="linear",
    )
    trainer_kw = {k: kw.pop(k) for k in ("deltah_record_steps", "deltah_steps_dir") if k in kw}
    cfg.update(kw)
    ds = Dataset.from_dict({"prompt": PROMPTS * 4})
    tr = trainer_cls(model=_grpo_model(base), reward_funcs=_reward, args=GRPOConfig(**cfg), train_dataset=ds,
                     processing_class=tok, **trainer_kw)
    tr.train()
    return tr


def _check_grpo_files(steps_dir: Path, ref: Trainer, n_steps: int, acc: int, spg: int) -> list[RecordedStep]:
    """The files hold what the reference's compute_loss saw; returns the read steps."""
    seen = _by_step(ref.seen)  # type: ignore[attr-defined]
    assert list_steps(steps_dir) == list(range(1, n_steps + 1)) == sorted(seen)
    lr_logged = {int(e["step"]): e["learning_rate"] for e in ref.state.log_history if "learning_rate" in e}
    recs = []
    for step in range(1, n_steps + 1):
        ranks = read_step(steps_dir, step)
        assert len(ranks) == 1
        rec = ranks[0]
        assert rec.step == step and rec.rank == 0 and len(rec.micro_batches) == acc
        for got, want in zip(rec.micro_batches, seen[step], strict=True):
            fields = {k for k in want if k in MICRO_BATCH_FIELDS or k.endswith("per_token_logps")}
            assert set(got) == fields
            for k in fields:
                assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), (step, k)
        assert rec.meta["learning_rate"] == lr_logged[step]  # the lr the optimizer used at that step
        assert rec.meta["epoch"] > 0 and rec.meta["global_step"] == step
        assert rec.meta["pad_token_id"] == ref.processing_class.pad_token_id
        assert rec.meta["current_gradient_accumulation_steps"] == acc
        assert rec.options.gradient_accumulation_steps == acc and rec.options.steps_per_generation == spg
        recs.append(rec)
    # num_items_in_batch counts the loss tokens of the whole generation batch: spg/acc steps share one.
    per_gen = spg // acc
    for g in range(0, n_steps, per_gen):
        group = recs[g:g + per_gen]
        if len(group) < per_gen:
            continue
        total = sum(int(mb["completion_mask"].sum()) for r in group for mb in r.micro_batches)
        for r in group:
            for mb in r.micro_batches:
                assert mb["num_items_in_batch"].dim() == 0 and int(mb["num_items_in_batch"]) == total
    return recs


def test_grpo_recording_is_bitwise_neutral_and_complete(tmp_path: Path, grpo_base: tuple[Path, Any]) -> None:
    """Off-policy (steps_per_generation 4 > accumulation 2) with a KL term: every optional field."""
    from trl import GRPOTrainer

    from deltaH.integrations.trl import DeltaHGRPOTrainer

    class Ref(_Capture, GRPOTrainer):
        pass

    kw = dict(steps_per_generation=4, beta=0.04, epsilon_high=0.28, loss_type="dapo")
    ref = _grpo_run(tmp_path / "ref", grpo_base, Ref, **kw)
    rec = _grpo_run(tmp_path / "rec", grpo_base, DeltaHGRPOTrainer, **kw)
    _assert_bitwise(_state(ref), _state(rec))
    assert not (tmp_path / "ref" / "deltah-steps").exists()

    recs = _check_grpo_files(tmp_path / "rec" / "deltah-steps", ref, n_steps=3, acc=2, spg=4)
    for r in recs:
        mb = r.micro_batches[0]
        assert {"old_per_token_logps", "ref_per_token_logps"} <= set(mb)
        assert mb["old_per_token_logps"].shape == mb["completion_ids"].shape
        o = r.options
        assert (o.trainer, o.loss_type, o.beta) == ("GRPOTrainer", "dapo", 0.04)
        assert (o.epsilon_low, o.epsilon_high) == (0.2, 0.28)
        assert (o.max_completion_length, o.temperature, o.world_size, o.num_iterations) == (8, 1.0, 1, 1)
        assert o.use_bias_correction_kl is True and o.max_grad_norm == 1.0
        assert r.meta["eos_token_id"] == grpo_base[1].eos_token_id and r.meta["num_generations"] == 4
    # The second step of a generation batch trains on samples of an older policy: ratio ≠ 1 somewhere.
    mb = recs[1].micro_batches[0]
    assert not torch.equal(mb["old_per_token_logps"], torch.zeros_like(mb["old_per_token_logps"]))


def test_grpo_on_policy_records_no_old_logps(tmp_path: Path, grpo_base: tuple[Path, Any]) -> None:
    """steps_per_generation = accumulation and beta = 0: TRL makes neither old nor ref log-probs.

    With adaptive entropy control, the coefficient moves between steps: the options hold the one
    the step applied (TRL logs the *next* step's at each step's end), ``entropy_coef_applied`` is 0
    while the measured entropy is above the target (the first step: none measured yet).
    """
    from trl import GRPOTrainer

    from deltaH.integrations.trl import DeltaHGRPOMixin

    class Ref(_Capture, GRPOTrainer):
        pass

    class Mine(DeltaHGRPOMixin, GRPOTrainer):
        pass

    elsewhere = tmp_path / "elsewhere"
    kw = dict(steps=3, loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.1, entropy_coef_delta=0.05,
              entropy_target=100.0)
    ref = _grpo_run(tmp_path / "ref", grpo_base, Ref, **kw)
    rec = _grpo_run(tmp_path / "rec", grpo_base, Mine, deltah_steps_dir=elsewhere, **kw)
    _assert_bitwise(_state(ref), _state(rec))
    assert not (tmp_path / "rec" / "deltah-steps").exists()
    recs = _check_grpo_files(elsewhere, ref, n_steps=3, acc=2, spg=2)
    for r in recs:
        assert set(r.micro_batches[0]) == set(MICRO_BATCH_FIELDS)
        assert r.options.loss_type == "grpo" and r.options.beta == 0.0 and r.options.use_adaptive_entropy
    logged = {int(e["step"]): e["entropy_coef"] for e in ref.state.log_history if "entropy_coef" in e}
    assert [r.options.entropy_coef for r in recs] == [0.1, logged[1], logged[2]]
    assert [r.meta["entropy_coef_applied"] for r in recs] == [0.0, logged[1], logged[2]]
    assert logged[1] == pytest.approx(0.15) and logged[2] == pytest.approx(0.2)  # the coefficient did move


def test_grpo_recording_can_be_turned_off(tmp_path: Path, grpo_base: tuple[Path, Any]) -> None:
    from deltaH.integrations.recording import _StepWriter
    from deltaH.integrations.trl import DeltaHGRPOTrainer

    tr = _grpo_run(tmp_path / "off", grpo_base, DeltaHGRPOTrainer, steps=1, deltah_record_steps=False)
    assert not any(isinstance(cb, _StepWriter) for cb in tr.callback_handler.callbacks)
    assert not (tmp_path / "off" / "deltah-steps").exists()
    assert tr.deltah_recorder.take(1) is not None  # still kept in memory for DeltaHCallback

    class Quiet(DeltaHGRPOTrainer):  # type: ignore[misc, valid-type]
        deltah_record_steps = False

    from datasets import Dataset
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp_path / "q"), per_device_train_batch_size=4, num_generations=4,
                      bf16=False, use_cpu=True, report_to=[])
    q = Quiet(model=_grpo_model(grpo_base[0]), reward_funcs=_reward, args=args,
              train_dataset=Dataset.from_dict({"prompt": PROMPTS}), processing_class=grpo_base[1])
    assert not any(isinstance(cb, _StepWriter) for cb in q.callback_handler.callbacks)


# ----------------------------------------------------------------------------------- transformers.Trainer
class _Rows(torch.utils.data.Dataset):
    """Token rows of different lengths, padded, labels −100 on padding (num_items_in_batch varies)."""

    def __init__(self, n: int = 16, t: int = 10, vocab: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, t), generator=g)
        self.lens = torch.randint(3, t + 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        am = (torch.arange(self.ids.shape[1]) < self.lens[i]).long()
        ids = self.ids[i] * am
        return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}


def _sft_run(out: Path, trainer_cls: type) -> Trainer:
    model = tiny_qwen2(dtype=torch.float32).train()
    args = TrainingArguments(
        output_dir=str(out), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=3,
        learning_rate=1e-2, weight_decay=0.01, report_to=[], use_cpu=True, bf16=False, seed=0,
        logging_steps=1, save_strategy="no", disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=1,
    )
    tr = trainer_cls(model=model, args=args, train_dataset=_Rows())
    tr.train()
    return tr


def test_trainer_mixin_records_sft_steps_bitwise_neutral(tmp_path: Path) -> None:
    from deltaH.integrations import DeltaHTrainerMixin

    class Ref(_Capture, Trainer):
        pass

    class Mine(DeltaHTrainerMixin, Trainer):
        pass

    ref = _sft_run(tmp_path / "ref", Ref)
    rec = _sft_run(tmp_path / "rec", Mine)
    _assert_bitwise(_state(ref), _state(rec))

    steps_dir = tmp_path / "rec" / "deltah-steps"
    seen = _by_step(ref.seen)  # type: ignore[attr-defined]
    assert list_steps(steps_dir) == [1, 2, 3] == sorted(seen)
    lr_logged = {int(e["step"]): e["learning_rate"] for e in ref.state.log_history if "learning_rate" in e}
    # 16 rows in micro-batches of 2 with accumulation 3: the epoch's last step has only 2 micro-batches.
    for step, n_mb in ((1, 3), (2, 3), (3, 2)):
        (r,) = read_step(steps_dir, step)
        assert len(r.micro_batches) == n_mb == r.meta["current_gradient_accumulation_steps"]
        assert r.options.trainer == "Trainer" and r.options.gradient_accumulation_steps == 3
        assert r.options.max_grad_norm == 1.0 and r.options.world_size == 1
        assert r.options.extra["compute_loss_overridden_by"] == []
        assert r.meta["learning_rate"] == lr_logged[step]
        for got, want in zip(r.micro_batches, seen[step], strict=True):
            assert set(got) == {"input_ids", "attention_mask", "labels", "num_items_in_batch"}
            assert set(got) <= set(SFT_FIELDS)
            for k in ("input_ids", "attention_mask", "labels"):
                assert torch.equal(got[k], want[k]), (step, k)
            assert got["num_items_in_batch"].dim() == 0
            assert int(got["num_items_in_batch"]) == int(want["hf_num_items_in_batch"])
        # The Trainer counts the label tokens of the step's micro-batches (after the causal shift).
        n_labels = sum(int((mb["labels"][:, 1:] != -100).sum()) for mb in r.micro_batches)
        assert int(r.micro_batches[0]["num_items_in_batch"]) == n_labels
    # The subclass overriding compute_loss (the reference's capture) is named in the options.
    class Both(DeltaHTrainerMixin, Ref):
        pass

    from deltaH.integrations.recording import _compute_loss_owners

    assert _compute_loss_owners(Both) == ["_Capture"]


def test_unwritable_step_folder_warns_and_training_goes_on(tmp_path: Path) -> None:
    """An unwritable step folder is a warning per step, and training still runs to the end."""
    from deltaH.integrations import DeltaHTrainerMixin

    class Mine(DeltaHTrainerMixin, Trainer):
        pass

    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the step folder should be")
    model = tiny_qwen2(dtype=torch.float32).train()
    args = TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, bf16=False, seed=0, save_strategy="no",
                             disable_tqdm=True)
    tr = Mine(model=model, args=args, train_dataset=_Rows(), deltah_steps_dir=blocker / "steps")
    with pytest.warns(RuntimeWarning) as caught:
        tr.train()
    assert tr.state.global_step == 2
    assert [str(w.message).split(" to ")[0] for w in caught] == [
        f"deltaH could not write the step file of step {k}" for k in (1, 2)]


def test_resumed_run_keeps_the_redone_steps_earlier_files(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Resuming from checkpoint-2 trains step 3 again: the first run's step-3 becomes step-3.prev-1."""
    from deltaH.integrations import DeltaHTrainerMixin

    class Mine(DeltaHTrainerMixin, Trainer):
        pass

    def trainer() -> Trainer:
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, report_to=[], use_cpu=True, bf16=False,
                                 seed=0, save_strategy="steps", save_steps=2, disable_tqdm=True)
        return Mine(model=tiny_qwen2(dtype=torch.float32).train(), args=args, train_dataset=_Rows())

    trainer().train()
    steps_dir = tmp_path / "deltah-steps"
    (first,) = read_step(steps_dir, 3)
    with caplog.at_level("WARNING", logger="deltaH"):
        trainer().train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert "already holds step files 3..3" in caplog.text
    assert list_steps(steps_dir) == [1, 2, 3]
    assert sorted(p.name for p in steps_dir.glob("step-3.*")) == [
        "step-3.json", "step-3.prev-1.json", "step-3.prev-1.safetensors", "step-3.safetensors"]
    (again,) = read_step(steps_dir, 3)
    # HF resumes exactly (data order and RNG restored): the re-done step trained on the same batch.
    for a, b in zip(first.micro_batches, again.micro_batches, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"])
