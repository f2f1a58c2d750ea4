"""Shared prompts in teacher forcing: time with ``share_prompts="on"`` against ``"off"``, side by side.

On the "small" model of ``bench_core`` (Qwen2, 4 layers, D = 256, V = 4096, LoRA r = 8 on every
projection, float32, eager attention) and an evaluation batch of ``G = 8`` responses per prompt
(``n_prompts`` prompts, rows of one prompt adjacent as E is sampled), prompt 150 / response 250
tokens, one teacher-forcing chunk of 16 rows:

(a) the true ΔH sweep ``delta_h_true_multi`` along K = 4 directions under ``vmap`` (dir_chunk 4);
(b) the same in the loop path (dir_chunk 1: one plain call per direction);
(c) first-order forward mode ``delta_h_first_order`` (``vmap(jvp)``, dir_chunk 4);
(d) first-order reverse mode (one gradient).

θ-side statistics are computed once and passed as ``base`` (they are not what is timed). Medians of
interleaved repeats (on, off, on, off, ...) after one warm-up each, one thread. The token-forwards
of each chunk (plain ``n·L`` vs shared ``g·Lp + n·Ls``) give the ideal ratio the times are compared
with; the results of both settings are compared too (float32: they agree to rounding). Responses are
random tokens and the policy is ``τ = 1, p = 1`` (any token has finite log q, so no sampling is
needed; the head's cost is the same in both settings).

Run: ``python -m benchmarks.bench_prompts --out benchmarks/results/prompts.json`` (``--quick``:
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
from benchmarks.bench_core import build, random_dirs
from benchmarks.bench_topp import machine
from deltaH.estimators._common import base_stats
from deltaH.stats import chunks_of


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, float], dict[str, Any]]:
    """Median seconds of each function, called in turn ``repeats`` times after one warm-up each; and
    each function's last output."""
    out = {k: f() for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t = time.perf_counter()
            out[k] = f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, out


def grouped_batch(
    n_prompts: int, group: int, prompt: int, resp: int, vocab: int, seed: int = 0
) -> dh.SequenceBatch:
    """``n_prompts`` random prompts, each with ``group`` random responses (rows of a prompt adjacent)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (n_prompts, prompt), generator=g).repeat_interleave(group, 0)
    ids = torch.cat([prompts, torch.randint(0, vocab, (n_prompts * group, resp), generator=g)], 1)
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = am.clone()
    rm[:, :prompt] = False
    return dh.SequenceBatch(ids, am, rm)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-300))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/prompts.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n_prompts, group, prompt, resp, k, tf = (2, 4, 12, 20, 2, 8) if args.quick else (2, 8, 150, 250, 4, 16)
    reps = 1 if args.quick else args.repeats
    model = build("small", lora=True)
    lm = dh.FunctionalLM.from_model(model)
    policy = dh.SamplingPolicy(1.0, 1.0)
    batch = grouped_batch(n_prompts, group, prompt, resp, 4096)
    dirs = {name: 1e-3 * d for name, d in random_dirs(lm, k).items()}
    chunks = chunks_of(batch, tf, "on")
    plain = sum(c.n * c.ids.shape[1] for c in chunks)
    shared = sum(c.share.prompt_ids.numel() + c.share.suffix_ids.numel() if c.share else c.n * c.ids.shape[1]
                 for c in chunks)
    res: dict[str, Any] = {
        "machine": machine(),
        "model": ("bench_core small: Qwen2, 4 layers, D=256, V=4096, LoRA r=8 (all projections), "
                  "float32, eager"),
        "policy": {"temperature": 1.0, "top_p": 1.0},
        "n_prompts": n_prompts, "group_size": group, "prompt_tokens": prompt, "response_tokens": resp,
        "k_directions": k, "tf_batch_size": tf, "repeats": reps,
        "token_forwards": {"plain": plain, "shared": shared, "ideal_ratio": plain / shared},
        "cases": {},
    }
    with torch.no_grad():
        base = base_stats(lm, lm.params, batch, policy, tf, share_prompts="off")
    cases: dict[str, Callable[[str], Callable[[], Any]]] = {
        "true_sweep_vmap_k4": lambda s: lambda: dh.delta_h_true_multi(
            lm.params, dirs, batch, lm=lm, policy=policy, eta=1.0, tf_batch_size=tf, dir_chunk=k, base=base,
            share_prompts=s).delta_h,
        "true_sweep_loop_k4": lambda s: lambda: dh.delta_h_true_multi(
            lm.params, dirs, batch, lm=lm, policy=policy, eta=1.0, tf_batch_size=tf, dir_chunk=1, base=base,
            share_prompts=s).delta_h,
        "first_order_forward_k4": lambda s: lambda: dh.delta_h_first_order(
            lm.params, dirs, batch, lm=lm, policy=policy, eta=1.0, tf_batch_size=tf, dir_chunk=k, base=base,
            mode="forward", share_prompts=s).delta_h,
        "first_order_reverse_k4": lambda s: lambda: dh.delta_h_first_order(
            lm.params, dirs, batch, lm=lm, policy=policy, eta=1.0, tf_batch_size=tf, base=base,
            mode="reverse", share_prompts=s).delta_h,
    }
    for name, make in cases.items():
        t0 = os.getloadavg()[0]
        secs, outs = interleaved({"off": make("off"), "on": make("on")}, reps)
        res["cases"][name] = {
            "seconds_off": secs["off"], "seconds_on": secs["on"], "speedup": secs["off"] / secs["on"],
            "max_rel_diff_of_delta_h": rel_diff(outs["off"], outs["on"]),
            "loadavg_1min_before": t0, "loadavg_1min_after": os.getloadavg()[0],
        }
        print(f"{name}: off {secs['off']:.2f} s, on {secs['on']:.2f} s, "
              f"{secs['off'] / secs['on']:.2f}x (ideal {plain / shared:.2f}x)", flush=True)
    res["machine"]["loadavg_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    os.replace(tmp, args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
