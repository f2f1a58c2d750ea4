"""A saved ``optimizer.pt`` → :class:`~deltaH.updates.adamw.AdamWState`, with names and every shape checked.

Optimizer ids are positions (they run across the param groups in order), so they are mapped to
parameter names in one of two ways, never by guessing:

* the ``param_names`` torch saves when the optimizer was built from ``named_parameters()``;
* an exact replay of the HF Trainer's grouping (``transformers`` 5.x, ``trainer.py:
  Trainer.create_optimizer``): group 0 = the parameters named by ``get_decay_parameter_names``
  that have ``requires_grad``, group 1 = the other ``requires_grad`` parameters, each in
  ``model.named_parameters()`` order; both groups always exist (either may be empty) and the
  second has ``weight_decay=0.0``.

The file is read with ``torch.load(weights_only=True)`` only.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deltaH.errors import CheckpointError
from deltaH.io._files import torch_load
from deltaH.updates.adamw import AdamWState

logger = logging.getLogger(__name__)

# transformers trainer.py, Trainer.get_decay_parameter_names: name patterns (searched in the lower-cased
# name) that exclude a parameter from weight decay; nn.LayerNorm children are excluded by type.
_NO_DECAY_PATTERNS = tuple(
    re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")
)
_NO_DECAY_TYPES = (nn.LayerNorm,)
_PEFT_PREFIX = "base_model.model."


def _excluded(name: str) -> bool:
    low = name.lower()
    return any(p.search(low) for p in _NO_DECAY_PATTERNS)


def _parameter_names(module: nn.Module) -> list[str]:
    """A line-by-line port of ``transformers.trainer_pt_utils.get_parameter_names`` (recursive, per child)."""
    result: list[str] = []
    for name, child in module.named_children():
        result += [
            f"{name}.{n}"
            for n in _parameter_names(child)
            if not isinstance(child, _NO_DECAY_TYPES) and not _excluded(f"{name}.{n}")
        ]
    result += [k for k in module._parameters if not _excluded(k)]
    return result


def decay_parameter_names(model: nn.Module) -> list[str]:
    """The names ``Trainer.get_decay_parameter_names(model)`` returns (weight decay applies to them)."""
    return _parameter_names(model)


def trainer_groups(model: nn.Module) -> tuple[list[str], list[str]]:
    """``(decay, no_decay)``: the Trainer's two param groups of ``requires_grad`` parameters, by name."""
    decay = set(decay_parameter_names(model))
    named = list(model.named_parameters())
    return ([n for n, p in named if n in decay and p.requires_grad],
            [n for n, p in named if n not in decay and p.requires_grad])


