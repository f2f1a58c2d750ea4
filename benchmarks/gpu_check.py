"""One command that checks deltaH on a CUDA GPU and writes what it finds to JSON (≈ 5 min on an H100/H200).

``python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]``

Without a CUDA device it prints why it skipped, writes ``{"status": "skipped", ...}`` and exits 0.
Sections (each recorded on its own; one that raises is recorded as failed and the others still run):

1. ``toy``: the embedded toy in float32 and bfloat16 on CUDA against the float32 CPU path — the
   nucleus (``SamplingPolicy.nucleus_mask``) of the same logits on both devices (must be identical),
   of each device's own logits (differences counted), and true ΔH (SNIS) of the four decompositions
   of the real AdamW step at η = lr·{1, 10, 100}, within ``5 % + 4σ`` (σ: ``deltaH.analysis.
   rounding_noise`` of each side's dtype).
2. ``generate``: ``model.generate(do_sample=True, top_p=0.9)`` samples of the bf16 SDPA 0.5B-shape
   model scored by ``dh.sequence_stats``: every ``log q`` finite, or each ``−inf`` token within the
   threshold tolerance — kept by generate, dropped by deltaH, and its ascending cumulative mass
   within the row's largest cumulative-mass difference between generate's logits (KV cache, flash
   attention) and deltaH's (teacher forcing, math attention) of the threshold ``1 − p``.
3. ``vmap``: true ΔH of K = 16 LoRA directions with ``dir_chunk`` 16 (vmap) and 1 (loop): time of
   each and their largest difference against 4σ.
4. ``flops``: achieved TFLOP/s of that ΔH evaluation (``FlopCounterMode``) against this GPU's
   measured bf16 matmul TFLOP/s (8192² GEMMs).
5. ``head_memory``: peak CUDA memory of ``sequence_stats`` with the chunked head vs all logits at
   once (``head_chunk = T``), one sequence of T = 1024 / 4096 tokens.
6. ``scale``: the bench_scale model (Qwen2.5-0.5B shape, LoRA r = 16) end to end in bf16 —
   sampling, θ-side statistics, per-sequence gradients + AdamW directions, the K = 4 sweep at one η,
   δH₁ forward and reverse, influence (true, first order), kernel (projection) — time and peak
   memory of each stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import deltaH as dh
from benchmarks.bench_scale import EOS, as_dtype, build_model, fresh_state, group_advantages, sample_batch
from deltaH.analysis import rounding_noise
from deltaH.estimators.true import base_stats


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``(result, seconds, peak memory above the start in MB)`` (peak: CUDA only, else NaN)."""
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        start = torch.cuda.memory_allocated(dev)
    t = time.perf_counter()
    out = fn()
    sync(dev)
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(dev) - start) / 2**20 if dev.type == "cuda" else math.nan
    return out, dt, peak


def close(got: float, want: float, tol: float) -> dict[str, Any]:
    return {"got": got, "want": want, "abs_diff": abs(got - want), "tol": tol, "ok": abs(got - want) <= tol}


# -- 1. the toy against the float32 CPU path ----------------------------------------------------
def _logits_at_scored(lm: dh.FunctionalLM, batch: dh.SequenceBatch) -> torch.Tensor:
    from deltaH.stats import chunks_of

    with torch.no_grad():
        c = chunks_of(batch, len(batch))[0]
        h = lm.backbone(lm.params, c.ids, c.position_ids)[c.rows, c.pred_pos]
        return lm.head(lm.params, h).float()


