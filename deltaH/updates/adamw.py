"""Exact AdamW update reconstruction and its per-sequence decomposition (docs/math.md#adamw-step).

Directions per unit learning rate: docs/math.md#directions-and-eta.

For each parameter (tree leaf, shape ``[*s]``) with state ``(m, v, v_max, step)`` and the
hyper-parameters ``(lr, β1, β2, ε, λ)`` of its param group, ``torch.optim.AdamW.step()`` does::

    g   ← clip · g                  clip = min(1, max_norm / (‖g‖₂ + 1e-6)), ‖·‖ over every leaf given
    g   ← −g                        if maximize
    t   = step + 1
    m'  = β1 m + (1−β1) g           (torch: m.lerp(g, 1−β1))
    v'  = β2 v + (1−β2) g²          v̂ = max(v_max, v') with amsgrad, else v'
    D   = (1 − β1^t) · ( sqrt(v̂) / sqrt(1 − β2^t) + ε )              [*s]
    Δθ  = −lr·λ·θ − lr · m' / D                                       [*s]

With ``D`` held at its full-batch value and ``g = clip · Σ_i g_i`` (``M`` update sequences)::

    b    = −lr·λ·θ − lr·β1·m / D                   baseline (momentum + weight decay)  [*s]
    c_i  = −lr·(1−β1)·clip·g_i / D  (× −1 if maximize)  one per sequence            [M, *s]
    Δθ   = b + Σ_i c_i                             to float tolerance

A parameter without a gradient is skipped entirely, as torch skips it: no decay, no step count,
and it is absent from every returned tree. Arithmetic follows torch's operation order (lerp,
``mul().addcmul_()``, ``sqrt()/sqrt(bc2) + ε``, ``addcdiv_``) in the promoted dtype of the
parameter and its state, so ``adamw_step`` is bit-exact against ``foreach=False/True`` when the
dtypes agree and within ~1 ulp of ``fused=True`` (and of ``capturable=True``, which reorders
the denominator). ``full`` is the real ``θ' − θ`` (so ``θ + full`` is ``θ'`` bit for bit); ``b + Σ c_i``
is the same update without the rounding of ``θ'``, so in float32 they agree to about ``ulp(θ)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import torch
from torch import Tensor

from deltaH._trees import Tree
from deltaH.errors import ArgumentError, BatchError, CheckpointError
from deltaH.updates import _adamw_map
from deltaH.updates._adamw_map import AdamWHyper, ShapeLike

__all__ = ["AdamWDecomposition", "AdamWHyper", "AdamWState", "adamw_decompose", "adamw_step", "unit_lr"]


@dataclass(frozen=True, eq=False)
class AdamWState:
    """Per-parameter AdamW state, keyed by (de-duplicated, trainable) parameter name.

    ``exp_avg`` (m), ``exp_avg_sq`` (v): ``[*s]`` per name; ``max_exp_avg_sq``: only the names whose
    group has ``amsgrad``; ``step``: steps taken so far (torch keeps one counter per parameter);
    ``hyper``: the param group's ``lr, betas, eps, weight_decay, amsgrad, maximize``. ``fresh``
    names the parameters torch holds no state for yet (never had a gradient): they are
    represented as step 0 with zero moments, exactly what torch would create lazily.

    Immutable: the mappings are read-only views and :func:`adamw_step` returns a new state.
    """

    exp_avg: Mapping[str, Tensor]
    exp_avg_sq: Mapping[str, Tensor]
    max_exp_avg_sq: Mapping[str, Tensor]
    step: Mapping[str, int]
    hyper: Mapping[str, AdamWHyper]
    fresh: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        names = list(self.hyper)
        for f in ("exp_avg", "exp_avg_sq", "step"):
            if set(getattr(self, f)) != set(names):
                raise ArgumentError(f"AdamWState.{f} must have exactly the names of AdamWState.hyper")
        ams = {n for n in names if self.hyper[n].amsgrad}
        if set(self.max_exp_avg_sq) != ams:
            raise ArgumentError("AdamWState.max_exp_avg_sq must hold exactly the names whose group has "
                                "amsgrad=True")
        if not self.fresh <= set(names):
            extra = sorted(self.fresh - set(names))[:3]
            raise ArgumentError(f"AdamWState.fresh names unknown parameters {extra}")
        for f in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step", "hyper"):
            object.__setattr__(self, f, MappingProxyType(dict(getattr(self, f))))
        object.__setattr__(self, "fresh", frozenset(self.fresh))

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names in optimizer order."""
        return tuple(self.hyper)

    @classmethod
    def from_optimizer(cls, optimizer: Any, model: torch.nn.Module, *, copy: bool = True) -> AdamWState:
        """Snapshot a live ``torch.optim.AdamW`` (plain, foreach or fused) or accelerate's wrapper.

        Parameters are named by object identity against ``model.named_parameters()``; only
        trainable (``requires_grad``) ones are kept. ``torch.optim.Adam`` counts as AdamW when
        ``decoupled_weight_decay=True`` or ``weight_decay=0``; Adam with an L2 penalty and any other
        optimizer are refused. ``copy=True`` clones the tensors, so later ``optimizer.step()`` calls
        do not change this snapshot.
        """
        return cls(*_adamw_map.fields_from_optimizer(optimizer, model, copy))

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any],
                        names: Sequence[str] | Mapping[str, ShapeLike] | None = None, *,
                        shapes: Mapping[str, ShapeLike] | None = None, copy: bool = False) -> AdamWState:
        """Map a saved ``optimizer.state_dict()`` (``optimizer.pt``) to parameter names.

        ``names``: the parameter names in optimizer-id order (ids run across the param groups in
        order), or a dict ``name → shape`` in that order; ``None`` uses the ``param_names`` torch saves
        when the optimizer was built from ``named_parameters()`` (given both, they must agree).
        Every saved tensor is checked against the known shapes (``names`` dict and/or ``shapes``); the
        first parameter that does not fit raises ``ValueError`` — the file is never replaced by a
        fresh state. Parameters with no saved state need a known shape; they become ``fresh`` (zero
        moments in the dtype of the saved moments). ``copy=False`` shares the file's tensors (nothing
        here writes to them); pass ``copy=True`` for a dict taken from a live optimizer that will step.
        ``decoupled_weight_decay`` missing from a group (files written by older torch's AdamW) means AdamW.
        """
        return cls(*_adamw_map.fields_from_state_dict(state_dict, names, shapes, copy))


