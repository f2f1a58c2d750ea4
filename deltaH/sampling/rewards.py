"""Verifiable rewards: final-answer extraction, exact numeric normalisation, rewards by name or path.

Extraction (``extract_answer``) looks, in order, for the last balanced ``\\boxed{...}``, then the
text after the last ``####`` on its line (GSM8K), then the last number in the text.

Normalisation (``normalize_number``) maps every spelling of one rational number to one canonical
string, exactly (``fractions.Fraction``, never floats):

* integers print as integers: ``"3.0"``, ``"+3"``, ``"3."``, ``"$3"`` → ``"3"``;
* terminating decimals print as decimals without trailing zeros: ``"0.750"``, ``"3/4"`` → ``"0.75"``;
* other rationals print as reduced fractions: ``"2/6"``, ``"\\frac{1}{3}"`` → ``"1/3"``
  (so ``"0.333"`` never equals ``"1/3"``).

Stripped before parsing: all whitespace, ``$`` / ``\\$``, ``%`` / ``\\%``, trailing periods and a
leading ``+``. Commas are accepted only as thousands separators (``"1,234"``; ``"1,23"`` is not a
number). Exponents, units and words (``"42 apples"``) are not numbers: ``None``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Protocol

from deltaH.errors import ArgumentError, DataError, RewardError

if TYPE_CHECKING:
    from deltaH.sampling.data import PromptRecord

__all__ = [
    "RewardFn",
    "exact_rewards",
    "extract_answer",
    "load_reward_fn",
    "math_reward",
    "math_rewards",
    "normalize_number",
]


class RewardFn(Protocol):
    """A batched reward: one float per completion, ``records[i]`` is the prompt of ``completions[i]``."""

    def __call__(self, completions: list[str], records: list[PromptRecord], /) -> list[float]: ...


# --------------------------------------------------------------------------------------------
# Extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number not glued to a preceding word, digit or point ("x2", "3-5" → "5", "1.2.3" → "1.2").
_NUMBER = re.compile(r"(?<![\w.])-?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?", re.ASCII)


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces allowed)."""
    found: str | None = None
    for m in _BOXED.finditer(text):
        depth, start = 1, m.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i].strip() or found  # an empty box does not hide an earlier one
                break
    return found


def extract_answer(text: str, *, last_number: bool = True) -> str | None:
    """The final answer in ``text``, as written (not normalised), or ``None`` if there is none.

    Priority: the last balanced ``\\boxed{...}`` (an unclosed, truncated one is ignored), then the
    rest of the line after the last ``####``, then (if ``last_number``) the last number.

    >>> extract_answer("so 48 + 24 = 72.\\n#### 72")
    '72'
    >>> extract_answer("The answer is 42.")
    '42'
    """
    boxed = _last_boxed(text)
    if boxed:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].split("\n", 1)[0].strip()
        if tail:
            return tail
    if last_number:
        numbers = _NUMBER.findall(text)
        if numbers:
            return str(numbers[-1])
    return None


# --------------------------------------------------------------------------------------------
# Normalisation

