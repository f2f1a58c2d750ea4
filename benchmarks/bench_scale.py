"""A rehearsal at real model size: every stage of ``deltah run`` on a model shaped like Qwen2.5-0.5B.

The model has Qwen2.5-0.5B's exact shape (hidden 896, 24 layers, 14 query / 2 KV heads,
intermediate 4864, V = 151,936, tied embeddings, rope θ = 1e6; 494M parameters) with random
weights built in code (no hub), and a peft LoRA adapter of rank 16 on every linear layer
(q, k, v, o, gate, up, down: 8.8M trainable parameters, B initialised non-zero). A random init is
nearly uniform over V (H ≈ 11.75 nats/token); the final RMSNorm weight is scaled so that the
mean next-token entropy is ``--entropy`` nats (2 by default), as for a trained model. The policy
is ``temperature = 1, top_p = 1``.

Only N (sequences) and T (tokens) are shrunk, never the model. Each stage is called through the
public API, as ``deltaH/runner/stages.py`` calls it:

==================  ======================================================================
``sample``          ``dh.sample`` of E (N_E rows; U costs the same per row)
``theta_stats``     ``deltaH.estimators.true.base_stats`` (θ-side statistics of E)
``grads``           ``deltaH.updates.grads.sequence_logprob_grads`` on U (N_U rows)
``directions``      ``dh.update_directions``: the same gradients, then the AdamW decomposition
``sweep``           ``dh.delta_h_true_multi`` of the four decompositions (K = 4) at one η
``fo_forward``      ``dh.delta_h_first_order(mode="forward")``, K = 4
``fo_reverse``      ``dh.delta_h_first_order(mode="reverse")``, K = 4
``influence_true``  ``dh.influence_matrix(kind="true")`` over the N_U components
``influence_fo``    ``dh.influence_matrix(kind="first_order")``
``kernel_exact``    ``dh.fisher_kernel(method="exact")`` (block-streamed)
``kernel_proj``     ``dh.fisher_kernel(method="projection", proj_dim=1024)``
==================  ======================================================================

Memory: every size point runs in a fresh subprocess (glibc told to return freed blocks to the OS:
``MALLOC_MMAP_THRESHOLD_``, ``malloc_trim``); before each stage the kernel's peak-RSS counter is
reset (``/proc/self/clear_refs``) and the stage's peak is ``VmHWM − VmRSS`` at its start (exact,
no sampling; tracemalloc does not see torch's allocations). Growth exponents are log-log fits
over ≥ 3 points per axis (N_E, T, N_U, K). From the per-token costs, an extrapolation to the
README's Qwen2.5-1.5B config on GPUs is written beside the measurements (clearly labelled, with
its assumptions).

Run: ``python -m benchmarks.bench_scale --full`` (≈ 20 min on 2 cores) or ``--quick`` (≈ 2 min:
one point, no exponents); JSON to ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import deltaH as dh
from deltaH.estimators.true import base_stats
from deltaH.updates.grads import sequence_logprob_grads

VOCAB = 151936
EOS = 151643  # Qwen2.5's <|endoftext|>
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STAGES = ("sample", "theta_stats", "grads", "directions", "sweep", "fo_forward", "fo_reverse",
          "influence_true", "influence_fo", "kernel_exact", "kernel_proj")
LR = 1e-6  # η of the sweep and influence stages (a realistic GRPO learning rate)


# -- the model ---------------------------------------------------------------------------------
def qwen05_config(attn: str = "sdpa") -> Any:
    """Qwen2.5-0.5B's config (its config.json), built in code."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        max_window_layers=21,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=EOS,
        eos_token_id=EOS,
    )
    cfg._attn_implementation = attn
    return cfg


