"""Make the embedded toy: a tiny Qwen2 trained in-repo, saved as a real Trainer checkpoint.

    python -m deltaH.toy.make_toy --out deltaH/toy/artifacts [--overwrite]

Stages (all randomness from fixed seeds; one CPU thread, so two runs on one machine and torch
build give byte-identical files):

1. **Warm-up (SFT).** A ``Qwen2ForCausalLM`` (float32, eager attention, tied embeddings) learns
   ``"12+7=" → "19<eos>"`` (cross-entropy on the answer and EOS) with plain AdamW, stopped early
   on purpose so that sampling at temperature 1 is right about half the time. Saved to ``base/``.
2. **Prompt screening.** Each of ``pool_size`` training prompts gets ``screen_samples`` responses;
   GRPO keeps those whose pass rate is inside ``pass_band`` (offline difficulty filtering, so that
   update groups have mixed rewards).
3. **GRPO.** A peft LoRA adapter and ``torch.optim.AdamW`` built exactly as
   ``transformers.Trainer.create_optimizer`` builds it (decay group, then no-decay group; fused,
   as ``adamw_torch_fused``, the default on torch >= 2.8), a linear schedule with warm-up
   (``get_linear_schedule_with_warmup``), and ``grpo_steps`` on-policy steps, each::

       U   = build_update_batch(reward "math", n_prompts × group_size)      (TRL's advantages)
       L   = Σ_i coef_i · S_i      coef = loss_coefficients(loss_type="dapo"), S = logprob_sums
       L.backward(); clip_grad_norm_(max_grad_norm); optimizer.step(); scheduler.step(); zero_grad()

   (the HF Trainer's order). The schedule is planned for ``max_steps`` and the checkpoint is saved
   at ``grpo_steps``, mid-run, so its param groups hold the non-zero lr of the *next* step.
4. **Save** ``checkpoint-N/`` in the Trainer layout: ``adapter_model.safetensors`` and
   ``adapter_config.json`` (peft ``save_pretrained``; ``base_model_name_or_path = "../base"``),
   ``optimizer.pt``, ``scheduler.pt``, ``trainer_state.json``, the tokenizer files, and
   ``deltah_toy.json`` (every hyper-parameter; it replaces the pickled ``training_args.bin``,
   which deltaH never reads). No pickles are written.
5. **Held-out prompts.** ``n_heldout`` problems never seen in training are scored at the
   checkpoint (``heldout_samples`` responses each); those inside ``pass_band`` go to
   ``prompts.jsonl`` (fields ``id``, ``question``, ``answer``, ``pass_rate``) for E/U batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from deltaH.errors import ArgumentError, OutputExistsError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy
from deltaH.sampling.builders import ScaleRewards, UpdateBatch, build_update_batch
from deltaH.sampling.data import PromptRecord
from deltaH.sampling.rewards import load_reward_fn, math_rewards
from deltaH.sampling.sampler import sample
from deltaH.toy.task import Problem, records, split_problems, write_prompts
from deltaH.toy.tokenizer import build_tokenizer
from deltaH.updates.grads import logprob_sums
from deltaH.updates.losses import loss_coefficients

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# transformers.Trainer.get_decay_parameter_names (trainer.py, transformers 5.x): no weight decay for
# LayerNorm modules and for names matching these patterns (lower-cased).
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
CONFIG_FILE = "deltah_toy.json"


@dataclass(frozen=True)
class ToyConfig:
    """Every setting of the toy; saved to ``checkpoint-N/deltah_toy.json``."""

    seed: int = field(default=0, metadata={"help": "master seed; each stage derives its own"})
    max_operand: int = field(default=50, metadata={"help": "operands are drawn from [0, max_operand)"})
    n_heldout: int = field(default=256, metadata={"help": "problems held out of training (prompts.jsonl)"})
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = True
    sft_steps: int = field(default=1800, metadata={"help": "warm-up steps (few on purpose: ~40% right)"})
    sft_batch_size: int = 128
    sft_lr: float = 5e-3
    sft_warmup_steps: int = 50
    pool_size: int = field(default=256, metadata={"help": "training prompts screened for GRPO"})
    screen_samples: int = field(default=16, metadata={"help": "responses per prompt when screening"})
    heldout_samples: int = field(default=32, metadata={"help": "responses per held-out prompt"})
    pass_band: tuple[float, float] = field(
        default=(0.2, 0.8), metadata={"help": "keep prompts whose pass rate lies in [lo, hi]"}
    )
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    grpo_steps: int = field(default=5, metadata={"help": "optimizer steps taken (the checkpoint's N)"})
    max_steps: int = field(default=10, metadata={"help": "length the lr schedule is planned for"})
    learning_rate: float = 2e-3
    warmup_steps: int = 2
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    n_prompts: int = field(default=8, metadata={"help": "prompts per GRPO batch (B_U)"})
    group_size: int = field(default=8, metadata={"help": "responses per prompt (G)"})
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "dapo"
    scale_rewards: ScaleRewards = "group"
    reward: str = "math"

    def __post_init__(self) -> None:
        if not 0 < self.grpo_steps <= self.max_steps:
            raise ArgumentError(f"grpo_steps={self.grpo_steps} must be in [1, max_steps={self.max_steps}]")
        lo, hi = self.pass_band
        if not 0 <= lo <= hi <= 1:
            raise ArgumentError(f"pass_band={self.pass_band} must satisfy 0 <= lo <= hi <= 1")


# -- helpers ---------------------------------------------------------------------------------
@contextmanager
def _one_thread() -> Iterator[None]:
    """Run single-threaded: CPU reductions then do not depend on the machine's core count."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _policy(cfg: ToyConfig) -> SamplingPolicy:
    return SamplingPolicy(temperature=cfg.temperature, top_p=cfg.top_p)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def new_model(cfg: ToyConfig, vocab_size: int, eos_id: int, pad_id: int) -> PreTrainedModel:
    """A freshly initialised float32 ``Qwen2ForCausalLM`` (eager attention), seeded by ``cfg.seed``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=64,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(cfg.seed)
    return Qwen2ForCausalLM(config).float()


def load_base(path: Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# -- stage 1: warm-up ------------------------------------------------------------------------
def _sft_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``ids, attention_mask, labels [n, T]``; labels are -100 except answer + EOS."""
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, (p, a) in enumerate(examples):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(a)
    return ids, mask, labels