_STRIP = re.compile(r"\s+|\\?\$|\\?%|\\[,;!: ]|\\left|\\right")
_DECIMAL = re.compile(r"-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)", re.ASCII)
_FRAC = re.compile(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _parse_decimal(s: str) -> Fraction | None:
    return Fraction(s.replace(",", "")) if _DECIMAL.fullmatch(s) else None


def _parse_ratio(num: str, den: str) -> Fraction | None:
    p, q = _parse_decimal(num), _parse_decimal(den)
    return None if p is None or q is None or q == 0 else p / q


def _parse(s: str) -> Fraction | None:
    m = _FRAC.fullmatch(s)
    if m:
        x = _parse_ratio(m.group(2), m.group(3))
        return None if x is None else -x if m.group(1) else x
    if s.count("/") == 1:
        return _parse_ratio(*s.split("/"))
    return _parse_decimal(s)


def _canonical(x: Fraction) -> str:
    """Integer, terminating decimal, or reduced ``p/q``; see the module docstring."""
    if x.denominator == 1:
        return str(x.numerator)
    q, twos, fives = x.denominator, 0, 0
    while q % 2 == 0:
        q, twos = q // 2, twos + 1
    while q % 5 == 0:
        q, fives = q // 5, fives + 1
    if q != 1:
        return f"{x.numerator}/{x.denominator}"
    k = max(twos, fives)
    scaled = abs(x.numerator) * 10**k // x.denominator  # exact: denominator divides 10**k
    digits = str(scaled).rjust(k + 1, "0")
    sign = "-" if x < 0 else ""
    return f"{sign}{digits[:-k]}.{digits[-k:].rstrip('0')}"


def normalize_number(s: str) -> str | None:
    """The canonical string of the number ``s`` spells, or ``None`` if ``s`` is not a number.

    >>> [normalize_number(x) for x in ["$1,234.50", "3.0", "6/8", "\\\\frac{1}{3}", "12 apples"]]
    ['1234.5', '3', '0.75', '1/3', None]
    """
    t = _STRIP.sub("", s.replace("\u2212", "-")).rstrip(".")
    x = _parse(t[1:] if t.startswith("+") else t)
    return None if x is None else _canonical(x)


# --------------------------------------------------------------------------------------------
# Rewards


def _final(answer: str) -> str:
    """A gold answer reduced to its final answer (idempotent on already-reduced answers)."""
    return extract_answer(answer, last_number=False) or answer.strip()


def _text_key(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".")


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals ``answer``, else 0.0.

    The completion's answer comes from ``extract_answer``; ``answer`` is reduced the same way when
    it still holds ``####`` or ``\\boxed{}``. A numeric gold answer is compared after
    ``normalize_number`` (exactly); a non-numeric one (``"\\sqrt{2}"``) by its text with
    whitespace removed.
    """
    got = extract_answer(completion)
    if got is None:
        return 0.0
    gold = _final(answer)
    gold_num = normalize_number(gold)
    if gold_num is not None:
        return float(normalize_number(got) == gold_num)
    return float(_text_key(got) == _text_key(gold))


def _answers(completions: list[str], records: list[PromptRecord], name: str) -> list[str]:
    if len(completions) != len(records):
        raise ArgumentError(
            f"{name}: got {len(completions)} completions but {len(records)} records; "
            "pass one record per completion (repeat a prompt's record for each of its responses)"
        )
    answers: list[str] = []
    for rec in records:
        if rec.answer is None:
            raise DataError(
                f"{name}: record id={rec.id!r} has no answer; load the prompts with data.answer_field "
                "(API: answer_field=) set to the column that holds the reference answer"
            )
        answers.append(rec.answer)
    return answers


def math_rewards(completions: list[str], records: list[PromptRecord]) -> list[float]:
    """Batched ``math_reward`` against each record's answer (built-ins ``"math"``, ``"gsm8k"``)."""
    answers = _answers(completions, records, "math reward")
    return [math_reward(c, a) for c, a in zip(completions, answers, strict=True)]


def exact_rewards(completions: list[str], records: list[PromptRecord]) -> list[float]:
    """1.0 where ``completion.strip() == answer.strip()`` (built-in ``"exact"``)."""
    answers = _answers(completions, records, "exact reward")
    return [float(c.strip() == a.strip()) for c, a in zip(completions, answers, strict=True)]


BUILTIN_REWARDS: dict[str, RewardFn] = {"math": math_rewards, "gsm8k": math_rewards, "exact": exact_rewards}


def _import_module(spec: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"reward {spec!r}: cannot import module {module!r} ({type(e).__name__}: {e}); "
            "check the spelling and that the module is on sys.path (PYTHONPATH)"
        ) from e


def _resolve(spec: str) -> Any:
    """The object a ``module:attr.path`` or ``module.attr`` spec names."""
    if ":" in spec:
        module, _, attr = spec.partition(":")
        if not module or not attr or ":" in attr:
            raise ArgumentError(f"reward {spec!r}: write 'package.module:function' (one colon, both sides)")
        obj = _import_module(spec, module)
        names = attr.split(".")
    else:
        parts = spec.split(".")
        for i in range(len(parts) - 1, 0, -1):  # longest importable module prefix
            module = ".".join(parts[:i])
            try:
                obj = importlib.import_module(module)
            except ModuleNotFoundError as e:
                if e.name is not None and (module == e.name or module.startswith(e.name + ".")):
                    continue  # this prefix is not a module; try a shorter one
                raise ImportError(
                    f"reward {spec!r}: importing module {module!r} failed ({e}); fix that import"
                ) from e
            except ImportError as e:
                raise ImportError(f"reward {spec!r}: importing module {module!r} failed ({e})") from e
            names = parts[i:]
            break
        else:
            raise ImportError(
                f"reward {spec!r}: no importable module in the dotted path (tried {parts[0]!r} and "
                "longer prefixes); check the spelling and sys.path (PYTHONPATH)"
            )
    for j, name in enumerate(names):
        if not hasattr(obj, name):
            where = module + ("." + ".".join(names[:j]) if j else "")
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise AttributeError(
                f"reward {spec!r}: {where!r} has no attribute {name!r}; available: {public[:20]}"
            )
        obj = getattr(obj, name)
    return obj


def _checked(fn: Callable[..., Any], spec: str, *, user: bool) -> RewardFn:
    """``fn`` with its output checked: one finite float per completion.

    A ``user`` function that raises is reported as a ``RewardError`` naming ``spec`` (the user's code
    failed, not their input); a built-in's errors pass through (they are about the records).
    """

    @functools.wraps(fn)
    def reward(completions: list[str], records: list[PromptRecord]) -> list[float]:
        if user:
            try:
                result = fn(completions, records)
            except Exception as e:
                raise RewardError(f"the reward function {spec!r} raised {type(e).__name__}: {e}") from e
        else:
            result = fn(completions, records)
        if isinstance(result, (str, bytes)) or not hasattr(result, "__iter__"):
            raise TypeError(f"reward {spec!r} returned {type(result).__name__}; return a list of floats")
        out = list(result)
        if len(out) != len(completions):
            raise ValueError(
                f"reward {spec!r} returned {len(out)} values for {len(completions)} completions; "
                "it must return one float per completion"
            )
        values: list[float] = []
        for i, r in enumerate(out):
            if isinstance(r, (str, bytes)) or not hasattr(r, "__float__"):
                raise TypeError(
                    f"reward {spec!r} returned {r!r} ({type(r).__name__}) at index {i}; return floats"
                )
            v = float(r)
            if not math.isfinite(v):
                raise ValueError(f"reward {spec!r} returned {v} at index {i}; rewards must be finite")
            values.append(v)
        return values

    return reward


def load_reward_fn(spec: str) -> RewardFn:
    """The reward a spec names: a built-in (``"math"``, ``"gsm8k"``, ``"exact"``) or a dotted path.

    A path is ``"package.module:function"`` (attribute after the colon, may be dotted) or
    ``"package.module.function"`` (the longest importable prefix is the module). The target must be
    a function (or callable instance) taking ``(completions, records)``. The returned function
    checks that the target returns one finite float per completion, and reports an exception the
    target raises as a ``deltaH.errors.RewardError`` that names ``spec``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ArgumentError(
            f"reward spec must be a non-empty string, got {spec!r}; use one of "
            f"{sorted(BUILTIN_REWARDS)} or 'package.module:function'"
        )
    spec = spec.strip()
    if spec.lower() in BUILTIN_REWARDS:
        return _checked(BUILTIN_REWARDS[spec.lower()], spec, user=False)
    if "." not in spec and ":" not in spec:
        raise ArgumentError(
            f"reward spec {spec!r} is neither a built-in ({sorted(BUILTIN_REWARDS)}) nor a dotted path; "
            "write 'package.module:function'"
        )
    obj = _resolve(spec)
    if inspect.isclass(obj) or not callable(obj):
        kind = "a class" if inspect.isclass(obj) else f"not callable ({type(obj).__name__})"
        raise TypeError(
            f"reward {spec!r} is {kind}; point at a function (or an instance) taking "
            "(completions: list[str], records: list[PromptRecord]) and returning list[float]"
        )
    try:
        inspect.signature(obj).bind(["completion"], [None])
    except TypeError as e:
        raise TypeError(
            f"reward {spec!r} cannot be called as fn(completions, records): {e}; "
            "give it exactly those two positional parameters"
        ) from e
    except ValueError:
        pass  # no inspectable signature (some builtins): checked when called
    return _checked(obj, spec, user=True)
