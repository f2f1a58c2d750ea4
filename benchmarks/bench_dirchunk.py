"""dir_chunk on CPU: what ``compute.dir_chunk: auto`` picks, and whether compiled vmap beats the loop.

(a) the calibration itself (:func:`deltaH.runner.calibrate.calibrate_dir_chunk`) on the "small"
    model of ``bench_core`` (Qwen2, 4 layers, V = 4096, LoRA r = 8) for K = 16 directions on one
    teacher-forcing chunk of 16 sequences × 48 tokens: its candidates' median times and its choice;
(b) the backbone alone on that chunk for the 16 directions: a loop of plain calls (dir_chunk 1),
    eager ``vmap`` over all 16, and ``torch.compile(vmap(f))`` (compile time reported apart; the
    compiled output is checked against eager). Medians of interleaved repeats, one thread.

Run: ``python -m benchmarks.bench_dirchunk --out benchmarks/results/dirchunk.json`` (``--quick``:
smaller sizes, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import deltaH as dh
from benchmarks.bench_core import build, make_batch, random_dirs
from benchmarks.bench_topp import machine
from deltaH.runner.calibrate import calibrate_dir_chunk
from deltaH.stats import chunks_of


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up each."""
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/dirchunk.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip (b)'s torch.compile row")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    k, n, prompt, resp, reps = (4, 4, 8, 8, 2) if args.quick else (16, 16, 16, 32, 5)
    res: dict[str, Any] = {"machine": machine(), "k": k, "n": n, "tokens": prompt + resp}
    model = build("small", lora=True)
    lm = dh.FunctionalLM.from_model(model)
    policy = dh.SamplingPolicy(1.0, 1.0)
    batch = make_batch(model, policy, 4096, n, prompt, resp)
    dirs = random_dirs(lm, k)
    dirs = {name: 1e-3 * d for name, d in dirs.items()}

    cal = calibrate_dir_chunk(lm.params, dirs, batch, lm=lm, policy=policy, eta=1.0, tf_batch_size=n,
                              repeats=reps)
    res["a_calibration"] = {"choice": cal.value, "candidates": cal.candidates, "seconds": cal.seconds}
    print("calibration:", res["a_calibration"], flush=True)

    c = chunks_of(batch, n)[0]
    params = lm.params
    base = {name: t for name, t in params.items() if name not in dirs}
    shifted = {name: params[name] + d for name, d in dirs.items()}

    def run(sp: dict[str, torch.Tensor]) -> torch.Tensor:
        return lm.backbone({**base, **sp}, c.ids, c.position_ids)

    def loop() -> torch.Tensor:
        return torch.stack([run({name: t[i] for name, t in shifted.items()}) for i in range(k)])

    vm = torch.func.vmap(run)
    fns: dict[str, Callable[[], Any]] = {"loop": loop, "vmap": lambda: vm(shifted)}
    with torch.no_grad():
        ref = loop()
        if not args.no_compile:
            comp = torch.compile(vm, dynamic=False)
            t = time.perf_counter()
            try:
                got = comp(shifted)
                res["b_compile_seconds"] = time.perf_counter() - t
                res["b_compiled_max_abs_diff"] = float((got - ref).abs().max())
                fns["compiled_vmap"] = lambda: comp(shifted)
            except Exception as e:  # noqa: BLE001 — a benchmark reports what failed
                res["b_compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        times = interleaved(fns, reps)
    res["b_backbone_seconds"] = times
    res["b_speedup_vs_loop"] = {name: times["loop"] / s for name, s in times.items()}
    res["machine"]["loadavg_after"] = list(os.getloadavg())
    print(json.dumps(res, indent=2), flush=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
