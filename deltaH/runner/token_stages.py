"""The token-level stages of a run: each update token's exact influence on the entropy, and the
scoreboard of the published token-level rules against it (docs/math.md#token-influence,
docs/math.md#proxy-scoreboard).

``token_influence`` (stage): ``X`` on E by one reverse pass, then one ``jvp`` over U
(:func:`deltaH.estimators.token_influence.token_influence`), with the loss weights of the step: a
sampled U's ``coef_i`` on every token of row ``i``, or a replayed step's per-token weights.
``proxies`` (stage): every rule of :data:`deltaH.estimators.proxies.PROXIES` on the same tokens and
:func:`deltaH.scoreboard.scoreboard` against the exact values and, when ``analyses.influence`` ran,
the measured per-sequence ΔH (true SNIS influence columns at η_ref).
The summary section, the arrays, the per-token rows and the study columns are built here as well,
so that the rest of the runner only calls into this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from deltaH.config import Config
from deltaH.estimators.first_order import entropy_gradient
from deltaH.estimators.proxies import PROXIES, proxy_predictions
from deltaH.estimators.token_influence import TokenInfluence, sequence_token_weights, token_influence
from deltaH.io import schema as sc
from deltaH.io.progress import progress_bar
from deltaH.io.results import ResultsDir
from deltaH.runner.stages import Batches, Directions, InfluencePair, Inputs
from deltaH.scoreboard import Est, RuleScore, Scoreboard, scoreboard
from deltaH.stats import SequenceStats

log = logging.getLogger(__name__)
N_BOOT = 200
TOP_TOKENS = 10
NOT_IMPLEMENTED = {
    "entropy_polarity": "Zhang et al., arXiv 2605.11775: its abstract describes a signed first-order token "
    "quantity (a sampled-token term and a distributional correction) but no formula or code is public, "
    "so it cannot be transcribed faithfully",
}


@dataclass(frozen=True)
class ProxyScores:
    """The rules' predictions ``[n_rules, M, T]`` (``names`` in order, oriented as ΔH, 0 outside the
    scored tokens), their scoreboard, and whether it used the measured per-sequence ΔH."""

    names: list[str]
    predictions: Tensor
    board: Scoreboard
    measured: bool


def loss_temperature(cfg: Config, dr: Directions) -> float:
    """The τ of the trainer's ``log softmax(z/τ)``: a replayed step's own, else ``policy.temperature``."""
    if dr.replay is not None and dr.replay.options.get("temperature") is not None:
        return float(dr.replay.options["temperature"])
    return float(cfg.policy.temperature)


def token_influence_stage(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats
) -> TokenInfluence:
    """Each update token's exact first-order effect on E's entropy, per unit lr."""
    up = bt.update.batch
    if dr.replay is not None:
        weights = dr.replay.token_weights
    else:
        weights = sequence_token_weights(dr.update.coef, up.n_tokens)
    x = entropy_gradient(inp.params, bt.eval.batch, lm=inp.lm, policy=inp.policy,
                         tf_batch_size=cfg.compute.tf_batch_size, entropy_mode=cfg.analyses.entropy_mode,
                         head_chunk=cfg.compute.head_chunk, base=base,
                         share_prompts=cfg.compute.share_prompts,
                         on_progress=progress_bar("token influence: ∇ of δH₁ on E", inp.quiet))
    state = inp.ckpt.optimizer_state
    maximize = {n for n in inp.params if state is not None and n in state.hyper and state.hyper[n].maximize}
    return token_influence(inp.lm, inp.params, up, x, dr.update, weights,
                           temperature=loss_temperature(cfg, dr), maximize=maximize,
                           tf_batch_size=cfg.compute.tf_batch_size, head_chunk=cfg.compute.head_chunk,
                           share_prompts=cfg.compute.share_prompts)


def token_influence_local(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, base: SequenceStats
) -> TokenInfluence:
    """:func:`token_influence_stage` over all of E on this rank alone (no collectives): rank 0 of a
    distributed run computes it and broadcasts, so the result is one process's, bit for bit."""
    from deltaH import _dist

    with _dist.local():
        return token_influence_stage(cfg, inp, bt, dr, base)


def proxies_stage(
    cfg: Config, inp: Inputs, bt: Batches, dr: Directions, ti: TokenInfluence, inf: InfluencePair | None
) -> ProxyScores:
    """The published rules on U's tokens and their scoreboard (module docstring)."""
    stats = {"logp": ti.logp, "entropy": ti.entropy, "sum_p2": ti.sum_p2, "sum_p2_logp": ti.sum_p2_logp,
             "mask": ti.mask}
    preds = proxy_predictions(stats, bt.update.advantages.double().cpu())
    measured = None if inf is None else inf.true.column_delta_h.double().cpu().numpy()
    board = scoreboard(
        ti.influence.numpy(),
        {k: v.numpy() for k, v in preds.items()},
        ti.mask.numpy(),
        measured,
        n_boot=N_BOOT,
        seed=inp.seeds.seed,
    )
    return ProxyScores(list(preds), torch.stack(list(preds.values())), board, measured is not None)


# ---------------------------------------------------------------------------------- the results folder
def _est(e: Est) -> sc.ScoreEstimate:
    return sc.ScoreEstimate(e.value, e.se)


