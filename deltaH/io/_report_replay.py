"""The report's "The step" section: where U came from and, for a step of a run, what really happened."""

from __future__ import annotations

import math

from deltaH.io._report_common import show, table
from deltaH.io.schema import RunSummary, missing

_LABEL = {
    "realised": "realised step θ_N − θ_{N−1}",
    "replayed": "replayed step (recorded U)",
    "sampled": "rebuilt step (sampled U)",
    "policy_gradient": "policy-gradient part",
    "kl": "β·KL part",
}
_OPTIONS = (
    "loss_type",
    "epsilon_low",
    "epsilon_high",
    "delta",
    "beta",
    "importance_sampling_level",
    "gradient_accumulation_steps",
    "steps_per_generation",
    "num_iterations",
    "temperature",
    "max_grad_norm",
    "world_size",
)


def step(summary: RunSummary) -> list[str]:
    rp = summary.replay
    if missing(rp) or not rp.source:
        return []
    out = ["## The step", ""]
    if rp.source == "sampled":
        out.append(f"U was sampled from the policy here ({rp.reason}); it is not the batch the trainer used.")
    elif rp.source == "recorded":
        out.append(
            f"U is the batch the trainer recorded for step {show(rp.step)} ({rp.where}); the step is "
            "rebuilt from the trainer's own objective and options:"
        )
    else:
        out.append(f"U is another trainer's rollouts ({rp.where}), replayed with the config's loss options:")
    if rp.trainer_options:
        opts = {k: rp.trainer_options.get(k) for k in _OPTIONS if k in rp.trainer_options}
        out.append("")
        out.append(", ".join(f"`{k}` {v}" for k, v in opts.items()) + ".")
    if rp.clip:
        c = rp.clip
        out += [
            "",
            f"Ratio clipping in this step: {show(100 * c.get('clip_ratio/region_mean', math.nan))}% of loss "
            "tokens "
            f"clipped (low {show(100 * c.get('clip_ratio/low_mean', math.nan))}%, high "
            f"{show(100 * c.get('clip_ratio/high_mean', math.nan))}%); largest |ratio − 1| "
            f"{show(c.get('max_ratio_dev', math.nan))}.",
        ]
    out.append("")
    if rp.directions:
        rows = [
            [
                _LABEL.get(d.name, d.name),
                show(d.eta),
                show(d.delta_h),
                show(d.delta_h1),
                show(d.delta_h1_se),
                show(d.ess),
                show(d.khat),
                show(d.retained_mass),
            ]
            for d in rp.directions
        ]
        out += table(
            ["direction", "η", "ΔH", "δH₁", "δH₁ s.e.", "ESS", "k̂", "retained"], rows, drop_empty=True
        )
        out.append("")
    if not math.isnan(rp.step_error):
        exact = rp.source == "recorded" and rp.step_error < 1e-4
        what = (
            "the replay is exact: the realised step is the step deltaH analyses"
            if exact
            else "the rebuilt step is not the realised one"
            + (" (a sampled U is not the trainer's batch)" if rp.source == "sampled" else "")
        )
        out += [
            f"Replay error ‖lr·full − (θ_N − θ_{{N−1}})‖ / ‖θ_N − θ_{{N−1}}‖ = {show(rp.step_error)} "
            f"against {rp.next_checkpoint}: {what}.",
            "",
        ]
    elif rp.next_checkpoint is None and rp.source != "sampled":
        out += ["No checkpoint was saved after this step, so the replay cannot be compared with one.", ""]
    return out