@dataclass(frozen=True, eq=False)
class AdamWDecomposition:
    """Result of :func:`adamw_decompose` (trees hold the parameters that have gradients).

    ``full``: ``Δθ`` of the real step ``[*s]`` (equal to :func:`adamw_step`'s delta);
    ``baseline``: ``b`` ``[*s]``; ``components``: ``c_i`` ``[M, *s]``; ``denom``: ``D`` ``[*s]``
    (``1 − β1^t`` folded in; ``(1−β1)/D`` is the AdamW preconditioner ``P``, docs/math.md#fisher-kernel);
    ``clip_coef``: the clipping factor applied (1.0 without clipping); ``grad_norm``: ``‖Σ_i g_i‖₂``
    before clipping; ``new_state``: the state after the step.
    """

    full: Tree
    baseline: Tree
    components: Tree
    denom: Tree
    clip_coef: float
    grad_norm: float
    new_state: AdamWState


class _Moments(NamedTuple):
    m: Tensor
    v: Tensor
    vmax: Tensor | None
    bc1: float  # 1 − β1^t
    denom: Tensor  # torch's denom: sqrt(v̂) / sqrt(1 − β2^t) + ε  (D = bc1 · denom)


def _moments(g: Tensor, m: Tensor, v: Tensor, vmax: Tensor | None, h: AdamWHyper, t: int) -> _Moments:
    """torch's per-parameter moment update and denominator, same operations in the same order."""
    b1, b2 = h.betas
    m2 = m.lerp(g, 1 - b1)
    v2 = v.mul(b2).addcmul_(g, g, value=1 - b2)
    bc1, bc2 = 1 - b1 ** float(t), 1 - b2 ** float(t)
    vmax2 = torch.maximum(vmax, v2) if vmax is not None else None
    denom = ((vmax2 if vmax2 is not None else v2).sqrt() / bc2**0.5).add_(h.eps)
    return _Moments(m2, v2, vmax2, bc1, denom)


