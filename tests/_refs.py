"""Plain references the fast paths are tested against: transformers' own warpers decide the nucleus,
float64 does the math, and rows, sequences and directions are handled one at a time in ordinary loops.
Nothing here calls deltaH's estimators.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

import deltaH as dh


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def shifted_copy(model: torch.nn.Module, direction: dict, eta: float) -> torch.nn.Module:
    """A deep copy of ``model`` with θ + η·v written into its parameters (no functional_call)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n in direction:
                p.add_(eta * direction[n])
    return m

def hf_keep(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Kept-token mask of transformers' TemperatureLogitsWarper + TopPLogitsWarper on float32 scores."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    z = logits.detach().float().reshape(-1, logits.shape[-1])
    z = TemperatureLogitsWarper(temperature)(None, z)
    if top_p < 1.0:
        z = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(None, z)
    return torch.isfinite(z).reshape(logits.shape)


def ref_token_stats(logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                    top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``log q(target)`` and entropy over HF's kept set: a plain masked softmax."""
    keep = hf_keep(logits, temperature, top_p)
    z = logits.detach().double() / temperature
    logp = torch.log_softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
    ent = -torch.where(keep, logp.exp() * logp, torch.zeros_like(logp)).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), ent


def ref_sequence_stats(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       response_mask: torch.Tensor, temperature: float,
                       top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loop: ``model(row).logits`` on each unpadded row; float64 per-sequence (logq, entropy)."""
    n = input_ids.shape[0]
    logq = torch.zeros(n, dtype=torch.float64)
    ent = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        am = attention_mask[i].bool()
        ids = input_ids[i][am]
        pos = response_mask[i].bool()[am].nonzero().flatten()
        with torch.no_grad():
            logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        lq, en = ref_token_stats(logits[pos - 1], ids[pos], temperature, top_p)
        logq[i], ent[i] = lq.sum(), en.sum()
    return logq, ent


def ref_gpd_shape(x: np.ndarray) -> float:
    """Posterior-mean GPD shape of sorted exceedances ``x`` (Zhang & Stephens 2009, Sec. 3).

    Grid ``θ_j = 1/x_(n) + (1 − sqrt(m/(j − ½))) / (3·x_(⌊n/4 + ½⌋))``, ``m = 30 + ⌊√n⌋``; for each θ
    the profile MLE ``ξ(θ) = mean log(1 − θx)``, ``σ = −ξ/θ``; the GPD log-likelihood
    ``Σ −log σ − (1/ξ + 1)·log(1 + ξx/σ)`` weights the grid (softmax); ``θ̂`` is the weighted mean,
    ``k̂ = mean log(1 − θ̂x)``, then shrunk towards ½ with weight 10 (the arviz/loo prior).
    """
    n = len(x)
    m = 30 + math.floor(math.sqrt(n))
    q1 = x[math.floor(n / 4 + 0.5) - 1]
    thetas = np.array([1 / x[-1] + (1 - math.sqrt(m / (j - 0.5))) / (3 * q1) for j in range(1, m + 1)])
    ll = np.empty(m)
    for j, th in enumerate(thetas):
        xi = np.mean(np.log1p(-th * x))
        sigma = -xi / th
        ll[j] = np.sum(-np.log(sigma) - (1 / xi + 1) * np.log1p(xi * x / sigma))
    w = np.exp(ll - ll.max())
    w /= w.sum()
    theta_hat = float(np.sum(w * thetas))
    k = float(np.mean(np.log1p(-theta_hat * x)))
    return (n * k + 10 * 0.5) / (n + 10)


def ref_khat(logw: np.ndarray) -> float:
    """PSIS k̂ of log-weights ``logw [S]``: fit the ``M = ceil(min(S/5, 3√S))`` largest weights above
    the (M+1)-th largest (floored at the smallest normal float); NaN if ≤ 4 exceed it."""
    lw = np.asarray(logw, dtype=float)
    s = lw.size
    if not np.isfinite(lw.max()):
        return float("nan")
    lw = np.sort(lw - lw.max())
    m_tail = math.ceil(min(0.2 * s, 3 * math.sqrt(s)))
    if s < m_tail + 1:
        return float("nan")
    cutoff = max(lw[s - m_tail - 1], math.log(np.finfo(float).tiny))
    tail = lw[lw > cutoff]
    if tail.size <= 4:
        return float("nan")
    x = np.sort(np.exp(tail) - math.exp(cutoff))
    if not x[-1] > 0:
        return float("nan")
    return ref_gpd_shape(x)


def ref_nucleus_changed(model: torch.nn.Module, direction: dict, eta: float, batch: dh.SequenceBatch,
                        tau: float, top_p: float) -> torch.Tensor:
    """Fraction of scored positions whose kept set (transformers' warpers, full ``[V]`` masks from
    per-row ``model(row).logits``) differs between θ and θ + η·v."""
    shifted = shifted_copy(model, direction, eta)
    moved = total = 0
    for i in range(len(batch)):
        am = batch.attention_mask[i].bool()
        ids = batch.input_ids[i][am].unsqueeze(0)
        pos = batch.response_mask[i].bool()[am].nonzero().flatten() - 1
        with torch.no_grad():
            k0 = hf_keep(model(input_ids=ids).logits[0, pos], tau, top_p)
            k1 = hf_keep(shifted(input_ids=ids).logits[0, pos], tau, top_p)
        moved += int((k0 != k1).any(-1).sum())
        total += int(pos.numel())
    return torch.tensor(moved / total, dtype=torch.float64)


def ref_snis(model: torch.nn.Module, direction: dict, eta: float, batch: dh.SequenceBatch, tau: float,
             top_p: float, mode: str) -> dict:
    """Every §1.3 field for one direction and one η, by hand in float64."""
    args = (batch.input_ids, batch.attention_mask, batch.response_mask, tau, top_p)
    lq0, ent0 = ref_sequence_stats(model, *args)
    lq1, ent1 = ref_sequence_stats(shifted_copy(model, direction, eta), *args)
    e0, e1 = (ent0, ent1) if mode == "rb" else (-lq0, -lq1)
    ntok = batch.response_mask.sum(1).double()
    n = len(batch)
    logw = lq1 - lq0
    w = torch.exp(logw)  # |logw| stays moderate in these tests: no shift needed in float64
    s = w.sum()
    wt = w / s
    we1 = torch.where(w > 0, wt * e1, torch.zeros_like(w))  # a zero weight never meets its +inf surprisal
    per_seq = we1 - e0 / n
    h_orig, h_upd = e0.mean(), we1.sum()
    h_upd_tok = torch.where(w > 0, w * e1, torch.zeros_like(w)).sum() / (w * ntok).sum()
    return {
        "delta_h": h_upd - h_orig,
        "h_upd": h_upd,
        "per_sequence": per_seq,
        "ess": 1 / (wt * wt).sum(),
        "khat": torch.tensor(ref_khat(logw.numpy()), dtype=torch.float64),
        "logw_max": logw.max(),
        "logw_min": logw.min(),
        "retained_mass": w.mean(),
        "h_orig": h_orig,
        "h_orig_per_token": e0.sum() / ntok.sum(),
        "h_upd_per_token": h_upd_tok,
        "delta_h_per_token": h_upd_tok - e0.sum() / ntok.sum(),
        "nucleus_changed": ref_nucleus_changed(model, direction, eta, batch, tau, top_p),
    }


def ref_row_grads(
    model: torch.nn.Module,
    batch: dh.SequenceBatch,
    tau: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``G [N, *shape]`` and ``S [N]`` by a plain loop over unpadded rows."""
    params = trainable(model)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    sums = []
    for i in range(len(batch)):
        am = batch.attention_mask[i]
        ids = batch.input_ids[i][am]
        pos = batch.response_mask[i][am].nonzero().flatten()
        logits = model(input_ids=ids.unsqueeze(0)).logits[0]
        lp = torch.log_softmax(logits[pos - 1].double() / tau, dim=-1)
        s = lp.gather(-1, ids[pos].unsqueeze(-1)).sum()
        for n, g in zip(params, torch.autograd.grad(s, list(params.values())), strict=True):
            grads[n].append(g)
        sums.append(s.detach())
    return {n: torch.stack(v) for n, v in grads.items()}, torch.stack(sums)
