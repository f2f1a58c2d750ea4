"""Overhead of the training-time probe (``deltaH.integrations.DeltaHCallback``) per optimizer step.

The same short training run is timed without the probe and with it (``every=1``), on the embedded
toy when its artifact exists (``deltaH.toy``: the GRPO checkpoint's LoRA model, its tokenizer and
held-out prompts), else on a tiny Qwen2 + LoRA built in code. Two trainers:

* ``grpo``: TRL's ``GRPOTrainer`` with the :class:`~deltaH.integrations.trl.DeltaHGRPOMixin`
  (generation, rewards, loss: the realistic setting; needs ``trl``);
* ``plain``: ``transformers.Trainer`` with a causal-LM loss on the same prompts (a cheap step: the
  worst case for the ratio).

Per step, wall time from ``on_step_begin`` to ``on_step_end`` (the probe runs inside the step, at
the pre-optimizer hook); the first ``--warmup`` steps are dropped and the median is reported, with
the ratio ``with / without`` (and the ratio of the fastest steps, which other load on the
machine disturbs least). Probe variants: δH₁ only (reverse mode, the default), and δH₁ plus
the true ΔH every step (``true_every=1``). The one-off sampling of the evaluation batch at train
begin is reported separately.

Run: ``python -m benchmarks.bench_probe --out benchmarks/results/probe.json`` (``--quick`` for a
smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch
from transformers import TrainerCallback

from deltaH.integrations import DeltaHCallback


class StepTimer(TrainerCallback):
    """Per-step wall times (``on_step_begin`` → ``on_step_end``); list it after the probe."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._t = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


class TimedProbe(DeltaHCallback):
    """The probe, with the one-off ``on_train_begin`` (sampling E) timed."""

    begin_s = 0.0

    def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        super().on_train_begin(*args, **kwargs)
        self.begin_s = time.perf_counter() - t


def load_setup(force_tiny: bool) -> dict[str, Any]:
    """Model factory, tokenizer, prompts (questions) and answers, and a description."""
    import deltaH.toy as toy

    try:
        if force_tiny:
            raise FileNotFoundError("--tiny")
        ckpt_path = toy.toy_checkpoint_path()
        recs = toy.load_toy_prompts()
        cfg = toy.toy_config()

        def make() -> torch.nn.Module:
            return toy.load_toy().model

        tok = toy.build_tokenizer()
        return {"make": make, "tok": tok, "questions": [r.prompt for r in recs],
                "answers": [r.answer for r in recs], "max_new": int(cfg["max_new_tokens"]),
                "model": f"deltaH toy ({ckpt_path.name}: Qwen2 75k params + LoRA r=8, 16k trainable)"}
    except FileNotFoundError as e:
        from peft import LoraConfig, get_peft_model
        from transformers import Qwen2Config, Qwen2ForCausalLM

        tok = toy.build_tokenizer()
        problems = toy.all_problems(50)[:256]

        def make() -> torch.nn.Module:
            torch.manual_seed(0)
            c = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                            eos_token_id=tok.eos_token_id)
            c._attn_implementation = "eager"
            return get_peft_model(Qwen2ForCausalLM(c), LoraConfig(
                r=8, lora_alpha=16, lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))

        return {"make": make, "tok": tok, "questions": [p.question for p in problems],
                "answers": [p.answer for p in problems], "max_new": 8,
                "model": f"tiny Qwen2 + LoRA built in code (toy artifact unavailable: {e})"}


def _probe(setup: dict[str, Any], variant: str) -> TimedProbe:
    return TimedProbe(prompts=setup["questions"][:8], n_per_prompt=4, max_new_tokens=setup["max_new"],
                      every=1, true_every=1 if variant == "delta_h1+true" else None)


def run_grpo(setup: dict[str, Any], variant: str | None, steps: int, out: str) -> tuple[list[float], Any]:
    from datasets import Dataset
    from trl import GRPOConfig

    from deltaH.integrations.trl import DeltaHGRPOTrainer
    from deltaH.sampling.rewards import math_reward

    def reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
        return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    ds = Dataset.from_dict({"prompt": setup["questions"], "answer": setup["answers"]})
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                      num_generations=8, max_completion_length=setup["max_new"], max_steps=steps,
                      learning_rate=2e-3, bf16=False, report_to=[], use_cpu=True, logging_steps=1,
                      save_strategy="no", seed=0, disable_tqdm=True, gradient_checkpointing=False)
    timer = StepTimer()
    cbs = ([_probe(setup, variant)] if variant else []) + [timer]
    tr = DeltaHGRPOTrainer(model=setup["make"](), reward_funcs=reward, args=args, train_dataset=ds,
                           processing_class=setup["tok"], callbacks=cbs)
    tr.train()
    return timer.times, cbs[0] if variant else None


