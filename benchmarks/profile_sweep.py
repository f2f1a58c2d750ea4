"""Where the time of the true ΔH evaluation goes, and what fraction of the machine's matmul rate it reaches.

The ΔH sweep (``dh.delta_h_true_multi``, K = 16 LoRA directions, the ``small`` model of
:mod:`benchmarks.bench_core`: Qwen2, hidden 256, 4 layers, V = 4096, LoRA r = 8 on every linear
layer; E = 16 sequences of 16 prompt + 48 response tokens, ``top_p = 1``) is run for each way of
batching the directions (``dir_chunk`` 16 = one vmap over all, 4, and 1 = the mutation-free loop).
For each: FLOPs (``torch.utils.flop_counter``), the best of 3 wall times, the achieved FLOP/s
against this machine's matmul rate measured in the same run (float32 ``[n, n] @ [n, n]`` at n =
2048, and at the shapes the model's own GEMMs have), and the profile's top operators by self CPU
time, grouped into matmul (``mm``/``addmm``/``bmm``/``linear``), attention, the head's policy
math (softmax/exp/log/sum over ``[rows, V]``) and the rest.

Run: ``python -m benchmarks.profile_sweep`` (≈ 2 min); JSON to ``benchmarks/results/profile.json``
(``--label`` keeps several runs side by side, e.g. before / after a change).
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from typing import Any

import torch

import deltaH as dh
from benchmarks.bench_core import build, make_batch, random_dirs, timeit
from benchmarks.bench_scale import machine, write_labelled
from deltaH.estimators.true import base_stats

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")
ATTN = ("aten::_softmax", "aten::softmax", "aten::_scaled_dot_product", "aten::scaled_dot_product")


def category(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if any(name.startswith(a) for a in ATTN):
        return "softmax (attention and head)"
    if name in ("aten::exp", "aten::log", "aten::sum", "aten::amax", "aten::max", "aten::nansum",
                "aten::gather", "aten::mul", "aten::sub", "aten::div", "aten::_to_copy", "aten::copy_",
                "aten::add", "aten::add_", "aten::mul_", "aten::silu", "aten::rsqrt", "aten::pow",
                "aten::mean",
                "aten::neg", "aten::cos", "aten::sin", "aten::where", "aten::masked_fill"):
        return "elementwise / reductions"
    if name in ("aten::cat", "aten::index", "aten::index_select", "aten::clone", "aten::contiguous",
                "aten::_reshape_alias", "aten::view", "aten::expand", "aten::transpose", "aten::permute",
                "aten::empty", "aten::empty_like", "aten::zeros", "aten::fill_", "aten::zero_"):
        return "data movement / allocation"
    return "other"


def matmul_rate(m: int, k: int, n: int, repeat: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return 2 * m * k * n / timeit(lambda: a @ b, repeat)


def profile_one(lm: dh.FunctionalLM, dirs: dict[str, torch.Tensor], batch: dh.SequenceBatch,
                pol: dh.SamplingPolicy, base: Any, dc: int, tf: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    def run() -> None:
        dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=pol, eta=1e-3, dir_chunk=dc,
                              tf_batch_size=tf, base=base)

    with FlopCounterMode(display=False) as fc:
        run()
    flops = fc.get_total_flops()
    t = timeit(run, 3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    rows = [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in prof.key_averages()]
    total = sum(r[1] for r in rows)
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = defaultdict(float)
    for name, s, _ in rows:
        cats[category(name)] += s
    return {"dir_chunk": dc, "tf_batch_size": tf, "flops": flops, "time_s": t, "flops_per_s": flops / t,
            "profile_self_cpu_s": total,
            "top_ops": [{"op": n, "self_cpu_s": s, "share": s / total, "calls": c} for n, s, c in rows[:12]],
            "categories": {k: {"self_cpu_s": v, "share": v / total} for k, v in
                           sorted(cats.items(), key=lambda kv: -kv[1])}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/profile.json")
    ap.add_argument("--label", default="current")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build("small")
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    n, k = 16, 16
    batch = make_batch(model, pol, lm.vocab_size, n, 16, 48)
    dirs = random_dirs(lm, k)
    base = base_stats(lm, lm.params, batch, pol, n)
    load0 = os.getloadavg()[0]
    rows_k = n * 64
    peak = {"square_2048": matmul_rate(2048, 2048, 2048),
            # the model's own GEMM shapes at K = 16 stacked rows: q/o (256×256), gate/up (256→768),
            # down (768→256), the tied head (256→4096)
            "model_shapes": {f"{m}x{kk}x{nn}": matmul_rate(m, kk, nn) for m, kk, nn in
                             ((k * rows_k, 256, 768), (k * rows_k, 768, 256), (k * rows_k, 256, 256),
                              (rows_k, 256, 768), (k * n * 48, 256, 4096))}}
    runs = [profile_one(lm, dirs, batch, pol, base, dc, n) for dc in (16, 4, 1)]
    for r in runs:
        r["fraction_of_square_matmul"] = r["flops_per_s"] / peak["square_2048"]
        print(f"dir_chunk {r['dir_chunk']:>2}: {r['time_s']:.3f} s, {r['flops_per_s'] / 1e9:.1f} GFLOP/s = "
              f"{100 * r['fraction_of_square_matmul']:.0f}% of {peak['square_2048'] / 1e9:.0f} GFLOP/s; "
              + ", ".join(f"{c} {100 * v['share']:.0f}%" for c, v in list(r["categories"].items())[:4]),
              flush=True)
    res = {"machine": {**machine(), "threads": args.threads}, "load_start": load0,
           "load_end": os.getloadavg()[0],
           "model": "small (bench_core)", "K": k, "N": n, "tokens": "16 prompt + 48 response",
           "matmul_flops_per_s": peak, "runs": runs, "time": time.strftime("%Y-%m-%d %H:%M")}
    write_labelled(args.out, args.label, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
