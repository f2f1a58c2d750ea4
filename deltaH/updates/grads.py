"""Per-sequence gradients with ``torch.func`` (``vmap(grad)`` over sequences, chunked).

For sequence ``i`` with response positions ``R_i`` and ``z = logits/τ``::

    S_i = Σ_{t∈R_i} log softmax(z_t)[y_t]            (temperature, no top-p: the trainer's log π)
    G_i = ∇_θ S_i                                      dict of [N, *shape]

Sequences are compacted (right padding, shared position ids ``0..L-1``), so ids are the only
batched input under ``vmap``; position ids stay unbatched (HF's packed-sequence detection is
data-dependent), and no attention mask is needed (causal attention never reaches padding).

Memory does not grow with ``T·V``: the head's part of the gradient is taken in closed form, in
chunks of scored positions, never as ``[L, V]`` logits inside ``vmap``. With hidden states
``h_t`` (a no-grad forward of the chunk), ``q_t`` the softmax of ``z_t = head(h_t)/τ`` (over the
nucleus, held fixed, for a ``policy`` with top-p)::

    c_t  = ∂ log q_t(y_t) / ∂h_t = J_headᵀ (onehot(y_t) − q_t) / τ         [P, D]
    G_i  = ∇_θ Σ_{t∈R_i} ⟨h_t(θ), c_t⟩     (c_t held constant: the chain rule through the backbone)

so ``vmap(grad)`` runs the backbone only (one extra no-grad forward per chunk); ``seq_chunk``
bounds how many sequences are vmapped together. When a head parameter is differentiated (a full
fine-tune, or a tied embedding) the head runs inside ``vmap`` on every position as before (logits
``[L, V]`` per sequence): that parameter's per-sequence gradient is ``[V, D]`` per sequence anyway.

With per-token weights ``w [N, T_max]`` (the weight of the ``k``-th scored token of row ``i`` at
``[i, k]``, zero-padded) the summed log-prob becomes a weighted one, for any loss whose gradient
is a weighted sum of token log-prob gradients (a replayed trainer step,
docs/math.md#replaying-a-recorded-step)::

    S_i = Σ_k w_{i,k} · log softmax(z_{t_k})[y_{t_k}]   G_i = ∇_θ S_i

``w [N, K, T_max]`` gives ``K`` weightings at once (one forward, ``K`` backward passes):
``G_i`` is then ``[N, K, *shape]`` and ``S`` is ``[N, K]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from deltaH.batch import Compact, SequenceBatch, compact
from deltaH.errors import ArgumentError, BatchError, ParameterNameError
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, trainer_logprob
from deltaH.stats import token_cotangents


def logprob_sums(
    lm: FunctionalLM, params: Mapping[str, Tensor], batch: SequenceBatch, *, temperature: float = 1.0
) -> Tensor:
    """``S [N]``: summed response log-probs under ``softmax(z/τ)`` (differentiable, float64)."""
    c = compact(batch)
    h = lm.backbone(params, c.ids, c.position_ids)[c.rows, c.pred_pos]
    logits = lm.head(params, h)
    lp = trainer_logprob(logits, c.targets, temperature)
    return c.per_sequence(lp)


def sequence_logprob_grads(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    temperature: float = 1.0,
    names: Sequence[str] | None = None,
    seq_chunk: int = 8,
    policy: SamplingPolicy | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    token_weights: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sequence gradients ``G_i = ∇ S_i`` (dict of ``[N, *shape]``) and ``S [N]`` (float64).

    ``names`` restricts the gradient to those parameters (default: all of ``params``). With a
    ``policy`` (its temperature replaces ``temperature``), ``S_i`` is the sampling policy's
    ``logq_i`` instead: the log-softmax runs over the top-p nucleus, decided at ``params`` (outside
    ``vmap``, per chunk of scored positions) and held fixed.
    ``on_progress(done, total)``, if given, is called after each chunk with the sequences done.
    ``token_weights`` (``[N, T_max]`` or ``[N, K, T_max]``, module docstring): the gradient of the
    weighted sum ``Σ_k w_{i,k} log π`` instead; the results gain the ``K`` axis when it is given.
    """
    if policy is not None:
        temperature = policy.temperature
    if int(seq_chunk) < 1:
        raise ArgumentError(f"seq_chunk must be >= 1, got {seq_chunk!r}")
    w3 = None if token_weights is None else _check_weights(token_weights, batch).to(batch.input_ids.device)
    names = list(params) if names is None else list(names)
    for n in names:
        if n not in params:
            if n in lm.params:
                raise ParameterNameError(f"names: '{n}' is a trainable parameter but is missing from params")
            lm.check_names({n: torch.empty(0)}, what="names")  # raises with an explanation
    lm.check_names({n: params[n] for n in names})
    grads: dict[str, list[Tensor]] = {n: [] for n in names}
    sums: list[Tensor] = []
    # the head's part in closed form unless a head parameter is differentiated (then vmap over it)
    chunk_grads = _streamed_chunk if not (set(names) & lm.head_names) else _vmapped_chunk
    for s in range(0, len(batch), seq_chunk):
        c = compact(batch.select(slice(s, s + seq_chunk)))
        w = None if w3 is None else w3[s : s + c.n]
        g, val = chunk_grads(lm, params, names, c, temperature, policy, w)
        if token_weights is not None and token_weights.dim() == 2:
            g, val = {n: t.squeeze(1) for n, t in g.items()}, val.squeeze(1)
        for n in names:
            grads[n].append(g[n])
        sums.append(val.double())
        if on_progress is not None:
            on_progress(min(s + seq_chunk, len(batch)), len(batch))
    return {n: torch.cat(v) for n, v in grads.items()}, torch.cat(sums)