def _clip(grads: Mapping[str, Tensor], max_grad_norm: float | None) -> tuple[Tree, Tensor | None, Tensor]:
    """``clip_grad_norm_`` semantics on a tree: the global L2 norm and ``min(1, max/(‖g‖+1e-6))``."""
    norm = torch.nn.utils.get_total_norm(list(grads.values()), 2.0)
    if max_grad_norm is None:
        return dict(grads), None, norm
    coef = torch.clamp(float(max_grad_norm) / (norm + 1e-6), max=1.0)
    return {k: g * coef.to(g.device) for k, g in grads.items()}, coef, norm


def _check_inputs(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: AdamWState,
                  max_grad_norm: float | None, what: str, lead: int) -> None:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ArgumentError(f"max_grad_norm={max_grad_norm} must be > 0; pass None to disable clipping "
                            "(the HF Trainer skips clipping when max_grad_norm <= 0).")
    for name, g in grads.items():
        if name not in params:
            raise BatchError(f"{what}[{name!r}] has no entry in params; pass θ for every parameter "
                             "with a gradient.")
        if name not in state.hyper:
            raise BatchError(f"{what}[{name!r}] names a parameter the optimizer state does not hold; drop it "
                             "from the gradients, or build the state from an optimizer that trains it.")
        shape = tuple(params[name].shape)
        if tuple(g.shape[lead:]) != shape or g.dim() != len(shape) + lead:
            raise BatchError(f"{what}[{name!r}] has shape {tuple(g.shape)} but the parameter has shape "
                             f"{shape}" + (" (per-sequence gradients are [M, *shape])" if lead else ""))
        if tuple(state.exp_avg[name].shape) != shape:
            got = tuple(state.exp_avg[name].shape)
            raise CheckpointError(f"optimizer state of {name!r} has shape {got} but the parameter has shape "
                                  f"{shape}: the state belongs to other parameters (check the "
                                  "names order used to map the optimizer file).")


def _dtype(theta: Tensor, state: AdamWState, name: str) -> torch.dtype:
    return torch.promote_types(theta.dtype, state.exp_avg[name].dtype)


def _advance(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], state: AdamWState
             ) -> tuple[Tree, dict[str, _Moments], AdamWState]:
    """One AdamW step on already clipped gradients: ``(θ', moments per name, new state)``."""
    new_theta: Tree = {}
    moments: dict[str, _Moments] = {}
    m_new, v_new = dict(state.exp_avg), dict(state.exp_avg_sq)
    vmax_new, step_new = dict(state.max_exp_avg_sq), dict(state.step)
    for name, g in grads.items():
        h, theta = state.hyper[name], params[name]
        dt, dev = _dtype(theta, state, name), theta.device
        vmax = state.max_exp_avg_sq[name].to(dev, dt) if h.amsgrad else None
        g = -g.to(dev, dt) if h.maximize else g.to(dev, dt)
        t = state.step[name] + 1
        mo = _moments(g, state.exp_avg[name].to(dev, dt), state.exp_avg_sq[name].to(dev, dt), vmax, h, t)
        th = theta.to(dt).clone() if h.weight_decay == 0 else theta.to(dt).mul(1 - h.lr * h.weight_decay)
        new_theta[name] = th.addcdiv_(mo.m, mo.denom, value=-(h.lr / mo.bc1))
        moments[name] = mo
        m_new[name], v_new[name], step_new[name] = mo.m, mo.v, t
        if mo.vmax is not None:
            vmax_new[name] = mo.vmax
    new_state = AdamWState(m_new, v_new, vmax_new, step_new, dict(state.hyper), state.fresh - set(grads))
    return new_theta, moments, new_state


