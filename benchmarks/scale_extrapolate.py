"""An extrapolation (not a measurement) of ``deltah run configs/qwen2.5-1.5b-lora-gsm8k.yaml`` on GPUs.

Method. Each stage's cost is measured on the CPU rehearsal (:mod:`benchmarks.bench_scale`) as a
multiple of one plain teacher-forced forward over the same sequences (the ``theta_stats`` stage):
``m_stage = t_stage / t_forward``, per direction, column or sequence as the stage scales. The 1.5B
config's cost of a stage is then ``m_stage × FLOPs of one forward over its sequences × how many
times the run calls it``, divided by an assumed GPU throughput. Assumptions, all stated in the
output:

* model: Qwen2.5-1.5B (hidden 1536, 28 layers, 12 / 2 heads, intermediate 8960, V = 151,936,
  tied), LoRA r = 16 on every linear layer (18.5M trainable parameters), computed in **float32**
  (the config's ``checkpoint.dtype: auto`` upcasts the bf16 weights: in bf16 the ΔH of a step at
  lr 1e-6 is rounding noise, :mod:`benchmarks.bench_precision`); a bf16 column is given beside it
  for comparison only;
* sequences: the config's E = 512, U = 16 × 8 = 128, ``max_new_tokens`` 512; prompts of 120 tokens
  (GSM8K question + chat template + system prompt) and every response at its 512-token maximum
  (an upper bound: compaction pads each chunk to its longest row);
* the run's calls: a 9-η probe with K = 1, a sweep of ``n_points + 1`` η with K = 4, δH₁ (forward
  mode, K = 4), influence (true: N_U columns; first order: forward mode, K = N_U), per-sequence
  gradients of U, the proxy (one forward of U), token influence (one reverse pass over E, one jvp
  over U), controls (the entropy bonus's gradient: one reverse pass over U, then δH₁ along it over
  E); no kernel (off in the config);
* FLOPs of a forward: ``2·(non-embedding parameters)`` per token plus ``2·D·V`` per scored
  position (the head) plus attention ``4·layers·D·T`` per token;
* GPU: 67 TFLOP/s float32 (no TF32: torch's default for matmuls) or 989 TFLOP/s dense bf16 (H100
  SXM and H200 datasheets), at 35 % utilisation for every
  teacher-forced stage (with a pessimistic 15 % beside it); sampling is not taken from the CPU (where
  decoding is memory-bound: every step reads all weights): each of its steps costs the larger of its
  FLOPs at that utilisation and its bytes (weights + the KV cache read, 4 or 2 bytes per value) at
  3.35 TB/s (H100 SXM),
  plus 10 ms of per-step overhead (top-p, Python);
* every teacher-forced row runs its prompt (prompt sharing, ``compute.share_prompts``, is left out:
  with 8 responses per 120-token prompt it saves ~17 % of the tokens, so the figures are upper
  bounds in that respect too);
* the CPU's cost ratios carry over to the GPU (on a GPU vmap over directions is expected to be
  *cheaper* than on this CPU, so the δH₁ and influence rows are upper bounds);
* 8 GPUs: every stage shards rows of E (or columns of influence) evenly across ranks, with 60 s of
  fixed cost per rank (loading, sampling start-up, gathers); U's gradients are sharded by rows.
"""

from __future__ import annotations

from typing import Any

PEAK = {"float32": 67e12, "bfloat16": 989e12}
BYTES = {"float32": 4, "bfloat16": 2}
UTIL = 0.35
UTIL_LOW = 0.15

QWEN15 = {"hidden": 1536, "layers": 28, "intermediate": 8960, "vocab": 151936, "kv_dim": 256}
QWEN05 = {"hidden": 896, "layers": 24, "intermediate": 4864, "vocab": 151936, "kv_dim": 128}


def layer_params(m: dict[str, int]) -> int:
    d, i, kv = m["hidden"], m["intermediate"], m["kv_dim"]
    return d * d * 2 + d * kv * 2 + 3 * d * i  # q, o, k, v, gate, up, down


def forward_flops(m: dict[str, int], n: int, tokens: int, scored: int) -> float:
    """FLOPs of one teacher-forced forward of ``n`` sequences of ``tokens`` tokens, ``scored`` of
    which go through the head."""
    body = 2 * m["layers"] * layer_params(m) * tokens
    attn = 4 * m["layers"] * m["hidden"] * tokens * tokens / 2  # causal: half the square
    head = 2 * m["hidden"] * m["vocab"] * scored
    return n * (body + attn + head)


def multipliers(pt: dict[str, Any]) -> dict[str, float]:
    """Cost of each stage in plain forwards of its own sequences, per unit of what it scales with."""
    st, p = pt["stages"], pt["point"]
    fwd_e = st["theta_stats"]["cpu_s"]
    # a forward of U (the same lengths, N_U rows)
    fwd_u = fwd_e * p["n_u"] / p["n_e"]
    out = {"sweep_per_direction": st["sweep"]["cpu_s"] / fwd_e / p["k"],
           "fo_forward_per_direction": st["fo_forward"]["cpu_s"] / fwd_e / p["k"],
           "influence_true_per_column": st["influence_true"]["cpu_s"] / fwd_e / p["n_u"],
           "influence_fo_per_column": st["influence_fo"]["cpu_s"] / fwd_e / p["n_u"],
           "directions": st["directions"]["cpu_s"] / fwd_u,
           # reverse mode costs one backward whatever K (flat in K): per call, not per direction
           "fo_reverse_per_call": st["fo_reverse"]["cpu_s"] / fwd_e}
    return out


BANDWIDTH = 3.35e12
STEP_OVERHEAD = 0.010


