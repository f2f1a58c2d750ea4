"""deltaH's errors (placeholder until the error family lands)."""

from __future__ import annotations


class DeltaHError(Exception):
    """Base of every error that deltaH raises on purpose."""


class ResumeError(DeltaHError, ValueError):
    """``--resume`` cannot continue this folder with this config."""