def entropy_scale(model: torch.nn.Module, target: float, seed: int = 0) -> tuple[float, float]:
    """The factor ``s`` for the final norm weight that gives mean next-token entropy ``target``.

    Logits are linear in the final norm's weight (the head is a plain matmul), so the hidden states
    of one random batch are computed once and ``H(s·logits)`` is bisected on ``log s``. Returns
    ``(s, H at s = 1)``.
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, EOS, (2, 64), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double().flatten(0, 1)

    def ent(s: float) -> float:
        lp = torch.log_softmax(s * logits, -1)
        return float(-(lp.exp() * lp).sum(-1).mean())

    lo, hi = 0.0, math.log(256.0)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ent(math.exp(mid)) > target else (lo, mid)
    return math.exp(0.5 * (lo + hi)), ent(1.0)


def build_model(dtype: torch.dtype = torch.float32, attn: str = "sdpa", entropy: float | None = 2.0,
                lora_r: int = 16, seed: int = 0,
                norm_scale: float | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The 0.5B-shape model with random weights and a LoRA adapter (module docstring); eval mode.

    ``entropy=None`` keeps the random init's near-uniform outputs; ``norm_scale`` skips the
    calibration (a factor found before). Returns ``(peft model, info)``.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen05_config(attn)).eval()
    info: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if norm_scale is None and entropy is not None:
        norm_scale, info["entropy_unscaled"] = entropy_scale(model, entropy, seed)
    if norm_scale is not None:
        with torch.no_grad():
            model.model.norm.weight.mul_(norm_scale)
        info.update(norm_scale=norm_scale, entropy_target=entropy)
    model = get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=0.0,
                                             target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # a trained adapter: B ≠ 0, so every LoRA direction moves the logits
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    model = model.to(dtype).eval()
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info["lora_r"] = lora_r
    info["dtype"] = str(dtype).removeprefix("torch.")
    info["attn"] = attn
    return model, info


def as_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy in ``dtype``; for bfloat16 the LoRA adapters stay float32 (peft's default on load)."""
    m = copy.deepcopy(model).to(dtype)
    if dtype == torch.bfloat16:
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
    return m.eval()


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOS, (n, length), generator=g).tolist()


