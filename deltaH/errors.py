"""deltaH's error family: every *bad input* is a ``DeltaHError``.

Bad input is something the caller can fix: a config key, a file or folder, an argument of a public
function, a batch or direction with the wrong shape or names. The ``deltah`` command exits with
status 2 and one line for a ``DeltaHError`` and with status 1 for anything else, so a bug inside
deltaH (or in the user's own reward function) is never reported as the user's input.

Each subclass also inherits the built-in type its raise sites used before (``ValueError``, or
``FileNotFoundError`` / ``FileExistsError`` / ``KeyError``), so ``except ValueError`` keeps working::

    DeltaHError
    ├── ConfigError          config key, YAML file or --set override (.key: the dotted key path)
    ├── DataError            prompt dataset: unreadable file, missing field, duplicate id
    ├── CheckpointError      checkpoint folder: missing, corrupt or mismatched files
    ├── BatchError           SequenceBatch / direction / gradient tree of the wrong shape
    │   └── ParameterNameError   a tree names a parameter the model does not train (+ KeyError)
    ├── ArgumentError        another argument of a public function out of range
    ├── UnsupportedOptionError  a trainer option (or model) whose gradient deltaH does not reproduce
    ├── DeviceError          a device torch cannot use here (cuda without CUDA)
    ├── ResumeError          --resume / inspect of a folder that is not a deltaH run
    ├── NotFoundError        a file or folder the user named does not exist (+ FileNotFoundError)
    └── OutputExistsError    --out already holds results (+ FileExistsError)

    RewardError              the user's reward function raised: *not* bad input (a RuntimeError)

This module imports only the standard library (``deltaH.config`` must stay light).
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "BatchError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DeltaHError",
    "DeviceError",
    "NotFoundError",
    "OutputExistsError",
    "ParameterNameError",
    "ResumeError",
    "RewardError",
    "UnsupportedOptionError",
]


class DeltaHError(Exception):
    """Bad input: the message names the key, file or argument, the value, and the fix."""

    # KeyError and OSError format their message differently; the family always shows it as written.
    def __str__(self) -> str:
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class ConfigError(DeltaHError, ValueError):
    """A config problem in one line: the key path, the value and what is allowed.

    ``key`` is the dotted key path (``None`` for file-level problems).
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(" ".join(message.splitlines()))
        self.key = key


class DataError(DeltaHError, ValueError):
    """A prompt file that cannot be read, or a row without a usable field."""


class CheckpointError(DeltaHError, ValueError):
    """A checkpoint deltaH cannot use as it is: corrupt, incomplete or mismatched files, or a model and
    optimizer (state) that do not belong together."""


class BatchError(DeltaHError, ValueError):
    """A batch, direction or gradient tree passed to the API with the wrong shape, dtype or names."""


class ParameterNameError(BatchError, KeyError):
    """A tree or a list of names that does not match the model's trainable parameter names."""


class ArgumentError(DeltaHError, ValueError):
    """An argument of a public function outside its allowed values."""


class UnsupportedOptionError(DeltaHError, ValueError):
    """A recorded trainer option (or a model property) that deltaH cannot reproduce exactly; the message
    names it, its value and what is supported. Replaying anyway would give a silently different gradient."""


class DeviceError(DeltaHError, ValueError):
    """A device this torch build or machine cannot use."""


class ResumeError(DeltaHError, ValueError):
    """A folder given to ``--resume`` or ``deltah inspect`` that is not a deltaH results folder."""


class NotFoundError(DeltaHError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OutputExistsError(DeltaHError, FileExistsError):
    """A results folder that already holds results (deltaH never overwrites them)."""


class RewardError(RuntimeError):
    """The user's reward function raised. Not bad input: the user's code failed (exit 1, traceback).

    The message says which function and what it raised; the original exception is ``__cause__``.
    """
