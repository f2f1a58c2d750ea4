"""``load_checkpoint`` against real ``transformers.Trainer`` runs (tiny models, three steps, CPU).

Each run trains for 3 of 6 scheduled steps (linear decay after one warm-up step), so the lr the next
step uses (0.6 × 1e-3) differs from both the initial lr and zero. The live optimizer is the reference:
the loaded state must equal its snapshot and reproduce its next ``step()``.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama, tiny_qwen2, with_lora
from torch import nn

import deltaH as dh
from deltaH.io import Checkpoint, load_checkpoint
from deltaH.io import _trainer_groups as tg
from deltaH.updates import AdamWState, adamw_step

pytest.importorskip("accelerate")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

LR, MAX_STEPS, STOP, MAX_GRAD_NORM = 1e-3, 6, 3, 1.0
NEXT_LR = LR * (MAX_STEPS - STOP) / (MAX_STEPS - 1)  # linear schedule, 1 warm-up step


class _Rows(torch.utils.data.Dataset):
    """Fixed random token rows as the Trainer's default collator expects them."""

    def __init__(self, n: int = 8, t: int = 10, vocab: int = 32) -> None:
        self.ids = torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if state.global_step >= self.step:
            control.should_training_stop = True


@dataclass
class Run:
    trainer: Trainer
    ckpt: Path
    base: Path | None
    snapshot: AdamWState  # the live optimizer right after the save


def _train(model: nn.Module, out: Path) -> Run:
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, save_strategy="steps", save_steps=STOP,
        per_device_train_batch_size=2, learning_rate=LR, weight_decay=0.1, lr_scheduler_type="linear",
        warmup_steps=1, max_grad_norm=MAX_GRAD_NORM, report_to=[], use_cpu=True, bf16=False, seed=0,
        disable_tqdm=True, logging_steps=100,
    )
    tr = Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[_StopAt(STOP)])
    tr.train()
    assert tr.state.global_step == STOP
    return Run(tr, out / f"checkpoint-{STOP}", None, AdamWState.from_optimizer(tr.optimizer, tr.model))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("lora")
    tiny_qwen2(dtype=torch.float32).save_pretrained(root / "base")
    base = AutoModelForCausalLM.from_pretrained(root / "base", attn_implementation="eager")
    run = _train(with_lora(base), root / "out")
    run.base = root / "base"
    return run


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    # Qwen2 has q/k/v biases and RMSNorm weights (no-decay group) and a tied embedding.
    return _train(tiny_qwen2(dtype=torch.float32, tie=True), tmp_path_factory.mktemp("full") / "out")


@pytest.fixture(params=["lora", "full"])
def run(request: pytest.FixtureRequest) -> Run:
    return request.getfixturevalue(f"{request.param}_run")


def _copy(run: Run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run.ckpt, tmp_path / run.ckpt.name))


def _assert_same_state(a: AdamWState, b: AdamWState) -> None:
    assert a.names == b.names
    assert a.fresh == b.fresh and dict(a.step) == dict(b.step) and dict(a.hyper) == dict(b.hyper)
    for n in a.names:
        assert torch.equal(a.exp_avg[n], b.exp_avg[n]) and torch.equal(a.exp_avg_sq[n], b.exp_avg_sq[n])


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------- agreement
def test_loaded_state_equals_live_optimizer(run: Run) -> None:
    ck = load_checkpoint(run.ckpt)
    assert ck.kind == "trainer" and ck.global_step == STOP and ck.optimizer_state is not None
    _assert_same_state(ck.optimizer_state, run.snapshot)
    assert ck.lr == run.trainer.optimizer.param_groups[0]["lr"] == pytest.approx(NEXT_LR)
    assert set(_trainable(ck.model)) == set(ck.optimizer_state.names)
    assert not any(m.training for m in ck.model.modules())
    lm = dh.FunctionalLM.from_model(ck.model)  # eval, unmerged, trainable set = the optimizer's
    assert set(lm.params) == set(ck.optimizer_state.names)


