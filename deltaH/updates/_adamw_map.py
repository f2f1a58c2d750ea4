"""Boundary code for :class:`deltaH.updates.adamw.AdamWState`: optimizer ids → parameter names.

Two sources, both validated here (the pure core in ``adamw.py`` trusts what leaves this module):

* a live ``torch.optim.AdamW`` / ``Adam`` (optionally inside accelerate's ``AcceleratedOptimizer``),
  whose parameters are matched to ``model.named_parameters()`` by object identity;
* a saved ``optimizer.pt`` dict, whose integer ids are matched to names by position (ids run across
  the param groups in order, as ``Optimizer.state_dict()`` numbers them), through saved
  ``param_names`` or a caller-supplied order, with every shape checked.

Nothing here guesses: a file that cannot be mapped is an error, never a fresh state.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from deltaH.errors import ArgumentError, CheckpointError

_REQUIRED_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay")


class AdamWHyper(NamedTuple):
    """Hyper-parameters of the param group a parameter belongs to (as ``torch.optim.AdamW`` reads them)."""

    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool


class StateFields(NamedTuple):
    """The validated fields an ``AdamWState`` is built from (all keyed by parameter name)."""

    exp_avg: dict[str, Tensor]
    exp_avg_sq: dict[str, Tensor]
    max_exp_avg_sq: dict[str, Tensor]
    step: dict[str, int]
    hyper: dict[str, AdamWHyper]
    fresh: frozenset[str]


ShapeLike = Sequence[int] | torch.Size


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def hyper_of_group(group: Mapping[str, Any], where: str) -> AdamWHyper:
    """Read and check one param group's hyper-parameters (``where`` names it in errors)."""
    missing = [k for k in _REQUIRED_GROUP_KEYS if k not in group]
    if missing:
        raise CheckpointError(
            f"{where} lacks {missing}: this is not a torch Adam/AdamW param group. deltaH reconstructs "
            "torch.optim.AdamW only; save the optimizer with optimizer.state_dict() of an AdamW."
        )
    wd = _float(group["weight_decay"])
    if wd != 0.0 and not group.get("decoupled_weight_decay", True):
        raise CheckpointError(
            f"{where} has weight_decay={wd} with decoupled_weight_decay=False: that is Adam with an L2 "
            "penalty added to the gradient, not AdamW (decoupled decay), and deltaH does not reconstruct "
            "it. Use torch.optim.AdamW (or Adam(decoupled_weight_decay=True)), or weight_decay=0."
        )
    b1, b2 = (_float(b) for b in group["betas"])
    return AdamWHyper(lr=_float(group["lr"]), betas=(b1, b2), eps=_float(group["eps"]), weight_decay=wd,
                      amsgrad=bool(group.get("amsgrad", False)), maximize=bool(group.get("maximize", False)))


def _step_of(value: Any, where: str) -> int:
    s = _float(value)
    if not (math.isfinite(s) and s >= 0 and s == int(s)):
        raise CheckpointError(f"{where}: step={s} is not a non-negative whole number; the file is corrupt.")
    return int(s)


def _take(t: Tensor, copy: bool) -> Tensor:
    return t.detach().clone() if copy else t.detach()