def check_toy(dev: torch.device, top_p: float = 0.9) -> dict[str, Any]:
    """The toy on ``dev`` against the CPU, per dtype with the same weights (a bf16 model is not the
    float32 one: its rounded weights move H and ΔH by more than arithmetic noise), under top-p."""
    from deltaH.sampling.rewards import math_rewards
    from deltaH.toy import load_toy, load_toy_prompts, toy_policy

    pol = dh.SamplingPolicy(toy_policy().temperature, top_p)
    out: dict[str, Any] = {"top_p": top_p, "temperature": pol.temperature}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        ref = load_toy(dtype=dt)
        lm0 = dh.FunctionalLM.from_model(ref.model)
        tok, recs = ref.tokenizer, load_toy_prompts()

        def ids(rs: list[Any], tok: Any = tok) -> list[list[int]]:
            return [tok(r.prompt, add_special_tokens=False)["input_ids"] for r in rs]

        opts = {
            "policy": pol,
            "max_new_tokens": 16,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        with torch.no_grad():
            ev = dh.sample(
                lm0,
                lm0.params,
                ids(recs[:32]),
                n_per_prompt=8,
                generator=torch.Generator().manual_seed(0),
                **opts,
            )
            ub = dh.sample(
                lm0,
                lm0.params,
                ids(recs[32:40]),
                n_per_prompt=8,
                generator=torch.Generator().manual_seed(1),
                **opts,
            )
        texts = [
            tok.decode(r[m], skip_special_tokens=True)
            for r, m in zip(ub.input_ids, ub.response_mask, strict=True)
        ]
        rewards = torch.tensor(math_rewards(texts, [r for r in recs[32:40] for _ in range(8)]))
        adv = dh.advantages(rewards.view(8, 8), "group").flatten()
        ud = dh.update_directions(
            lm0,
            lm0.params,
            ub,
            adv,
            ref.optimizer_state,
            loss_type="dapo",
            temperature=pol.temperature,
            max_grad_norm=1.0,
        )
        dirs = ud.stacked()
        etas = [ref.lr, 10 * ref.lr, 100 * ref.lr]
        z_cpu = _logits_at_scored(lm0, ev)
        keep_cpu = pol.nucleus_mask(z_cpu)
        same = pol.nucleus_mask(z_cpu.to(dev))  # the same logits on both devices
        assert keep_cpu is not None and same is not None
        ck = load_toy(dtype=dt, device=str(dev))
        lm = dh.FunctionalLM.from_model(ck.model)
        evd = ev.to(dev)
        keep = pol.nucleus_mask(_logits_at_scored(lm, evd))  # each device's own logits
        assert keep is not None
        # rows whose sampled tokens fall outside the device's nucleus (threshold flips) leave both sides
        st = dh.sequence_stats(lm, lm.params, evd, policy=pol)
        inside = torch.isfinite(st.logq).cpu()
        rows = inside.nonzero().flatten().tolist()
        ev_in = ev.select(rows)
        cpu = dh.delta_h_true_multi(lm0.params, dirs, ev_in, lm=lm0, policy=pol, eta=etas)
        res = dh.delta_h_true_multi(
            lm.params, {k: v.to(dev) for k, v in dirs.items()}, ev_in.to(dev), lm=lm, policy=pol, eta=etas
        )
        n, h = len(ev_in), float(cpu.h_orig)
        sig = 2 * rounding_noise(name, h, n)  # both sides round
        checks = [
            close(
                float(res.delta_h[i, k]),
                float(cpu.delta_h[i, k]),
                0.05 * abs(float(cpu.delta_h[i, k])) + 4 * sig,
            )
            for i in range(len(etas))
            for k in range(4)
        ]
        out[name] = {
            "n_eval": len(ev),
            "rows_outside_device_nucleus": len(ev) - n,
            "etas": etas,
            "nucleus_same_logits_rows_differing": int((same.cpu() != keep_cpu).any(-1).sum()),
            "nucleus_own_logits_rows_differing": int((keep.cpu() != keep_cpu).any(-1).sum()),
            "positions": int(z_cpu.shape[0]),
            "h_orig": float(res.h_orig),
            "h_orig_cpu": h,
            "delta_h": res.delta_h.tolist(),
            "delta_h_cpu": cpu.delta_h.tolist(),
            "checks": checks,
            "ok": all(c["ok"] for c in checks) and not bool((same.cpu() != keep_cpu).any()),
        }
    out["ok"] = out["float32"]["ok"] and out["bfloat16"]["ok"]
    return out


# -- the 0.5B-shape model on the device ---------------------------------------------------------
def scale_model(dev: torch.device, dtype: torch.dtype, attn: str = "sdpa") -> tuple[torch.nn.Module, dict]:
    model, info = build_model(attn=attn)
    model = as_dtype(model, dtype).to(dev)
    return model.eval(), info


# -- 2. generate → finite log q -------------------------------------------------------------------
def check_generate(dev: torch.device, model: torch.nn.Module, small: bool) -> dict[str, Any]:
    tau, p = 0.8, 0.9
    n, prompt, new = (4, 8, 8) if small else (64, 32, 128)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, EOS, (n, prompt), generator=g).to(dev)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=tau,
            top_p=p,
            top_k=0,
            max_new_tokens=new,
            min_new_tokens=new,
            eos_token_id=EOS,
            pad_token_id=EOS,
            return_dict_in_generate=True,
            output_logits=True,
        )
    seq = out.sequences
    am = torch.ones_like(seq, dtype=torch.bool)
    rm = am.clone()
    rm[:, :prompt] = False
    batch = dh.SequenceBatch(seq, am, rm)
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(tau, p)
    st = dh.sequence_stats(lm, lm.params, batch, policy=pol)
    res: dict[str, Any] = {"rows": n, "new_tokens": new, "rows_finite": int(torch.isfinite(st.logq).sum())}
    if res["rows_finite"] == n:
        res["ok"] = True
        return res
    # the tokens outside deltaH's nucleus, and how close they are to the threshold
    from deltaH.stats import chunks_of

    with torch.no_grad():
        c = chunks_of(batch, n)[0]
        z_dh = (
            lm.head(lm.params, lm.backbone(lm.params, c.ids, c.position_ids)[c.rows, c.pred_pos]).float()
            / tau
        )
    z_gen = torch.stack(out.logits, 1).float().reshape(-1, z_dh.shape[-1]) / tau  # [n·new, V], row-major
    y = c.targets
    thr = 1 - p

    def asc_mass(z: torch.Tensor) -> torch.Tensor:
        """Ascending cumulative mass at the target: the mass of tokens with prob ≤ the target's."""
        prob = torch.softmax(z, -1)
        py = prob.gather(-1, y[:, None])
        return (prob * (prob <= py)).sum(-1)

    m_dh, m_gen = asc_mass(z_dh), asc_mass(z_gen)
    keep = pol.nucleus_mask(z_dh * tau)
    assert keep is not None
    outside = ~keep.gather(-1, y[:, None])[:, 0]
    diff = (torch.softmax(z_dh, -1) - torch.softmax(z_gen, -1)).abs().sum(-1)  # ≥ any cumulative-mass gap
    flips = [
        {
            "mass_deltaH": float(m_dh[i]),
            "mass_generate": float(m_gen[i]),
            "threshold": thr,
            "row_mass_discrepancy": float(diff[i]),
            "within": bool(m_gen[i] > thr and abs(float(m_dh[i]) - thr) <= float(diff[i])),
        }
        for i in outside.nonzero().flatten().tolist()
    ]
    res.update(tokens_outside=len(flips), flips=flips[:20], ok=all(f["within"] for f in flips))
    return res


