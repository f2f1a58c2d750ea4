"""Replaying a training run's steps on the toy: the time per step, beside the training step itself.

A ``DeltaHGRPOTrainer`` run on the embedded toy (its base model + LoRA r = 4, 8 sequences per step,
the shipped recording on, checkpoints with the optimizer every step) is trained once; then, in the
same process:

* ``train_step``: the trainer's median wall time per optimizer step (generation included);
* ``replay_step``: ``dh.replay_step(checkpoint-k)`` per step — loading checkpoint k (and k+1 for the
  step error), the trainer's objective, per-sequence gradients, the AdamW decomposition — median
  over the steps, and its parts: ``load`` (the two checkpoints) and ``directions``
  (:func:`deltaH.updates.replay.replay_directions` alone);
* ``run_per_checkpoint``: ``deltah run`` on the run's checkpoints (recorded U, realised step, the
  default analyses at a small evaluation batch), seconds per checkpoint;
* the replay error of every replayed step (float32, LoRA).

Run: ``python -m benchmarks.bench_replay --out benchmarks/results/replay.json`` (``--quick``: fewer steps).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_topp import cpu_model as _cpu_model


def _train(out: Path, steps: int) -> list[float]:
    """Train the toy with DeltaHGRPOTrainer; returns the wall time of each optimizer step."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig

    from deltaH.integrations.trl import DeltaHGRPOTrainer
    from deltaH.sampling.rewards import math_reward
    from deltaH.toy import load_toy_prompts, toy_checkpoint_path

    base = toy_checkpoint_path().parent / "base"
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    )
    recs = load_toy_prompts()
    ds = Dataset.from_dict({"prompt": [r.prompt for r in recs], "answer": [r.answer for r in recs]})

    def reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
        return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    times: list[float] = []

    class Timer(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        max_steps=steps,
        learning_rate=2e-3,
        bf16=False,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_only_model=False,
        seed=0,
        disable_tqdm=True,
    )
    DeltaHGRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Timer()],
    ).train()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/replay.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    import deltaH as dh
    import deltaH.runner as runner
    from deltaH.config import load_config
    from deltaH.functional import FunctionalLM
    from deltaH.io.steps import read_step
    from deltaH.updates.replay import replay_directions

    steps = 3 if args.quick else 6
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train = _train(out, steps)
        rows = []
        for k in range(1, steps):
            ck = out / f"checkpoint-{k}"
            t0 = time.perf_counter()
            rep = dh.replay_step(ck)
            total = time.perf_counter() - t0
            lm = FunctionalLM.from_model(rep.checkpoint.model)
            recs = read_step(out / "deltah-steps", k + 1)
            t1 = time.perf_counter()
            replay_directions(lm, lm.params, recs, rep.checkpoint.optimizer_state)
            dirs = time.perf_counter() - t1
            rows.append(
                {
                    "step": k + 1,
                    "replay_step_s": total,
                    "directions_s": dirs,
                    "n_sequences": len(rep.batch),
                    "step_error": rep.step_error,
                }
            )
        cfg = load_config(
            None,
            [f"checkpoint.path={out}/checkpoint-*", "eval_batch.total_sequences=64", "output.plots=false"],
        )
        t0 = time.perf_counter()
        runner.run(cfg, out=Path(tmp) / "study", quiet=True)
        run_s = time.perf_counter() - t0
    res = {
        "machine": {
            "cpu": _cpu_model(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "gpu": None,
            "torch": torch.__version__,
        },
        "model": "deltaH toy base (Qwen2, 75k params) + LoRA r=4 on q/v/up, float32; 8 sequences per step",
        "train_step_s_median": statistics.median(train[1:]),
        "replay_step_s_median": statistics.median(r["replay_step_s"] for r in rows),
        "replay_directions_s_median": statistics.median(r["directions_s"] for r in rows),
        "run_s_per_checkpoint": run_s / steps,
        "max_step_error": max(r["step_error"] for r in rows),
        "steps": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "steps"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
