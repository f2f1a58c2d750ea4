"""Real ``trl.GRPOTrainer`` runs on the embedded toy (tiny Qwen2, character tokenizer, arithmetic).

:func:`grpo_run` trains ``DeltaHGRPOTrainer`` (which records every step to ``<out>/deltah-steps``)
with ``save_steps=1`` and the optimizer saved, so every ``checkpoint-k`` can replay step ``k+1``.
The base model is the toy's (``deltaH/toy/artifacts/base``), float32, LoRA or full fine-tuning,
offline on CPU (``bf16=False``, ``use_cpu=True``). A run of 3 steps takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltaH.toy import toy_prompts_path

TOY_BASE = Path(__file__).resolve().parents[1] / "deltaH" / "toy" / "artifacts" / "base"


def toy_reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
    """1 for the right final number, else 0 (deltaH's built-in math reward), plus nothing else."""
    from deltaH.sampling.rewards import math_reward

    return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]


def toy_dataset(n: int = 64) -> Any:
    from datasets import Dataset

    rows = [json.loads(line) for line in toy_prompts_path().read_text().splitlines()[:n]]
    return Dataset.from_dict({"prompt": [r["question"] for r in rows], "answer": [r["answer"] for r in rows]})


def grpo_run(out: Path, *, lora: bool = True, steps: int = 3, seed: int = 0, **grpo: Any) -> Path:
    """Train and return the output folder (``checkpoint-1..steps``, ``deltah-steps/``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig

    from deltaH.integrations.trl import DeltaHGRPOTrainer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(TOY_BASE)
    model = AutoModelForCausalLM.from_pretrained(TOY_BASE, dtype=torch.float32, attn_implementation="eager")
    if lora:
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj", "up_proj"]))
    kw: dict[str, Any] = dict(
        output_dir=str(out), per_device_train_batch_size=8, num_generations=4, max_completion_length=8,
        max_steps=steps, learning_rate=2e-3, bf16=False, report_to=[], use_cpu=True, logging_steps=1,
        save_strategy="steps", save_steps=1, save_only_model=False, seed=seed, disable_tqdm=True,
        max_prompt_length=None,
    )
    kw.update(grpo)
    if "max_prompt_length" in kw and kw["max_prompt_length"] is None:
        kw.pop("max_prompt_length")
    args = GRPOConfig(**kw)
    tr = DeltaHGRPOTrainer(model=model, reward_funcs=toy_reward, args=args, train_dataset=toy_dataset(),
                           processing_class=tok)
    tr.train()
    return out
