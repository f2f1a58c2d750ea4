"""The toy task: sums and differences of two small numbers, with verifiable answers.

A problem is ``a op b`` with ``0 <= a, b < max_operand`` and ``op`` in ``+ -``; its prompt is the
plain string ``"12+7="`` and its answer the exact result ``"19"`` (differences may be negative:
``"3-12="`` → ``"-9"``). Answers are graded by :func:`deltaH.sampling.rewards.math_reward` (the
``"math"`` reward), which reads the last number of the completion.

Everything is a pure function of its arguments: the split into held-out and training problems is
one shuffle by ``random.Random(seed)``, and example streams take their own seeded generator.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltaH.errors import ArgumentError
from deltaH.sampling.data import PromptRecord

__all__ = ["OPS", "Problem", "all_problems", "records", "split_problems", "write_prompts"]

OPS = ("+", "-")


@dataclass(frozen=True, order=True)
class Problem:
    """``a op b``: ``prompt`` is ``"{a}{op}{b}="``, ``answer`` the exact result as a string.

    >>> Problem(12, "+", 7).prompt, Problem(3, "-", 12).answer
    ('12+7=', '-9')
    """

    a: int
    op: str
    b: int

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ArgumentError(f"Problem.op must be one of {OPS}, got {self.op!r}")
        if self.a < 0 or self.b < 0:
            raise ArgumentError(f"Problem operands must be >= 0, got a={self.a}, b={self.b}")

    @property
    def prompt(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)


def all_problems(max_operand: int) -> list[Problem]:
    """Every problem with operands in ``[0, max_operand)``, in a fixed order (``2·max_operand²``)."""
    if max_operand < 1:
        raise ArgumentError(f"max_operand must be >= 1, got {max_operand}")
    return [Problem(a, op, b) for op in OPS for a in range(max_operand) for b in range(max_operand)]


def split_problems(*, seed: int, max_operand: int, n_heldout: int) -> tuple[list[Problem], list[Problem]]:
    """``(train, heldout)``: one seeded shuffle of :func:`all_problems`; the first ``n_heldout`` are held out.

    The two lists are disjoint, so held-out prompts are never seen in training.
    """
    problems = all_problems(max_operand)
    if not 0 < n_heldout < len(problems):
        raise ArgumentError(
            f"n_heldout={n_heldout} must be in [1, {len(problems) - 1}] for max_operand={max_operand}"
        )
    random.Random(seed).shuffle(problems)
    return problems[n_heldout:], problems[:n_heldout]


def records(problems: Sequence[Problem], *, prefix: str = "toy") -> list[PromptRecord]:
    """``PromptRecord`` s (id ``"{prefix}-{i}"``, prompt, answer), as ``load_prompts`` would build them."""
    out = []
    for i, p in enumerate(problems):
        row = {"id": f"{prefix}-{i}", "question": p.prompt, "answer": p.answer}
        out.append(PromptRecord(id=row["id"], prompt=p.prompt, answer=p.answer, raw=row))
    return out


def write_prompts(
    path: str | os.PathLike[str],
    problems: Sequence[Problem],
    extra: Iterable[dict[str, Any]] | None = None,
    *,
    prefix: str = "toy",
) -> Path:
    """Write ``problems`` as JSONL rows ``{"id", "question", "answer", **extra}``; returns the path.

    The file loads with ``deltaH.sampling.load_prompts(path)`` (its default fields are ``question``
    and ``answer``; pass ``id_field="id"`` to keep the ids).
    """
    extras = [{} for _ in problems] if extra is None else list(extra)
    if len(extras) != len(problems):
        raise ArgumentError(f"extra has {len(extras)} rows for {len(problems)} problems")
    p = Path(path)
    with p.open("w", encoding="utf-8") as f:
        for i, (prob, ex) in enumerate(zip(problems, extras, strict=True)):
            row = {"id": f"{prefix}-{i}", "question": prob.prompt, "answer": prob.answer, **ex}
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return p