def decode_seconds(m: dict[str, int], rows: int, prompt: int, resp: int, util: float,
                   dtype: str = "float32") -> float:
    """``dh.sample`` of ``rows`` rows × ``resp`` steps: per step, FLOPs or bytes, whichever is slower."""
    peak, nb = PEAK[dtype], BYTES[dtype]
    body = m["layers"] * layer_params(m)
    emb = m["vocab"] * m["hidden"]
    flops = rows * (2 * body + 2 * emb)  # per step: every row's new token through the body and head
    total = 0.0
    for t in range(resp):
        ctx = prompt + t
        kv_bytes = rows * ctx * m["layers"] * 2 * m["kv_dim"] * nb
        total += max(flops / (peak * util), (nb * (body + emb) + kv_bytes) / BANDWIDTH) + STEP_OVERHEAD
    return total


def extrapolate(pt: dict[str, Any], n_points: int = 9, prompt: int = 120, resp: int = 512,
                n_e: int = 512, n_u: int = 128) -> dict[str, Any]:
    """The 1.5B config's wall time on 1 and 8 GPUs in float32 (what the config computes in), with
    the same in bf16 beside it (``bfloat16``)."""
    out = _extrapolate(pt, n_points, prompt, resp, n_e, n_u, "float32")
    out["bfloat16"] = {k: v for k, v in _extrapolate(pt, n_points, prompt, resp, n_e, n_u, "bfloat16").items()
                       if k.startswith("gpu") or k == "stages"}
    return out


def _extrapolate(pt: dict[str, Any], n_points: int, prompt: int, resp: int, n_e: int, n_u: int,
                 dtype: str) -> dict[str, Any]:
    peak = PEAK[dtype]
    m = multipliers(pt)
    f_e = forward_flops(QWEN15, n_e, prompt + resp, resp)
    f_u = forward_flops(QWEN15, n_u, prompt + resp, resp)
    n_eta = n_points + 1
    calls = {  # stage → FLOPs (sampling: seconds, below)
        "θ-side statistics": f_e,
        "η probe (9 η, K = 1)": 9 * m["sweep_per_direction"] * f_e,
        "δH₁ forward mode (K = 4)": 4 * m["fo_forward_per_direction"] * f_e,
        f"true sweep ({n_eta} η, K = 4)": n_eta * 4 * m["sweep_per_direction"] * f_e,
        f"per-sequence gradients + AdamW (N_U = {n_u})": m["directions"] * f_u,
        f"influence, true ({n_u} columns)": n_u * m["influence_true_per_column"] * f_e,
        f"influence, first order ({n_u} columns)": n_u * m["influence_fo_per_column"] * f_e,
        "covariance proxy (one forward of U)": f_u,
        "token influence (reverse over E, jvp over U)": m["fo_reverse_per_call"] * f_e
        + m["fo_forward_per_direction"] * f_u,
        "controls (entropy-bonus gradient over U, δH₁ along it)": m["fo_reverse_per_call"] * f_u
        + m["fo_forward_per_direction"] * f_e,
    }
    t_dec = sum(decode_seconds(QWEN15, r, prompt, resp, UTIL, dtype) for r in (n_e, n_u))
    t_dec_low = sum(decode_seconds(QWEN15, r, prompt, resp, UTIL_LOW, dtype) for r in (n_e, n_u))
    dec8 = sum(decode_seconds(QWEN15, -(-r // 8), prompt, resp, UTIL, dtype) for r in (n_e, n_u))
    dec8_low = sum(decode_seconds(QWEN15, -(-r // 8), prompt, resp, UTIL_LOW, dtype) for r in (n_e, n_u))
    rows = [{"stage": f"sample E and U ({n_e} + {n_u} rows × {resp} steps, two dh.sample calls)",
             "pflop": None, "gpu1_s": t_dec, "gpu1_s_at_15pct": t_dec_low}]
    total, total_low = t_dec, t_dec_low
    for name, flops in calls.items():
        t = flops / (peak * UTIL)
        rows.append({"stage": name, "pflop": flops / 1e15, "gpu1_s": t,
                     "gpu1_s_at_15pct": t * UTIL / UTIL_LOW})
        total += t
        total_low += t * UTIL / UTIL_LOW
    return {
        "label": "EXTRAPOLATION from CPU cost ratios and FLOP counts, not a measurement",
        "config": "configs/qwen2.5-1.5b-lora-gsm8k.yaml",
        "assumptions": {
            "model": f"Qwen2.5-1.5B computed in {dtype}, LoRA r = 16 on all linear layers",
            "dtype": dtype,
            "sequences": {"n_e": n_e, "n_u": n_u, "prompt_tokens": prompt, "response_tokens": resp},
            "gpu_peak_flops": peak, "utilisation": UTIL, "utilisation_low": UTIL_LOW,
            "decode_overhead_s_per_step": STEP_OVERHEAD, "memory_bandwidth": BANDWIDTH, "eta_points": n_eta,
            "per_rank_fixed_s_8_gpus": 60.0,
            "cost_ratios_from": {k: pt["point"][k] for k in ("n_e", "n_u", "prompt", "resp", "k")},
        },
        "multipliers": m,
        "forward_pflop": {"E": f_e / 1e15, "U": f_u / 1e15},
        "stages": rows,
        "gpu1_total_s": total,
        "gpu1_total_s_at_15pct": total_low,
        # 8 ranks: teacher-forced work splits 8 ways; decoding splits its rows (steps do not shrink)
        "gpu8_total_s": (total - t_dec) / 8 + dec8 + 60.0,
        "gpu8_total_s_at_15pct": (total_low - t_dec_low) / 8 + dec8_low + 60.0,
    }