def warm_up(cfg: ToyConfig, tokenizer: Any, train: Sequence[Problem]) -> tuple[PreTrainedModel, list[float]]:
    """Supervised warm-up on ``prompt answer<eos>``; returns the model (eval mode) and the loss curve."""
    from transformers import get_linear_schedule_with_warmup

    eos, pad = int(tokenizer.eos_token_id), int(tokenizer.pad_token_id)
    model = new_model(cfg, len(tokenizer), eos, pad)
    enc = [
        (tokenizer.encode(p.prompt, add_special_tokens=False),
         tokenizer.encode(p.answer, add_special_tokens=False) + [eos])
        for p in train
    ]
    rng = random.Random(cfg.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, cfg.sft_warmup_steps, max(cfg.sft_steps, 1))
    model.train()
    losses = []
    for step in range(cfg.sft_steps):
        ids, mask, labels = _sft_batch([enc[rng.randrange(len(enc))] for _ in range(cfg.sft_batch_size)], pad)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
        if step % 200 == 0 or step == cfg.sft_steps - 1:
            logger.info("warm-up step %d/%d: loss %.4f", step + 1, cfg.sft_steps, losses[-1])
    return model.eval(), losses


# -- stage 2 and 5: pass rates ----------------------------------------------------------------
def pass_rates(
    lm: FunctionalLM,
    params: dict[str, Tensor],
    recs: Sequence[PromptRecord],
    tokenizer: Any,
    cfg: ToyConfig,
    *,
    n_samples: int,
    seed: int,
) -> list[float]:
    """Fraction of ``n_samples`` responses per record (drawn from ``q``) that the math reward accepts."""
    prompts = [tokenizer.encode(r.prompt, add_special_tokens=False) for r in recs]
    batch = sample(lm, params, prompts, policy=_policy(cfg), max_new_tokens=cfg.max_new_tokens,
                   n_per_prompt=n_samples, eos_token_id=int(tokenizer.eos_token_id),
                   pad_token_id=int(tokenizer.pad_token_id), generator=torch.Generator().manual_seed(seed))
    resp = [ids[m].tolist() for ids, m in zip(batch.input_ids, batch.response_mask, strict=True)]
    texts = tokenizer.batch_decode(resp, skip_special_tokens=True)
    rew = math_rewards(texts, [r for r in recs for _ in range(n_samples)])
    return [sum(rew[i * n_samples : (i + 1) * n_samples]) / n_samples for i in range(len(recs))]


