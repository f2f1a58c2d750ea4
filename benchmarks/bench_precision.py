"""The precision floor of true ΔH at real model size, in float32 and bfloat16, beside the real lr.

Model: the Qwen2.5-0.5B-shaped model of :mod:`benchmarks.bench_scale` (494M parameters, LoRA r = 16
on every linear layer), with the random init's near-uniform outputs (``flat``: H ≈ 11.75
nats/token, the issue's setting) or its final norm scaled to H ≈ 2 nats/token (``peaked``, like a
trained model). E: N = 4 sequences (2 prompts × 2) of 64 prompt + 64 response tokens sampled from
``q`` (``top_p = 1``). The step is a real one: two torch AdamW steps (lr ``--lr``, clipping 1.0) on
the GRPO loss (``dapo``) of earlier sampled batches warm the optimizer, then ``dh.update_directions``
builds the next step on a fresh U (8 sequences); ``u = Δθ/lr`` is its full direction.

For each compute dtype (float32 model; bfloat16 base with float32 LoRA adapters, as peft loads them)
ΔH(η) is measured on a grid of η (half decades) together with δH₁ = η·slope, and beside them the
same quantities of the float64 copy of the same weights (the reference; HF keeps RMSNorm, rotary
and the attention softmax in float32 even there, so it is not noise-free). The **floor** is the
smallest η from which every larger grid η (up to where the float64 ΔH itself stops following δH₁:
curvature) has ``|ΔH − δH₁| ≤ 10 %·|δH₁|``. It is reported next to ``deltaH.analysis.trust_range``'s
own precision floor and the lr, and beside the floor with the per-token statistics computed in the
logits' dtype (``deltaH.policy._STATS_DTYPE = None``: this project's code before the float64
statistics), on the same model, batch and step.

Run: ``python -m benchmarks.bench_precision`` (≈ 30 min on 2 cores); results are merged into
``benchmarks/results/precision.json`` under ``--label``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch

import deltaH as dh
import deltaH.policy
from benchmarks.bench_scale import (
    EOS,
    as_dtype,
    build_model,
    group_advantages,
    machine,
    sample_batch,
    write_labelled,
)
from deltaH.analysis import rounding_noise, trust_range
from deltaH.updates.grads import logprob_sums
from deltaH.updates.losses import loss_coefficients

GRID = [10.0 ** (k / 2) for k in range(-18, -5)]  # 1e-9 … 1e-3


@contextlib.contextmanager
def float32_statistics() -> Iterator[None]:
    """Per-token statistics in the logits' compute dtype (float32 for float32 and bf16 logits), as
    this project computed them before: the "before" of the floor."""
    old = deltaH.policy._STATS_DTYPE
    deltaH.policy._STATS_DTYPE = None
    try:
        yield
    finally:
        deltaH.policy._STATS_DTYPE = old


def warm_state(model: torch.nn.Module, lm: dh.FunctionalLM, lr: float, batches: list[dh.SequenceBatch],
               group: int) -> dh.AdamWState:
    """Real torch AdamW steps (clipping 1.0) on the GRPO (``dapo``) loss of ``batches``; its state."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(named.values()), lr=lr, weight_decay=0.0)
    for s, ub in enumerate(batches):
        adv = group_advantages(len(ub), group, 200 + s)
        coef = loss_coefficients(ub.n_tokens, adv, loss_type="dapo")
        opt.zero_grad()
        for i in range(0, len(ub), 2):  # accumulate over pairs of rows: a 0.5B graph is ~7 MB per token
            rows = list(range(i, min(i + 2, len(ub))))
            (coef[rows] * logprob_sums(lm, named, ub.select(rows))).sum().backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), 1.0)
        opt.step()
    return dh.AdamWState.from_optimizer(opt, model)


def sweep(model: torch.nn.Module, ev: dh.SequenceBatch, u: dict[str, torch.Tensor], pol: dh.SamplingPolicy,
          slope: bool = True) -> dict[str, Any]:
    lm = dh.FunctionalLM.from_model(model)
    dirs = {n: d.unsqueeze(0) for n, d in u.items()}
    t = time.perf_counter()
    res = dh.delta_h_true_multi(lm.params, dirs, ev, lm=lm, policy=pol, eta=GRID, tf_batch_size=4,
                                dir_chunk=1)
    out = {"delta_h": res.delta_h[:, 0].tolist(), "h_orig": float(res.h_orig),
           "ess": res.ess[:, 0].tolist(), "khat": res.khat[:, 0].tolist(),
           "retained": res.retained_mass[:, 0].tolist(), "compute_dtype": str(lm.compute_dtype)}
    if slope:
        fo = dh.delta_h_first_order(lm.params, dirs, ev, lm=lm, policy=pol, eta=1.0, mode="forward",
                                    tf_batch_size=4, dir_chunk=1)
        out["slope"] = float(fo.slope[0])
    out["time_s"] = time.perf_counter() - t
    return out