# -- 3. and 4. vmap vs loop; achieved FLOP/s ------------------------------------------------------
def matmul_tflops(dev: torch.device, dtype: torch.dtype, n: int = 8192) -> float:
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(dev)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12


def check_vmap_flops(
    dev: torch.device, model: torch.nn.Module, dtype_name: str, small: bool
) -> dict[str, Any]:
    from torch.utils.flop_counter import FlopCounterMode

    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    n, prompt, resp, k = (4, 16, 16, 4) if small else (32, 64, 256, 16)
    with torch.no_grad():
        ev = sample_batch(lm, n, prompt, resp, 4, 1, pol)
        base = base_stats(lm, lm.params, ev, pol, 16)
    g = torch.Generator().manual_seed(0)
    dirs = {
        nm: torch.randn(k, *p.shape, generator=g).to(device=dev, dtype=p.dtype) for nm, p in lm.params.items()
    }
    # random N(0, 1) LoRA directions; in bf16 a much smaller step leaves every activation's rounding
    # unchanged (ΔH = 0 exactly on both paths: nothing compared)
    eta = 1e-3

    def run(dc: int) -> dh.TrueDeltaH:
        return dh.delta_h_true_multi(
            lm.params, dirs, ev, lm=lm, policy=pol, eta=eta, base=base, dir_chunk=dc, tf_batch_size=16
        )

    run(k)  # warm-up (cuBLAS handles, allocator)
    r_v, t_v, m_v = timed(dev, lambda: run(k))
    r_l, t_l, m_l = timed(dev, lambda: run(1))
    sig = rounding_noise(dtype_name, float(base.entropy.mean()), n)
    diff = float((r_v.delta_h - r_l.delta_h).abs().max())
    with FlopCounterMode(display=False) as fc:
        run(k)
    flops = fc.get_total_flops()
    peak = matmul_tflops(dev, torch.bfloat16 if dtype_name == "bfloat16" else torch.float32)
    return {
        "n": n,
        "prompt": prompt,
        "resp": resp,
        "k": k,
        "eta": eta,
        "vmap": {"dir_chunk": k, "time_s": t_v, "peak_mb": m_v},
        "loop": {"dir_chunk": 1, "time_s": t_l, "peak_mb": m_l},
        "speedup_vmap_over_loop": t_l / t_v,
        "max_abs_diff": diff,
        "tol_4_sigma": 4 * sig,
        "agree": diff <= 4 * sig or diff <= 1e-3 * float(r_l.delta_h.abs().max()),
        "delta_h_loop": r_l.delta_h.tolist(),
        "ess_loop": r_l.ess.tolist(),
        "flops": flops,
        "achieved_tflops": flops / t_v / 1e12,
        "matmul_tflops": peak,
        "fraction_of_matmul": flops / t_v / 1e12 / peak,
    }


