"""Overhead of recording every optimizer step to disk (``deltaH.integrations`` trainer mixins).

The same short TRL ``GRPOTrainer`` run (the embedded toy when its artifact exists, else a tiny
Qwen2 + LoRA built in code; :func:`benchmarks.bench_probe.load_setup`) is timed three ways,
interleaved in one process so that drifting machine load hits every variant alike:

* ``trl``: plain ``trl.GRPOTrainer``;
* ``mixin_off``: ``DeltaHGRPOTrainer(deltah_record_steps=False)`` (the in-memory recorder only);
* ``recording``: ``DeltaHGRPOTrainer`` as shipped (writes ``deltah-steps/step-<N>.*`` each step).

Per step, wall time from ``on_step_begin`` to ``on_step_end`` *after* the step file is written (the
timer is the last callback); the first ``--warmup`` steps are dropped and the median is reported,
with the ratio to ``trl`` (and the ratio of the fastest steps, which other load disturbs least).
On a shared machine those ratios are noisy for a step this short, so the writer's own time (its
``on_step_end``: copy to CPU, write, fsync, sidecar) is also timed inside the step and reported as
a fraction of the ``trl`` step. Also: bytes per step on disk (``.safetensors`` + sidecar), and
``write_step`` / ``read_step`` of one recorded step timed on their own.

Run: ``python -m benchmarks.bench_recording --out benchmarks/results/recording.json`` (``--quick``
for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_probe import StepTimer, load_setup
from benchmarks.bench_topp import cpu_model as _cpu_model

VARIANTS = ("trl", "mixin_off", "recording")




def _time_writer(tr: Any) -> list[float]:
    """Wrap the mixin's step writer so that its ``on_step_end`` (the whole recording cost) is timed."""
    from deltaH.integrations.recording import _StepWriter

    (writer,) = [cb for cb in tr.callback_handler.callbacks if isinstance(cb, _StepWriter)]
    spent: list[float] = []
    inner = writer.on_step_end

    def timed(*a: Any, **kw: Any) -> None:
        t = time.perf_counter()
        inner(*a, **kw)
        spent.append(time.perf_counter() - t)

    writer.on_step_end = timed  # type: ignore[method-assign]
    return spent


def run_grpo(setup: dict[str, Any], variant: str, steps: int, out: str) -> tuple[list[float], list[float]]:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from deltaH.integrations.trl import DeltaHGRPOTrainer
    from deltaH.sampling.rewards import math_reward

    def reward(completions: list[str], answer: list[str], **kw: Any) -> list[float]:
        return [math_reward(c, a) for c, a in zip(completions, answer, strict=True)]

    ds = Dataset.from_dict({"prompt": setup["questions"], "answer": setup["answers"]})
    args = GRPOConfig(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=4,
                      num_generations=8, max_completion_length=setup["max_new"], max_steps=steps,
                      learning_rate=2e-3, bf16=False, report_to=[], use_cpu=True, logging_steps=1,
                      save_strategy="no", seed=0, disable_tqdm=True, gradient_checkpointing=False)
    kw: dict[str, Any] = dict(model=setup["make"](), reward_funcs=reward, args=args, train_dataset=ds,
                              processing_class=setup["tok"])
    if variant == "trl":
        tr = GRPOTrainer(**kw)
    else:
        tr = DeltaHGRPOTrainer(**kw, deltah_record_steps=variant == "recording")
    writer_s = _time_writer(tr) if variant == "recording" else []
    timer = StepTimer()
    tr.add_callback(timer)  # after the mixin's step writer: the time includes writing the step file
    tr.train()
    return timer.times, writer_s


def bytes_per_step(steps_dir: Path) -> list[int]:
    from deltaH.io.steps import list_steps

    return [sum((steps_dir / f"step-{s}.{ext}").stat().st_size for ext in ("safetensors", "json"))
            for s in list_steps(steps_dir)]


def io_times(steps_dir: Path, repeats: int) -> dict[str, float]:
    """``write_step`` (fsync included) and ``read_step`` (every check included) of one recorded step."""
    from deltaH.io.steps import list_steps, read_step, write_step

    (rec,) = read_step(steps_dir, list_steps(steps_dir)[-1])
    w, r = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            rec.step = i + 1
            t = time.perf_counter()
            write_step(tmp, rec)
            w.append(time.perf_counter() - t)
            t = time.perf_counter()
            read_step(tmp, i + 1)
            r.append(time.perf_counter() - t)
    return {"write_step_s_median": statistics.median(w), "read_step_s_median": statistics.median(r)}


def bench(setup: dict[str, Any], steps: int, warmup: int, repeats: int) -> dict[str, Any]:
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    writer_s: list[float] = []
    sizes: list[int] = []
    io: dict[str, float] = {}
    for _ in range(repeats):
        for variant in VARIANTS:
            with tempfile.TemporaryDirectory() as out:
                t, w = run_grpo(setup, variant, steps, out)
                times[variant] += t[warmup:]
                writer_s += w[warmup:]
                steps_dir = Path(out) / "deltah-steps"
                if variant == "recording":
                    sizes += bytes_per_step(steps_dir)
                    io = io_times(steps_dir, 20)
                else:
                    assert not steps_dir.exists(), variant
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {
        "step_s_median": med,
        "step_s_min": low,
        "ratio_with_over_without": {k: med[k] / med["trl"] for k in VARIANTS[1:]},
        "ratio_of_minima": {k: low[k] / low["trl"] for k in VARIANTS[1:]},
        # The recording's own cost, timed inside the step: steady, unlike differences of noisy step times.
        "writer_s_median": statistics.median(writer_s),
        "writer_fraction_of_trl_step": statistics.median(writer_s) / med["trl"],
        "bytes_per_step_median": statistics.median(sizes),
        "bytes_per_step_max": max(sizes),
        **io,
        "step_s_all": times,
        "steps_timed_per_run": steps - warmup,
        "repeats": repeats,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/recording.json")
    ap.add_argument("--steps", type=int, default=10)
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
        "machine": {"platform": platform.platform(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "load_avg_1m_at_start": os.getloadavg()[0]},
        "model": setup["model"],
        "settings": {"trainer": "trl.GRPOTrainer", "per_device_train_batch_size": 16,
                     "gradient_accumulation_steps": 4, "num_generations": 8,
                     "max_completion_length": setup["max_new"], "update_sequences_per_step": 64,
                     "steps": steps, "warmup": warmup},
    }
    res["results"] = bench(setup, steps, warmup, repeats)
    res["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    shown = ("step_s_median", "ratio_with_over_without", "step_s_min", "ratio_of_minima", "writer_s_median",
             "writer_fraction_of_trl_step", "bytes_per_step_median", "write_step_s_median",
             "read_step_s_median")
    print(json.dumps({k: res["results"][k] for k in shown}, indent=2), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
