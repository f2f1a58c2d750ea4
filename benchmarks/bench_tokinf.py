"""The cost of the token-level analysis on the toy, beside one forward+backward pass over U.

On the embedded toy with the default config (what ``make demo`` runs: E = 256, U = 64 sequences,
LoRA r = 8, float32), every stage input is built once, then, interleaved over ``--repeats`` rounds
(medians reported):

* ``token_influence``: the stage (:func:`deltaH.runner.token_stages.token_influence_stage`) and its
  two parts, ``x_over_e`` (the reverse-mode gradient X on E) and ``jvp_over_u`` (the forward-mode
  pass over U along −clip·P·X, the per-token statistics included);
* ``proxies``: the stage (the five rules and the scoreboard, 200 bootstrap resamples);
* the references: ``fb_u`` one forward+backward pass of the step's loss ``Σ_i coef_i Σ_t log π`` over
  U in ``compute.tf_batch_size`` chunks (``fb_u_one_call``: all of U at once), ``fb_e`` the same over
  E, and ``directions`` deltaH's own per-checkpoint pass over U (per-sequence gradients + AdamW);
* ``run``: ``deltah run`` on the toy, whole, with its per-stage timings.

The same is repeated with ``compute.tf_batch_size = 256`` (E in one chunk: per-call overheads
amortised). Run: ``python -m benchmarks.bench_tokinf --out benchmarks/results/tokinf.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_topp import cpu_model as _cpu_model


def _machine() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "load_average_1min": os.getloadavg()[0],
    }


def _fb(lm: Any, params: dict[str, torch.Tensor], batch: Any, weights: torch.Tensor, tau: float,
        chunk: int) -> None:
    """One forward+backward pass of ``Σ_i weights_i · Σ_t log softmax(z/τ)[y]`` in chunks of rows."""
    from deltaH.updates.grads import logprob_sums

    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    for s in range(0, len(batch), chunk):
        sub = batch.select(slice(s, s + chunk))
        loss = (logprob_sums(lm, p, sub, temperature=tau) * weights[s : s + chunk].to(torch.float64)).sum()
        loss.backward()


def _measure(tf_batch_size: int, repeats: int) -> dict[str, Any]:
    from deltaH.config import load_config
    from deltaH.estimators.first_order import entropy_gradient
    from deltaH.estimators.token_influence import sequence_token_weights, token_influence
    from deltaH.runner import stages as st
    from deltaH.runner import token_stages as ts
    from deltaH.runner.orchestrate import load_inputs, resolve_checkpoints

    cfg = load_config("configs/toy.yaml", [f"compute.tf_batch_size={tf_batch_size}"])
    inp = load_inputs(cfg, resolve_checkpoints("toy")[0], quiet=True)
    bt = st.build_batches(cfg, inp)
    base = st.theta_stats(cfg, inp, bt)
    dr = st.directions(cfg, inp, bt)
    inf = st.influence(cfg, inp, bt, dr, base)
    ti = ts.token_influence_stage(cfg, inp, bt, dr, base)
    up, ev = bt.update.batch, bt.eval.batch
    tau, chunk = float(cfg.policy.temperature), cfg.compute.tf_batch_size
    w = sequence_token_weights(dr.update.coef, up.n_tokens)
    x = entropy_gradient(inp.params, ev, lm=inp.lm, policy=inp.policy, tf_batch_size=chunk, base=base)
    coef = dr.update.coef.double()
    ones = torch.ones(len(ev), dtype=torch.float64)
    jobs: dict[str, Callable[[], Any]] = {
        "token_influence": lambda: ts.token_influence_stage(cfg, inp, bt, dr, base),
        "x_over_e": lambda: entropy_gradient(inp.params, ev, lm=inp.lm, policy=inp.policy,
                                             tf_batch_size=chunk, base=base),
        "jvp_over_u": lambda: token_influence(inp.lm, inp.params, up, x, dr.update, w, temperature=tau,
                                              tf_batch_size=chunk),
        "proxies": lambda: ts.proxies_stage(cfg, inp, bt, dr, ti, inf),
        "fb_u": lambda: _fb(inp.lm, inp.params, up, coef, tau, chunk),
        "fb_u_one_call": lambda: _fb(inp.lm, inp.params, up, coef, tau, len(up)),
        "fb_e": lambda: _fb(inp.lm, inp.params, ev, ones, tau, chunk),
        "directions": lambda: st.directions(cfg, inp, bt),
    }
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeats):  # interleaved, so that a busy moment hits every job alike
        for k, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    overhead = med["token_influence"] + med["proxies"]
    return {
        "tf_batch_size": chunk,
        "n_eval": len(ev),
        "n_update": len(up),
        "eval_tokens": int(ev.n_tokens.sum()),
        "update_tokens": int(up.n_tokens.sum()),
        "median_s": med,
        "overhead_s": overhead,
        "overhead_over_fb_u": overhead / med["fb_u"],
        "overhead_over_fb_u_one_call": overhead / med["fb_u_one_call"],
        "overhead_over_directions": overhead / med["directions"],
        "x_over_e_over_fb_e": med["x_over_e"] / med["fb_e"],
        "jvp_over_u_over_fb_u": med["jvp_over_u"] / med["fb_u"],
        "below_one_fb_u": overhead < med["fb_u"],
    }


def _run_timings() -> dict[str, float]:
    import deltaH.runner as runner
    from deltaH.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config("configs/toy.yaml", ["output.plots=false"])
        out = runner.run(cfg, out=Path(tmp) / "r", quiet=True)
        return dict(json.loads((Path(out) / "summary.json").read_text())["timings"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tokinf.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the toy's demo runs with one thread (Makefile DEMO_THREADS)
    repeats = args.repeats or (3 if args.quick else 9)
    res = {
        "machine": _machine(),
        "model": "deltaH toy checkpoint-5 (Qwen2, 75k params) + LoRA r=8, float32; configs/toy.yaml",
        "default": _measure(16, repeats),
        "tf_batch_size_256": _measure(256, repeats),
        "run_timings_s": _run_timings(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    d = res["default"]
    fb, rel = d["median_s"]["fb_u"], d["overhead_over_directions"]
    print(f"token analysis {d['overhead_s']:.3f} s = {d['overhead_over_fb_u']:.1f}× one forward+backward "
          f"over U ({fb:.3f} s), {rel:.2f}× the directions stage")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