# ----------------------------------------------------------------------------------------- the file
def read_optimizer_file(path: Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` and a check that it is an optimizer state dict."""
    try:
        sd = torch_load(path)  # a truncated or garbage file: CheckpointError naming it
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: torch.load(weights_only=True) refused it ({str(e).splitlines()[0][:200]}); deltaH "
            "never unpickles arbitrary objects: save the optimizer with torch.save(optimizer.state_dict())"
        ) from e
    if not isinstance(sd, Mapping) or not {"state", "param_groups"} <= set(sd):
        keys = sorted(map(str, sd)) if isinstance(sd, Mapping) else type(sd).__name__
        raise CheckpointError(
            f"{path} holds {keys}, not an optimizer.state_dict() ('state' and 'param_groups'); it was not "
            "written by torch.save(optimizer.state_dict()) (FSDP/DeepSpeed layouts are not supported)."
        )
    return dict(sd)


def _saved_shape(state: Mapping[Any, Mapping[str, Any]], pid: Any) -> tuple[int, ...] | None:
    t = state.get(pid, {}).get("exp_avg")
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _first_misfit(names: Sequence[str], ids: Sequence[Any], state: Mapping[Any, Mapping[str, Any]],
                  shapes: Mapping[str, tuple[int, ...]]) -> str:
    """Describe the first position where the replayed names and the file's ids stop fitting."""
    for i in range(max(len(names), len(ids))):
        if i >= len(ids):
            return f"{names[i]!r} (shape {shapes[names[i]]}) has no slot in the file"
        if i >= len(names):
            return f"optimizer id {ids[i]} (saved shape {_saved_shape(state, ids[i])}) has no parameter"
        saved = _saved_shape(state, ids[i])
        if saved is not None and saved != shapes[names[i]]:
            return (f"{names[i]!r} has shape {shapes[names[i]]} but optimizer id {ids[i]} in its place "
                    f"has saved shape {saved}")
    return "?"


def _replay(path: Path, groups: Sequence[Mapping[str, Any]], state: Mapping[Any, Mapping[str, Any]],
            model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    decay, no_decay = trainer_groups(model)
    hint = ("deltaH replays only the HF Trainer's default grouping (decay, then no-decay, each in "
            "named_parameters() order over requires_grad parameters) and refuses to guess. Build the "
            "optimizer from model.named_parameters() so torch saves param_names, or map the file yourself "
            "with AdamWState.from_state_dict(torch.load(..., weights_only=True), names).")
    if len(groups) != 2:
        raise CheckpointError(
            f"{path} has {len(groups)} param groups and no saved param_names; the HF Trainer saves 2 "
            f"(decay, no-decay). {hint}"
        )
    wd1 = groups[1].get("weight_decay", 0.0)
    if float(wd1) != 0.0:
        raise CheckpointError(
            f"{path}: param group 1 has weight_decay={wd1}, but the HF Trainer's no-decay group has "
            f"0.0. {hint}"
        )
    for gi, (group, names) in enumerate(zip(groups, (decay, no_decay), strict=True)):
        ids = list(group["params"])
        if len(ids) != len(names):
            what = "decay" if gi == 0 else "no-decay"
            raise CheckpointError(
                f"{path}: param group {gi} holds {len(ids)} parameters but the Trainer's {what} group of "
                f"this model has {len(names)}; first that does not fit: "
                f"{_first_misfit(names, ids, state, shapes)}. "
                "Load the model the optimizer trained (same adapter, same frozen parameters; a different "
                f"transformers version may split decay/no-decay differently). {hint}"
            )
    return decay + no_decay


def _name_index(model: nn.Module) -> dict[str, str | None]:
    """Other spellings of each parameter name → the name (``None`` when a spelling is ambiguous).

    Spellings: without peft's ``base_model.model.`` prefix (an optimizer built on the inner model),
    and without the adapter name (peft's on-disk convention, ``key.replace(f".{adapter}", "")`` as in
    ``peft.utils.get_peft_model_state_dict``).
    """
    adapters = list(getattr(model, "peft_config", {}) or {})
    index: dict[str, str | None] = {}
    for name, _ in model.named_parameters():
        forms = {name, name.removeprefix(_PEFT_PREFIX)}
        for a in adapters:
            forms |= {f.replace(f".{a}", "") for f in list(forms)}
        for f in forms - {name}:
            index[f] = name if index.get(f, name) == name else None
    return index


def _from_param_names(path: Path, groups: Sequence[Mapping[str, Any]], model: nn.Module) -> list[str]:
    params = dict(model.named_parameters())
    index = _name_index(model)
    order: list[str] = []
    for gi, group in enumerate(groups):
        for saved in group["param_names"]:
            name = saved if saved in params else index.get(saved)
            if name is None:
                hint = next(iter(n for n, p in params.items() if p.requires_grad), "<none>")
                raise CheckpointError(
                    f"{path}: param_names of group {gi} holds {saved!r}, which is no parameter of the loaded "
                    f"model (its trainable names look like {hint!r}). The optimizer was built on another "
                    "model; load the checkpoint it belongs to."
                )
            if not params[name].requires_grad:
                raise CheckpointError(f"{path}: the optimizer trains {saved!r} but the loaded model holds it "
                                      f"frozen ({name!r}); the trainable set cannot be matched.")
            if name in order:
                raise CheckpointError(
                    f"{path}: param_names {saved!r} and another entry both map to {name!r}."
                )
            order.append(name)
    untrained = [n for n, p in params.items() if p.requires_grad and n not in set(order)]
    for n in untrained:
        params[n].requires_grad_(False)  # the optimizer never trained it: it is not part of θ
    if untrained:
        logger.info("%s: %d trainable parameters are in no param group; frozen (first: %s)",
                    path, len(untrained), untrained[0])
    return order


def optimizer_state_from_file(path: Path, model: nn.Module, device: torch.device
                              ) -> tuple[AdamWState, list[float]]:
    """Map ``path`` (an ``optimizer.pt``) onto ``model``'s parameters; shapes checked for every id.

    Returns the state and the lr of each param group (empty groups included). With saved
    ``param_names``, parameters the optimizer does not list are frozen (``requires_grad`` off), so
    the model's trainable set is the optimizer's. Errors name ``path``.
    """
    sd = read_optimizer_file(path)
    groups: list[Mapping[str, Any]] = list(sd["param_groups"])
    state: Mapping[Any, Mapping[str, Any]] = sd["state"]
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with_names = [("param_names" in g) for g in groups]
    if groups and all(with_names):
        order = _from_param_names(path, groups, model)
    elif any(with_names):
        raise CheckpointError(f"{path}: only some param groups carry param_names; the file is inconsistent.")
    else:
        order = _replay(path, groups, state, model, shapes)
    on_device = {pid: {k: (v.to(device) if isinstance(v, Tensor) and k != "step" else v)
                       for k, v in st.items()} for pid, st in state.items()}
    plain = {
        "state": on_device,
        "param_groups": [{k: v for k, v in g.items() if k != "param_names"} for g in groups],
    }
    try:
        st = AdamWState.from_state_dict(plain, {n: shapes[n] for n in order})
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    return st, [float(g["lr"]) for g in groups]
