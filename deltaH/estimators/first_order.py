"""First-order prediction δH₁ (docs/math.md#first-order): forward and reverse mode, plus a second-order term.

With per-sequence directional derivatives ``a_n = ∂_v logq_n`` and ``b_n = ∂_v e_n`` (``e`` the
RB entropy, or the surprisal ``−logq`` in naive mode, where ``b = −a``), the exact derivative of
the SNIS estimator of :mod:`deltaH.estimators.true` at ``η = 0`` is::

    slope[k]     = mean_n b_n + mean_n a_n · (e_n − H_orig)                  [K]
    c'[k, n]     = ( b_n + e_n · (a_n − mean_m a_m) ) / N                     [K, N]  (Σ_n c' = slope)
    δH₁(v, η)    = η · slope

Forward mode runs ``jvp`` of the backbone along each direction (vmapped over K, no backward
pass) and differentiates the head and the policy math in closed form with the nucleus ``S``
held fixed (``z = logits/τ``, ``q`` the nucleus softmax)::

    ∂ log q(y) = ż_y − Σ_S q ż            ∂ H = −(Σ_S q z ż − Σ_S q z · Σ_S q ż)

Reverse mode takes one gradient ``X = ∇_θ F`` of ``F = mean_n [e_n + logq_n · sg(e_n − H_orig)]``
and returns ``X · v_k`` for every direction (cost independent of K); per-sequence terms come
from batched per-sequence gradients. Jackknife standard errors (leave one sequence out) are
computed from the per-sequence terms. ``second_order=True`` adds ``½ η² d²ΔH/dη²`` from
``grad`` of ``jvp`` of the whole pipeline in η, one direction at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaH import _dist, _trees
from deltaH._choices import FIRST_ORDER_MODES as MODES
from deltaH._choices import check_choice
from deltaH.batch import Compact, SequenceBatch
from deltaH.estimators._common import as_etas, base_stats, check_options, validate_dirs
from deltaH.functional import FunctionalLM
from deltaH.policy import SamplingPolicy, scaled_logits
from deltaH.stats import SequenceStats, chunk_token_stats, chunks_of, head_rows, share_mode, token_cotangents


@dataclass(frozen=True)
class FirstOrder:
    """Result of :func:`delta_h_first_order`.

    ``slope [K]`` is ``dΔH/dη`` at 0; ``delta_h = η·slope`` (``[K]`` or ``[n_eta, K]``);
    ``per_sequence`` likewise with a trailing ``N`` (None in reverse mode without
    ``per_sequence=True``); ``stderr [K]`` is the jackknife standard error of ``delta_h``
    (None where per-sequence terms were not computed); ``second_order`` is ``½η²·d²ΔH/dη²``;
    ``loo`` (shaped as ``per_sequence``) is ``delta_h`` recomputed without evaluation sequence ``n``,
    the jackknife's input: the standard error of a sum of ``delta_h`` over directions follows from
    the sum of their ``loo`` (:mod:`deltaH.attribution`).
    """

    delta_h: Tensor
    slope: Tensor
    per_sequence: Tensor | None
    stderr: Tensor | None
    second_order: Tensor | None
    h_orig: Tensor
    eta: Tensor
    loo: Tensor | None = None


def _token_derivs(
    logits: Tensor, ldot: Tensor, targets: Tensor, policy: SamplingPolicy
) -> tuple[Tensor, Tensor]:
    """Directional derivatives of ``log q(target)`` and ``H`` per token: ``[K, P]`` each.

    ``logits [P, V]`` at θ, ``ldot [K, P, V]`` their derivatives along K directions.
    """
    keep = policy.nucleus_mask(logits)
    z = scaled_logits(logits, policy.temperature, keep)
    zd = ldot.to(z.dtype) / policy.temperature
    q = torch.softmax(z, dim=-1)  # 0 outside S
    zs = z.masked_fill(q == 0, 0.0) if keep is not None else z
    mean_zd = (q * zd).sum(-1)  # [K, P]
    mean_z = (q * zs).sum(-1)  # [P]
    a = zd.gather(-1, targets.expand(zd.shape[0], -1).unsqueeze(-1)).squeeze(-1) - mean_zd
    b = -((q * zs * zd).sum(-1) - mean_z * mean_zd)
    return a, b


def _forward_chunk(
    lm: FunctionalLM,
    params: Mapping[str, Tensor],
    tang: Mapping[str, Tensor],
    c: Compact,
    policy: SamplingPolicy,
    head_chunk: int | None,
) -> tuple[Tensor, Tensor]:
    """Per-sequence ``a, b`` ``[K, n]`` of one chunk by ``vmap(jvp(backbone))`` + closed-form head."""
    names = list(tang)
    prim = {n: params[n] for n in names}
    base = {n: t for n, t in params.items() if n not in tang}

    def backbone(p: Mapping[str, Tensor]) -> Tensor:
        return lm.hidden({**base, **p}, c)

    def one(t: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        return torch.func.jvp(backbone, (prim,), (dict(t),))  # type: ignore[return-value]

    hidden, hdot = torch.func.vmap(one)(dict(tang))  # [K, n, L, D] each
    h = hidden[0, c.rows, c.pred_pos]  # [P, D]
    hd = hdot[:, c.rows, c.pred_pos]  # [K, P, D]
    head_t = {n: t for n, t in tang.items() if n in lm.head_names}
    head_base = {n: t for n, t in params.items() if n not in head_t}
    head_prim = {n: params[n] for n in head_t}

    def head(p: Mapping[str, Tensor], x: Tensor) -> Tensor:
        return lm.head({**head_base, **p}, x)

    k = hd.shape[0]
    a_parts, b_parts = [], []
    step = head_rows(lm, k + 1, head_chunk)
    for s in range(0, h.shape[0], step):
        hc, hdc = h[s : s + step], hd[:, s : s + step]

        def one_head(t: Mapping[str, Tensor], xd: Tensor, hc: Tensor = hc) -> tuple[Tensor, Tensor]:
            return torch.func.jvp(head, (head_prim, hc), (dict(t), xd))  # type: ignore[return-value]

        logits, ldot = torch.func.vmap(one_head)(head_t, hdc)
        a, b = _token_derivs(logits[0], ldot, c.targets[s : s + step], policy)
        a_parts.append(a)
        b_parts.append(b)
    a_tok, b_tok = torch.cat(a_parts, 1), torch.cat(b_parts, 1)
    return c.per_sequence(a_tok), c.per_sequence(b_tok)


@dataclass(frozen=True)
class _Setup:
    """What every step of :func:`delta_h_first_order` shares: the model at θ, E in chunks, and the
    θ-side ``e [N]`` (float64), ``H_orig`` and the global ``N``."""

    lm: FunctionalLM
    params: Mapping[str, Tensor]
    chunks: Sequence[Compact]
    policy: SamplingPolicy
    head_chunk: int | None
    entropy_mode: str
    base: SequenceStats
    e: Tensor
    h_orig: Tensor
    n_total: Tensor
    on_progress: Callable[[int, int], None] | None = None

    def progress(self, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(done, total)


def _forward(su: _Setup, dirs: Mapping[str, Tensor], dir_chunk: int) -> tuple[Tensor, Tensor]:
    """Per-sequence ``a, b [K, N]`` by forward mode, ``dir_chunk`` directions per ``vmap``."""
    a_all, b_all = [], []
    k_total = _trees.n_stacked(dirs)
    n_units, done = -(-k_total // dir_chunk) * len(su.chunks), 0
    with torch.no_grad():
        for s in range(0, k_total, dir_chunk):
            tang = _trees.index(dirs, slice(s, s + dir_chunk))
            parts = []
            for c in su.chunks:
                parts.append(_forward_chunk(su.lm, su.params, tang, c, su.policy, su.head_chunk))
                done += 1
                su.progress(done, n_units)
            a_all.append(torch.cat([p[0] for p in parts], 1))
            b_all.append(torch.cat([p[1] for p in parts], 1))
    a, b = torch.cat(a_all, 0), torch.cat(b_all, 0)
    return a, SequenceStats.pick(b, -a, su.entropy_mode)  # naive: e = −logq, so b = −a


def _reverse(
    su: _Setup, names: Sequence[str], per_sequence: bool
) -> tuple[dict[str, Tensor], list[dict[str, dict[str, Tensor]]] | None]:
    """``X = ∇F`` over ``names``, and optionally per-sequence gradients of ``(logq_n, e_n)``.

    Without a head parameter among ``names`` (LoRA), the head's part is taken in closed form in
    chunks of positions (:func:`deltaH.stats.token_cotangents`) and only the backbone keeps an
    autograd graph: memory does not grow with ``T·V``. A differentiated head runs under autograd.
    """
    if set(names) & su.lm.head_names:
        return _reverse_autograd(su, names, per_sequence)
    params, e_all, rb = su.params, su.base.e(su.entropy_mode).double(), su.entropy_mode == "rb"
    grad = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    per_seq: list[dict[str, dict[str, Tensor]]] | None = [] if per_sequence else None
    start = 0
    for j, c in enumerate(su.chunks):
        p = {n: (params[n].detach().clone().requires_grad_(True) if n in grad else params[n]) for n in params}
        leaves = [p[n] for n in names]
        with torch.enable_grad():
            h = su.lm.hidden(p, c)[c.rows, c.pred_pos]  # [P, D]
        with torch.no_grad():
            _, c_lq, c_h = token_cotangents(su.lm, params, h.detach(), c.targets, su.policy.temperature,
                                            su.policy, entropy=rb, head_chunk=su.head_chunk)
        c_e = c_h if c_h is not None else -c_lq  # naive: e = −logq
        coef = (e_all[start : start + c.n] - su.h_orig)[c.rows].to(h.dtype).unsqueeze(-1)
        cot = (c_e + coef * c_lq) / su.n_total.to(h.dtype)  # ∂F/∂h_t, F = mean_n [e_n + logq_n·(e_n − H)]
        gs = torch.autograd.grad(h, leaves, grad_outputs=cot, retain_graph=per_sequence)
        for n, g in zip(names, gs, strict=True):
            grad[n] += g.double()
        if per_seq is not None:
            own = torch.zeros(c.n, h.shape[0], 1, dtype=h.dtype, device=h.device)
            own[c.rows, torch.arange(h.shape[0], device=h.device)] = 1.0  # [n, P, 1]: row n's positions
            g_lq = torch.autograd.grad(h, leaves, grad_outputs=own * c_lq, is_grads_batched=True,
                                       retain_graph=True)
            g_e = torch.autograd.grad(h, leaves, grad_outputs=own * c_e, is_grads_batched=True)
            per_seq.append({"logq": dict(zip(names, g_lq, strict=True)),
                            "e": dict(zip(names, g_e, strict=True))})
        start += c.n
        su.progress(j + 1, len(su.chunks))
    return {n: _dist.all_sum(g) for n, g in grad.items()}, per_seq


def _reverse_autograd(
    su: _Setup, names: Sequence[str], per_sequence: bool
) -> tuple[dict[str, Tensor], list[dict[str, dict[str, Tensor]]] | None]:
    """:func:`_reverse` with autograd through the head and the policy math (a head parameter is
    differentiated: its gradient is ``[V, D]``, larger than the logits it needs)."""
    params, e_all = su.params, su.base.e(su.entropy_mode)
    grad = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    per_seq: list[dict[str, dict[str, Tensor]]] | None = [] if per_sequence else None
    start = 0
    for j, c in enumerate(su.chunks):
        p = {n: (params[n].detach().clone().requires_grad_(True) if n in grad else params[n]) for n in params}
        with torch.enable_grad():
            lq_tok, en_tok, _ = chunk_token_stats(su.lm, p, None, c, su.policy, su.head_chunk)
            lq = c.per_sequence(lq_tok[0], dtype=None)
            e = SequenceStats.pick(c.per_sequence(en_tok[0], dtype=None), -lq, su.entropy_mode)
            coef = (e_all[start : start + c.n] - su.h_orig).to(lq.dtype)
            f = (e + lq * coef).sum() / su.n_total.to(lq.dtype)
            leaves = [p[n] for n in names]
            gs = torch.autograd.grad(f, leaves, retain_graph=per_sequence)
            for n, g in zip(names, gs, strict=True):
                grad[n] += g.double()
            if per_seq is not None:
                eye = torch.eye(c.n, dtype=lq.dtype, device=lq.device)
                g_lq = torch.autograd.grad(
                    lq, leaves, grad_outputs=eye, is_grads_batched=True, retain_graph=True
                )
                g_e = torch.autograd.grad(e, leaves, grad_outputs=eye, is_grads_batched=True)
                per_seq.append(
                    {"logq": dict(zip(names, g_lq, strict=True)), "e": dict(zip(names, g_e, strict=True))}
                )
        start += c.n
        su.progress(j + 1, len(su.chunks))
    return {n: _dist.all_sum(g) for n, g in grad.items()}, per_seq


def _reverse_slope(
    su: _Setup, dirs: Mapping[str, Tensor], per_sequence: bool
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``slope [K]`` as ``X · v_k``; per-sequence ``c'``, the jackknife SE and the leave-one-out
    slopes only with ``per_sequence``."""
    x, seq_grads = _reverse(su, list(dirs), per_sequence)
    slope = _trees.stacked_dot(dirs, x).to(su.e.device)
    if seq_grads is None:
        return slope, None, None, None
    a = torch.cat([_stacked_jdot(dirs, g["logq"]) for g in seq_grads], 1)
    b = torch.cat([_stacked_jdot(dirs, g["e"]) for g in seq_grads], 1)
    _, per_seq, stderr, loo = _combine(a, b, su.e, su.n_total)
    return slope, per_seq, stderr, loo