def run_plain(setup: dict[str, Any], variant: str | None, steps: int, out: str) -> tuple[list[float], Any]:
    from transformers import Trainer, TrainingArguments

    tok = setup["tok"]
    texts = [q + a for q, a in zip(setup["questions"], setup["answers"], strict=True)]
    enc = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(len(e) for e in enc)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(enc)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.full((width,), tok.pad_token_id)
            ids[: len(enc[i])] = torch.tensor(enc[i])
            am = (torch.arange(width) < len(enc[i])).long()
            return {"input_ids": ids, "attention_mask": am, "labels": ids.masked_fill(am == 0, -100)}

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                             max_steps=steps, learning_rate=2e-3, max_grad_norm=1.0, report_to=[],
                             use_cpu=True, bf16=False, seed=0, logging_steps=1, save_strategy="no",
                             disable_tqdm=True)
    timer = StepTimer()
    cbs = ([_probe(setup, variant)] if variant else []) + [timer]
    tr = Trainer(model=setup["make"](), args=args, train_dataset=Rows(), processing_class=tok, callbacks=cbs)
    tr.train()
    return timer.times, cbs[0] if variant else None


def bench(trainer: str, setup: dict[str, Any], steps: int, warmup: int, repeats: int,
          out: str) -> dict[str, Any]:
    fn = run_grpo if trainer == "grpo" else run_plain
    times: dict[str, list[float]] = {"none": [], "delta_h1": [], "delta_h1+true": []}
    probe_s: dict[str, list[float]] = {"delta_h1": [], "delta_h1+true": []}
    begin_s: list[float] = []
    n_eval = 0
    for _ in range(repeats):  # interleaved, so drifting machine load hits every variant alike
        for variant in times:
            t, cb = fn(setup, None if variant == "none" else variant, steps, out)
            times[variant] += t[warmup:]
            if cb is not None:
                probe_s[variant] += [r.time_s for r in cb.history[warmup:]]
                begin_s.append(cb.begin_s)
                n_eval = len(cb.eval_batch)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}  # least disturbed by other load on the machine
    return {
        "trainer": trainer,
        "step_s_median": med,
        "step_s_min": low,
        "ratio_of_minima": {k: low[k] / low["none"] for k in probe_s},
        "step_s_all": times,
        "probe_time_s_median": {k: statistics.median(v) for k, v in probe_s.items()},
        "ratio_with_over_without": {k: med[k] / med["none"] for k in probe_s},
        "train_begin_sampling_s_median": statistics.median(begin_s),
        "eval_batch_sequences": n_eval,
        "steps_timed_per_run": steps - warmup,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/probe.json")
    ap.add_argument("--trainer", choices=["grpo", "plain", "both"], default="both")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="use a tiny Qwen2 built in code, not the toy")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the toy is tiny: 1 is best)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run (3 steps, 1 repeat), not figures to report")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    steps, warmup, repeats = (3, 1, 1) if args.quick else (args.steps, args.warmup, args.repeats)
    torch.set_num_threads(args.threads)
    setup = load_setup(args.tiny)
    res: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_1m_at_start": os.getloadavg()[0]},
        "model": setup["model"],
        "settings": {"every": 1, "mode": "reverse", "eval_prompts": 8, "n_per_prompt": 4,
                     "max_new_tokens": setup["max_new"], "update_sequences_per_step": 64,
                     "gradient_accumulation_steps": 4},
        "results": [],
    }
    kinds = ["grpo", "plain"] if args.trainer == "both" else [args.trainer]
    for kind in kinds:
        with tempfile.TemporaryDirectory() as tmp:
            r = bench(kind, setup, steps, warmup, repeats, tmp)
        res["results"].append(r)
        shown = ("trainer", "step_s_median", "ratio_with_over_without", "step_s_min", "ratio_of_minima",
                 "probe_time_s_median", "train_begin_sampling_s_median")
        print(json.dumps({k: r[k] for k in shown}, indent=2), flush=True)
    res["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