def follows(dh_: float, lin: float, tol: float = 0.1) -> bool:
    return math.isfinite(dh_) and abs(dh_ - lin) <= tol * abs(lin)


def floor_of(delta_h: list[float], slope: float, upper: int) -> float:
    """Smallest grid η from which ΔH follows η·slope at every grid point up to index ``upper``."""
    ok = [follows(d, e * slope) for d, e in zip(delta_h, GRID, strict=True)]
    i = upper
    while i >= 0 and ok[i]:
        i -= 1
    return GRID[i + 1] if i + 1 <= upper else math.nan


def run(kind: str, lr: float, warm_steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model, info = build_model(entropy=None if kind == "flat" else 2.0)
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    t0 = time.perf_counter()
    # every batch in one dh.sample call (decoding on a CPU is memory-bound: one pass per step for all
    # rows): E = 2 prompts × 2, U and each warm-up batch = 2 prompts × 4 (64 + 64 tokens)
    with torch.no_grad():
        allb = sample_batch(lm, 8 * (2 + warm_steps), 64, 64, 4, 1, pol)
    ev = allb.select([0, 1, 4, 5])
    up = allb.select(list(range(8, 16)))
    warm = [allb.select(list(range(16 + 8 * s, 24 + 8 * s))) for s in range(warm_steps)]
    state = warm_state(model, lm, lr, warm, 4)
    lm = dh.FunctionalLM.from_model(model)
    ud = dh.update_directions(lm, lm.params, up, group_advantages(8, 4, 3), state, loss_type="dapo",
                              max_grad_norm=1.0, seq_chunk=2)
    u = ud.full
    out: dict[str, Any] = {"model": info, "kind": kind, "lr": lr, "warm_steps": warm_steps,
                           "lr_ref": ud.lr_ref, "n": len(ev), "scored_tokens": int(ev.n_tokens.sum()),
                           "u_rms": math.sqrt(sum(float(t.double().pow(2).sum()) for t in u.values())
                                              / sum(t.numel() for t in u.values())),
                           "setup_s": time.perf_counter() - t0, "dtypes": {}}
    ref = sweep(as_dtype(model, torch.float64), ev, u, pol)
    out["dtypes"]["float64"] = ref
    ok64 = [follows(d, e * ref["slope"]) for d, e in zip(ref["delta_h"], GRID, strict=True)]
    # the largest η of the linear regime: the float64 ΔH follows δH₁ there
    upper = max((i for i, o in enumerate(ok64) if o), default=len(GRID) - 1)
    out["linear_regime_eta_max"] = GRID[upper]
    n = len(ev)
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        m = model if dt == torch.float32 else as_dtype(model, dt)
        r = sweep(m, ev, u, pol)
        with float32_statistics():
            before = sweep(m, ev, u, pol, slope=False)
        r["delta_h_float32_statistics"] = before["delta_h"]
        tr = trust_range(GRID, r["delta_h"], r["slope"], r["ess"], r["khat"], r["retained"], n, 0.7,
                         noise=rounding_noise(name, r["h_orig"], n), check_retained=False)
        r["floor"] = floor_of(r["delta_h"], r["slope"], upper)
        r["floor_float32_statistics"] = floor_of(before["delta_h"], r["slope"], upper)
        r["floor_vs_float64"] = floor_of(r["delta_h"], ref["slope"], upper)
        r["trust_precision_floor"] = tr.precision_floor
        r["trust_eta_min"] = tr.eta_min
        r["trust_noise"] = tr.noise
        r["ratio_to_first_order"] = [d / (e * r["slope"]) for d, e in zip(r["delta_h"], GRID, strict=True)]
        out["dtypes"][name] = r
        print(f"{kind} {name}: floor {r['floor']:.3g} (float32 statistics: "
              f"{r['floor_float32_statistics']:.3g}; vs float64 slope {r['floor_vs_float64']:.3g}; "
              f"trust_range {tr.precision_floor:.3g}); lr {lr:g}", flush=True)
    out["grid"] = GRID
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    ap.add_argument("--label", default="current", help="key of this run in the JSON (e.g. before/after)")
    ap.add_argument("--kinds", default="flat,peaked")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--warm-steps", type=int, default=2)
    args = ap.parse_args(argv)
    res = {k: run(k, args.lr, args.warm_steps) for k in args.kinds.split(",")}
    write_labelled(args.out, args.label, {"machine": machine(), "eos": EOS, "runs": res})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
