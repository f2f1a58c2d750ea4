"""Progress bars for the estimators' ``on_progress(done, total)`` callbacks (edge code: tqdm).

The pure core never prints; long estimators accept an optional ``on_progress`` callback and the
runner passes one of these, which draws a tqdm bar that opens on the first report and closes
itself when ``done`` reaches ``total``.
"""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class ProgressBar:
    """``on_progress`` callback drawing a tqdm bar named ``desc`` (nothing at all when ``disable``)."""

    def __init__(self, desc: str, disable: bool = False, unit: str = "it") -> None:
        self.desc, self.disable, self.unit = desc, disable, unit
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, disable=self.disable, leave=False)
        self._bar.total = total
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar(desc: str, disable: bool = False, unit: str = "it") -> ProgressBar:
    """An ``on_progress(done, total)`` callback showing a bar; pass it to a long estimator call."""
    return ProgressBar(desc, disable, unit)
