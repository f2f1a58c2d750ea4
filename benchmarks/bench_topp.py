"""Benchmark: RB entropy + log q under top-p (``SamplingPolicy.token_stats``) vs a plain log-softmax.

Every figure is a ratio to ``torch.log_softmax(logits).gather(targets)`` of the same ``[rows, V]``
logits, timed side by side: each repeat times the log-softmax and then every variant, and the
ratios are the medians over the repeats (the machine may be shared: the load average before and
after is recorded, and min / max ratios show the spread). One torch thread. A second baseline,
the same log-softmax a few rows at a time (deltaH's chunking), shows how much comes from staying
in cache. Rows: Zipf-like logits (log-probability falling with log rank, plus noise, randomly
permuted) at V = 151,936: α = 1.5 "peaked" (nuclei of ~60 / ~230 tokens at p = 0.9 / 0.95) and
α = 1.1 "flat" (nuclei of ~15k / ~42k tokens).

For p < 1 the JSON also records how the kept sets were decided (``deltaH._nucleus``): rows
decided from a top-k prefix or the histogram, and rows that needed HF's own arithmetic on sorted
values (their boundary tokens are lighter than the certification margin) or HF's code (ties).

Run: ``python -m benchmarks.bench_topp --out benchmarks/results/topp.json`` (``--quick``: fewer
rows and repeats, a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import deltaH as dh

VOCAB = 151936  # Qwen2's
CASES = (("peaked", 1.5), ("flat", 1.1))
TOP_PS = (1.0, 0.95, 0.9)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures depend on: CPU model and ATen kernel set, threads, versions, load."""
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "loadavg": list(os.getloadavg()),
    }


def zipf_rows(rows: int, vocab: int, alpha: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` Zipf-like logit rows ``[rows, V]`` float32 and random targets ``[rows]``."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32)
    logits = -alpha * torch.log(ranks).expand(rows, -1) + 0.5 * torch.randn(rows, vocab, generator=g)
    logits = logits[:, torch.randperm(vocab, generator=g)].contiguous()
    return logits, torch.randint(0, vocab, (rows,), generator=g)


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def rules(logits: torch.Tensor, policy: dh.SamplingPolicy) -> dict[str, float]:
    """Fractions of rows decided by each rule (only with deltaH's sort-free selection)."""
    try:
        from deltaH._nucleus import nucleus
    except ImportError:  # an older deltaH
        return {}
    z = policy.scaled32(logits)
    nuc = nucleus(z, policy.top_p, int(policy.topk_prefix))
    n = float(logits.shape[0])
    return {
        "prefix_or_histogram": sum(r.numel() for r, _, _ in nuc.sparse) / n,
        "exact_sorted_values": sum(r.numel() for r in nuc.cut_rows) / n,
        "hf_code_ties": sum(r.numel() for r in nuc.dense_rows) / n,
    }


def measure(vocab: int, rows: int, repeats: int) -> list[dict[str, Any]]:
    """Ratios to the plain log-softmax per case and p (medians of interleaved repeats)."""
    try:
        from deltaH._nucleus import row_step
    except ImportError:  # an older deltaH: chunk the baseline as the current one does
        def row_step(v: int) -> int:
            return max(1, (1 << 19) // v)

    out = []
    for name, alpha in CASES:
        logits, tgt = zipf_rows(rows, vocab, alpha)

        def plain(x: torch.Tensor = logits, y: torch.Tensor = tgt) -> object:
            return torch.log_softmax(x, -1).gather(-1, y[:, None])

        def chunked(x: torch.Tensor = logits, y: torch.Tensor = tgt, step: int = row_step(vocab)) -> object:
            return [torch.log_softmax(x[s : s + step], -1).gather(-1, y[s : s + step, None])
                    for s in range(0, x.shape[0], step)]

        pols = {p: dh.SamplingPolicy(1.0, p) for p in TOP_PS}
        variants: dict[str, Callable[[], object]] = {"log_softmax_chunked": chunked}
        for p, pol in pols.items():
            variants[f"top_p_{p}"] = lambda pol=pol, x=logits, y=tgt: pol.token_stats(x, y)
        for fn in (plain, *variants.values()):  # warm-up
            fn()
        t_plain: list[float] = []
        ratios: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):
            t0 = _time(plain)
            t_plain.append(t0)
            for k, fn in variants.items():
                ratios[k].append(_time(fn) / t0)
        row: dict[str, Any] = {
            "rows": name,
            "zipf_alpha": alpha,
            "V": vocab,
            "n_rows": rows,
            "repeats": repeats,
            "ms_per_row_log_softmax": 1e3 * statistics.median(t_plain) / rows,
        }
        for k, r in ratios.items():
            row[f"ratio_{k}"] = statistics.median(r)
            row[f"ratio_{k}_min_max"] = [min(r), max(r)]
        for p, pol in pols.items():
            if p < 1:
                mask = pol.nucleus_mask(logits)
                assert mask is not None
                row[f"mean_nucleus_{p}"] = float(mask.sum(-1).float().mean())
                row[f"rules_{p}"] = rules(logits, pol)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/topp.json")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="16 rows, 2 repeats: a smoke run")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, repeats = (16, 2) if args.quick else (args.rows, args.repeats)
    res: dict[str, Any] = {"machine": machine()}
    res["entropy_cost"] = measure(VOCAB, rows, repeats)
    res["machine"]["loadavg_after"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