def sample_batch(lm: dh.FunctionalLM, n: int, prompt: int, resp: int, group: int, seed: int,
                 policy: dh.SamplingPolicy) -> dh.SequenceBatch:
    """``n`` rows: ``n / group`` random prompts × ``group`` responses drawn from ``q`` by ``dh.sample``."""
    return dh.sample(lm, lm.params, prompts(max(n // group, 1), prompt, seed), policy=policy,
                     max_new_tokens=resp, n_per_prompt=min(group, n), eos_token_id=EOS, pad_token_id=EOS,
                     generator=torch.Generator().manual_seed(seed))


def group_advantages(n_u: int, group: int, seed: int) -> torch.Tensor:
    """GRPO advantages of random 0/1 rewards with both values in every group."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(n_u // group, group, generator=g) < 0.5).double()
    r[:, 0], r[:, 1] = 0.0, 1.0
    return dh.advantages(r, "group").flatten()


def fresh_state(model: torch.nn.Module, lr: float = LR) -> dh.AdamWState:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return dh.AdamWState.from_optimizer(opt, model)


MEMORY_METHOD = ("peak RSS above the RSS at the stage's start: /proc/self/clear_refs resets VmHWM before the "
                 "stage, VmHWM after it; a fresh process per size point, glibc returning freed blocks "
                 "(MALLOC_MMAP_THRESHOLD_=65536, malloc_trim before each stage)")


# -- measuring ---------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS may then keep freed memory, and deltas read low
        pass


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``fn`` once: wall time, CPU time of the process (every thread), the 1-minute load average
    at the end (other jobs on the machine), and peak RSS above the RSS at its start (MB)."""
    _trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = _status_kb("VmRSS")
    t, c = time.perf_counter(), _cpu_s()
    out = fn()
    dt, dc = time.perf_counter() - t, _cpu_s() - c
    peak = _status_kb("VmHWM")
    return out, {"time_s": dt, "cpu_s": dc, "load": os.getloadavg()[0], "peak_mb": (peak - rss0) / 1024,
                 "rss_start_mb": rss0 / 1024}


MAX = {"prompt": 32}  # the master batches' prompt length (every point's)


def prepare(path: str, threads: int, n: int, resp: int) -> None:
    """Calibrate the entropy once and draw the master E and U (``n`` rows each: prompts × 4, 32 +
    ``resp`` tokens) with one ``dh.sample`` call: each point takes its first rows and the first T response
    tokens (a prefix of a draw from ``q`` is a draw from ``q``'s prefix marginal). On a CPU decoding
    reads every weight per step (memory-bound), so one call for all rows saves most of the cost."""
    torch.set_num_threads(threads)
    model, info = build_model()
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    t = time.perf_counter()
    with torch.no_grad():
        both = sample_batch(lm, 2 * n, MAX["prompt"], resp, 4, 0, pol)
    torch.save({"n": n, "norm_scale": info["norm_scale"], "entropy_unscaled": info["entropy_unscaled"],
                "sample_s": time.perf_counter() - t, "input_ids": both.input_ids,
                "attention_mask": both.attention_mask, "response_mask": both.response_mask}, path)


def _slice(master: dict[str, Any], rows: slice, length: int) -> dh.SequenceBatch:
    keys = ("input_ids", "attention_mask", "response_mask")
    return dh.SequenceBatch(*(master[k][rows, :length] for k in keys))


def run_point(pt: dict[str, Any]) -> dict[str, Any]:
    """One size point (in a fresh process): the stages listed in ``pt["stages"]``."""
    torch.set_num_threads(int(pt.get("threads", torch.get_num_threads())))
    t0 = time.perf_counter()
    master = torch.load(pt["master"], weights_only=True)
    model, info = build_model(norm_scale=master["norm_scale"])
    info["entropy_unscaled"] = master["entropy_unscaled"]
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    n_e, n_u, prompt, resp, k = pt["n_e"], pt["n_u"], pt["prompt"], pt["resp"], pt["k"]
    # the config defaults of `deltah run` (compute.tf_batch_size, dir_chunk, seq_chunk)
    tf, dc, sc = pt.get("tf_batch_size", 16), pt.get("dir_chunk", 8), pt.get("seq_chunk", 8)
    kw = {"lm": lm, "policy": pol, "tf_batch_size": tf, "dir_chunk": dc}
    want = set(pt["stages"])
    out: dict[str, Any] = {"point": pt, "model": info, "stages": {}}
    st = out["stages"]
    setup = {"build_s": time.perf_counter() - t0}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        res, m = measure(fn)
        st[name] = m
        print(f"  {name:<15} {m['time_s']:8.2f} s wall {m['cpu_s']:8.2f} s CPU {m['peak_mb']:9.1f} MB "
              f"(load {m['load']:.1f})", flush=True)
        return res

    length = prompt + resp
    ev = _slice(master, slice(0, n_e), length)
    up = _slice(master, slice(master["n"], master["n"] + n_u), length)
    with torch.no_grad():
        if "sample" in want:
            stage("sample", lambda: sample_batch(lm, n_e, prompt, resp, 4, 1, pol))
        base = (stage("theta_stats", lambda: base_stats(lm, lm.params, ev, pol, tf)) if "theta_stats" in want
                else base_stats(lm, lm.params, ev, pol, tf))
    out["entropy_per_token"] = float(base.entropy.sum() / base.n_tokens.sum())
    out["tokens"] = {"eval_scored": int(ev.n_tokens.sum()), "eval_total": int(ev.attention_mask.sum()),
                     "update_scored": int(up.n_tokens.sum()), "update_total": int(up.attention_mask.sum())}
    if not want - {"sample", "theta_stats"}:
        out["setup"] = setup
        return out
    adv = group_advantages(n_u, 4, 3)
    state = fresh_state(model)
    if "grads" in want:
        stage("grads", lambda: sequence_logprob_grads(lm, lm.params, up, temperature=1.0, seq_chunk=sc))

    def directions() -> dh.UpdateDirections:
        return dh.update_directions(lm, lm.params, up, adv, state, loss_type="dapo",
                                    max_completion_length=resp, max_grad_norm=1.0, seq_chunk=sc)

    ud = stage("directions", directions) if "directions" in want else directions()
    dirs = ud.stacked()
    if k != 4:  # the K axis: k copies of the four decompositions' directions
        dirs = {n: d.repeat((k + 3) // 4, *([1] * (d.dim() - 1)))[:k] for n, d in dirs.items()}
    if "sweep" in want:
        stage("sweep", lambda: dh.delta_h_true_multi(lm.params, dirs, ev, eta=LR, base=base, **kw))
    if "fo_forward" in want:
        stage("fo_forward", lambda: dh.delta_h_first_order(lm.params, dirs, ev, eta=LR, mode="forward",
                                                           base=base, **kw))
    if "fo_reverse" in want:
        stage("fo_reverse", lambda: dh.delta_h_first_order(lm.params, dirs, ev, eta=LR, mode="reverse",
                                                           base=base, **kw))
    if "influence_true" in want:
        stage("influence_true", lambda: dh.influence_matrix(lm.params, ud.components, ev, eta=LR,
                                                            kind="true", base=base, **kw))
    if "influence_fo" in want:
        stage("influence_fo", lambda: dh.influence_matrix(lm.params, ud.components, ev, eta=LR,
                                                          kind="first_order", base=base, **kw))
    for name, method in (("kernel_exact", "exact"), ("kernel_proj", "projection")):
        if name in want:
            stage(name, lambda method=method: dh.fisher_kernel(lm, lm.params, ev, up, ud.precond, policy=pol,
                                                              method=method, proj_dim=1024, seq_chunk=sc))
    out["setup"] = setup
    return out


# -- the plan ---------------------------------------------------------------------------------
BASE = {"n_e": 4, "n_u": 4, "prompt": 32, "resp": 16, "k": 4}
E_SIDE = ["sample", "theta_stats", "sweep", "fo_forward", "fo_reverse", "influence_true", "kernel_proj"]


def plan(mode: str) -> list[dict[str, Any]]:
    """Size points: the base point with every stage, then one axis at a time (other sizes at base),
    each with the stages that depend on it. ``kernel_exact`` (9 passes of per-sequence gradients
    over E and U, one per 2^20-parameter block) runs at the base point only, and ``influence_fo``
    (forward mode over N_U directions: ``fo_forward``'s code) on the N_U axis."""
    every = [s for s in STAGES if s != "kernel_exact"]
    if mode == "quick":
        return [{**BASE, "axis": "base", "stages": every}]
    pts = [{**BASE, "axis": "base", "stages": list(STAGES)}]
    for n in (8, 16, 32):
        pts.append({**BASE, "n_e": n, "axis": "n_e", "stages": E_SIDE})
    for t in (32, 64):
        pts.append({**BASE, "resp": t, "axis": "t", "stages": every})
    for n in (8, 16):
        pts.append({**BASE, "n_u": n, "axis": "n_u",
                    "stages": ["grads", "directions", "influence_true", "influence_fo", "kernel_proj"]})
    for k in (1, 2, 8):
        pts.append({**BASE, "k": k, "axis": "k", "stages": ["sweep", "fo_forward", "fo_reverse"]})
    return pts


# T = response tokens (the prompt stays at 32 tokens; with shared prompts it runs once per group)
AXIS_KEY = {"n_e": "n_e", "t": "resp", "n_u": "n_u", "k": "k"}


def exponents(points: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Log-log slopes of time and peak memory against each axis (base point included)."""
    import numpy as np

    base = next(p for p in points if p["point"]["axis"] == "base")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for axis, key in AXIS_KEY.items():
        pts = [base] + [p for p in points if p["point"]["axis"] == axis]
        for stage in STAGES:
            rows = [(p["point"][key], p["stages"][stage]) for p in pts if stage in p["stages"]]
            if len(rows) < 3:
                continue
            x = np.log([r[0] for r in rows])
            fit: dict[str, float] = {"n_points": len(rows)}
            for field in ("cpu_s", "time_s", "peak_mb"):
                y = np.array([r[1][field] for r in rows], dtype=float)
                # peak memory under 20 MB is allocator noise, not growth (times are always fitted)
                ok = (y > 20).all() if field == "peak_mb" else (y > 0).all()
                fit[field] = float(np.polyfit(x, np.log(y), 1)[0]) if ok else float("nan")
            out.setdefault(stage, {})[axis] = fit
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def run_child(args: list[str]) -> None:
    """``python -m benchmarks.bench_scale ARGS`` in a fresh interpreter (memory figures must not see
    earlier points)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    subprocess.run([sys.executable, "-m", "benchmarks.bench_scale", *args], check=True, env=env,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="one point, every stage (≈ 2 min)")
    mode.add_argument("--full", action="store_true", help="every axis (≈ 20 min)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of every measurement")
    ap.add_argument("--child", nargs=2, metavar=("POINT", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--prepare", nargs=3, metavar=("MASTER", "N", "T"), help=argparse.SUPPRESS)
    ap.add_argument("--refit", action="store_true",
                    help="recompute the exponents and the extrapolation of an existing --out file")
    args = ap.parse_args(argv)
    if args.refit:
        from benchmarks.scale_extrapolate import extrapolate

        with open(args.out) as f:
            res = json.load(f)
        res["exponents"] = exponents(res["points"])
        res["extrapolation"] = extrapolate(max(_full_points(res["points"]), key=lambda p: p["point"]["resp"]))
        _write(args.out, res)
        return 0
    if args.prepare:
        prepare(args.prepare[0], args.threads, int(args.prepare[1]), int(args.prepare[2]))
        return 0
    if args.child:
        res = run_point(json.loads(args.child[0]))
        with open(args.child[1], "w") as f:
            json.dump(res, f)
        return 0
    t0 = time.perf_counter()
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        master = os.path.join(tmp, "master.pt")
        print("preparing: entropy calibration and the master batches", flush=True)
        pts = plan("quick" if args.quick or not args.full else "full")
        n = max(max(p["n_e"], p["n_u"]) for p in pts)
        t_max = max(p["resp"] for p in pts)
        run_child(["--prepare", master, str(n), str(t_max), "--threads", str(args.threads)])
        for i, pt in enumerate(pts):
            pt.update(threads=args.threads, master=master)
            print(f"[{time.perf_counter() - t0:6.0f} s] point {pt['axis']}: N_E={pt['n_e']} N_U={pt['n_u']} "
                  f"prompt={pt['prompt']} T={pt['resp']} K={pt['k']}", flush=True)
            out = os.path.join(tmp, f"point{i}.json")
            run_child(["--child", json.dumps(pt), out])
            with open(out) as f:
                points.append(json.load(f))
            points[-1]["point"].pop("master")
    from benchmarks.scale_extrapolate import extrapolate

    res: dict[str, Any] = {"machine": {**machine(), "threads": args.threads}, "model": points[0]["model"],
                           # every stage runs with the API's defaults: E and U hold 4 responses per
                           # prompt, so compute.share_prompts=auto runs each prompt once per chunk
                           "share_prompts": "auto",
                           "lr": LR, "points": points, "memory_method": MEMORY_METHOD,
                           "mode": "quick" if args.quick or not args.full else "full",
                           "total_s": time.perf_counter() - t0}
    if len(points) > 1:
        res["exponents"] = exponents(points)
    res["extrapolation"] = extrapolate(max(_full_points(points), key=lambda p: p["point"]["resp"]))
    _write(args.out, res)
    print(f"wrote {args.out} ({res['total_s']:.0f} s)")
    return 0


def _full_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points that ran every stage the extrapolation needs."""
    need = {"sample", "theta_stats", "sweep", "fo_forward", "fo_reverse", "influence_true", "influence_fo",
            "directions"}
    return [p for p in points if set(p["stages"]) >= need]


def write_labelled(path: str, label: str, value: Any) -> None:
    """``path``'s JSON object with ``value`` under ``label`` (other labels kept), written atomically."""
    old: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    old[label] = value
    _write(path, old)
    print(f"wrote {path} [{label}]")


def _write(path: str, res: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


if __name__ == "__main__":
    raise SystemExit(main())