def adamw_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], state: AdamWState,
               max_grad_norm: float | None = None) -> tuple[Tree, AdamWState]:
    """Exactly what ``torch.optim.AdamW.step()`` does, as a pure function.

    ``params``: ``θ`` per name ``[*s]``; ``grads``: ``g`` per name ``[*s]`` (a missing name or
    ``None`` means no gradient: that parameter is skipped, as torch skips it). With
    ``max_grad_norm``, ``g`` is first scaled by ``min(1, max_grad_norm / (‖g‖₂ + 1e-6))``, the
    norm taken over every gradient given (``torch.nn.utils.clip_grad_norm_``).

    Returns ``(delta, new_state)`` where ``delta[name] = θ'[name] − θ[name]`` ``[*s]`` for every
    parameter with a gradient (so ``θ + delta`` reproduces the real ``θ'``), computed in the
    promoted dtype of ``θ`` and its state; ``new_state`` has the moments and step counts the
    optimizer holds after the step.

    >>> delta, new_state = adamw_step(params, grads, AdamWState.from_optimizer(opt, model), 1.0)
    """
    g_given = {k: g for k, g in grads.items() if g is not None}
    _check_inputs(params, g_given, state, max_grad_norm, "grads", 0)
    clipped, _, _ = _clip(g_given, max_grad_norm)
    new_theta, _, new_state = _advance(params, clipped, state)
    delta = {k: th - params[k].to(th.dtype) for k, th in new_theta.items()}
    return delta, new_state


def adamw_decompose(params: Mapping[str, Tensor], per_seq_grads: Mapping[str, Tensor], state: AdamWState,
                    max_grad_norm: float | None = None) -> AdamWDecomposition:
    """Split one AdamW step into a baseline and one component per update sequence.

    ``per_seq_grads[name]``: ``g_i`` stacked as ``[M, *s]``; the step's gradient is
    ``g = Σ_i g_i`` (clipped as in :func:`adamw_step`, with the norm of ``g``). With ``D`` of the
    full-batch step held fixed::

        b[name]          = −lr·λ·θ − lr·β1·m / D                       [*s]
        c[name][i]       = −lr·(1−β1)·clip·g_i / D   (negated if maximize)   [M, *s]
        full[name]       = b + Σ_i c[i] = adamw_step(params, {name: g}, state)[0][name]

    ``components`` are linear in ``g_i`` (D and clip depend on ``Σ_i g_i`` only).
    """
    _check_inputs(params, per_seq_grads, state, max_grad_norm, "per_seq_grads", 1)
    g_sum = {k: g.sum(0) for k, g in per_seq_grads.items()}
    clipped, coef, norm = _clip(g_sum, max_grad_norm)
    new_theta, moments, new_state = _advance(params, clipped, state)
    full: Tree = {}
    baseline: Tree = {}
    comps: Tree = {}
    denom: Tree = {}
    for name, mo in moments.items():
        h, theta = state.hyper[name], params[name]
        dt, dev = mo.denom.dtype, mo.denom.device
        b1 = h.betas[0]
        d = mo.denom * mo.bc1
        m = state.exp_avg[name].to(dev, dt)
        sign = -1.0 if h.maximize else 1.0
        scale = torch.tensor(-sign * h.lr * (1 - b1), dtype=dt, device=dev)
        if coef is not None:
            scale = scale * coef.to(dev, dt)
        full[name] = new_theta[name] - theta.to(dt)
        baseline[name] = theta.to(dt) * (-h.lr * h.weight_decay) - (m / d) * (h.lr * b1)
        # one [M, *s] allocation per name: these are the big tensors (M sequences × the adapter)
        comps[name] = torch.mul(per_seq_grads[name].to(dev, dt), scale).div_(d)
        denom[name] = d
    return AdamWDecomposition(full=full, baseline=baseline, components=comps, denom=denom,
                              clip_coef=1.0 if coef is None else float(coef), grad_norm=float(norm),
                              new_state=new_state)


def unit_lr(tree: Mapping[str, Tensor], state: AdamWState) -> Tree:
    """Per unit learning rate (docs/math.md#directions-and-eta): ``tree[name] / lr[name]``, or ``[K, *s]``.

    ``u = Δθ / lr`` so that a step ``η = lr`` along ``u`` reproduces the real update; the lr is
    each parameter's own param-group lr.
    """
    lrs: dict[str, float] = {}
    for name in tree:
        if name not in state.hyper:
            raise BatchError(f"unit_lr: {name!r} is not in the optimizer state; its lr is unknown.")
        lr = state.hyper[name].lr
        if not (math.isfinite(lr) and lr > 0):
            raise CheckpointError(
                f"unit_lr: parameter {name!r} has lr={lr}; directions per unit lr need lr > 0."
            )
        lrs[name] = lr
    return {k: v / lrs[k] for k, v in tree.items()}