def test_loaded_state_reproduces_next_step(run: Run) -> None:
    ck = load_checkpoint(run.ckpt, max_grad_norm=MAX_GRAD_NORM)
    assert ck.optimizer_state is not None and ck.max_grad_norm == MAX_GRAD_NORM
    model, opt = copy.deepcopy((run.trainer.model, run.trainer.optimizer.optimizer))
    model.eval()
    theta = _trainable(ck.model)
    for n, p in _trainable(model).items():
        assert torch.equal(theta[n], p), n  # the saved weights are the live ones
    rows = _Rows()[0]
    model(**{k: v.unsqueeze(0) for k, v in rows.items()}).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_GRAD_NORM)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()  # the real next step (fused AdamW, as the Trainer built it)
    delta, new_state = adamw_step(theta, grads, ck.optimizer_state, ck.max_grad_norm)
    assert set(delta) == set(before)
    for n, p in model.named_parameters():
        if p.requires_grad:  # fused AdamW rounds θ' within ~1 ulp of the exact reconstruction
            ulp = torch.finfo(p.dtype).eps * float(before[n].abs().max())
            assert float(delta[n].abs().max()) > 100 * ulp, n  # the step is not lost in rounding
            torch.testing.assert_close(delta[n], p.detach() - before[n], rtol=1e-5, atol=2 * ulp)
    _assert_same_state(new_state, AdamWState.from_optimizer(opt, model))


