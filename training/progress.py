"""Progress within an epoch, so that a long epoch is never silent.

On a terminal: a tqdm bar (redrawn in place). Anywhere else (a log file, CI, ``docker logs``): one plain
log line every ``every_s`` seconds, with images/s and the time left in the epoch and in the run — a bar's
carriage returns would be unreadable there. Only rank 0 reports. The figures that need a device→host copy
(the running loss) are read only when a line is due, so quiet steps cost nothing.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from tqdm import tqdm

log = logging.getLogger("training")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class EpochProgress:
    """Call :meth:`update` after every step and :meth:`close` at the end of the epoch."""

    def __init__(
        self,
        epoch: int,
        epochs: int,
        steps: int,
        every_s: float,
        enabled: bool = True,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        stream = stream if stream is not None else sys.stderr
        self.epoch, self.epochs, self.steps, self.every_s, self.clock = epoch, epochs, steps, every_s, clock
        self.enabled = enabled
        self.bar = None
        if enabled and stream.isatty():
            desc = f"epoch {epoch + 1}/{epochs}"
            self.bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True, file=stream)
        self.start = self.last = clock()

    @property
    def lines(self) -> bool:
        """True when progress goes out as log lines (not a terminal)."""
        return self.enabled and self.bar is None

    def update(self, step: int, images: float, stats: Callable[[], dict[str, str]]) -> None:
        """``step`` steps and ``images`` images (all ranks) done this epoch; ``stats()`` gives loss etc."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0:
                self.bar.set_postfix(stats())
            return
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        log.info("%s", self.line(step, images, now - self.start, stats()))

    def line(self, step: int, images: float, elapsed: float, stats: dict[str, Any]) -> str:
        per_step = elapsed / max(step, 1)
        epoch_left = per_step * (self.steps - step)
        run_left = epoch_left + per_step * self.steps * (self.epochs - self.epoch - 1)
        figures = "  ".join(f"{k} {v}" for k, v in stats.items())
        return (
            f"epoch {self.epoch + 1}/{self.epochs}  step {step}/{self.steps} ({100 * step / max(self.steps, 1):.0f}%)"
            f"  {images / max(elapsed, 1e-9):.0f} img/s  ETA epoch {_duration(epoch_left)}"
            f"  run {_duration(run_left)}  {figures}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