def _combine(a: Tensor, b: Tensor, e: Tensor, n_total: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``slope [K]``, per-sequence ``c' [K, N]``, jackknife SE of the slope ``[K]`` and the
    leave-one-out slopes ``[K, N]``."""
    s_a = _dist.sum_rows(a, 1)
    s_b = _dist.sum_rows(b, 1)
    s_e = _dist.sum_rows(e, 0)
    s_ae = _dist.sum_rows(a * e, 1)
    a_bar = s_a / n_total
    slope = s_b / n_total + s_ae / n_total - a_bar * (s_e / n_total)
    per_seq = (b + e * (a - a_bar.unsqueeze(1))) / n_total
    # Leave-one-out slopes from the sums, then the jackknife variance.
    m = n_total - 1
    loo = (
        (s_b.unsqueeze(1) - b) / m
        + (s_ae.unsqueeze(1) - a * e) / m
        - ((s_a.unsqueeze(1) - a) / m) * ((s_e - e) / m)
    )
    loo_mean = _dist.sum_rows(loo, 1) / n_total
    var = (m / n_total) * _dist.sum_rows((loo - loo_mean.unsqueeze(1)) ** 2, 1)
    return slope, per_seq, var.sqrt(), loo


def delta_h_first_order(
    params: Mapping[str, Tensor],
    dirs: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    eta: float | Sequence[float] | Tensor = 1e-4,
    mode: str = "forward",
    tf_batch_size: int = 16,
    dir_chunk: int = 8,
    entropy_mode: str = "rb",
    head_chunk: int | None = None,
    per_sequence: bool | None = None,
    second_order: bool = False,
    base: SequenceStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    share_prompts: str = "auto",
) -> FirstOrder:
    """δH₁ along K stacked directions (see the module docstring for the formulas).

    ``per_sequence`` defaults to True in forward mode (free there) and False in reverse mode
    (it needs per-sequence gradients). ``on_progress(done, total)``, if given, is called after
    each unit of work: a (direction chunk, sequence chunk) pair in forward mode, a sequence chunk
    in reverse mode (the second-order term is not counted). It does not change the result.
    ``share_prompts`` (``auto | on | off``, :func:`deltaH.stats.share_mode`): run each chunk's
    repeated prompts once, in forward and reverse mode and the second-order term.
    """
    check_choice("mode", mode, MODES)
    check_options(entropy_mode, dir_chunk)
    etas, scalar = as_etas(eta)
    lm.check_names(params)
    dirs = validate_dirs(lm, params, dirs)
    want_per_seq = (mode == "forward") if per_sequence is None else bool(per_sequence)
    share = share_mode(lm, share_prompts)
    with torch.no_grad():
        if base is None:
            base = base_stats(lm, params, batch, policy, tf_batch_size, head_chunk, share)
    e = base.e(entropy_mode).double()
    n_total = _dist.count(e.shape[0], e.device)
    su = _Setup(lm, params, chunks_of(batch, tf_batch_size, share), policy, head_chunk, entropy_mode, base,
                e, _dist.sum_rows(e, 0) / n_total, n_total, on_progress)
    per_seq: Tensor | None
    stderr: Tensor | None
    loo: Tensor | None
    if mode == "forward":
        slope, per_seq, stderr, loo = _combine(*_forward(su, dirs, dir_chunk), e, n_total)
        if not want_per_seq:
            per_seq, stderr, loo = None, None, None
    else:
        slope, per_seq, stderr, loo = _reverse_slope(su, dirs, want_per_seq)
    curv = _curvature(su, dirs) if second_order else None
    return _at_etas(etas, scalar, slope, per_seq, stderr, curv, su.h_orig, loo)


def _at_etas(
    etas: list[float],
    scalar: bool,
    slope: Tensor,
    per_seq: Tensor | None,
    stderr: Tensor | None,
    curv: Tensor | None,
    h_orig: Tensor,
    loo: Tensor | None = None,
) -> FirstOrder:
    """Scale the η-free ``slope``, ``c'``, SE, leave-one-out slopes and curvature to every η
    (``[n_eta, ...]``, or no η axis for a scalar η)."""
    eta_t = torch.tensor(etas, dtype=torch.float64, device=slope.device)
    dh = eta_t.unsqueeze(1) * slope.unsqueeze(0)
    ps_out = None if per_seq is None else eta_t.view(-1, 1, 1) * per_seq.unsqueeze(0)
    loo_out = None if loo is None else eta_t.view(-1, 1, 1) * loo.unsqueeze(0)
    se_out = None if stderr is None else eta_t.abs().unsqueeze(1) * stderr.unsqueeze(0)
    so = None if curv is None else 0.5 * eta_t.unsqueeze(1) ** 2 * curv.unsqueeze(0)
    if scalar:
        dh = dh[0]
        ps_out = None if ps_out is None else ps_out[0]
        loo_out = None if loo_out is None else loo_out[0]
        se_out = None if se_out is None else se_out[0]
        so = None if so is None else so[0]
    return FirstOrder(
        delta_h=dh,
        slope=slope,
        per_sequence=ps_out,
        stderr=se_out,
        second_order=so,
        h_orig=h_orig,
        eta=eta_t[0] if scalar else eta_t,
        loo=loo_out,
    )


def _stacked_jdot(dirs: Mapping[str, Tensor], per_seq: Mapping[str, Tensor]) -> Tensor:
    """``[K, n]``: ``Σ_names <v_k, g_n>`` for stacked dirs ``[K, ...]``, per-sequence grads ``[n, ...]``."""
    out = None
    for name, v in dirs.items():
        g = per_seq[name]
        term = v.double().flatten(1) @ g.double().flatten(1).T.to(v.device)
        out = term if out is None else out + term
    assert out is not None
    return out


def _curvature(su: _Setup, dirs: Mapping[str, Tensor]) -> Tensor:
    """``d²ΔH/dη² [K]`` at 0 by nested ``jvp`` in η, one direction at a time (nucleus held fixed).

    With ``a, a2`` the first and second η-derivatives of ``logq_n`` and ``b, b2`` those of
    ``e_n``: ``f'' = mean_n [((a_n − ā)² + a2_n − ā2 − Var(a)) e_n + 2 (a_n − ā) b_n + b2_n]``.
    The ``a2, b2`` part is linear, ``Σ_n (e_n − H) a2_n + b2_n``, so it is one reverse-mode
    derivative (in η) of a forward-mode derivative: ``grad(jvp)`` (nested ``jvp`` fails on ops
    such as SiLU that have no second forward derivative).
    """
    params, e, n_total = su.params, su.e, su.n_total
    out = []
    for k in range(_trees.n_stacked(dirs)):
        v = {n: d[k] for n, d in dirs.items()}
        a_l, b_l, d2_l = [], [], []
        start = 0
        for c in su.chunks:
            coef = (e[start : start + c.n] - su.h_orig).double()
            start += c.n

            def stats_at(eta: Tensor, c: Compact = c, v: Mapping[str, Tensor] = v) -> tuple[Tensor, Tensor]:
                p = {**params, **{n: params[n] + eta * t for n, t in v.items()}}
                lq_t, en_t, _ = chunk_token_stats(su.lm, p, None, c, su.policy, su.head_chunk)
                lq = c.per_sequence(lq_t[0])
                return lq, SequenceStats.pick(c.per_sequence(en_t[0]), -lq, su.entropy_mode)

            def g(
                eta: Tensor, stats_at=stats_at, coef: Tensor = coef
            ) -> tuple[Tensor, tuple[Tensor, Tensor]]:  # type: ignore[no-untyped-def]
                a, b = torch.func.jvp(stats_at, (eta,), (torch.ones_like(eta),))[1]
                # G(η) = Σ_n (e_n − H) a_n(η) + b_n(η): its η-derivative is Σ (e_n − H) a2_n + b2_n.
                return (coef * a + b).sum(), (a.detach(), b.detach())

            zero = torch.zeros((), dtype=next(iter(params.values())).dtype, device=e.device)
            d2, (a, b) = torch.func.grad(g, has_aux=True)(zero)
            d2_l.append(d2.double())
            a_l.append(a)
            b_l.append(b)
        a, b = torch.cat(a_l), torch.cat(b_l)
        a_bar = _dist.sum_rows(a, 0) / n_total
        var_a = _dist.sum_rows((a - a_bar) ** 2, 0) / n_total
        terms = ((a - a_bar) ** 2 - var_a) * e + 2 * (a - a_bar) * b
        # Σ over chunks of every rank in chunk order, left to right as one process adds them.
        s2 = torch.zeros((), dtype=torch.float64, device=e.device)
        for d2 in _dist.all_cat(torch.stack(d2_l), 0):
            s2 = s2 + d2
        out.append((_dist.sum_rows(terms, 0) + s2) / n_total)
    return torch.stack(out)


def entropy_gradient(
    params: Mapping[str, Tensor],
    batch: SequenceBatch,
    *,
    lm: FunctionalLM,
    policy: SamplingPolicy,
    tf_batch_size: int = 16,
    entropy_mode: str = "rb",
    head_chunk: int | None = None,
    names: Sequence[str] | None = None,
    base: SequenceStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    share_prompts: str = "auto",
) -> dict[str, Tensor]:
    """``X = ∇_θ F`` of the reverse mode (module docstring), float64, over ``names`` (default: every
    parameter of ``params``): ``X · v = dΔH/dη`` at ``η = 0`` along any direction ``v`` on ``batch``.

    One forward and one backward pass over the batch, whatever the number of directions later dotted
    with it (docs/math.md#token-influence uses it as the tangent of a forward-mode pass over U).
    ``share_prompts`` as in :func:`delta_h_first_order`.
    """
    check_options(entropy_mode, 1)
    lm.check_names(params)
    share = share_mode(lm, share_prompts)
    with torch.no_grad():
        if base is None:
            base = base_stats(lm, params, batch, policy, tf_batch_size, head_chunk, share)
    e = base.e(entropy_mode).double()
    n_total = _dist.count(e.shape[0], e.device)
    su = _Setup(lm, params, chunks_of(batch, tf_batch_size, share), policy, head_chunk, entropy_mode, base,
                e, _dist.all_sum(e.sum()) / n_total, n_total, on_progress)
    x, _ = _reverse(su, list(params) if names is None else list(names), per_sequence=False)
    return x
