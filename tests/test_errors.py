"""The error family (``deltaH.errors``) and the package's public surface that exports it."""

from __future__ import annotations

import ast
import importlib
import pickle
from pathlib import Path

import pytest

import deltaH
import deltaH.errors as errors

INIT = Path(deltaH.__file__)


def _type_checking_imports() -> dict[str, str]:
    """``name -> module`` of the ``if TYPE_CHECKING:`` block of ``deltaH/__init__.py``."""
    tree = ast.parse(INIT.read_text())
    out: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                assert isinstance(imp, ast.ImportFrom) and imp.module is not None, ast.dump(imp)
                for alias in imp.names:
                    assert alias.asname == alias.name, f"{alias.name} must be re-exported as itself"
                    out[alias.name] = imp.module
    return out


def test_lazy_surface_and_type_checking_block_list_the_same_names() -> None:
    static = _type_checking_imports()
    assert static == deltaH._EXPORTS  # same names, from the same modules
    assert deltaH.__all__ == sorted(deltaH._EXPORTS)
    for name, module in deltaH._EXPORTS.items():
        assert getattr(deltaH, name) is getattr(importlib.import_module(module), name), name


def test_every_error_class_is_exported() -> None:
    classes = {n for n in errors.__all__ if isinstance(getattr(errors, n), type)}
    assert classes == set(errors.__all__)
    assert {n for n, m in deltaH._EXPORTS.items() if m == "deltaH.errors"} == classes


BAD_INPUT = [errors.ConfigError, errors.DataError, errors.CheckpointError, errors.BatchError,
             errors.ArgumentError, errors.DeviceError, errors.ResumeError, errors.UnsupportedOptionError]


@pytest.mark.parametrize("cls", BAD_INPUT)
def test_bad_input_classes_are_value_errors(cls: type[Exception]) -> None:
    # existing `except ValueError` / pytest.raises(ValueError) keep working
    assert issubclass(cls, errors.DeltaHError) and issubclass(cls, ValueError)


def test_builtin_twins_keep_their_type_and_message() -> None:
    for cls, twin in ((errors.NotFoundError, FileNotFoundError), (errors.OutputExistsError, FileExistsError),
                      (errors.ParameterNameError, KeyError)):
        e = cls("the message")
        assert isinstance(e, twin) and isinstance(e, errors.DeltaHError)
        assert str(e) == "the message"  # KeyError would quote it, OSError would not parse it
    assert issubclass(errors.ParameterNameError, errors.BatchError)


def test_reward_error_is_not_bad_input() -> None:
    # the user's reward function raising is a failure of their code: exit 1, not 2
    assert not issubclass(errors.RewardError, errors.DeltaHError)
    assert issubclass(errors.RewardError, RuntimeError)


def test_config_error_key_and_one_line() -> None:
    e = errors.ConfigError("line one\nline two", "policy.top_p")
    assert str(e) == "line one line two" and e.key == "policy.top_p"
    import deltaH.config

    assert deltaH.config.ConfigError is errors.ConfigError


def test_errors_pickle() -> None:
    # errors cross process boundaries (torch.distributed, multiprocessing): they must round-trip
    for e in (errors.ConfigError("x", "k"), errors.NotFoundError("y"), errors.RewardError("z")):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
