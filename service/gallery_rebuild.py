"""Index rebuilds off the request path: building from the store, replaying what committed meanwhile, and the
one background thread that runs them.

An HNSW index cannot delete (tombstones pile up until it is compacted), an IVF index must be retrained as
the gallery grows, and a re-embedding on another replica replaces every vector. Each is a rebuild from the
stored rows, which at a million entries takes minutes, so none may run under the gallery's locks. The
procedure (``service.gallery`` drives it):

1. :func:`build_from_store` reads the log position, then the rows, and builds a new :class:`SearchIndex`
   with no lock held. The rows reflect at least that position; replaying changes the rows already have is
   harmless (:meth:`SearchIndex.apply` is idempotent).
2. :func:`replay` applies the log after that position to the new index, once without a lock (the bulk of
   what committed during the build) and once more under the gallery's write lock (the rest: nothing commits
   on this replica meanwhile); then the new index is swapped in under the index lock.

Meanwhile searches and writes keep using the old index: its tombstones keep deleted entries out of answers,
and writes apply to it as usual, so read-your-writes holds throughout. :class:`Rebuilder` runs at most one
rebuild at a time; a request while one runs coalesces with it (everything committed since its start is
replayed into it, and the gallery asks again if the swapped index still needs one).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from service.gallery_sync import read_changes
from service.held_weakly import held_weakly
from service.index import IndexParams, SearchIndex
from service.store import LAST_SEQ, Store

logger = logging.getLogger("centerid.rebuild")

FULL, COMPACTION, RETRAIN = "full", "compaction", "retrain"
_STRENGTH = {COMPACTION: 0, RETRAIN: 1, FULL: 2}  # a coalesced request keeps the strongest kind


class RebuildCancelled(Exception):
    """The gallery is closing: the build in progress is discarded, never swapped in."""


def rebuild_kind(state: SearchIndex) -> str:
    """What an index that asks for a rebuild needs: HNSW compacts its tombstones, IVF retrains its lists."""
    return COMPACTION if state.kind == "hnsw" else RETRAIN


def build_from_store(
    store: Store,
    fingerprint: str,
    dim: int,
    kind: str,
    params: IndexParams,
    decode: Callable[[Sequence[bytes]], np.ndarray],
) -> tuple[int, SearchIndex]:
    """A fresh index of the committed current-model rows and the log position it reflects at least.

    The position is read *before* the rows, so the rows contain every change up to it (and maybe more).
    """
    seq = int(store.query(LAST_SEQ)[0][0])
    rows = store.query(
        "SELECT e.id, e.label, m.embedding FROM embeddings m JOIN entries e ON e.id = m.entry_id "
        "WHERE m.fingerprint = ? ORDER BY m.entry_id",
        (fingerprint,),
    )
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = decode([r[2] for r in rows])
    return seq, SearchIndex.build(kind, dim, vectors, ids, [r[1] for r in rows], params)


def replay(
    store: Store,
    state: SearchIndex,
    after: int,
    fingerprint: str,
    decode: Callable[[Sequence[bytes]], np.ndarray],
) -> int | None:
    """Apply every change after ``after`` to ``state`` (not yet published: no lock needed for it).

    Returns the newest sequence applied, or None when the log says every vector was replaced (a schema-1
    re-embedding): the index just built is then of no use and must be built again.
    """
    while (batch := read_changes(store, after, fingerprint)) is not None:
        if batch.rebuild:
            return None
        state.apply(np.array(batch.add_ids, dtype=np.int64), decode(batch.add_blobs), batch.add_labels, batch.removed)
        after = batch.last_seq
    return after


@dataclass(frozen=True)
class RebuildStatus:
    """What the rebuilder is doing, for /ready and /metrics."""

    running: str | None  # the kind being built now, or None
    pending: str | None  # a request waiting for the thread
    completed: int  # rebuilds swapped in since start
    failed: int  # rebuilds that raised (retried on the next request)
    last_error: str | None


class Rebuilder:
    """The gallery's one builder thread: at most one rebuild at a time, requests coalesce.

    ``run(kind)`` does the work (build, replay, swap) and returns whether it swapped an index in. It calls
    :meth:`checkpoint` between the build and the swap: that runs the test ``hook`` (which may block the builder
    to prove that searches and writes go on meanwhile) and raises :class:`RebuildCancelled` once :meth:`close`
    was called.

    A bound ``run`` (the gallery's method) is held through a weak reference, so the thread does not keep its
    gallery alive: a gallery dropped without :meth:`close` is garbage-collected, and its collection ends the
    thread (as :meth:`close` would, without the join) instead of leaving it waiting forever.
    """

    def __init__(self, run: Callable[[str], bool]) -> None:
        self._run = held_weakly(run, self._owner_gone)
        self._cond = threading.Condition()
        self._pending: str | None = None
        self._running: str | None = None
        self._closing = False
        self._completed = self._failed = 0
        self._last_error: str | None = None
        self.hook: Callable[[str], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="gallery-rebuild", daemon=True)
        self._thread.start()

    def request(self, kind: str) -> bool:
        """Ask for a rebuild of ``kind``; False when it merged with one already waiting (or the gallery closes).

        A request while a rebuild runs waits for it to finish; ``run`` then finds out cheaply whether the
        index just swapped in still needs one (most often not: it replayed every change since its start).
        """
        with self._cond:
            if self._closing:
                return False
            merged = self._pending is not None
            if not merged or _STRENGTH[kind] > _STRENGTH[self._pending]:
                self._pending = kind
            self._cond.notify_all()
            return not merged

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._running is not None or self._pending is not None

    def status(self) -> RebuildStatus:
        with self._cond:
            return RebuildStatus(self._running, self._pending, self._completed, self._failed, self._last_error)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no rebuild runs or waits (True), or ``timeout`` seconds passed (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._running is None and self._pending is None, timeout)

    def checkpoint(self, kind: str) -> None:
        """Between the build and the swap: the test hook, then a cancellation point."""
        if self.hook is not None:
            self.hook(kind)
        self.raise_if_closing(kind)

    def raise_if_closing(self, kind: str) -> None:
        if self._closing:
            raise RebuildCancelled(kind)

    def close(self, timeout: float = 600.0) -> None:
        """Cancel what waits, let a running build reach its checkpoint (it is discarded there), join."""
        with self._cond:
            self._closing = True
            self._pending = None
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("the index rebuild did not stop within %.0fs; leaving it behind", timeout)

    def _owner_gone(self, _: object) -> None:
        """The gallery was garbage-collected without :meth:`close`: let the thread end."""
        with self._cond:
            self._closing = True
            self._pending = None
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closing or self._pending is not None)
                if self._closing:
                    return
                kind, self._pending = self._pending, None
                self._running = kind
            assert kind is not None
            self._run_one(kind)

    def _run_one(self, kind: str) -> None:
        """One rebuild; the gallery is held (strongly) only for its duration, in this frame."""
        error: str | None = None
        swapped = False
        try:
            run = self._run()
            if run is None:  # collected between the request and now: nothing left to build for
                raise RebuildCancelled(kind)
            swapped = run(kind)
        except RebuildCancelled:
            logger.info("index rebuild (%s) cancelled: the gallery is closing", kind)
        except Exception as failure:  # the old index keeps serving; the next request tries again
            error = f"{type(failure).__name__}: {failure}"
            logger.warning("background index rebuild (%s) failed, the current index keeps serving: %s", kind, error)
        with self._cond:
            self._running = None
            if swapped:
                self._completed += 1
            elif error is not None:
                self._failed += 1
                self._last_error = error
            self._cond.notify_all()