def _in_band(rate: float, band: tuple[float, float]) -> bool:
    return band[0] <= rate <= band[1]


# -- stage 3: GRPO ---------------------------------------------------------------------------
def trainer_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """``Trainer.create_optimizer``'s groups: decay parameters, then the rest (trainable ones only)."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay = set(get_parameter_names(model, [nn.LayerNorm], list(NO_DECAY_PATTERNS)))
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n in decay and p.requires_grad], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n not in decay and p.requires_grad], "weight_decay": 0.0},
    ]


def _update_batch(lm: FunctionalLM, pool: Sequence[PromptRecord], tokenizer: Any, cfg: ToyConfig,
                  seed: int) -> UpdateBatch:
    """``build_update_batch`` at the current parameters; a batch with a flat group is drawn again
    with the next seed (deterministic), since TRL would keep it but the builder refuses it."""
    params = {n: p.detach() for n, p in _trainable(lm.model).items()}
    for attempt in range(8):
        try:
            return build_update_batch(
                lm, params, pool, tokenizer, load_reward_fn(cfg.reward), policy=_policy(cfg),
                n_prompts=cfg.n_prompts, group_size=cfg.group_size, max_new_tokens=cfg.max_new_tokens,
                seed=seed + 7919 * attempt, scale_rewards=cfg.scale_rewards,
            )
        except ValueError as e:
            if "identical rewards" not in str(e):
                raise
            logger.info("U (seed %d) has a flat group; drawing another batch", seed + 7919 * attempt)
    raise RuntimeError("8 update batches in a row had groups with identical rewards; widen pass_band")


def grpo(
    cfg: ToyConfig, base: PreTrainedModel, tokenizer: Any, pool: Sequence[PromptRecord]
) -> dict[str, Any]:
    """LoRA + Trainer-built fused AdamW + linear warm-up schedule; ``cfg.grpo_steps`` GRPO steps.

    Returns ``model`` (peft, eval mode), ``optimizer``, ``scheduler`` and the ``log_history``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(cfg.seed + 2)  # LoRA A init (B starts at zero)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(base, lora).eval()  # no dropout anywhere: eval() == train() here
    lm = FunctionalLM.from_model(model)
    optimizer = torch.optim.AdamW(
        trainer_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon, fused=True,
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    log: list[dict[str, Any]] = []
    for step in range(cfg.grpo_steps):
        u = _update_batch(lm, pool, tokenizer, cfg, seed=cfg.seed + 100 + step)
        params = _trainable(model)
        n_tok = u.batch.n_tokens
        coef = loss_coefficients(n_tok, u.advantages, loss_type=cfg.loss_type,
                                 max_completion_length=cfg.max_new_tokens)
        loss = (coef * logprob_sums(lm, params, u.batch, temperature=cfg.temperature)).sum()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        log.append({
            # TRL logs the on-policy surrogate's value (ratio 1): Σ_i coef_i·|o_i|
            "loss": float((coef * n_tok.double()).sum()) + 0.0,
            "grad_norm": float(grad_norm),
            "learning_rate": float(scheduler.get_last_lr()[0]),
            "reward": float(u.rewards.mean()),
            "reward_std": float(u.rewards.std()),
            "completions/mean_length": float(n_tok.double().mean()),
            "epoch": round((step + 1) * cfg.n_prompts / len(pool), 4),
            "step": step + 1,
        })
        logger.info("GRPO step %d/%d: reward %.3f, grad_norm %.4f, next lr %.3g", step + 1, cfg.grpo_steps,
                    log[-1]["reward"], log[-1]["grad_norm"], log[-1]["learning_rate"])
    return {"model": model, "lm": lm, "optimizer": optimizer, "scheduler": scheduler, "log_history": log}


# -- stage 4: save ---------------------------------------------------------------------------
def save_checkpoint(path: Path, cfg: ToyConfig, run: dict[str, Any], tokenizer: Any, pool_size: int) -> None:
    """Write ``run`` in the HF Trainer's ``checkpoint-N`` layout (no pickles; see module doc)."""
    from transformers import TrainerState

    model = run["model"]
    path.mkdir(parents=True)
    model.peft_config["default"].base_model_name_or_path = "../base"
    model.save_pretrained(path, save_embedding_layers=False)
    (path / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card (absolute paths)
    cfg_file = path / "adapter_config.json"  # peft writes target_modules from a set: fix the order
    adapter_cfg = json.loads(cfg_file.read_text())
    adapter_cfg["target_modules"] = sorted(adapter_cfg["target_modules"])
    cfg_file.write_text(json.dumps(adapter_cfg, indent=2, sort_keys=True))
    tokenizer.save_pretrained(path)
    torch.save(run["optimizer"].state_dict(), path / "optimizer.pt")
    torch.save(run["scheduler"].state_dict(), path / "scheduler.pt")
    state = TrainerState(
        epoch=run["log_history"][-1]["epoch"], global_step=cfg.grpo_steps, max_steps=cfg.max_steps,
        logging_steps=1, save_steps=cfg.grpo_steps, train_batch_size=cfg.n_prompts * cfg.group_size,
        num_train_epochs=1, log_history=run["log_history"],
    )
    state.save_to_json(str(path / "trainer_state.json"))
    import peft
    import transformers

    info = {
        "config": dataclasses.asdict(cfg),
        "optimizer": "torch.optim.AdamW(fused=True) over Trainer.create_optimizer's groups",
        "lr_scheduler": "transformers.get_linear_schedule_with_warmup",
        "max_grad_norm": cfg.max_grad_norm,
        "grpo_pool_size": pool_size,
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }
    (path / CONFIG_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _readme(cfg: ToyConfig, summary: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {e['step']} | {e['reward']:.3f} | {e['loss']:+.4f} | {e['grad_norm']:.4f} "
        f"| {e['learning_rate']:.3g} |"
        for e in summary["log_history"]
    )
    ck = summary["checkpoint"]
    return f"""# deltaH toy artifact

Made by `python -m deltaH.toy.make_toy --out deltaH/toy/artifacts` (deterministic: fixed seeds,
one CPU thread; a re-run on the same machine and torch build gives byte-identical files).
Every setting is in `{ck}/{CONFIG_FILE}`.

* **Task.** `a+b=` and `a-b=` with `0 <= a, b < {cfg.max_operand}`, graded by the `"math"` reward
  (the last number of the completion). {cfg.n_heldout} problems are held out of all training.
* **Tokenizer.** Character level (`tokenizer.json`): `<pad>`, `<eos>`, `<unk>`, the digits,
  `+ - =` and space; no BOS, no chat template; prompts are encoded without special tokens.
* **Model (`base/`).** `Qwen2ForCausalLM`, float32, eager attention, tied embeddings; \
hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads \
({cfg.num_key_value_heads} KV heads), MLP {cfg.intermediate_size}; {summary['n_params']:,} parameters.
  Supervised warm-up: {cfg.sft_steps} AdamW steps of {cfg.sft_batch_size} examples \
(final loss {summary['sft_final_loss']:.4f}), stopped early on purpose.
* **GRPO (`{ck}/`).** peft LoRA r={cfg.lora_r}, alpha={cfg.lora_alpha}, dropout {cfg.lora_dropout} \
on q/k/v/o/gate/up/down ({summary['n_lora_params']:,} parameters).
  `torch.optim.AdamW(fused=True)` grouped like `Trainer.create_optimizer` (decay group, then \
no-decay group): lr {cfg.learning_rate}, betas ({cfg.adam_beta1}, {cfg.adam_beta2}), \
eps {cfg.adam_epsilon}, weight decay {cfg.weight_decay}.
  Linear schedule, {cfg.warmup_steps} warm-up steps, planned for {cfg.max_steps} steps (the \
first step runs at lr 0, as the Trainer's warm-up does); `clip_grad_norm_({cfg.max_grad_norm})`.
  Each step: U = {cfg.n_prompts} prompts × {cfg.group_size} responses (temperature \
{cfg.temperature}, top-p {cfg.top_p}, at most {cfg.max_new_tokens} new tokens) from the \
{summary['pool_size']} screened training prompts; `{cfg.loss_type}` loss, \
`scale_rewards="{cfg.scale_rewards}"`.
  Saved after step {cfg.grpo_steps}, so the optimizer's lr ({summary['next_lr']:.6g}) is the lr \
of step {cfg.grpo_steps + 1}.

| step | mean reward of U | loss | grad norm (before clipping) | lr after the step |
| --- | --- | --- | --- | --- |
{rows}

* **Prompts (`prompts.jsonl`).** The held-out problems whose pass rate at the checkpoint \
({cfg.heldout_samples} samples each) lies in [{cfg.pass_band[0]}, {cfg.pass_band[1]}]: \
{summary['n_prompts_kept']} of {cfg.n_heldout}. Mean pass rate over all held-out problems \
{summary['heldout_mean_reward']:.3f}, over the kept ones {summary['kept_mean_reward']:.3f}.
  Fields `id`, `question`, `answer`, `pass_rate`; load with `deltaH.sampling.load_prompts`.

Load with `deltaH.toy.load_toy()` (`deltaH.io.load_checkpoint` on `{ck}/`).
"""


# -- the whole pipeline ----------------------------------------------------------------------
_OUTPUTS = ("base", "prompts.jsonl", "README.md")


def _prepare(out: Path, overwrite: bool) -> None:
    existing = [p for p in out.iterdir() if p.name in _OUTPUTS or p.name.startswith("checkpoint-")] \
        if out.is_dir() else []
    if existing and not overwrite:
        raise OutputExistsError(
            f"{out} already holds toy outputs ({sorted(p.name for p in existing)}); pass --overwrite "
            "(overwrite=True) to replace them, or choose another --out"
        )
    for p in existing:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def make_toy(
    out: str | os.PathLike[str],
    cfg: ToyConfig | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run every stage into ``out`` and return a summary (rewards, sizes, timings).

    ``base``: a ``base/`` folder made earlier; the warm-up is skipped and that model is used (and
    re-saved to ``out/base``). Refuses to replace earlier outputs unless ``overwrite``.
    """
    cfg = cfg or ToyConfig()
    out = Path(out)
    if base is not None and Path(base).resolve() == (out / "base").resolve():
        raise ArgumentError(f"base={base} is the folder this run writes; copy it elsewhere first")
    _prepare(out, overwrite)
    t0 = time.perf_counter()
    with _one_thread():
        tokenizer = build_tokenizer()
        train, heldout = split_problems(seed=cfg.seed, max_operand=cfg.max_operand, n_heldout=cfg.n_heldout)
        if base is None:
            model, losses = warm_up(cfg, tokenizer, train)
        else:
            model, losses = load_base(Path(base)), []
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(out / "base")
        tokenizer.save_pretrained(out / "base")
        t_sft = time.perf_counter() - t0
        base_model = load_base(out / "base")  # train on exactly what the checkpoint points at
        n_params = sum(p.numel() for p in base_model.parameters())

        lm0 = FunctionalLM.from_model(base_model)
        candidates = records(train[: cfg.pool_size], prefix="train")
        rates = pass_rates(lm0, lm0.params, candidates, tokenizer, cfg, n_samples=cfg.screen_samples,
                           seed=cfg.seed + 3)
        pool = [r for r, q in zip(candidates, rates, strict=True) if _in_band(q, cfg.pass_band)]
        if len(pool) < cfg.n_prompts:
            raise RuntimeError(
                f"only {len(pool)} of {len(candidates)} screened prompts have a pass rate in "
                f"{cfg.pass_band}; train the warm-up longer or shorter, or raise pool_size"
            )
        logger.info("screening: %d of %d training prompts in %s (mean pass rate %.3f)", len(pool),
                    len(candidates), cfg.pass_band, sum(rates) / len(rates))

        run = grpo(cfg, base_model, tokenizer, pool)
        ckpt = out / f"checkpoint-{cfg.grpo_steps}"
        save_checkpoint(ckpt, cfg, run, tokenizer, len(pool))
        t_grpo = time.perf_counter() - t0 - t_sft

        lm = run["lm"]
        params = {n: p.detach() for n, p in _trainable(run["model"]).items()}
        held = records(heldout, prefix="heldout")
        rates = pass_rates(lm, params, held, tokenizer, cfg, n_samples=cfg.heldout_samples, seed=cfg.seed + 4)
        keep = [i for i, q in enumerate(rates) if _in_band(q, cfg.pass_band)]
        write_prompts(out / "prompts.jsonl", [heldout[i] for i in keep],
                      [{"pass_rate": rates[i]} for i in keep])

    summary: dict[str, Any] = {
        "checkpoint": ckpt.name,
        "n_params": n_params,
        "n_lora_params": sum(p.numel() for p in params.values()),
        "sft_final_loss": losses[-1] if losses else float("nan"),
        "pool_size": len(pool),
        "log_history": run["log_history"],
        "next_lr": run["optimizer"].param_groups[0]["lr"],
        "heldout_mean_reward": sum(rates) / len(rates),
        "kept_mean_reward": sum(rates[i] for i in keep) / max(len(keep), 1),
        "n_prompts_kept": len(keep),
    }
    (out / "README.md").write_text(_readme(cfg, summary))
    summary.update(
        seconds={"warm_up": t_sft, "grpo": t_grpo, "total": time.perf_counter() - t0},
        size_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltaH.toy.make_toy", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (e.g. deltaH/toy/artifacts)")
    ap.add_argument("--base", default=None, help="reuse this base/ folder and skip the warm-up")
    ap.add_argument("--overwrite", action="store_true", help="replace earlier toy outputs in --out")
    ap.add_argument("--sft-steps", type=int, default=None, help="override ToyConfig.sft_steps")
    ap.add_argument("--grpo-steps", type=int, default=None, help="override ToyConfig.grpo_steps")
    ap.add_argument("--quiet", action="store_true", help="log warnings only")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    over = {k: v for k in ("sft_steps", "grpo_steps") if (v := getattr(args, k)) is not None}
    summary = make_toy(args.out, ToyConfig(**over), base=args.base, overwrite=args.overwrite)
    rewards = [round(e["reward"], 3) for e in summary["log_history"]]
    print(
        f"wrote {args.out}: {summary['size_bytes'] / 1e6:.2f} MB, {summary['n_params']:,} base parameters, "
        f"{summary['n_lora_params']:,} LoRA parameters; U rewards per step {rewards}; held-out pass rate "
        f"{summary['heldout_mean_reward']:.3f}, {summary['n_prompts_kept']} prompts kept; "
        f"{summary['seconds']['total']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
