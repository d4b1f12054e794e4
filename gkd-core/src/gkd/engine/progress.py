"""What a user sees while a stage trains: a progress bar when standard error is a terminal and
``logging.progress`` (or ``--progress``) asks for one; otherwise, in logs and CI, the same bar in
line mode: one line every ``logging.every_steps`` steps and at the stage's last step (percentage,
loss, learning rate, steps per second and time left; ``every_steps: 0``: none)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any


class StageProgress:
    """Progress of one stage, shown on global rank 0 only.

    Args:
        total: Steps of the stage.
        start: Steps already done (resume).
        desc: ``[2/3] kd``-style label.
        bar: Show a tqdm bar (standard error is a terminal and ``logging.progress``).
        every: Otherwise print a line every this many steps (0: never).
        echo: Where lines go.
    """

    def __init__(self, *, total: int, start: int, desc: str, bar: bool, every: int,
                 echo: Callable[[str], None]) -> None:
        self.total, self.desc, self.every, self.echo = total, desc, every, echo
        self._start, self._since = start, time.monotonic()
        self._bar: Any = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float, lr: float) -> None:
        """``step`` (1-based) is done with this loss and learning rate."""
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self._bar.update(1)
        elif self.every and (step % self.every == 0 or step == self.total):
            self.echo(f"{self.desc} step {step}/{self.total} ({100 * step // max(self.total, 1)}%) loss {loss:.4f} "
                      f"lr {lr:.2e}{self._pace(step)}")

    def _pace(self, step: int) -> str:
        """`` 3.1 step/s, 0:42 left``, from the steps done by this process (not those resumed)."""
        done, seconds = step - self._start, time.monotonic() - self._since
        if done <= 0 or seconds <= 0:
            return ""
        rate = done / seconds
        left = round((self.total - step) / rate)
        return f" {rate:.3g} step/s, {left // 60}:{left % 60:02d} left"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def progress_bar_wanted(setting: bool | None, configured: bool) -> bool:
    """A bar when asked for (``--progress``), else when configured and standard error is a terminal."""
    return setting if setting is not None else configured and sys.stderr.isatty()


__all__ = ["StageProgress", "progress_bar_wanted"]