def _vmapped_chunk(
    lm: FunctionalLM, params: Mapping[str, Tensor], names: Sequence[str], c: Compact, temperature: float,
    policy: SamplingPolicy | None, w3: Tensor | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """One chunk's ``(G [n, (K,) ...], S [n, (K)])`` with the head inside ``vmap(grad)`` (a head
    parameter is differentiated); ``w3 [n, K, T_max]``: the chunk's token weights, or None."""
    rest = {n: t for n, t in params.items() if n not in names}
    length = c.ids.shape[1]
    mask = torch.zeros(c.n, length, dtype=torch.bool, device=c.ids.device)
    mask[c.rows, c.pred_pos] = True
    tgt = torch.zeros(c.n, length, dtype=torch.long, device=c.ids.device)
    tgt[c.rows, c.pred_pos] = c.targets
    pos = c.position_ids[0]
    keep = None
    if policy is not None and policy.top_p < 1.0:
        with torch.no_grad():
            keep = policy.nucleus_mask(lm.head(params, lm.backbone(params, c.ids, c.position_ids)))

    def s_i(
        p: Mapping[str, Tensor], ids: Tensor, m: Tensor, y: Tensor, kp: Tensor | None, pos: Tensor = pos
    ) -> tuple[Tensor, Tensor]:
        full = {**rest, **p}
        h = lm.backbone(full, ids.unsqueeze(0), pos.unsqueeze(0))[0]  # [L, D]
        lp = trainer_logprob(lm.head(full, h), y, temperature, kp)
        val = torch.where(m, lp, torch.zeros_like(lp)).sum()
        return val, val.detach()

    sub = {n: params[n] for n in names}
    dims = (None, 0, 0, 0, None if keep is None else 0)
    if w3 is None:
        grad_i = torch.func.vmap(torch.func.grad(s_i, has_aux=True), in_dims=dims)
        g, val = grad_i(sub, c.ids, mask, tgt, keep)
        return g, val
    # the k-th scored token of a row sits at its k-th True position of `mask`
    k = mask.cumsum(1)[c.rows, c.pred_pos] - 1
    wpos = torch.zeros(c.n, w3.shape[1], length, dtype=w3.dtype, device=c.ids.device)
    wpos[c.rows, :, c.pred_pos] = w3[c.rows, :, k]

    def s_w(
        p: Mapping[str, Tensor], ids: Tensor, m: Tensor, y: Tensor, kp: Tensor | None, w: Tensor,
        pos: Tensor = pos,
    ) -> tuple[Tensor, Tensor]:
        full = {**rest, **p}
        h = lm.backbone(full, ids.unsqueeze(0), pos.unsqueeze(0))[0]  # [L, D]
        lp = trainer_logprob(lm.head(full, h), y, temperature, kp)
        val = (w * torch.where(m, lp, torch.zeros_like(lp))).sum(-1)  # [K]
        return val, val.detach()

    g, val = torch.func.vmap(torch.func.jacrev(s_w, has_aux=True), in_dims=(*dims, 0))(
        sub, c.ids, mask, tgt, keep, wpos
    )
    return g, val


def _streamed_chunk(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    names: Sequence[str],
    c: Compact,
    temperature: float,
    policy: SamplingPolicy | None,
    w3: Tensor | None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-sequence gradients ``[n, (K,) *shape]`` and sums ``[n(, K)]`` of one compacted chunk by
    the closed-form head cotangents (module docstring); ``w3 [n, K, T_max]`` weights (or None)."""
    rest = {n: t for n, t in params.items() if n not in names}
    pos = c.position_ids[0]
    with torch.no_grad():
        h = lm.backbone(params, c.ids, c.position_ids)
        lp, cot, _ = token_cotangents(lm, params, h[c.rows, c.pred_pos], c.targets, temperature, policy)
    ctan = torch.zeros_like(h)
    ctan[c.rows, c.pred_pos] = cot
    sub = {n: params[n] for n in names}

    def inner(p: Mapping[str, Tensor], ids: Tensor, ct: Tensor) -> Tensor:
        hh = lm.backbone({**rest, **p}, ids.unsqueeze(0), pos.unsqueeze(0))[0]  # [L, D]
        return (hh * ct).sum((-1, -2))  # ct [L, D] → [], or [K, L, D] → [K]

    if w3 is None:
        g = torch.func.vmap(torch.func.grad(inner), in_dims=(None, 0, 0))(sub, c.ids, ctan)
        return g, c.per_sequence(lp)
    # the k-th scored token of row i is its k-th scored position (batch order); weights per position
    counts = torch.bincount(c.rows, minlength=c.n)
    first = counts.cumsum(0) - counts  # rows' scored positions are contiguous in c.rows (compact)
    k = torch.arange(c.rows.numel(), device=lp.device) - first[c.rows]
    w_tok = w3[c.rows, :, k].to(lp.device)  # [P, K]
    wpos = torch.zeros(c.n, w3.shape[1], h.shape[1], dtype=h.dtype, device=h.device)
    wpos[c.rows, :, c.pred_pos] = w_tok.to(h.dtype)
    ctk = wpos.unsqueeze(-1) * ctan.unsqueeze(1)  # [n, K, L, D]
    g = torch.func.vmap(torch.func.jacrev(inner), in_dims=(None, 0, 0))(sub, c.ids, ctk)
    val = c.per_sequence(w_tok.T.to(torch.float64) * lp.to(torch.float64))  # [K, n]
    return g, val.T


def _check_weights(w: Tensor, batch: SequenceBatch) -> Tensor:
    """``token_weights`` as ``[N, K, T_max]`` after checking its shape and zero padding."""
    if not isinstance(w, Tensor) or w.dim() not in (2, 3) or not w.is_floating_point():
        raise BatchError(
            "token_weights must be a floating tensor [N, T_max] or [N, K, T_max], got "
            + (f"shape {tuple(w.shape)} ({w.dtype})" if isinstance(w, Tensor) else type(w).__name__)
        )
    w3 = w if w.dim() == 3 else w.unsqueeze(1)
    n_tok = batch.n_tokens.to(w.device)
    if w3.shape[0] != len(batch) or w3.shape[-1] < int(n_tok.max()):
        raise BatchError(
            f"token_weights has shape {tuple(w.shape)} but the batch has {len(batch)} rows with up to "
            f"{int(n_tok.max())} scored tokens: pass [N, T_max] with N = {len(batch)} and T_max >= "
            f"{int(n_tok.max())} (the k-th scored token of row i at [i, k])"
        )
    beyond = torch.arange(w3.shape[-1], device=w.device) >= n_tok.view(-1, 1, 1)
    if bool((w3 * beyond).ne(0).any()):
        rows = (w3 * beyond).ne(0).flatten(1).any(1).nonzero().flatten()[:5].tolist()
        raise BatchError(
            f"token_weights rows {rows} have non-zero weights beyond their scored tokens: column k is "
            "the k-th scored token of the row (response_mask order), and the padding must be zero"
        )
    return w3
