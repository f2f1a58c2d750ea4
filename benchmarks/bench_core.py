"""Benchmarks of the functional core (issue: true ΔH for many directions, exact and fast).

Measured side by side in one run, reported as ratios (never asserted in tests):

(a) vmap over K LoRA directions vs a loop that writes each direction into the module, runs it,
    and restores it;
(b) achieved FLOP/s of the ΔH evaluation as a fraction of this machine's matmul throughput;
(c) peak memory of the chunked head vs full logits as T grows (each case in a fresh process);
(d) RB top-p entropy cost vs a plain log-softmax (one thread; ``benchmarks.bench_topp``);
(e) a tf_batch_size × dir_chunk sweep that recommends values.

Run: ``python -m benchmarks.bench_core --out benchmarks/results/core.json`` (``--quick`` for a
smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import deltaH as dh
from deltaH.estimators.true import base_stats


def build(kind: str, lora: bool = True, seed: int = 0) -> torch.nn.Module:
    """``small``: ~5M parameters, V = 4096; ``vocab``: realistic V = 151,936 (Qwen2's)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if kind == "small":
        cfg = Qwen2Config(
            vocab_size=4096,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    else:
        cfg = Qwen2Config(
            vocab_size=151936,
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    cfg._attn_implementation = "eager"
    model = Qwen2ForCausalLM(cfg).eval()
    # Peak the output distribution like a trained LM (a random init is nearly uniform over V).
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(8.0)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.eval()
    return model


def make_batch(
    model: torch.nn.Module,
    policy: dh.SamplingPolicy,
    vocab: int,
    n: int,
    prompt: int,
    resp: int,
    seed: int = 0,
) -> dh.SequenceBatch:
    """Random prompts, responses sampled from ``q`` itself (plain loop, no EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, prompt), generator=g)
    with torch.no_grad():
        for _ in range(resp):
            logits = model(input_ids=ids).logits[:, -1].float() / policy.temperature
            keep = policy.nucleus_mask(logits)
            if keep is not None:
                logits = logits.masked_fill(~keep, float("-inf"))
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, -1), 1, generator=g)], dim=1)
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = am.clone()
    rm[:, :prompt] = False
    return dh.SequenceBatch(ids, am, rm)


def timeit(fn: Callable[[], Any], repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = timeit(lambda: a @ b, repeat=5)
    return 2 * n**3 / t


def random_dirs(lm: dh.FunctionalLM, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(k, *p.shape, generator=g) for n, p in lm.params.items()}


def loop_delta_h(
    model: torch.nn.Module,
    lm: dh.FunctionalLM,
    dirs: dict[str, torch.Tensor],
    batch: dh.SequenceBatch,
    policy: dh.SamplingPolicy,
    eta: float,
    tf: int,
) -> torch.Tensor:
    """The baseline: for each direction write θ + η v into the module, run, restore."""
    named = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        base = base_stats(lm, lm.params, batch, policy, tf)
        for k in range(next(iter(dirs.values())).shape[0]):
            saved = {n: named[n].detach().clone() for n in dirs}
            for n, d in dirs.items():
                named[n].add_(eta * d[k])
            st = base_stats(
                lm, {n: p.detach() for n, p in named.items() if p.requires_grad}, batch, policy, tf
            )
            for n in dirs:
                named[n].copy_(saved[n])
            out.append(st.logq - base.logq)
    return torch.stack(out)


def bench_vmap_vs_loop(kind: str, k: int, n: int, t_resp: int, quick: bool) -> dict[str, Any]:
    """Loop (write θ+ηv into the module, run, restore) vs vmap at several chunkings, same answers."""
    model = build(kind)
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 0.95)
    batch = make_batch(model, pol, lm.vocab_size, n, 16, t_resp)
    dirs = random_dirs(lm, k)
    base = base_stats(lm, lm.params, batch, pol, 16)
    eta = 1e-3
    rep = 1 if quick else 2
    t_loop = timeit(lambda: loop_delta_h(model, lm, dirs, batch, pol, eta, n), rep)
    vm = []
    for dc, tf in ((k, n), (8, 8), (4, 8), (1, 8), (1, n)):

        def one(dc: int = dc, tf: int = tf) -> object:
            return dh.delta_h_true_multi(
                lm.params, dirs, batch, lm=lm, policy=pol, eta=eta, dir_chunk=dc, tf_batch_size=tf, base=base
            )

        t = timeit(one, rep)
        vm.append({"dir_chunk": dc, "tf_batch_size": tf, "t_vmap_s": t, "speedup_vs_loop": t_loop / t})
    # Same answers: the loop's logw equals the vmapped one.
    res = dh.delta_h_true_multi(lm.params, dirs, batch, lm=lm, policy=pol, eta=eta, dir_chunk=k, base=base)
    lw_loop = loop_delta_h(model, lm, dirs, batch, pol, eta, n)
    n_params = sum(p.numel() for p in model.parameters())
    best = max(vm, key=lambda r: r["speedup_vs_loop"])
    return {
        "model": kind,
        "params": n_params,
        "trainable": sum(p.numel() for p in lm.params.values()),
        "vocab": lm.vocab_size,
        "K": k,
        "N": n,
        "T_resp": t_resp,
        "t_loop_s": t_loop,
        "vmap": vm,
        "best_speedup": best["speedup_vs_loop"],
        "logw_max_abs_diff": float((res.logw_max - lw_loop.max(1).values).abs().max()),
    }


def bench_flops(kind: str, k: int, n: int, t_resp: int, quick: bool) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    model = build(kind)
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    batch = make_batch(model, pol, lm.vocab_size, n, 16, t_resp)
    dirs = random_dirs(lm, k)
    base = base_stats(lm, lm.params, batch, pol, n)

    def run() -> None:
        dh.delta_h_true_multi(
            lm.params, dirs, batch, lm=lm, policy=pol, eta=1e-3, dir_chunk=k, tf_batch_size=n, base=base
        )

    with FlopCounterMode(display=False) as fc:
        run()
    flops = fc.get_total_flops()
    t = timeit(run, 1 if quick else 3)
    peak = matmul_flops()
    return {
        "model": kind,
        "K": k,
        "N": n,
        "T_resp": t_resp,
        "flops": flops,
        "time_s": t,
        "achieved_flops_per_s": flops / t,
        "matmul_flops_per_s": peak,
        "fraction_of_matmul": flops / t / peak,
    }


def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> int:
    """Reset the peak-RSS counter (Linux ``clear_refs``) and return the current RSS in kB."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_kb("VmRSS")


def _peak_rss_child(mode: str, t: int, vocab: int) -> None:
    """Child process: ``sequence_stats`` of one sequence of T scored tokens on the V = 151,936 model,
    with the library's chunked head or with every position's logits at once (``head_chunk = T``);
    prints the peak RSS increase (MB) over the loaded model."""
    model = build("vocab", lora=False)
    lm = dh.FunctionalLM.from_model(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.vocab_size, (1, t + 1), generator=g)
    am = torch.ones_like(ids, dtype=torch.bool)
    rm = am.clone()
    rm[:, 0] = False
    batch = dh.SequenceBatch(ids, am, rm)
    pol = dh.SamplingPolicy(1.0, 1.0)
    before = _reset_peak()
    with torch.no_grad():
        dh.sequence_stats(lm, lm.params, batch, policy=pol, head_chunk=t if mode == "full" else None)
    after = _status_kb("VmHWM")
    print(json.dumps({"peak_increase_mb": (after - before) / 1024}))


def bench_head_memory(ts: list[int], vocab: int) -> list[dict[str, Any]]:
    rows = []
    for t in ts:
        row: dict[str, Any] = {"T": t, "V": vocab}
        for mode in ("chunked", "full"):
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_core", "--child", mode, str(t), str(vocab)],
                capture_output=True,
                text=True,
                check=True,
                cwd=os.getcwd(),
            )
            row[f"{mode}_peak_mb"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_increase_mb"]
        rows.append(row)
    return rows


def bench_entropy_cost(vocab: int, rows: int, quick: bool) -> list[dict[str, Any]]:
    """RB entropy + log q under top-p vs a plain log-softmax on peaked and flat rows, one thread,
    medians of interleaved repeats (``benchmarks.bench_topp``, which has the details)."""
    from benchmarks.bench_topp import measure

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return measure(vocab, rows, 2 if quick else 7)
    finally:
        torch.set_num_threads(threads)


def bench_sweep(kind: str, k_total: int, n: int, t_resp: int, quick: bool) -> dict[str, Any]:
    model = build(kind)
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 0.95)
    batch = make_batch(model, pol, lm.vocab_size, n, 16, t_resp)
    dirs = random_dirs(lm, k_total)
    base = base_stats(lm, lm.params, batch, pol, 16)
    grid = []
    tfs = (8, 32) if quick else (4, 8, 16, 32)
    dcs = (4, 16) if quick else (1, 4, 8, 16)
    for tf in tfs:
        for dc in dcs:

            def one(tf: int = tf, dc: int = dc) -> object:
                return dh.delta_h_true_multi(
                    lm.params,
                    dirs,
                    batch,
                    lm=lm,
                    policy=pol,
                    eta=1e-3,
                    dir_chunk=dc,
                    tf_batch_size=tf,
                    base=base,
                )

            t = timeit(one, 1)
            grid.append(
                {"tf_batch_size": tf, "dir_chunk": dc, "time_s": t, "seq_dirs_per_s": n * k_total / t}
            )
    best = min(grid, key=lambda r: r["time_s"])
    return {
        "model": kind,
        "K": k_total,
        "N": n,
        "T_resp": t_resp,
        "grid": grid,
        "recommended": {"tf_batch_size": best["tf_batch_size"], "dir_chunk": best["dir_chunk"]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/core.json")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not figures to report")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "T", "V"), help=argparse.SUPPRESS)
    ap.add_argument("--only", default="abcde", help="which parts to run, e.g. 'ad'")
    args = ap.parse_args(argv)
    if args.child:
        _peak_rss_child(args.child[0], int(args.child[1]), int(args.child[2]))
        return 0
    torch.manual_seed(0)
    q = args.quick
    from benchmarks.bench_topp import machine

    res: dict[str, Any] = {"machine": machine()}  # CPU model, ATen kernel set, threads, load average
    n, t_resp = (8, 16) if q else (16, 48)
    if "a" in args.only:
        res["a_vmap_vs_loop"] = [
            bench_vmap_vs_loop("small", 16, n, t_resp, q),
            bench_vmap_vs_loop("vocab", 16, n // 2, t_resp // 2, q),
        ]
        print(json.dumps(res["a_vmap_vs_loop"], indent=2), flush=True)
    if "b" in args.only:
        res["b_flops"] = [bench_flops("small", 16, n, t_resp, q)]
        print(json.dumps(res["b_flops"], indent=2), flush=True)
    if "c" in args.only:
        res["c_head_memory"] = bench_head_memory([256, 1024] if q else [256, 1024, 2048, 4096], 151936)
        print(json.dumps(res["c_head_memory"], indent=2), flush=True)
    if "d" in args.only:
        res["d_entropy_cost"] = bench_entropy_cost(151936, 16 if q else 128, q)
        print(json.dumps(res["d_entropy_cost"], indent=2), flush=True)
    if "e" in args.only:
        res["e_sweep"] = bench_sweep("small", 16, n, t_resp, q)
        print(json.dumps(res["e_sweep"]["recommended"], indent=2), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
