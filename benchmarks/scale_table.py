"""The README's tables of the scale rehearsal, from ``benchmarks/results/scale.json``.

Run: ``python -m benchmarks.scale_table [scale.json]`` (prints Markdown).
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from benchmarks.bench_scale import STAGES

AXES = (("n_e", "N_E"), ("t", "T"), ("n_u", "N_U"), ("k", "K"))


def _exp(fit: dict[str, float] | None, field: str) -> str:
    if not fit or field not in fit or math.isnan(fit[field]):
        return "–"
    return f"{fit[field]:.2f}"


def _largest(points: list[dict[str, Any]], stage: str) -> dict[str, Any] | None:
    """The point with the most work for ``stage`` (largest N_E·T·N_U·K among points that ran it)."""
    have = [p for p in points if stage in p["stages"]]
    if not have:
        return None
    return max(have, key=lambda p: (p["point"]["n_e"] * (p["point"]["prompt"] + p["point"]["resp"])
                                    * p["point"]["n_u"] * p["point"]["k"]))


def tables(res: dict[str, Any]) -> str:
    pts = res["points"]
    base = next(p for p in pts if p["point"]["axis"] == "base")
    bp = base["point"]
    ex = res.get("exponents", {})
    m = res["machine"]
    out = [f"Machine: {m['cpu']}, {m['cpus']} CPUs, ATen {m['capability']}, {m['threads']} thread(s), "
           f"torch {m['torch']}. Base point: N_E = {bp['n_e']}, N_U = {bp['n_u']}, prompt {bp['prompt']} + "
           f"response T = {bp['resp']} tokens, K = {bp['k']}; axes N_E 4–32, T 16–64, N_U 4–16, K 1–8 "
           "(one at a time).", "",
           "| stage | base: CPU s | base: peak MB | largest point | its CPU s | its peak MB | "
           "time exponent N_E / T / N_U / K | memory exponent N_E / T / N_U / K |",
           "|---|---|---|---|---|---|---|---|"]
    for stage in STAGES:
        b = base["stages"].get(stage)
        big = _largest(pts, stage)
        if b is None and big is None:
            continue
        e = ex.get(stage, {})
        t_exp = " / ".join(_exp(e.get(a), "cpu_s") for a, _ in AXES)
        m_exp = " / ".join(_exp(e.get(a), "peak_mb") for a, _ in AXES)
        bs = f"{b['cpu_s']:.1f} | {b['peak_mb']:.0f}" if b else "– | –"
        if big is not None and big is not base:
            q = big["point"]
            where = f"N_E {q['n_e']}, T {q['resp']}, N_U {q['n_u']}, K {q['k']}"
            bg = big["stages"][stage]
            bigs = f"{where} | {bg['cpu_s']:.1f} | {bg['peak_mb']:.0f}"
        else:
            bigs = "(base) | – | –"
        out.append(f"| {stage} | {bs} | {bigs} | {t_exp} | {m_exp} |")
    x = res.get("extrapolation")
    if x:
        a = x["assumptions"]
        out += ["", f"**{x['label']}** — `{x['config']}` ({a['model']}; E = {a['sequences']['n_e']}, "
                f"U = {a['sequences']['n_u']}, {a['sequences']['prompt_tokens']} prompt + "
                f"{a['sequences']['response_tokens']} response tokens; {a['utilisation']:.0%} of "
                f"{a['gpu_peak_flops'] / 1e12:.0f} TFLOP/s {a['dtype']}, and {a['utilisation_low']:.0%} "
                "beside it):", "",
                "| stage | PFLOP | 1 GPU, s | at the low utilisation, s |", "|---|---|---|---|"]
        for s in x["stages"]:
            pf = "–" if s["pflop"] is None else f"{s['pflop']:.1f}"
            out.append(f"| {s['stage']} | {pf} | {s['gpu1_s']:.0f} | {s['gpu1_s_at_15pct']:.0f} |")
        out.append(f"| **total, 1 GPU** | | **{x['gpu1_total_s'] / 60:.0f} min** | "
                   f"{x['gpu1_total_s_at_15pct'] / 60:.0f} min |")
        out.append(f"| **total, 8 GPUs** (rows sharded, {a['per_rank_fixed_s_8_gpus']:.0f} s fixed per rank) "
                   "| | "
                   f"**{x['gpu8_total_s'] / 60:.1f} min** | {x['gpu8_total_s_at_15pct'] / 60:.1f} min |")
        b = x.get("bfloat16")
        if b:
            out += ["", f"The same in bf16 (for comparison only: below its precision floor at this lr): "
                    f"{b['gpu1_total_s'] / 60:.0f} min on 1 GPU, {b['gpu8_total_s'] / 60:.1f} min on 8 "
                    f"({b['gpu1_total_s_at_15pct'] / 60:.0f} / {b['gpu8_total_s_at_15pct'] / 60:.1f} min at "
                    f"{a['utilisation_low']:.0%})."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    with open(args[0] if args else "benchmarks/results/scale.json") as f:
        print(tables(json.load(f)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