# ----------------------------------------------------------------------------------- live optimizer
def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """Unwrap accelerate's ``AcceleratedOptimizer`` (``.optimizer``) and refuse anything but Adam/AdamW."""
    acc = sys.modules.get("accelerate.optimizer")
    if acc is not None and isinstance(optimizer, acc.AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    if type(optimizer) not in (torch.optim.AdamW, torch.optim.Adam):
        raise TypeError(
            f"optimizer is a {type(optimizer).__module__}.{type(optimizer).__qualname__}; deltaH "
            "reconstructs exactly torch.optim.AdamW (or torch.optim.Adam with decoupled_weight_decay=True or "
            "weight_decay=0), possibly inside accelerate's AcceleratedOptimizer. Train with "
            "optim='adamw_torch' or 'adamw_torch_fused'."
        )
    return optimizer


def fields_from_optimizer(optimizer: Any, model: torch.nn.Module, copy: bool) -> StateFields:
    opt = unwrap_optimizer(optimizer)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {id(p) for _, p in model.named_parameters() if not p.requires_grad}
    out = StateFields({}, {}, {}, {}, {}, frozenset())
    fresh: set[str] = set()
    for gi, group in enumerate(opt.param_groups):
        hyper = hyper_of_group(group, f"optimizer.param_groups[{gi}]")
        for pi, p in enumerate(group["params"]):
            if id(p) in frozen:
                continue  # frozen in the model: it cannot get a gradient, so it never steps
            if id(p) not in trainable:
                raise CheckpointError(
                    f"optimizer.param_groups[{gi}]['params'][{pi}] (shape {tuple(p.shape)}) is not a "
                    "parameter of the model (matched by identity against model.named_parameters()). "
                    "Pass the model the optimizer was built on (the peft-wrapped one, if it was wrapped)."
                )
            name = trainable.pop(id(p))
            st = opt.state.get(p, {})
            if len(st) == 0:
                fresh.add(name)
                zero = torch.zeros_like(p, memory_format=torch.preserve_format).detach()
                _put_fresh(out, name, hyper, zero)
            else:
                _put_saved(out, name, hyper, st, copy, tuple(p.shape), f"optimizer state of {name!r}")
    if trainable:
        first = next(iter(trainable.values()))
        raise CheckpointError(
            f"trainable parameter {first!r} of the model is in no param group of the optimizer "
            f"({len(trainable)} such). Build the optimizer over every requires_grad parameter, or call "
            f"requires_grad_(False) on the ones it does not train."
        )
    return out._replace(fresh=frozenset(fresh))


def _put_fresh(out: StateFields, name: str, hyper: AdamWHyper, zero: Tensor) -> None:
    """A parameter that never had a gradient: zero moments at step 0 (where torch's first step starts)."""
    out.exp_avg[name], out.exp_avg_sq[name] = zero, zero.clone()
    if hyper.amsgrad:
        out.max_exp_avg_sq[name] = zero.clone()
    out.step[name] = 0
    out.hyper[name] = hyper


def _put_saved(out: StateFields, name: str, hyper: AdamWHyper, st: Mapping[str, Any], copy: bool,
               want: tuple[int, ...] | None, where: str) -> None:
    """A parameter's saved state ``st`` (checked: keys, step, shapes against ``want``)."""
    _check_entry(st, hyper, where)
    out.exp_avg[name] = _take(st["exp_avg"], copy)
    out.exp_avg_sq[name] = _take(st["exp_avg_sq"], copy)
    if hyper.amsgrad:
        out.max_exp_avg_sq[name] = _take(st["max_exp_avg_sq"], copy)
    out.step[name] = _step_of(st["step"], where)
    _check_shapes(out, name, want, where)
    out.hyper[name] = hyper


def _check_entry(st: Mapping[str, Any], hyper: AdamWHyper, where: str) -> None:
    need = ["step", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if hyper.amsgrad else [])
    missing = [k for k in need if k not in st]
    if missing:
        raise CheckpointError(
            f"{where} has keys {sorted(st)} and lacks {missing}: it is not torch Adam/AdamW state"
            + (" (amsgrad=True in its group)" if "max_exp_avg_sq" in missing else "")
            + ". deltaH reconstructs torch.optim.AdamW only."
        )


def _check_shapes(out: StateFields, name: str, want: tuple[int, ...] | None, where: str) -> None:
    tensors = {"exp_avg": out.exp_avg[name], "exp_avg_sq": out.exp_avg_sq[name]}
    if name in out.max_exp_avg_sq:
        tensors["max_exp_avg_sq"] = out.max_exp_avg_sq[name]
    want = tuple(out.exp_avg[name].shape) if want is None else want
    for key, t in tensors.items():
        if tuple(t.shape) != want:
            raise CheckpointError(
                f"{where}: parameter {name!r} expects shape {want} but {key} has shape {tuple(t.shape)}; "
                "the optimizer file cannot be mapped to these parameters. Check that the names are in "
                "optimizer-id order (replay the trainer's param grouping exactly) and belong to this model."
            )


# ----------------------------------------------------------------------------------- saved state dict
def _resolve_names(groups: Sequence[Mapping[str, Any]], names: Sequence[str] | Mapping[str, ShapeLike] | None,
                   n_ids: int) -> list[str]:
    saved: list[str] | None = None
    if groups and all("param_names" in g for g in groups):
        saved = [str(n) for g in groups for n in g["param_names"]]
    if names is None:
        if saved is None:
            raise ArgumentError(
                "names=None but the state dict's param_groups carry no 'param_names' (the HF Trainer and TRL "
                "do not save them). Pass names: the parameter names in optimizer-id order, e.g. the "
                "trainer's decay group then its no-decay group, each in named_parameters() order."
            )
        order = saved
    else:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of names or a dict name -> shape, not a str")
        order = list(names)
        if saved is not None and saved != order:
            i = next((k for k, (a, b) in enumerate(zip(saved, order, strict=False)) if a != b),
                     min(len(saved), len(order)))
            got = order[i] if i < len(order) else "<end>"
            want = saved[i] if i < len(saved) else "<end>"
            raise ArgumentError(
                f"names disagree with the param_names saved in the file at optimizer id {i}: got {got!r}, "
                f"file has {want!r}. Pass names=None to use the saved names, or fix the order."
            )
    if len(order) != n_ids:
        raise ArgumentError(
            f"the state dict's param_groups hold {n_ids} parameters but {len(order)} names were given; "
            "the optimizer file cannot be mapped. Give exactly one name per optimizer id, in id order."
        )
    if len(set(order)) != len(order):
        dup = next(n for n in order if order.count(n) > 1)
        raise ArgumentError(f"name {dup!r} appears twice in names; each optimizer id needs its own name.")
    return order


def _merged_shapes(names: object, shapes: Mapping[str, ShapeLike] | None) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    sources: list[tuple[str, Mapping[str, ShapeLike]]] = []
    if isinstance(names, Mapping):
        sources.append(("names", names))
    if shapes is not None:
        sources.append(("shapes", shapes))
    for label, src in sources:
        for n, s in src.items():
            shp = tuple(int(d) for d in s)
            if n in out and out[n] != shp:
                raise ArgumentError(f"{label}[{n!r}] = {shp} contradicts the shape {out[n]} given in names.")
            out[n] = shp
    return out


def fields_from_state_dict(state_dict: Mapping[str, Any],
                           names: Sequence[str] | Mapping[str, ShapeLike] | None,
                           shapes: Mapping[str, ShapeLike] | None, copy: bool) -> StateFields:
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
        raise CheckpointError(
            f"state_dict has {keys}; an optimizer state dict has 'state' and 'param_groups' "
            "(torch.load(path / 'optimizer.pt', weights_only=True))."
        )
    groups: Sequence[Mapping[str, Any]] = state_dict["param_groups"]
    state: Mapping[Any, Mapping[str, Any]] = state_dict["state"]
    ids = [i for g in groups for i in g["params"]]
    order = _resolve_names(groups, names, len(ids))
    want = _merged_shapes(names, shapes)
    unknown = sorted(set(want) - set(order))
    if unknown:
        raise ArgumentError(f"shapes name {unknown[:3]} which are not among the optimizer's names.")
    stray = sorted(set(state) - set(ids), key=str)
    if stray:
        raise CheckpointError(
            f"state holds ids {stray[:5]} that no param group lists; the file is inconsistent."
        )

    out = StateFields({}, {}, {}, {}, {}, frozenset())
    fresh: set[str] = set()
    saved_dtypes = [st["exp_avg"].dtype for st in state.values() if "exp_avg" in st]
    zero_dtype = saved_dtypes[0] if saved_dtypes else torch.float32
    position = 0
    for gi, group in enumerate(groups):
        hyper = hyper_of_group(group, f"param_groups[{gi}]")
        for pid in group["params"]:
            name, position = order[position], position + 1
            where = f"optimizer id {pid} ({name!r})"
            st = state.get(pid, {})
            if len(st) == 0:
                if name not in want:
                    raise ArgumentError(
                        f"{where} has no saved state (it never had a gradient) and its shape is unknown. "
                        "Pass shapes={name: shape} (or names as a dict name -> shape) so deltaH can "
                        "represent it with zero moments at step 0."
                    )
                fresh.add(name)
                _put_fresh(out, name, hyper, torch.zeros(want[name], dtype=zero_dtype))
            else:
                _put_saved(out, name, hyper, st, copy, want.get(name), where)
    return out._replace(fresh=frozenset(fresh))
