"""Which gallery entries this replica's model could not embed, and when each may be tried again.

The background re-embedding (``service.gallery_models``) runs every poll period and whenever another
model's replica enrolls something. An image this model cannot take (its pipeline finds no face, the file does
not decode) fails the same way every time, so :class:`EmbedBackoff` remembers it: the entry is not offered
to the model again until its wait is over (the poll period after the first failure, doubling after each
further one, capped at :data:`BACKOFF_MAX_S`), and it is reported with one WARNING the first time and at
DEBUG afterwards, instead of a warning every pass forever.

The memory is bounded by a constant, not by the data: beyond :data:`REMEMBER_MAX` entries the one that
failed first is forgotten (it is then tried, and warned about, once more). It lives in this process only: a
restart forgets every failure and tries each entry once more (one warning each again), which is the point
of restarting with a fixed model. An entry that is embedded after all (a new model, another replica of this
one) or deleted is forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger("centerid.gallery")

BACKOFF_MAX_S = 3600.0  # an entry that keeps failing is tried at least this often
REMEMBER_MAX = 10_000  # failures remembered at most (the oldest is forgotten beyond it)


@dataclass
class _Failure:
    wait_s: float  # how long after this failure the entry is left alone
    retry_at: float  # clock reading from which it may be tried again
    attempts: int


class EmbedBackoff:
    """Failed entries and their retry times. Thread-safe: the backfill thread writes, /info reads.

    ``clock`` returns seconds (monotonic); tests pass a fake one to step through the waits.
    """

    def __init__(
        self,
        first_wait_s: float,
        max_wait_s: float = BACKOFF_MAX_S,
        capacity: int = REMEMBER_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.first_wait_s = max(float(first_wait_s), 0.0)
        self.max_wait_s = max(float(max_wait_s), self.first_wait_s)
        self.capacity = max(int(capacity), 1)
        self.clock = clock
        self._failures: OrderedDict[int, _Failure] = OrderedDict()  # oldest first failure first
        self._lock = threading.Lock()

    def due(self, entry_id: int) -> bool:
        """Whether ``entry_id`` may be offered to the model now (never failed, or its wait is over)."""
        with self._lock:
            failure = self._failures.get(entry_id)
            return failure is None or self.clock() >= failure.retry_at

    def failed(self, entry_id: int, model: str, error: BaseException) -> None:
        """Record a failure of ``entry_id`` and log it: WARNING the first time, DEBUG on repeats."""
        reason = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the message held
        with self._lock:
            before = self._failures.get(entry_id)
            wait_s = self.first_wait_s if before is None else min(before.wait_s * 2, self.max_wait_s)
            attempts = 1 if before is None else before.attempts + 1
            self._failures[entry_id] = _Failure(wait_s, self.clock() + wait_s, attempts)
            while len(self._failures) > self.capacity:
                self._failures.popitem(last=False)
        level = logging.WARNING if before is None else logging.DEBUG
        logger.log(
            level,
            "entry %s cannot be embedded by model %s: %s (attempt %d; not tried again for %.0fs)",
            entry_id,
            model,
            reason,
            attempts,
            wait_s,
        )

    def forget(self, entry_ids: Iterable[int]) -> None:
        """``entry_ids`` were embedded or are gone: nothing to wait for any more."""
        with self._lock:
            for entry_id in entry_ids:
                self._failures.pop(entry_id, None)

    def keep_only(self, still_pending: set[int]) -> None:
        """After a pass over every pending entry: forget the remembered ones it no longer met (deleted, or
        embedded by another replica of this model)."""
        with self._lock:
            for entry_id in [i for i in self._failures if i not in still_pending]:
                del self._failures[entry_id]

    def known(self, entry_ids: Iterable[int]) -> set[int]:
        """Those of ``entry_ids`` whose last try failed."""
        with self._lock:
            return {entry_id for entry_id in entry_ids if entry_id in self._failures}

    def __len__(self) -> int:
        """Entries whose last try failed: left alone until their wait is over."""
        with self._lock:
            return len(self._failures)