def _rule(r: RuleScore) -> sc.RuleScoreInfo:
    meta = {p.name: p for p in PROXIES}.get(r.name)
    return sc.RuleScoreInfo(
        name=r.name,
        label=meta.label if meta is not None else "exact token influence (δH₁)",
        source=meta.source if meta is not None else "deltaH",
        spearman=_est(r.spearman),
        sign_agreement=_est(r.sign),
        topk=[sc.TopKInfo(t.budget, t.k, _est(t.precision), _est(t.recall), _est(t.share),
                          _est(t.exact_share)) for t in r.topk],
        seq_spearman=_est(r.seq_spearman),
        seq_sign_agreement=_est(r.seq_sign),
    )


def _token_text(tokenizer: Any, token_id: int) -> str | None:
    try:
        return str(tokenizer.decode([token_id]))
    except Exception:  # a tokenizer that cannot decode one id alone: leave the text out
        return None


def _token_ids(bt: Batches, width: int) -> np.ndarray:
    """``[M, T]`` ids of the scored update tokens in the token-influence layout (−1 in the padding)."""
    up = bt.update.batch
    out = np.full((len(up), width), -1, dtype=np.int64)
    for i in range(len(up)):
        ids = up.input_ids[i][up.response_mask[i]].cpu().numpy()
        out[i, : ids.size] = ids
    return out


def proxies_summary(
    inp: Inputs, bt: Batches, dr: Directions, ti: TokenInfluence, px: ProxyScores | None
) -> sc.ProxiesInfo:
    """The typed ``proxies`` section of ``summary.json``."""
    eta = dr.eta_ref
    s = eta * ti.influence.numpy()
    ids = _token_ids(bt, s.shape[1])
    adv = bt.update.advantages.double().cpu().numpy()
    flat = np.flatnonzero(ti.mask.numpy().reshape(-1))
    order = flat[np.argsort(-np.abs(s.reshape(-1)[flat]), kind="stable")][:TOP_TOKENS]
    preds = None if px is None else px.predictions.numpy()
    top = []
    for f in order.tolist():
        i, k = divmod(f, s.shape[1])
        top.append(sc.TopToken(
            row=i, index=k, token_id=int(ids[i, k]), text=_token_text(inp.tokenizer, int(ids[i, k])),
            delta_h1=float(s[i, k]), weight=float(ti.weights[i, k]), advantage=float(adv[i]),
            logp=float(ti.logp[i, k]), entropy=float(ti.entropy[i, k]),
            proxies={} if px is None or preds is None else {n: float(preds[j, i, k])
                                                            for j, n in enumerate(px.names)},
        ))
    board = None if px is None else px.board
    return sc.ProxiesInfo(
        eta=eta,
        temperature=ti.temperature,
        n_tokens=int(ti.mask.sum()),
        n_sequences=int(ti.mask.shape[0]),
        delta_h1_grad=eta * ti.total,
        measured=bool(px is not None and px.measured),
        n_boot=0 if board is None else board.n_boot,
        seed=0 if board is None else board.seed,
        exact=None if board is None else _rule(board.exact),
        rules=[] if board is None else [_rule(r) for r in board.rules],
        not_implemented=dict(NOT_IMPLEMENTED),
        top_tokens=top,
    )


def write_token_arrays(
    rd: ResultsDir, dr: Directions, ti: TokenInfluence | None, px: ProxyScores | None
) -> None:
    """``arrays/token_influence.npy`` (δH₁ of each update token at η_ref) and ``token_proxies.npy``."""
    if ti is None:
        return
    rd.save_array("token_influence", dr.eta_ref * ti.influence.numpy(),
                  "δH₁ at η_ref of each scored update token [N_U, T] (k-th scored token of row i at [i, k], "
                  "0 in the padding); Σ = δH₁ along grad")
    if px is not None:
        rd.save_array("token_proxies", px.predictions.numpy(),
                      f"each rule's predicted entropy change of each update token [n_rules, N_U, T], rules "
                      f"{px.names} (oriented as ΔH, up to a positive factor; 0 in the padding)")


def token_rows(rows: list[dict[str, Any]], bt: Batches, dr: Directions, ti: TokenInfluence | None,
               px: ProxyScores | None) -> list[dict[str, Any]]:
    """``batches/update.jsonl`` rows with each scored token's id, loss weight, δH₁ at η_ref and the
    rules' predictions (``output.detail`` detailed and debug)."""
    if ti is None:
        return rows
    ids = _token_ids(bt, ti.influence.shape[1])
    for i, r in enumerate(rows):
        n = int(ti.mask[i].sum())
        r.update(token_ids=ids[i, :n].tolist(), token_weight=ti.weights[i, :n].tolist(),
                 token_delta_h1=(dr.eta_ref * ti.influence[i, :n]).tolist())
        if px is not None:
            r["token_proxies"] = {name: px.predictions[j, i, :n].tolist() for j, name in enumerate(px.names)}
    return rows


def study_columns(s: dict[str, Any]) -> dict[str, Any]:
    """Each rule's token-level Spearman against the exact token influence, for a study row."""
    px = s.get("proxies") or {}
    return {f"spearman_{r['name']}": (r.get("spearman") or {}).get("value") for r in px.get("rules") or []}
