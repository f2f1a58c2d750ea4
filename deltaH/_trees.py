"""Tree helpers: parameters and directions are ``dict[str, Tensor]``.

A *tree* maps de-duplicated ``named_parameters()`` names to tensors. A *stacked* tree adds a
leading axis ``K`` to every leaf (``[K, *shape]``). Every tree operation in deltaH goes through
this module; nobody rewrites them inline.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from deltaH.errors import BatchError

Tree = dict[str, Tensor]


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    """``a + b`` leaf by leaf; a name missing from one side counts as zero."""
    out = dict(a)
    for k, v in b.items():
        out[k] = out[k] + v if k in out else v
    return out


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    """``s · a`` leaf by leaf."""
    return {k: v * s for k, v in a.items()}


def zeros_like(a: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def stack(trees: Sequence[Mapping[str, Tensor]]) -> Tree:
    """Stack K trees with the same names into one stacked tree ``[K, *shape]``."""
    if not trees:
        raise ValueError("stack() needs at least one tree")
    names = list(trees[0])
    for i, t in enumerate(trees):
        if list(t) != names:
            raise ValueError(f"tree {i} has names {sorted(t)} but tree 0 has {sorted(names)}")
    return {k: torch.stack([t[k] for t in trees]) for k in names}


def unstack(a: Mapping[str, Tensor]) -> list[Tree]:
    """Inverse of :func:`stack`."""
    k = n_stacked(a)
    return [{name: v[i] for name, v in a.items()} for i in range(k)]


def index(a: Mapping[str, Tensor], idx: slice | Tensor | int) -> Tree:
    """Select along the stacked axis."""
    return {k: v[idx] for k, v in a.items()}


def n_stacked(a: Mapping[str, Tensor]) -> int:
    """Length ``K`` of the leading axis of a stacked tree (all leaves must agree)."""
    sizes = {v.shape[0] for v in a.values()}
    if len(sizes) != 1:
        raise BatchError(f"stacked tree has inconsistent leading sizes {sorted(sizes)}")
    return sizes.pop()


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``Σ_leaves <a, b>`` over the names both trees have, accumulated in float64."""
    total = torch.zeros((), dtype=torch.float64)
    for k, v in a.items():
        if k in b:
            total = total + (v.double() * b[k].double()).sum().to(total.device)
    return total


def stacked_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """``[K]`` dot products between a stacked tree ``a`` (``[K, *shape]``) and a plain tree ``b``."""
    out: Tensor | None = None
    for k, v in a.items():
        if k not in b:
            continue
        term = v.double().flatten(1) @ b[k].double().flatten().to(v.device)
        out = term if out is None else out + term
    if out is None:
        return torch.zeros(n_stacked(a), dtype=torch.float64)
    return out


def is_zero(a: Mapping[str, Tensor]) -> Tensor:
    """``[K]`` booleans: which stacked directions are exactly zero in every leaf."""
    k = n_stacked(a)
    nz = torch.zeros(k, dtype=torch.bool)
    for v in a.values():
        nz |= (v.reshape(k, -1) != 0).any(dim=1).cpu()
    return ~nz
