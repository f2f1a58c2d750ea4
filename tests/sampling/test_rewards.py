"""Answer extraction, exact numeric normalisation, math/exact rewards and rewards by dotted path."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deltaH.errors import DataError, DeltaHError, RewardError
from deltaH.sampling.data import PromptRecord
from deltaH.sampling.rewards import (
    extract_answer,
    load_reward_fn,
    math_reward,
    math_rewards,
    normalize_number,
)


def rec(answer: str | None, rid: str = "0") -> PromptRecord:
    return PromptRecord(id=rid, prompt="q", answer=answer, raw={})


# --------------------------------------------------------------------------------------------
# extract_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold <<48/2=24>>24 clips.\n#### 72", "72"),
        ("so the total is\n#### 1,234", "1,234"),
        ("#### 5\nsome trailing chatter 99", "5"),
        ("first \\boxed{3}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{x^{2} + \\sqrt{y_{1}}} done", "x^{2} + \\sqrt{y_{1}}"),
        ("\\boxed{7} and a truncated \\boxed{8", "7"),
        ("\\boxed{2} beats #### 3", "2"),
        ("The answer is 42.", "42"),
        ("It is -17 degrees", "-17"),
        ("3-5 is not negative five", "5"),
        ("pi is about 3.14159", "3.14159"),
        ("take .5 of it", ".5"),
        ("half is 1/2", "1/2"),
        ("costs $1,234,567 total", "1,234,567"),
        ("Step 1: 10 + 5 = 15\nStep 2: 15 * 2 = 30 apples", "30"),
        ("no number here", None),
        ("", None),
        ("#### \n", None),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_extract_answer_without_last_number_fallback() -> None:
    assert extract_answer("the answer is 42", last_number=False) is None
    assert extract_answer("work\n#### 42", last_number=False) == "42"


# --------------------------------------------------------------------------------------------
# normalize_number


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        ("42", "42"), ("3.0", "3"), ("3.", "3"), ("+3", "3"), ("-0", "0"), ("007", "7"),
        ("1,234", "1234"), ("$1,234.50", "1234.5"), (" 12 ", "12"), ("50%", "50"), ("50\\%", "50"),
        ("\\$5", "5"), ("-$5", "-5"), ("\u22127", "-7"), ("1 234", "1234"), ("1\\,234", "1234"),
        ("0.750", "0.75"), ("-.5", "-0.5"), ("3/4", "0.75"), ("6/8", "0.75"), ("-2/6", "-1/3"),
        ("1/3", "1/3"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{2}{3}", "2/3"), ("-\\frac{3}{4}", "-0.75"),
        ("$42$.", "42"),
        ("", None), ("abc", None), ("12 apples", None), ("1,23", None), ("1/0", None), ("1e3", None),
        ("nan", None), ("inf", None), ("--5", None), ("\\sqrt{2}", None), ("1.2.3", None),
    ],
)
def test_normalize_number(s: str, expected: str | None) -> None:
    assert normalize_number(s) == expected


@given(st.integers(min_value=-(10**30), max_value=10**30))
def test_thousands_separators_do_not_change_integers(n: int) -> None:
    assert normalize_number(str(n)) == normalize_number(f"{n:,}") == str(n)
    assert normalize_number(f"{n}.000") == str(n)


@given(st.fractions(max_denominator=10**6))
def test_normalize_is_exact_and_idempotent(x: Fraction) -> None:
    canon = normalize_number(f"{x.numerator}/{x.denominator}")
    assert canon is not None
    assert normalize_number(canon) == canon
    value = Fraction(canon)  # the canonical string reads back as the same rational, exactly
    assert value == x


@given(st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-(10**9), max_value=10**9))
def test_decimal_and_fraction_spellings_agree(d: object) -> None:
    x = Fraction(str(d))
    assert normalize_number(f"{float(x):.4f}") == normalize_number(f"{x.numerator}/{x.denominator}")


# --------------------------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("... so she has \\boxed{72} clips", "72", 1.0),
        ("#### 1,234", "1234", 1.0),
        ("The total is $1,234.00.", "1,234", 1.0),
        ("\\boxed{0.75}", "3/4", 1.0),
        ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("The answer is 42.", "work\n#### 42", 1.0),  # a raw GSM8K answer is reduced too
        ("The answer is 41.", "42", 0.0),
        ("\\boxed{0.333}", "1/3", 0.0),
        ("no answer at all", "42", 0.0),
        ("\\boxed{42 apples}", "42", 0.0),  # strict: units are not numbers
        ("\\boxed{\\sqrt{2}}", "\\sqrt{ 2 }", 1.0),  # non-numeric gold: text, whitespace removed
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    ],
)
def test_math_reward(completion: str, answer: str, reward: float) -> None:
    assert math_reward(completion, answer) == reward


@given(st.integers(min_value=-(10**12), max_value=10**12))
def test_math_reward_reads_boxed_and_gsm8k_forms(n: int) -> None:
    assert math_reward(f"so \\boxed{{{n:,}}}", str(n)) == 1.0
    assert math_reward(f"steps\n#### {n}", f"{n:,}") == 1.0
    assert math_reward(f"The answer is {n + 1}.", str(n)) == 0.0


def test_batched_rewards_need_matching_lengths_and_answers() -> None:
    assert math_rewards(["\\boxed{1}", "2"], [rec("1"), rec("3")]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 completions but 1 records"):
        math_rewards(["a", "b"], [rec("1")])
    with pytest.raises(ValueError, match=r"record id='q7' has no answer.*answer_field"):
        math_rewards(["a"], [rec(None, rid="q7")])


@pytest.mark.parametrize("name", ["math", "gsm8k", "MATH", " exact "])
def test_builtin_rewards(name: str) -> None:
    fn = load_reward_fn(name)
    out = fn([" 42 ", "\\boxed{41}"], [rec("42"), rec("42")])
    assert out == [1.0, 0.0]


def test_exact_reward_is_stripped_string_equality() -> None:
    fn = load_reward_fn("exact")
    assert fn(["  Paris\n", "paris", "42.0"], [rec("Paris"), rec("Paris"), rec("42")]) == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# load_reward_fn by dotted path


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    pkg = tmp_path / "rwpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(textwrap.dedent("""
        import math

        def length(completions, records):
            return [float(len(c)) for c in completions]

        def is_yes(completions, records):
            return [c.strip() == "yes" for c in completions]

        class Scorer:
            def __call__(self, completions, records):
                return [0.5] * len(completions)

            @staticmethod
            def static(completions, records):
                return [2.0] * len(completions)

        scorer = Scorer()
        NOT_CALLABLE = 3

        def one_arg(completions):
            return [0.0] * len(completions)

        def wrong_length(completions, records):
            return [1.0]

        def nan(completions, records):
            return [math.nan] * len(completions)

        def strings(completions, records):
            return ["1.0"] * len(completions)

        def divides(completions, records):
            return [1 / 0 for c in completions]
    """))
    (pkg / "broken.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "rwpkg.scores"
    for name in [m for m in sys.modules if m.split(".")[0] == "rwpkg"]:
        del sys.modules[name]


@pytest.mark.parametrize(
    ("attr", "expected"),
    [(":length", [2.0, 3.0]), (".length", [2.0, 3.0]), (":is_yes", [0.0, 0.0]), (":scorer", [0.5, 0.5]),
     (":Scorer.static", [2.0, 2.0]), (".Scorer.static", [2.0, 2.0])],
)
def test_load_reward_by_dotted_path(reward_module: str, attr: str, expected: list[float]) -> None:
    fn = load_reward_fn(reward_module + attr)
    out = fn(["ab", "abc"], [rec("1"), rec("2")])
    assert out == expected
    assert all(type(v) is float for v in out)


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ("", ValueError, "non-empty string"),
        ("nonsense", ValueError, r"'nonsense' is neither a built-in.*package.module:function"),
        (":length", ValueError, "one colon, both sides"),
        ("no_such_pkg_xyz.mod:f", ImportError, r"cannot import module 'no_such_pkg_xyz.mod'"),
        ("no_such_pkg_xyz.mod.f", ImportError, "no importable module"),
        ("rwpkg.broken:f", ImportError, "no_such_dependency_xyz"),
        ("rwpkg.broken.f", ImportError, r"importing module 'rwpkg.broken' failed"),
        ("rwpkg.scores:missing", AttributeError, r"'rwpkg.scores' has no attribute 'missing'"),
        ("rwpkg.scores.missing", AttributeError, r"has no attribute 'missing'.*length"),
        ("rwpkg.scores:Scorer.nope", AttributeError, r"'rwpkg.scores.Scorer' has no attribute"),
        ("rwpkg.scores:NOT_CALLABLE", TypeError, r"not callable \(int\)"),
        ("rwpkg.scores:Scorer", TypeError, "is a class"),
        ("rwpkg.scores:one_arg", TypeError, r"cannot be called as fn\(completions, records\)"),
    ],
)
def test_load_reward_errors(reward_module: str, spec: str, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        load_reward_fn(spec)


@pytest.mark.parametrize(
    ("attr", "error", "pattern"),
    [("wrong_length", ValueError, "returned 1 values for 2 completions"),
     ("nan", ValueError, "returned nan at index 0; rewards must be finite"),
     ("strings", TypeError, "returned '1.0' \\(str\\) at index 0")],
)
def test_loaded_reward_output_is_checked(
    reward_module: str, attr: str, error: type[Exception], pattern: str
) -> None:
    fn = load_reward_fn(f"{reward_module}:{attr}")
    with pytest.raises(error, match=pattern):
        fn(["a", "b"], [rec("1"), rec("2")])


def test_a_user_reward_that_raises_is_named(reward_module: str) -> None:
    # not bad input (the user's code failed): a RewardError naming the spec, the original as its cause
    fn = load_reward_fn(f"{reward_module}:divides")
    with pytest.raises(RewardError, match=r"the reward function 'rwpkg.scores:divides' raised "
                                          r"ZeroDivisionError: division by zero") as e:
        fn(["a"], [rec("1")])
    assert isinstance(e.value.__cause__, ZeroDivisionError) and not isinstance(e.value, DeltaHError)


def test_builtin_reward_errors_are_about_the_records() -> None:
    # a built-in's complaint is about the data (no answers), so it stays bad input
    with pytest.raises(DataError, match=r"record id='q' has no answer.*data\.answer_field"):
        load_reward_fn("math")(["1"], [PromptRecord(id="q", prompt="p", answer=None, raw={})])