# -- issue 14's GPU ratios: top-p statistics vs log_softmax; shared prompts on vs off ----------------
def check_speed_ratios(dev: torch.device, model: torch.nn.Module, small: bool) -> dict[str, Any]:
    """``token_stats`` at p = 1 / 0.9 / 0.95 as a multiple of ``log_softmax`` on the device (zipf rows,
    V = 151,936), and the true ΔH sweep (K = 4) with ``share_prompts`` on vs off at prompt 150 /
    response 250, G = 8 (results equal to float rounding)."""
    from benchmarks.bench_topp import zipf_rows

    out: dict[str, Any] = {"top_p": {}}
    rows = 16 if small else 256
    for kind, alpha in (("peaked", 1.5), ("flat", 1.1)):
        z, y = zipf_rows(rows, 151936, alpha, 0)
        z, y = z.float().to(dev), y.to(dev)
        _, t_ref, _ = timed(dev, lambda z=z, y=y: torch.log_softmax(z, -1).gather(-1, y[:, None]))
        out["top_p"][kind] = {
            str(p): timed(dev, lambda p=p, z=z, y=y: dh.SamplingPolicy(1.0, p).token_stats(z, y))[1] / t_ref
            for p in (1.0, 0.9, 0.95)
        }
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    n, prompt, resp = (8, 8, 8) if small else (16, 150, 250)
    with torch.no_grad():
        ev = sample_batch(lm, n, prompt, resp, 8, 2, pol)
        base = base_stats(lm, lm.params, ev, pol, 16)
    g = torch.Generator().manual_seed(0)
    dirs = {nm: torch.randn(4, *p.shape, generator=g).to(device=dev, dtype=p.dtype)
            for nm, p in lm.params.items()}

    def run(share: str) -> dh.TrueDeltaH:
        return dh.delta_h_true_multi(lm.params, dirs, ev, lm=lm, policy=pol, eta=1e-3, base=base, dir_chunk=4,
                                     tf_batch_size=16, share_prompts=share)

    run("on")  # warm-up
    r_on, t_on, _ = timed(dev, lambda: run("on"))
    r_off, t_off, _ = timed(dev, lambda: run("off"))
    out["shared_prompts"] = {"n": n, "prompt": prompt, "resp": resp, "group": 8, "time_on_s": t_on,
                             "time_off_s": t_off, "speedup": t_off / t_on,
                             "max_abs_diff": float((r_on.delta_h - r_off.delta_h).abs().max()),
                             "share_unsupported": lm.share_unsupported}
    return out


# -- 5. head memory -------------------------------------------------------------------------------
def check_head_memory(dev: torch.device, model: torch.nn.Module, small: bool) -> list[dict[str, Any]]:
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    rows = []
    for t in (64, 128) if small else (1024, 4096):
        g = torch.Generator().manual_seed(t)
        ids = torch.randint(0, EOS, (1, t + 1), generator=g).to(dev)
        am = torch.ones_like(ids, dtype=torch.bool)
        rm = am.clone()
        rm[:, 0] = False
        batch = dh.SequenceBatch(ids, am, rm)
        row: dict[str, Any] = {"T": t}
        for mode, hc in (("chunked", None), ("full", t)):
            with torch.no_grad():
                _, dt, peak = timed(
                    dev,
                    lambda hc=hc, b=batch: dh.sequence_stats(lm, lm.params, b, policy=pol, head_chunk=hc),
                )
            row[f"{mode}_peak_mb"], row[f"{mode}_s"] = peak, dt
        rows.append(row)
    return rows


