"""Keeping the gallery's FAISS index in step with its store: catch-up, background rebuilds, snapshots.

:class:`IndexUpkeep` is mixed into :class:`service.gallery.Gallery` (the coordinator of writes), which
provides the store, the locks and the index state. It applies the change log to the index (the writer's own
commits at once, other replicas' when the follower calls :meth:`catch_up`), asks the background rebuilder
(``service.gallery_rebuild``) for a compaction or retrain when the index needs one, swaps the result in,
and persists snapshots (``service.index_snapshot``) so that a restart replays the log instead of rebuilding.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from service import index_snapshot
from service.gallery_input import GalleryError
from service.gallery_rebuild import FULL, Rebuilder, RebuildStatus, build_from_store, rebuild_kind, replay
from service.gallery_rows import StoredRows
from service.gallery_sync import Follower, read_changes
from service.index import IndexParams, RWLock, SearchIndex, describe_index
from service.store import LAST_SEQ

logger = logging.getLogger("centerid.gallery")

CHANGE_LOG_KEEP = 100_000  # default of CENTERID_CHANGE_LOG_KEEP
PRUNED_THROUGH = "SELECT value FROM meta WHERE key = 'log_pruned_through'"


@dataclass(frozen=True)
class GalleryStatus:
    """What the gallery is doing, for /ready and /metrics."""

    applied_seq: int  # the newest change-log record the index reflects
    store_seq: int | None  # the store's newest record (None: the store cannot be reached now)
    may_be_stale: bool  # searches may miss other replicas' writes (the shared store is unreachable)
    rebuild: RebuildStatus
    reembed: tuple[int, int] | None  # (done, total) while re-embedding for a new model

    @property
    def lag(self) -> int | None:
        return None if self.store_seq is None else max(self.store_seq - self.applied_seq, 0)


class IndexUpkeep(StoredRows):
    """The index side of the gallery (see the module docstring); every method expects the write lock
    held unless it says it takes it."""

    path: Path
    index_kind: str
    params: IndexParams
    threads: int | None
    _write_lock: threading.RLock
    _index_lock: RWLock
    _state: SearchIndex
    _stale: int
    _generation: int
    _applied_seq: int
    _outdated: bool
    _reembed_progress: tuple[int, int] | None
    _follower: Follower | None
    _rebuilder: Rebuilder
    _closed: bool
    _snapshot_seq: int
    change_log_keep: int = CHANGE_LOG_KEEP  # records kept after a snapshot (Gallery.open sets it)

    @property
    def in_sync(self) -> bool:
        """False while a replica cannot reach its shared store: searches may miss other replicas' writes."""
        return self._follower is None or self._follower.in_sync

    def status(self) -> GalleryStatus:
        """Log positions (applied vs the store's newest), the background rebuild, re-embedding progress."""
        store_seq = None
        if self.in_sync and not self._closed:  # an unreachable store is known without waiting for a timeout
            try:
                store_seq = int(self._db.query(LAST_SEQ)[0][0])
            except GalleryError:
                store_seq = None
        stale = self._db.shared and store_seq is None
        return GalleryStatus(self._applied_seq, store_seq, stale, self._rebuilder.status(), self._reembed_progress)

    def wait_for_rebuild(self, timeout: float = 600.0) -> bool:
        """Block until no background rebuild runs or waits (True) or ``timeout`` passed (False)."""
        return self._rebuilder.wait_idle(timeout)

    # -- index maintenance -------------------------------------------------------------------------------
    def _rebuild(self) -> None:
        """Build a fresh index from the committed rows and swap it in, here and now (opening, re-embedding:
        before the service is ready). Everything later goes through :meth:`_background_rebuild`."""
        started = time.perf_counter()
        self._set_threads()
        seq, state = build_from_store(
            self._db, self.fingerprint, self.dim, self.index_kind, self.params, self._decode_vectors
        )
        with self._write_lock:
            self._swap(state, seq, counts=False)
        self._log_build("built", state, started)

    def _background_rebuild(self, kind: str) -> bool:
        """The builder thread's job: build with no lock held, replay what committed meanwhile, swap.

        Returns False without building when the index no longer needs it (a coalesced request that the
        rebuild just swapped in already covered). A re-embedding committed during the build makes the new
        index useless, and so does a change log pruned past its position: it is built again.
        """
        if not self._wants_rebuild(kind):
            return False
        started = time.perf_counter()
        self._set_threads()
        while True:
            seq, state = build_from_store(
                self._db, self.fingerprint, self.dim, self.index_kind, self.params, self._decode_vectors
            )
            self._rebuilder.checkpoint(kind)
            caught_up = replay(self._db, state, seq, self.fingerprint, self._decode_vectors)  # the bulk, unlocked
            if caught_up is None:
                continue
            with self._write_lock:  # the rest: nothing commits on this replica meanwhile
                caught_up = replay(self._db, state, caught_up, self.fingerprint, self._decode_vectors)
                if caught_up is None or seq < self._pruned_through():  # re-embedded, or pruned past the build
                    continue
                self._rebuilder.raise_if_closing(kind)
                self._swap(state, caught_up)
            break
        self._log_build(f"rebuilt in the background ({kind})", state, started)
        self._save_snapshot()
        return True

    def _wants_rebuild(self, kind: str) -> bool:
        with self._index_lock.read():
            return self._outdated or self._state.needs_rebuild()

    def _swap(self, state: SearchIndex, seq: int, counts: bool = True) -> None:
        """Publish ``state`` (reflecting the log up to ``seq``); the caller holds the write lock. ``counts``:
        bump the generation when it holds changes the old index had not applied (opening and re-embedding
        count their own)."""
        with self._index_lock.write():
            moved = seq > self._applied_seq
            self._state, self._applied_seq = state, seq
        if counts and (moved or self._outdated):
            self._generation += 1
        self._outdated = False

    def _log_build(self, what: str, state: SearchIndex, started: float) -> None:
        logger.info(
            "gallery index (%s, %s) %s with %d entries in %.2fs",
            self.index_kind,
            describe_index(state.index),
            what,
            len(state.label_of),
            time.perf_counter() - started,
        )

    def _after_commit(
        self, seq: int, ids: np.ndarray, vectors: np.ndarray, labels: list[str], removed: list[int]
    ) -> None:
        """Make the index reflect this process's own committed write before the caller is answered.

        The sole writer of an embedded store applies what it just wrote (no read-back); a shared store,
        or a log with records between ours and the last applied one, is caught up from the log instead.
        """
        if self._db.shared or seq - self._applied_seq != len(ids) + len(removed):
            self._catch_up_locked()
            return
        self._set_threads()
        with self._index_lock.write():
            self._state.apply(ids, vectors, labels, removed)
            self._applied_seq = seq
        self._request_rebuild_if_needed()
        self._generation += 1

    def catch_up(self) -> int:
        """Apply every change committed after :attr:`applied_seq` (any replica's); returns how many records."""
        with self._write_lock:
            return self._catch_up_locked()

    def _catch_up_locked(self) -> int:
        """Apply the log to the index in order (under the index write lock) and only then bump the
        generation: whoever sees the new number searches the new contents. A schema-1 re-embedding in the log
        stops the replay: searches refuse until the background rebuild of every vector has swapped in."""
        start, changed = self._applied_seq, False
        self._set_threads()
        if self._applied_seq < self._pruned_through():  # the log it would replay is gone: rebuild
            self._outdated = True
        while not self._outdated and (batch := read_changes(self._db, self._applied_seq, self.fingerprint)):
            if batch.rebuild:  # a schema-1 re-embedding replaced every vector: start over from the rows
                self._outdated = True
                break
            if batch.foreign_adds:
                self._saw_foreign_adds()
            ids = np.array(batch.add_ids, dtype=np.int64)
            vectors = self._decode_vectors(batch.add_blobs)
            with self._index_lock.write():
                changed |= self._state.apply(ids, vectors, batch.add_labels, batch.removed)
                self._applied_seq = batch.last_seq
        self._request_rebuild_if_needed()
        if changed:
            self._generation += 1
        return self._applied_seq - start

    def _saw_foreign_adds(self) -> None:
        """The replay met entries that arrived with another model's vector only (see service.gallery_models)."""

    def _request_rebuild_if_needed(self) -> None:
        """Called under the write lock after the index changed (or failed to: a retry after a failed build)."""
        if self._outdated:
            self._rebuilder.request(FULL)
        elif self._state.needs_rebuild():
            self._rebuilder.request(rebuild_kind(self._state))

    def _load_index(self) -> None:
        """The snapshot and the log after it when the snapshot fits, else a rebuild (and a new snapshot)."""
        started = time.perf_counter()
        newest, pruned = int(self._db.query(LAST_SEQ)[0][0]), self._pruned_through()
        loaded = index_snapshot.load(self.path, self._snapshot_identity(), self.params, newest, pruned)
        if loaded is None:
            self._rebuild()
            self._save_snapshot()
        else:
            with self._index_lock.write():
                self._state, self._applied_seq = loaded
            self._snapshot_seq = loaded[1]
        replayed = self._catch_up_locked()
        if self._outdated:  # re-embedded since the snapshot: build from the rows now, before serving
            self._rebuild()
        logger.info(
            "gallery index ready in %.2fs (%s, %d changes replayed)",
            time.perf_counter() - started,
            "rebuilt" if loaded is None else f"snapshot at change {loaded[1]}",
            replayed,
        )

    def _snapshot_identity(self) -> dict[str, Any]:
        rows = self._db.query("SELECT value FROM meta WHERE key = 'gallery_id'")
        return index_snapshot.identity(str(rows[0][0]), self.fingerprint, self.dim, self.index_kind, self.params)

    def _save_snapshot(self) -> None:
        """Persist the index with its log position; failing to is logged, never fatal (the log is the truth)."""
        if self._stale:
            return
        try:
            with self._index_lock.read():
                seq = self._applied_seq
                index_snapshot.save(self.path, self._state, seq, self._snapshot_identity())
            self._snapshot_seq = seq
            self.prune_change_log(self.change_log_keep)
        except (OSError, RuntimeError, GalleryError) as error:
            logger.warning("could not write the index snapshot or prune the change log: %s", error)

    def prune_change_log(self, keep: int) -> int:
        """Delete the change-log records before both the newest ``keep`` and this replica's snapshot.

        The horizon is recorded (``meta.log_pruned_through``): a replica or snapshot positioned before it
        can no longer replay, notices, and rebuilds from the rows instead, so pruning costs a laggard a
        rebuild, never an entry. The newest record always stays (the log's position is its maximum).
        Returns how many records were deleted.
        """
        keep = max(int(keep), 1)
        with self._write_lock, self._db.transaction() as db:
            newest = int(db.execute(LAST_SEQ)[0][0])
            horizon = min(newest - keep, self._snapshot_seq)
            pruned = db.execute(PRUNED_THROUGH)
            if horizon <= (int(pruned[0][0]) if pruned else 0):
                return 0
            count = int(db.execute("SELECT COUNT(*) FROM changes WHERE seq <= ?", (horizon,))[0][0])
            db.execute("DELETE FROM changes WHERE seq <= ?", (horizon,))
            db.execute(
                "INSERT INTO meta VALUES ('log_pruned_through', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(horizon),),
            )
        if count:
            logger.info("change log pruned through record %d (%d records)", horizon, count)
        return count

    def _pruned_through(self) -> int:
        rows = self._db.query(PRUNED_THROUGH)
        return int(rows[0][0]) if rows else 0

    def _set_threads(self) -> None:
        if self.threads:  # OpenMP thread counts are per calling thread
            faiss.omp_set_num_threads(self.threads)