def test_full_model_groups_replay_the_trainer(full_run: Run) -> None:
    tr, model = full_run.trainer, full_run.trainer.model
    assert tg.decay_parameter_names(model) == tr.get_decay_parameter_names(model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    live = [[by_id[id(p)] for p in g["params"]] for g in tr.optimizer.param_groups]
    decay, no_decay = tg.trainer_groups(model)
    assert live == [decay, no_decay]
    assert no_decay and any("bias" in n for n in no_decay) and any("norm" in n for n in no_decay)
    assert "lm_head.weight" not in decay + no_decay  # tied to the embedding: one parameter, one slot


@pytest.mark.parametrize("make", ["lora", "llama_tied", "gpt2_layernorm"])
def test_decay_names_match_transformers(make: str) -> None:
    if make == "lora":
        model = with_lora(tiny_qwen2())
    elif make == "llama_tied":
        model = tiny_llama(tie=True)
    else:  # nn.LayerNorm children ('ln_1', 'ln_f') are excluded by type, not by name
        model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    want = Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]
    assert tg.decay_parameter_names(model) == want
    if make == "lora":
        decay, no_decay = tg.trainer_groups(model)
        assert no_decay == [] and decay == [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------- param_names
def _with_param_names(ckpt: Path, names: list[list[str]]) -> None:
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for g, ns in zip(sd["param_groups"], names, strict=True):
        g["param_names"] = ns
    torch.save(sd, ckpt / "optimizer.pt")


@pytest.mark.parametrize("spelling", ["in_memory", "inner_model", "on_disk"])
def test_saved_param_names_are_used(lora_run: Run, tmp_path: Path, spelling: str) -> None:
    ckpt = _copy(lora_run, tmp_path)
    decay, no_decay = tg.trainer_groups(lora_run.trainer.model)
    if spelling == "inner_model":
        decay = [n.removeprefix("base_model.model.") for n in decay]
    if spelling == "on_disk":
        decay = [n.replace(".default", "") for n in decay]
    _with_param_names(ckpt, [list(reversed(decay)), no_decay])  # saved names decide the order
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sd["param_groups"][0]["params"].reverse()
    torch.save(sd, ckpt / "optimizer.pt")
    ck = load_checkpoint(ckpt)
    assert ck.optimizer_state is not None
    assert ck.optimizer_state.names == tuple(reversed(lora_run.snapshot.names))
    for n in ck.optimizer_state.names:
        assert torch.equal(ck.optimizer_state.exp_avg[n], lora_run.snapshot.exp_avg[n])


def test_param_names_subset_freezes_the_rest(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    decay, _ = tg.trainer_groups(lora_run.trainer.model)
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    dropped = sd["param_groups"][0]["params"].pop()
    del sd["state"][dropped]
    sd["param_groups"][0]["param_names"], sd["param_groups"][1]["param_names"] = decay[:-1], []
    torch.save(sd, ckpt / "optimizer.pt")
    ck = load_checkpoint(ckpt)
    assert ck.optimizer_state is not None and ck.optimizer_state.names == tuple(decay[:-1])
    assert set(_trainable(ck.model)) == set(decay[:-1])


def test_param_names_unknown_is_an_error(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    decay, _ = tg.trainer_groups(lora_run.trainer.model)
    _with_param_names(ckpt, [["not.a.parameter"] + decay[1:], []])
    with pytest.raises(ValueError, match=r"optimizer\.pt.*'not\.a\.parameter'"):
        load_checkpoint(ckpt)


# ----------------------------------------------------------------------------------------- errors
def test_wrong_shape_names_file_and_parameter(run: Run, tmp_path: Path) -> None:
    ckpt = _copy(run, tmp_path)
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    pid = sd["param_groups"][0]["params"][2]
    sd["state"][pid]["exp_avg"] = torch.zeros(5, 7)
    torch.save(sd, ckpt / "optimizer.pt")
    name = run.snapshot.names[2]
    with pytest.raises(ValueError, match=rf"optimizer\.pt.*{re.escape(repr(name))}.*\(5, 7\)"):
        load_checkpoint(ckpt)


def test_group_size_mismatch_names_first_misfit(full_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(full_run, tmp_path)
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    pid = sd["param_groups"][0]["params"].pop(1)  # as if the trainer had frozen that parameter
    del sd["state"][pid]
    torch.save(sd, ckpt / "optimizer.pt")
    decay, _ = tg.trainer_groups(full_run.trainer.model)
    with pytest.raises(ValueError, match=rf"optimizer\.pt: param group 0 .*{re.escape(repr(decay[1]))}"):
        load_checkpoint(ckpt)


def test_sgd_optimizer_is_refused(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    model = copy.deepcopy(lora_run.trainer.model)
    params = dict(model.named_parameters())
    decay, no_decay = tg.trainer_groups(model)
    groups = [{"params": [params[n] for n in decay], "weight_decay": 0.1},
              {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    sgd = torch.optim.SGD(groups, lr=LR, momentum=0.9)
    for n in decay:
        params[n].grad = torch.ones_like(params[n])
    sgd.step()
    torch.save(sgd.state_dict(), ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match=r"optimizer\.pt.*not a torch Adam/AdamW"):
        load_checkpoint(ckpt)


def test_scheduler_disagreeing_with_optimizer(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)
    sched["_last_lr"] = [LR, LR]
    torch.save(sched, ckpt / "scheduler.pt")
    with pytest.raises(ValueError, match=r"scheduler\.pt.*disagree"):
        load_checkpoint(ckpt)


def test_adapter_base_not_found_then_overridden(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "nobody/no-such-model"
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    # the message serves both audiences: the config key (CLI) and the argument (API)
    with pytest.raises(FileNotFoundError,
                       match=r"'nobody/no-such-model'.*--set checkpoint\.base_model=.*API: base_model="):
        load_checkpoint(ckpt)
    assert lora_run.base is not None
    ck = load_checkpoint(ckpt, base_model=lora_run.base)
    assert ck.base_model_path == str(lora_run.base.resolve())
    assert ck.optimizer_state is not None


def test_adapter_base_relative_to_adapter_folder(lora_run: Run, tmp_path: Path) -> None:
    assert lora_run.base is not None
    ckpt = _copy(lora_run, tmp_path)
    shutil.copytree(lora_run.base, tmp_path / "mybase")
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "../mybase"
    (ckpt / "adapter_config.json").write_text(json.dumps(cfg))
    ck = load_checkpoint(ckpt)
    assert ck.base_model_path == str((tmp_path / "mybase").resolve())


def test_merged_model_beside_adapter_is_refused(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    merged = load_checkpoint(lora_run.ckpt, optimizer=False).model.merge_and_unload()  # type: ignore[operator]
    merged.save_pretrained(ckpt)
    with pytest.raises(ValueError, match="merged"):
        load_checkpoint(ckpt)


def test_nothing_loadable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(ValueError, match="nothing deltaH can load"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickled weights"):
        load_checkpoint(tmp_path)


def test_trainer_folder_without_optimizer(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"optimizer\.pt.*checkpoint\.path.*optimizer=False"):
        load_checkpoint(ckpt)
    ck = load_checkpoint(ckpt, optimizer=False)
    assert ck.optimizer_state is None and ck.lr is None and ck.global_step == STOP


def test_logged_lr_is_the_last_positive_learning_rate_in_the_log(lora_run: Run, tmp_path: Path) -> None:
    """``trainer_state.json``'s ``log_history``: the lr of the last logged step that moved (entries without
    a ``learning_rate``, such as the final summary, and zero-lr steps are passed over)."""
    assert load_checkpoint(lora_run.ckpt, optimizer=False).logged_lr is None  # logging_steps=100: none yet
    ckpt = _copy(lora_run, tmp_path)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["log_history"] = [
        {"step": 1, "learning_rate": 0.0},
        {"step": 2, "learning_rate": 2e-3, "loss": 1.0},
        {"step": 3, "learning_rate": 0.0},
        {"step": 3, "train_runtime": 1.5},
    ]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    ck = load_checkpoint(ckpt, optimizer=False)
    assert ck.logged_lr == 2e-3 and ck.describe()["logged_lr"] == 2e-3 and ck.global_step == STOP


# ----------------------------------------------------------------------------------------- damaged files
def _no_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("weights were loaded before the check")

    monkeypatch.setattr("deltaH.io.checkpoint._from_pretrained", boom)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize(("which", "name"), [("lora", "adapter_model.safetensors"), ("lora", "optimizer.pt"),
                                             ("full", "model.safetensors")])
def test_damaged_file_is_named_before_weights_load(request: pytest.FixtureRequest, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch, which: str, name: str,
                                                   how: str) -> None:
    ckpt = _copy(request.getfixturevalue(f"{which}_run"), tmp_path)
    data = (ckpt / name).read_bytes()
    (ckpt / name).write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)
    _no_weights_load(monkeypatch)
    with pytest.raises(dh.CheckpointError, match=rf"{re.escape(str(ckpt / name))} is corrupt or truncated "
                                                 r"\(\w+: .+\); re-save the checkpoint"):
        load_checkpoint(ckpt)


def test_damaged_scheduler_and_json_are_named(lora_run: Run, tmp_path: Path) -> None:
    ckpt = _copy(lora_run, tmp_path)
    data = (ckpt / "scheduler.pt").read_bytes()
    (ckpt / "scheduler.pt").write_bytes(data[: len(data) - 1])  # read after the weights: still named
    with pytest.raises(dh.CheckpointError, match=r"scheduler\.pt is corrupt or truncated"):
        load_checkpoint(ckpt)
    ckpt = _copy(lora_run, tmp_path / "b")
    (ckpt / "trainer_state.json").write_text('{"global_step": 3')
    with pytest.raises(dh.CheckpointError, match=r"trainer_state\.json cannot be read as JSON.*truncated"):
        load_checkpoint(ckpt)


def test_device_is_checked_before_anything_loads(lora_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    from deltaH.io.checkpoint import check_device

    _no_weights_load(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU machine, whatever this one is
    with pytest.raises(dh.DeviceError, match=r"'cuda' is not available: .*checkpoint\.device"):
        load_checkpoint(lora_run.ckpt, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(dh.DeviceError, match=r"'cuda:2' is not available: this machine has 2 CUDA device"):
        check_device("cuda:2")
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(dh.DeviceError, match="'gpu' is not a torch device"):
        check_device("gpu")


# ----------------------------------------------------------------------------------------- plain folders
def test_plain_model_folder(tmp_path: Path) -> None:
    tiny_qwen2().save_pretrained(tmp_path)
    ck = load_checkpoint(tmp_path)
    assert ck.kind == "model" and ck.optimizer_state is None and ck.lr is None and ck.tokenizer is None
    assert ck.global_step is None and not ck.is_adapter
    assert all(p.requires_grad for p in ck.model.parameters())
    assert next(ck.model.parameters()).dtype == torch.float64  # dtype=None keeps the saved dtype
    ck32 = load_checkpoint(tmp_path, dtype=torch.float32)
    assert next(ck32.model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="not an adapter"):
        load_checkpoint(tmp_path, base_model=tmp_path)


def _save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(31)} | {"[UNK]": 31}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)


def test_plain_adapter_folder(tmp_path: Path) -> None:
    tiny_qwen2().save_pretrained(tmp_path / "base")
    _save_tokenizer(tmp_path / "base")  # the adapter folder has none: the base's is used
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager")
    pm = with_lora(base, r=4)
    pm.save_pretrained(tmp_path / "adapter")
    ck = load_checkpoint(tmp_path / "adapter")
    assert ck.kind == "adapter" and ck.optimizer_state is None and ck.is_adapter
    info = ck.adapters["default"]
    assert (info.r, info.alpha, info.scaling) == (4, 8.0, 2.0)
    assert ck.tokenizer is not None and ck.tokenizer.convert_tokens_to_ids("t3") == 3
    assert set(_trainable(ck.model)) == set(_trainable(pm))
    for n, p in _trainable(pm).items():
        assert torch.equal(_trainable(ck.model)[n], p)
    json.dumps(ck.describe())


def test_describe_is_json(lora_run: Run) -> None:
    ck: Checkpoint = load_checkpoint(lora_run.ckpt, max_grad_norm=MAX_GRAD_NORM)
    d = json.loads(json.dumps(ck.describe()))
    assert d["kind"] == "trainer" and d["weights"] == "adapter" and d["global_step"] == STOP
    assert d["lr"] == pytest.approx(NEXT_LR) and d["max_grad_norm"] == MAX_GRAD_NORM
    assert d["adapters"]["default"]["scaling"] == 2.0
    assert d["optimizer"]["params"] == len(lora_run.snapshot.names) and d["optimizer"]["step_max"] == STOP


# ----------------------------------------------------------------------------------------- no unpickling
class _Tripwire:
    """Unpickling this creates ``marker``: proof that someone unpickled a file they must not."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_never_unpickles_training_args_or_rng(lora_run: Run, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = _copy(lora_run, tmp_path)
    marker = tmp_path / "UNPICKLED"
    for name in ("training_args.bin", "rng_state.pth", "scaler.pt"):
        (ckpt / name).write_bytes(pickle.dumps(_Tripwire(marker)))
    calls: list[tuple[str, Any]] = []
    real_load = torch.load

    def spy(f: Any, *args: Any, **kw: Any) -> Any:
        calls.append((Path(f).name if isinstance(f, str | Path) else repr(f), kw.get("weights_only")))
        return real_load(f, *args, **kw)

    monkeypatch.setattr(torch, "load", spy)
    ck = load_checkpoint(ckpt)
    assert ck.optimizer_state is not None
    assert not marker.exists()
    assert calls and all(w is True for _, w in calls), calls
    assert {n for n, _ in calls} <= {"optimizer.pt", "scheduler.pt"}, calls


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda(lora_run: Run) -> None:
    ck = load_checkpoint(lora_run.ckpt, device="cuda")
    assert ck.optimizer_state is not None
    assert all(t.is_cuda for t in ck.optimizer_state.exp_avg.values())
    theta = _trainable(ck.model)
    assert all(t.is_cuda for t in theta.values())
    delta, _ = adamw_step(theta, {n: torch.ones_like(t) for n, t in theta.items()}, ck.optimizer_state)
    assert all(d.is_cuda for d in delta.values())


def test_bfloat16_toy_reports_the_compute_dtype() -> None:
    """peft keeps LoRA adapters in float32 on a bfloat16 base model: θ is float32 but the logits (and
    the rounding noise of ΔH) are bfloat16, so that is the dtype a run must report (issue 9);
    ``max_grad_norm`` is described as given."""
    from deltaH.toy import toy_checkpoint_path

    ck = load_checkpoint(toy_checkpoint_path(), dtype=torch.bfloat16, max_grad_norm=1.0)
    lm = dh.FunctionalLM.from_model(ck.model)
    assert lm.dtype == torch.float32 and lm.compute_dtype == torch.bfloat16
    assert ck.describe()["dtype"] == "bfloat16" and ck.describe()["max_grad_norm"] == 1.0
    f32 = dh.FunctionalLM.from_model(load_checkpoint(toy_checkpoint_path(), optimizer=False).model)
    assert f32.compute_dtype == f32.dtype == torch.float32