# -- 6. the scale model end to end ---------------------------------------------------------------
def check_scale(dev: torch.device, model: torch.nn.Module, small: bool) -> dict[str, Any]:
    lm = dh.FunctionalLM.from_model(model)
    pol = dh.SamplingPolicy(1.0, 1.0)
    n_e, n_u, prompt, resp = (4, 4, 16, 16) if small else (64, 16, 64, 256)
    kw = {"lm": lm, "policy": pol, "tf_batch_size": 16, "dir_chunk": 8}
    lr = 1e-6
    st: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        out, dt, peak = timed(dev, fn)
        st[name] = {"time_s": dt, "peak_mb": peak}
        print(f"  scale {name:<15} {dt:8.2f} s {peak:9.1f} MB", flush=True)
        return out

    with torch.no_grad():
        ev = stage("sample", lambda: sample_batch(lm, n_e, prompt, resp, 4, 1, pol))
        up = sample_batch(lm, n_u, prompt, resp, 4, 2, pol)
        base = stage("theta_stats", lambda: base_stats(lm, lm.params, ev, pol, 16))
    state = fresh_state(model, lr)
    ud = stage(
        "directions",
        lambda: dh.update_directions(
            lm,
            lm.params,
            up,
            group_advantages(n_u, 4, 3),
            state,
            loss_type="dapo",
            max_completion_length=resp,
            max_grad_norm=1.0,
            seq_chunk=8,
        ),
    )
    dirs = ud.stacked()
    sweep = stage("sweep", lambda: dh.delta_h_true_multi(lm.params, dirs, ev, eta=lr, base=base, **kw))
    fwd = stage(
        "fo_forward",
        lambda: dh.delta_h_first_order(lm.params, dirs, ev, eta=lr, mode="forward", base=base, **kw),
    )
    rev = stage(
        "fo_reverse",
        lambda: dh.delta_h_first_order(lm.params, dirs, ev, eta=lr, mode="reverse", base=base, **kw),
    )
    stage(
        "influence_true",
        lambda: dh.influence_matrix(lm.params, ud.components, ev, eta=lr, kind="true", base=base, **kw),
    )
    stage(
        "influence_fo",
        lambda: dh.influence_matrix(
            lm.params, ud.components, ev, eta=lr, kind="first_order", base=base, **kw
        ),
    )
    stage(
        "kernel_proj",
        lambda: dh.fisher_kernel(
            lm, lm.params, ev, up, ud.precond, policy=pol, method="projection", proj_dim=1024, seq_chunk=8
        ),
    )
    return {
        "n_e": n_e,
        "n_u": n_u,
        "prompt": prompt,
        "resp": resp,
        "stages": st,
        "entropy_per_token": float(base.entropy.sum() / base.n_tokens.sum()),
        "delta_h": sweep.delta_h.tolist(),
        "delta_h1_forward": fwd.delta_h.tolist(),
        "delta_h1_reverse": rev.delta_h.tolist(),
        "forward_reverse_max_rel_diff": float(((fwd.slope - rev.slope).abs() / fwd.slope.abs().max()).max()),
    }


def section(out: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    t = time.perf_counter()
    print(f"[{name}]", flush=True)
    try:
        out[name] = fn()
        if isinstance(out[name], dict):
            out[name]["seconds"] = time.perf_counter() - t
    except Exception as e:  # noqa: BLE001 - record and go on: the other sections still say something
        out[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        print(f"  failed: {type(e).__name__}: {e}", flush=True)


def write(path: str, res: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--device", default="cuda", help="cuda or cuda:N (cpu only to try the script itself)")
    ap.add_argument("--small", action="store_true", help="tiny sizes: a smoke run of the script, no figures")
    ap.add_argument("--only", default="toy,generate,vmap,ratios,head_memory,scale")
    args = ap.parse_args(argv)
    res: dict[str, Any] = {"torch": torch.__version__, "platform": platform.platform()}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        msg = "no CUDA device (torch.cuda.is_available() is False): gpu_check skipped, nothing was measured"
        print(msg)
        write(args.out, {**res, "status": "skipped", "reason": msg})
        return 0
    dev = torch.device(args.device)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
        res["cuda"] = torch.version.cuda
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 (the CPU comparison)
    only = set(args.only.split(","))
    t0 = time.perf_counter()
    torch.manual_seed(0)
    if "toy" in only:
        section(res, "toy", lambda: check_toy(dev))
    if only & {"generate", "vmap", "ratios", "head_memory", "scale"}:
        print("[building the 0.5B-shape model in bfloat16]", flush=True)
        model, info = scale_model(dev, torch.bfloat16)
        res["scale_model"] = info
        if "generate" in only:
            section(res, "generate", lambda: check_generate(dev, model, args.small))
        if "vmap" in only:
            section(res, "vmap", lambda: check_vmap_flops(dev, model, "bfloat16", args.small))
        if "ratios" in only:
            section(res, "ratios", lambda: check_speed_ratios(dev, model, args.small))
        if "head_memory" in only:
            section(res, "head_memory", lambda: check_head_memory(dev, model, args.small))
        if "scale" in only:
            section(res, "scale", lambda: check_scale(dev, model, args.small))
    res["total_s"] = time.perf_counter() - t0
    res["status"] = "complete"
    res["ok"] = all(
        v.get("ok", "error" not in v)
        for v in res.values()
        if isinstance(v, dict) and v is not res.get("scale_model")
    )
    write(args.out, res)
    print(f"wrote {args.out} in {res['total_s']:.0f} s; ok = {res['ok']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
