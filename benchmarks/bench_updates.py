"""Benchmarks of update directions and first-order predictions (measured side by side, never asserted).

(a) δH₁ (forward and reverse mode) vs true ΔH for K LoRA directions: time and growth with K;
(b) per-sequence gradients per second (``vmap(grad)``), LoRA and full-parameter;
(c) cross Fisher kernel for N_E = N_U = 256 on the few-million-parameter model: exact (block-
    streamed) vs seeded projection; time and peak memory (each in a fresh process).

Run: ``python -m benchmarks.bench_updates --out benchmarks/results/updates.json`` (``--quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import torch

import deltaH as dh
from benchmarks.bench_core import _reset_peak, _status_kb, build, make_batch, random_dirs, timeit
from deltaH.estimators.kernel import fisher_kernel
from deltaH.estimators.true import base_stats
from deltaH.updates.grads import sequence_logprob_grads


def bench_first_order_vs_true(ks: list[int], n: int, t_resp: int, quick: bool) -> list[dict[str, Any]]:
    model = build("small")
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    batch = make_batch(model, pol, lm.vocab_size, n, 16, t_resp)
    base = base_stats(lm, lm.params, batch, pol, 16)
    rows = []
    for k in ks:
        dirs = random_dirs(lm, k)
        rep = 1
        t_true = timeit(
            lambda d=dirs, k=k: dh.delta_h_true_multi(
                lm.params, d, batch, lm=lm, policy=pol, eta=1e-3, dir_chunk=min(k, 16), base=base
            ),
            rep,
        )
        t_fwd = timeit(
            lambda d=dirs, k=k: dh.delta_h_first_order(
                lm.params,
                d,
                batch,
                lm=lm,
                policy=pol,
                eta=1e-3,
                mode="forward",
                dir_chunk=min(k, 8),
                base=base,
            ),
            rep,
        )
        t_rev = timeit(
            lambda d=dirs, k=k: dh.delta_h_first_order(
                lm.params, d, batch, lm=lm, policy=pol, eta=1e-3, mode="reverse", base=base
            ),
            rep,
        )
        rows.append(
            {
                "K": k,
                "N": n,
                "T_resp": t_resp,
                "t_true_s": t_true,
                "t_first_order_forward_s": t_fwd,
                "t_first_order_reverse_s": t_rev,
                "forward_over_true": t_fwd / t_true,
                "reverse_over_true": t_rev / t_true,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_per_seq_grads(n: int, t_resp: int) -> list[dict[str, Any]]:
    out = []
    for lora in (True, False):
        model = build("small", lora=lora)
        lm = dh.FunctionalLM.from_model(model)
        pol = dh.SamplingPolicy(1.0, 1.0)
        batch = make_batch(model, pol, lm.vocab_size, n, 16, t_resp)
        t = timeit(lambda lm=lm, b=batch: sequence_logprob_grads(lm, lm.params, b, seq_chunk=8), 1)
        out.append(
            {
                "lora": lora,
                "trainable": sum(p.numel() for p in lm.params.values()),
                "N": n,
                "T_resp": t_resp,
                "time_s": t,
                "sequences_per_s": n / t,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def _kernel_child(method: str, n: int, t_resp: int) -> None:
    model = build("small")
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    ev = make_batch(model, pol, lm.vocab_size, n, 16, t_resp, seed=1)
    up = make_batch(model, pol, lm.vocab_size, n, 16, t_resp, seed=2)
    precond = {k: torch.rand_like(v) for k, v in lm.params.items()}
    before = _reset_peak()
    t = time.perf_counter()
    fisher_kernel(
        lm,
        lm.params,
        ev,
        up,
        precond,
        policy=pol,
        method=method,
        proj_dim=1024,
        seq_chunk=16,
        block_size=2**16,
    )
    dt = time.perf_counter() - t
    after = _status_kb("VmHWM")
    print(
        json.dumps(
            {
                "method": method,
                "N_E": n,
                "N_U": n,
                "time_s": dt,
                "peak_increase_mb": (after - before) / 1024,
                "trainable": sum(p.numel() for p in lm.params.values()),
            }
        )
    )


def bench_kernel(n: int, t_resp: int) -> list[dict[str, Any]]:
    rows = []
    for method in ("exact", "projection"):
        res = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_updates", "--child", method, str(n), str(t_resp)],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.getcwd(),
        )
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/updates.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--only", default="abc")
    args = ap.parse_args(argv)
    if args.child:
        _kernel_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    q = args.quick
    res: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    }
    if "a" in args.only:
        res["a_first_order_vs_true"] = bench_first_order_vs_true(
            [1, 4] if q else [1, 4, 16, 64], 8 if q else 16, 16 if q else 32, q
        )
    if "b" in args.only:
        res["b_per_sequence_grads"] = bench_per_seq_grads(16 if q else 64, 16 if q else 32)
    if "c" in args.only:
        res["c_kernel"] = bench_kernel(32 if q else 256, 16 if q else 32)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
