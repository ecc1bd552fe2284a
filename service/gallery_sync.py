"""Following the change log: how a replica's FAISS index converges on what every replica committed.

:func:`read_changes` turns a stretch of the log into what the index must do (vectors to add, ids to
remove, or "rebuild"); the gallery applies it under its index lock. :class:`Follower` is the background
thread of a replica on a shared store: it waits for a ``NOTIFY`` (promptness) or its poll interval
(correctness, should a notification be lost) and then catches up from the last applied sequence. While
the database is away it keeps retrying; searches meanwhile answer from the local index, which
:attr:`Follower.in_sync` then reports as possibly stale.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from service.gallery_input import GalleryError
from service.held_weakly import held_weakly
from service.store import CHANGE_ADD, CHANGE_DELETE, CHANGE_REBUILD, Store

logger = logging.getLogger("centerid.sync")

REPLAY_BATCH = 5000
REPLAY = (
    "SELECT c.seq, c.op, c.entry_id, c.fingerprint, e.label, m.embedding FROM changes c "
    "LEFT JOIN entries e ON e.id = c.entry_id "
    "LEFT JOIN embeddings m ON m.entry_id = c.entry_id AND m.fingerprint = c.fingerprint "
    "WHERE c.seq > ? ORDER BY c.seq LIMIT ?"
)


@dataclass
class ChangeBatch:
    """One stretch of the log, as index operations. ``last_seq`` is the newest change it covers."""

    last_seq: int
    rebuild: bool = False
    add_ids: list[int] = field(default_factory=list)
    add_labels: list[str] = field(default_factory=list)
    add_blobs: list[bytes] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    foreign_adds: int = 0  # entries enrolled with another model's vector: this model still has to embed them


def read_changes(store: Store, after: int, fingerprint: str, limit: int = REPLAY_BATCH) -> ChangeBatch | None:
    """The changes after sequence ``after`` (at most ``limit``), or None when there are none.

    An add whose entry is gone by now was deleted later in the log (ids are never reused): it is skipped.
    Vectors of another model never enter the index; an entry that arrived with one is counted in
    ``foreign_adds`` (it waits for an embedding of this model, see :meth:`Gallery.reembed`).
    """
    rows = store.query(REPLAY, (after, limit))
    if not rows:
        return None
    batch = ChangeBatch(last_seq=int(rows[-1][0]))
    for _seq, op, entry_id, change_fingerprint, label, embedding in rows:
        if op == CHANGE_REBUILD:
            batch.rebuild = True
        elif op == CHANGE_ADD and label is not None and embedding is not None:
            if change_fingerprint != fingerprint:
                batch.foreign_adds += 1
                continue
            batch.add_ids.append(int(entry_id))
            batch.add_labels.append(label)
            batch.add_blobs.append(bytes(embedding))
        elif op == CHANGE_DELETE:
            batch.removed.append(int(entry_id))
    return batch


class Follower:
    """The thread that keeps a replica's index caught up with a shared store. It holds the gallery's
    ``catch_up`` weakly (:func:`service.held_weakly.held_weakly`) and ends once the gallery is collected."""

    def __init__(self, store: Store, catch_up: Callable[[], object], poll_s: float) -> None:
        self._store = store
        self._catch_up = held_weakly(catch_up, lambda _: self._stopping.set())
        self._poll_s = max(poll_s, 0.05)
        self._stopping = threading.Event()
        self.in_sync = True  # False while the store cannot be read: answers may miss other replicas' writes
        self._thread = threading.Thread(target=self._run, name="gallery-follower", daemon=True)

    def start(self) -> Follower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=self._poll_s + 10)

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._store.wait_for_change(self._poll_s)
                if not self._catch_up_once():
                    return
            except GalleryError as error:
                if self.in_sync:
                    logger.warning("gallery store unreachable, serving the local index until it is back: %s", error)
                self.in_sync = False
                self._stopping.wait(min(self._poll_s, 1.0))
                continue
            except Exception:  # keep following: one bad stretch must not freeze the replica's index forever
                logger.exception("applying gallery changes failed; retrying")
                self._stopping.wait(self._poll_s)
                continue
            if not self.in_sync:
                logger.info("gallery store reachable again; index caught up")
            self.in_sync = True

    def _catch_up_once(self) -> bool:
        """False when the gallery is gone (the strong reference lives only in this frame)."""
        catch_up = self._catch_up()
        if catch_up is None:
            return False
        catch_up()
        return True
