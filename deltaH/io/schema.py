"""The typed results schema: what ``summary.json`` holds, as frozen dataclasses.

The runner builds a :class:`RunSummary`; :meth:`RunSummary.to_json` gives the plain JSON layout
of ``summary.json`` (NaN and inf become ``null``) and :meth:`RunSummary.from_json` reads it back,
so plots, the report and ``deltah inspect`` use attributes, not string keys.
The ``summary.json`` table of ``docs/results-schema.md`` is generated from the ``help`` metadata
below by :func:`describe_results`; ``python -m deltaH.io.schema --write docs/results-schema.md``
rewrites it between the file's markers, and a test keeps it current.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

BEGIN = "<!-- generated: describe_results (python -m deltaH.io.schema --write docs/results-schema.md) -->"
END = "<!-- end generated -->"


def _f(help: str, default: Any = dataclasses.MISSING) -> Any:
    if default is dataclasses.MISSING:
        return field(metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class FirstOrderLine:
    slope: float = _f("dΔH/dη at η = 0 (δH₁ = η·slope), forward mode")
    stderr_slope: float = _f("jackknife standard error of the slope over evaluation sequences")
    delta_h: list[float] = _f("δH₁ at each η of the grid [n_eta]")


@dataclass(frozen=True)
class LineFit:
    slope_origin: float = _f("least-squares slope of ΔH vs η through the origin (trusted η only)")
    r2_origin: float = _f("R² of the line through the origin")
    slope: float = _f("slope of the line with intercept")
    intercept: float = _f("intercept of that line")
    r2: float = _f("R² of the line with intercept")
    loglog_slope: float = _f("slope of log|ΔH| vs log η (1 = linear; null when ΔH changes sign)")
    n_points: int = _f("number of trusted η the fits used")


@dataclass(frozen=True)
class Decomposition:
    delta_h: list[float] = _f("true ΔH (SNIS) at each η [n_eta], nats per sequence")
    delta_h_per_token: list[float] = _f("the per-token variant of ΔH [n_eta]")
    ess: list[float] = _f("effective sample size of the importance weights [n_eta]")
    khat: list[float | None] = _f("PSIS k̂ of the weights [n_eta] (null: equal weights)")
    logw_max: list[float] = _f("largest log importance weight [n_eta]")
    logw_min: list[float] = _f("smallest log importance weight [n_eta]")
    retained_mass: list[float] = _f("mean unnormalised weight: estimate of q_θ' mass on q_θ's nuclei [n_eta]")
    nucleus_changed: list[float] = _f("fraction of E's scored positions whose top-p nucleus moved [n_eta]")
    first_order: FirstOrderLine | None = _f("δH₁ beside ΔH (null: analyses.first_order off)")
    second_order: list[float] | None = _f("½η²·d²ΔH/dη² [n_eta] (null: analyses.second_order off)")
    fit: LineFit = _f("lines through the trusted part of the sweep")


@dataclass(frozen=True)
class TrustRuleInfo:
    min_ess_frac: float = _f("an η is too large when ESS < min_ess_frac·N")
    khat_min_dispersion: float = _f("k̂ counts only when the weights vary: N/ESS − 1 above this")
    min_retained: float = _f("top-p: too large when the retained mass is below this")
    max_nucleus_changed: float = _f("top-p: too large when more than this fraction of E's nuclei moved")
    max_dev: float = _f("ΔH follows δH₁ when |ΔH − δH₁| ≤ max_dev·|δH₁|")


@dataclass(frozen=True)
class DecompositionTrust:
    trusted: list[bool] = _f("per η: is this decomposition's ΔH trustworthy [n_eta]")
    eta_min: float = _f("smallest trusted η (null: none)")
    eta_max: float = _f("largest trusted η (null: none)")
    precision_floor: float = _f("largest η below the precision floor (null: none found)")
    notes: list[str] = _f("the reasons, in words")


@dataclass(frozen=True)
class EtaVerdict:
    eta: float = _f("the η")
    trusted: bool = _f("trusted for every decomposition")
    reasons: dict[str, list[str]] = _f('per decomposition, why not ("<kind>: <details>"; empty: trusted)')


@dataclass(frozen=True)
class TrustInfo:
    eta_min: float = _f("smallest trusted η of the full update (null: none trusted)")
    eta_max: float = _f("largest trusted η of the full update (null: none trusted)")
    precision_floor: float = _f("largest η of the full update below the precision floor (null: none found)")
    trusted: list[bool] = _f("per η: is ΔH of the full update trustworthy there [n_eta]")
    notes: list[str] = _f("why η values of the full update were not trusted")
    khat_threshold: float = _f("PSIS k̂ threshold for this N: min(1 − 1/log10 N, 0.7)")
    noise: float = _f("σ = ε(dtype)·(|H|/√T)·√(2/N) (T: scored tokens per sequence), the order of "
                        "magnitude of ΔH's rounding noise in nats")
    dtype: str = _f("the dtype the logits were computed in")
    top_p: bool = _f("whether the policy truncates (retained mass and nucleus moves are checked)")
    rule: TrustRuleInfo = _f("the thresholds the verdicts used")
    decompositions: dict[str, DecompositionTrust] = _f("the verdicts of each decomposition")
    per_eta: list[EtaVerdict] = _f("every η's verdict and reasons, for every decomposition")

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrustInfo:
        return typing.cast(TrustInfo, _build(cls, d))

    def warning_lines(self) -> list[str]:
        """One line per decomposition with an untrusted η, from ``per_eta``
        (:func:`deltaH.analysis.trust_warnings`: the lines the runner adds to ``warnings``)."""
        from deltaH.analysis import trust_warnings

        return trust_warnings({"per_eta": _plain(self.per_eta)})


@dataclass(frozen=True)
class TopUpdate:
    row: int = _f("row of the update sequence in batches/update.jsonl")
    delta_h: float = _f("true ΔH along its component ĉ_i at η_ref (column sum of the influence matrix)")
    reward: float = _f("its reward (null: unknown)")
    advantage: float = _f("its advantage")
    prompt: str | None = _f("its prompt text")
    response: str | None = _f("its response text")


@dataclass(frozen=True)
class TopEval:
    row: int = _f("row of the evaluation sequence in batches/eval.jsonl")
    delta_h: float = _f("its total contribution to ΔH over all components (row sum)")


@dataclass(frozen=True)
class InfluenceInfo:
    eta: float = _f("η of the influence matrices (eta.reference)")
    kind: list[str] = _f('the matrices saved: ["true", "first_order"]')
    column_delta_h: list[float] = _f("true ΔH along each update sequence's component [N_U]")
    column_delta_h1: list[float] = _f("δH₁ along each component [N_U]")
    top_update: list[TopUpdate] = _f("the 10 update sequences with the largest |ΔH|")
    top_eval: list[TopEval] = _f("the 10 evaluation sequences with the largest |row sum|")


@dataclass(frozen=True)
class GroupEstimate:
    delta_h: float = _f("the group's ΔH at η_ref: the sum of its sequences' contributions, nats per sequence")
    se: float = _f("jackknife standard error of delta_h over evaluation sequences")
    share: float = _f("delta_h / total, total = Σ over all update sequences + the baseline (may exceed 1 or "
                      "be negative when groups pull in opposite directions)")
    share_se: float = _f("jackknife standard error of share")


@dataclass(frozen=True)
class TagGroup:
    label: str = _f('the group, e.g. "negative advantage", "truncated (no EOS)", "Q1: 2–3 tokens", '
                    '"group 3: <prompt>"')
    n: int = _f("number of update sequences in it (0 for the baseline)")
    true: GroupEstimate = _f("from the true (SNIS) contributions")
    first_order: GroupEstimate = _f("from the first-order contributions δH₁")


@dataclass(frozen=True)
class TagFamily:
    name: str = _f("advantage_sign | reward | truncation | length_quartile | prompt_group")
    title: str = _f("the family in words")
    groups: list[TagGroup] = _f("its non-empty groups, a partition of U")


@dataclass(frozen=True)
class AttributedSequence:
    row: int = _f("row of the update sequence in batches/update.jsonl")
    delta_h: float = _f("true ΔH along its component at η_ref (its contribution)")
    delta_h_se: float = _f("jackknife standard error of delta_h")
    delta_h1: float = _f("δH₁ along its component")
    delta_h1_se: float = _f("jackknife standard error of delta_h1")
    advantage: float = _f("its advantage")
    reward: float = _f("its reward (null: unknown)")
    truncated: bool = _f("true when the response did not end with EOS")
    length: int = _f("response tokens")
    group: int = _f("its same-prompt group")
    response: str | None = _f("its response text")


@dataclass(frozen=True)
class AttributionInfo:
    eta: float = _f("η of the attribution (eta.reference)")
    update: TagGroup = _f("all update sequences together (Σ_i of the contributions)")
    baseline: TagGroup = _f("the momentum + weight-decay part of the step (decomposition baseline)")
    total: TagGroup = _f("update + baseline: the total the shares refer to")
    families: list[TagFamily] = _f("per tag family, ΔH, share and standard errors of each group")
    omitted: dict[str, str] = _f("tag families left out, with the reason (e.g. rewards not binary)")
    top_raise: list[AttributedSequence] = _f("up to 5 update sequences that raise the entropy most (true ΔH)")
    top_lower: list[AttributedSequence] = _f("up to 5 update sequences that lower the entropy most")


@dataclass(frozen=True)
class KernelFidelity:
    spearman: float = _f("rank correlation of the projected and the exact entries over the checked pairs")
    pearson: float = _f("linear correlation over the checked pairs")
    rel_error: float = _f("‖K̂ − K‖_F / ‖K‖_F over the checked pairs")
    col_sum_rel_error: float = _f("the same for the checked columns' sums Σ_t K[t, i]")
    n_pairs: int = _f("checked pairs: N_E × n_columns")
    n_columns: int = _f("update sequences whose exact column was computed (analyses.kernel_check_columns)")


@dataclass(frozen=True)
class KernelInfo:
    method: str = _f("exact | projection")
    mean_same: float = _f("mean kernel entry over same-prompt (E, U) pairs (null: no such pair)")
    mean_diff: float = _f("mean over different-prompt pairs")
    abs_same: float = _f("mean |entry| over same-prompt pairs")
    abs_diff: float = _f("mean |entry| over different-prompt pairs")
    n_same: int = _f("number of same-prompt pairs (a pair shares a prompt when its two prompts have the same "
                     "tokens)")
    n_diff: int = _f("number of different-prompt pairs")
    median_abs_same: float = _f("median |entry| over same-prompt pairs (null: none)", math.nan)
    median_abs_diff: float = _f("median |entry| over different-prompt pairs (null: none)", math.nan)
    proj_dim: int | None = _f("projection: CountSketch buckets k (null: exact)", None)
    subspace: int | None = _f("projection: dimensions of U's subspace kept exactly, ≤ N_U (null: exact)",
                              None)
    memory_fraction: float = _f(
        "projection: floats it keeps / the exact kernel's (N_E + N_U)·P (null: exact)", math.nan)
    check_memory_fraction: float = _f(
        "projection: floats its fidelity check adds, same unit (null: exact)", math.nan)
    fidelity: KernelFidelity | None = _f(
        "projection: its fidelity against the exact entries of analyses.kernel_check_columns random update "
        "sequences (null: exact, or no check)", None)


@dataclass(frozen=True)
class ProxyInfo:
    cov: float = _f("token-level Cov(log π(y_t), A) on U (Cui et al. 2025)")
    delta_h_per_token: float = _f("the proxy's ΔH per token at η: −η·cov")
    delta_h_per_sequence: float = _f("per sequence: −η·cov·mean response length")
    mean_response_tokens: float = _f("mean response length of U")
    eta: float = _f("η of the proxy (eta.reference)")


@dataclass(frozen=True)
class ScoreEstimate:
    value: float = _f("the statistic (null: undefined, e.g. no token lowers the entropy)")
    se: float = _f("its bootstrap standard error over update sequences (null: not computed)")


@dataclass(frozen=True)
class TopKInfo:
    budget: float = _f("fraction of U's scored tokens selected (Clip-Cov / KL-Cov budgets: 0.0002, 0.002, "
                       "0.02)")
    k: int = _f("tokens selected: max(1, ⌊budget · n_tokens⌋)")
    precision: ScoreEstimate = _f("of the rule's k most entropy-lowering tokens, the fraction in the exact k")
    recall: ScoreEstimate = _f("of the exact k most entropy-lowering tokens, the fraction the rule selects")
    share: ScoreEstimate = _f("Σ of the exact token influence over the rule's selection / Σ over all tokens "
                              "(the fraction of δH₁ along grad its tokens carry)")
    exact_share: ScoreEstimate = _f("the same for the exact selection (the best any rule can do)")


@dataclass(frozen=True)
class RuleScoreInfo:
    name: str = _f("covariance | steer | wang_s | wang_xd | sign_rule (exact: the token influence itself)")
    label: str = _f("the rule's predicted per-token entropy change, in words")
    source: str = _f("where the rule comes from")
    spearman: ScoreEstimate = _f("rank correlation with the exact token influence over U's scored tokens")
    sign_agreement: ScoreEstimate = _f("fraction of tokens (exact ≠ 0) whose predicted sign is the exact "
                                       "sign")
    topk: list[TopKInfo] = _f("its top-k token selections against the exact ones, one per budget")
    seq_spearman: ScoreEstimate = _f("rank correlation of its per-sequence sums with the measured ΔH of each "
                                     "update sequence (true SNIS influence columns at η_ref; null: "
                                     "analyses.influence off)")
    seq_sign_agreement: ScoreEstimate = _f("fraction of update sequences whose summed prediction has the "
                                           "measured ΔH's sign")


@dataclass(frozen=True)
class TopToken:
    row: int = _f("update sequence (row of batches/update.jsonl)")
    index: int = _f("k: the k-th scored token of the row")
    token_id: int = _f("its token id")
    text: str | None = _f("the token decoded alone (null: the tokenizer cannot)")
    delta_h1: float = _f("its δH₁ at η_ref, nats per sequence of E")
    weight: float = _f("its loss weight ∂L/∂log π")
    advantage: float = _f("its sequence's advantage")
    logp: float = _f("log π(y) under softmax(z/τ)")
    entropy: float = _f("H of softmax(z/τ) at its position")
    proxies: dict[str, float] = _f("each rule's predicted change (oriented as ΔH, up to a positive factor)")


@dataclass(frozen=True)
class ProxiesInfo:
    eta: float = _f("η of the token influence (eta.reference)")
    temperature: float = _f("τ of the trainer's log π = log softmax(z/τ) the rules and the influence read")
    n_tokens: int = _f("scored tokens of U")
    n_sequences: int = _f("update sequences N_U")
    delta_h1_grad: float = _f("Σ over tokens of δH₁ at η: δH₁ along grad (docs/math.md#token-influence)")
    measured: bool = _f("whether the sequence-level scores used the measured per-sequence ΔH")
    n_boot: int = _f("bootstrap resamples of update sequences behind every s.e.")
    seed: int = _f("the bootstrap's seed (config.seed)")
    exact: RuleScoreInfo | None = _f("the exact token influence's own sequence-level scores (null: no "
                                     "scoreboard)")
    rules: list[RuleScoreInfo] = _f("each published rule's scores (docs/math.md#proxy-scoreboard)")
    not_implemented: dict[str, str] = _f("rules left out, with the reason")
    top_tokens: list[TopToken] = _f("the 10 update tokens with the largest |δH₁|")


@dataclass(frozen=True)
class EvalBatchInfo:
    n: int = _f("number of evaluation sequences N_E")
    n_prompts: int = _f("distinct prompts among them")
    group_size: int = _f("responses per prompt")
    mean_tokens: float = _f("mean scored tokens per sequence")


@dataclass(frozen=True)
class UpdateBatchInfo:
    n: int = _f("number of update sequences N_U")
    n_prompts: int = _f("prompts B")
    group_size: int = _f("responses per prompt G")
    mean_tokens: float = _f("mean response tokens")
    mean_reward: float = _f("mean reward (null: unknown, as in a trainer's recorded batch)")
    resampled_groups: int = _f("groups with all-equal rewards that were redrawn")


@dataclass(frozen=True)
class BatchesInfo:
    eval: EvalBatchInfo = _f("E, the evaluation batch")
    update: UpdateBatchInfo = _f("U, the update batch")


@dataclass(frozen=True)
class UpdateInfo:
    loss_type: str = _f("the RL loss (loss.type; a replayed step's: the trainer's loss_type)")
    lr_ref: float = _f("the learning rate of the next step (η = lr_ref reproduces it)")
    clip_coef: float = _f("gradient-clipping factor applied: min(1, max_norm / (‖g‖ + 1e-6))")
    grad_norm: float = _f("norm of the full-batch gradient before clipping")


@dataclass(frozen=True)
class StepDirection:
    name: str = _f("realised (θ_N − θ_{N−1}, read from the next checkpoint), replayed (the recorded step "
                   "rebuilt) or sampled (the step of a sampled U), policy_gradient / kl (a replayed "
                   "step's gradient part split into its two terms)")
    eta: float = _f("the step size it was taken at: 1 for the realised step, the step's lr otherwise")
    delta_h: float = _f("true ΔH (SNIS) on E, nats per sequence")
    delta_h_per_token: float = _f("the per-token variant")
    ess: float = _f("effective sample size of the importance weights")
    khat: float | None = _f("PSIS k̂ of the weights (null: equal weights)")
    retained_mass: float = _f("mean unnormalised weight (top-p: q_θ' mass on q_θ's nuclei)")
    delta_h1: float = _f("δH₁ along it (first order)")
    delta_h1_se: float = _f("jackknife standard error of δH₁")


@dataclass(frozen=True)
class ReplayInfo:
    source: str = _f("where U came from: sampled (drawn from q here), recorded (the trainer's recorded "
                     "step) or file (another trainer's rollouts; update_batch.source)")
    reason: str = _f("why that source (update_batch.source auto chooses)")
    step: int | None = _f("the optimizer step U trained: the checkpoint's global step + 1")
    where: str | None = _f("the step-files folder or rollout file read (null: sampled)")
    trainer_options: dict[str, Any] | None = _f(
        "the trainer's loss-relevant options the replay used (null: sampled U, whose loss is loss.*)")
    clip: dict[str, float] | None = _f(
        "ratio clipping in the replayed step, as TRL logs it (clip_ratio/low_mean, low_min, high_mean, "
        "high_max, region_mean: fractions of loss tokens) and max_ratio_dev = max |ratio − 1| "
        "(null: sampled U)")
    next_checkpoint: str | None = _f("the checkpoint saved after that step (null: none, so no realised step)")
    step_error: float = _f("‖lr·full − (θ_N − θ_{N−1})‖ / ‖θ_N − θ_{N−1}‖: the replay against what "
                           "happened (≈ 1e-6 for an exact float32 replay; large for a sampled U; null: "
                           "no next checkpoint)")
    directions: list[StepDirection] = _f("ΔH on E along the realised step beside the rebuilt one, and the "
                                         "policy-gradient / KL parts of a replayed step with a KL term")


@dataclass(frozen=True)
class ControlDirection:
    name: str = _f("step (the step analysed), term (the coefficient's own direction at the value found), "
                   "controlled (step + term: D and clipping held at this step's values) or trainer (the "
                   "AdamW step a trainer with that coefficient takes: D and clipping recomputed)")
    delta_h: float = _f("true ΔH (SNIS) on E at eta_reference, nats per sequence")
    delta_h_per_token: float = _f("the per-token variant")
    ess: float = _f("effective sample size of the importance weights")
    khat: float | None = _f("PSIS k̂ (null: equal weights)")
    delta_h1: float = _f("δH₁ at eta_reference (controlled: the target, by construction)")
    delta_h1_se: float = _f("its jackknife standard error")
    second_order: float = _f("½η²·d²ΔH/dη² at eta_reference: the predicted ΔH − δH₁ (controlled only; null "
                             "elsewhere)")


@dataclass(frozen=True)
class ControlInfo:
    name: str = _f("entropy_coef (the entropy bonus −c·H of TRL's GRPOConfig.entropy_coef, verl's "
                   "entropy_coeff) or beta (the KL coefficient; a replayed step with β > 0 only)")
    coef: float = _f("the coefficient that makes δH₁ at eta_reference equal the target (null: none does)")
    coef_se: float = _f("its jackknife standard error over the evaluation sequences")
    current: float = _f("the coefficient in the step analysed (entropy_coef: 0; beta: the trainer's)")
    slope_base: float = _f("dδH₁/dη of the step without the term (beta: with β = 0)")
    slope_base_se: float = _f("its jackknife standard error")
    slope_term: float = _f("dδH₁/dη of the term per unit coefficient")
    slope_term_se: float = _f("its jackknife standard error")
    directions: list[ControlDirection] = _f(
        "ΔH and δH₁ at eta_reference along step, term, controlled, trainer")


@dataclass(frozen=True)
class ControlsInfo:
    target: float = _f("analyses.entropy_target: the δH₁ at eta_reference aimed at, nats per sequence")
    eta: float = _f("the η of the controls (eta_reference)")
    entropy_u: float = _f("H_U at θ: the bonus's mean per-token entropy of softmax(z/τ) over U's loss tokens "
                          "(TRL's normalisation), nats per token")
    clip_coef: float = _f("this step's gradient-clipping factor (held fixed in 'controlled')")
    controls: list[ControlInfo] = _f("one per coefficient: entropy_coef, and beta for a replayed KL step")
    notes: list[str] = _f("what the reader must know: first order, clipping, unsupported options")


@dataclass(frozen=True)
class ComputeInfo:
    dir_chunk: int = _f("directions per vmap call the estimators used (1: a plain loop, no vmap)")
    dir_chunk_source: str = _f("config (compute.dir_chunk is an integer) | calibrated (compute.dir_chunk is "
                               "auto: the fastest candidate below, timed on this machine and model)")
    candidates: list[int] = _f("the chunk sizes timed: 1, 2, 4, 8, 16 capped at K ([] when not calibrated)")
    seconds: list[float] = _f("median seconds of one true-ΔH evaluation per candidate [len(candidates)]; "
                              "they vary from run to run, the choice is kept for --resume")
    k: int = _f("directions in the timed evaluation (the four decompositions); 0: not calibrated")
    n_sequences: int = _f("sequences of E in the timed evaluation (one teacher-forcing chunk)")
    repeats: int = _f("timed calls per candidate after one warm-up")
    share_prompts: str = _f("compute.share_prompts as applied (auto | on | off): off also where auto met a "
                            "model that cannot share prompts (share_unsupported says why)", "auto")
    share_unsupported: str = _f("why this model cannot share prompts in teacher forcing ('' when it can)", "")


@dataclass(frozen=True)
class RunSummary:
    deltah_version: str = _f("deltaH version that wrote the folder")
    created: str = _f("local time the summary was written (ISO 8601)")
    git_revision: str | None = _f("commit of the deltaH source, when it is a git checkout")
    versions: dict[str, str] = _f("python, torch, transformers, peft and deltaH versions")
    status: str = _f("complete (written once every analysis finished; an unfinished run's state is in "
                     "progress.json)")
    config: dict[str, Any] = _f("the resolved config (as config.yaml)")
    seeds: dict[str, int] = _f("seed of each random draw: seed, eval, update, kernel")
    timings: dict[str, float] = _f("seconds per stage of the run (load, batches, ...), and total")
    checkpoint: dict[str, Any] = _f(
        "the checkpoint: path, kind, global_step, lr (of the next step), logged_lr (the last positive "
        "learning_rate in trainer_state.json's log_history, null: none), max_grad_norm (null: no clipping), "
        "dtype (of the logits), trainable_dtype, n_trainable, adapters, optimizer"
    )
    batches: BatchesInfo = _f("sizes of E and U")
    update: UpdateInfo = _f("the reconstructed AdamW step")
    h_orig: float = _f("entropy at θ, mean over E, nats per sequence")
    h_orig_per_token: float = _f("entropy at θ per token")
    entropy_mode: str = _f("rb (Rao-Blackwellised) | naive (surprisal)")
    eta: list[float] = _f("the η grid [n_eta]")
    eta_reference: float = _f("η of the influence matrix, proxy and fits")
    eta_reference_source: str | None = _f(
        "where eta_reference came from: config (a number in eta.reference) | checkpoint_lr (eta.reference "
        "lr: the checkpoint's next-step lr) | logged_lr (that lr is 0, the end of a schedule: the last "
        "positive learning_rate in the checkpoint's trainer_state.json log_history, the lr of the step that "
        "made it; a warning says so); null: not recorded"
    )
    decompositions: dict[str, Decomposition] = _f("full, baseline, grad, baseline+grad")
    trust: TrustInfo = _f("which η of the sweep are trustworthy, and why not")
    influence: InfluenceInfo | None = _f("null: analyses.influence off")
    attribution: AttributionInfo | None = _f("which tagged groups of U drove ΔH (null: analyses.influence "
                                             "off)")
    kernel: KernelInfo | None = _f("null: analyses.kernel off")
    proxy: ProxyInfo | None = _f("null: analyses.proxy off")
    replay: ReplayInfo = _f("where U came from and, for a step of a run, the step that really happened")
    warnings: list[str] = _f("everything the reader should know before trusting a number")
    proxies: ProxiesInfo | None = _f("every update token's exact first-order effect on the entropy and the "
                                     "scoreboard of published token-level rules against it (null: "
                                     "analyses.token_influence off)", None)
    controls: ControlsInfo | None = _f("the coefficients that put δH₁ at a target, measured (null: "
                                       "analyses.controls off)", None)
    compute: ComputeInfo | None = _f("how the estimators were chunked: the dir_chunk used and, for "
                                     "compute.dir_chunk auto, its calibration (null: not recorded)", None)

    def to_json(self) -> dict[str, Any]:
        """The plain JSON layout of ``summary.json`` (NaN and inf as ``null``)."""
        from deltaH.io.results import to_jsonable

        return typing.cast(dict[str, Any], to_jsonable(_plain(self)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunSummary:
        """Read a ``summary.json``; unknown keys are ignored.

        ``null`` floats become NaN. A key an older folder lacks is filled in: a float with NaN, a
        list with ``[]``, a dict with ``{}``, a record with one built from ``{}``, an optional
        record with ``None``, anything else (int, str, bool) with ``None``; :func:`missing` tells
        such a filled-in value from a recorded one.
        """
        return typing.cast(RunSummary, _build(cls, d))


def missing(x: Any) -> bool:
    """Whether ``x`` holds nothing: None, NaN, an empty list or dict, or a record whose every field is
    missing (what :meth:`RunSummary.from_json` fills in for a key the file lacks)."""
    if x is None:
        return True
    if isinstance(x, float):
        return math.isnan(x)
    if isinstance(x, list | dict | tuple):
        return not x
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return all(missing(getattr(x, f.name)) for f in dataclasses.fields(x))
    return False


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    return x


def _build(tp: Any, v: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], v)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        v = v or {}  # a record the file lacks: every field filled in as missing
        return typing.cast(Any, tp)(**{k: _build(hints[k], v.get(k)) for k in names})
    if origin is list:  # a single value where a list belongs (an older layout) becomes a list of one
        return [_build(args[0], x) for x in (v if isinstance(v, list) else [] if v is None else [v])]
    if origin is dict:
        return {k: _build(args[1], x) for k, x in (v or {}).items()}
    if tp is float:
        return math.nan if v is None else float(v)
    return v


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _rows(cls: Any, prefix: str, seen: set[Any]) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows: list[str] = []
    nested: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        cells = (f"`{prefix}{f.name}`", f"`{_type_name(tp)}`", f.metadata.get("help", ""))
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        for a in (tp, *typing.get_args(tp)):
            inner = typing.get_args(a)[-1] if typing.get_origin(a) in (list, dict) else a
            listed = inner in seen or any(c is inner for _, c in nested)
            if dataclasses.is_dataclass(inner) and not listed:
                sep = {list: "[].", dict: ".<name>."}.get(typing.get_origin(a), ".")
                nested.append((f"{prefix}{f.name}{sep}", inner))
    for p, c in nested:
        seen.add(c)
        rows.extend(_rows(c, p, seen))
    return rows


def describe_results() -> str:
    """The ``summary.json`` table of ``docs/results-schema.md``, generated from :class:`RunSummary`."""
    lines = ["| key | type | meaning |", "| --- | --- | --- |", *_rows(RunSummary, "", set())]
    return "\n".join(lines) + "\n"


def with_generated_table(text: str) -> str:
    """``text`` (``docs/results-schema.md``) with the part between its markers set to
    :func:`describe_results`."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise ValueError(f"the markers {BEGIN!r} and {END!r} are missing: add them where the table belongs")
    return f"{head}{BEGIN}\n{describe_results()}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deltaH.io.schema", description="the summary.json table")
    ap.add_argument("--write", metavar="MD", type=Path, help="rewrite the table between the markers of MD "
                    "(docs/results-schema.md) instead of printing it")
    args = ap.parse_args(argv)
    if args.write is None:
        print(describe_results(), end="")
    else:
        args.write.write_text(with_generated_table(args.write.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
